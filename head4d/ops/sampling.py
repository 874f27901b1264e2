"""Depth samples along rays: ``stratified_depths``, ``sample_importance``, ``merge_samples``.

Where things live:
    reference   head4d/reference/sampling.py   (the ``torch`` backend)
    C++ / CUDA  csrc/importance/                 (``cpu`` and ``cuda`` backends of ``sample_importance``)
    tests       tests/test_rendering.py, tests/test_importance_kernels.py
    benchmark   head4d/bench.py (``sample_importance`` cases)

``stratified_depths`` and ``merge_samples`` have only the reference: they are a few
elementwise ops and a sort, composed in PyTorch on purpose.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from .. import _backend
from .._checks import FLOATING, check_bool, check_choice, check_dim, check_int, check_same_device, check_tensor
from .._nvtx import nvtx_range
from ..reference import sampling as _reference
from . import _library
from ._common import check_generator, check_same_dtype, resolve_implemented

#: Backend preference per device type, fastest first (of the ops here, only
#: ``sample_importance`` has compiled backends; the others run the reference).
PREFERENCES = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "torch"),
}

#: The backends of ``sample_importance`` (``stratified_depths`` and ``merge_samples``
#: have only ``torch``).
IMPLEMENTED = ("cpu", "cuda", "torch")
_backend.declare("sample_importance", IMPLEMENTED, PREFERENCES)  # all inputs on every backend
_backend.declare("stratified_depths", ("torch",), PREFERENCES)
_backend.declare("merge_samples", ("torch",), PREFERENCES)

JITTERS = ("per_sample", "per_image", "none")

Limit = Union[float, torch.Tensor]


def _limit_tensor(op: str, name: str, value, n_rays: int) -> Optional[torch.Tensor]:
    """``value`` checked as a ``[N, R, 1]``/``[N, 1, 1]`` tensor, or ``None`` for a real number."""
    if isinstance(value, torch.Tensor):
        check_tensor(op, name, value, "[N, R, 1] or [N, 1, 1]", 3)
        if value.shape[2] != 1 or value.shape[1] not in (1, n_rays):
            raise ValueError(f"{op}: {name} must have shape [N, {n_rays}, 1] or [N, 1, 1] (n_rays = {n_rays}), "
                             f"got {list(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number or a tensor of shape [N, R, 1] or [N, 1, 1], "
                        f"got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return None


def stratified_depths(ray_start: Limit, ray_end: Limit, n_samples: int, n_rays: int, *,
                      disparity: bool = False, jitter: str = "per_sample",
                      generator: Optional[torch.Generator] = None, batch_size: Optional[int] = None,
                      device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Coarse depths along each ray: S evenly spaced values from ``ray_start`` to
    ``ray_end`` with stratified jitter (EG3D's ``sample_stratified``).

    With k = 0..S-1 and U in [0, 1), rounded exactly as EG3D rounds them (for float32,
    the same U gives bit-identical depths):

    * ``disparity=False``: ``linspace(start, end, S)[k] + U * (end - start)/(S-1)``;
      for number limits the linspace is ``torch.linspace`` and the spacing is computed
      from the numbers in double precision, for tensor limits it is EG3D's tensor
      linspace ``start + (arange(S)/(S-1))[k] * (end - start)`` (see
      :func:`head4d.reference.stratified_depths`);
    * ``disparity=True``: ``t = linspace(0, 1, S)[k] + U/(S-1)``, then
      ``1 / (1/start * (1 - t) + 1/end * t)`` (the jitter is added in t-space,
      before the inversion, with EG3D's step ``1/(S-1)``).

    ``jitter``: ``"per_sample"`` (EG3D) draws U independently for every sample of
    every ray, as one ``torch.rand`` of shape ``[N, R, S, 1]``; ``"per_image"``
    (Portrait4D's 'auto-plane') draws one vector of S values per image, shared by
    all its rays, as one ``torch.rand`` of shape ``[N, 1, S, 1]``; ``"none"`` is
    deterministic (U = 0) and draws nothing. The numbers come from ``generator``
    (drawn on the generator's device, then moved), or from the global generator.

    Args:
        ray_start, ray_end: real numbers, or tensors ``[N, R, 1]`` (one range per
            ray, e.g. from :func:`ray_box_limits`) or ``[N, 1, 1]`` (one per image, e.g.
            from :func:`auto_plane_limits`); two tensors need the same N, dtype and device.
        n_samples: S >= 2.
        n_rays: R >= 0.
        disparity: sample evenly in inverse depth.
        jitter: ``"per_sample"``, ``"per_image"`` or ``"none"``.
        generator: a ``torch.Generator`` or None.
        batch_size, device, dtype: N, device and dtype of the output when both limits
            are numbers (defaults 1, CPU, float32); not allowed with a tensor limit.
        backend: ``None``/``"auto"`` or ``"torch"``.

    Returns:
        ``[N, R, S, 1]`` depths in the limits' dtype; differentiable with respect to
        tensor limits.
    """
    op = "stratified_depths"
    n_samples = check_int(op, "n_samples", n_samples, 2)
    n_rays = check_int(op, "n_rays", n_rays, 0)
    check_bool(op, "disparity", disparity)
    check_choice(op, "jitter", jitter, JITTERS)
    check_generator(op, generator)
    start_t = _limit_tensor(op, "ray_start", ray_start, n_rays)
    end_t = _limit_tensor(op, "ray_end", ray_end, n_rays)
    tensors = [(name, t) for name, t in (("ray_start", start_t), ("ray_end", end_t)) if t is not None]
    if tensors:
        if batch_size is not None or device is not None or dtype is not None:
            raise ValueError(f"{op}: batch_size, device and dtype are only for number limits; "
                             f"they come from the tensor limits here")
        if len(tensors) == 2:
            if start_t.shape[0] != end_t.shape[0]:
                raise ValueError(f"{op}: ray_end has batch size {end_t.shape[0]} but ray_start has "
                                 f"{start_t.shape[0]}; they must match")
            check_same_dtype(op, tensors)
            check_same_device(op, tensors)
        like = tensors[0][1]
        start_t = start_t if start_t is not None else torch.full((like.shape[0], 1, 1), float(ray_start),
                                                                 dtype=like.dtype, device=like.device)
        end_t = end_t if end_t is not None else torch.full((like.shape[0], 1, 1), float(ray_end),
                                                           dtype=like.dtype, device=like.device)
    else:
        batch_size = check_int(op, "batch_size", 1 if batch_size is None else batch_size, 0)
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in FLOATING:
            raise TypeError(f"{op}: dtype must be a floating point dtype, got {dtype}")
        device = torch.device("cpu") if device is None else torch.device(device)
        resolve_implemented(op, device, backend, PREFERENCES)
        with nvtx_range("head4d.stratified_depths"):
            return _reference.stratified_depths(float(ray_start), float(ray_end), n_samples, n_rays, disparity,
                                                jitter, generator, batch_size=batch_size, device=device,
                                                dtype=dtype)
    resolve_implemented(op, start_t.device, backend, PREFERENCES)
    with nvtx_range("head4d.stratified_depths"):
        return _reference.stratified_depths(start_t, end_t, n_samples, n_rays, disparity, jitter, generator)


