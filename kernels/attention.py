"""Triton kernels for ``attention`` (the ``triton`` backend): exact softmax attention,
FlashAttention-2 style, forward and backward.

Semantics: :func:`head4d.reference.attention.attention`, i.e.
``softmax(q k^T * scale) v`` over ``q [B, H, Lq, D]``, ``k, v [B, H, Lk, D]``.

Calling contract (used by the custom operator ``head4d::attention_triton``, head4d/ops/_library.py)::

    forward(q, k, v, scale) -> (out [B, H, Lq, D] q.dtype, lse [B, H, Lq] float32)
    backward(grad_out, q, k, v, out, lse, scale, need_dq, need_dk, need_dv)
        -> (dq | None, dk | None, dv | None)

``q``, ``k``, ``v`` and ``grad_out`` may have any strides over B, H and L; their last
dimension is made contiguous here if it is not. ``lse`` is this module's own
log-sum-exp of the scaled logits **in base 2** (``log2(sum_j 2^(s_ij log2 e))``),
the only thing besides q, k, v and out that the backward needs.

Design
------
Forward (``_attn_fwd_kernel``): a program owns ``BLOCK_M`` queries of one (batch,
head) and streams the keys and values in blocks of ``BLOCK_N``: ``s = q k^T`` (one
``tl.dot`` over the whole head dim), an online softmax in base 2 (running row max
``m`` and row sum ``l``; the float32 accumulator ``[BLOCK_M, D]`` is rescaled by
``2^(m_old - m_new)`` whenever the max grows), ``acc += p v``. It never materializes
more than a ``[BLOCK_M, BLOCK_N]`` tile of scores, writes ``acc / l`` and
``lse = m + log2(l)``.

Large head dims (256, 512): the head dim is not split across programs (that would
recompute ``q k^T`` once per output chunk, 1.5x the work at D = 512); a program keeps
the whole float32 ``[BLOCK_M, D]`` accumulator and the ``q`` tile, ``tl.dot`` walks
the contraction over D itself, and the tiles shrink instead (``FWD_CONFIG``):
``D = 256`` runs 64 x 64 tiles and ``D = 512`` 64 x 32 tiles with 8 warps, so the
accumulator takes 64 (D = 256) or 128 (D = 512) registers per thread and two stages of
K/V tiles fit in shared memory (160 and 192 KB). The backward keeps two float32
``[BLOCK_N, D]`` accumulators (dk, dv) per program, so at D = 512 it uses 32-row tiles.

Backward (recompute, no atomics, deterministic):

1. ``_attn_bwd_delta_kernel``: ``delta_i = sum_d dO_id O_id`` (float32).
2. ``_attn_bwd_dkdv_kernel``: a program owns ``BLOCK_N`` keys and streams the queries
   in blocks of ``BLOCK_M``: ``s^T = k q^T``, ``p^T = 2^(s^T log2e - lse)``,
   ``dv += p^T dO``, ``dp^T = v dO^T``, ``ds^T = p^T (dp^T - delta)``, ``dk += ds^T q``;
   ``dk`` is scaled by ``scale`` at the end. It keeps ``k``, ``v`` and two float32
   accumulators ``[BLOCK_N, D]``.
3. ``_attn_bwd_dq_kernel``: a program owns ``BLOCK_M`` queries and streams the keys:
   ``p``, ``dp = dO v^T``, ``ds = p (dp - delta)``, ``dq += ds k``, scaled at the end.

Every program writes only its own rows, so no atomics; the price is that ``p`` and
``dp`` are computed twice (once per kernel): 7 matrix products per tile instead of 5.
Kernels 2 and 3 are skipped when their gradients are not needed.

Precision: products of float16/bfloat16 tiles accumulate in float32 (``p`` and ``ds``
are rounded to the input dtype before their product, as in FlashAttention). Float32
inputs run their products through TF32 on the GPU by default (``FP32_PRECISION``;
set it to ``"ieee"`` for full float32 products, slower); under the interpreter the
products are full precision. The softmax statistics are float32 throughout.

Masks: lengths need not be multiples of the blocks; tails are masked (keys past
``Lk`` get probability 0, queries past ``Lq`` are neither stored nor counted), and
the masks are compiled out when a length is a multiple of its block.

Run this file to check it against the reference (and, with a GPU, time it against
``torch.nn.functional.scaled_dot_product_attention``).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - very old Triton
    class OutOfResources(Exception):
        pass

__all__ = ["forward", "backward", "HEAD_DIMS", "FP32_PRECISION"]

#: Head dims with compiled tiles.
HEAD_DIMS = (32, 64, 128, 256, 512)

#: ``tl.dot`` input precision for float32 inputs on the GPU: "tf32" (default, like
#: cuBLAS with TF32 enabled) or "ieee" (full float32). Ignored for 16-bit inputs.
FP32_PRECISION = os.environ.get("HEAD4D_ATTENTION_FP32_PRECISION", "tf32")

_LOG2E = 1.4426950408889634

# ----------------------------------------------------------------------------------
# Launch configuration per head dim (no autotuning: it is slow under the interpreter
# and a fixed table is what the benchmark measures). Each entry is
# (BLOCK_M, BLOCK_N, num_warps, num_stages): BLOCK_M counts queries, BLOCK_N keys.
#
# Chosen from ahead-of-time compiles for sm_90 (Triton 3.8, ptxas -v): every entry
# compiles to wgmma (except where BLOCK_M or BLOCK_N is below 64 on one side, noted)
# without register spills, within H100's 227 KB of shared memory per block; the
# comments give the compiled registers per thread and shared memory. Not yet timed
# on hardware (`python kernels/attention.py --tune` times alternatives). A GPU with
# less shared memory (A100: 163 KB) gets a smaller configuration at the first launch
# (``_launch`` shrinks stages, then tiles, on Triton's OutOfResources).
# ----------------------------------------------------------------------------------

#: forward, 16-bit inputs: a program owns BLOCK_M queries and steps over BLOCK_N keys
FWD_CONFIG = {
    32: (128, 64, 4, 3),   # 165 regs, 32 KB
    64: (128, 64, 4, 3),   # 214 regs, 64 KB
    128: (128, 64, 8, 3),  # 166 regs, 128 KB
    256: (64, 64, 8, 2),   # 200 regs, 160 KB
    512: (64, 32, 8, 2),   # 255 regs, 192 KB
}
#: dk/dv, 16-bit inputs: a program owns BLOCK_N keys and steps over BLOCK_M queries
DKDV_CONFIG = {
    32: (32, 128, 4, 3),   # 174 regs, 28 KB
    64: (64, 128, 8, 3),   # 225 regs, 81 KB
    128: (32, 128, 8, 3),  # 229 regs, 112 KB
    256: (32, 64, 8, 2),   # 255 regs, 128 KB
    512: (32, 32, 8, 2),   # 255 regs, 130 KB (mma.sync: a 32-row tile is below wgmma's 64)
}
#: dq, 16-bit inputs: a program owns BLOCK_M queries and steps over BLOCK_N keys
DQ_CONFIG = {
    32: (128, 64, 4, 3),   # 213 regs, 40 KB
    64: (128, 64, 8, 3),   # 125 regs, 80 KB
    128: (128, 32, 8, 3),  # 140 regs, 112 KB
    256: (64, 32, 8, 2),   # 182 regs, 128 KB
    512: (32, 32, 8, 2),   # 178 regs, 130 KB (mma.sync)
}
#: The same for float32 inputs (tiles take twice the bytes; products in TF32).
FWD_CONFIG_FP32 = {
    32: (128, 64, 4, 2),   # 237 regs, 48 KB
    64: (128, 64, 8, 2),   # 166 regs, 96 KB
    128: (128, 32, 8, 2),  # 167 regs, 128 KB
    256: (64, 16, 8, 2),   # 190 regs, 128 KB
    512: (32, 16, 8, 2),   # 170 regs, 130 KB (mma.sync)
}
DKDV_CONFIG_FP32 = {
    32: (32, 128, 4, 2),   # 211 regs, 44 KB
    64: (32, 128, 8, 2),   # 167 regs, 88 KB
    128: (32, 64, 8, 2),   # 191 regs, 112 KB
    256: (16, 32, 8, 2),   # 210 regs, 114 KB (mma.sync)
    512: (16, 16, 8, 2),   # 255 regs, 161 KB (mma.sync)
}
DQ_CONFIG_FP32 = {
    32: (128, 32, 4, 2),   # 185 regs, 48 KB
    64: (128, 32, 8, 2),   # 119 regs, 96 KB
    128: (64, 32, 8, 2),   # 143 regs, 128 KB
    256: (32, 16, 8, 2),   # 130 regs, 112 KB (mma.sync)
    512: (32, 16, 8, 1),   # 182 regs, 192 KB (mma.sync)
}
#: CUDA's limit on the grid's second dimension (B * H); larger launches go in chunks.
_MAX_GRID_Y = 65535


def configs(head_dim: int, dtype: torch.dtype):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward, dk/dv and dq kernels."""
    if dtype == torch.float32:
        return FWD_CONFIG_FP32[head_dim], DKDV_CONFIG_FP32[head_dim], DQ_CONFIG_FP32[head_dim]
    return FWD_CONFIG[head_dim], DKDV_CONFIG[head_dim], DQ_CONFIG[head_dim]


