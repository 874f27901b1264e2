"""Triton kernels for ``decode_triplanes`` (the ``triton`` backend): triplane sampling
fused with EG3D's decoder MLP, so that no per-point feature or activation ever goes
to memory.

Semantics (:mod:`head4d.reference.decoding`)::

    f     = sample_triplanes(planes, points, box_warp, layout, reduce="mean")   [N, M, C]
    pre   = f @ w1.T + b1                                                        [N, M, Hd]
    h     = softplus(pre)          (torch's: beta 1, threshold 20)
    o     = h @ w2.T + b2                                                        [N, M, O], O = 1 + Co
    sigma = o[..., :1]
    rgb   = sigmoid(o[..., 1:]) * (1 + 2 * 0.001) - 0.001

Calling contract (used by the custom operator ``head4d::decode_triplanes_triton``, head4d/ops/_library.py)::

    forward(planes, points, w1, b1, w2, b2, scale, layout) -> (rgb [N, M, O-1], sigma [N, M, 1])
    backward(grad_rgb | None, grad_sigma | None, planes, points, w1, b1, w2, b2, scale, layout,
             needs) -> 6 gradients (tensor | None), for (planes, points, w1, b1, w2, b2)

``planes`` is ``[N, 3, C, H, W]`` with any strides (read channels-last), ``scale`` is
``2 / box_warp``, ``layout`` 0 = portrait4d, 1 = eg3d. Supported sizes: C in 16..64,
Hd in 16..128, O in 1..64 (ValueError otherwise). Dtypes: float32, float16, bfloat16
planes (float64 raises NotImplementedError: ``tl.dot`` has no float64 path we can rely
on; the op falls back to the reference for it). Outputs are in planes' dtype; gradients in
each input's dtype.

Kernel design
-------------
A program owns BLOCK_M points of one batch element. It gathers their mean features
``[BLOCK_M, C]`` from the channels-last planes with the 12 corner gathers of
:mod:`kernels.triplanes` (its ``_plane_coords``, ``_stencil`` and ``_corner_offsets``),
then runs both layers with ``tl.dot`` on weights loaded once per program (padded to
powers of two >= 16 with masks), and stores only rgb and sigma. The output layer is split: the ``Co`` colour columns
go through ``tl.dot`` (32 in the hot case, a power of two: no padding), the one density
column is a row reduction ``sum_j h * w2[0, j]``; padding O = 33 to 64 would double the
second layer's work.

Precision: everything accumulates in float32, like the reference (which computes in
float32 and rounds the outputs once). For float32 planes the products use
``input_precision="ieee"`` (``FP32_DOT_PRECISION``): exact float32 products, results
match the reference to float32 rounding; on sm_90 Triton runs them on the CUDA cores
(FMA), "tf32x3" would put them on tensor cores at about the same accuracy and "tf32"
at ~1e-3. For float16/bfloat16 planes the products run on tensor cores in the planes'
dtype with float32 accumulation; with ``HALF_SPLIT`` (default) each activation operand
is split into hi + lo halves (one extra product per split operand, see ``_mm``) so
that the result is about float32-accurate, as the reference is; weights in the planes'
dtype are exact and are not split.

Backward: nothing per point is saved; a program recomputes the forward for its points,
then ``g_o`` (the clamped sigmoid's derivative for rgb, identity for sigma),
``g_h = g_o @ w2``, ``g_pre = g_h * sigmoid(pre)`` (softplus' derivative, 1 where
pre > 20), ``g_f = g_pre @ w1``. The plane gradient ``g_f / 3 * weight`` goes with atomic
adds to the 12 corners of a float32 channels-last buffer; the point gradient comes from
the stencil weights' derivatives, as in :mod:`kernels.triplanes`.

Weight gradients (``g_w2 = g_o^T h``, ``g_b2 = sum g_o``, ``g_w1 = g_pre^T f``,
``g_b1 = sum g_pre``) are reduced in two stages: the backward grid is persistent (a
fixed number of programs, a few per SM, each looping over point blocks with a stride),
each program accumulates its partial products in registers with ``tl.dot``, and writes
them once to its own row of a ``[programs, Hd*C + Hd + O*Hd + O]`` float32 buffer, which
torch sums. Why not one atomic add per weight element per point block: with 1.57 M
points that is ~50 M float atomics on the same ~4 k addresses (serialized per address in
L2, ~0.5 ms); the partial rows are ~10 MB written once and summed in a few microseconds,
and the weight gradients come out deterministic.

Run this file to check it against the reference (and, with a GPU, time it).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # installed: head4d.kernels is this folder
    from head4d.kernels.triplanes import (_add_plane_grads, _corner_offsets, _needs_int64, _plane_coords,
                                          _point_grads, _stencil, _value_without_corners)
except ImportError:  # loaded by path from a checkout (tests, __main__)
    import importlib.util as _ilu

    _spec = _ilu.spec_from_file_location(
        "_head4d_triton_triplanes", os.path.join(os.path.dirname(os.path.abspath(__file__)), "triplanes.py"))
    _triplanes = _ilu.module_from_spec(_spec)
    _spec.loader.exec_module(_triplanes)
    _corner_offsets, _needs_int64 = _triplanes._corner_offsets, _triplanes._needs_int64
    _plane_coords, _stencil = _triplanes._plane_coords, _triplanes._stencil
    _value_without_corners = _triplanes._value_without_corners
    _point_grads, _add_plane_grads = _triplanes._point_grads, _triplanes._add_plane_grads

__all__ = ["forward", "backward", "check_sizes"]

# ----------------------------------------------------------------------------------
# Launch configuration (no autotuning: it is slow under the interpreter).
# ----------------------------------------------------------------------------------

#: Points per program: BLOCK_M = TILE // BLOCK_H within [MIN, MAX] (a [BLOCK_M, BLOCK_H]
#: activation tile of TILE float32 elements). Chosen from ``ptxas -v`` for sm_90a
#: (Triton 3.8 and 3.6; no GPU run yet), hot case C 32, Hd 64, O 33: the forward at 64
#: points and 8 warps does not spill (float32 ~150-250 registers, bfloat16 ~110-180);
#: the backward keeps the weight-gradient accumulators and more tiles live and spills
#: least at 32 points and 8 warps (~1-2 KB of spill stores; 64 points: 5-45 KB).
FORWARD_TILE, FORWARD_MAX_BLOCK_M = 4096, 64
BACKWARD_TILE, BACKWARD_MAX_BLOCK_M = 2048, 32
MIN_BLOCK_M = 16
FORWARD_NUM_WARPS = 8
BACKWARD_NUM_WARPS = 8
#: No software pipelining of the backward's point-block loop: it would multi-buffer the
#: 12 corner gathers in shared memory (~170 KB for float32 at 64 points).
BACKWARD_NUM_STAGES = 1
#: Persistent backward grid: programs per SM on a GPU, and in total under the interpreter.
BACKWARD_PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4
#: ``tl.dot``'s input_precision for float32 operands: "ieee" (exact float32 products,
#: matches the reference) or "tf32" (tensor cores, ~1e-3 relative error).
FP32_DOT_PRECISION = "ieee"
#: float16/bfloat16 planes: products of activations as hi + lo pairs (see ``_mm``), about
#: float32-accurate like the reference; False rounds them once to the planes' dtype
#: (what an fp16/bf16 decoder does: ~2**-9 relative for bfloat16).
HALF_SPLIT = True

#: Supported sizes (inclusive).
C_RANGE = (16, 64)
HIDDEN_RANGE = (16, 128)
OUT_RANGE = (1, 64)

#: rgb = sigmoid(o) * RGB_SCALE - RGB_SHIFT (EG3D's OSGDecoder).
RGB_SHIFT = 0.001
RGB_SCALE = 1.0 + 2.0 * RGB_SHIFT
#: torch.nn.functional.softplus' threshold (beta 1): x itself above it.
SOFTPLUS_THRESHOLD = 20.0
# The same, visible inside the kernels (Triton reads only constexpr globals).
_RGB_SHIFT = tl.constexpr(RGB_SHIFT)
_RGB_SCALE = tl.constexpr(RGB_SCALE)
_THRESHOLD = tl.constexpr(SOFTPLUS_THRESHOLD)


def _pow2_at_least_16(x: int) -> int:
    return max(16, triton.next_power_of_2(max(int(x), 1)))


# ----------------------------------------------------------------------------------
# Per-point math (jit helpers).
# ----------------------------------------------------------------------------------

@triton.jit
def _log1p(t):
    """log(1 + t) for t in [0, 1], accurate for tiny t (libdevice-free: the interpreter
    has none): log(u) * t / (u - 1) with u = 1 + t corrects u's rounding."""
    u = 1.0 + t
    exact = u == 1.0
    return tl.where(exact, t, tl.log(u) * (t / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _softplus(x):
    """torch's softplus (beta 1, threshold 20): x above 20, else log(1 + e^x), evaluated
    as max(x, 0) + log1p(e^-|x|) so that neither branch overflows."""
    sp = tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))
    return tl.where(x > _THRESHOLD, x, sp)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in float32; UPCAST: give tl.dot the (already rounded) operands as
    float32 instead (exact products, the same result): Triton's interpreter multiplies
    bfloat16 operands' raw bits (3.8)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    else:
        return tl.dot(a, b, input_precision=PREC, out_dtype=tl.float32)


