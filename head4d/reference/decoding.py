"""Reference fused triplane decoding: ``sample_triplanes(reduce="mean")`` followed by
EG3D's / Portrait4D's ``OSGDecoder`` MLP, as plain PyTorch (the unfused composition).

Arguments are assumed valid; :mod:`head4d.ops.decoding` checks them.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .triplanes import sample_triplanes

#: rgb = sigmoid(x) * RGB_SCALE - RGB_SHIFT (EG3D's clamp of the decoder's features).
RGB_SCALE = 1 + 2 * 0.001
RGB_SHIFT = 0.001


def decode_mlp(features: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor, weight2: torch.Tensor,
               bias2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The decoder MLP on features ``[..., C]`` with effective weights, in the features'
    dtype: ``(rgb [..., Co], sigma [..., 1])``."""
    dtype = features.dtype
    h = F.softplus(F.linear(features, weight1.to(dtype), bias1.to(dtype)))
    o = F.linear(h, weight2.to(dtype), bias2.to(dtype))
    sigma, logits = o[..., :1], o[..., 1:]
    rgb = torch.sigmoid(logits) * RGB_SCALE - RGB_SHIFT
    return rgb, sigma


def decode_triplanes(planes: torch.Tensor, points: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor,
                     weight2: torch.Tensor, bias2: torch.Tensor, box_warp: float = 1.0,
                     plane_layout: str = "portrait4d") -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample the planes at the points (mean over the three planes) and decode.

    ``f = sample_triplanes(planes, points, box_warp, plane_layout, "mean")``;
    ``h = softplus(f @ weight1.T + bias1)`` (torch's Softplus: beta 1, threshold 20);
    ``o = h @ weight2.T + bias2``; ``sigma = o[..., :1]`` (raw);
    ``rgb = sigmoid(o[..., 1:]) * (1 + 2 * 0.001) - 0.001``.

    Everything is computed in float32 (float64 for float64 planes), the weights
    converted to it; the outputs are rounded once to ``planes.dtype``.

    Returns:
        ``(rgb [N, M, Co], sigma [N, M, 1])`` in ``planes.dtype``.
    """
    compute = torch.float64 if planes.dtype == torch.float64 else torch.float32
    features = sample_triplanes(planes.to(compute), points, box_warp, plane_layout, "mean")
    rgb, sigma = decode_mlp(features, weight1, bias1, weight2, bias2)
    return rgb.to(planes.dtype), sigma.to(planes.dtype)
