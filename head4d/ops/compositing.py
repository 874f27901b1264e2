"""``composite_rays``: volume rendering of samples along rays (EG3D's ``MipRayMarcher2``).

Where things live:
    reference   head4d/reference/compositing.py   (the ``torch`` backend)
    C++ / CUDA  csrc/compositing/                 (``cpu`` and ``cuda`` backends)
    tests       tests/test_rendering.py, tests/test_compositing_kernels.py
    benchmark   head4d/bench.py (``composite_rays`` cases)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _backend
from .._checks import check_bool, check_dim, check_same_device, check_tensor
from .._nvtx import nvtx_range
from ..reference import compositing as _reference
from . import _library
from ._common import check_same_dtype, resolve_implemented

#: Backend preference per device type, fastest first.
PREFERENCES = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "torch"),
}

#: The backends this op has; each runs every input the op accepts (no support predicate).
IMPLEMENTED = ("cpu", "cuda", "torch")

OP = "composite_rays"
_backend.declare(OP, IMPLEMENTED, PREFERENCES)


def check_composite_inputs(colors, densities, depths, white_back, background) -> torch.device:
    """Validates the arguments of :func:`composite_rays`; returns their device."""
    check_tensor(OP, "colors", colors, "[N, R, S, C]", 4)
    check_tensor(OP, "densities", densities, "[N, R, S, 1]", 4)
    check_tensor(OP, "depths", depths, "[N, R, S, 1]", 4)
    check_dim(OP, "densities", densities, 3, 1, "[N, R, S, 1]")
    check_dim(OP, "depths", depths, 3, 1, "[N, R, S, 1]")
    n, r, s, c = colors.shape
    for name, t in (("densities", densities), ("depths", depths)):
        if tuple(t.shape[:3]) != (n, r, s):
            raise ValueError(f"{OP}: {name} has shape {list(t.shape)} but colors has {list(colors.shape)}; "
                             f"N, R and S must match (expected [{n}, {r}, {s}, 1])")
    if s < 2:
        raise ValueError(f"{OP}: compositing needs S >= 2 samples per ray, got shape {list(colors.shape)}")
    named = [("colors", colors), ("densities", densities), ("depths", depths)]
    check_bool(OP, "white_back", white_back)
    if background is not None:
        if white_back:
            raise ValueError(f"{OP}: give white_back=True or a background, not both "
                             f"(white_back is background = 1)")
        check_tensor(OP, "background", background, "[N, R, C]", 3)
        if tuple(background.shape) != (n, r, c):
            raise ValueError(f"{OP}: background must have shape [N, R, C] = [{n}, {r}, {c}], "
                             f"got {list(background.shape)}")
        named.append(("background", background))
    check_same_dtype(OP, named)
    return check_same_device(OP, named)


def composite_rays(colors: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor, *,
                   white_back: bool = False, background: Optional[torch.Tensor] = None,
                   backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Composite S samples per ray, sorted by depth, exactly like EG3D's ``MipRayMarcher2``.

    Over the S-1 intervals between consecutive samples (k = 0..S-2):

    * midpoints of colors ``c_k``, raw densities ``s_k`` and depths ``t_k``;
      ``delta_k = t[k+1] - t[k]``;
    * ``sigma_k = softplus(s_k - 1)`` (the shift is part of EG3D's semantics);
    * ``alpha_k = 1 - exp(-sigma_k * delta_k)``, computed as ``-expm1(-sigma_k * delta_k)``
      on every backend (the same function without the cancellation for small products);
    * ``w_k = alpha_k * prod_{j<k} (1 - alpha_j + 1e-10)``;
    * ``rgb = sum_k w_k * c_k``;
    * ``depth = sum_k w_k * t_k / sum_k w_k``; a NaN (zero total weight) becomes
      +inf, then the depth is clamped to ``[min(depths), max(depths)]`` taken over
      the whole ``depths`` tensor (all rays of all images, as EG3D does);
    * background: ``rgb += (1 - sum_k w_k) * background`` (Portrait4D composites
      its background image with ``T_bg = 1 - sum w``); ``white_back=True`` is
      ``background = 1`` (EG3D's ``white_back``);
    * finally ``rgb = rgb * 2 - 1``, on every channel.

    Args:
        colors: ``[N, R, S, C]`` float16, bfloat16, float32 or float64 (decoder features).
        densities: ``[N, R, S, 1]`` raw densities (before the softplus), same dtype.
        depths: ``[N, R, S, 1]`` sample depths, sorted along S, same dtype.
        white_back: EG3D's white background.
        background: ``[N, R, C]`` per-ray background features, same dtype, or None;
            giving it together with ``white_back=True`` is an error.
        backend: ``"cuda"`` (CUDA tensors), ``"cpu"`` (CPU tensors), ``"torch"`` (the
            reference) or ``None``/``"auto"`` (the fastest available).

    Returns:
        ``(rgb [N, R, C], depth [N, R, 1], weights [N, R, S-1, 1])`` in the inputs'
        dtype (computed in float32, float64 for float64). ``weights.sum(2)`` is the
        opacity. Differentiable with respect to colors, densities, depths and background.

    Non-finite input, the same on every backend: NaN and infinities propagate through
    the formulas above; in particular a NaN anywhere in ``depths`` makes the clamp
    bounds NaN and so every ray's depth NaN (as EG3D's clamp to the tensor's min / max).
    """
    device = check_composite_inputs(colors, densities, depths, white_back, background)
    chosen = resolve_implemented(OP, device, backend, PREFERENCES, IMPLEMENTED)
    with nvtx_range("head4d.composite_rays"):
        if chosen == "torch":
            return _reference.composite_rays(colors, densities, depths, white_back, background)
        # head4d::composite_rays (head4d._C, CPU and CUDA; :mod:`head4d.ops._library`) also
        # returns the per-ray values its backward needs
        rgb, depth, weights, _ = _library.composite_rays(colors, densities, depths, background, white_back)
        return rgb, depth, weights
