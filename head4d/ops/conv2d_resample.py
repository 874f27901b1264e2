"""StyleGAN2's convolution with FIR resampling, ``conv2d_resample``, and its modulated
convolution, ``modulated_conv2d``: the signatures and results of StyleGAN2's
``torch_utils.ops.conv2d_resample.conv2d_resample`` and
``training.networks_stylegan2.modulated_conv2d`` (code written against them moves over
by changing the import; ``backend=`` is new).

Both are compositions, no kernels of their own: torch's convolutions (cuDNN on a GPU)
and :func:`head4d.ops.upfirdn2d`, whose backend ``backend`` picks (passed through; the
convolutions are torch's on every backend). They pick StyleGAN2's form for each case,
the one with the fewest multiply-adds, and every form gives the values of the
definition in :mod:`head4d.reference.conv2d_resample`, borders included:

=====================  ==============================================================
case                   form
=====================  ==============================================================
1 x 1, down only       ``upfirdn2d`` (filter, decimate) then the 1 x 1 conv
1 x 1, up only         the 1 x 1 conv then ``upfirdn2d`` (zero insertion, filter)
down only              ``upfirdn2d`` (padding, filter) then ``F.conv2d`` with stride ``down``
up (and maybe down)    ``F.conv_transpose2d`` with stride ``up``, then ``upfirdn2d`` (the
                       rest of the padding, the filter times ``up ** 2``), then
                       ``upfirdn2d`` decimating when ``down > 1``
neither, symmetric     ``F.conv2d`` with the padding
neither, otherwise     pad and crop, then ``F.conv2d``
=====================  ==============================================================

Where things live:
    reference   head4d/reference/conv2d_resample.py   (the definitional compositions)
    tests       tests/test_conv2d_resample.py
    benchmark   head4d/bench/op_cases/conv2d_resample.py
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _backend
from .._checks import check_bool, check_int, check_same_device, check_tensor
from .._nvtx import nvtx_range
from ..reference import conv2d_resample as _reference
from .upfirdn2d import PREFERENCES as _UPFIRDN2D_PREFERENCES
from .upfirdn2d import IntQuad, _check_filter, _parse_padding, upfirdn2d


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _check_backend(op: str, device: torch.device, backend: Optional[str]) -> None:
    """Raises now, naming ``op``, when upfirdn2d's ``backend`` cannot run on ``device``
    (also for the cases that never call upfirdn2d, so a bad name never passes silently)."""
    if backend is None or backend == "auto":
        return
    try:
        _backend.resolve("upfirdn2d", device, backend, _UPFIRDN2D_PREFERENCES)
    except (RuntimeError, ValueError) as error:
        raise type(error)(f"{op}: backend {backend!r} is upfirdn2d's and cannot run here: {error}") from None


def _check_resampling(op: str, x: torch.Tensor, w: torch.Tensor, f, up, down, padding: IntQuad, groups,
                      flip_weight, flip_filter) -> Tuple[int, int, Tuple[int, int, int, int], int]:
    """The checks shared by both ops; returns ``(up, down, padding as a 4-tuple, groups)``."""
    if f is not None:
        _check_filter(op, f)
    up = check_int(op, "up", up, 1)
    down = check_int(op, "down", down, 1)
    padding = _parse_padding(op, padding)
    groups = check_int(op, "groups", groups, 1)
    check_bool(op, "flip_weight", flip_weight)
    check_bool(op, "flip_filter", flip_filter)
    out_channels, in_per_group, kh, kw = w.shape
    if x.shape[1] != in_per_group * groups:
        raise ValueError(f"{op}: x has {x.shape[1]} channels (shape {list(x.shape)}) but the weight of shape "
                         f"{list(w.shape)} with groups={groups} expects w.shape[1] * groups = {in_per_group * groups}")
    if out_channels % groups:
        raise ValueError(f"{op}: the weight's output channels w.shape[0] = {out_channels} must be divisible by "
                         f"groups={groups}")
    fw, fh = _reference.filter_size(f)
    px0, px1, py0, py1 = _reference.adjusted_padding(padding, f, up, down)
    out_h = _reference.output_size(x.shape[2], kh, fh, up, down, py0, py1)
    out_w = _reference.output_size(x.shape[3], kw, fw, up, down, px0, px1)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{op}: x of shape {list(x.shape)} is too small for a {kh} x {kw} kernel with up={up}, "
                         f"down={down}, padding {list(padding)} and a {fh} x {fw} filter: the output would be "
                         f"{out_h} x {out_w}")
    return up, down, padding, groups


def _conv(x: torch.Tensor, w: torch.Tensor, stride: int = 1, padding: Tuple[int, int] = (0, 0), groups: int = 1,
          transpose: bool = False, flip_weight: bool = True) -> torch.Tensor:
    """``F.conv2d`` (or ``F.conv_transpose2d``) with ``w`` flipped spatially unless
    ``flip_weight`` (torch's conv2d correlates; StyleGAN2's flip_weight=True keeps that)."""
    if not flip_weight and (w.shape[2] > 1 or w.shape[3] > 1):
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def _transposed_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """``[O, I / g, kh, kw]`` in ``F.conv_transpose2d``'s layout ``[I, O / g, kh, kw]``,
    the input and output channels exchanged within each group."""
    out_channels, in_per_group, kh, kw = w.shape
    if groups == 1:
        return w.transpose(0, 1)
    w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
    return w.reshape(groups * in_per_group, out_channels // groups, kh, kw)


def _resample_conv(x: torch.Tensor, w: torch.Tensor, f: Optional[torch.Tensor], up: int, down: int,
                   padding: Tuple[int, int, int, int], groups: int, flip_weight: bool, flip_filter: bool,
                   backend: Optional[str]) -> torch.Tensor:
    """The fastest of StyleGAN2's forms for the case (module docstring); arguments checked."""
    kh, kw = w.shape[2], w.shape[3]
    px0, px1, py0, py1 = _reference.adjusted_padding(padding, f, up, down)
    pad = [px0, px1, py0, py1]
    if kw == 1 and kh == 1 and down > 1 and up == 1:  # fewer pixels through the 1 x 1 conv
        x = upfirdn2d(x, f, down=down, padding=pad, flip_filter=flip_filter, backend=backend)
        return _conv(x, w, groups=groups, flip_weight=flip_weight)
    if kw == 1 and kh == 1 and up > 1 and down == 1:  # fewer pixels through the 1 x 1 conv
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return upfirdn2d(x, f, up=up, padding=pad, gain=up * up, flip_filter=flip_filter, backend=backend)
    if down > 1 and up == 1:  # filter at full resolution, then only every down-th conv output
        x = upfirdn2d(x, f, padding=pad, flip_filter=flip_filter, backend=backend)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)
    if up > 1:
        # The transposed conv is the zero insertion (without the last up - 1 zeros) padded
        # by k - 1 on both sides and convolved with w (a true convolution: hence the flip
        # when flip_weight asks for a correlation). The padding it already has is taken
        # off; the part both sides would crop is cropped by the conv itself.
        px0, px1 = px0 - (kw - 1), px1 - (kw - up)
        py0, py1 = py0 - (kh - 1), py1 - (kh - up)
        pxt = max(min(-px0, -px1), 0)
        pyt = max(min(-py0, -py1), 0)
        x = _conv(x, _transposed_weight(w, groups), stride=up, padding=(pyt, pxt), groups=groups, transpose=True,
                  flip_weight=not flip_weight)
        x = upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up * up,
                      flip_filter=flip_filter, backend=backend)
        if down > 1:
            x = upfirdn2d(x, f, down=down, flip_filter=flip_filter, backend=backend)
        return x
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:  # torch's conv pads symmetrically
        return _conv(x, w, padding=(py0, px0), groups=groups, flip_weight=flip_weight)
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0):x.shape[2] - max(-py1, 0), max(-px0, 0):x.shape[3] - max(-px1, 0)]
    return _conv(x, w, groups=groups, flip_weight=flip_weight)


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: Optional[torch.Tensor] = None, up: int = 1,
                    down: int = 1, padding: IntQuad = 0, groups: int = 1, flip_weight: bool = True,
                    flip_filter: bool = False, *, backend: Optional[str] = None) -> torch.Tensor:
    """2-D convolution with optional FIR up- and downsampling, StyleGAN2's ``conv2d_resample``.

    The value is, by definition (:mod:`head4d.reference.conv2d_resample`): insert
    ``up - 1`` zeros after each sample, pad by ``padding`` plus the filter's share
    (``(fw + up - 1) // 2`` before and ``(fw - up) // 2`` after when upsampling,
    ``(fw - down + 1) // 2`` and ``(fw - down) // 2`` when downsampling; negative crops),
    filter with ``f * up ** 2`` when upsampling, convolve with ``w`` ("valid"), filter
    with ``f`` and keep every ``down``-th sample when downsampling.

    Args:
        x: ``[N, C, H, W]`` float16 / bfloat16 / float32 / float64.
        w: ``[O, C / groups, kh, kw]``, x's dtype and device.
        f: the resampling filter from :func:`head4d.ops.setup_filter`, ``[fh, fw]`` or
            ``[fw]`` (separable) floating, or None (the single tap 1); read only when
            ``up > 1`` or ``down > 1``.
        up, down: integer factors >= 1.
        padding: an int, ``[x, y]`` or ``[x0, x1, y0, y1]``, in output pixels of the
            convolution; negative crops.
        groups: the convolution's groups (x's channels = ``w.shape[1] * groups``).
        flip_weight: True: correlate with ``w`` (``F.conv2d``'s convention); False: a
            true convolution. StyleGAN2 passes ``flip_weight = (up == 1)``.
        flip_filter: correlate with ``f`` instead of convolving.
        backend: the backend of the ``upfirdn2d`` calls (``"cpu"``, ``"cuda"``, ``"torch"``,
            ``None``/``"auto"``); the convolutions are torch's.

    Returns:
        ``[N, O, OH, OW]`` in x's dtype, ``OH = (H * up + py0 + py1 - (fh - 1 if up > 1
        else 0) - (kh - 1) - fh) // down + 1`` when ``down > 1`` (without the last two
        terms otherwise), ``py0, py1`` the adjusted padding; likewise ``OW``.
        Differentiable w.r.t. x and w to any order (R1), w.r.t. f on ``backend="torch"``.
    """
    op = "conv2d_resample"
    check_tensor(op, "x", x, "[N, C, H, W]", 4)
    check_tensor(op, "w", w, "[O, C / groups, kh, kw]", 4)
    if w.dtype != x.dtype:
        raise TypeError(f"{op}: w must have x's dtype {_dtype_name(x)}, got {_dtype_name(w)}")
    tensors = [("x", x), ("w", w)] + ([("f", f)] if isinstance(f, torch.Tensor) else [])
    device = check_same_device(op, tensors)
    up, down, padding, groups = _check_resampling(op, x, w, f, up, down, padding, groups, flip_weight, flip_filter)
    _check_backend(op, device, backend)
    with nvtx_range("head4d.conv2d_resample"):
        return _resample_conv(x, w, f, up, down, padding, groups, flip_weight, flip_filter, backend)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor,
                     noise: Optional[torch.Tensor] = None, up: int = 1, down: int = 1, padding: IntQuad = 0,
                     resample_filter: Optional[torch.Tensor] = None, demodulate: bool = True,
                     flip_weight: bool = True, fused_modconv: bool = True, *,
                     backend: Optional[str] = None) -> torch.Tensor:
    """StyleGAN2's modulated (and demodulated) convolution with optional resampling.

    Per sample n: ``w_n = weight * styles[n]`` (scaling input channel i by
    ``styles[n, i]``); with ``demodulate``, each output channel o of ``w_n`` is divided by
    ``sqrt(sum_{i, ky, kx} w_n[o] ** 2 + 1e-8)``; the output is
    ``conv2d_resample(x[n], w_n, resample_filter, up, down, padding, flip_weight)``, plus
    ``noise`` (added after the demodulation).

    Two equal forms, as in StyleGAN2:

    * ``fused_modconv=True``: one grouped convolution with the batch folded into the
      groups (x as ``[1, N * I, H, W]``, the per-sample weights as ``[N * O, I, kh, kw]``),
      then ``+ noise``. StyleGAN2 uses it for inference.
    * ``fused_modconv=False``: the shared weight, the styles applied to the activations
      before the convolution and the demodulation coefficients after it (with the
      noise, ``x * d + noise`` in one ``addcmul``). StyleGAN2 trains with it: its
      weight gradient is one ordinary convolution gradient.

    When x is float16 and ``demodulate``, StyleGAN2 first rescales ``weight`` per output
    channel by ``1 / (sqrt(I * kh * kw) * max|weight[o]|)`` and ``styles`` per sample by
    ``1 / max|styles[n]|`` so that the float16 products do not overflow; the
    demodulation cancels both, so only rounding (and the 1e-8 relative to the norms)
    changes. This is done here too. The modulation runs in weight's and styles' dtype
    (float32 in StyleGAN2), the convolution in x's.

    Args:
        x: ``[N, I, H, W]`` float16 / bfloat16 / float32 / float64.
        weight: ``[O, I, kh, kw]`` floating, x's device.
        styles: ``[N, I]`` floating (weight's dtype in StyleGAN2).
        noise: None, or a tensor broadcastable to the output ``[N, O, OH, OW]`` without
            changing its shape (StyleGAN2's is ``[N, 1, OH, OW]`` or ``[OH, OW]``).
        up, down, padding, resample_filter, flip_weight: as :func:`conv2d_resample`.
        demodulate: normalise each sample's output channels (SynthesisLayer: True; ToRGB: False).
        fused_modconv: the form (above); both give the same values.
        backend: the backend of the ``upfirdn2d`` calls, as :func:`conv2d_resample`.

    Returns:
        ``[N, O, OH, OW]`` in x's dtype; differentiable to any order w.r.t. x, weight,
        styles and noise.
    """
    op = "modulated_conv2d"
    check_tensor(op, "x", x, "[N, I, H, W]", 4)
    check_tensor(op, "weight", weight, "[O, I, kh, kw]", 4)
    check_tensor(op, "styles", styles, "[N, I]", 2)
    batch, in_channels = x.shape[0], x.shape[1]
    if weight.shape[1] != in_channels:
        raise ValueError(f"{op}: x has {in_channels} channels (shape {list(x.shape)}) but weight of shape "
                         f"{list(weight.shape)} expects weight.shape[1] = {weight.shape[1]}")
    if tuple(styles.shape) != (batch, in_channels):
        raise ValueError(f"{op}: styles must have shape [N, I] = [{batch}, {in_channels}] (x's batch and "
                         f"channels), got {list(styles.shape)}")
    if noise is not None and not isinstance(noise, torch.Tensor):
        raise TypeError(f"{op}: noise must be a torch.Tensor or None, got {type(noise).__name__}")
    for name, value in (("demodulate", demodulate), ("fused_modconv", fused_modconv)):
        check_bool(op, name, value)
    tensors = [("x", x), ("weight", weight), ("styles", styles)]
    tensors += [(name, t) for name, t in (("noise", noise), ("resample_filter", resample_filter))
                if isinstance(t, torch.Tensor)]
    device = check_same_device(op, tensors)
    up, down, padding, _ = _check_resampling(op, x, weight, resample_filter, up, down, padding, 1, flip_weight,
                                             False)
    if noise is not None:
        _check_noise(op, noise, _output_shape(x, weight, resample_filter, up, down, padding))
    _check_backend(op, device, backend)
    with nvtx_range("head4d.modulated_conv2d"):
        return _modulated_conv(x, weight, styles, noise, up, down, padding, resample_filter, demodulate, flip_weight,
                               fused_modconv, backend)


