"""Triton kernels for ``upfirdn2d`` (the ``triton`` backend): StyleGAN2's FIR
resampling (zero insertion, padding, FIR filter, decimation) in one pass.

Semantics: :func:`head4d.reference.upfirdn2d.upfirdn2d`. The per-output math mirrors
``csrc/upfirdn2d/upfirdn2d_math.h``: output (oy, ox) correlates the (flipped, unless
``flip_filter``) taps with the zero-inserted, padded image at row ``oy * downy + i``,
column ``ox * downx + j``; only every ``up``-th tap meets an input sample (the others
fall on inserted zeros), so each output visits ``ceil(fh / upy) x ceil(fw / upx)`` taps
(polyphase: 2 x 2 of the 16 for 2x upsampling with a 4 x 4 filter). Sums run in the
same order as the C++ kernels (per tap row, then over rows; a separable filter
multiplies each row sum by its row tap) in float32 (float64 for float64).

Calling contract (used by the custom operator ``head4d::upfirdn2d_triton``,
head4d/ops/_library.py; its gradient is the same op, see there)::

    forward(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain) -> out

``x`` ``[N, C, H, W]`` float16 / bfloat16 / float32 / float64 (any strides), ``f``
``[fh, fw]`` or ``[fw]`` (separable: along x, then y) floating; ``out`` ``[N, C,
(H * upy + pady0 + pady1 - fh) // downy + 1, (W * upx + padx0 + padx1 - fw) // downx + 1]``
in x's dtype.

Kernel design: one program per BLOCK_H x BLOCK_W tile of outputs, its rows taken from
the output rows of all planes (``[N * C * OH, OW]``, so small images share a program).
Each output row (column) finds its first tap that lands on an input sample and the
input index it reads; the tap loops then read masked input tiles (rows along W are
contiguous, so the loads coalesce) and gather the taps (a tiny array, cached). The
general kernel takes up, down, padding and the filter size at run time and loops over
the taps at run time; 2x upsampling and 2x downsampling with a 4-tap (4 x 4) filter,
the cases around every resolution change of StyleGAN2's networks, are compiled with
those sizes fixed (``tl.constexpr``) and their tap loops unrolled, as the C++ kernels
specialise them.

Run this file to check it against the reference (and, with a GPU, time it).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["forward"]

#: Outputs per program (BLOCK_H x BLOCK_W, BLOCK_W along the contiguous axis) and warps.
TILE_OUTPUTS = 1024
MAX_BLOCK_W = 64
NUM_WARPS = 4


# ----------------------------------------------------------------------------------
# Per-output math, after csrc/upfirdn2d/upfirdn2d_math.h.
# ----------------------------------------------------------------------------------

@triton.jit
def _tap_spans(o, down, pad0, up, shift):
    """For output indices ``o`` along one axis: the first tap whose sample lands on an
    input sample, and the input index it reads (may be out of range: masked later).
    ``shift``, a multiple of ``up`` >= pad0, keeps every operand non-negative, so the
    remainders need no sign convention."""
    start = o * down - pad0 + shift  # zero-inserted coordinate of tap 0, shifted
    first_tap = (up - start % up) % up
    first_index = (start + first_tap) // up - shift // up
    return first_tap, first_index


@triton.jit
def _tap_product(x_row, tap_row, row_ok, first_tap_x, first_index_x, col_out_ok, b, W, fw, upx,
                 ct: tl.constexpr):
    """Tap column ``b``: ``tap * x`` on the tile, zero where the tap or the sample is out of
    range. ``x_row``: each output row's input row (pointers); ``tap_row``: each output
    row's tap row (pointers into the taps; for a separable filter, the taps themselves)."""
    j = first_tap_x + b * upx
    ix = first_index_x + b
    col_ok = col_out_ok & (j < fw) & (ix >= 0) & (ix < W)
    ok = row_ok[:, None] & col_ok[None, :]
    xv = tl.load(x_row[:, None] + ix[None, :], mask=ok, other=0.0).to(ct)
    tap = tl.load(tap_row[:, None] + j[None, :], mask=ok, other=0.0)
    return tap * xv


