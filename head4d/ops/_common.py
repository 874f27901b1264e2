"""Helpers shared by the renderer ops: backend choice for ops that so far have only
the reference, dtype and generator checks, and where checks of tensor values may run
(:func:`values_off_host`). Argument checks shared with the modules are in
:mod:`head4d._checks`."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from .. import _backend


def values_off_host(t: torch.Tensor) -> bool:
    """Whether checks of ``t``'s values must stay on the device: while ``torch.compile``
    traces (the values are not known yet) and while a CUDA graph is captured (a host
    sync would break the capture). They then run as ``torch._assert_async``, which
    raises on the CPU at once and fails the CUDA stream asynchronously."""
    return torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


def resolve_implemented(op: str, device: torch.device, requested: Optional[str],
                        preferences: Dict[str, Sequence[str]],
                        implemented: Sequence[str] = ("torch",), inputs: Optional[Sequence] = None) -> str:
    """:func:`head4d._backend.resolve` for ``op``, declared with ``implemented`` and
    ``preferences`` unless its module declared it (:func:`head4d._backend.declare`).

    A backend asked for by name for this op (its ``backend=`` argument or its
    ``HEAD4D_BACKEND_<OP>`` variable) that the op does not have raises
    ``RuntimeError``. The process-wide ``HEAD4D_BACKEND`` names a backend for every
    op; an op that lacks it keeps its default, so ``HEAD4D_BACKEND=cuda`` can drive a
    whole renderer. ``inputs`` go to the op's support predicates.
    """
    if op not in _backend.DECLARED:
        _backend.declare(op, implemented, preferences)
    return _backend.resolve(op, device, requested, preferences, inputs=inputs)


def check_same_dtype(op: str, tensors) -> torch.dtype:
    tensors = list(tensors)
    first_name, first = tensors[0]
    for name, t in tensors[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')} but {first_name} has "
                            f"{str(first.dtype).replace('torch.', '')}; they must match")
    return first.dtype


def check_generator(op: str, generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")