def _smaller(config, streamed: str):
    """The next configuration to try when ``config`` does not fit the device: one stage
    fewer, else half the streamed tile ("m" or "n"), else half the other one; None when
    nothing is left to shrink (tl.dot needs 16 rows)."""
    block_m, block_n, warps, stages = config
    if stages > 1:
        return block_m, block_n, warps, stages - 1
    first, second = ("n", "m") if streamed == "n" else ("m", "n")
    for which in (first, second):
        if which == "n" and block_n > 16:
            return block_m, block_n // 2, warps, stages
        if which == "m" and block_m > 16:
            return block_m // 2, block_n, warps, stages
    return None


#: (kernel name, head dim, dtype, device) -> the configuration that fit, once shrunk.
_FITTED: dict = {}


# ----------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------

@triton.jit
def _load_rows(base, rows, stride, cols, n_rows, EVEN: tl.constexpr):
    """A [len(rows), D] tile of rows ``rows`` (masked past ``n_rows`` unless EVEN)."""
    ptrs = base + rows[:, None] * stride + cols[None, :]
    if EVEN:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    return tile


@triton.jit
def _load_vec(base, rows, n_rows, EVEN: tl.constexpr):
    if EVEN:
        vec = tl.load(base + rows)
    else:
        vec = tl.load(base + rows, mask=rows < n_rows, other=0.0)
    return vec


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b (+ acc)`` accumulated in float32. UPCAST computes a bfloat16 product in
    float32 (the operands are bfloat16 values, so the result is the same up to the
    summation order): Triton's interpreter cannot multiply bfloat16 tiles."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # [B, H, Lq|Lk, D], unit stride over D
    o_ptr,  # [B, H, Lq, D] contiguous, q's dtype
    lse_ptr,  # [B, H, Lq] contiguous float32, base-2 log-sum-exp
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    H, Lq, Lk, qk_scale, bh_offset,  # qk_scale = scale * log2(e)
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, IDX64: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64) + bh_offset
    b = bh // H
    h = bh % H
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
        offs_n0 = offs_n0.to(tl.int64)

    q = _load_rows(q_base, offs_m, sqm, offs_d, Lq, EVEN_M)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)

    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(k_base, offs_n, skn, offs_d, Lk, EVEN_N)
        s = _mma(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N]
        if not EVEN_N:
            s = tl.where((offs_n < Lk)[None, :], s, float("-inf"))
        # Every key block holds at least one real key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        v = _load_rows(v_base, offs_n, svn, offs_d, Lk, EVEN_N)
        acc = _mma(p.to(v.dtype), v, acc, PRECISION, UPCAST)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_base = o_ptr + bh * Lq * HEAD_D
    o_ptrs = o_base + offs_m[:, None] * HEAD_D + offs_d[None, :]
    lse_ptrs = lse_ptr + bh * Lq + offs_m
    lse = m_i + tl.math.log2(l_i)
    if EVEN_M:
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty))
        tl.store(lse_ptrs, lse)
    else:
        row_ok = offs_m < Lq
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr,  # [B, H, Lq, D] contiguous
    do_ptr,  # [B, H, Lq, D], unit stride over D
    delta_ptr,  # [B, H, Lq] contiguous float32
    sdb, sdh, sdm, H, Lq, bh_offset,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_M: tl.constexpr, IDX64: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64) + bh_offset
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    offs_d = tl.arange(0, HEAD_D)
    o = _load_rows(o_ptr + bh * Lq * HEAD_D, offs_m, HEAD_D, offs_d, Lq, EVEN_M).to(tl.float32)
    do = _load_rows(do_ptr + b * sdb + h * sdh, offs_m, sdm, offs_d, Lq, EVEN_M).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    if EVEN_M:
        tl.store(delta_ptr + bh * Lq + offs_m, delta)
    else:
        tl.store(delta_ptr + bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # unit stride over D
    lse_ptr, delta_ptr,  # [B, H, Lq] contiguous float32
    dk_ptr, dv_ptr,  # [B, H, Lk, D] contiguous, k's dtype
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
    H, Lq, Lk, qk_scale, scale, bh_offset,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, IDX64: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64) + bh_offset
    b = bh // H
    h = bh % H
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sdb + h * sdh
    lse_base = lse_ptr + bh * Lq
    delta_base = delta_ptr + bh * Lq

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    if IDX64:
        offs_n = offs_n.to(tl.int64)
        offs_m0 = offs_m0.to(tl.int64)

    # Key rows past Lk load as zeros; their (finite or not) results are never stored.
    k = _load_rows(k_ptr + b * skb + h * skh, offs_n, skn, offs_d, Lk, EVEN_N)
    v = _load_rows(v_ptr + b * svb + h * svh, offs_n, svn, offs_d, Lk, EVEN_N)
    dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)

    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_rows(q_base, offs_m, sqm, offs_d, Lq, EVEN_M)
        lse = _load_vec(lse_base, offs_m, Lq, EVEN_M)
        st = _mma(k, tl.trans(q), None, PRECISION, UPCAST) * qk_scale  # [BLOCK_N, BLOCK_M]
        pt = tl.math.exp2(st - lse[None, :])
        if not EVEN_M:
            pt = tl.where((offs_m < Lq)[None, :], pt, 0.0)
        do = _load_rows(do_base, offs_m, sdm, offs_d, Lq, EVEN_M)
        dv = _mma(pt.to(do.dtype), do, dv, PRECISION, UPCAST)
        delta = _load_vec(delta_base, offs_m, Lq, EVEN_M)
        dpt = _mma(v, tl.trans(do), None, PRECISION, UPCAST)  # [BLOCK_N, BLOCK_M]
        dst = pt * (dpt - delta[None, :])
        dk = _mma(dst.to(q.dtype), q, dk, PRECISION, UPCAST)

    dk = dk * scale
    out_off = bh * Lk * HEAD_D + offs_n[:, None] * HEAD_D + offs_d[None, :]
    if EVEN_N:
        tl.store(dk_ptr + out_off, dk.to(dk_ptr.dtype.element_ty))
        tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty))
    else:
        key_ok = (offs_n < Lk)[:, None]
        tl.store(dk_ptr + out_off, dk.to(dk_ptr.dtype.element_ty), mask=key_ok)
        tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=key_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # unit stride over D
    lse_ptr, delta_ptr,  # [B, H, Lq] contiguous float32
    dq_ptr,  # [B, H, Lq, D] contiguous, q's dtype
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
    H, Lq, Lk, qk_scale, scale, bh_offset,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, IDX64: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64) + bh_offset
    b = bh // H
    h = bh % H
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
        offs_n0 = offs_n0.to(tl.int64)

    # Query rows past Lq load as zeros (q, dO, lse, delta): finite, never stored.
    q = _load_rows(q_ptr + b * sqb + h * sqh, offs_m, sqm, offs_d, Lq, EVEN_M)
    do = _load_rows(do_ptr + b * sdb + h * sdh, offs_m, sdm, offs_d, Lq, EVEN_M)
    lse = _load_vec(lse_ptr + bh * Lq, offs_m, Lq, EVEN_M)
    delta = _load_vec(delta_ptr + bh * Lq, offs_m, Lq, EVEN_M)
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)

    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(k_base, offs_n, skn, offs_d, Lk, EVEN_N)
        s = _mma(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(s - lse[:, None])
        if not EVEN_N:
            # a zero key has logit 0, which can be far above a row's lse: mask before use
            p = tl.where((offs_n < Lk)[None, :], p, 0.0)
        v = _load_rows(v_base, offs_n, svn, offs_d, Lk, EVEN_N)
        dp = _mma(do, tl.trans(v), None, PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, PRECISION, UPCAST)

    dq = dq * scale
    dq_ptrs = dq_ptr + bh * Lq * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :]
    if EVEN_M:
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty))
    else:
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=(offs_m < Lq)[:, None])


