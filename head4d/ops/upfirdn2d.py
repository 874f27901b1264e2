"""StyleGAN2's FIR resampling: ``setup_filter``, ``upfirdn2d``, ``upsample2d``,
``downsample2d``, ``filter2d``, with the signatures and conventions of StyleGAN2's
``torch_utils.ops.upfirdn2d`` (code written against it moves over by changing the
import; ``impl=`` becomes ``backend=``).

Conventions (see :mod:`head4d.reference.upfirdn2d` for the four steps): zero insertion
after each sample, padding where a negative amount crops, a true convolution with the
filter unless ``flip_filter``, the filter scaled by ``gain ** (f.ndim / 2)``, a 1-D
filter applied separably (along x, then y), decimation keeping the first sample.

Backends: ``cpu`` and ``cuda`` (head4d._C, csrc/upfirdn2d/), ``triton``
(kernels/upfirdn2d.py), each with 2x up and 2x down with a 4-tap filter compiled with
the sizes fixed; ``torch`` (the reference). The gradient w.r.t. ``x`` is upfirdn2d
again (up and down swapped, the filter flipped, the padding transformed), so second
derivatives (R1) work on every backend. The compiled backends treat the filter as a
constant: a filter that requires grad runs the reference.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import _backend
from .._checks import check_bool, check_int, check_same_device, check_tensor
from .._nvtx import nvtx_range
from ..reference import upfirdn2d as _reference
from . import _library
from ._common import resolve_implemented

PREFERENCES = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}


def _constant_filter(x: torch.Tensor, f: torch.Tensor) -> Optional[str]:
    """The compiled backends give no filter gradient."""
    if f.requires_grad and torch.is_grad_enabled():
        return "the filter requires grad and the compiled kernels treat it as a constant"
    return None


IMPLEMENTED = {"upfirdn2d": ("cpu", "cuda", "triton", "torch")}
SUPPORT = {"upfirdn2d": {"cpu": _constant_filter, "cuda": _constant_filter, "triton": _constant_filter}}
for _op, _implemented in IMPLEMENTED.items():  # compiled: every input but a filter that requires grad
    _backend.declare(_op, _implemented, PREFERENCES, SUPPORT[_op])

IntPair = Union[int, Sequence[int]]
IntQuad = Union[int, Sequence[int]]


def _parse_scaling(op: str, name: str, value: IntPair) -> Tuple[int, int]:
    """``up`` / ``down``: an int for both axes or ``[x, y]``, each >= 1."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{op}: {name} must be an int or [x, y], got a sequence of length {len(value)}")
        return check_int(op, f"{name}[0]", value[0], 1), check_int(op, f"{name}[1]", value[1], 1)
    value = check_int(op, name, value, 1)
    return value, value


def _parse_padding(op: str, value: IntQuad) -> Tuple[int, int, int, int]:
    """``padding``: an int for all four sides, ``[x, y]`` or ``[x0, x1, y0, y1]``; negative crops."""
    minimum = -(1 << 30)
    if isinstance(value, (list, tuple)):
        if len(value) not in (2, 4):
            raise ValueError(f"{op}: padding must be an int, [x, y] or [x0, x1, y0, y1], "
                             f"got a sequence of length {len(value)}")
        ints = [check_int(op, f"padding[{i}]", v, minimum) for i, v in enumerate(value)]
        return (ints[0], ints[0], ints[1], ints[1]) if len(ints) == 2 else tuple(ints)
    value = check_int(op, "padding", value, minimum)
    return value, value, value, value


def _check_gain(op: str, gain) -> float:
    if isinstance(gain, torch.Tensor) and gain.numel() == 1:
        gain = gain.item()
    if isinstance(gain, bool) or not isinstance(gain, numbers.Real) or not math.isfinite(float(gain)):
        raise TypeError(f"{op}: gain must be a finite real number, got {gain!r}")
    return float(gain)


def _check_filter(op: str, f) -> torch.Tensor:
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"{op}: f must be a torch.Tensor of shape [fh, fw] or [fw] (or None), got {type(f).__name__}")
    if f.dim() not in (1, 2):
        raise ValueError(f"{op}: f must be a 1-D [fw] (separable) or 2-D [fh, fw] filter, got shape {list(f.shape)}")
    if not f.is_floating_point():
        raise TypeError(f"{op}: f must be floating point, got {str(f.dtype).replace('torch.', '')}")
    if f.numel() == 0:
        raise ValueError(f"{op}: f must not be empty, got shape {list(f.shape)}")
    return f


