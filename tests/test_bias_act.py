"""``bias_act`` (StyleGAN2's fused bias + activation + gain + clamp): the reference
against independent formulas and its default table, and the compiled backends (``cpu``,
``cuda``: csrc/bias_act/; ``triton``: kernels/bias_act.py, in Triton's interpreter
without a GPU) against the reference on fresh random inputs: every
activation and dtype, with and without bias and clamp, the bias along different
dimensions, non-contiguous x, gradients, second derivatives (gradgradcheck in float64
and the reference's autograd through ``create_graph=True``), the clamp boundary, and
bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from head4d.ops import bias_act
from head4d.reference import bias_act as reference_bias_act
from head4d.reference.bias_act import ACTIVATIONS

from conftest import CUDA_EMULATED, require_backend

BACKENDS = ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu), CUDA_EMULATED]
ALL_BACKENDS = ["torch"] + BACKENDS
ACTS = list(ACTIVATIONS)
F64 = torch.float64

#: Unit roundoff of each dtype; a few of them bound an elementwise function computed in
#: float32 (float64) and rounded once to the dtype.
EPS = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def tol(dtype, scale=1.0):
    """Elementwise: float32 math (a few ulp per function) rounded once to ``dtype``."""
    unit = max(EPS[dtype], EPS[torch.float32]) if dtype != F64 else EPS[F64]
    return dict(atol=16 * unit * scale, rtol=16 * unit * scale)


def rand(shape, seed, lo=-3.0, hi=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=F64) * (hi - lo) + lo


def independent(x, act, alpha, gain, clamp):
    """StyleGAN2's formula written out without the reference's table (float64)."""
    sig = 1 / (1 + torch.exp(-x))
    f = {
        "linear": x,
        "relu": torch.where(x > 0, x, torch.zeros_like(x)),
        "lrelu": torch.where(x > 0, x, alpha * x),
        "tanh": torch.tanh(x),
        "sigmoid": sig,
        "elu": torch.where(x > 0, x, torch.exp(x) - 1),
        "selu": 1.0507009873554804934193349852946 * torch.where(
            x > 0, x, 1.6732632423543772848170429916717 * (torch.exp(x) - 1)),
        "softplus": torch.where(x > 20, x, torch.log(1 + torch.exp(x))),
        "swish": x * sig,
    }[act]
    y = f * gain
    return y if clamp is None else y.clamp(-clamp, clamp)


# ----------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------

#: StyleGAN2's defaults, written here independently of the reference's table.
DEFAULTS = {"linear": (0.0, 1.0), "relu": (0.0, math.sqrt(2)), "lrelu": (0.2, math.sqrt(2)), "tanh": (0.0, 1.0),
            "sigmoid": (0.0, 1.0), "elu": (0.0, 1.0), "selu": (0.0, 1.0), "softplus": (0.0, 1.0),
            "swish": (0.0, math.sqrt(2))}


@pytest.mark.parametrize("act", ACTS)
def test_reference_matches_the_formula_with_the_default_alpha_and_gain(act):
    x = rand((2, 5, 3, 4), 1, -25.0, 25.0)
    b = rand((5,), 2)
    alpha, gain = DEFAULTS[act]
    expected = independent(x + b.reshape(1, 5, 1, 1), act, alpha, gain, None)
    torch.testing.assert_close(reference_bias_act(x, b, act=act), expected, atol=1e-12, rtol=1e-12)
    expected = independent(x + b.reshape(1, 5, 1, 1), act, 0.3, 0.7, 0.9)
    torch.testing.assert_close(reference_bias_act(x, b, act=act, alpha=0.3, gain=0.7, clamp=0.9), expected,
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradient_is_zero_where_clamped_boundary_included(backend):
    require_backend(backend) if backend != "torch" else None
    # linear, gain 1: the output is x itself, so |x| = clamp sits exactly on the boundary
    x = torch.tensor([-2.0, -0.5, -0.5, 0.0, 0.25, 0.5, 0.75, 2.0], dtype=F64, requires_grad=True)
    y = bias_act(x, act="linear", clamp=0.5, backend=backend)
    torch.testing.assert_close(y.detach(), x.detach().clamp(-0.5, 0.5), atol=0, rtol=0)
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    expected = (x.detach().abs() < 0.5).to(F64)
    torch.testing.assert_close(grad.detach(), expected, atol=0, rtol=0)
    # tanh: the second derivative is zero where clamped too
    x = torch.linspace(-2, 2, 41, dtype=F64, requires_grad=True)
    y = bias_act(x, act="tanh", gain=2.0, clamp=1.0, backend=backend)
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    t = torch.tanh(x.detach())
    inside = (2 * t).abs() < 1.0
    torch.testing.assert_close(grad.detach(), torch.where(inside, 2 * (1 - t * t), 0.0), atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(second, torch.where(inside, -4 * t * (1 - t * t), 0.0), atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("act", ACTS)
def test_reference_gradgradcheck(act):
    x = rand((2, 3, 4), 3).requires_grad_(True)
    b = rand((3,), 4, -0.5, 0.5).requires_grad_(True)
    fn = lambda x, b: reference_bias_act(x, b, act=act, clamp=2.5)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, b))


# ----------------------------------------------------------------------------------
# The compiled backends against the reference
# ----------------------------------------------------------------------------------

# (shape, dim, with bias): the bias along channels (StyleGAN2's layers), along the last
# dimension (fully connected layers), along the first, and no bias.
LAYOUTS = [((2, 5, 3, 4), 1, True), ((3, 7), -1, True), ((4, 3, 2), 0, True), ((2, 3, 5), 1, False)]


def far_from_clamp(reference_out_f64, clamp):
    """Elements whose value is not within float32 rounding of the clamp: there a
    float32 kernel and the float64 reference may pick different sides."""
    if clamp is None:
        return torch.ones_like(reference_out_f64, dtype=torch.bool)
    return (reference_out_f64.abs() - clamp).abs() > 1e-3 * clamp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("clamp", [None, 1.5])
def test_forward_and_gradients_match_reference(backend, dtype, act, layout, clamp):
    require_backend(backend)
    shape, dim, with_bias = layout
    seed = hash((act, shape, clamp)) % 1000
    x = rand(shape, seed).to(dtype)
    b = rand((shape[dim],), seed + 1, -1.0, 1.0).to(dtype) if with_bias else None
    cot = rand(shape, seed + 2, -1.0, 1.0)
    alpha = 0.3 if act == "lrelu" else None

    xk = x.clone().requires_grad_(True)
    bk = b.clone().requires_grad_(True) if with_bias else None
    out = bias_act(xk, bk, dim, act, alpha=alpha, clamp=clamp, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    (out.double() * cot).sum().backward()

    xr = x.double().requires_grad_(True)
    br = b.double().requires_grad_(True) if with_bias else None
    ref = reference_bias_act(xr, br, dim, act, alpha=alpha, clamp=clamp)
    (ref * cot).sum().backward()

    keep = far_from_clamp(ref.detach(), clamp)
    scale = max(1.0, float(ref.detach().abs().max()))
    torch.testing.assert_close(out.double().detach()[keep], ref.detach()[keep], **tol(dtype, scale))
    # grad_x = cot (rounded to dtype) * gain * f'(z), rounded: a few units of dtype
    grad_scale = max(1.0, float(xr.grad.abs().max()))
    torch.testing.assert_close(xk.grad.double()[keep], xr.grad[keep], **tol(dtype, 2 * grad_scale))
    if with_bias and bool(keep.all()):
        per_channel = x.numel() // shape[dim]
        torch.testing.assert_close(bk.grad.double(), br.grad, **tol(dtype, 2 * grad_scale * per_channel))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_non_contiguous_x(backend):
    require_backend(backend)
    x = rand((4, 6, 5), 7).transpose(0, 2)  # [5, 6, 4], not contiguous
    b = rand((6,), 8)
    out = bias_act(x, b, 1, "lrelu", clamp=2.0, backend=backend)
    torch.testing.assert_close(out, reference_bias_act(x, b, 1, "lrelu", clamp=2.0), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_gradgradcheck(backend, act):
    require_backend(backend)
    x = rand((2, 3, 4), 11).requires_grad_(True)
    b = rand((3,), 12, -0.5, 0.5).requires_grad_(True)
    fn = lambda x, b: bias_act(x, b, act=act, clamp=2.5, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_second_derivatives_match_reference_autograd(backend, act):
    """An R1-style penalty: the squared gradient, differentiated again, in x and b."""
    require_backend(backend)
    x0 = rand((3, 4, 5), 21)
    b0 = rand((4,), 22, -0.5, 0.5)
    w = rand((3, 4, 5), 23, -1.0, 1.0)
    results = []
    for name in (backend, "torch"):
        x = x0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True)
        y = bias_act(x, b, act=act, gain=1.3, clamp=1.8, backend=name)
        (grad_x,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
        # + y: the piecewise linear activations have a gradient that x does not move
        penalty = (grad_x ** 2).sum() + y.sum()
        penalty.backward()
        results.append((grad_x.detach(), x.grad, b.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_third_derivative_through_x_raises(backend):
    require_backend(backend)
    x = rand((2, 3), 31).requires_grad_(True)
    y = bias_act(x, None, act="tanh", backend=backend)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third order"):
        torch.autograd.grad(h.sum(), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_no_grad(backend):
    require_backend(backend)
    x = torch.empty((0, 3, 2), dtype=torch.float32)
    assert bias_act(x, torch.zeros(3), act="relu", backend=backend).shape == (0, 3, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_what_the_backward_keeps(backend):
    """linear, relu and lrelu (gain > 0, alpha > 0, no clamp) in float32 / float64 keep
    their output for the backward, the tensor the next layer keeps anyway, not their
    input; other activations, a negative alpha, a clamp and half precision keep the input.
    The gradients are the reference's either way (the tests above)."""
    require_backend(backend)

    def kept(x, dtype=torch.float32, **kwargs):
        x = x.to(dtype).requires_grad_(True)
        b = torch.linspace(-0.5, 0.5, x.shape[1], dtype=dtype)
        storages = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: storages.append(t.untyped_storage().data_ptr())
                                                      or t, lambda t: t):
            y = bias_act(x, b, backend=backend, **kwargs)
        own = {x.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}
        mine = [p for p in storages if p not in own]
        return ("output" if mine == [y.untyped_storage().data_ptr()] else
                "input" if x.untyped_storage().data_ptr() in storages and not mine else storages)

    x = rand((4, 6, 5), 41)
    for act in ("linear", "relu", "lrelu"):
        assert kept(x, act=act) == "output", act
        assert kept(x, F64, act=act, gain=0.5) == "output", act
        assert kept(x, act=act, clamp=1.5) == "input", act
    assert kept(x, act="lrelu", alpha=-0.1) == "input"
    assert kept(x, act="tanh") == "input"
    assert kept(x, torch.float16, act="lrelu") == "input"


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS[:2])
def test_bad_input(backend):
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="act must be one of"):
        bias_act(x, act="gelu", backend=backend)
    with pytest.raises(ValueError, match=r"b must have shape \[3\]"):
        bias_act(x, torch.zeros(4), backend=backend)
    with pytest.raises(ValueError, match=r"b must have shape \[3\]"):
        bias_act(x, torch.zeros(3, 1), backend=backend)
    with pytest.raises(ValueError, match=r"dim must be in \[-3, 3\)"):
        bias_act(x, torch.zeros(3), dim=3, backend=backend)
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        bias_act(torch.ones(2, 3, dtype=torch.int64), backend=backend)
    with pytest.raises(TypeError, match="b must have x's dtype"):
        bias_act(x, torch.zeros(3, dtype=F64), backend=backend)
    with pytest.raises(ValueError, match="clamp must be finite and >= 0"):
        bias_act(x, clamp=-1.0, backend=backend)
    with pytest.raises(TypeError, match="gain must be a real number"):
        bias_act(x, gain="2", backend=backend)
    with pytest.raises(ValueError, match="b is on meta but x is on cpu"):
        bias_act(x, torch.zeros(3, device="meta"), backend=backend)


# ----------------------------------------------------------------------------------
# The custom operators
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(backend, with_bias):
    """Schemas, fakes and autograd registrations of both custom operators of the backend."""
    require_backend(backend)
    from head4d.ops import _library

    forward, derivative = ((_library.bias_act_triton, _library.bias_act_triton_derivative) if backend == "triton"
                           else (_library.bias_act, _library.bias_act_derivative))

    x = rand((2, 3, 4), 41).requires_grad_(True)
    b = rand((3,), 42).requires_grad_(True) if with_bias else None
    grad = rand((2, 3, 4), 43).requires_grad_(True)
    code = ACTIVATIONS["swish"].code
    torch.library.opcheck(forward, (x, b, 1, code, 0.0, 1.4, 2.0))
    torch.library.opcheck(derivative, (grad, x, b, 1, code, 1, 0.0, 1.4, 2.0))