@triton.jit
def _mm(a, b, DT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
        SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr):
    """a @ b (float32 tiles) with operands rounded to DT, the planes' dtype, accumulated in
    float32. SPLIT_A / SPLIT_B (half precision only): that operand as hi + lo, two DT
    values, one more product each (hi_a lo_b + lo_a hi_b; lo lo is below float32's
    rounding), so the product is about as accurate as a float32 one."""
    a_hi = a.to(DT)
    b_hi = b.to(DT)
    acc = _dot(a_hi, b_hi, PREC, UPCAST)
    if SPLIT_A:
        acc += _dot((a - a_hi.to(tl.float32)).to(DT), b_hi, PREC, UPCAST)
    if SPLIT_B:
        acc += _dot(a_hi, (b - b_hi.to(tl.float32)).to(DT), PREC, UPCAST)
    return acc


@triton.jit
def _row_block(blk, blocks_per_n, M, BLOCK_M: tl.constexpr, IDX64: tl.constexpr):
    """Batch element (int64), point rows and their mask of flat block index ``blk``."""
    n = blk // blocks_per_n
    mb = blk - n * blocks_per_n
    if IDX64:
        mb = mb.to(tl.int64)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    return n.to(tl.int64), rows, rows < M


@triton.jit
def _load_points(points_ptr, n, rows, row_ok, M):
    pt = points_ptr + n * M * 3 + rows * 3
    p0 = tl.load(pt + 0, mask=row_ok, other=0.0)
    p1 = tl.load(pt + 1, mask=row_ok, other=0.0)
    p2 = tl.load(pt + 2, mask=row_ok, other=0.0)
    return p0, p1, p2


