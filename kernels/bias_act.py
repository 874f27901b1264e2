"""Triton kernel for ``bias_act`` (the ``triton`` backend): StyleGAN2's fused bias +
activation + gain + clamp, and its first and second derivatives.

Semantics: :func:`head4d.reference.bias_act.bias_act`. The per-element math mirrors
``csrc/bias_act/bias_act_math.h`` formula for formula (the same f, f', f'' from z, the
same order of products, the same clamp rule), so the C++/CUDA backends and this one
round alike. With ``z = x + b[c]`` and ``v = f(z) * gain``:

    order 0:  out = clamp(v, -clamp, clamp)           (no clamp when clamp < 0)
    order 1:  out = grad * gain * f'(z)   where |v| < clamp, else 0
    order 2:  out = grad * gain * f''(z)  where |v| < clamp, else 0

Calling contract (used by the custom operators ``head4d::bias_act_triton`` and
``head4d::bias_act_triton_derivative``, head4d/ops/_library.py)::

    run(x, b, grad, dim, act, order, alpha, gain, clamp) -> out

``x`` any shape (float16 / bfloat16 / float32 / float64), ``b`` ``[x.shape[dim]]`` or
None, ``grad`` like ``x`` (None for order 0); ``act`` the activation's code (the order
of the public table, head4d/reference/bias_act.py); returns x's shape and dtype,
contiguous. float16 and bfloat16 are computed in float32.

Kernel design: one program per BLOCK contiguous elements; the bias index of element k
is ``(k // inner) % C``. The activation, the derivative order and whether there is a
bias or a clamp are compile-time constants, so each launch is branch-free straight-line
code. ``alpha``, ``gain`` and ``clamp`` come in as the bit patterns of their float64
values (int64 scalars, rounded to the compute dtype in the kernel): Triton passes Python
floats as float32, which would round them for float64, and a parameter tensor would
cost a host-to-device copy per call, which a CUDA graph cannot capture.
exp, expm1, log1p and tanh are libdevice's on a GPU (the functions the CUDA kernel
calls); Triton's interpreter has no libdevice, so there they are built from exp and log
(accurate to a few ulp, see the helpers).

Run this file to check it against the reference (and, with a GPU, time it).
"""
from __future__ import annotations

import importlib.util
import os
import struct

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__ = ["run"]

#: Elements per program and warps per program (no autotuning: slow under the interpreter).
BLOCK = 1024
NUM_WARPS = 4

#: torch.nn.functional.selu's constants, and softplus's threshold (beta 1): as
#: csrc/bias_act/bias_act_math.h. The product is taken in double precision, then
#: rounded once to the compute dtype, as the C++ ``A(kSeluScale * kSeluAlpha)``.
SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717
SOFTPLUS_THRESHOLD = 20.0
_SELU_SCALE = tl.constexpr(SELU_SCALE)
_SELU_SCALE_ALPHA = tl.constexpr(SELU_SCALE * SELU_ALPHA)
_THRESHOLD = tl.constexpr(SOFTPLUS_THRESHOLD)

#: The activation codes (head4d/reference/bias_act.py's table order).
LINEAR, RELU, LRELU, TANH, SIGMOID, ELU, SELU, SOFTPLUS, SWISH = range(9)


# ----------------------------------------------------------------------------------
# Scalar functions: libdevice on a GPU, exp / log based under the interpreter.
# ----------------------------------------------------------------------------------

@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        r = libdevice.exp(x)
    else:
        r = tl.exp(x)
    return r


@triton.jit
def _expm1(x, LIBDEVICE: tl.constexpr):
    """e^x - 1 without cancellation. Portable form (Kahan): with u = e^x rounded,
    (u - 1) * x / log(u) is accurate to a few ulp; u == 1 gives x, u - 1 == -1 gives -1,
    u == inf gives inf."""
    if LIBDEVICE:
        r = libdevice.expm1(x)
    else:
        u = tl.exp(x)
        um1 = u - 1.0
        exact = (u == 1.0) | (um1 == -1.0) | (u == float("inf"))
        quotient = um1 * x / tl.log(tl.where(exact, 2.0, u))
        r = tl.where(u == 1.0, x, tl.where(exact, um1, quotient))
    return r


