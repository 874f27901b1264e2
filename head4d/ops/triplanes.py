"""``sample_triplanes``: features of points from three axis-aligned feature planes.

Where things live:
    reference   head4d/reference/triplanes.py   (the ``torch`` backend)
    C++ / CUDA  csrc/triplanes/                  (``cpu`` and ``cuda`` backends)
    Triton      kernels/triplanes.py             (``triton`` backend, ``head4d.kernels.triplanes``)
    tests       tests/test_triplanes.py
    benchmark   benchmarks/bench_triplanes.py
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._checks import (check_choice, check_dim, check_positive_finite, check_same_device,
                       check_tensor)
from .._nvtx import nvtx_range
from ..reference import triplanes as _reference
from . import _library

OP = "sample_triplanes"

#: Backend preference per device type, fastest first; the first available one is
#: the default. CPU: measured (benchmarks/results/). CUDA: the expected order until
#: a committed H100 run says otherwise.
PREFERENCES = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}

#: The backends this op has; each runs every input the op accepts (no support predicate).
IMPLEMENTED = ("cuda", "triton", "cpu", "torch")
_backend.declare(OP, IMPLEMENTED, PREFERENCES)

LAYOUTS = {"portrait4d": 0, "eg3d": 1}
REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}


def _kernels(backend: str):
    """The custom operator running a compiled backend (:mod:`head4d.ops._library`):
    ``head4d::sample_triplanes`` (``head4d._C``, CPU and CUDA) or
    ``head4d::sample_triplanes_triton``; called as ``op(planes, points, scale, layout, reduce)``,
    differentiable with respect to planes and points."""
    return _library.sample_triplanes_triton if backend == "triton" else _library.sample_triplanes


def check_sample_triplanes_inputs(planes, points, box_warp, plane_layout, reduce) -> float:
    """Validates the arguments of :func:`sample_triplanes`; returns ``box_warp`` as a float."""
    check_tensor(OP, "planes", planes, "[N, 3, C, H, W]", 5)
    check_tensor(OP, "points", points, "[N, M, 3]", 3)
    check_dim(OP, "planes", planes, 1, 3, "[N, 3, C, H, W]")
    check_dim(OP, "points", points, 2, 3, "[N, M, 3]")
    if points.shape[0] != planes.shape[0]:
        raise ValueError(f"{OP}: points has batch size {points.shape[0]} (shape {list(points.shape)}) "
                         f"but planes has {planes.shape[0]} (shape {list(planes.shape)}); they must match")
    if min(planes.shape[2:]) < 1:
        raise ValueError(f"{OP}: planes must have C, H, W >= 1, got shape {list(planes.shape)}")
    check_same_device(OP, [("planes", planes), ("points", points)])
    check_choice(OP, "plane_layout", plane_layout, tuple(LAYOUTS))
    check_choice(OP, "reduce", reduce, tuple(REDUCTIONS))
    return check_positive_finite(OP, "box_warp", box_warp)


def sample_triplanes(planes: torch.Tensor, points: torch.Tensor, *, box_warp: float = 1.0,
                     plane_layout: str = "portrait4d", reduce: str = "mean",
                     backend: Optional[str] = None) -> torch.Tensor:
    """Bilinearly sample three feature planes at the projections of 3D points.

    Matches EG3D's ``sample_from_planes`` (and Portrait4D's fixed layout) to
    float32 rounding: points are scaled by ``2 / box_warp``, projected onto the
    planes, and each plane is sampled like ``grid_sample(mode="bilinear",
    padding_mode="zeros", align_corners=False)``, the first plane coordinate
    indexing the width ``W``.

    Args:
        planes: ``[N, 3, C, H, W]`` float16, bfloat16, float32 or float64; any strides
            (a channels-last layout, C innermost, saves the kernels a transpose).
        points: ``[N, M, 3]`` floating point, on the same device.
        box_warp: side of the cube, centred at the origin, that the planes span.
        plane_layout: ``"portrait4d"``: planes at (x, y), (y, z), (z, x);
            ``"eg3d"``: planes at (x, y), (x, z), (z, x), the layout of EG3D checkpoints.
        reduce: ``"mean"`` (EG3D's decoder input) or ``"sum"`` over the planes,
            or ``"none"`` to keep them apart.
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"`` or ``None``/``"auto"``
            (the fastest available; see :mod:`head4d._backend` for the environment overrides).

    Returns:
        ``[N, M, C]`` for ``"mean"``/``"sum"``, ``[N, 3, M, C]`` for ``"none"``, in
        ``planes.dtype``; float16 and bfloat16 accumulate in float32.
        Differentiable with respect to ``planes`` and ``points`` on every backend.

    Non-finite input, the same on every backend: a NaN or infinite coordinate of a
    point makes NaN the features of every plane that uses that coordinate (so NaN after
    ``"mean"``/``"sum"``); NaN and infinities in ``planes`` propagate through the
    bilinear sum as in ``grid_sample`` (an infinite texel with weight 0 gives NaN).
    """
    box_warp = check_sample_triplanes_inputs(planes, points, box_warp, plane_layout, reduce)
    chosen = _backend.resolve(OP, planes.device, backend, PREFERENCES)
    with nvtx_range("head4d.sample_triplanes"):
        if chosen == "torch":
            return _reference.sample_triplanes(planes, points, box_warp, plane_layout, reduce)
        return _kernels(chosen)(planes, points, 2.0 / box_warp, LAYOUTS[plane_layout], REDUCTIONS[reduce])