def _output_shape(x: torch.Tensor, w: torch.Tensor, f: Optional[torch.Tensor], up: int, down: int,
                  padding: Tuple[int, int, int, int]) -> Tuple[int, int, int, int]:
    fw, fh = _reference.filter_size(f)
    px0, px1, py0, py1 = _reference.adjusted_padding(padding, f, up, down)
    return (x.shape[0], w.shape[0], _reference.output_size(x.shape[2], w.shape[2], fh, up, down, py0, py1),
            _reference.output_size(x.shape[3], w.shape[3], fw, up, down, px0, px1))


def _check_noise(op: str, noise: torch.Tensor, out_shape: Tuple[int, int, int, int]) -> None:
    if not noise.is_floating_point():
        raise TypeError(f"{op}: noise must be floating point, got {_dtype_name(noise)}")
    try:
        fits = tuple(torch.broadcast_shapes(tuple(noise.shape), out_shape)) == out_shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{op}: noise of shape {list(noise.shape)} does not broadcast to the output's shape "
                         f"{list(out_shape)} (for example [N, 1, OH, OW] does)")


def _modulated_conv(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, noise: Optional[torch.Tensor],
                    up: int, down: int, padding: Tuple[int, int, int, int], f: Optional[torch.Tensor],
                    demodulate: bool, flip_weight: bool, fused_modconv: bool, backend: Optional[str]) -> torch.Tensor:
    """The two forms of :func:`modulated_conv2d`; arguments checked."""
    batch, in_channels, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    if x.dtype == torch.float16 and demodulate:
        weight, styles = _reference.prenormalize_half(weight, styles)
    fused_modconv = fused_modconv and batch > 0  # no groups to fold an empty batch into
    modulated = None
    dcoefs = None
    if demodulate or fused_modconv:
        modulated = weight.unsqueeze(0) * styles.reshape(batch, 1, in_channels, 1, 1)  # [N, O, I, kh, kw]
    if demodulate:
        dcoefs = (modulated.square().sum(dim=[2, 3, 4]) + _reference.DEMODULATION_EPSILON).rsqrt()  # [N, O]
    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch, in_channels, 1, 1)
        x = _resample_conv(x, weight.to(x.dtype), f, up, down, padding, 1, flip_weight, False, backend)
        if demodulate and noise is not None:
            return torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(batch, out_channels, 1, 1))
        if demodulate:
            return x * dcoefs.to(x.dtype).reshape(batch, out_channels, 1, 1)
        return x if noise is None else x + noise.to(x.dtype)
    if demodulate:
        modulated = modulated * dcoefs.reshape(batch, out_channels, 1, 1, 1)
    x = x.reshape(1, batch * in_channels, h, w)
    modulated = modulated.reshape(batch * out_channels, in_channels, kh, kw).to(x.dtype)
    x = _resample_conv(x, modulated, f, up, down, padding, batch, flip_weight, False, backend)
    x = x.reshape(batch, out_channels, x.shape[2], x.shape[3])
    return x if noise is None else x + noise.to(x.dtype)


__all__: List[str] = ["conv2d_resample", "modulated_conv2d"]
