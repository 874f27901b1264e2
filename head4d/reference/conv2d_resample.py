"""Plain-PyTorch references of StyleGAN2's ``conv2d_resample`` and
``modulated_conv2d``: the definitional compositions that :mod:`head4d.ops.conv2d_resample`
is tested against.

``conv2d_resample(x, w, f, up, down, padding, groups, flip_weight, flip_filter)`` is,
by definition, five steps on full-resolution images (no strided or transposed
convolution anywhere):

1. zero insertion: ``up - 1`` zeros after every sample (nothing when ``up == 1``);
2. pad with zeros by the adjusted padding ``[px0, px1, py0, py1]`` (a negative amount
   crops). The caller's padding is in output pixels of the convolution; StyleGAN2 adds
   ``(fw + up - 1) // 2`` before and ``(fw - up) // 2`` after along x when ``up > 1``,
   ``(fw - down + 1) // 2`` before and ``(fw - down) // 2`` after when ``down > 1``
   (likewise along y with ``fh``), ``fw``/``fh`` the filter's width and height;
3. when ``up > 1``: FIR-filter with ``f`` scaled by ``up ** 2`` (a "valid" filtering:
   no padding of its own);
4. a "valid" ``F.conv2d`` with ``w`` (``groups`` groups): a correlation when
   ``flip_weight`` (torch's convention), a true convolution (``w`` flipped in both
   spatial axes) otherwise;
5. when ``down > 1``: FIR-filter with ``f`` ("valid"), then keep every ``down``-th sample
   starting with the first.

The FIR filtering is the reference ``upfirdn2d`` (a true convolution with ``f`` unless
``flip_filter``; a 1-D ``f`` applied separably; ``None`` is the single tap 1). All steps
are linear and shift-invariant, so their order may be exchanged once the total padding
is fixed: StyleGAN2's faster forms (a strided or transposed convolution, the filter on
either side) give these values exactly, borders included. For its SynthesisLayer case
(3 x 3, ``up=2``, ``padding=1``, the 4-tap filter, ``flip_weight=False``) this is zero
insertion to ``2H``, pad 3 before and 2 after, the 4 x 4 filter times 4, then the
flipped ``w``; which is *not* "``upsample2d`` then a padded conv": that pads the
upsampled image with zeros where these steps keep the filter's tails, so the two agree
in the interior only.

``modulated_conv2d`` is StyleGAN2's per-sample weight modulation and demodulation, run
here one sample at a time through the reference ``conv2d_resample`` (no grouped
convolution, no activation scaling): ``w_n = w * s_n`` over input channels, then
``w_n * rsqrt(sum(w_n ** 2) + 1e-8)`` per output channel when demodulating, then the
convolution, then ``+ noise``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .upfirdn2d import upfirdn2d as _reference_upfirdn2d

#: The epsilon StyleGAN2 adds to the squared weight norm before the reciprocal square root.
DEMODULATION_EPSILON = 1e-8


def filter_size(f: Optional[torch.Tensor]) -> Tuple[int, int]:
    """``(fw, fh)`` of a resampling filter: ``(1, 1)`` for None; a 1-D filter is square."""
    if f is None:
        return 1, 1
    return int(f.shape[-1]), int(f.shape[0])


def adjusted_padding(padding: Tuple[int, int, int, int], f: Optional[torch.Tensor], up: int,
                     down: int) -> Tuple[int, int, int, int]:
    """StyleGAN2's padding of the zero-inserted image: ``padding`` ``(px0, px1, py0, py1)``
    plus the filter's share for the up- and the downsampling (see the module docstring)."""
    fw, fh = filter_size(f)
    px0, px1, py0, py1 = padding
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    return px0, px1, py0, py1


def output_size(size: int, kernel: int, taps: int, up: int, down: int, pad0: int, pad1: int) -> int:
    """Output length along one axis of ``conv2d_resample`` for an input of ``size``, a
    kernel of ``kernel`` taps, a filter of ``taps`` taps and the *adjusted* padding."""
    length = size * up + pad0 + pad1 - (taps - 1 if up > 1 else 0) - (kernel - 1)
    if down > 1:
        length = (length - taps) // down + 1
    return length


def _zero_insert(x: torch.Tensor, up: int) -> torch.Tensor:
    """``[N, C, H * up, W * up]``: each sample followed by ``up - 1`` zeros along both axes."""
    if up == 1:
        return x
    n, c, h, w = x.shape
    spread = F.pad(x.reshape(n, c, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1])  # [N, C, H, up, W, up]
    return spread.reshape(n, c, h * up, w * up)