def _filter_size(f: Optional[torch.Tensor]) -> Tuple[int, int]:
    """``(fw, fh)`` of a filter (``(1, 1)`` for None); a 1-D filter is square."""
    if f is None:
        return 1, 1
    _check_filter("upfirdn2d", f)
    return int(f.shape[-1]), int(f.shape[0])


def setup_filter(f, device: torch.device = torch.device("cpu"), normalize: bool = True, flip_filter: bool = False,
                 gain: float = 1, separable: Optional[bool] = None) -> torch.Tensor:
    """A float32 filter for :func:`upfirdn2d`, as StyleGAN2 builds it.

    Args:
        f: ``None`` (a single tap 1), a number, a 1-D or 2-D array-like or tensor.
        device: where the result lives.
        normalize: divide by the sum of the taps.
        flip_filter: flip the filter (along both axes for 2-D).
        gain: multiply by ``gain ** (ndim / 2)`` (the gain of the 2-D filtering).
        separable: keep a 1-D filter 1-D (applied along x, then y). ``None``: only when
            it has 8 taps or more; a shorter 1-D filter becomes its outer product
            (``[1, 3, 3, 1]`` becomes the 4 x 4 ``outer / 64``).

    Returns:
        float32 ``[fw]`` (separable) or ``[fh, fw]``.
    """
    op = "setup_filter"
    f = torch.as_tensor(1 if f is None else f, dtype=torch.float32)
    if f.dim() not in (0, 1, 2):
        raise ValueError(f"{op}: f must be a number, a 1-D or a 2-D filter, got shape {list(f.shape)}")
    if f.numel() == 0:
        raise ValueError(f"{op}: f must not be empty, got shape {list(f.shape)}")
    if f.dim() == 0:
        f = f[None]
    if separable is None:
        separable = f.dim() == 1 and f.numel() >= 8
    if f.dim() == 1 and not separable:
        f = torch.outer(f, f)
    if f.dim() != (1 if separable else 2):
        raise ValueError(f"{op}: separable=True needs a 1-D filter, got shape {list(f.shape)}")
    gain = _check_gain(op, gain)
    if f.dim() == 1 and gain < 0:
        raise ValueError(f"{op}: a 1-D filter needs gain >= 0 (it is scaled by gain ** 0.5), got {gain}")
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.dim())))
    f = f * (gain ** (f.dim() / 2))
    return f.to(device=device)


def upfirdn2d(x: torch.Tensor, f: Optional[torch.Tensor], up: IntPair = 1, down: IntPair = 1,
              padding: IntQuad = 0, flip_filter: bool = False, gain: float = 1, *,
              backend: Optional[str] = None) -> torch.Tensor:
    """Upsample (zero insertion), pad (negative crops), FIR filter, downsample.

    Args:
        x: ``[N, C, H, W]`` float16 / bfloat16 / float32 / float64.
        f: ``[fh, fw]``, or ``[fw]`` applied separably, floating, same device; ``None``
            is the single tap 1.
        up: zero-insertion factor, an int or ``[x, y]``, >= 1.
        down: decimation factor, an int or ``[x, y]``, >= 1.
        padding: an int, ``[x, y]`` or ``[x0, x1, y0, y1]``, in upsampled pixels.
        flip_filter: correlate with ``f`` instead of convolving (``f`` not flipped).
        gain: the filter is scaled by ``gain ** (f.ndim / 2)`` (>= 0 for a 1-D filter).
        backend: ``"cpu"``, ``"cuda"``, ``"triton"``, ``"torch"`` (the reference) or
            ``None``/``"auto"``.

    Returns:
        ``[N, C, (H * upy + y0 + y1 - fh) // downy + 1, (W * upx + x0 + x1 - fw) // downx + 1]``
        in ``x.dtype`` (kernels accumulate in float32, float64 for float64).
        Differentiable w.r.t. ``x`` to any order; w.r.t. ``f`` on the reference only.
    """
    op = "upfirdn2d"
    check_tensor(op, "x", x, "[N, C, H, W]", 4)
    if f is None:
        f = torch.ones((1, 1), dtype=torch.float32, device=x.device)
    _check_filter(op, f)
    device = check_same_device(op, [("x", x), ("f", f)])
    upx, upy = _parse_scaling(op, "up", up)
    downx, downy = _parse_scaling(op, "down", down)
    padding = _parse_padding(op, padding)
    check_bool(op, "flip_filter", flip_filter)
    gain = _check_gain(op, gain)
    if f.dim() == 1 and gain < 0:
        raise ValueError(f"{op}: a 1-D filter needs gain >= 0 (it is scaled by gain ** 0.5 along each axis), "
                         f"got {gain}")
    fh, fw = int(f.shape[0]), int(f.shape[-1])
    padded_h = x.shape[2] * upy + padding[2] + padding[3]
    padded_w = x.shape[3] * upx + padding[0] + padding[1]
    if padded_h < fh or padded_w < fw:
        raise ValueError(f"{op}: the upsampled, padded input is {padded_h} x {padded_w} (rows x columns), "
                         f"smaller than the filter {fh} x {fw}; x has shape {list(x.shape)}, padding {list(padding)}")
    chosen = resolve_implemented(op, device, backend, PREFERENCES, IMPLEMENTED[op], inputs=(x, f))
    with nvtx_range("head4d.upfirdn2d"):
        if chosen == "torch":
            return _reference.upfirdn2d(x, f, (upx, upy), (downx, downy), padding, flip_filter, gain)
        # head4d::upfirdn2d (head4d._C) or head4d::upfirdn2d_triton, custom operators (:mod:`head4d.ops._library`)
        op_fn = _library.upfirdn2d_triton if chosen == "triton" else _library.upfirdn2d
        return op_fn(x, f, [upx, upy], [downx, downy], list(padding), flip_filter, gain)


