"""Plain-PyTorch reference of StyleGAN2's FIR resampling (``upfirdn2d``), the
``torch`` backend of :mod:`head4d.ops.upfirdn2d`.

``upfirdn2d`` runs four steps on every channel of ``x [N, C, H, W]`` independently:

1. upsample: insert ``up - 1`` zeros after each sample (along x by ``upx``, along y by ``upy``);
2. pad with zeros by ``[padx0, padx1, pady0, pady1]``; a negative amount crops instead;
3. convolve with the filter ``f`` (a true convolution, i.e. ``f`` flipped; a correlation
   when ``flip_filter``), the filter scaled by ``gain ** (f.ndim / 2)``; a 1-D ``f`` is
   applied separably, first along x, then along y;
4. downsample: keep every ``down``-th sample, starting with the first.

The output has ``(H * upy + pady0 + pady1 - fh) // downy + 1`` rows (``fh`` the filter's
height, its length for a 1-D filter) and likewise for columns.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def output_size(size: int, up: int, down: int, pad0: int, pad1: int, taps: int) -> int:
    """Output length along one axis of ``upfirdn2d`` (may be < 1 for inputs too small)."""
    return (size * up + pad0 + pad1 - taps) // down + 1


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: Tuple[int, int], down: Tuple[int, int],
              padding: Tuple[int, int, int, int], flip_filter: bool, gain: float) -> torch.Tensor:
    """FIR resampling by composing pad, reshape and grouped ``conv2d``.

    Args:
        x: ``[N, C, H, W]`` floating.
        f: ``[fh, fw]`` (2-D) or ``[fw]`` (1-D, separable) floating; cast to ``x.dtype``.
        up, down: ``(x, y)`` integer factors >= 1.
        padding: ``(padx0, padx1, pady0, pady1)``, negative values crop.
        flip_filter: correlate with ``f`` instead of convolving.
        gain: the filter is multiplied by ``gain ** (f.ndim / 2)``.

    Returns:
        ``[N, C, OH, OW]`` in ``x.dtype``; differentiable w.r.t. ``x`` and ``f``.
    """
    n, c, h, w = x.shape
    upx, upy = up
    downx, downy = down
    padx0, padx1, pady0, pady1 = padding
    # 1. zero insertion: each sample followed by up - 1 zeros
    x = x.reshape(n, c, h, 1, w, 1)
    x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
    x = x.reshape(n, c, h * upy, w * upx)
    # 2. pad with the positive amounts, crop the negative ones
    x = F.pad(x, [max(padx0, 0), max(padx1, 0), max(pady0, 0), max(pady1, 0)])
    x = x[:, :, max(-pady0, 0):x.shape[2] - max(-pady1, 0), max(-padx0, 0):x.shape[3] - max(-padx1, 0)]
    # 3. convolution (conv2d correlates, so the filter is flipped unless flip_filter)
    f = (f * (gain ** (f.ndim / 2))).to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 2:
        x = F.conv2d(x, f[None, None].expand(c, 1, *f.shape), groups=c)
    else:
        x = F.conv2d(x, f.reshape(1, 1, 1, -1).expand(c, 1, 1, f.shape[0]), groups=c)
        x = F.conv2d(x, f.reshape(1, 1, -1, 1).expand(c, 1, f.shape[0], 1), groups=c)
    # 4. decimation
    return x[:, :, ::downy, ::downx]
