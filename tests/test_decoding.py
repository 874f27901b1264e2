"""decode_triplanes (triplane sampling + the decoder MLP, fused): every compiled backend
against the reference (the unfused composition) on fresh random inputs, forward and
gradients of all six inputs, edge cases, errors; the renderer's fused path against its
unfused one (outputs, gradients, random-number order); the memory the fused path keeps
for the backward."""
import gc
import math
import warnings
import weakref

import pytest
import torch

import head4d
from head4d import _backend
from head4d.ops import decode_triplanes, generate_rays, sample_triplanes
from head4d.ops import decoding as decoding_op
from head4d.reference import decode_triplanes as reference_decode
from head4d.reference import sample_triplanes as reference_sample
from head4d.render import TriplaneDecoder, TriplaneRenderer
from head4d.render import renderer as renderer_module

from conftest import CUDA_EMULATED, require_backend

# Relative-norm error bounds ||out - ref|| / ||ref|| per dtype (as tests/test_triplanes.py).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Gradients of half-precision planes are rounded once more (the planes' gradient).
GRAD_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu), CUDA_EMULATED]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
F64 = torch.float64


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not torch.isnan(out).any(), "NaN in output"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def make_points(n, m, box_warp, *, generator, W, H, special=True):
    """Points mostly in the cube, some just outside, some far outside, plus (``special``)
    points exactly on the cube's border and on texel centres, where the bilinear
    interpolation has kinks (gradients there are compared at equal precision only)."""
    pts = (torch.rand(n, m, 3, generator=generator, dtype=F64) * 1.3 - 0.65) * box_warp
    if not special:
        return pts
    half = box_warp / 2
    special = [[half, half, half], [-half, -half, -half], [half, -half, 0.0], [5.0 * box_warp, -7.0, 3.0],
               [1e6, -1e6, 0.1], [-half, 0.0, half]]
    for j in (0, 3, W - 1):
        special.append([((2 * j + 1) / W - 1) * half, ((2 * (j % H) + 1) / H - 1) * half, 0.1])
    k = min(m, len(special))
    pts[:, :k] = torch.tensor(special[:k], dtype=F64)
    return pts


def make_inputs(n=2, m=300, c=32, h=9, w=7, hidden=64, outputs=33, box_warp=1.0, seed=0, sigma_scale=1.0,
                special=True):
    g = torch.Generator().manual_seed(seed)
    planes = torch.randn(n, 3, c, h, w, generator=g, dtype=F64)
    points = make_points(n, m, box_warp, generator=g, W=w, H=h, special=special)
    w1 = torch.randn(hidden, c, generator=g, dtype=F64) * (2.0 / math.sqrt(c))
    b1 = torch.randn(hidden, generator=g, dtype=F64) * 0.5
    w2 = torch.randn(outputs, hidden, generator=g, dtype=F64) / math.sqrt(hidden)
    b2 = torch.randn(outputs, generator=g, dtype=F64) * 0.3
    w2[0] *= sigma_scale
    return planes, points, w1, b1, w2, b2


def cast(inputs, device, dtype, points_dtype=None, weights_dtype=None):
    planes, points, w1, b1, w2, b2 = inputs
    wd = weights_dtype or (F64 if dtype == F64 else torch.float32)
    pd = points_dtype or (F64 if dtype == F64 else torch.float32)
    return (planes.to(device=device, dtype=dtype), points.to(device=device, dtype=pd),
            *(t.to(device=device, dtype=wd) for t in (w1, b1, w2, b2)))


def leaves(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def truth(inputs):
    """float64 leaf copies of the (already rounded) inputs: the reference computed on them
    is the truth the gradients are measured against."""
    return [t.detach().double().requires_grad_(True) for t in inputs]


def grads_of(outputs, inputs, grad_rgb, grad_sigma):
    rgb, sigma = outputs
    loss = (rgb.double() * grad_rgb).sum() + (sigma.double() * grad_sigma).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True)


# ----------------------------------------------------------------------------------
# The reference is the unfused composition
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["portrait4d", "eg3d"])
def test_reference_is_sample_triplanes_then_decoder(layout):
    planes, points, w1, b1, w2, b2 = make_inputs(m=50, c=8, hidden=16, outputs=5)
    rgb, sigma = reference_decode(planes, points, w1, b1, w2, b2, 1.3, layout)
    f = reference_sample(planes, points, 1.3, layout, "mean")
    h = torch.nn.functional.softplus(f @ w1.t() + b1)
    o = h @ w2.t() + b2
    assert torch.allclose(sigma, o[..., :1], rtol=1e-13, atol=1e-13)
    assert torch.allclose(rgb, torch.sigmoid(o[..., 1:]) * 1.002 - 0.001, rtol=1e-13, atol=1e-13)
    # the softplus switches to the identity above 20, as torch's
    big = reference_decode(planes, points, w1 * 0, b1 * 0 + 25, w2, b2, 1.3, layout)[1]
    assert torch.allclose(big, (25 * w2[0].sum() + b2[0]).expand_as(big), rtol=1e-12)


