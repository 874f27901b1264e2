"""``attention``: the Triton kernels (under TRITON_INTERPRET=1 on CPU, for real on a GPU)
and the sdpa peer against the float32/float64 reference, forward and gradients of q, k
and v; edge shapes, large logits, scales, strides, errors and backend selection."""
import importlib
import math

import pytest
import torch

import head4d
from head4d import _backend
from head4d.reference.attention import attention as reference_attention

from conftest import require_backend

# the module (head4d.ops.attention, the attribute, is the function)
attention_op = importlib.import_module("head4d.ops.attention")

HEAD_DIMS = (32, 64, 128, 256, 512)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


#: Unit roundoff of float32 accumulation (every backend accumulates in float32).
U_ACC = 2.0 ** -24
#: Safety factor over the estimate of :func:`error_bounds`, which takes rounding errors
#: as independent with random signs (their sum grows as the root of the sum of squares,
#: as it does in practice) rather than adding worst cases that never line up. Measured in
#: the interpreter, errors stay within about a third of the bound with this factor.
BOUND_FACTOR = 3.0


def unit_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """Unit roundoff of what the kernels round to: float16/bfloat16 inputs, and ``p`` and
    ``ds`` before their products, are rounded to the input dtype; float32 products run as
    TF32 (10 mantissa bits) on the GPU and exactly in the interpreter."""
    if dtype == torch.float32:
        return 2.0 ** -11 if device.type == "cuda" else 2.0 ** -24
    return torch.finfo(dtype).eps / 2