@triton.jit
def _tap_row(acc, x_rows, taps_ptr, a, first_tap_y, first_index_y, row_out_ok, first_tap_x, first_index_x,
             col_out_ok, H, W, fh, fw, upx, upy, taps_x,
             ct: tl.constexpr, SEPARABLE: tl.constexpr, TAPS_X: tl.constexpr, BLOCK_H: tl.constexpr,
             BLOCK_W: tl.constexpr):
    """``acc`` plus tap row ``a``'s contribution: its sum over the tap columns (times the
    row tap for a separable filter). ``x_rows``: each output row's input plane
    (pointers). TAPS_X > 0: that many tap columns, unrolled; 0: ``taps_x`` of them, in a
    run-time loop."""
    i = first_tap_y + a * upy
    iy = first_index_y + a
    row_ok = row_out_ok & (i < fh) & (iy >= 0) & (iy < H)
    x_row = x_rows + iy * W
    if SEPARABLE:
        tap_row = taps_ptr + tl.zeros_like(i)
    else:
        tap_row = taps_ptr + i * fw
    row = tl.zeros([BLOCK_H, BLOCK_W], dtype=ct)
    if TAPS_X > 0:
        for b in tl.static_range(TAPS_X):
            row += _tap_product(x_row, tap_row, row_ok, first_tap_x, first_index_x, col_out_ok, b, W, fw, upx, ct)
    else:
        for b in range(taps_x):
            row += _tap_product(x_row, tap_row, row_ok, first_tap_x, first_index_x, col_out_ok, b, W, fw, upx, ct)
    if SEPARABLE:
        acc += tl.load(taps_ptr + i, mask=row_ok, other=0.0)[:, None] * row
    else:
        acc += row
    return acc