@pytest.mark.parametrize("variant", ["eg3d", "portrait4d"])
def test_effective_weights_reproduce_the_decoder(variant):
    """TriplaneDecoder.effective_weights (StyleGAN2's gains applied, Portrait4D's two heads
    stacked density first) through decode_triplanes = sample_triplanes then the decoder."""
    torch.manual_seed(0)
    decoder = TriplaneDecoder(n_features=8, hidden=16, out_features=5, variant=variant, lr_multiplier=0.3).double()
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_()
    planes, points = make_inputs(m=60, c=8, seed=3)[:2]
    weights = decoder.effective_weights()
    assert [tuple(w.shape) for w in weights] == [(16, 8), (16,), (6, 16), (6,)]
    expected = decoder(head4d.sample_triplanes(planes, points, box_warp=1.3, plane_layout="eg3d"))
    for backend in ("torch", "cpu"):
        if backend == "cpu":
            require_backend("cpu")
        rgb, sigma = decode_triplanes(planes, points, *weights, box_warp=1.3, plane_layout="eg3d", backend=backend)
        assert torch.allclose(rgb, expected["rgb"], rtol=1e-12, atol=1e-12)
        assert torch.allclose(sigma, expected["sigma"], rtol=1e-12, atol=1e-12)
    # differentiable with respect to the parameters: autograd's Jacobian against finite
    # differences, in float64
    class Effective(torch.nn.Module):
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self):
            return self.decoder.effective_weights()

    wrapper = Effective(decoder)
    names = [name for name, _ in wrapper.named_parameters()]

    def effective(*values):
        return torch.func.functional_call(wrapper, dict(zip(names, values)), ())

    assert torch.autograd.gradcheck(effective, tuple(p.detach().clone().requires_grad_(True)
                                                     for p in wrapper.parameters()))