def _rss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root of the sum of squares of the terms of ``a @ b``: ``sqrt(a^2 @ b^2)``, the size
    of its error when each term carries an independent relative error of 1."""
    return (a.square() @ b.square()).sqrt()


def error_bounds(q, k, v, grad_out, scale=None, device=None):
    """Frobenius-norm bounds on the error of (out, dq, dk, dv) computed from these
    (already rounded) inputs in their dtype, against exact (float64) arithmetic.

    The error analysis of blockwise softmax attention (``P = softmax(s)``,
    ``s = scale q k^T``, ``dS = P (dO v^T - rowsum(dO O))``), first order, with ``u`` the
    rounding of the dtype (:func:`unit_roundoff`) and ``u_acc`` float32 accumulation:

    * logits: ``|ds| <= |scale| (u_dot |q k| + sqrt(D) u_acc |q| |k|)`` (``u_dot``: TF32
      operands on the GPU, else 0: products of float16/bfloat16 operands are exact in
      float32), perturbing each probability by a relative ``2 max|ds|`` at most;
    * a product ``a @ b`` over a reduction of length ``L`` whose terms carry relative
      errors ``e`` (rounding of ``P`` or ``dS`` to the dtype, the probabilities' error,
      ``sqrt(L) u_acc`` for the float32 sum) errs by about ``e sqrt(a^2 @ b^2)``;
    * ``dS`` errs by ``(u + 2 max|ds|) |dS|`` plus ``P`` times the error of ``dP - rowsum(dO O)``
      (float32 sums over ``D``, and ``O`` rounded to the dtype);
    * each output is rounded once more to the dtype: ``u |result|``.

    Returns four floats: the estimate times :data:`BOUND_FACTOR`.
    """
    device = q.device if device is None else device
    d = q.shape[-1]
    lq, lk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q64, k64, v64, go64 = (t.detach().double().cpu() for t in (q, k, v, grad_out))
    kt = k64.transpose(-1, -2)
    p = torch.softmax(q64 @ kt * scale, dim=-1)
    out = p @ v64
    d_p = go64 @ v64.transpose(-1, -2)
    delta = (go64 * out).sum(-1, keepdim=True)
    d_s = p * (d_p - delta)
    dq, dk, dv = scale * d_s @ k64, scale * d_s.transpose(-1, -2) @ q64, p.transpose(-1, -2) @ go64
    u = unit_roundoff(q.dtype, device)
    u_dot = 2.0 ** -11 if (q.dtype == torch.float32 and device.type == "cuda") else 0.0
    ds_max = abs(scale) * (u_dot * _rss(q64, kt) + math.sqrt(d) * U_ACC * (q64.abs() @ kt.abs())).amax().item()
    e_p = u + 2 * ds_max  # relative error of a probability as multiplied

    def norm(t):
        return t.norm().item()

    # error of each dS element, then of dq and dk through the products with k and q
    e_ds = ((u + 2 * ds_max) * d_s.abs()
            + p * (math.sqrt(d) * U_ACC * _rss(go64, v64.transpose(-1, -2))
                   + (u + math.sqrt(d) * U_ACC) * (go64 * out).square().sum(-1, keepdim=True).sqrt()))
    acc_q, acc_k = math.sqrt(lk) * U_ACC, math.sqrt(lq) * U_ACC
    bounds = (
        (e_p + acc_q) * norm(_rss(p, v64)) + (u + 2 * ds_max) * norm(out),
        abs(scale) * (norm(_rss(e_ds, k64)) + acc_q * norm(_rss(d_s, k64))) + u * norm(dq),
        abs(scale) * (norm(_rss(e_ds.transpose(-1, -2), q64)) + acc_k * norm(_rss(d_s.transpose(-1, -2), q64)))
        + u * norm(dk),
        (e_p + acc_k) * norm(_rss(p.transpose(-1, -2), go64)) + u * norm(dv),
    )
    return tuple(BOUND_FACTOR * b for b in bounds)


def make_inputs(shape_q, lk, dtype, device, seed=0, magnitude=1.0):
    b, h, lq, d = shape_q
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen) * magnitude
    k = torch.randn(b, h, lk, d, generator=gen) * magnitude
    v = torch.randn(b, h, lk, d, generator=gen)
    grad_out = torch.randn(b, h, lq, d, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, grad_out)]


def check_against_reference(backend, q, k, v, grad_out, scale=None, check_grads=True):
    """Forward and the three gradients of ``backend`` against the float64 reference
    evaluated on the same inputs, within :func:`error_bounds`; returns the errors
    over their bounds (out, dq, dk, dv)."""
    qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = head4d.ops.attention(qs, ks, vs, scale=scale, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    qr, kr, vr = (t.detach().double().cpu().requires_grad_(True) for t in (q, k, v))
    ref = reference_attention(qr, kr, vr, scale)
    bounds = error_bounds(q, k, v, grad_out, scale)
    err = abs_err(out, ref)
    ratios = [_ratio(err, bounds[0])]
    assert err <= bounds[0], f"{backend} forward: error {err:.3g} > bound {bounds[0]:.3g}"
    if not check_grads:
        return ratios
    grads = torch.autograd.grad(out, (qs, ks, vs), grad_out)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), grad_out.double().cpu())
    for name, g, r, x, bound in zip("qkv", grads, ref_grads, (q, k, v), bounds[1:]):
        assert g.shape == x.shape and g.dtype == x.dtype
        err = abs_err(g, r)
        ratios.append(_ratio(err, bound))
        assert err <= bound, f"{backend} grad {name}: error {err:.3g} > bound {bound:.3g}"
    return ratios


def _ratio(err: float, bound: float) -> float:
    return err / bound if bound > 0 else (0.0 if err == 0 else math.inf)


def abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b|`` in the Frobenius norm, in float64 (NaN if either holds a NaN or inf)."""
    return (a.detach().double().cpu() - b.detach().double().cpu()).norm().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(1, 1, 1024, 64, 256), (1, 1, 512, 256, 512)], ids=lambda s: "x".join(map(str, s)))
def test_error_bounds_are_tight_at_the_model_shapes(shape, dtype):
    """At the reconstructor's shapes (cross-attention to 64 motion tokens, the decoder's
    head dim) the bounds stay within 32 units of roundoff of the reference's norm (TF32
    for float32 on the GPU), so a 10% error in any output, dk included, fails."""
    b, h, lq, lk, d = shape
    q, k, v, go = make_inputs((b, h, lq, d), lk, dtype, torch.device("cpu"), seed=lq + lk)
    qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
    out = reference_attention(qr, kr, vr)
    refs = (out,) + torch.autograd.grad(out, (qr, kr, vr), go.double())
    gpu = torch.device("cuda")  # the bounds a GPU run is held to (TF32 for float32)
    for name, bound, ref in zip(("out", "dq", "dk", "dv"), error_bounds(q, k, v, go, device=gpu), refs):
        relative = bound / ref.norm().item()
        assert relative < 32 * unit_roundoff(dtype, gpu) and relative < 0.1, (name, relative)


