"""Reference volume compositing: EG3D's ``MipRayMarcher2`` (with Portrait4D's
background compositing) as plain PyTorch.

Arguments are assumed valid; :mod:`head4d.ops.compositing` checks them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _AlphaOfOpticalDepth(torch.autograd.Function):
    """``alpha = 1 - exp(-x)`` computed as ``-expm1(-x)``, with ``dalpha/dx = exp(-x)``.

    The same function as EG3D's ``1 - exp(-x)``, evaluated without its cancellation:
    for x near 1e-14 the difference keeps only the last bits of exp's rounding, so
    one ulp of difference between two exp implementations moves alpha by percents.
    The derivative is exp(-x) itself (autograd's expm1 rule would form it as
    ``1 + expm1(-x)``, which cancels for large x).
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return -torch.expm1(-x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(-x)


def composite_rays(colors: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor,
                   white_back: bool = False, background: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """March S samples per ray (sorted by depth) into one value per ray.

    With colors c, raw densities s and depths t (k = 0..S-2 over the S-1 intervals):

    * midpoints ``c_k = (c[k] + c[k+1]) / 2``, ``s_k``, ``t_k`` likewise; ``delta_k = t[k+1] - t[k]``;
    * ``sigma_k = softplus(s_k - 1)``, ``alpha_k = 1 - exp(-sigma_k * delta_k)``
      (EG3D's expression, evaluated accurately as ``-expm1(-sigma_k * delta_k)``: the
      same function, without the cancellation of ``1 - exp`` for small arguments);
    * ``w_k = alpha_k * prod_{j<k} (1 - alpha_j + 1e-10)``;
    * ``rgb = sum_k w_k c_k``; ``depth = sum_k w_k t_k / sum_k w_k`` with NaN (zero
      total weight) replaced by +inf and then clamped to ``[min, max]`` of all of
      ``depths`` (the whole tensor, every ray of every image);
    * ``rgb += (1 - sum_k w_k) * background`` (``white_back`` is ``background = 1``);
    * ``rgb = rgb * 2 - 1``.

    Args:
        colors: ``[N, R, S, C]``; densities, depths: ``[N, R, S, 1]``.
        white_back: add ``1 - sum(w)`` to every channel.
        background: ``[N, R, C]`` or None.

    Returns:
        ``(rgb [N, R, C], depth [N, R, 1], weights [N, R, S-1, 1])`` in the inputs'
        dtype (computed in float32, or float64 for float64 inputs). Differentiable in
        colors, densities, depths and background.
    """
    dtype = colors.dtype
    compute = _compute(dtype)
    c, s, t = colors.to(compute), densities.to(compute), depths.to(compute)

    deltas = t[:, :, 1:] - t[:, :, :-1]
    c_mid = (c[:, :, :-1] + c[:, :, 1:]) / 2
    s_mid = (s[:, :, :-1] + s[:, :, 1:]) / 2
    t_mid = (t[:, :, :-1] + t[:, :, 1:]) / 2

    sigma = F.softplus(s_mid - 1)
    alpha = _AlphaOfOpticalDepth.apply(sigma * deltas)
    transmittance = torch.cumprod(
        torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], dim=-2), dim=-2)[:, :, :-1]
    weights = alpha * transmittance

    rgb = (weights * c_mid).sum(dim=-2)
    total = weights.sum(dim=-2)
    depth = (weights * t_mid).sum(dim=-2) / total
    depth = torch.nan_to_num(depth, nan=float("inf"))
    depth = torch.clamp(depth, t.min(), t.max())

    if white_back:
        rgb = rgb + 1 - total
    elif background is not None:
        rgb = rgb + (1 - total) * background.to(compute)
    rgb = rgb * 2 - 1
    return rgb.to(dtype), depth.to(dtype), weights.to(dtype)