# ----------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------

def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dimension is contiguous, else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def _needs_int64(*tensors: torch.Tensor, pad: int = 256) -> bool:
    """Whether element offsets within one (batch, head) slice can reach 2**31."""
    for x in tensors:
        rows = x.shape[2] + pad
        if rows * max(x.stride(2), x.shape[3]) + x.shape[3] >= 2 ** 31:
            return True
    return False


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda":
        if FP32_PRECISION not in ("tf32", "ieee", "tf32x3"):
            raise ValueError(f"attention: FP32_PRECISION must be 'tf32', 'tf32x3' or 'ieee', got {FP32_PRECISION!r}")
        return FP32_PRECISION
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    """bfloat16 products run in float32 under the interpreter (see ``_mma``)."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _bh_chunks(bh: int):
    for start in range(0, bh, _MAX_GRID_Y):
        yield start, min(_MAX_GRID_Y, bh - start)


def _check_head_dim(d: int) -> None:
    if d not in HEAD_DIMS:
        raise ValueError(f"attention (triton): head dim {d} is not supported; supported: {HEAD_DIMS}")


def _launch(name: str, config, streamed: str, head_dim: int, dtype: torch.dtype,
            device: torch.device, run) -> None:
    """``run(config)`` launches one kernel (over every B*H chunk); when the device lacks
    the shared memory or registers for ``config`` (Triton raises before launching),
    retry with smaller ones and remember the one that fit."""
    key = (name, head_dim, dtype, str(device))
    config = _FITTED.get(key, config)
    while True:
        try:
            run(config)
            return
        except OutOfResources:
            smaller = _smaller(config, streamed)
            if smaller is None:
                raise
            config = _FITTED[key] = smaller


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """``(out [B, H, Lq, D] q.dtype contiguous, lse [B, H, Lq] float32)``, ``lse`` in base 2.

    ``q [B, H, Lq, D]``, ``k``, ``v [B, H, Lk, D]``: one floating dtype (float16,
    bfloat16, float32), one device, D in :data:`HEAD_DIMS`, Lk >= 1 when Lq >= 1."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    _check_head_dim(D)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if Lk == 0:
        raise ValueError("attention: k and v must hold at least one key (Lk >= 1)")
    idx64 = _needs_int64(q, k, v, out)
    precision, upcast = _precision(q.dtype, q.device), _upcast(q.dtype)
    qk_scale = float(scale) * _LOG2E

    def run(config):
        block_m, block_n, warps, stages = config
        for start, count in _bh_chunks(B * H):
            _attn_fwd_kernel[(triton.cdiv(Lq, block_m), count)](
                q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v),
                H, Lq, Lk, qk_scale, start,
                HEAD_D=D, BLOCK_M=block_m, BLOCK_N=block_n,
                EVEN_M=Lq % block_m == 0, EVEN_N=Lk % block_n == 0, IDX64=idx64,
                PRECISION=precision, UPCAST=upcast, num_warps=warps, num_stages=stages,
            )

    _launch("fwd", configs(D, q.dtype)[0], "n", D, q.dtype, q.device, run)
    return out, lse


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, scale: float,
             need_dq: bool = True, need_dk: bool = True, need_dv: bool = True):
    """Gradients ``(dq [B, H, Lq, D], dk [B, H, Lk, D], dv [B, H, Lk, D])``, contiguous,
    in the inputs' dtype, ``None`` for those not asked for.

    ``grad_out [B, H, Lq, D]`` (any strides; cast to q's dtype); ``out [B, H, Lq, D]`` and
    ``lse [B, H, Lq]`` float32 are :func:`forward`'s results for the same ``q``, ``k``,
    ``v`` and ``scale``."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    _check_head_dim(D)
    need_dq, need_dkdv = bool(need_dq), bool(need_dk or need_dv)
    device, dtype = q.device, q.dtype
    empty = B * H * Lq * Lk == 0
    alloc = torch.zeros if empty else torch.empty  # no queries: zero gradients
    dq = alloc((B, H, Lq, D), dtype=dtype, device=device) if need_dq else None
    dk = alloc((B, H, Lk, D), dtype=dtype, device=device) if need_dkdv else None
    dv = alloc((B, H, Lk, D), dtype=dtype, device=device) if need_dkdv else None
    if empty or not (need_dq or need_dkdv):
        return dq, (dk if need_dk else None), (dv if need_dv else None)

    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    do = _unit_last(grad_out.to(dtype))
    out = out.contiguous()
    lse = lse.contiguous()
    idx64 = _needs_int64(q, k, v, do, out)
    precision, upcast = _precision(dtype, device), _upcast(dtype)
    qk_scale = float(scale) * _LOG2E
    fwd_cfg, dkdv_cfg, dq_cfg = configs(D, dtype)

    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=device)
    block_delta = max(16, min(128, 4096 // D))
    for start, count in _bh_chunks(B * H):
        _attn_bwd_delta_kernel[(triton.cdiv(Lq, block_delta), count)](
            out, do, delta, *_strides(do), H, Lq, start,
            HEAD_D=D, BLOCK_M=block_delta, EVEN_M=Lq % block_delta == 0, IDX64=idx64,
            num_warps=4,
        )

    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))

    def run_dkdv(config):
        block_m, block_n, warps, stages = config
        for start, count in _bh_chunks(B * H):
            _attn_bwd_dkdv_kernel[(triton.cdiv(Lk, block_n), count)](
                q, k, v, do, lse, delta, dk, dv, *strides, H, Lq, Lk, qk_scale, float(scale), start,
                HEAD_D=D, BLOCK_M=block_m, BLOCK_N=block_n,
                EVEN_M=Lq % block_m == 0, EVEN_N=Lk % block_n == 0, IDX64=idx64,
                PRECISION=precision, UPCAST=upcast, num_warps=warps, num_stages=stages,
            )

    def run_dq(config):
        block_m, block_n, warps, stages = config
        for start, count in _bh_chunks(B * H):
            _attn_bwd_dq_kernel[(triton.cdiv(Lq, block_m), count)](
                q, k, v, do, lse, delta, dq, *strides, H, Lq, Lk, qk_scale, float(scale), start,
                HEAD_D=D, BLOCK_M=block_m, BLOCK_N=block_n,
                EVEN_M=Lq % block_m == 0, EVEN_N=Lk % block_n == 0, IDX64=idx64,
                PRECISION=precision, UPCAST=upcast, num_warps=warps, num_stages=stages,
            )

    if need_dkdv:
        _launch("dkdv", dkdv_cfg, "m", D, dtype, device, run_dkdv)
    if need_dq:
        _launch("dq", dq_cfg, "n", D, dtype, device, run_dq)
    return dq, (dk if need_dk else None), (dv if need_dv else None)


# ----------------------------------------------------------------------------------
# Self-check and benchmark: python kernels/attention.py
# ----------------------------------------------------------------------------------

def _load_reference():
    try:
        from head4d.reference.attention import attention
    except ImportError:  # run from a checkout without head4d installed
        import importlib.util

        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "head4d", "reference",
                            "attention.py")
        spec = importlib.util.spec_from_file_location("_head4d_reference_attention", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        attention = module.attention
    return attention


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _self_check(device: torch.device) -> None:
    reference = _load_reference()
    gen = torch.Generator().manual_seed(0)
    small = device.type == "cpu"  # the interpreter is slow
    cases = [(2, 2, 37, 19, 32), (1, 2, 70, 5, 64), (1, 1, 17, 40, 128), (1, 1, 9, 33, 256),
             (1, 1, 5, 3, 512)] if small else \
        [(2, 3, 333, 77, 32), (2, 2, 1000, 64, 64), (1, 4, 517, 1030, 128), (2, 4, 1024, 64, 256),
         (1, 2, 300, 129, 512)]
    dtypes = (torch.float32, torch.bfloat16) if small else (torch.float32, torch.float16, torch.bfloat16)
    for dtype in dtypes:
        tol = 2e-2 if dtype != torch.float32 else (1e-5 if small else 5e-3)  # TF32 on the GPU
        for b, h, lq, lk, d in cases:
            q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device, dtype) for n in (lq, lk, lk))
            scale = 1.0 / math.sqrt(d)
            out, lse = forward(q, k, v, scale)
            qr, kr, vr = (x.detach().double().requires_grad_(True) for x in (q, k, v))
            ref = reference(qr, kr, vr, scale)
            grad_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(device)
            ref_grads = torch.autograd.grad(ref, (qr, kr, vr), grad_out)
            grads = backward(grad_out.to(dtype), q, k, v, out, lse, scale)
            for name, a, r in (("out", out, ref), ("dq", grads[0], ref_grads[0]),
                               ("dk", grads[1], ref_grads[1]), ("dv", grads[2], ref_grads[2])):
                err = _rel_err(a, r)
                assert err < tol, f"{dtype} B{b} H{h} Lq{lq} Lk{lk} D{d} {name}: rel err {err:.3g}"
        print(f"self-check {dtype}: forward and backward match the reference")


#: The issue's shapes (batch 4): name -> (B, H, Lq, Lk, D).
BENCH_SHAPES = {
    "cross": (4, 4, 1024, 64, 256),
    "self": (4, 4, 1024, 1024, 256),
    "decoder": (4, 2, 16384, 4096, 512),
    "sweep-L4096-D64": (4, 16, 4096, 4096, 64),
    "sweep-L4096-D128": (4, 16, 4096, 4096, 128),
}


def _benchmark() -> None:
    from triton.testing import do_bench

    import torch.nn.functional as F

    device = torch.device("cuda")
    dtype = torch.bfloat16
    print(f"{'shape':>18} {'pass':>8} {'triton ms':>10} {'sdpa ms':>9} {'triton TF/s':>12} {'sdpa TF/s':>10}")
    for name, (b, h, lq, lk, d) in BENCH_SHAPES.items():
        q = torch.randn(b, h, lq, d, device=device, dtype=dtype)
        k = torch.randn(b, h, lk, d, device=device, dtype=dtype)
        v = torch.randn(b, h, lk, d, device=device, dtype=dtype)
        scale = 1.0 / math.sqrt(d)
        flops = 4.0 * b * h * lq * lk * d
        out, lse = forward(q, k, v, scale)
        ref = F.scaled_dot_product_attention(q, k, v, scale=scale)
        err = _rel_err(out, ref)
        assert err < 2e-2, f"{name}: forward differs from sdpa (rel err {err:.3g})"
        ms_t = do_bench(lambda: forward(q, k, v, scale))
        ms_s = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
        print(f"{name:>18} {'fwd':>8} {ms_t:10.3f} {ms_s:9.3f} {flops / ms_t * 1e-9:12.1f} "
              f"{flops / ms_s * 1e-9:10.1f}")
        grad_out = torch.randn_like(out)
        qs, ks, vs = (x.clone().requires_grad_(True) for x in (q, k, v))
        out_s = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        ms_tb = do_bench(lambda: backward(grad_out, q, k, v, out, lse, scale))
        ms_sb = do_bench(lambda: torch.autograd.grad(out_s, (qs, ks, vs), grad_out, retain_graph=True))
        print(f"{name:>18} {'bwd':>8} {ms_tb:10.3f} {ms_sb:9.3f} {2.5 * flops / ms_tb * 1e-9:12.1f} "
              f"{2.5 * flops / ms_sb * 1e-9:10.1f}")


#: Alternatives timed by ``--tune`` (16-bit inputs), per kernel and head dim; each
#: compiles for sm_90 without register spills (Triton 3.6 and 3.8).
TUNE_CANDIDATES = {
    "fwd": {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
            128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
            256: [(64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
            512: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 8, 2)]},
    "dkdv": {64: [(64, 128, 8, 3), (32, 128, 4, 3)],
             128: [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 8, 3)],
             256: [(32, 64, 8, 2), (32, 32, 8, 2)],
             512: [(32, 32, 8, 2), (32, 16, 8, 2)]},
    "dq": {64: [(128, 64, 8, 3), (64, 128, 4, 3)],
           128: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3)],
           256: [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
           512: [(32, 32, 8, 2), (32, 16, 8, 2)]},
}


def _tune() -> None:
    """Times each candidate of TUNE_CANDIDATES at the BENCH_SHAPES (bfloat16) and prints
    the fastest per kernel; paste the winners into the tables above."""
    from triton.testing import do_bench

    device = torch.device("cuda")
    tables = {"fwd": FWD_CONFIG, "dkdv": DKDV_CONFIG, "dq": DQ_CONFIG}
    for name, (b, h, lq, lk, d) in BENCH_SHAPES.items():
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16) for n in (lq, lk, lk))
        scale = 1.0 / math.sqrt(d)
        out, lse = forward(q, k, v, scale)
        grad_out = torch.randn_like(out)
        for kernel, candidates in TUNE_CANDIDATES.items():
            if d not in candidates:
                continue
            shipped = tables[kernel][d]
            results = []
            for config in candidates[d]:
                tables[kernel][d] = config
                _FITTED.clear()
                try:
                    if kernel == "fwd":
                        ms = do_bench(lambda: forward(q, k, v, scale))
                    else:
                        need_dq = kernel == "dq"
                        ms = do_bench(lambda: backward(grad_out, q, k, v, out, lse, scale,
                                                       need_dq, not need_dq, not need_dq))
                    results.append((ms, config))
                except Exception as exc:  # a config that does not fit this GPU
                    print(f"  {name} {kernel} {config}: {type(exc).__name__}")
            tables[kernel][d] = shipped
            _FITTED.clear()
            results.sort()
            print(f"{name:>18} {kernel:>5}: " + ", ".join(f"{c} {ms:.3f} ms" for ms, c in results)
                  + f"   (shipped {shipped})")


if __name__ == "__main__":
    import sys

    _device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if _device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 (set before Triton is imported)")
    _self_check(_device)
    if _device.type == "cuda":
        _benchmark()
        if "--tune" in sys.argv[1:]:
            _tune()
