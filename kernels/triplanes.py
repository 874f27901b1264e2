"""Triton kernels for ``sample_triplanes`` (the ``triton`` backend).

Semantics: :func:`head4d.reference.triplanes.sample_triplanes` (EG3D's
``sample_from_planes``); the per-point math mirrors ``csrc/triplanes/triplanes_math.h``
formula for formula, so the C++/CUDA backends and this one round alike.

Calling contract (used by the custom operator ``head4d::sample_triplanes_triton``, head4d/ops/_library.py)::

    forward(planes, points, scale, layout, reduce) -> out
    backward(grad_out, planes, points, scale, layout, reduce,
             need_grad_planes, need_grad_points) -> (grad_planes | None, grad_points | None)

``planes`` is ``[N, 3, C, H, W]`` with any strides; it is read channels-last
(``[N, 3, H, W, C]``) so that a texel's C channels are one contiguous run.
``scale`` is ``2 / box_warp``; ``layout`` 0 = portrait4d, 1 = eg3d;
``reduce`` 0 = mean, 1 = sum, 2 = none.

Kernel design: a program owns BLOCK_M points of one batch element. For each tile
of BLOCK_C channels (one tile up to 64 channels, see TILE_CONFIG) it computes every point's
bilinear stencil on each of the three planes and gathers a ``[BLOCK_M, BLOCK_C]``
tile per corner, masked by corner validity and by the channel count. The backward
kernel does both gradients in one pass: the point gradient reduces
``grad_out * corner_value`` over channels and scales it by the weights'
derivatives; the plane gradient scatters ``grad_out * weight`` with atomic adds
into a float32 (float64) channels-last buffer, cast to the planes' dtype at the end.

Run this file to check it against the reference (and, with a GPU, time it).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["forward", "backward"]

# ----------------------------------------------------------------------------------
# Launch configuration (no autotuning: it is slow under the interpreter).
# ----------------------------------------------------------------------------------

# A program holds BLOCK_M x BLOCK_C elements per tile and keeps all twelve corner
# gathers (3 planes x 4 corners) in flight; with 4 warps, 1024 float32 elements
# (8 per thread) compile for sm_90 without register spills (ptxas -v, Triton 3.8),
# and so do 512 float64 ones for the forward.
#: Per compute dtype: (largest channel tile, tile elements per program).
TILE_CONFIG = {torch.float32: (64, 1024), torch.float64: (32, 512)}
#: Bounds on BLOCK_M, the points per program.
MIN_BLOCK_M = 16
MAX_BLOCK_M = 128
FORWARD_NUM_WARPS = 4
BACKWARD_NUM_WARPS = 4
#: CUDA's limit on the grid's second dimension (the batch); larger batches launch in chunks.
_MAX_GRID_Y = 65535


def _blocks(c: int, compute: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C) for C channels; more than BLOCK_C channels loop in the program."""
    max_block_c, tile_elems = TILE_CONFIG[compute]
    block_c = min(triton.next_power_of_2(max(c, 1)), max_block_c)
    block_m = max(MIN_BLOCK_M, min(MAX_BLOCK_M, tile_elems // block_c))
    return block_m, block_c


# ----------------------------------------------------------------------------------
# Per-point math (jit helpers), after csrc/triplanes/triplanes_math.h.
# ----------------------------------------------------------------------------------

@triton.jit
def _plane_coords(p0, p1, p2, PLANE: tl.constexpr, LAYOUT: tl.constexpr):
    """The point components giving plane PLANE's (u, v): u indexes W, v indexes H."""
    if PLANE == 0:
        pu = p0
        pv = p1
    elif PLANE == 1:
        if LAYOUT == 1:  # eg3d: (x, z)
            pu = p0
        else:  # portrait4d: (y, z)
            pu = p1
        pv = p2
    else:
        pu = p2
        pv = p0
    return pu, pv


@triton.jit
def _stencil(pu, pv, scale, W, H, row_ok):
    """Bilinear footprint of scaled points (pu, pv) * scale on a W x H plane.

    Returns the north-west corner (x0, y0) as int32, its float value (fx0, fy0),
    the unnormalized position (ix, iy), the weights of the nw, ne, sw, se corners
    and their validity masks (all False where the sample is outside or NaN).
    """
    u = pu * scale
    v = pv * scale
    # grid_sample's unnormalization with align_corners=False.
    ix = ((u + 1.0) * W - 1.0) / 2.0
    iy = ((v + 1.0) * H - 1.0) / 2.0
    # Some corner is inside iff ix in [-1, W) and iy in [-1, H); NaN fails too.
    ok = row_ok & (ix >= -1.0) & (ix < W) & (iy >= -1.0) & (iy < H)
    # Keep rejected lanes finite and small so the int conversion is harmless.
    ix = tl.where(ok, ix, 0.0)
    iy = tl.where(ok, iy, 0.0)
    fx0 = tl.floor(ix)
    fy0 = tl.floor(iy)
    x0 = fx0.to(tl.int32)
    y0 = fy0.to(tl.int32)
    fx1 = fx0 + 1.0
    fy1 = fy0 + 1.0
    w_nw = (fx1 - ix) * (fy1 - iy)
    w_ne = (ix - fx0) * (fy1 - iy)
    w_sw = (fx1 - ix) * (iy - fy0)
    w_se = (ix - fx0) * (iy - fy0)
    x0_in = x0 >= 0
    x1_in = x0 + 1 <= W - 1
    y0_in = y0 >= 0
    y1_in = y0 + 1 <= H - 1
    in_nw = ok & x0_in & y0_in
    in_ne = ok & x1_in & y0_in
    in_sw = ok & x0_in & y1_in
    in_se = ok & x1_in & y1_in
    return x0, y0, fx0, fy0, ix, iy, w_nw, w_ne, w_sw, w_se, in_nw, in_ne, in_sw, in_se


@triton.jit
def _point_grads(s_nw, s_ne, s_sw, s_se, ix, iy, fx0, fy0, scale, W, H):
    """The gradient of one plane's sample with respect to the point's (pu, pv), from
    s_k = the sum over channels of grad_out times corner k's value: the corner weights'
    derivatives in ix and iy (stencil_weight_grads in csrc/triplanes/triplanes_math.h),
    times d ix / d u = W / 2 (d iy / d v = H / 2) and d u / d pu = scale."""
    fx1 = fx0 + 1.0
    fy1 = fy0 + 1.0
    g_ix = (-(fy1 - iy) * s_nw + (fy1 - iy) * s_ne
            - (iy - fy0) * s_sw + (iy - fy0) * s_se)
    g_iy = (-(fx1 - ix) * s_nw - (ix - fx0) * s_ne
            + (fx1 - ix) * s_sw + (ix - fx0) * s_se)
    return g_ix * (W * 0.5) * scale, g_iy * (H * 0.5) * scale


@triton.jit
def _add_plane_grads(g0, g1, g2, gu, gv, PLANE: tl.constexpr, LAYOUT: tl.constexpr):
    """(g0, g1, g2) plus plane PLANE's (gu, gv), each added to the point component that
    _plane_coords read it from (the transpose of _plane_coords)."""
    if PLANE == 0:
        g0 += gu
        g1 += gv
    elif PLANE == 1:
        if LAYOUT == 1:
            g0 += gu
        else:
            g1 += gu
        g2 += gv
    else:
        g2 += gu
        g0 += gv
    return g0, g1, g2


@triton.jit
def _value_without_corners(u, v):
    """A plane's sample where no corner counts (csrc/triplanes/triplanes_math.h): 0 for
    finite coordinates (all zero padding), NaN where u or v is NaN or infinite. Added
    to the bilinear sum, it leaves finite samples as they are."""
    finite = ((u - u) == 0.0) & ((v - v) == 0.0)
    return tl.where(finite, 0.0, float("nan"))


# ----------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------

@triton.jit
def _corner_offsets(x0, y0, W, C, IDX64: tl.constexpr):
    """Element offsets, within one plane, of the four corners' channel runs."""
    if IDX64:
        x0 = x0.to(tl.int64)
        y0 = y0.to(tl.int64)
    t_nw = y0 * W + x0
    o_nw = t_nw * C
    o_sw = (t_nw + W) * C
    return o_nw, o_nw + C, o_sw, o_sw + C


@triton.jit
def _triplanes_fwd_kernel(
    planes_ptr,  # [N, 3, H, W, C] contiguous (channels-last)
    points_ptr,  # [N, M, 3] contiguous, compute dtype
    out_ptr,  # [N, M, C] (reduce 0/1) or [N, 3, M, C] (reduce 2), contiguous
    scale, M, C, H, W, plane_numel, n_offset,
    LAYOUT: tl.constexpr, REDUCE: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Per-batch and per-plane bases are 64-bit scalars; offsets inside one plane or
    # one batch element's rows are 32-bit unless IDX64 (H*W*C or M*C >= 2**31).
    n = tl.program_id(1).to(tl.int64) + n_offset
    ct = points_ptr.dtype.element_ty  # compute dtype: float32, or float64

    pid_m = tl.program_id(0)
    if IDX64:
        pid_m = pid_m.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # point index in [0, M)
    row_ok = rows < M
    pt = points_ptr + n * M * 3 + rows * 3
    p0 = tl.load(pt + 0, mask=row_ok, other=0.0)
    p1 = tl.load(pt + 1, mask=row_ok, other=0.0)
    p2 = tl.load(pt + 2, mask=row_ok, other=0.0)

    cols0 = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        col_ok = cols < C
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=ct)
        for plane in tl.static_range(3):
            pu, pv = _plane_coords(p0, p1, p2, plane, LAYOUT)
            (x0, y0, fx0, fy0, ix, iy, w_nw, w_ne, w_sw, w_se,
             in_nw, in_ne, in_sw, in_se) = _stencil(pu, pv, scale, W, H, row_ok)
            src = planes_ptr + (n * 3 + plane) * plane_numel + cols[None, :]
            o_nw, o_ne, o_sw, o_se = _corner_offsets(x0, y0, W, C, IDX64)
            v_nw = tl.load(src + o_nw[:, None], mask=in_nw[:, None] & col_ok[None, :], other=0.0).to(ct)
            v_ne = tl.load(src + o_ne[:, None], mask=in_ne[:, None] & col_ok[None, :], other=0.0).to(ct)
            v_sw = tl.load(src + o_sw[:, None], mask=in_sw[:, None] & col_ok[None, :], other=0.0).to(ct)
            v_se = tl.load(src + o_se[:, None], mask=in_se[:, None] & col_ok[None, :], other=0.0).to(ct)
            val = (v_nw * w_nw[:, None] + v_ne * w_ne[:, None]
                   + v_sw * w_sw[:, None] + v_se * w_se[:, None])
            val += _value_without_corners(pu * scale, pv * scale).to(ct)[:, None]
            if REDUCE == 2:
                dst = out_ptr + ((n * 3 + plane) * M) * C + cols[None, :]
                tl.store(dst + (rows * C)[:, None], val.to(out_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & col_ok[None, :])
            else:
                acc += val
        if REDUCE != 2:
            if REDUCE == 0:
                acc = acc / 3.0
            dst = out_ptr + n * M * C + cols[None, :]
            tl.store(dst + (rows * C)[:, None], acc.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _triplanes_bwd_kernel(
    grad_out_ptr,  # like the forward's output, contiguous
    planes_ptr,  # [N, 3, H, W, C] contiguous (channels-last)
    points_ptr,  # [N, M, 3] contiguous, compute dtype
    grad_planes_ptr,  # [N, 3, H, W, C] contiguous, compute dtype, zero-filled
    grad_points_ptr,  # [N, M, 3] contiguous, compute dtype
    scale, M, C, H, W, plane_numel, n_offset,
    LAYOUT: tl.constexpr, REDUCE: tl.constexpr, IDX64: tl.constexpr,
    NEED_PLANES: tl.constexpr, NEED_POINTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64) + n_offset
    ct = points_ptr.dtype.element_ty

    pid_m = tl.program_id(0)
    if IDX64:
        pid_m = pid_m.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # point index in [0, M)
    row_ok = rows < M
    pt = points_ptr + n * M * 3 + rows * 3
    p0 = tl.load(pt + 0, mask=row_ok, other=0.0)
    p1 = tl.load(pt + 1, mask=row_ok, other=0.0)
    p2 = tl.load(pt + 2, mask=row_ok, other=0.0)

    # The point gradient, one accumulator per component.
    g0 = tl.zeros([BLOCK_M], dtype=ct)
    g1 = tl.zeros([BLOCK_M], dtype=ct)
    g2 = tl.zeros([BLOCK_M], dtype=ct)

    cols0 = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        col_ok = cols < C
        tile_ok = row_ok[:, None] & col_ok[None, :]
        if REDUCE != 2:
            src_go = grad_out_ptr + n * M * C + cols[None, :]
            go_shared = tl.load(src_go + (rows * C)[:, None], mask=tile_ok, other=0.0).to(ct)
            if REDUCE == 0:
                go_shared = go_shared / 3.0
        for plane in tl.static_range(3):
            if REDUCE == 2:
                src_go = grad_out_ptr + ((n * 3 + plane) * M) * C + cols[None, :]
                go = tl.load(src_go + (rows * C)[:, None], mask=tile_ok, other=0.0).to(ct)
            else:
                go = go_shared
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
                tl.atomic_add(dst + o_nw[:, None], go * w_nw[:, None], mask=m_nw, sem="relaxed")
                tl.atomic_add(dst + o_ne[:, None], go * w_ne[:, None], mask=m_ne, sem="relaxed")
                tl.atomic_add(dst + o_sw[:, None], go * w_sw[:, None], mask=m_sw, sem="relaxed")
                tl.atomic_add(dst + o_se[:, None], go * w_se[:, None], mask=m_se, sem="relaxed")
            if NEED_POINTS:
                src = planes_ptr + plane_off + cols[None, :]
                # per corner: the sum over channels of grad_out * corner value
                s_nw = tl.sum(go * tl.load(src + o_nw[:, None], mask=m_nw, other=0.0).to(ct), axis=1)
                s_ne = tl.sum(go * tl.load(src + o_ne[:, None], mask=m_ne, other=0.0).to(ct), axis=1)
                s_sw = tl.sum(go * tl.load(src + o_sw[:, None], mask=m_sw, other=0.0).to(ct), axis=1)
                s_se = tl.sum(go * tl.load(src + o_se[:, None], mask=m_se, other=0.0).to(ct), axis=1)
                gu, gv = _point_grads(s_nw, s_ne, s_sw, s_se, ix, iy, fx0, fy0, scale, W, H)
                g0, g1, g2 = _add_plane_grads(g0, g1, g2, gu, gv, plane, LAYOUT)

    if NEED_POINTS:
        gpt = grad_points_ptr + n * M * 3 + rows * 3
        tl.store(gpt + 0, g0, mask=row_ok)
        tl.store(gpt + 1, g1, mask=row_ok)
        tl.store(gpt + 2, g2, mask=row_ok)


# ----------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------

def _compute_dtype(planes: torch.Tensor) -> torch.dtype:
    return torch.float64 if planes.dtype == torch.float64 else torch.float32


def _prepare(planes: torch.Tensor, points: torch.Tensor, scale: float):
    """Channels-last planes, compute-dtype contiguous points, and the in-kernel scale.

    Triton passes Python floats as float32, so for float64 the points are scaled
    here (exactly the reference's ``points.double() * scale``) and the kernel's
    scale is 1.0; otherwise the kernel scales in float32, as the reference does.
    """
    compute = _compute_dtype(planes)
    planes_cl = planes.permute(0, 1, 3, 4, 2).contiguous()
    if compute == torch.float64:
        pts = (points.to(torch.float64) * float(scale)).contiguous()
        kernel_scale = 1.0
    else:
        pts = points.to(compute).contiguous()
        kernel_scale = float(scale)
    return planes_cl, pts, kernel_scale


def _needs_int64(m: int, c: int, h: int, w: int) -> bool:
    """Whether offsets within one plane or one batch element's rows can reach 2**31."""
    return max((h + 1) * (w + 1) * c, (m + MAX_BLOCK_M) * max(c, 3)) >= 2 ** 31


def _batch_chunks(n: int):
    for start in range(0, n, _MAX_GRID_Y):
        yield start, min(_MAX_GRID_Y, n - start)


def forward(planes: torch.Tensor, points: torch.Tensor, scale: float, layout: int,
            reduce: int) -> torch.Tensor:
    """Samples the planes at the points; ``[N, M, C]`` (mean, sum) or ``[N, 3, M, C]`` (none)."""
    n, _, c, h, w = planes.shape
    m = points.shape[1]
    layout, reduce = int(layout), int(reduce)
    shape = (n, 3, m, c) if reduce == 2 else (n, m, c)
    out = torch.empty(shape, dtype=planes.dtype, device=planes.device)
    if out.numel() == 0:
        return out
    planes_cl, pts, kernel_scale = _prepare(planes, points, scale)
    block_m, block_c = _blocks(c, pts.dtype)
    for start, count in _batch_chunks(n):
        grid = (triton.cdiv(m, block_m), count)
        _triplanes_fwd_kernel[grid](
            planes_cl, pts, out, kernel_scale, m, c, h, w, h * w * c, start,
            LAYOUT=layout, REDUCE=reduce, IDX64=_needs_int64(m, c, h, w),
            BLOCK_M=block_m, BLOCK_C=block_c,
            num_warps=FORWARD_NUM_WARPS,
        )
    return out


def backward(grad_out: torch.Tensor, planes: torch.Tensor, points: torch.Tensor, scale: float,
             layout: int, reduce: int, need_grad_planes: bool, need_grad_points: bool):
    """Gradients with respect to the planes (``[N, 3, C, H, W]``, planes.dtype) and the
    points (``[N, M, 3]``, points.dtype); None for the ones not asked for."""
    n, _, c, h, w = planes.shape
    m = points.shape[1]
    layout, reduce = int(layout), int(reduce)
    need_planes, need_points = bool(need_grad_planes), bool(need_grad_points)
    if not (need_planes or need_points):
        return None, None
    compute = _compute_dtype(planes)
    device = planes.device

    if need_planes:
        grad_planes_cl = torch.zeros((n, 3, h, w, c), dtype=compute, device=device)
    if need_points:
        grad_points = torch.zeros((n, m, 3), dtype=compute, device=device)

    if n * m > 0:
        planes_cl, pts, kernel_scale = _prepare(planes, points, scale)
        go = grad_out.to(planes.dtype).contiguous()
        dummy = pts  # stands in for the pointer of a gradient not asked for (never touched)
        block_m, block_c = _blocks(c, pts.dtype)
        for start, count in _batch_chunks(n):
            grid = (triton.cdiv(m, block_m), count)
            _triplanes_bwd_kernel[grid](
                go, planes_cl, pts,
                grad_planes_cl if need_planes else dummy,
                grad_points if need_points else dummy,
                kernel_scale, m, c, h, w, h * w * c, start,
                LAYOUT=layout, REDUCE=reduce, IDX64=_needs_int64(m, c, h, w),
                NEED_PLANES=need_planes, NEED_POINTS=need_points,
                BLOCK_M=block_m, BLOCK_C=block_c, num_warps=BACKWARD_NUM_WARPS,
            )

    grad_planes_out = grad_points_out = None
    if need_planes:
        grad_planes_out = grad_planes_cl.permute(0, 1, 4, 2, 3).to(planes.dtype)
    if need_points:
        if compute == torch.float64 and m > 0:
            grad_points = grad_points * float(scale)  # the kernel ran with scale 1.0
        grad_points_out = grad_points.to(points.dtype)
    return grad_planes_out, grad_points_out


# ----------------------------------------------------------------------------------
# Self-check and benchmark: python kernels/triplanes.py
# ----------------------------------------------------------------------------------

def _load_reference():
    try:
        from head4d.reference.triplanes import sample_triplanes
    except ImportError:  # run from a checkout without head4d installed
        import importlib.util

        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "head4d", "reference",
                            "triplanes.py")
        spec = importlib.util.spec_from_file_location("_head4d_reference_triplanes", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sample_triplanes = module.sample_triplanes
    return sample_triplanes


def _self_check(device: torch.device) -> None:
    reference = _load_reference()
    gen = torch.Generator().manual_seed(0)
    n, c, h, w, m, box_warp = 2, 5, 9, 7, 200, 0.8
    for dtype in (torch.float32, torch.float64):
        planes = torch.randn(n, 3, c, h, w, generator=gen, dtype=dtype).to(device)
        points = ((torch.rand(n, m, 3, generator=gen, dtype=dtype) * 1.2 - 0.6) * box_warp).to(device)
        for layout_name, layout in (("portrait4d", 0), ("eg3d", 1)):
            for reduce_name, reduce in (("mean", 0), ("sum", 1), ("none", 2)):
                pl = planes.clone().requires_grad_(True)
                pt = points.clone().requires_grad_(True)
                ref = reference(pl, pt, box_warp, layout_name, reduce_name)
                out = forward(planes, points, 2.0 / box_warp, layout, reduce)
                grad_out = torch.randn_like(ref)
                ref_gp, ref_gx = torch.autograd.grad(ref, (pl, pt), grad_out)
                gp, gx = backward(grad_out, planes, points, 2.0 / box_warp, layout, reduce, True, True)
                tol = 1e-12 if dtype == torch.float64 else 1e-5
                for name, a, b in (("out", out, ref), ("grad_planes", gp, ref_gp), ("grad_points", gx, ref_gx)):
                    err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
                    assert err < tol, f"{dtype} {layout_name} {reduce_name} {name}: rel err {err:.3g}"
        print(f"self-check {dtype}: forward and backward match the reference")


def _benchmark() -> None:
    from triton.testing import do_bench

    reference = _load_reference()
    device = torch.device("cuda")
    n, c, h, w, m = 1, 32, 256, 256, 128 * 128 * 96
    for dtype in (torch.float32, torch.float16):
        planes = torch.randn(n, 3, c, h, w, device=device, dtype=dtype)
        points = (torch.rand(n, m, 3, device=device) - 0.5) * 1.0
        ms_tri = do_bench(lambda: forward(planes, points, 2.0, 0, 0))
        ms_ref = do_bench(lambda: reference(planes, points, 1.0, "portrait4d", "mean"))
        pl = planes.clone().requires_grad_(True)
        pt = points.clone().requires_grad_(True)
        grad_out = torch.randn(n, m, c, device=device, dtype=dtype)

        def ref_fwd_bwd():
            torch.autograd.grad(reference(pl, pt, 1.0, "portrait4d", "mean"), (pl, pt), grad_out)

        ms_tri_bwd = do_bench(lambda: backward(grad_out, planes, points, 2.0, 0, 0, True, True))
        ms_ref_fb = do_bench(ref_fwd_bwd)
        print(f"{str(dtype):>14}  planes {list(planes.shape)}  points {m}:  "
              f"forward triton {ms_tri:.3f} ms  reference {ms_ref:.3f} ms  |  "
              f"backward triton {ms_tri_bwd:.3f} ms  reference forward+backward {ms_ref_fb:.3f} ms")


if __name__ == "__main__":
    _device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if _device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 (set before Triton is imported)")
    _self_check(_device)
    if _device.type == "cuda":
        _benchmark()