# ----------------------------------------------------------------------------------
# The reference itself.
# ----------------------------------------------------------------------------------

def test_reference_is_the_softmax_formula():
    q, k, v, _ = make_inputs((2, 3, 5, 32), 7, torch.float64, "cpu")
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1) @ v
    torch.testing.assert_close(reference_attention(q, k, v), expected)
    torch.testing.assert_close(reference_attention(q, k, v, 0.5),
                               torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v)
    half = reference_attention(q.half(), k.half(), v.half())
    assert half.dtype == torch.float16


# ----------------------------------------------------------------------------------
# Triton: every dtype and head-dim class, edge shapes.
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_triton_matches_reference(head_dim, dtype):
    """Lq 37 and Lk 70 are multiples of no block size: several key blocks (the online
    softmax rescales), several query steps in the dk/dv kernel, masked tails."""
    device = require_backend("triton")
    q, k, v, go = make_inputs((1, 2, 37, head_dim), 70, dtype, device, seed=head_dim)
    check_against_reference("triton", q, k, v, go)


@pytest.mark.parametrize("lq,lk", [
    (9, 1),      # one key: the output is v for every query, gradients of q are zero
    (300, 5),    # Lq >> Lk: cross-attention to a few motion tokens, several query blocks
    (3, 200),    # Lq << Lk: many key blocks per query block
    (128, 128),  # multiples of every block at D = 32: the unmasked paths
    (1, 1),
], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_triton_shapes(lq, lk, dtype):
    device = require_backend("triton")
    q, k, v, go = make_inputs((2, 2, lq, 32), lk, dtype, device, seed=lq * 1000 + lk)
    check_against_reference("triton", q, k, v, go)


def test_triton_one_key_gives_v():
    device = require_backend("triton")
    q, k, v, _ = make_inputs((1, 2, 11, 64), 1, torch.float32, device)
    q.requires_grad_(True)
    out = head4d.ops.attention(q, k, v, backend="triton")
    torch.testing.assert_close(out, v.expand_as(out))
    (grad_q,) = torch.autograd.grad(out.sum(), q)
    # zero in exact arithmetic (p = 1 whatever q is): what is left is rounding, within its bound
    assert abs_err(grad_q, torch.zeros_like(grad_q)) <= error_bounds(q, k, v, torch.ones_like(out))[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_triton_large_logits(dtype):
    """q and k scaled by 30: logits in the thousands; the online softmax must not overflow."""
    device = require_backend("triton")
    q, k, v, go = make_inputs((1, 2, 40, 64), 50, dtype, device, seed=3, magnitude=30.0)
    # The softmax is nearly one-hot and the gradients nearly zero: what is left is the
    # logits' float32 rounding (|logits| ~ 7,000 here) amplified through exp, which the
    # bound's delta_s term accounts for (a NaN or inf fails the comparison).
    check_against_reference("triton", q, k, v, go)


@pytest.mark.parametrize("scale", [0.3, -1.0, 0.0, 2.5])
def test_triton_custom_scale(scale):
    device = require_backend("triton")
    q, k, v, go = make_inputs((1, 3, 21, 32), 33, torch.float32, device, seed=7)
    check_against_reference("triton", q, k, v, go, scale=scale)


def test_triton_scale_zero_is_the_mean_of_v():
    device = require_backend("triton")
    q, k, v, _ = make_inputs((1, 1, 5, 32), 9, torch.float32, device)
    out = head4d.ops.attention(q, k, v, scale=0.0, backend="triton")
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(out))


def test_triton_strided_inputs():
    """q from a [B, L, H, D] projection transposed (strided over L and H), k from a
    wider buffer (non-unit stride over D), v a slice: no copies needed but for k."""
    device = require_backend("triton")
    gen = torch.Generator().manual_seed(11)
    b, h, lq, lk, d = 2, 3, 19, 13, 32
    q = torch.randn(b, lq, h, d, generator=gen).to(device).transpose(1, 2)
    k = torch.randn(b, h, lk, 2 * d, generator=gen).to(device)[..., ::2]
    v = torch.randn(b, h, lk + 4, d, generator=gen).to(device)[:, :, 2:-2]
    go = torch.randn(b, lq, h, d, generator=gen).to(device).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or go.is_contiguous())
    check_against_reference("triton", q, k, v, go)