@triton.jit
def _upfirdn2d_kernel(
    x_ptr,  # [planes, H, W] contiguous, storage dtype
    taps_ptr,  # [fh, fw] or [fw] contiguous, compute dtype, flipped unless flip_filter, gain applied
    out_ptr,  # [planes * OH, OW] contiguous, storage dtype
    H, W, OH, OW, out_rows, tiles_x,
    upx_arg, upy_arg, downx_arg, downy_arg, padx0, pady0, fh_arg, fw_arg, shift_x, shift_y,
    UX: tl.constexpr, UY: tl.constexpr, DX: tl.constexpr, DY: tl.constexpr, FH: tl.constexpr,
    FW: tl.constexpr, SEPARABLE: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # UX, UY, DX, DY, FH, FW > 0 fix the factor or the filter size at compile time (and
    # unroll the tap loops); 0 reads the run-time argument.
    ct = taps_ptr.dtype.element_ty  # compute dtype: float32, or float64
    if UX > 0:
        upx = UX
    else:
        upx = upx_arg
    if UY > 0:
        upy = UY
    else:
        upy = upy_arg
    if DX > 0:
        downx = DX
    else:
        downx = downx_arg
    if DY > 0:
        downy = DY
    else:
        downy = downy_arg
    if FH > 0:
        fh = FH
    else:
        fh = fh_arg
    if FW > 0:
        fw = FW
    else:
        fw = fw_arg

    # The tile's rows run over the output rows of all planes, [planes * OH] (so small
    # images share a program); its columns over OW.
    pid = tl.program_id(0)
    tile_y = pid // tiles_x
    tile_x = pid - tile_y * tiles_x
    r = tile_y * BLOCK_H + tl.arange(0, BLOCK_H)
    ox = tile_x * BLOCK_W + tl.arange(0, BLOCK_W)
    plane = r // OH
    oy = r - plane * OH
    if IDX64:
        oy = oy.to(tl.int64)
        ox = ox.to(tl.int64)
    row_out_ok = r < out_rows
    col_out_ok = ox < OW
    first_tap_y, first_index_y = _tap_spans(oy, downy, pady0, upy, shift_y)
    first_tap_x, first_index_x = _tap_spans(ox, downx, padx0, upx, shift_x)
    taps_y = (fh + upy - 1) // upy  # taps per axis that can meet input samples
    taps_x = (fw + upx - 1) // upx
    x_rows = x_ptr + plane.to(tl.int64) * H * W

    acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=ct)
    if FH > 0:
        for a in tl.static_range((FH + UY - 1) // UY):
            acc = _tap_row(acc, x_rows, taps_ptr, a, first_tap_y, first_index_y, row_out_ok, first_tap_x,
                           first_index_x, col_out_ok, H, W, fh, fw, upx, upy, taps_x,
                           ct, SEPARABLE, (FW + UX - 1) // UX, BLOCK_H, BLOCK_W)
    else:
        for a in range(taps_y):
            acc = _tap_row(acc, x_rows, taps_ptr, a, first_tap_y, first_index_y, row_out_ok, first_tap_x,
                           first_index_x, col_out_ok, H, W, fh, fw, upx, upy, taps_x,
                           ct, SEPARABLE, 0, BLOCK_H, BLOCK_W)

    dst = out_ptr + (r.to(tl.int64) * OW)[:, None] + ox[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=row_out_ok[:, None] & col_out_ok[None, :])


# ----------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_size(size: int, up: int, down: int, pad0: int, pad1: int, taps: int) -> int:
    """Output length along one axis."""
    return (size * up + pad0 + pad1 - taps) // down + 1


def specialization(upx: int, upy: int, downx: int, downy: int, fh: int, fw: int) -> tuple:
    """(UX, UY, DX, DY, FH, FW) for the kernel: the sizes themselves for 2x upsampling or
    2x downsampling (both axes) with a 4-tap filter, zeros (all at run time) otherwise."""
    if fh == 4 and fw == 4:
        if (upx, upy, downx, downy) == (2, 2, 1, 1):
            return 2, 2, 1, 1, 4, 4
        if (upx, upy, downx, downy) == (1, 1, 2, 2):
            return 1, 1, 2, 2, 4, 4
    return 0, 0, 0, 0, 0, 0


def _blocks(out_rows: int, out_w: int) -> tuple:
    """(BLOCK_H, BLOCK_W): up to MAX_BLOCK_W along W, TILE_OUTPUTS outputs in all."""
    block_w = min(MAX_BLOCK_W, triton.next_power_of_2(max(out_w, 1)))
    block_h = min(max(1, TILE_OUTPUTS // block_w), triton.next_power_of_2(max(out_rows, 1)))
    return block_h, block_w


def _shift(pad0: int, up: int) -> int:
    """The smallest multiple of ``up`` that is >= pad0 (and >= 0)."""
    return up * ((max(pad0, 0) + up - 1) // up)


def filter_taps(f: torch.Tensor, flip_filter: bool, gain: float, compute: torch.dtype) -> torch.Tensor:
    """The taps the kernel correlates with: ``f * gain ** (f.ndim / 2)`` (in f's dtype,
    as the reference scales it), in the compute dtype, flipped for a true convolution
    unless ``flip_filter``, contiguous."""
    taps = (f * (float(gain) ** (f.dim() / 2))).to(compute)
    if not flip_filter:
        taps = taps.flip(list(range(f.dim())))
    return taps.contiguous()


def forward(x: torch.Tensor, f: torch.Tensor, upx: int, upy: int, downx: int, downy: int, padx0: int, padx1: int,
            pady0: int, pady1: int, flip_filter: bool, gain: float) -> torch.Tensor:
    """upfirdn2d of ``x [N, C, H, W]`` with ``f`` (see the module docstring); the
    arguments are the public op's, already checked."""
    n, c, h, w = x.shape
    fh, fw = int(f.shape[0]), int(f.shape[-1])
    out_h = output_size(h, upy, downy, pady0, pady1, fh)
    out_w = output_size(w, upx, downx, padx0, padx1, fw)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"upfirdn2d: the padded input ({h * upy + pady0 + pady1} x {w * upx + padx0 + padx1}) "
                         f"is smaller than the filter ({fh} x {fw})")
    out = torch.empty((n, c, out_h, out_w), dtype=x.dtype, device=x.device)
    planes = n * c
    if out.numel() == 0:
        return out
    taps = filter_taps(f, bool(flip_filter), gain, _compute_dtype(x.dtype))
    xc = x.contiguous()
    out_rows = planes * out_h
    block_h, block_w = _blocks(out_rows, out_w)
    tiles_x, tiles_y = triton.cdiv(out_w, block_w), triton.cdiv(out_rows, block_h)
    shift_x, shift_y = _shift(padx0, upx), _shift(pady0, upy)
    # 32-bit coordinates inside a plane unless they can overflow (plane and row bases are 64-bit)
    reach = max(h * w, (out_h + block_h) * downy + shift_y + fh,
                (out_w + block_w) * downx + shift_x + fw, h * upy + abs(pady0), w * upx + abs(padx0))
    ux, uy, dx, dy, kh, kw = specialization(upx, upy, downx, downy, fh, fw)
    grid = (tiles_x * tiles_y,)
    _upfirdn2d_kernel[grid](
        xc, taps, out, h, w, out_h, out_w, out_rows, tiles_x,
        upx, upy, downx, downy, padx0, pady0, fh, fw, shift_x, shift_y,
        UX=ux, UY=uy, DX=dx, DY=dy, FH=kh, FW=kw, SEPARABLE=f.dim() == 1, IDX64=reach >= 2 ** 31 - 1,
        BLOCK_H=block_h, BLOCK_W=block_w, num_warps=NUM_WARPS,
    )
    return out


# ----------------------------------------------------------------------------------
# Self-check and benchmark: python kernels/upfirdn2d.py
# ----------------------------------------------------------------------------------

def _load_reference():
    try:
        from head4d.reference.upfirdn2d import upfirdn2d
    except ImportError:  # run from a checkout without head4d installed
        import importlib.util

        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "head4d", "reference",
                            "upfirdn2d.py")
        spec = importlib.util.spec_from_file_location("_head4d_reference_upfirdn2d", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        upfirdn2d = module.upfirdn2d
    return upfirdn2d


#: (up, down, padding, filter shape): the specialised 2x up and 2x down, and general cases.
_CHECK_CASES = [
    ((2, 2), (1, 1), (2, 1, 2, 1), (4, 4)),
    ((1, 1), (2, 2), (1, 1, 1, 1), (4, 4)),
    ((3, 1), (2, 3), (-1, 4, 2, -2), (3, 5)),
    ((2, 2), (1, 1), (3, 4, 3, 4), (8,)),
    ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
]


def _self_check(device: torch.device) -> None:
    reference = _load_reference()
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-14)):
        for up, down, padding, fshape in _CHECK_CASES:
            x = torch.randn(2, 3, 11, 9, generator=gen, dtype=dtype).to(device)
            f = torch.rand(fshape, generator=gen).to(device)
            for flip in (False, True):
                ref = reference(x.double(), f, up, down, padding, flip, 1.7)  # f scaled in float32, as the op
                out = forward(x, f, *up, *down, *padding, flip, 1.7)
                err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                assert err < tol, f"{dtype} up {up} down {down} padding {padding} f {fshape}: rel err {err:.3g}"
        print(f"self-check {dtype}: matches the reference")


def _benchmark() -> None:
    from triton.testing import do_bench

    device = torch.device("cuda")
    f = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device)
    f = torch.outer(f, f) / 64
    for shape in ((8, 256, 128, 128), (8, 3, 512, 512)):
        x = torch.randn(shape, device=device)
        for name, args in (("up2", (2, 2, 1, 1, 2, 1, 2, 1, False, 4.0)),
                           ("down2", (1, 1, 2, 2, 1, 1, 1, 1, False, 1.0))):
            ms = do_bench(lambda: forward(x, f, *args))
            out_numel = forward(x, f, *args).numel()
            gbps = (x.numel() + out_numel) * x.element_size() / ms * 1e-6
            print(f"{name} {list(shape)} float32: triton {ms:.3f} ms ({gbps:.0f} GB/s)")


if __name__ == "__main__":
    _device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if _device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 (set before Triton is imported)")
    _self_check(_device)
    if _device.type == "cuda":
        _benchmark()