def _pad_or_crop(x: torch.Tensor, px0: int, px1: int, py0: int, py1: int) -> torch.Tensor:
    """Zero padding by the positive amounts, cropping by the negative ones."""
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    h, w = x.shape[2], x.shape[3]
    return x[:, :, max(-py0, 0):h - max(-py1, 0), max(-px0, 0):w - max(-px1, 0)]


def _fir_valid(x: torch.Tensor, f: Optional[torch.Tensor], flip_filter: bool, gain: float) -> torch.Tensor:
    """The reference ``upfirdn2d`` as a plain filter: no resampling, no padding."""
    if f is None:
        f = torch.ones((1, 1), dtype=torch.float32, device=x.device)
    return _reference_upfirdn2d(x, f, (1, 1), (1, 1), (0, 0, 0, 0), flip_filter, gain)


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: Optional[torch.Tensor], up: int, down: int,
                    padding: Tuple[int, int, int, int], groups: int, flip_weight: bool,
                    flip_filter: bool) -> torch.Tensor:
    """StyleGAN2's ``conv2d_resample`` by its definition (module docstring, steps 1-5).

    Args:
        x: ``[N, C, H, W]`` floating.
        w: ``[O, C / groups, kh, kw]``, x's dtype.
        f: ``[fh, fw]`` or ``[fw]`` (separable) floating, or None (the single tap 1).
        up, down: integer factors >= 1.
        padding: ``(px0, px1, py0, py1)`` as the caller gives it (before the adjustment).
        groups: the convolution's groups.
        flip_weight: correlate with ``w`` (True) or convolve (False).
        flip_filter: correlate with ``f`` instead of convolving.

    Returns:
        ``[N, O, OH, OW]`` (:func:`output_size`) in x's dtype; differentiable to any order.
    """
    px0, px1, py0, py1 = adjusted_padding(padding, f, up, down)
    y = _pad_or_crop(_zero_insert(x, up), px0, px1, py0, py1)
    if up > 1:
        y = _fir_valid(y, f, flip_filter, up * up)
    y = F.conv2d(y, w if flip_weight else w.flip([2, 3]), groups=groups)
    if down > 1:
        y = _fir_valid(y, f, flip_filter, 1.0)[:, :, ::down, ::down]
    return y


def prenormalize_half(weight: torch.Tensor, styles: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """StyleGAN2's guard against float16 overflow, applied when x is float16 and the
    layer demodulates: ``weight`` scaled per output channel by
    ``1 / (sqrt(I * kh * kw) * max|weight[o]|)`` and ``styles`` per sample by
    ``1 / max|styles[n]|``. Demodulation cancels both scales, so only the rounding (and
    the relative weight of the 1e-8 epsilon) changes."""
    _, in_channels, kh, kw = weight.shape
    weight = weight * (1 / math.sqrt(in_channels * kh * kw)
                       / torch.linalg.vector_norm(weight, ord=math.inf, dim=[1, 2, 3], keepdim=True))
    styles = styles / torch.linalg.vector_norm(styles, ord=math.inf, dim=1, keepdim=True)
    return weight, styles


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor,
                     noise: Optional[torch.Tensor] = None, up: int = 1, down: int = 1,
                     padding: Tuple[int, int, int, int] = (0, 0, 0, 0), resample_filter: Optional[torch.Tensor] = None,
                     demodulate: bool = True, flip_weight: bool = True) -> torch.Tensor:
    """StyleGAN2's modulated convolution, one sample at a time.

    Args:
        x: ``[N, I, H, W]`` floating.
        weight: ``[O, I, kh, kw]`` floating (any floating dtype: cast to x's after modulation).
        styles: ``[N, I]`` floating.
        noise: None or a tensor broadcastable to the output ``[N, O, OH, OW]``.
        up, down, padding, resample_filter, flip_weight: as :func:`conv2d_resample`
            (``padding`` a 4-tuple).
        demodulate: scale each output channel of each sample's weight to unit norm.

    Returns:
        ``[N, O, OH, OW]`` in x's dtype.
    """
    if x.dtype == torch.float16 and demodulate:
        weight, styles = prenormalize_half(weight, styles)
    outputs = []
    for n in range(x.shape[0]):
        w = weight * styles[n].reshape(1, -1, 1, 1)
        if demodulate:
            w = w * (w.square().sum(dim=[1, 2, 3], keepdim=True) + DEMODULATION_EPSILON).rsqrt()
        outputs.append(conv2d_resample(x[n:n + 1], w.to(x.dtype), resample_filter, up, down, padding, 1,
                                       flip_weight, False))
    y = torch.cat(outputs, dim=0)
    if noise is not None:
        y = y + noise.to(y.dtype)
    return y