def test_triton_partial_gradients():
    device = require_backend("triton")
    q, k, v, go = make_inputs((1, 2, 17, 32), 12, torch.float32, device, seed=5)
    qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
    ref_grads = torch.autograd.grad(reference_attention(qr, kr, vr), (qr, kr, vr), go.double())
    bounds = error_bounds(q, k, v, go)
    # only q
    qs = q.clone().requires_grad_(True)
    (grad_q,) = torch.autograd.grad(head4d.ops.attention(qs, k, v, backend="triton"), (qs,), go)
    assert abs_err(grad_q, ref_grads[0]) <= bounds[1]
    # only k and v
    ks, vs = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
    grad_k, grad_v = torch.autograd.grad(head4d.ops.attention(q, ks, vs, backend="triton"), (ks, vs), go)
    assert abs_err(grad_k, ref_grads[1]) <= bounds[2] and abs_err(grad_v, ref_grads[2]) <= bounds[3]


def test_triton_empty():
    device = require_backend("triton")
    q, k, v, _ = make_inputs((2, 2, 0, 32), 5, torch.float32, device)
    ks, vs = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
    out = head4d.ops.attention(q, ks, vs, backend="triton")
    assert out.shape == (2, 2, 0, 32)
    grad_k, grad_v = torch.autograd.grad(out.sum(), (ks, vs))
    assert torch.count_nonzero(grad_k) == 0 and torch.count_nonzero(grad_v) == 0
    q, k, v, _ = make_inputs((0, 2, 4, 32), 5, torch.float32, device)
    assert head4d.ops.attention(q, k, v, backend="triton").shape == (0, 2, 4, 32)


def test_kernel_module_head_dims_match_the_op():
    require_backend("triton")
    from head4d.kernels import attention as kernels
    assert tuple(kernels.HEAD_DIMS) == attention_op.HEAD_DIMS
    for d in kernels.HEAD_DIMS:
        for dtype in DTYPES:
            for block_m, block_n, warps, stages in kernels.configs(d, dtype):
                assert block_m >= 16 and block_n >= 16 and warps in (4, 8) and stages >= 1


def test_smaller_config_shrinks_to_a_floor():
    require_backend("triton")
    from head4d.kernels.attention import _smaller
    config, seen = (64, 32, 8, 2), []
    while config is not None:
        seen.append(config)
        config = _smaller(config, "n")
    assert seen == [(64, 32, 8, 2), (64, 32, 8, 1), (64, 16, 8, 1), (32, 16, 8, 1), (16, 16, 8, 1)]


# ----------------------------------------------------------------------------------
# The sdpa peer and the reference backend.
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("lq,lk,d", [(37, 70, 64), (50, 1, 32), (9, 16, 512)], ids=lambda x: str(x))
def test_sdpa_backend_matches_reference(lq, lk, d):
    q, k, v, go = make_inputs((2, 2, lq, d), lk, torch.float32, torch.device("cpu"), seed=lk)
    # sdpa's CPU kernel is FlashAttention-style too: with one key the gradient of k is
    # zero only up to the dP - rowsum(dO * O) cancellation, within the bound
    check_against_reference("sdpa", q, k, v, go)
    check_against_reference("sdpa", q, k, v, go, scale=0.7)