def sample_importance(depths: torch.Tensor, weights: torch.Tensor, n_importance: int, *, det: bool = False,
                      generator: Optional[torch.Generator] = None, backend: Optional[str] = None
                      ) -> torch.Tensor:
    """Fine depths drawn from the coarse pass' compositing weights (EG3D's
    ``sample_importance`` and ``sample_pdf``).

    Per ray, with S coarse depths t (sorted) and their S-1 weights w from
    :func:`composite_rays`:

    1. smooth: ``max_pool1d(w, kernel 2, stride 1, padding 1)`` (S values), then
       ``avg_pool1d(kernel 2, stride 1)`` (S-1 values), then ``+ 0.01``;
    2. bins = the S-1 midpoints ``(t[k] + t[k+1]) / 2``; the distribution uses the
       inner smoothed weights ``smoothed[1:-1]`` (S-3 values) ``+ 1e-5``, normalized;
       ``cdf = [0, cumsum(pdf)]`` (S-2 values);
    3. ``u = linspace(0, 1, n_importance)`` if ``det``, else U[0, 1) from ``generator``
       (one ``torch.rand`` of shape ``[N*R, n_importance]``);
    4. ``idx = searchsorted(cdf, u, right=True)``, ``below = max(idx - 1, 0)``,
       ``above = min(idx, S - 3)``; ``step = cdf[above] - cdf[below]``, replaced by 1
       when under 1e-5; sample ``= bins[below] + (u - cdf[below]) / step * (bins[above] - bins[below])``.

    So samples lie within ``[bins[0], bins[S-3]]``; the last midpoint is never used
    (EG3D's indexing). The result is not sorted. No gradient flows (inputs are
    detached, the computation runs under ``torch.no_grad``). EG3D smooths in
    float32; here float64 inputs stay float64 (float16 / bfloat16 compute in float32).

    Every backend draws ``u`` the same way (one ``torch.rand`` as above, from
    ``generator`` or the global generator), so for the same generator state the
    compiled backends (``cpu``, ``cuda``) agree with the reference to float32
    rounding: their sum of the weights is accumulated in float64 (torch's in float32,
    in its own order) and their cumsum sequentially in float64 (as torch's on the
    CPU), which can move a CDF value by an ulp (csrc/importance/importance_math.h).

    Args:
        depths: ``[N, R, S, 1]`` floating point, S >= 4.
        weights: ``[N, R, S-1, 1]``, same dtype and device.
        n_importance: number of fine samples per ray, >= 1.
        det: deterministic ``u`` (EG3D's renderer always samples randomly).
        generator: a ``torch.Generator`` or None (the global generator).
        backend: ``"cuda"`` (CUDA tensors), ``"cpu"`` (CPU tensors), ``"torch"`` (the
            reference) or ``None``/``"auto"`` (the fastest available).

    Returns:
        ``[N, R, n_importance, 1]`` in ``depths.dtype``.
    """
    op = "sample_importance"
    check_tensor(op, "depths", depths, "[N, R, S, 1]", 4)
    check_tensor(op, "weights", weights, "[N, R, S-1, 1]", 4)
    check_dim(op, "depths", depths, 3, 1, "[N, R, S, 1]")
    check_dim(op, "weights", weights, 3, 1, "[N, R, S-1, 1]")
    n, r, s, _ = depths.shape
    if s < 4:
        raise ValueError(f"{op}: depths must have S >= 4 samples per ray (EG3D's PDF uses the S-3 inner "
                         f"weights), got shape {list(depths.shape)}")
    if tuple(weights.shape) != (n, r, s - 1, 1):
        raise ValueError(f"{op}: weights must have shape [N, R, S-1, 1] = [{n}, {r}, {s - 1}, 1] for depths of "
                         f"shape {list(depths.shape)}, got {list(weights.shape)}")
    check_same_dtype(op, [("depths", depths), ("weights", weights)])
    device = check_same_device(op, [("depths", depths), ("weights", weights)])
    n_importance = check_int(op, "n_importance", n_importance, 1)
    check_bool(op, "det", det)
    check_generator(op, generator)
    chosen = resolve_implemented(op, device, backend, PREFERENCES, IMPLEMENTED)
    with nvtx_range("head4d.sample_importance"):
        if chosen == "torch":
            return _reference.sample_importance(depths, weights, n_importance, det, generator)
        return _sample_importance_compiled(depths, weights, n_importance, det, generator)