@triton.jit
def _gather_mean(planes_ptr, n, p0, p1, p2, row_ok, cols, col_ok, scale, C, H, W, plane_numel,
                 LAYOUT: tl.constexpr, IDX64: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The mean over the three planes of the bilinear samples, [BLOCK_M, BLOCK_C] float32
    (zero in padded channels and rows; NaN in the channels of a point with a NaN or
    infinite plane coordinate)."""
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for plane in tl.static_range(3):
        pu, pv = _plane_coords(p0, p1, p2, plane, LAYOUT)
        (x0, y0, fx0, fy0, ix, iy, w_nw, w_ne, w_sw, w_se,
         in_nw, in_ne, in_sw, in_se) = _stencil(pu, pv, scale, W, H, row_ok)
        src = planes_ptr + (n * 3 + plane) * plane_numel + cols[None, :]
        o_nw, o_ne, o_sw, o_se = _corner_offsets(x0, y0, W, C, IDX64)
        v_nw = tl.load(src + o_nw[:, None], mask=in_nw[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        v_ne = tl.load(src + o_ne[:, None], mask=in_ne[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        v_sw = tl.load(src + o_sw[:, None], mask=in_sw[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        v_se = tl.load(src + o_se[:, None], mask=in_se[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += (v_nw * w_nw[:, None] + v_ne * w_ne[:, None]
                + v_sw * w_sw[:, None] + v_se * w_se[:, None])
        miss = _value_without_corners(pu * scale, pv * scale).to(tl.float32)
        acc += tl.where(col_ok[None, :], miss[:, None], 0.0)
    return acc / 3.0


@triton.jit
def _load_weights(w1_ptr, b1_ptr, w2_ptr, b2_ptr, C, HD, CO,
                  BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """w1^T [BLOCK_C, BLOCK_H], b1 [BLOCK_H], the colour rows of w2 transposed
    [BLOCK_H, BLOCK_R], b2's colour part [BLOCK_R], the density row w2[0] [BLOCK_H] and
    b2[0]; zero-padded, weights in their own dtype, biases in float32."""
    c = tl.arange(0, BLOCK_C)
    j = tl.arange(0, BLOCK_H)
    r = tl.arange(0, BLOCK_R)
    c_ok = c < C
    j_ok = j < HD
    r_ok = r < CO
    w1t = tl.load(w1_ptr + j[None, :] * C + c[:, None], mask=c_ok[:, None] & j_ok[None, :], other=0.0)
    b1 = tl.load(b1_ptr + j, mask=j_ok, other=0.0).to(tl.float32)
    w2rt = tl.load(w2_ptr + (1 + r[None, :]) * HD + j[:, None], mask=j_ok[:, None] & r_ok[None, :], other=0.0)
    b2r = tl.load(b2_ptr + 1 + r, mask=r_ok, other=0.0).to(tl.float32)
    w2s = tl.load(w2_ptr + j, mask=j_ok, other=0.0).to(tl.float32)
    b2s = tl.load(b2_ptr).to(tl.float32)
    return w1t, b1, w2rt, b2r, w2s, b2s


# ----------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------

@triton.jit
def _decode_fwd_kernel(
    planes_ptr,  # [N, 3, H, W, C] contiguous (channels-last), planes' dtype
    points_ptr,  # [N, M, 3] contiguous float32
    w1_ptr, b1_ptr, w2_ptr, b2_ptr,  # [Hd, C], [Hd], [O, Hd], [O] contiguous
    rgb_ptr,  # [N, M, Co] contiguous, planes' dtype
    sigma_ptr,  # [N, M] contiguous, planes' dtype
    scale, M, C, H, W, HD, CO, plane_numel, blocks_per_n,
    LAYOUT: tl.constexpr, IDX64: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT_X: tl.constexpr, SPLIT_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
):
    dt = planes_ptr.dtype.element_ty  # dot operand dtype
    n, rows, row_ok = _row_block(tl.program_id(0), blocks_per_n, M, BLOCK_M, IDX64)
    p0, p1, p2 = _load_points(points_ptr, n, rows, row_ok, M)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    f = _gather_mean(planes_ptr, n, p0, p1, p2, row_ok, cols, col_ok, scale, C, H, W, plane_numel,
                     LAYOUT, IDX64, BLOCK_M, BLOCK_C)

    w1t, b1, w2rt, b2r, w2s, b2s = _load_weights(w1_ptr, b1_ptr, w2_ptr, b2_ptr, C, HD, CO,
                                                 BLOCK_C, BLOCK_H, BLOCK_R)
    pre = _mm(f, w1t, dt, PREC, UPCAST, SPLIT_X, SPLIT_W) + b1[None, :]
    h = _softplus(pre)
    o_r = _mm(h, w2rt, dt, PREC, UPCAST, SPLIT_X, SPLIT_W) + b2r[None, :]
    sigma = tl.sum(h * w2s[None, :], axis=1) + b2s
    rgb = _sigmoid(o_r) * _RGB_SCALE - _RGB_SHIFT

    r = tl.arange(0, BLOCK_R)
    dst = rgb_ptr + n * M * CO + (rows * CO)[:, None] + r[None, :]
    tl.store(dst, rgb.to(rgb_ptr.dtype.element_ty), mask=row_ok[:, None] & (r < CO)[None, :])
    tl.store(sigma_ptr + n * M + rows, sigma.to(sigma_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _decode_bwd_kernel(
    grad_rgb_ptr,  # [N, M, Co] contiguous (any float dtype), or a dummy
    grad_sigma_ptr,  # [N, M] contiguous, or a dummy
    planes_ptr,  # [N, 3, H, W, C] contiguous (channels-last)
    points_ptr,  # [N, M, 3] contiguous float32
    w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    grad_planes_ptr,  # [N, 3, H, W, C] float32, zero-filled
    grad_points_ptr,  # [N, M, 3] float32
    partial_ptr,  # [programs, Hd*C + Hd + O*Hd + O] float32: per-program weight gradients
    scale, M, C, H, W, HD, CO, plane_numel, blocks_per_n, total_blocks, partial_stride,
    LAYOUT: tl.constexpr, IDX64: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT_X: tl.constexpr, SPLIT_W: tl.constexpr,
    HAS_GRGB: tl.constexpr, HAS_GSIGMA: tl.constexpr,
    NEED_PLANES: tl.constexpr, NEED_POINTS: tl.constexpr,
    NEED_W1: tl.constexpr, NEED_B1: tl.constexpr, NEED_W2: tl.constexpr, NEED_B2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
):
    dt = planes_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)

    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    j = tl.arange(0, BLOCK_H)
    j_ok = j < HD
    r = tl.arange(0, BLOCK_R)
    r_ok = r < CO

    w1t, b1, w2rt, b2r, w2s, b2s = _load_weights(w1_ptr, b1_ptr, w2_ptr, b2_ptr, C, HD, CO,
                                                 BLOCK_C, BLOCK_H, BLOCK_R)
    # The same weights untransposed, for the gradient products.
    w1 = tl.load(w1_ptr + j[:, None] * C + cols[None, :], mask=j_ok[:, None] & col_ok[None, :], other=0.0)
    w2r = tl.load(w2_ptr + (1 + r[:, None]) * HD + j[None, :], mask=r_ok[:, None] & j_ok[None, :], other=0.0)

    # Per-program weight gradient accumulators.
    acc_w1 = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    acc_b1 = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_w2r = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    acc_w2s = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_b2r = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_b2s = tl.zeros([BLOCK_M], dtype=tl.float32)  # summed at the end

    for blk in range(pid, total_blocks, num_programs):  # persistent: a stride over point blocks
        n, rows, row_ok = _row_block(blk, blocks_per_n, M, BLOCK_M, IDX64)
        p0, p1, p2 = _load_points(points_ptr, n, rows, row_ok, M)
        # ---- recompute the forward ----
        f = _gather_mean(planes_ptr, n, p0, p1, p2, row_ok, cols, col_ok, scale, C, H, W, plane_numel,
                         LAYOUT, IDX64, BLOCK_M, BLOCK_C)
        pre = _mm(f, w1t, dt, PREC, UPCAST, SPLIT_X, SPLIT_W) + b1[None, :]
        h = _softplus(pre)

        # ---- output layer ----
        if HAS_GRGB:
            o_r = _mm(h, w2rt, dt, PREC, UPCAST, SPLIT_X, SPLIT_W) + b2r[None, :]
            s = _sigmoid(o_r)
            g_rgb = tl.load(grad_rgb_ptr + n * M * CO + (rows * CO)[:, None] + r[None, :],
                            mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            g_or = g_rgb * (_RGB_SCALE * s * (1.0 - s))  # [BLOCK_M, BLOCK_R], zero when padded
            g_h = _mm(g_or, w2r, dt, PREC, UPCAST, SPLIT_X, SPLIT_W)
        else:
            g_h = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        if HAS_GSIGMA:
            g_s = tl.load(grad_sigma_ptr + n * M + rows, mask=row_ok, other=0.0).to(tl.float32)
            g_h += g_s[:, None] * w2s[None, :]
        if HAS_GRGB:
            if NEED_W2:
                acc_w2r += _mm(tl.trans(g_or), h, dt, PREC, UPCAST, SPLIT_X, SPLIT_X)
            if NEED_B2:
                acc_b2r += tl.sum(g_or, axis=0)
        if HAS_GSIGMA:
            if NEED_W2:
                acc_w2s += tl.sum(g_s[:, None] * h, axis=0)
            if NEED_B2:
                acc_b2s += g_s

        # ---- hidden layer: softplus' derivative is sigmoid(pre), 1 above the threshold ----
        g_pre = g_h * tl.where(pre > _THRESHOLD, 1.0, _sigmoid(pre))
        if NEED_W1:
            acc_w1 += _mm(tl.trans(g_pre), f, dt, PREC, UPCAST, SPLIT_X, SPLIT_X)
        if NEED_B1:
            acc_b1 += tl.sum(g_pre, axis=0)

        # ---- the sampling: gradient of the mean features ----
        if NEED_PLANES or NEED_POINTS:
            g_f = _mm(g_pre, w1, dt, PREC, UPCAST, SPLIT_X, SPLIT_W) / 3.0  # [BLOCK_M, BLOCK_C], per plane (mean)
            g0 = tl.zeros([BLOCK_M], dtype=tl.float32)
            g1 = tl.zeros([BLOCK_M], dtype=tl.float32)
            g2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            for plane in tl.static_range(3):
                pu, pv = _plane_coords(p0, p1, p2, plane, LAYOUT)
                (x0, y0, fx0, fy0, ix, iy, w_nw, w_ne, w_sw, w_se,
                 in_nw, in_ne, in_sw, in_se) = _stencil(pu, pv, scale, W, H, row_ok)
                o_nw, o_ne, o_sw, o_se = _corner_offsets(x0, y0, W, C, IDX64)
                m_nw = in_nw[:, None] & col_ok[None, :]
                m_ne = in_ne[:, None] & col_ok[None, :]
                m_sw = in_sw[:, None] & col_ok[None, :]
                m_se = in_se[:, None] & col_ok[None, :]
                plane_off = (n * 3 + plane) * plane_numel
                if NEED_PLANES:
                    dst = grad_planes_ptr + plane_off + cols[None, :]
                    tl.atomic_add(dst + o_nw[:, None], g_f * w_nw[:, None], mask=m_nw, sem="relaxed")
                    tl.atomic_add(dst + o_ne[:, None], g_f * w_ne[:, None], mask=m_ne, sem="relaxed")
                    tl.atomic_add(dst + o_sw[:, None], g_f * w_sw[:, None], mask=m_sw, sem="relaxed")
                    tl.atomic_add(dst + o_se[:, None], g_f * w_se[:, None], mask=m_se, sem="relaxed")
                if NEED_POINTS:
                    src = planes_ptr + plane_off + cols[None, :]
                    s_nw = tl.sum(g_f * tl.load(src + o_nw[:, None], mask=m_nw, other=0.0).to(tl.float32), axis=1)
                    s_ne = tl.sum(g_f * tl.load(src + o_ne[:, None], mask=m_ne, other=0.0).to(tl.float32), axis=1)
                    s_sw = tl.sum(g_f * tl.load(src + o_sw[:, None], mask=m_sw, other=0.0).to(tl.float32), axis=1)
                    s_se = tl.sum(g_f * tl.load(src + o_se[:, None], mask=m_se, other=0.0).to(tl.float32), axis=1)
                    gu, gv = _point_grads(s_nw, s_ne, s_sw, s_se, ix, iy, fx0, fy0, scale, W, H)
                    g0, g1, g2 = _add_plane_grads(g0, g1, g2, gu, gv, plane, LAYOUT)
            if NEED_POINTS:
                gpt = grad_points_ptr + n * M * 3 + rows * 3
                tl.store(gpt + 0, g0, mask=row_ok)
                tl.store(gpt + 1, g1, mask=row_ok)
                tl.store(gpt + 2, g2, mask=row_ok)

    # ---- this program's weight gradients, one row of the partial buffer ----
    # Segments: w1 [Hd, C] | b1 [Hd] | w2 [O, Hd] (row 0 = density) | b2 [O].
    base = partial_ptr + pid.to(tl.int64) * partial_stride
    if NEED_W1:
        tl.store(base + j[:, None] * C + cols[None, :], acc_w1, mask=j_ok[:, None] & col_ok[None, :])
    base += HD * C
    if NEED_B1:
        tl.store(base + j, acc_b1, mask=j_ok)
    base += HD
    if NEED_W2:
        tl.store(base + j, acc_w2s, mask=j_ok)
        tl.store(base + (1 + r[:, None]) * HD + j[None, :], acc_w2r, mask=r_ok[:, None] & j_ok[None, :])
    base += (1 + CO) * HD
    if NEED_B2:
        tl.store(base, tl.sum(acc_b2s, axis=0))
        tl.store(base + 1 + r, acc_b2r, mask=r_ok)


# ----------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------

def check_sizes(c: int, hidden: int, out: int) -> None:
    """ValueError unless C, Hd and O are within the kernels' supported ranges."""
    for name, value, (lo, hi) in (("C (plane channels)", c, C_RANGE),
                                  ("Hd (hidden units)", hidden, HIDDEN_RANGE),
                                  ("O (1 + colour channels)", out, OUT_RANGE)):
        if not lo <= value <= hi:
            raise ValueError(f"triton decode_triplanes supports {name} in [{lo}, {hi}], got {value}")


def _check(planes, w1, b1, w2, b2):
    if planes.dtype == torch.float64:
        raise NotImplementedError("triton decode_triplanes has no float64 kernel (tl.dot); "
                                  "use the torch backend for float64")
    if planes.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"planes: unsupported dtype {planes.dtype}")
    c = planes.shape[2]
    hidden, out = w1.shape[0], w2.shape[0]
    check_sizes(c, hidden, out)
    if tuple(w1.shape) != (hidden, c) or tuple(b1.shape) != (hidden,) or \
            tuple(w2.shape) != (out, hidden) or tuple(b2.shape) != (out,):
        raise ValueError(f"decoder weights do not fit: w1 {tuple(w1.shape)}, b1 {tuple(b1.shape)}, "
                         f"w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)} for C={c}")
    return c, hidden, out


