"""Named NVTX ranges, so an Nsight Systems timeline reads by op and stage name.

Uses the ``nvtx`` package when it is installed, else ``torch.cuda.nvtx`` when
CUDA is present, else nothing. All of them cost next to nothing when no
profiler is attached. Ranges live in the ``head4d`` domain when ``nvtx`` is used.
"""
from __future__ import annotations

import contextlib
import functools

import torch

try:  # pragma: no cover - depends on the environment
    import nvtx as _nvtx_pkg
except Exception:  # pragma: no cover
    _nvtx_pkg = None


@contextlib.contextmanager
def _torch_range(name: str):
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


@functools.lru_cache(maxsize=None)
def _use_torch_nvtx() -> bool:
    return torch.cuda.is_available()


def nvtx_range(name: str):
    """A context manager that opens the NVTX range ``name`` (for example ``head4d.sample_triplanes``).

    None while ``torch.compile`` traces: a compiled graph does not run this Python, and
    the ranges' libraries cannot be traced."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if _nvtx_pkg is not None:
        return _nvtx_pkg.annotate(name, domain="head4d")
    if _use_torch_nvtx():
        return _torch_range(name)
    return contextlib.nullcontext()