def _sample_importance_compiled(depths: torch.Tensor, weights: torch.Tensor, n_importance: int, det: bool,
                                generator: Optional[torch.Generator]) -> torch.Tensor:
    """``sample_importance`` on ``head4d._C`` (``cpu`` / ``cuda``), through the custom
    operator ``head4d::sample_importance`` (:mod:`head4d.ops._library`). ``u`` is made here
    exactly as the reference makes it (same shape, dtype, generator and call), so the
    random stream advances identically and the kernel sees the reference's numbers."""
    with torch.no_grad():
        compute = _reference._compute(depths.dtype)
        n, r = depths.shape[:2]
        if det:  # one row shared by all rays
            u = torch.linspace(0, 1, n_importance, dtype=compute, device=depths.device)
        else:
            u = _reference._uniform((n * r, n_importance), generator, depths.device, compute)
        return _library.sample_importance(depths.detach(), weights.detach(), u)


def merge_samples(depths_a: torch.Tensor, colors_a: torch.Tensor, densities_a: torch.Tensor,
                  depths_b: torch.Tensor, colors_b: torch.Tensor, densities_b: torch.Tensor, *,
                  backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge two sample sets of the same rays into one sorted by depth (EG3D's ``unify_samples``).

    The sets are concatenated along the sample axis (``a`` first) and sorted by
    depth with a stable sort (equal depths keep their concatenated order; EG3D's
    ``torch.sort`` does not promise that, which only matters for the colors and
    densities of exactly equal depths); colors and densities move with their depths.

    Args:
        depths_a: ``[N, R, Sa, 1]``; colors_a: ``[N, R, Sa, C]``; densities_a: ``[N, R, Sa, 1]``.
        depths_b: ``[N, R, Sb, 1]``; colors_b: ``[N, R, Sb, C]``; densities_b: ``[N, R, Sb, 1]``.
            All floating point of one dtype, on one device.
        backend: ``None``/``"auto"`` or ``"torch"``.

    Returns:
        ``(depths [N, R, Sa+Sb, 1], colors [N, R, Sa+Sb, C], densities [N, R, Sa+Sb, 1])``,
        differentiable in every input (the order itself carries no gradient).
    """
    op = "merge_samples"
    named = [("depths_a", depths_a), ("colors_a", colors_a), ("densities_a", densities_a),
             ("depths_b", depths_b), ("colors_b", colors_b), ("densities_b", densities_b)]
    for name, t in named:
        spell = "[N, R, S, C]" if name.startswith("colors") else "[N, R, S, 1]"
        check_tensor(op, name, t, spell, 4)
        if not name.startswith("colors"):
            check_dim(op, name, t, 3, 1, spell)
    n, r = depths_a.shape[:2]
    for side, (d, c, s) in (("a", (depths_a, colors_a, densities_a)), ("b", (depths_b, colors_b, densities_b))):
        for name, t in ((f"colors_{side}", c), (f"densities_{side}", s)):
            if tuple(t.shape[:3]) != tuple(d.shape[:3]):
                raise ValueError(f"{op}: {name} has shape {list(t.shape)} but depths_{side} has "
                                 f"{list(d.shape)}; N, R and S must match")
    if tuple(depths_b.shape[:2]) != (n, r):
        raise ValueError(f"{op}: depths_b has shape {list(depths_b.shape)} but depths_a has "
                         f"{list(depths_a.shape)}; N and R must match")
    if colors_b.shape[3] != colors_a.shape[3]:
        raise ValueError(f"{op}: colors_b has {colors_b.shape[3]} channels but colors_a has "
                         f"{colors_a.shape[3]}; they must match")
    check_same_dtype(op, named)
    device = check_same_device(op, named)
    resolve_implemented(op, device, backend, PREFERENCES)
    with nvtx_range("head4d.merge_samples"):
        return _reference.merge_samples(depths_a, colors_a, densities_a, depths_b, colors_b, densities_b)