def _blocks(c: int, hidden: int, out: int):
    """(BLOCK_C, BLOCK_H, BLOCK_R): channels, hidden units, colour outputs, padded."""
    return _pow2_at_least_16(c), _pow2_at_least_16(hidden), _pow2_at_least_16(out - 1)


def _block_m(block_h: int, tile: int, max_block_m: int) -> int:
    return max(MIN_BLOCK_M, min(max_block_m, tile // block_h))


def _prepare(planes, points, w1, b1, w2, b2):
    planes_cl = planes.permute(0, 1, 3, 4, 2).contiguous()
    pts = points.to(torch.float32).contiguous()
    return planes_cl, pts, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous()


def _precision(dtype: torch.dtype) -> str:
    return FP32_DOT_PRECISION if dtype == torch.float32 else "ieee"  # ignored for half operands


def _splits(planes, w1, w2):
    """(SPLIT_X, SPLIT_W): split activations (half precision planes and HALF_SPLIT) and
    weights (also when they are not in the planes' dtype, so rounding them would lose bits)."""
    split_x = planes.dtype != torch.float32 and HALF_SPLIT
    return split_x, split_x and (w1.dtype != planes.dtype or w2.dtype != planes.dtype)


def _upcast(planes: torch.Tensor) -> bool:
    """bfloat16 dots as float32 ones under the interpreter (CPU tensors), see ``_mm``."""
    return planes.dtype == torch.bfloat16 and planes.device.type != "cuda"


def forward(planes: torch.Tensor, points: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
            w2: torch.Tensor, b2: torch.Tensor, scale: float, layout: int):
    """Decoded ``(rgb [N, M, O-1], sigma [N, M, 1])`` in planes' dtype."""
    c, hidden, out = _check(planes, w1, b1, w2, b2)
    n, _, _, h, w = planes.shape
    m = points.shape[1]
    rgb = torch.empty((n, m, out - 1), dtype=planes.dtype, device=planes.device)
    sigma = torch.empty((n, m, 1), dtype=planes.dtype, device=planes.device)
    if n * m == 0:
        return rgb, sigma
    planes_cl, pts, w1c, b1c, w2c, b2c = _prepare(planes, points, w1, b1, w2, b2)
    block_c, block_h, block_r = _blocks(c, hidden, out)
    split_x, split_w = _splits(planes, w1, w2)
    block_m = _block_m(block_h, FORWARD_TILE, FORWARD_MAX_BLOCK_M)
    blocks_per_n = triton.cdiv(m, block_m)
    _decode_fwd_kernel[(n * blocks_per_n,)](
        planes_cl, pts, w1c, b1c, w2c, b2c, rgb, sigma,
        float(scale), m, c, h, w, hidden, out - 1, h * w * c, blocks_per_n,
        LAYOUT=int(layout), IDX64=_needs_int64(m, max(c, out), h, w), PREC=_precision(planes.dtype),
        UPCAST=_upcast(planes), SPLIT_X=split_x, SPLIT_W=split_w,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_R=block_r,
        num_warps=FORWARD_NUM_WARPS,
    )
    return rgb, sigma


def _backward_programs(total_blocks: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(total_blocks, sms * BACKWARD_PROGRAMS_PER_SM))
    return max(1, min(total_blocks, INTERPRETER_PROGRAMS))


def backward(grad_rgb, grad_sigma, planes, points, w1, b1, w2, b2, scale: float, layout: int, needs):
    """Gradients for (planes, points, w1, b1, w2, b2), each in its input's dtype and shape,
    None where ``needs`` says False."""
    c, hidden, out = _check(planes, w1, b1, w2, b2)
    needs = tuple(bool(x) for x in needs)
    if len(needs) != 6:
        raise ValueError(f"needs: 6 booleans expected, got {len(needs)}")
    need_planes, need_points, need_w1, need_b1, need_w2, need_b2 = needs
    n, _, _, h, w = planes.shape
    m = points.shape[1]
    device = planes.device
    if grad_rgb is not None and out - 1 == 0:
        grad_rgb = None  # no colour channels: nothing flows from it
    has_rgb, has_sigma = grad_rgb is not None, grad_sigma is not None

    grad_planes_cl = torch.zeros((n, 3, h, w, c), dtype=torch.float32, device=device) if need_planes else None
    grad_points = torch.zeros((n, m, 3), dtype=torch.float32, device=device) if need_points else None
    weights_total = hidden * c + hidden + out * hidden + out
    partial_sum = None

    if n * m > 0 and (has_rgb or has_sigma) and any(needs):
        planes_cl, pts, w1c, b1c, w2c, b2c = _prepare(planes, points, w1, b1, w2, b2)
        block_c, block_h, block_r = _blocks(c, hidden, out)
        split_x, split_w = _splits(planes, w1, w2)
        block_m = _block_m(block_h, BACKWARD_TILE, BACKWARD_MAX_BLOCK_M)
        blocks_per_n = triton.cdiv(m, block_m)
        total_blocks = n * blocks_per_n
        programs = _backward_programs(total_blocks, device)
        need_weights = need_w1 or need_b1 or need_w2 or need_b2
        partial = torch.zeros((programs if need_weights else 1, weights_total), dtype=torch.float32,
                              device=device)
        g_rgb = grad_rgb.reshape(n, m, out - 1).contiguous() if has_rgb else pts
        g_sigma = grad_sigma.reshape(n, m).contiguous() if has_sigma else pts
        dummy = pts  # stands in for a gradient buffer not asked for (never touched)
        _decode_bwd_kernel[(programs,)](
            g_rgb, g_sigma, planes_cl, pts, w1c, b1c, w2c, b2c,
            grad_planes_cl if need_planes else dummy,
            grad_points if need_points else dummy,
            partial,
            float(scale), m, c, h, w, hidden, out - 1, h * w * c, blocks_per_n, total_blocks,
            weights_total if need_weights else 0,
            LAYOUT=int(layout), IDX64=_needs_int64(m, max(c, out), h, w), PREC=_precision(planes.dtype),
            UPCAST=_upcast(planes), SPLIT_X=split_x, SPLIT_W=split_w,
            HAS_GRGB=has_rgb, HAS_GSIGMA=has_sigma,
            NEED_PLANES=need_planes, NEED_POINTS=need_points,
            NEED_W1=need_w1, NEED_B1=need_b1, NEED_W2=need_w2, NEED_B2=need_b2,
            BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_R=block_r,
            num_warps=BACKWARD_NUM_WARPS, num_stages=BACKWARD_NUM_STAGES,
        )
        if need_weights:
            partial_sum = partial.sum(dim=0)
    if partial_sum is None:
        partial_sum = torch.zeros(weights_total, dtype=torch.float32, device=device)

    g_w1, g_b1, g_w2, g_b2 = torch.split(partial_sum, [hidden * c, hidden, out * hidden, out])
    result = [
        grad_planes_cl.permute(0, 1, 4, 2, 3).to(planes.dtype) if need_planes else None,
        grad_points.to(points.dtype) if need_points else None,
        g_w1.reshape(hidden, c).to(w1.dtype) if need_w1 else None,
        g_b1.to(b1.dtype) if need_b1 else None,
        g_w2.reshape(out, hidden).to(w2.dtype) if need_w2 else None,
        g_b2.to(b2.dtype) if need_b2 else None,
    ]
    return tuple(result)


# ----------------------------------------------------------------------------------
# Self-check and benchmark: python kernels/decoding.py
# ----------------------------------------------------------------------------------

def _load_reference():
    """head4d.reference.decoding.decode_triplanes, or (head4d not importable) the same
    composition on the path-loaded reference sampler."""
    try:
        from head4d.reference.decoding import decode_triplanes
        return decode_triplanes
    except ImportError:
        import importlib.util

        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "head4d", "reference",
                            "triplanes.py")
        spec = importlib.util.spec_from_file_location("_head4d_reference_triplanes", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)

        def decode_triplanes(planes, points, w1, b1, w2, b2, box_warp, plane_layout):
            f = module.sample_triplanes(planes.float(), points, box_warp, plane_layout, "mean")
            h = torch.nn.functional.softplus(torch.nn.functional.linear(f, w1.float(), b1.float()))
            o = torch.nn.functional.linear(h, w2.float(), b2.float())
            rgb = torch.sigmoid(o[..., 1:]) * RGB_SCALE - RGB_SHIFT
            return rgb.to(planes.dtype), o[..., :1].to(planes.dtype)

        return decode_triplanes


def _self_check(device: torch.device) -> None:
    reference_decode = _load_reference()
    gen = torch.Generator().manual_seed(0)
    n, c, hid, out, h, w, m, box_warp = 2, 32, 64, 33, 12, 10, 150, 0.8
    for dtype, tol in ((torch.float32, 2e-5), (torch.float16, 3e-3), (torch.bfloat16, 1.5e-2)):
        planes = torch.randn(n, 3, c, h, w, generator=gen).to(device, dtype)
        points = ((torch.rand(n, m, 3, generator=gen) * 1.2 - 0.6) * box_warp).to(device)
        params = [torch.randn(hid, c, generator=gen) / c ** 0.5, torch.randn(hid, generator=gen) * 0.1,
                  torch.randn(out, hid, generator=gen) / hid ** 0.5, torch.randn(out, generator=gen) * 0.1]
        params = [p.to(device, dtype) for p in params]
        for layout_name, layout in (("portrait4d", 0), ("eg3d", 1)):
            inputs = [planes, points] + params
            leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
            ref_rgb, ref_sigma = reference_decode(*leaves[:2], *leaves[2:], box_warp, layout_name)
            g_rgb, g_sigma = torch.randn_like(ref_rgb), torch.randn_like(ref_sigma)
            ref_grads = torch.autograd.grad((ref_rgb, ref_sigma), leaves, (g_rgb, g_sigma))
            rgb, sigma = forward(planes, points, *params, 2.0 / box_warp, layout)
            grads = backward(g_rgb, g_sigma, planes, points, *params, 2.0 / box_warp, layout, (True,) * 6)
            names = ["rgb", "sigma", "planes", "points", "w1", "b1", "w2", "b2"]
            for name, a, b in zip(names, (rgb, sigma) + grads, (ref_rgb, ref_sigma) + ref_grads):
                err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
                assert err < tol, f"{dtype} {layout_name} {name}: rel err {err:.3g}"
        print(f"self-check {dtype}: forward and backward match the reference")


def _benchmark() -> None:
    from triton.testing import do_bench

    reference_decode = _load_reference()
    device = torch.device("cuda")
    n, c, hid, out, h, w, m = 1, 32, 64, 33, 256, 256, 128 * 128 * 96
    for dtype in (torch.float32, torch.bfloat16):
        planes = torch.randn(n, 3, c, h, w, device=device, dtype=dtype)
        points = torch.rand(n, m, 3, device=device) - 0.5
        params = [(torch.randn(hid, c, device=device) / c ** 0.5).to(dtype),
                  torch.zeros(hid, device=device, dtype=dtype),
                  (torch.randn(out, hid, device=device) / hid ** 0.5).to(dtype),
                  torch.zeros(out, device=device, dtype=dtype)]
        g_rgb = torch.randn(n, m, out - 1, device=device, dtype=dtype)
        g_sigma = torch.randn(n, m, 1, device=device, dtype=dtype)
        ms_fwd = do_bench(lambda: forward(planes, points, *params, 2.0, 0))
        ms_ref = do_bench(lambda: reference_decode(planes, points, *params, 1.0, "portrait4d"))
        ms_bwd = do_bench(lambda: backward(g_rgb, g_sigma, planes, points, *params, 2.0, 0, (True,) * 6))
        leaves = [x.clone().requires_grad_(True) for x in [planes, points] + params]

        def ref_fwd_bwd():
            r, s = reference_decode(*leaves, 1.0, "portrait4d")
            torch.autograd.grad((r, s), leaves, (g_rgb, g_sigma))

        ms_ref_fb = do_bench(ref_fwd_bwd)
        print(f"{str(dtype):>14}  planes {list(planes.shape)}  points {m}  decoder {c}-{hid}-{out}:  "
              f"forward triton {ms_fwd:.3f} ms  reference {ms_ref:.3f} ms ({ms_ref / ms_fwd:.1f}x)  |  "
              f"forward+backward triton {ms_fwd + ms_bwd:.3f} ms  reference {ms_ref_fb:.3f} ms "
              f"({ms_ref_fb / (ms_fwd + ms_bwd):.1f}x)")


if __name__ == "__main__":
    _device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if _device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 (set before Triton is imported)")
    _self_check(_device)
    if _device.type == "cuda":
        _benchmark()
