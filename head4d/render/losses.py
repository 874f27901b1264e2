"""Losses on the ray marcher's samples: :func:`distortion_loss`, MipNeRF-360's distortion
loss of the compositing weights along each ray (GenHead's training applies it inside the
eye and mouth masks, so that the part triplane's density gathers into one thin layer)."""
from __future__ import annotations

import torch

from .._checks import FLOATING, check_tensor

NAME = "distortion_loss"


def distortion_loss(depths: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MipNeRF-360's distortion loss of each ray, in O(S) per ray.

    A ray's S intervals ``[t_k, t_{k+1}]`` (k = 0..S-1) carry the compositing weights
    ``w_k``; with the midpoints ``m_k = (t_k + t_{k+1}) / 2`` the loss is

        ``L = sum_i sum_j w_i w_j |m_i - m_j|  +  1/3 sum_k w_k^2 (t_{k+1} - t_k)``,

    the first sum over all pairs of intervals (both orders), the second each interval
    with itself. The pair sum is computed without the S x S table: for nondecreasing
    midpoints, ``sum_i sum_j w_i w_j |m_i - m_j| = 2 sum_i w_i (m_i W_i - M_i)`` with the
    exclusive prefix sums ``W_i = sum_{j<i} w_j`` and ``M_i = sum_{j<i} w_j m_j``
    (cumulative sums); the midpoints are first shifted by the ray's first one, which
    leaves ``|m_i - m_j|`` unchanged and keeps the prefix sums small (less cancellation).

    Args:
        depths: ``[..., S + 1]`` floating, the interval edges of each ray, nondecreasing
            along the last dimension (a renderer's sorted sample depths; the O(S) form
            relies on the order and is wrong for unsorted edges).
        weights: ``[..., S]`` floating, same leading shape, dtype and device: each
            interval's weight (the renderer's ``"weights"``, one fewer than the depths).

    Returns:
        ``[...]`` the loss of each ray, in the inputs' dtype; differentiable with respect to
        both inputs.
    """
    for name, value, expected in (("depths", depths, "[..., S + 1]"), ("weights", weights, "[..., S]")):
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            raise TypeError(f"{NAME}: {name} must be a torch.Tensor of shape {expected}, got "
                            f"{type(value).__name__ if not isinstance(value, torch.Tensor) else 'a scalar tensor'}")
        check_tensor(NAME, name, value, expected, value.dim(), FLOATING)
    if weights.dim() != depths.dim() or depths.shape[-1] < 2 \
            or tuple(depths.shape[:-1]) != tuple(weights.shape[:-1]) or depths.shape[-1] != weights.shape[-1] + 1:
        raise ValueError(f"{NAME}: depths must have shape [..., S + 1] and weights [..., S] with the same leading "
                         f"dimensions and S >= 1, got {list(depths.shape)} and {list(weights.shape)}")
    if depths.dtype != weights.dtype:
        raise TypeError(f"{NAME}: depths has dtype {depths.dtype} but weights has {weights.dtype}; they must match")
    if depths.device != weights.device:
        raise ValueError(f"{NAME}: depths is on {depths.device} but weights is on {weights.device}")
    mid = (depths[..., 1:] + depths[..., :-1]) / 2
    mid = mid - mid[..., :1]
    zero = torch.zeros_like(weights[..., :1])
    weight_before = torch.cat([zero, torch.cumsum(weights[..., :-1], dim=-1)], dim=-1)              # W_i
    moment_before = torch.cat([zero, torch.cumsum(weights[..., :-1] * mid[..., :-1], dim=-1)], dim=-1)  # M_i
    between = 2 * (weights * (mid * weight_before - moment_before)).sum(dim=-1)
    within = (weights.square() * (depths[..., 1:] - depths[..., :-1])).sum(dim=-1) / 3
    return between + within
