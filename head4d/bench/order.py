"""Each op's default backend order, derived from what a benchmark run measured.

The order for one op on one device type ranks the backends that ran correctly on every
case of the op where they ran (the reference ``torch`` included, at speedup 1) by their
weighted geometric-mean speedup over the reference across those cases, fastest first.
A case's ``fwd+bwd`` row weighs :data:`PASS_WEIGHTS` ``["fwd+bwd"]`` against its ``fwd``
row's ``["fwd"]`` (training calls spend their time in the backward); a case with one
pass counts that pass alone. A backend that failed a check or raised on any case is
left out, as is one the run could not run (``skip``): :func:`head4d._preferences.backend_order`
puts the backends a file does not name after the ones it does, so they stay reachable
only behind the reference. Whole-model cases (:data:`~head4d.bench.case.WHOLE_MODELS`)
set no order.

The file (``head4d/backend_order.json``, read by :mod:`head4d._preferences`)::

    {"note": "...",
     "orders": {"sample_triplanes": {"cuda": ["cuda", "triton", "torch"]}, ...},
     "sources": {"cuda": {"device": "...", "git_commit": "...", "date": "..."}}}
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from .case import REFERENCE, WHOLE_MODELS

#: Weight of each pass in an op's score (see the module's docstring).
PASS_WEIGHTS = {"fwd": 1.0, "fwd+bwd": 2.0, "step": 2.0}

NOTE = ("Default backend order per op and device type, fastest correct backend first, "
        "derived by `head4d bench --write-order` from a benchmark run (head4d/bench/order.py "
        "says how); `sources` names the run of each device type. Backends an entry does not "
        "name follow it in the op's built-in order (head4d/_preferences.py).")


def derive_orders(rows: Iterable[Mapping], device_type: str) -> Tuple[Dict[str, List[str]], List[str]]:
    """The backend order of every op in ``rows``.

    Args:
        rows: result rows of one run, as in a bench JSON's ``results`` (dicts with
            ``op``, ``shape``, ``pass``, ``backend``, ``status``, ``speedup``).
        device_type: the run's device type (``"cuda"``, ``"cpu"``), for the messages.

    Returns:
        ``(orders, notes)``: op -> backends fastest first (the reference included), and
        one line per backend left out (failed, raised or not run) saying why.
    """
    by_op: Dict[str, List[Mapping]] = {}
    for row in rows:
        for key in ("op", "shape", "pass", "backend", "status"):
            if key not in row:
                raise ValueError(f"derive_orders: a result row lacks {key!r}; expected the rows "
                                 f"of a bench JSON's 'results', got keys {sorted(row)}")
        if row["op"] not in WHOLE_MODELS:
            by_op.setdefault(row["op"], []).append(row)

    orders: Dict[str, List[str]] = {}
    notes: List[str] = []
    for op, op_rows in by_op.items():
        backends = list(dict.fromkeys(r["backend"] for r in op_rows))
        scores: Dict[str, float] = {}
        for backend in backends:
            mine = [r for r in op_rows if r["backend"] == backend]
            bad = [r for r in mine if r["status"] in ("fail", "error")]
            if bad:
                notes.append(f"{op} on {device_type}: {backend} left out, {bad[0]['status']} on "
                             f"{bad[0]['shape']} {bad[0]['pass']}")
                continue
            ok = [r for r in mine if r["status"] == "ok"]
            if not ok:
                notes.append(f"{op} on {device_type}: {backend} left out, not run here")
                continue
            scores[backend] = 0.0 if backend == REFERENCE else _log_speedup(ok)
        if REFERENCE not in scores:
            notes.append(f"{op} on {device_type}: no reference row, no order")
            continue
        # sorted() is stable: equal scores keep the order the run listed them in
        orders[op] = sorted(scores, key=lambda b: -scores[b])
    return orders, notes


def _log_speedup(rows: List[Mapping]) -> float:
    """The weighted mean of ``log(speedup)`` over a backend's ``ok`` rows of one op."""
    total = weight = 0.0
    for r in rows:
        w = PASS_WEIGHTS.get(r["pass"], 1.0)
        total += w * math.log(r["speedup"])
        weight += w
    return total / weight


def write_orders(path: str, rows: Iterable[Mapping], environment: Mapping) -> Tuple[dict, List[str]]:
    """Derives the orders of one run and writes them into the file ``path``.

    Entries of other device types (and of ops this run did not measure) already in the
    file are kept; this run's device type replaces its own. ``environment`` is the run's
    (a bench JSON's ``environment``): its ``device_type`` picks the entry, its device,
    commit and date become the entry's source. Returns ``(the file's data, notes)``.
    """
    device_type = environment.get("device_type")
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"write_orders: environment['device_type'] must be 'cpu' or 'cuda', "
                         f"got {device_type!r}")
    orders, notes = derive_orders(rows, device_type)
    data = {"note": NOTE, "orders": {}, "sources": {}}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        data["orders"] = old.get("orders", {})
        data["sources"] = old.get("sources", {})
    for op, order in orders.items():
        data["orders"].setdefault(op, {})[device_type] = order
    data["sources"][device_type] = {key: environment.get(key) for key in
                                    ("device", "git_commit", "git_dirty", "torch", "triton", "date")}
    data["orders"] = {op: data["orders"][op] for op in sorted(data["orders"])}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return data, notes


def read_bench_json(path: str) -> Tuple[List[dict], dict]:
    """``(results, environment)`` of a bench or gate JSON report."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "results" not in data or "environment" not in data:
        raise ValueError(f"{path}: expected a JSON report of `head4d bench --json` or of the gate "
                         f"(an object with 'results' and 'environment')")
    return data["results"], data["environment"]


def format_orders(orders: Mapping[str, Mapping[str, List[str]]], device_type: Optional[str] = None) -> str:
    """One line per op (and device type): ``op  device: a > b > c``."""
    lines = []
    for op, per_device in orders.items():
        for device, order in per_device.items():
            if device_type is None or device == device_type:
                lines.append(f"{op:20s} {device:5s}: {' > '.join(order)}")
    return "\n".join(lines)