@triton.jit
def _log1p(t, LIBDEVICE: tl.constexpr):
    """log(1 + t) for t >= 0 without losing small t. Portable form (Goldberg): with
    u = 1 + t rounded, log(u) * t / (u - 1) corrects u's rounding; u == 1 gives t,
    u == inf gives inf."""
    if LIBDEVICE:
        r = libdevice.log1p(t)
    else:
        u = 1.0 + t
        exact = (u == 1.0) | (u == float("inf"))
        quotient = tl.log(u) * (t / tl.where(exact, 1.0, u - 1.0))
        r = tl.where(exact, tl.where(u == 1.0, t, u), quotient)
    return r


@triton.jit
def _tanh(x, LIBDEVICE: tl.constexpr):
    """tanh. Portable form: with e = expm1(-2|x|) in (-1, 0], tanh|x| = -e / (e + 2)
    (no overflow, no cancellation for small |x|), then x's sign."""
    if LIBDEVICE:
        r = libdevice.tanh(x)
    else:
        e = _expm1(-2.0 * tl.abs(x), LIBDEVICE)
        t = -e / (e + 2.0)
        r = tl.where(x < 0.0, -t, t)
    return r


@triton.jit
def _sigmoid(z, LIBDEVICE: tl.constexpr):
    return 1.0 / (1.0 + _exp(-z, LIBDEVICE))


# ----------------------------------------------------------------------------------
# Per-element math, after csrc/bias_act/bias_act_math.h.
# ----------------------------------------------------------------------------------

@triton.jit
def _activation(z, alpha, ACT: tl.constexpr, LIBDEVICE: tl.constexpr):
    """(f(z), f'(z), f''(z)) of activation ACT, in z's dtype (alpha: lrelu's slope)."""
    zero = tl.zeros_like(z)
    one = zero + 1.0
    if ACT == 1:  # relu: NaN stays NaN; the gradient passes where z > 0
        value = tl.where(z < 0.0, zero, z)
        first = tl.where(z > 0.0, one, zero)
        second = zero
    elif ACT == 2:  # lrelu
        value = tl.where(z > 0.0, z, z * alpha)
        first = tl.where(z > 0.0, one, zero + alpha)
        second = zero
    elif ACT == 3:  # tanh
        t = _tanh(z, LIBDEVICE)
        d = 1.0 - t * t
        value = t
        first = d
        second = -2.0 * t * d
    elif ACT == 4:  # sigmoid
        s = _sigmoid(z, LIBDEVICE)
        d = s * (1.0 - s)
        value = s
        first = d
        second = d * (1.0 - 2.0 * s)
    elif ACT == 5:  # elu (alpha 1): exp only of the non-positive side, as the C++ branch
        negative = tl.where(z > 0.0, zero, z)
        e = _exp(negative, LIBDEVICE)
        value = tl.where(z > 0.0, z, _expm1(negative, LIBDEVICE))
        first = tl.where(z > 0.0, one, e)
        second = tl.where(z > 0.0, zero, e)
    elif ACT == 6:  # selu
        negative = tl.where(z > 0.0, zero, z)
        e = _SELU_SCALE_ALPHA * _exp(negative, LIBDEVICE)
        value = tl.where(z > 0.0, _SELU_SCALE * z, _SELU_SCALE_ALPHA * _expm1(negative, LIBDEVICE))
        first = tl.where(z > 0.0, zero + _SELU_SCALE, e)
        second = tl.where(z > 0.0, zero, e)
    elif ACT == 7:  # softplus: z itself above the threshold
        above = z > _THRESHOLD
        below = tl.where(above, zero, z)
        s = _sigmoid(below, LIBDEVICE)
        value = tl.where(above, z, _log1p(_exp(below, LIBDEVICE), LIBDEVICE))
        first = tl.where(above, one, s)
        second = tl.where(above, zero, s * (1.0 - s))
    elif ACT == 8:  # swish: z * sigmoid(z)
        s = _sigmoid(z, LIBDEVICE)
        d = s * (1.0 - s)
        value = z * s
        first = s + z * d
        second = d * (2.0 + z * (1.0 - 2.0 * s))
    else:  # linear
        value = z
        first = one
        second = zero
    return value, first, second