def filter2d(x: torch.Tensor, f: Optional[torch.Tensor], padding: IntQuad = 0, flip_filter: bool = False,
             gain: float = 1, *, backend: Optional[str] = None) -> torch.Tensor:
    """``upfirdn2d`` without resampling, padded to keep the size (``fw // 2`` before,
    ``(fw - 1) // 2`` after, likewise for rows) plus ``padding``. Shapes as there."""
    padx0, padx1, pady0, pady1 = _parse_padding("filter2d", padding)
    fw, fh = _filter_size(f)
    p = [padx0 + fw // 2, padx1 + (fw - 1) // 2, pady0 + fh // 2, pady1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=p, flip_filter=flip_filter, gain=gain, backend=backend)


def upsample2d(x: torch.Tensor, f: Optional[torch.Tensor], up: IntPair = 2, padding: IntQuad = 0,
               flip_filter: bool = False, gain: float = 1, *, backend: Optional[str] = None) -> torch.Tensor:
    """``upfirdn2d`` upsampling by ``up`` to exactly ``up`` times the size (padding
    ``(fw + upx - 1) // 2`` before, ``(fw - upx) // 2`` after, plus ``padding``), with the
    gain multiplied by ``upx * upy`` to keep the mean (the inserted zeros)."""
    upx, upy = _parse_scaling("upsample2d", "up", up)
    padx0, padx1, pady0, pady1 = _parse_padding("upsample2d", padding)
    fw, fh = _filter_size(f)
    p = [padx0 + (fw + upx - 1) // 2, padx1 + (fw - upx) // 2, pady0 + (fh + upy - 1) // 2, pady1 + (fh - upy) // 2]
    return upfirdn2d(x, f, up=(upx, upy), padding=p, flip_filter=flip_filter,
                     gain=_check_gain("upsample2d", gain) * upx * upy, backend=backend)


def downsample2d(x: torch.Tensor, f: Optional[torch.Tensor], down: IntPair = 2, padding: IntQuad = 0,
                 flip_filter: bool = False, gain: float = 1, *, backend: Optional[str] = None) -> torch.Tensor:
    """``upfirdn2d`` filtering then keeping every ``down``-th sample (padding
    ``(fw - downx + 1) // 2`` before, ``(fw - downx) // 2`` after, plus ``padding``)."""
    downx, downy = _parse_scaling("downsample2d", "down", down)
    padx0, padx1, pady0, pady1 = _parse_padding("downsample2d", padding)
    fw, fh = _filter_size(f)
    p = [padx0 + (fw - downx + 1) // 2, padx1 + (fw - downx) // 2, pady0 + (fh - downy + 1) // 2,
         pady1 + (fh - downy) // 2]
    return upfirdn2d(x, f, down=(downx, downy), padding=p, flip_filter=flip_filter, gain=gain, backend=backend)


__all__: List[str] = ["setup_filter", "upfirdn2d", "upsample2d", "downsample2d", "filter2d"]