# ----------------------------------------------------------------------------------
# Compiled backends against the reference
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["portrait4d", "eg3d"])
def test_forward_matches_reference(backend, dtype, layout):
    device = require_backend(backend)
    inputs = cast(make_inputs(box_warp=1.3, seed=1), device, dtype)
    rgb, sigma = decode_triplanes(*inputs, box_warp=1.3, plane_layout=layout, backend=backend)
    ref_rgb, ref_sigma = reference_decode(*inputs, 1.3, layout)
    assert rgb.dtype == dtype and sigma.dtype == dtype
    assert rgb.shape == (2, 300, 32) and sigma.shape == (2, 300, 1)
    assert rel_err(rgb, ref_rgb) <= TOLERANCE[dtype]
    assert rel_err(sigma, ref_sigma) <= TOLERANCE[dtype]
    # points outside the cube decode the zero feature: softplus(b1) -> W2 . + b2. Both sides
    # round colours of magnitude <= 1.002 once to the dtype from float32 (float64) sums
    # over the hidden units: 2 u(dtype) + hidden * u(compute) * (the largest term, |w2| |h|)
    zero = reference_decode(inputs[0], inputs[1][:, 4:5] * 0 + 1e6, *inputs[2:], 1.3, layout)
    compute = F64 if dtype == F64 else torch.float32
    h0 = torch.nn.functional.softplus(inputs[3].double())
    largest_term = (inputs[4].double().abs() * h0.abs()).max().item()
    atol = (torch.finfo(dtype).eps * 1.002 + inputs[2].shape[0] * torch.finfo(compute).eps / 2 * largest_term)
    assert torch.allclose(rgb[:, 4:5].double(), zero[0].double(), rtol=0, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", [(5, 7, 4), (1, 1, 1), (33, 128, 64), (64, 3, 37), (12, 20, 2)])
def test_odd_sizes(backend, sizes):
    """C, hidden and 1 + Co off the hot case: padding of the per-point arrays (and, on
    CUDA, of the channels), the largest sizes, and no rgb at all (1 + Co = 1)."""
    device = require_backend(backend)
    c, hidden, outputs = sizes
    inputs = make_inputs(m=40, c=c, hidden=hidden, outputs=outputs, seed=c, special=False)
    for dtype in (F64, torch.float32, torch.float16):
        x = leaves(cast(inputs, device, dtype))
        out = decode_triplanes(*x, backend=backend)
        assert out[0].shape == (2, 40, outputs - 1)
        for a, b in zip(out, reference_decode(*x, 1.0, "portrait4d")):
            assert rel_err(a, b) <= TOLERANCE[dtype]
        ref_x = truth(x)
        ref = reference_decode(*ref_x, 1.0, "portrait4d")
        g = torch.Generator().manual_seed(3)
        grad_rgb = torch.randn(2, 40, outputs - 1, generator=g, dtype=F64).to(device)
        grad_sigma = torch.randn(2, 40, 1, generator=g, dtype=F64).to(device)
        got = grads_of(out, x, grad_rgb, grad_sigma)
        want = grads_of(ref, ref_x, grad_rgb, grad_sigma)
        for name, a, b in zip(("planes", "points", "w1", "b1", "w2", "b2"), got, want):
            assert rel_err(a, b) <= GRAD_TOLERANCE[dtype], (dtype, name, rel_err(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["portrait4d", "eg3d"])
def test_gradients_match_reference(backend, dtype, layout):
    device = require_backend(backend)
    inputs = cast(make_inputs(m=200, seed=2, special=False), device, dtype)
    x = leaves(inputs)
    ref_x = truth(inputs)
    out = decode_triplanes(*x, plane_layout=layout, backend=backend)
    ref = reference_decode(*ref_x, 1.0, layout)
    g = torch.Generator().manual_seed(4)
    grad_rgb = torch.randn(2, 200, 32, generator=g, dtype=F64).to(device)
    grad_sigma = torch.randn(2, 200, 1, generator=g, dtype=F64).to(device)
    got = grads_of(out, x, grad_rgb, grad_sigma)
    want = grads_of(ref, ref_x, grad_rgb, grad_sigma)
    for name, a, b, t in zip(("planes", "points", "w1", "b1", "w2", "b2"), got, want, x):
        assert a.dtype == t.dtype and a.shape == t.shape
        assert rel_err(a, b) <= GRAD_TOLERANCE[dtype], (name, rel_err(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_gradients_special_points(backend, dtype):
    """On the cube's border, on texel centres and far outside, against the reference at
    the same precision (the same side of every kink)."""
    device = require_backend(backend)
    inputs = cast(make_inputs(m=12, seed=10), device, dtype)
    x, ref_x = leaves(inputs), leaves(inputs)
    got = torch.autograd.grad(sum(t.square().sum() for t in decode_triplanes(*x, backend=backend)), x)
    want = torch.autograd.grad(sum(t.square().sum() for t in reference_decode(*ref_x, 1.0, "portrait4d")), ref_x)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= GRAD_TOLERANCE[dtype]
    assert torch.all(got[1][:, 4] == 0)  # far outside: no gradient for the point


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_one_output_and_of_some_inputs(backend):
    """Only rgb or only sigma used; only some inputs requiring grad (the others get None
    and are not computed)."""
    device = require_backend(backend)
    inputs = cast(make_inputs(m=120, seed=5), device, torch.float32)
    for which in ("rgb", "sigma"):
        x, ref_x = leaves(inputs), leaves(inputs)
        out = decode_triplanes(*x, backend=backend)
        ref = reference_decode(*ref_x, 1.0, "portrait4d")
        pick = 0 if which == "rgb" else 1
        got = torch.autograd.grad(out[pick].square().sum(), x)
        want = torch.autograd.grad(ref[pick].square().sum(), ref_x, allow_unused=True)
        for a, b in zip(got, want):
            b = torch.zeros_like(a) if b is None else b  # sigma does not depend on w2[1:]
            assert rel_err(a, b) <= GRAD_TOLERANCE[torch.float32]
    for mask in [(True, False, False, False, False, False), (False, True, False, False, False, False),
                 (False, False, True, False, False, True), (False, False, False, True, True, False)]:
        x = [t.detach().clone().requires_grad_(need) for t, need in zip(inputs, mask)]
        ref_x = [t.detach().clone().requires_grad_(need) for t, need in zip(inputs, mask)]
        out = decode_triplanes(*x, backend=backend)
        ref = reference_decode(*ref_x, 1.0, "portrait4d")
        (out[0].sum() + 2 * out[1].sum()).backward()
        (ref[0].sum() + 2 * ref[1].sum()).backward()
        for t, r, need in zip(x, ref_x, mask):
            assert (t.grad is not None) == need
            if need:
                assert rel_err(t.grad, r.grad) <= GRAD_TOLERANCE[torch.float32]


def test_gradcheck_float64():
    require_backend("cpu")
    g = torch.Generator().manual_seed(6)
    planes = torch.randn(2, 3, 4, 5, 4, generator=g, dtype=F64)
    points = torch.rand(2, 7, 3, generator=g, dtype=F64) * 1.2 - 0.6
    points[0, 0] = torch.tensor([3.0, 0.1, -0.2], dtype=F64)  # outside: zero feature, zero point gradient
    w1 = torch.randn(3, 4, generator=g, dtype=F64)
    b1 = torch.randn(3, generator=g, dtype=F64)
    w2 = torch.randn(3, 3, generator=g, dtype=F64)
    b2 = torch.randn(3, generator=g, dtype=F64)
    x = leaves((planes, points, w1, b1, w2, b2))
    for layout in ("portrait4d", "eg3d"):
        assert torch.autograd.gradcheck(
            lambda *t: decode_triplanes(*t, box_warp=1.1, plane_layout=layout, backend="cpu"), x,
            eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_mixed_dtypes(backend):
    device = require_backend(backend)
    planes, points, w1, b1, w2, b2 = make_inputs(m=100, seed=7)
    # channels-last planes (a permuted view), strided points, transposed weights, and
    # weights / points in other dtypes than the planes
    planes_cl = planes.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3).to(device)
    points_wide = torch.cat([points, points], dim=1)[:, ::2].to(device)
    w1_t = w1.t().contiguous().t().to(device)
    w2_t = w2.t().contiguous().t().to(device)
    b1_s = torch.stack([b1, b1], 1)[:, 0].to(device)
    assert not planes_cl.is_contiguous() and not points_wide.is_contiguous() and not w1_t.is_contiguous()
    for dtype, pd, wd in [(F64, F64, F64), (torch.float32, F64, torch.float32),
                          (torch.bfloat16, torch.float32, torch.float32), (torch.float32, torch.float32, F64)]:
        args = [planes_cl.to(dtype), points_wide.to(pd), w1_t.to(wd), b1_s.to(wd), w2_t.to(wd), b2.to(device, wd)]
        x = [a.detach().requires_grad_(True) for a in args]  # leaves with the views' strides
        out = decode_triplanes(*x, backend=backend)
        ref = reference_decode(*[t.detach().contiguous() for t in args], 1.0, "portrait4d")
        for a, b in zip(out, ref):
            assert rel_err(a, b) <= TOLERANCE[dtype]
        grads = torch.autograd.grad(out[0].sum() + out[1].sum(), x)
        ref_x = [t.detach().contiguous().requires_grad_(True) for t in args]
        ref = reference_decode(*ref_x, 1.0, "portrait4d")
        want = torch.autograd.grad(ref[0].sum() + ref[1].sum(), ref_x)
        for t, gr, w in zip(x, grads, want):
            assert gr.dtype == t.dtype and gr.shape == t.shape
            assert rel_err(gr, w) <= GRAD_TOLERANCE[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_zero_gradients(backend):
    device = require_backend(backend)
    planes, points, w1, b1, w2, b2 = cast(make_inputs(m=10), device, torch.float32)
    x = leaves((planes, points[:, :0], w1, b1, w2, b2))
    rgb, sigma = decode_triplanes(*x, backend=backend)
    assert rgb.shape == (2, 0, 32) and sigma.shape == (2, 0, 1)
    grads = torch.autograd.grad(rgb.sum() + sigma.sum(), x)
    assert all(torch.all(gr == 0) for gr in grads) and grads[0].shape == planes.shape
    # a zero incoming gradient gives zero gradients
    x = leaves((planes, points, w1, b1, w2, b2))
    rgb, sigma = decode_triplanes(*x, backend=backend)
    grads = torch.autograd.grad((rgb * 0).sum(), x)
    assert all(torch.all(gr == 0) for gr in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_backward_many_points(backend):
    """More points than one backward chunk (2^16), a chunk straddling two batch elements:
    the chunks' weight and plane gradients add up."""
    device = require_backend(backend)
    inputs = cast(make_inputs(n=2, m=40_000, c=4, h=6, w=6, hidden=8, outputs=4, seed=8, special=False), device,
                  torch.float32)
    x, ref_x = leaves(inputs), truth(inputs)
    out = decode_triplanes(*x, backend=backend)
    ref = reference_decode(*ref_x, 1.0, "portrait4d")
    got = torch.autograd.grad(out[0].sum() + out[1].sum(), x)
    want = torch.autograd.grad(ref[0].sum() + ref[1].sum(), ref_x)
    for a, b in zip(got, want):  # float32 sums of 70,000 terms against float64
        assert rel_err(a, b) <= 5e-5


# ----------------------------------------------------------------------------------
# Errors, backend choice, fallback
# ----------------------------------------------------------------------------------

def test_errors():
    planes, points, w1, b1, w2, b2 = cast(make_inputs(m=5, c=8, hidden=16, outputs=4), "cpu", torch.float32)
    ok = (planes, points, w1, b1, w2, b2)

    def call(*replace, **kwargs):
        args = list(ok)
        for i, v in replace:
            args[i] = v
        return decode_triplanes(*args, **kwargs)

    cases = [
        ((0, planes[0]), ValueError, "planes must have shape \\[N, 3, C, H, W\\]"),
        ((0, planes[:, :2]), ValueError, "planes must have shape \\[N, 3, C, H, W\\] with 3 planes"),
        ((1, points[..., :2]), ValueError, "points must have shape \\[N, M, 3\\]"),
        ((1, points[:1]), ValueError, "points has batch size 1"),
        ((2, w1[:, :5]), ValueError, "weight1 must have shape \\[hidden, C\\] = \\[hidden, 8\\]"),
        ((3, b1[:3]), ValueError, "bias1 must have shape \\[hidden\\] = \\[16\\]"),
        ((4, w2[:, :3]), ValueError, "weight2 must have shape \\[1 \\+ Co, hidden\\] = \\[1 \\+ Co, 16\\]"),
        ((5, b2[:2]), ValueError, "bias2 must have shape \\[1 \\+ Co\\] = \\[4\\]"),
        ((0, planes.int()), TypeError, "planes must have a dtype in"),
        ((3, b1.long()), TypeError, "bias1 must have a dtype in"),
        ((2, [[1.0]]), TypeError, "weight1 must be a torch.Tensor"),
    ]
    for (i, v), exc, match in cases:
        with pytest.raises(exc, match=match):
            call((i, v))
    big = torch.zeros(1, 3, 65, 2, 2)
    with pytest.raises(ValueError, match="at most 64 channels"):
        decode_triplanes(big, points[:1], torch.zeros(4, 65), torch.zeros(4), torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="1 to 128 rows"):
        call((2, torch.zeros(129, 8)), (3, torch.zeros(129)), (4, torch.zeros(4, 129)))
    with pytest.raises(ValueError, match="at most 64 rows"):
        call((4, torch.zeros(65, 16)), (5, torch.zeros(65)))
    with pytest.raises(ValueError, match="box_warp"):
        call(box_warp=0.0)
    with pytest.raises(ValueError, match="plane_layout must be one of"):
        call(plane_layout="xy")
    with pytest.raises(ValueError, match="backend= must be one of"):
        call(backend="opencl")
    with pytest.raises(RuntimeError, match="backend 'cuda' .* cannot run"):
        call(backend="cuda")


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_DECODE_TRIPLANES", raising=False)
    cpu = torch.device("cpu")
    expected = "cpu" if _backend.extension() is not None else "torch"
    assert decoding_op.resolve_backend(cpu) == expected
    monkeypatch.setenv("HEAD4D_BACKEND", "torch")
    assert decoding_op.resolve_backend(cpu) == "torch"
    monkeypatch.setenv("HEAD4D_BACKEND_DECODE_TRIPLANES", "cpu")
    assert decoding_op.resolve_backend(cpu) == expected or _backend.extension() is None
    monkeypatch.setenv("HEAD4D_BACKEND_DECODE_TRIPLANES", "bogus")
    with pytest.raises(ValueError, match="HEAD4D_BACKEND_DECODE_TRIPLANES must be one of"):
        decoding_op.resolve_backend(cpu)


# Inputs the op accepts but the triton backend has no kernel for: (what, make_inputs
# arguments, dtype, a word of the reason).
TRITON_UNSUPPORTED = [
    ("float64", dict(c=32, hidden=64, outputs=33), torch.float64, "float64"),
    ("C=4", dict(c=4, hidden=64, outputs=33), torch.float32, "C"),
    ("hidden=8", dict(c=32, hidden=8, outputs=33), torch.float32, "hidden"),
]


@pytest.mark.parametrize("what,sizes,dtype,word", TRITON_UNSUPPORTED, ids=[t[0] for t in TRITON_UNSUPPORTED])
def test_forced_triton_raises_the_reason(what, sizes, dtype, word, monkeypatch):
    """Forcing ``triton`` (argument, per-op or process-wide variable) on inputs it cannot
    run raises RuntimeError naming the backend and why, before any kernel runs."""
    device = require_backend("triton")
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_DECODE_TRIPLANES", raising=False)
    inputs = cast(make_inputs(m=5, **sizes), device, dtype)
    with pytest.raises(RuntimeError, match=f"backend 'triton' \\(from backend=\\) does not support.*{word}"):
        decode_triplanes(*inputs, backend="triton")
    for variable in ("HEAD4D_BACKEND_DECODE_TRIPLANES", "HEAD4D_BACKEND"):
        monkeypatch.setenv(variable, "triton")
        with pytest.raises(RuntimeError, match=f"backend 'triton' \\(from {variable}\\) does not support"):
            decode_triplanes(*inputs)
        monkeypatch.delenv(variable)


@pytest.mark.parametrize("what,sizes,dtype,word", TRITON_UNSUPPORTED, ids=[t[0] for t in TRITON_UNSUPPORTED])
def test_default_skips_triton_for_inputs_it_cannot_run(what, sizes, dtype, word, monkeypatch):
    """On CUDA without the extension the default order reaches ``triton``; for inputs it
    has no kernel for, the default must take the next backend (the reference), not crash.
    Emulated here with CUDA's preference order on CPU tensors (``cuda`` cannot run
    them, ``triton`` runs in the interpreter)."""
    device = require_backend("triton")
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_DECODE_TRIPLANES", raising=False)
    monkeypatch.setitem(decoding_op.PREFERENCES, device.type, ("cuda", "triton", "torch"))
    inputs = cast(make_inputs(m=7, **sizes, seed=3), device, dtype)
    assert decoding_op.resolve_backend(device, None, inputs) == "torch"
    assert decoding_op.resolve_backend(device, None) == "triton"  # without inputs, no predicate is asked
    supported = cast(make_inputs(m=7, c=32, hidden=64, outputs=33, seed=3), device, torch.float32)
    assert decoding_op.resolve_backend(device, None, supported) == "triton"
    out = decode_triplanes(*inputs)
    ref = reference_decode(*inputs, 1.0, "portrait4d")
    for a, b in zip(out, ref):
        assert torch.equal(a, b)  # the reference itself ran


def test_triton_smoke():
    """One small case through head4d.kernels.decoding; an error in that module fails."""
    device = require_backend("triton")
    inputs = cast(make_inputs(m=64, c=32, hidden=64, outputs=33, seed=9), device, torch.float32)
    x, ref_x = leaves(inputs), leaves(inputs)
    out = decode_triplanes(*x, backend="triton")
    ref = reference_decode(*ref_x, 1.0, "portrait4d")
    for a, b in zip(out, ref):
        assert rel_err(a, b) <= 1e-4
    got = torch.autograd.grad(out[0].sum() + out[1].sum(), x)
    want = torch.autograd.grad(ref[0].sum() + ref[1].sum(), ref_x)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-4


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_DECODE_TRIPLANES", raising=False)
    monkeypatch.setattr(_backend, "_load_extension", lambda: (None, ImportError("no _C here")))
    monkeypatch.setattr(_backend, "_warned", set())
    inputs = cast(make_inputs(m=20, c=4, hidden=8, outputs=4), "cpu", torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = decode_triplanes(*inputs)
        out2 = decode_triplanes(*inputs)
    messages = [str(w.message) for w in caught if "head4d._C" in str(w.message)]
    assert len(messages) == 1
    ref = reference_decode(*inputs, 1.0, "portrait4d")
    assert torch.equal(out1[0], ref[0]) and torch.equal(out1[1], out2[1])
    with pytest.raises(RuntimeError, match="not built"):
        decode_triplanes(*inputs, backend="cpu")
    # and the renderer's automatic choice is the unfused path
    assert not TriplaneRenderer().uses_fused(TriplaneDecoder(), torch.device("cpu"))


# ----------------------------------------------------------------------------------
# The renderer: fused against unfused
# ----------------------------------------------------------------------------------

def _scene(variant, dtype, n=1, res=6, c=8, seed=0):
    torch.manual_seed(seed)
    planes = (torch.randn(n, 3, c, 16, 16) * 3).to(dtype)
    decoder = TriplaneDecoder(n_features=c, hidden=16, out_features=4, variant=variant).to(dtype)
    with torch.no_grad():  # a varied density field
        if variant == "portrait4d":
            decoder.out_sigma.weight.normal_().mul_(3.0)
            decoder.out_sigma.bias.fill_(-1.0)
        else:
            decoder.net[2].weight[:1].normal_().mul_(3.0)
            decoder.net[2].bias[:1].fill_(-1.0)
    yaw = torch.tensor([0.3 * (i + 1) for i in range(n)], dtype=F64)
    c2w = torch.eye(4, dtype=F64).repeat(n, 1, 1)
    c2w[:, 0, 0], c2w[:, 0, 2], c2w[:, 2, 0], c2w[:, 2, 2] = yaw.cos(), yaw.sin(), -yaw.sin(), yaw.cos()
    c2w[:, :3, 3] = -2.7 * c2w[:, :3, 2]
    k = torch.tensor([[2.0, 0, 0.5], [0, 2.0, 0.5], [0, 0, 1]], dtype=F64).expand(n, 3, 3)
    o, d = generate_rays(c2w.to(dtype), k.to(dtype), res)
    return planes, decoder, o, d


RENDER_CASES = {
    "eg3d_numeric_importance": dict(variant="eg3d", opts=dict(ray_start=2.0, ray_end=3.4, density_noise=0.3)),
    "eg3d_auto_importance": dict(variant="eg3d", opts=dict(ray_start="auto", ray_end="auto", white_back=True)),
    "portrait4d_auto": dict(variant="portrait4d", opts=dict(ray_start="auto", ray_end="auto",
                                                            plane_layout="portrait4d", density_noise=0.5)),
    "portrait4d_numeric_coarse": dict(variant="portrait4d", opts=dict(ray_start=2.0, ray_end=3.4,
                                                                      depth_resolution_importance=0)),
}


@pytest.mark.parametrize("case", sorted(RENDER_CASES))
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_renderer_fused_matches_unfused(case, dtype):
    require_backend("cpu")
    spec = RENDER_CASES[case]
    planes, decoder, o, d = _scene(spec["variant"], dtype, n=2)
    opts = dict(dict(box_warp=1.0, depth_resolution=10, depth_resolution_importance=10), **spec["opts"])
    results = {}
    for fused in (False, True):
        p = planes.clone().requires_grad_(True)
        decoder.zero_grad(set_to_none=True)
        renderer = TriplaneRenderer(plane_layout="eg3d", fused=fused)
        assert renderer.uses_fused(decoder, p.device) == fused
        out = renderer(p, decoder, o, d, opts, generator=torch.Generator().manual_seed(11))
        g = torch.Generator().manual_seed(12)
        loss = sum((t.double() * torch.randn(t.shape, generator=g, dtype=F64)).sum() for t in out)
        loss.backward()
        results[fused] = (out, p.grad, {k: v.grad.clone() for k, v in decoder.named_parameters()})
    (out_u, gp_u, gd_u), (out_f, gp_f, gd_f) = results[False], results[True]
    tol = 1e-10 if dtype == F64 else 2e-4
    for a, b in zip(out_f, out_u):
        assert torch.allclose(a, b, rtol=tol, atol=tol)
    assert rel_err(gp_f, gp_u) <= (1e-10 if dtype == F64 else 1e-4)
    assert sorted(gd_f) == sorted(gd_u)
    for name in gd_u:
        assert rel_err(gd_f[name], gd_u[name]) <= (1e-10 if dtype == F64 else 1e-4), name
    opacity = out_u[2]
    assert opacity.min() < 0.45 and opacity.max() > 0.55  # a non-trivial picture


def test_renderer_point_field_equals_planes_and_decoder():
    """A point field that samples the planes and decodes renders exactly as the planes and
    the decoder (same random numbers), gradients included; misuse is an error."""
    planes, decoder, o, d = _scene("portrait4d", F64, n=2)
    opts = dict(box_warp=1.0, depth_resolution=10, depth_resolution_importance=10, ray_start=2.0, ray_end=3.4,
                plane_layout="portrait4d", density_noise=0.2)
    renderer = TriplaneRenderer(plane_layout="portrait4d", fused=False)
    p_planes, p_field = planes.clone().requires_grad_(True), planes.clone().requires_grad_(True)
    seen = []

    def field(points, directions):
        seen.append((tuple(points.shape), tuple(directions.shape)))
        return decoder(sample_triplanes(p_field, points, box_warp=1.0, plane_layout="portrait4d"), directions)

    expected = renderer(p_planes, decoder, o, d, opts, generator=torch.Generator().manual_seed(3))
    got = renderer(field, None, o, d, opts, generator=torch.Generator().manual_seed(3))
    assert seen == [((2, 36 * 10, 3), (2, 36 * 10, 3))] * 2  # coarse then fine, the samples of a ray contiguous
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    sum(t.sum() for t in got).backward()
    sum(t.sum() for t in expected).backward()
    assert torch.equal(p_field.grad, p_planes.grad)
    with pytest.raises(ValueError, match="with a point field as planes, decoder must be None"):
        renderer(field, decoder, o, d, opts)
    with pytest.raises(ValueError, match="fused = True needs planes and a TriplaneDecoder"):
        TriplaneRenderer(fused=True)(field, None, o, d, opts)
    with pytest.raises(TypeError, match="a point field must return a dict"):
        renderer(lambda points, directions: points, None, o, d, opts)


def test_renderer_fused_choice(monkeypatch):
    require_backend("cpu")
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_DECODE_TRIPLANES", raising=False)
    cpu = torch.device("cpu")
    decoder = TriplaneDecoder(n_features=8, out_features=3)
    auto = TriplaneRenderer()
    # the default per device type: unfused on the CPU (measured faster there), fused on CUDA
    assert renderer_module.FUSED_BY_DEFAULT == {"cpu": False, "cuda": True}
    assert auto.fused is None and not auto.uses_fused(decoder, cpu)
    assert TriplaneRenderer(fused=True).uses_fused(decoder, cpu)  # the fused path's memory, when asked
    # the other conditions of the automatic choice, on a device type whose default is fused
    monkeypatch.setitem(renderer_module.FUSED_BY_DEFAULT, "cpu", True)
    assert auto.uses_fused(decoder, cpu)
    assert not auto.uses_fused(lambda f, dirs: {"rgb": f, "sigma": f[..., :1]}, cpu)
    assert not auto.uses_fused(decoder, cpu, fused=False)  # options["fused"] overrides

    class Custom(TriplaneDecoder):
        def forward(self, features, ray_directions=None):
            return super().forward(features * 2, ray_directions)

    assert not auto.uses_fused(Custom(n_features=8, out_features=3), cpu)
    handle = decoder.register_forward_hook(lambda *a: None)
    assert not auto.uses_fused(decoder, cpu)
    handle.remove()
    assert not auto.uses_fused(TriplaneDecoder(n_features=8, hidden=256, out_features=3), cpu)
    monkeypatch.setenv("HEAD4D_BACKEND", "torch")
    assert not auto.uses_fused(decoder, cpu)
    assert TriplaneRenderer(fused=True).uses_fused(decoder, cpu)  # forced: the reference decode_triplanes

    with pytest.raises(TypeError, match="fused decoding needs a TriplaneDecoder"):
        TriplaneRenderer(fused=True).uses_fused(lambda f, dirs: {}, cpu)
    with pytest.raises(TypeError, match="fused must be None"):
        TriplaneRenderer(fused="yes")
    planes, dec, o, d = _scene("eg3d", torch.float32)
    opts = dict(box_warp=1.0, ray_start=2.0, ray_end=3.4, depth_resolution=6, depth_resolution_importance=6)
    with pytest.raises(TypeError, match="options\\['fused'\\] must be None"):
        auto(planes, dec, o, d, dict(opts, fused=1))
    with pytest.raises(TypeError, match="fused decoding needs a TriplaneDecoder"):
        auto(planes, lambda f, dirs: {}, o, d, dict(opts, fused=True))


# ----------------------------------------------------------------------------------
# Memory kept for the backward
# ----------------------------------------------------------------------------------

class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def saved_for_backward(fn):
    """Runs ``fn()`` and returns (its result, bytes of the distinct storages that autograd
    still holds for the backward once it returned, bytes of all it saved meanwhile)."""
    held = []
    every = {}

    def pack(t):
        h = _Held(t)
        held.append(weakref.ref(h))
        storage = t.untyped_storage()
        every[storage.data_ptr()] = storage.nbytes()
        return h

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.tensor):
        out = fn()
    gc.collect()
    alive = {}
    for ref in held:
        h = ref()
        if h is not None:
            storage = h.tensor.untyped_storage()
            alive[storage.data_ptr()] = storage.nbytes()
    return out, sum(alive.values()), sum(every.values())


def render_memory(res, c, size, n_coarse, n_fine, fused, seed=0):
    """Saved-for-backward bytes of a 1-image render of res x res rays."""
    torch.manual_seed(seed)
    planes = torch.randn(1, 3, c, size, size, requires_grad=True)
    decoder = TriplaneDecoder(n_features=c, hidden=64, out_features=32, variant="portrait4d")
    cam2world = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, -2.7], [0, 0, 0, 1]]])
    o, d = generate_rays(cam2world, torch.tensor([[[2.0, 0, 0.5], [0, 2.0, 0.5], [0, 0, 1]]]), res)
    opts = dict(box_warp=1.0, ray_start=2.25, ray_end=3.3, depth_resolution=n_coarse,
                depth_resolution_importance=n_fine)
    renderer = TriplaneRenderer(fused=fused)
    out, alive, every = saved_for_backward(lambda: renderer(planes, decoder, o, d, opts))
    return alive, every


def test_fused_render_keeps_5x_less_for_backward():
    require_backend("cpu")
    fused_alive, fused_every = render_memory(32, 32, 64, 48, 48, fused=True)
    unfused_alive, unfused_every = render_memory(32, 32, 64, 48, 48, fused=False)
    assert unfused_alive >= 5 * fused_alive, (unfused_alive, fused_alive)