def test_torch_backend_is_the_reference():
    q, k, v, go = make_inputs((1, 2, 6, 32), 4, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(head4d.ops.attention(q, k, v, backend="torch"), reference_attention(q, k, v))
    check_against_reference("torch", q, k, v, go)


# ----------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------

def test_bad_inputs():
    q, k, v, _ = make_inputs((2, 2, 5, 32), 4, torch.float32, torch.device("cpu"))
    attn = head4d.ops.attention
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attn(q.numpy(), k, v)
    with pytest.raises(TypeError, match=r"k must have a dtype in \(float16, bfloat16, float32\)"):
        attn(q, k.long(), v)
    with pytest.raises(TypeError, match=r"q must have a dtype in \(float16, bfloat16, float32\)"):
        attn(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="v has dtype float16 but q has float32"):
        attn(q, k, v.half())
    with pytest.raises(ValueError, match=r"q must have shape \[B, H, Lq, D\]"):
        attn(q[0], k, v)
    with pytest.raises(ValueError, match="k has batch and heads"):
        attn(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="v has batch and heads"):
        attn(q, k, v[:, :1])
    with pytest.raises(ValueError, match="k has head dim 64"):
        attn(q, torch.randn(2, 2, 4, 64), v)
    with pytest.raises(ValueError, match="v has 3 keys"):
        attn(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match=r"head dim 48 .*supported head dims: \(32, 64, 128, 256, 512\)"):
        attn(torch.randn(1, 1, 3, 48), torch.randn(1, 1, 3, 48), torch.randn(1, 1, 3, 48))
    with pytest.raises(ValueError, match="at least one key"):
        attn(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(TypeError, match="scale must be a real number"):
        attn(q, k, v, scale="0.5")
    with pytest.raises(ValueError, match="scale must be finite"):
        attn(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="backend= must be one of"):
        attn(q, k, v, backend="flash")
    with pytest.raises(RuntimeError, match="backend 'cpu'"):  # not built, or not an attention backend
        attn(q, k, v, backend="cpu")
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        attn(q, k.to("meta"), v)


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_ATTENTION", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_SAMPLE_TRIPLANES", raising=False)
    # the interpreter is a test tool, not a CPU backend
    assert attention_op._resolve(cpu, None) == "torch"
    assert attention_op._resolve(cpu, "sdpa") == "sdpa"
    monkeypatch.setenv("HEAD4D_BACKEND_ATTENTION", "sdpa")
    assert attention_op._resolve(cpu, None) == "sdpa"
    assert attention_op._resolve(cpu, "torch") == "torch"  # the argument wins
    monkeypatch.delenv("HEAD4D_BACKEND_ATTENTION")
    # a process-wide peer applies to the ops that have it, and is ignored by the others
    monkeypatch.setenv("HEAD4D_BACKEND", "sdpa")
    assert attention_op._resolve(cpu, None) == "sdpa"
    triplanes_default = _backend.resolve("sample_triplanes", cpu, "auto", head4d.ops.triplanes.PREFERENCES)
    assert triplanes_default in ("cpu", "torch")
    # a process-wide backend that attention lacks leaves its default
    monkeypatch.setenv("HEAD4D_BACKEND", "torch")
    assert attention_op._resolve(cpu, None) == "torch"
    if _backend.extension() is not None:
        monkeypatch.setenv("HEAD4D_BACKEND", "cpu")
        assert attention_op._resolve(cpu, None) == "torch"
        monkeypatch.setenv("HEAD4D_BACKEND_ATTENTION", "cpu")
        with pytest.raises(RuntimeError, match="from HEAD4D_BACKEND_ATTENTION"):
            attention_op._resolve(cpu, None)
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        attention_op._resolve(cpu, "cuda")


# ----------------------------------------------------------------------------------
# GPU: the model's shapes against sdpa.
# ----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [
    (4, 4, 1024, 64, 256),   # cross-attention to 64 motion tokens
    (4, 4, 1024, 1024, 256),  # self-attention
    (1, 2, 2048, 1000, 512),  # the decoder's head dim (fewer queries)
    (2, 4, 1000, 777, 64),
    (2, 4, 513, 1030, 128),
], ids=lambda s: "x".join(map(str, s)))
def test_triton_on_gpu_against_sdpa(shape, dtype):
    device = require_backend("triton")
    b, h, lq, lk, d = shape
    q, k, v, go = make_inputs((b, h, lq, d), lk, dtype, device, seed=lq + lk)
    outs, grads = {}, {}
    for backend in ("triton", "sdpa"):
        qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
        outs[backend] = head4d.ops.attention(qs, ks, vs, backend=backend)
        grads[backend] = torch.autograd.grad(outs[backend], (qs, ks, vs), go)
    # each against the float64 reference, within the bounds of the arithmetic
    qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
    ref = reference_attention(qr, kr, vr)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), go.double())
    bounds = error_bounds(q, k, v, go)
    for backend in ("triton", "sdpa"):
        for name, got, want, bound in zip(("out", "dq", "dk", "dv"), (outs[backend],) + grads[backend],
                                          (ref,) + ref_grads, bounds):
            err = abs_err(got, want)
            assert err <= bound, f"{backend} {name}: error {err:.3g} > bound {bound:.3g}"
