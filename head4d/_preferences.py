"""Each op's default backend order: measured where a committed run says, built-in elsewhere.

``head4d/backend_order.json`` (package data) maps op -> device type -> backends,
fastest first, as derived from a benchmark run by ``head4d bench --write-order``
(:mod:`head4d.bench.order`). An op module builds its ``PREFERENCES`` with
:func:`backend_order`::

    PREFERENCES = backend_order(OP, {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")})

Importing this module reads nothing; the file is read once, on the first call.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, Mapping, Sequence, Tuple

ORDER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_order.json")


def backend_order(op: str, builtin: Mapping[str, Sequence[str]]) -> Dict[str, Tuple[str, ...]]:
    """The preference table of ``op``: device type -> backends, first available wins.

    For each device type the file has an entry for, its order comes first, followed by
    the ``builtin`` backends it does not name (in their built-in order); every other
    device type keeps ``builtin``. A device type only the file names gets the file's
    order followed by ``torch``.

    Args:
        op: the op's name as the benchmarks name it (``"sample_triplanes"``).
        builtin: the op's own table, ``{"cpu": ("cpu", "torch"), "cuda": (...)}``.

    Returns:
        a new ``{device type: tuple of backend names}``.
    """
    if not isinstance(op, str) or not op:
        raise TypeError(f"backend_order: op must be a non-empty str, got {op!r}")
    measured = load_orders(ORDER_FILE).get(op, {})
    return merge_order(builtin, measured)


def merge_order(builtin: Mapping[str, Sequence[str]],
                measured: Mapping[str, Sequence[str]]) -> Dict[str, Tuple[str, ...]]:
    """``measured`` per device type, then the backends of ``builtin`` it lacks (see
    :func:`backend_order`)."""
    table = {device: tuple(order) for device, order in builtin.items()}
    for device, order in measured.items():
        rest = table.get(device, ("torch",))
        table[device] = tuple(order) + tuple(b for b in rest if b not in order)
    return table


@functools.lru_cache(maxsize=None)
def load_orders(path: str) -> Dict[str, Dict[str, Tuple[str, ...]]]:
    """The ``orders`` of an order file: op -> device type -> backend names.

    A missing file gives ``{}`` (every op keeps its built-in order); a malformed one
    raises ``ValueError`` naming the file and what was expected.
    """
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    orders = data.get("orders", {}) if isinstance(data, dict) else None
    if not isinstance(orders, dict):
        raise ValueError(f"{path}: expected an object with 'orders': {{op: {{device type: "
                         f"[backend, ...]}}}}, got {type(orders).__name__ if data else data!r}")
    known = _known_backends()
    out: Dict[str, Dict[str, Tuple[str, ...]]] = {}
    for op, per_device in orders.items():
        if not isinstance(per_device, dict):
            raise ValueError(f"{path}: orders[{op!r}] must map device type to a list of backends, "
                             f"got {per_device!r}")
        out[op] = {}
        for device, order in per_device.items():
            if device not in ("cpu", "cuda"):
                raise ValueError(f"{path}: orders[{op!r}] has device type {device!r}; expected "
                                 f"'cpu' or 'cuda'")
            if (not isinstance(order, list) or not order or len(set(order)) != len(order)
                    or any(b not in known for b in order)):
                raise ValueError(f"{path}: orders[{op!r}][{device!r}] must be a non-empty list of "
                                 f"distinct backends from {known}, got {order!r}")
            out[op][device] = tuple(order)
    return out


def _known_backends() -> Tuple[str, ...]:
    from ._backend import BACKENDS, PEER_BACKENDS

    return tuple(BACKENDS) + tuple(PEER_BACKENDS)