@triton.jit
def _from_bits(bits, ct: tl.constexpr):
    """The float64 whose bit pattern is ``bits`` (an int32 or int64 scalar: Triton types a
    small one int32, and sign extension keeps its value), rounded to ``ct``."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(ct)


@triton.jit(do_not_specialize=["alpha_bits", "gain_bits", "clamp_bits"])
def _bias_act_kernel(
    x_ptr,  # [numel] contiguous, storage dtype
    b_ptr,  # [C] (HAS_BIAS), storage dtype
    grad_ptr,  # [numel] (ORDER > 0), storage dtype
    out_ptr,  # [numel], storage dtype
    alpha_bits, gain_bits, clamp_bits,  # float64 bit patterns
    numel, C, inner,
    ACT: tl.constexpr, ORDER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLAMP: tl.constexpr,
    COMPUTE_F64: tl.constexpr, IDX64: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr,
):
    if COMPUTE_F64:
        ct: tl.constexpr = tl.float64
    else:
        ct: tl.constexpr = tl.float32
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    alpha = _from_bits(alpha_bits, ct)
    gain = _from_bits(gain_bits, ct)
    clamp = _from_bits(clamp_bits, ct)

    z = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ct)
    if HAS_BIAS:
        channel = (offs // inner) % C
        z = z + tl.load(b_ptr + channel, mask=ok, other=0.0).to(ct)
    value, first, second = _activation(z, alpha, ACT, LIBDEVICE)
    v = value * gain
    if ORDER == 0:
        out = v
        if HAS_CLAMP:  # NaN stays NaN, as torch.clamp
            out = tl.where(v < -clamp, -clamp, tl.where(v > clamp, clamp, v))
    else:
        g = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(ct)
        if ORDER == 1:
            out = g * gain * first
        else:
            out = g * gain * second
        if HAS_CLAMP:  # no gradient where clamped, the boundary included
            out = tl.where((v < clamp) & (v > -clamp), out, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _float64_bits(value: float) -> int:
    """The bit pattern of ``value`` as a float64, as a signed 64-bit integer."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def run(x: torch.Tensor, b, grad, dim: int, act: int, order: int, alpha: float, gain: float,
        clamp: float) -> torch.Tensor:
    """``order`` 0: the activation; 1, 2: ``grad`` times its first, second derivative in x.

    Args:
        x: any shape, float16 / bfloat16 / float32 / float64, any strides.
        b: ``[x.shape[dim]]`` of x's dtype, or None.
        grad: like x (cast to x's dtype), or None for order 0.
        dim: the dimension the bias runs along, in ``[0, x.dim())``.
        act: the activation's code (0 to 8).
        order: 0, 1 or 2.
        alpha, gain: the activation's resolved parameters.
        clamp: >= 0, or negative for no clamp.

    Returns:
        x's shape and dtype, contiguous.
    """
    act, order, dim = int(act), int(order), int(dim)
    if not 0 <= act <= 8:
        raise ValueError(f"bias_act: unknown activation code {act}")
    if order not in (0, 1, 2):
        raise ValueError(f"bias_act: order must be 0, 1 or 2, got {order}")
    if order > 0 and (grad is None or grad.shape != x.shape):
        raise ValueError(f"bias_act: order {order} needs grad of x's shape {list(x.shape)}, "
                         f"got {None if grad is None else list(grad.shape)}")
    xc = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    numel = out.numel()
    if numel == 0:
        return out
    channels, inner = 1, 1
    if b is not None:
        channels = x.shape[dim]
        for size in x.shape[dim + 1:]:
            inner *= size
        b = b.contiguous()
    g = grad.to(x.dtype).contiguous() if order > 0 else None
    grid = (triton.cdiv(numel, BLOCK),)
    _bias_act_kernel[grid](
        xc, b if b is not None else xc, g if g is not None else xc, out,
        _float64_bits(alpha), _float64_bits(gain), _float64_bits(clamp), numel, channels, inner,
        ACT=act, ORDER=order, HAS_BIAS=b is not None, HAS_CLAMP=float(clamp) >= 0.0,
        COMPUTE_F64=_compute_dtype(x.dtype) == torch.float64, IDX64=numel + BLOCK >= 2 ** 31,
        LIBDEVICE=not _interpreting(), BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return out


# ----------------------------------------------------------------------------------
# Self-check and benchmark: python kernels/bias_act.py
# ----------------------------------------------------------------------------------

def _load_reference():
    try:  # the module itself: head4d.reference's own bias_act attribute is the function
        reference = importlib.import_module("head4d.reference.bias_act")
    except ImportError:  # run from a checkout without head4d installed
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "head4d", "reference",
                            "bias_act.py")
        spec = importlib.util.spec_from_file_location("_head4d_reference_bias_act", path)
        reference = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reference)
    return reference


