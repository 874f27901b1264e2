"""Reference depth sampling along rays: EG3D's stratified and importance sampling
and its merge of coarse and fine samples, as plain PyTorch.

Arguments are assumed valid; :mod:`head4d.ops.sampling` checks them.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _uniform(shape, generator: Optional[torch.Generator], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """U[0, 1) numbers from ``generator`` (drawn on the generator's device), or from
    the global generator of ``device`` when ``generator`` is None."""
    if generator is None:
        return torch.rand(shape, device=device, dtype=dtype)
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def stratified_depths(ray_start: Union[float, torch.Tensor], ray_end: Union[float, torch.Tensor],
                      n_samples: int, n_rays: int, disparity: bool = False, jitter: str = "per_sample",
                      generator: Optional[torch.Generator] = None, batch_size: int = 1,
                      device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Coarse depths: evenly spaced from start to end, each moved forward by a random
    fraction of the spacing (EG3D's ``sample_stratified``), rounded as EG3D rounds them.

    With S = n_samples, k = 0..S-1, U the jitter in [0, 1) and
    ``delta = (end - start) / (S - 1)``, in the order of EG3D's operations:

    * number limits (EG3D's fixed range): ``torch.linspace(start, end, S)[k] + U * delta``,
      with ``delta`` computed from the numbers in double precision (torch rounds it to
      the compute dtype in the product);
    * tensor limits (one range per ray, or per image as Portrait4D's 'auto-plane'):
      ``start + (arange(S) / (S - 1))[k] * (end - start) + U * delta``, EG3D's own
      ``linspace`` of tensors (its steps are float32 arange / (S - 1); float64 limits
      use float64 steps), ``delta`` as a tensor op;
    * disparity space (either kind of limit): ``t = linspace(0, 1, S)[k] + U / (S - 1)``, then
      ``depth = 1 / (1/start * (1 - t) + 1/end * t)``.

    For float32 this reproduces EG3D's samples bit for bit given the same U; the
    half-precision dtypes are computed in float32 and rounded at the end.

    ``jitter``: ``"per_sample"`` draws U for every sample of every ray (EG3D, one
    ``torch.rand`` of shape ``[N, R, S, 1]``); ``"per_image"`` draws one vector of S
    values per image, shared by all its rays (Portrait4D's 'auto-plane', a
    ``torch.rand`` of shape ``[N, 1, S, 1]``); ``"none"`` uses U = 0 and draws nothing.

    Args:
        ray_start, ray_end: two real numbers, or two ``[N, R, 1]`` / ``[N, 1, 1]``
            tensors of one dtype and device.
        n_samples: S >= 2.
        n_rays: R.
        batch_size, device, dtype: N, device and dtype of the output for number limits
            (ignored for tensor limits, which give them).

    Returns:
        ``[N, R, S, 1]`` in the dtype of the limits (``dtype`` for numbers).
    """
    numbers = not isinstance(ray_start, torch.Tensor)
    if numbers:
        device = torch.device("cpu") if device is None else device
        n = batch_size
    else:
        dtype, device, n = ray_start.dtype, ray_start.device, ray_start.shape[0]
    compute = _compute(dtype)
    s = n_samples

    if jitter == "per_sample":
        u = _uniform((n, n_rays, s, 1), generator, device, compute)
    elif jitter == "per_image":
        u = _uniform((n, 1, s, 1), generator, device, compute)
    else:
        u = None

    if numbers:
        start, end = float(ray_start), float(ray_end)
    else:
        start, end = torch.broadcast_tensors(ray_start.to(compute), ray_end.to(compute))
        start = start.unsqueeze(-2)  # [N, R or 1, 1, 1]
        end = end.unsqueeze(-2)

    if disparity:
        t = torch.linspace(0, 1, s, dtype=compute, device=device).reshape(1, 1, s, 1)
        if u is not None:
            t = t + u * (1 / (s - 1))
        depths = 1.0 / (1.0 / start * (1.0 - t) + 1.0 / end * t)
    elif numbers:
        depths = torch.linspace(start, end, s, dtype=compute, device=device).reshape(1, 1, s, 1)
        if u is not None:
            depths = depths + u * ((end - start) / (s - 1))
    else:
        steps = (torch.arange(s, dtype=compute, device=device) / (s - 1)).reshape(1, 1, s, 1)
        depths = start + steps * (end - start)
        if u is not None:
            depths = depths + u * ((end - start) / (s - 1))
    return depths.expand(n, n_rays, s, 1).contiguous().to(dtype)


def smooth_weights(weights: torch.Tensor) -> torch.Tensor:
    """EG3D's smoothing of the coarse weights before importance sampling.

    ``[B, S-1]`` -> max-pool (kernel 2, stride 1, padding 1, i.e. the max of each
    pair of neighbours with the ends kept) giving S values -> average-pool (kernel 2,
    stride 1) giving S-1 values -> + 0.01.
    """
    pooled = F.max_pool1d(weights.unsqueeze(1), 2, 1, padding=1)
    return F.avg_pool1d(pooled, 2, 1).squeeze(1) + 0.01


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, u: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Inverse-CDF sampling of a piecewise-linear CDF (EG3D's ``sample_pdf``).

    Args:
        bins: ``[B, L]`` with L >= K+1; only the first K+1 entries can be reached
            (EG3D passes the S-1 midpoints with K = S-3, so the last one is never used).
        weights: ``[B, K]``.
        u: ``[B, n]`` in [0, 1].

    ``pdf = (weights + eps) / sum``, ``cdf = [0, cumsum(pdf)]`` (K+1 values);
    ``idx = searchsorted(cdf, u, right=True)``, ``below = max(idx - 1, 0)``,
    ``above = min(idx, K)``; a CDF step under ``eps`` is replaced by 1; the sample
    is ``bins[below] + (u - cdf[below]) / step * (bins[above] - bins[below])``.
    """
    k = weights.shape[-1]
    w = weights + eps
    pdf = w / w.sum(dim=-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, dim=-1)], dim=-1)
    idx = torch.searchsorted(cdf, u.contiguous(), right=True)
    below = (idx - 1).clamp(min=0)
    above = idx.clamp(max=k)
    cdf_below, cdf_above = cdf.gather(1, below), cdf.gather(1, above)
    bins_below, bins_above = bins.gather(1, below), bins.gather(1, above)
    step = cdf_above - cdf_below
    step = torch.where(step < eps, torch.ones_like(step), step)
    return bins_below + (u - cdf_below) / step * (bins_above - bins_below)


def sample_importance(depths: torch.Tensor, weights: torch.Tensor, n_importance: int, det: bool = False,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fine depths drawn from the coarse pass' weights (EG3D's ``sample_importance``).

    Per ray, with S coarse depths and S-1 weights: the weights are smoothed
    (:func:`smooth_weights`, S-1 values), the bins are the S-1 midpoints of
    consecutive coarse depths, and :func:`sample_pdf` runs on the inner smoothed
    weights ``smoothed[1:-1]`` (S-3 values, so K = S-3: only the first S-2 bins are
    reachable). ``u = linspace(0, 1, n_importance)`` when ``det``, else one
    ``torch.rand`` of shape ``[N*R, n_importance]``.

    Args:
        depths: ``[N, R, S, 1]``, S >= 4.
        weights: ``[N, R, S-1, 1]``.

    Returns:
        ``[N, R, n_importance, 1]`` in ``depths.dtype``, without gradient.
    """
    with torch.no_grad():
        dtype = depths.dtype
        compute = _compute(dtype)
        n, r, s, _ = depths.shape
        z = depths.detach().reshape(n * r, s).to(compute)
        w = weights.detach().reshape(n * r, s - 1).to(compute)
        smoothed = smooth_weights(w)
        bins = 0.5 * (z[:, :-1] + z[:, 1:])
        if det:
            u = torch.linspace(0, 1, n_importance, dtype=compute, device=depths.device).expand(n * r, n_importance)
        else:
            u = _uniform((n * r, n_importance), generator, depths.device, compute)
        samples = sample_pdf(bins, smoothed[:, 1:-1], u)
        return samples.reshape(n, r, n_importance, 1).to(dtype)


def merge_samples(depths_a: torch.Tensor, colors_a: torch.Tensor, densities_a: torch.Tensor,
                  depths_b: torch.Tensor, colors_b: torch.Tensor, densities_b: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate two sample sets along the sample axis (a first) and sort by depth.

    The sort is stable (equal depths keep a-before-b and their order within each
    set); colors and densities follow their depths. Differentiable in all six inputs.

    Returns ``(depths [N, R, Sa+Sb, 1], colors [N, R, Sa+Sb, C], densities [N, R, Sa+Sb, 1])``.
    """
    depths = torch.cat([depths_a, depths_b], dim=-2)
    colors = torch.cat([colors_a, colors_b], dim=-2)
    densities = torch.cat([densities_a, densities_b], dim=-2)
    order = torch.sort(depths.detach(), dim=-2, stable=True).indices
    # Move each sample to its rank with a scatter rather than gathering by `order`: the
    # same values, but autograd keeps only the (int64, one per sample) index, where a
    # gather would keep the whole concatenated tensor (N*R*S*C colors) for its backward.
    rank = torch.empty_like(order).scatter_(-2, order, torch.arange(order.shape[-2], device=order.device)
                                            .view(1, 1, -1, 1).expand_as(order))

    def permute(t: torch.Tensor) -> torch.Tensor:
        index = rank.expand(-1, -1, -1, t.shape[-1])
        return torch.zeros((), dtype=t.dtype, device=t.device).expand_as(t).scatter(-2, index, t)

    return permute(depths), permute(colors), permute(densities)