def _self_check(device: torch.device) -> None:
    """Every activation, with and without clamp, float32 and float64: the forward and the
    first and second derivatives against the reference's autograd."""
    reference = _load_reference()
    gen = torch.Generator().manual_seed(0)
    shape, dim = (2, 5, 3, 7), 1
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 6 - 3).to(dtype).to(device)
        b = (torch.rand(shape[dim], generator=gen, dtype=torch.float64) - 0.5).to(dtype).to(device)
        grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
        for name, spec in reference.ACTIVATIONS.items():
            for clamp in (None, 1.5):
                alpha, gain, clamp_f = reference.resolve_parameters(name, None, None, clamp)
                xr = x.double().requires_grad_(True)
                ref = reference.bias_act(xr, b.double(), dim, name, None, None, clamp)
                (first,) = torch.autograd.grad(ref, xr, grad.double(), create_graph=True)
                second = (torch.autograd.grad(first, xr, grad.double())[0] if first.requires_grad
                          else torch.zeros_like(first))  # linear: f'' = 0
                got = [run(x, b, None, dim, spec.code, 0, alpha, gain, clamp_f),
                       run(x, b, grad, dim, spec.code, 1, alpha, gain, clamp_f),
                       run(x, b, grad * grad, dim, spec.code, 2, alpha, gain, clamp_f)]
                for label, a, r in zip(("forward", "first", "second"), got, (ref, first, second)):
                    err = ((a.double() - r.detach()).norm() / r.detach().norm().clamp_min(1e-30)).item()
                    assert err < tol, f"{dtype} {name} clamp {clamp} {label}: rel err {err:.3g}"
        print(f"self-check {dtype}: forward, first and second derivatives match the reference")


def _benchmark() -> None:
    from triton.testing import do_bench

    reference = _load_reference()
    device = torch.device("cuda")
    shape = (8, 512, 64, 64)
    for dtype in (torch.float16, torch.float32):
        x = (torch.randn(shape, device=device) * 100).to(dtype)
        b = torch.randn(shape[1], device=device).to(dtype)
        grad = torch.randn(shape, device=device).to(dtype)
        alpha, gain, clamp = reference.resolve_parameters("lrelu", None, None, 256.0)
        ms_fwd = do_bench(lambda: run(x, b, None, 1, LRELU, 0, alpha, gain, clamp))
        ms_bwd = do_bench(lambda: run(x, b, grad, 1, LRELU, 1, alpha, gain, clamp))
        ms_ref = do_bench(lambda: reference.bias_act(x, b, 1, "lrelu", None, None, 256.0))
        gbps = 2 * x.numel() * x.element_size() / ms_fwd * 1e-6
        print(f"{str(dtype):>14}  {list(shape)} lrelu clamp 256:  forward triton {ms_fwd:.3f} ms "
              f"({gbps:.0f} GB/s)  reference {ms_ref:.3f} ms  |  first derivative triton {ms_bwd:.3f} ms")


if __name__ == "__main__":
    _device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if _device.type == "cpu" and not _interpreting():
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 (set before Triton is imported)")
    _self_check(_device)
    if _device.type == "cuda":
        _benchmark()
