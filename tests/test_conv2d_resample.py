"""``conv2d_resample`` and ``modulated_conv2d`` (head4d/ops/conv2d_resample.py): StyleGAN2's
forms (strided and transposed convolutions around ``upfirdn2d``) against the definitional
references (head4d/reference/conv2d_resample.py), with ``upfirdn2d`` on each of its
backends; the references against the forms StyleGAN2's layers are known to compute
(borders included); forward, gradients, gradcheck and gradgradcheck in float64, the
fused and non-fused modulated forms, float16's pre-normalisation, an R1 penalty's double
backward, and bad input. Fresh random inputs everywhere."""
import math

import pytest
import torch
import torch.nn.functional as F

from head4d.ops import bias_act, conv2d_resample, modulated_conv2d, setup_filter, upsample2d
from head4d.reference import bias_act as reference_bias_act
from head4d.reference import conv2d_resample as R

from conftest import CUDA_EMULATED, require_backend

F64 = torch.float64
#: upfirdn2d's backend inside the composition (the convolutions are torch's on each)
BACKENDS = ["cpu", "torch", pytest.param("cuda", marks=pytest.mark.gpu), CUDA_EMULATED]

# (kernel, up, down, padding, groups, flip_weight, flip_filter, filter taps: None, [fw] 1-D or (fh, fw))
CASES = [
    (3, 1, 1, 1, 1, True, False, None),                   # plain conv, symmetric padding
    (3, 1, 1, (0, 2, 1, -1), 2, False, False, None),      # asymmetric padding that crops, groups
    (1, 1, 2, 0, 1, True, False, (4, 4)),                 # D's 1x1 skip: filter and decimate first
    (1, 2, 1, 0, 2, False, True, (4, 4)),                 # 1x1 up: conv first, then upsample
    (3, 1, 2, 1, 1, True, False, (4, 4)),                 # D's 3x3 down: filter, strided conv
    (3, 2, 1, 1, 1, False, False, (4, 4)),                # SynthesisLayer's 3x3 up: transposed conv
    (3, 2, 1, 1, 2, True, True, [4]),                     # up with groups, separable filter
    (3, 2, 2, (2, -1, 0, 3), 2, False, False, (3, 5)),    # up and down together, cropping, odd filter
    (2, 2, 1, (1, 0, 0, 1), 1, True, False, (4, 4)),      # even kernel
    (3, 3, 2, 1, 1, False, True, [5]),                    # odd factor up, odd taps
    (5, 1, 3, (-1, 2, 0, 1), 2, True, False, (3, 3)),     # down by 3, cropping
    (1, 2, 1, 0, 1, True, False, None),                   # up without a filter: zero insertion, gain 4
]


def make_filter(taps, g, device="cpu"):
    if taps is None:
        return None
    return (torch.rand(taps, generator=g, dtype=F64) + 0.1).to(device)


def make_case(case, g, n=2, c=4, h=7, w=9, out_channels=6, device="cpu"):
    k, up, down, padding, groups, flip_weight, flip_filter, taps = case
    x = torch.randn(n, c, h, w, generator=g, dtype=F64).to(device)
    weight = torch.randn(out_channels, c // groups, k, k, generator=g, dtype=F64).to(device)
    f = make_filter(taps, g, device)
    pad4 = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
    return x, weight, f, dict(up=up, down=down, padding=list(pad4), groups=groups, flip_weight=flip_weight,
                              flip_filter=flip_filter)


def reference(x, w, f, args):
    return R.conv2d_resample(x, w, f, args["up"], args["down"], tuple(args["padding"]), args["groups"],
                             args["flip_weight"], args["flip_filter"])


def accumulation_terms(w, f, args):
    """How many products one output (or one input gradient) sums, at most."""
    taps = 1 if f is None else (f.numel() ** 2 if f.dim() == 1 else f.numel())
    resamplings = int(args["up"] > 1) + int(args["down"] > 1)
    channels = max(w.shape[0], w.shape[1])
    return channels * w.shape[2] * w.shape[3] * taps ** resamplings


def assert_within_rounding(got, want, magnitude, terms, dtype=F64):
    """|got - want| <= 2 terms eps sum|products| (each side's summation error, bounded by
    gamma_terms times the sum of the absolute products, ``magnitude``)."""
    assert got.shape == want.shape
    bound = 2 * terms * torch.finfo(dtype).eps * magnitude + torch.finfo(dtype).tiny
    excess = (got.double() - want.double()).abs() - bound
    assert excess.max().item() <= 0, f"worst error exceeds the bound by {excess.max().item():.3e}"


def upsample_zeros(x, up):
    """Zero insertion by indexing (independent of the references): sample (i, j) to (up i, up j)."""
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, h * up, w * up)
    out[:, :, ::up, ::up] = x
    return out


# ------------------------------------------------------------------- the references

def test_reference_is_upstreams_synthesis_layer_upsampling():
    """SynthesisLayer, 3x3 up 2, padding 1, [1, 3, 3, 1], flip_weight False: StyleGAN2's
    transposed-conv path computes zero insertion to 2H, pad [2, 1], F.conv2d with w
    flipped, pad 1, then the 4x4 filter times 4. "upsample2d then conv" agrees inside only."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 5, generator=g, dtype=F64)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=F64)
    f = setup_filter([1, 3, 3, 1]).double()
    got = R.conv2d_resample(x, w, f, 2, 1, (1, 1, 1, 1), 1, False, False)
    y = F.pad(upsample_zeros(x, 2), [2, 1, 2, 1])
    y = F.pad(F.conv2d(y, w.flip([2, 3])), [1, 1, 1, 1])
    kernel = (4 * f).flip([0, 1]).expand(4, 1, 4, 4)  # a true convolution with the filter
    want = F.conv2d(y, kernel, groups=4)
    assert got.shape == (2, 4, 12, 10)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    naive = F.conv2d(upsample2d(x, f, backend="torch"), w.flip([2, 3]), padding=1)
    torch.testing.assert_close(got[..., 2:-2, 2:-2], naive[..., 2:-2, 2:-2], atol=1e-12, rtol=1e-12)
    border = (got - naive).abs()
    border[..., 2:-2, 2:-2] = 0
    assert border.max().item() > 1e-3  # the borders differ: the reference keeps the filter's tails


def test_reference_is_upstreams_discriminator_downsampling():
    """D's 3x3 down: upfirdn2d with padding 2, then a stride-2 conv; D's 1x1 skip:
    downsample by 2 with padding 1, then the 1x1 conv (both correlations)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=F64)
    w3 = torch.randn(5, 3, 3, 3, generator=g, dtype=F64)
    w1 = torch.randn(5, 3, 1, 1, generator=g, dtype=F64)
    f = setup_filter([1, 3, 3, 1]).double()
    kernel = f.flip([0, 1]).expand(3, 1, 4, 4)
    filtered = F.conv2d(F.pad(x, [2, 2, 2, 2]), kernel, groups=3)
    torch.testing.assert_close(R.conv2d_resample(x, w3, f, 1, 2, (1, 1, 1, 1), 1, True, False),
                               F.conv2d(filtered, w3, stride=2), atol=1e-12, rtol=1e-12)
    decimated = F.conv2d(F.pad(x, [1, 1, 1, 1]), kernel, groups=3)[:, :, ::2, ::2]
    torch.testing.assert_close(R.conv2d_resample(x, w1, f, 1, 2, (0, 0, 0, 0), 1, True, False),
                               F.conv2d(decimated, w1), atol=1e-12, rtol=1e-12)


def test_reference_without_resampling_is_conv2d():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, 7, generator=g, dtype=F64)
    w = torch.randn(6, 2, 3, 3, generator=g, dtype=F64)
    torch.testing.assert_close(R.conv2d_resample(x, w, None, 1, 1, (1, 1, 1, 1), 2, True, False),
                               F.conv2d(x, w, padding=1, groups=2), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(R.conv2d_resample(x, w, None, 1, 1, (1, 1, 1, 1), 2, False, False),
                               F.conv2d(x, w.flip([2, 3]), padding=1, groups=2), atol=1e-12, rtol=1e-12)


def test_reference_modulation_is_per_sample():
    """The modulated reference against the formula spelled out for one sample."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 5, 6, generator=g, dtype=F64)
    weight = torch.randn(2, 4, 3, 3, generator=g, dtype=F64)
    styles = torch.randn(3, 4, generator=g, dtype=F64)
    noise = torch.randn(3, 1, 5, 6, generator=g, dtype=F64)
    got = R.modulated_conv2d(x, weight, styles, noise, padding=(1, 1, 1, 1))
    n = 1
    w = weight * styles[n][None, :, None, None]
    w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
    torch.testing.assert_close(got[n], F.conv2d(x[n:n + 1], w, padding=1)[0] + noise[n], atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------- conv2d_resample

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_float64(backend, case):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(7)
    x, w, f, args = make_case(case, g)
    fd = None if f is None else f.to(device)
    xa, wa = x.to(device).requires_grad_(True), w.to(device).requires_grad_(True)
    out = conv2d_resample(xa, wa, fd, **args, backend=backend)
    cot = torch.randn(out.shape, generator=g, dtype=F64)
    got = [out] + list(torch.autograd.grad(out, (xa, wa), cot.to(device)))
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = reference(xr, wr, f, args)
    want = [ref] + list(torch.autograd.grad(ref, (xr, wr), cot))
    # the magnitudes: the same composition on absolute values sums |products|
    xm, wm = x.abs().requires_grad_(True), w.abs().requires_grad_(True)
    fm = None if f is None else f.abs()
    mag = reference(xm, wm, fm, args)
    mx, mw = torch.autograd.grad(mag, (xm, wm), cot.abs())
    terms = accumulation_terms(w, f, args) * x.shape[2] * x.shape[3]  # the weight gradient sums over pixels too
    for a, b, m in zip(got, want, (mag.detach(), mx, mw)):
        assert a.dtype == F64
        assert_within_rounding(a.detach().cpu(), b.detach(), m, terms)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3], CASES[4], CASES[6], CASES[7]])
def test_gradcheck_and_gradgradcheck(backend, case):
    """Second derivatives through upfirdn2d's backends (its gradient is upfirdn2d again)."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(13)
    x, w, f, args = make_case(case, g, n=1, c=2, h=5, w=4, out_channels=2)
    x, w = x.to(device).requires_grad_(True), w.to(device).requires_grad_(True)
    f = None if f is None else f.to(device)

    def op(a, b):
        return conv2d_resample(a, b, f, **args, backend=backend)

    assert torch.autograd.gradcheck(op, (x, w))
    assert torch.autograd.gradgradcheck(op, (x, w))


@pytest.mark.parametrize("case", [CASES[2], CASES[5], CASES[7]])
def test_the_composition_runs_upfirdn2d_on_the_named_backend(case):
    require_backend("cpu")
    g = torch.Generator().manual_seed(17)
    x, w, f, args = make_case(case, g)
    assert "head4d_upfirdn2d" in _graph_names(conv2d_resample(x.requires_grad_(True), w, f, **args, backend="cpu"))
    assert "head4d_upfirdn2d" not in _graph_names(conv2d_resample(x, w, f, **args, backend="torch"))
    with pytest.raises(RuntimeError, match="constant"):  # the compiled kernels give no filter gradient
        conv2d_resample(x, w, f.requires_grad_(True), **args, backend="cpu")


def _graph_names(t):
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(n for n, _ in node.next_functions)
    return " ".join(names)


def test_output_shape_follows_the_formula():
    g = torch.Generator().manual_seed(19)
    for case in CASES:
        x, w, f, args = make_case(case, g, h=11, w=6)
        fw, fh = R.filter_size(f)
        px0, px1, py0, py1 = R.adjusted_padding(tuple(args["padding"]), f, args["up"], args["down"])
        oh = R.output_size(11, w.shape[2], fh, args["up"], args["down"], py0, py1)
        ow = R.output_size(6, w.shape[3], fw, args["up"], args["down"], px0, px1)
        assert conv2d_resample(x, w, f, **args).shape == (2, 6, oh, ow)
    # StyleGAN2's layers keep or double or halve the size
    f = setup_filter([1, 3, 3, 1])
    x = torch.randn(1, 4, 8, 8)
    assert conv2d_resample(x, torch.randn(2, 4, 3, 3), f, up=2, padding=1, flip_weight=False).shape == (1, 2, 16, 16)
    assert conv2d_resample(x, torch.randn(2, 4, 3, 3), f, down=2, padding=1).shape == (1, 2, 4, 4)
    assert conv2d_resample(x, torch.randn(2, 4, 1, 1), f, down=2).shape == (1, 2, 4, 4)


# ------------------------------------------------------------------- modulated_conv2d

# (kernel, up, padding, demodulate, flip_weight): SynthesisLayer up, SynthesisLayer, ToRGB, D-like down
MODULATED = [
    (3, 2, 1, True, False, 1),
    (3, 1, 1, True, True, 1),
    (1, 1, 0, False, True, 1),
    (3, 1, 1, True, True, 2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_noise", [False, True])
@pytest.mark.parametrize("config", MODULATED)
def test_modulated_fused_and_non_fused_match_the_reference(backend, with_noise, config):
    device = require_backend(backend)
    k, up, padding, demodulate, flip_weight, down = config
    g = torch.Generator().manual_seed(23)
    n, c, o, h, w = 3, 5, 4, 7, 6
    x = torch.randn(n, c, h, w, generator=g, dtype=F64)
    weight = torch.randn(o, c, k, k, generator=g, dtype=F64)
    styles = torch.randn(n, c, generator=g, dtype=F64) + 1
    f = setup_filter([1, 3, 3, 1]).double()
    oh, ow = (h * up) // down, (w * up) // down
    noise = torch.randn(n, 1, oh, ow, generator=g, dtype=F64) if with_noise else None
    cot = torch.randn(n, o, oh, ow, generator=g, dtype=F64)
    inputs = [x, weight, styles] + ([noise] if with_noise else [])

    def run(fn, tensors, **kwargs):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        nz = leaves[3] if with_noise else None
        out = fn(leaves[0], leaves[1], leaves[2], nz, up=up, down=down, resample_filter=f.to(leaves[0].device),
                 demodulate=demodulate, flip_weight=flip_weight, **kwargs)
        grads = torch.autograd.grad(out, leaves, cot.to(out.device))
        return [out.cpu()] + [t.cpu() for t in grads]

    want = run(R.modulated_conv2d, inputs, padding=(padding,) * 4)
    on_device = [t.to(device) for t in inputs]
    for fused in (True, False):
        got = run(modulated_conv2d, on_device, padding=padding, fused_modconv=fused, backend=backend)
        assert got[0].shape == (n, o, oh, ow)
        for a, b in zip(got, want):
            # float64 rounding relative to each tensor's size (the demodulated weights are O(1))
            torch.testing.assert_close(a, b, atol=1e-11 * max(1.0, b.abs().max().item()), rtol=1e-11)


def test_modulated_float16_prenormalises():
    """Large weights and styles overflow float16 products without StyleGAN2's
    pre-normalisation; with it, the float16 result is within float16 rounding of the
    float64 reference (demodulation makes every output channel's weight unit-norm)."""
    g = torch.Generator().manual_seed(29)
    x = torch.randn(2, 8, 6, 6, generator=g, dtype=F64)
    weight = torch.randn(4, 8, 3, 3, generator=g, dtype=F64) * 1e3
    styles = torch.randn(2, 8, generator=g, dtype=F64) * 1e3
    want = R.modulated_conv2d(x, weight, styles, padding=(1, 1, 1, 1))
    # sum |x| |w_demodulated| per output: the scale of the float16 rounding errors
    w = weight[None] * styles[:, None, :, None, None]
    w = w * (w.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).rsqrt()
    mag = torch.stack([F.conv2d(x[i:i + 1].abs(), w[i].abs(), padding=1)[0] for i in range(2)])
    eps = torch.finfo(torch.float16).eps
    for fused in (True, False):
        got = modulated_conv2d(x.half(), weight.float(), styles.float(), padding=1, fused_modconv=fused)
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        # x and w rounded to float16 (eps / 2 each), the output rounded (eps / 2), float32
        # or float16 accumulation over 8 x 9 products (bounded by 8 * 9 * eps)
        bound = (2 * eps + 72 * eps) * mag + eps * want.abs()
        assert ((got.double() - want).abs() <= bound).all()
    # the guard matters: the same float16 data without it overflows
    plain = F.conv2d(x.half(), (weight[None] * styles[:, None, :, None, None])[0].half(), padding=1)
    assert not torch.isfinite(plain).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_r1_double_backward_matches_the_reference(backend):
    """R1's pattern on a small discriminator-shaped stack (3x3 conv, 3x3 down, 1x1 skip
    down, a modulated 3x3 up and down, lrelu via bias_act): the gradient of sum(D(x))
    w.r.t. x with create_graph, its squared norm, and the gradients of that w.r.t. x and
    every parameter, against the same stack of references."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(31)
    f64 = setup_filter([1, 3, 3, 1]).double()
    params = {"w0": torch.randn(4, 3, 3, 3, generator=g, dtype=F64), "b0": torch.randn(4, generator=g, dtype=F64),
              "w1": torch.randn(5, 4, 3, 3, generator=g, dtype=F64), "b1": torch.randn(5, generator=g, dtype=F64),
              "skip": torch.randn(5, 4, 1, 1, generator=g, dtype=F64),
              "wm": torch.randn(3, 5, 3, 3, generator=g, dtype=F64),
              "styles": torch.randn(2, 5, generator=g, dtype=F64) + 1}
    x = torch.randn(2, 3, 8, 6, generator=g, dtype=F64)

    def discriminator(t, p, conv, act, modconv, fused):
        h = act(conv(t, p["w0"], padding=1), p["b0"], act="lrelu")
        y = conv(h, p["skip"], down=2) * math.sqrt(0.5)
        h = act(conv(h, p["w1"], down=2, padding=1), p["b1"], act="lrelu", gain=1.0, clamp=256 * math.sqrt(0.5))
        h = y + h
        h = modconv(h, p["wm"], p["styles"], up=2, padding=1, flip_weight=False, fused=fused)
        return act(h, None, act="lrelu").sum()

    def head4d_conv(t, w, down=1, padding=0):
        return conv2d_resample(t, w, f64.to(t.device), down=down, padding=padding, backend=backend)

    def head4d_act(t, b, **kwargs):
        return bias_act(t, b, **kwargs, backend=backend)

    def head4d_modconv(t, w, s, fused, **kwargs):
        return modulated_conv2d(t, w, s, resample_filter=f64.to(t.device), fused_modconv=fused, **kwargs,
                                backend=backend)

    def reference_conv(t, w, down=1, padding=0):
        return R.conv2d_resample(t, w, f64, 1, down, (padding,) * 4, 1, True, False)

    def reference_modconv(t, w, s, fused, up, padding, flip_weight):
        return R.modulated_conv2d(t, w, s, up=up, padding=(padding,) * 4, resample_filter=f64,
                                  flip_weight=flip_weight)

    def r1_gradients(dev, conv, act, modconv, fused):
        t = x.to(dev).requires_grad_(True)
        p = {k: v.to(dev).requires_grad_(True) for k, v in params.items()}
        (gx,) = torch.autograd.grad(discriminator(t, p, conv, act, modconv, fused), t, create_graph=True)
        penalty = gx.square().sum()
        return [penalty.cpu()] + [v.cpu() for v in torch.autograd.grad(penalty, [t] + list(p.values()))]

    want = r1_gradients("cpu", reference_conv, reference_bias_act, reference_modconv, None)
    for fused in (True, False):
        got = r1_gradients(device, head4d_conv, head4d_act, head4d_modconv, fused)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-10 * max(1.0, b.abs().max().item()), rtol=1e-10)


def test_compiles_into_one_graph():
    """torch.compile(fullgraph=True) traces the composition (torch's convolutions and
    head4d's upfirdn2d custom operator), forward and backward, like eager."""
    require_backend("cpu")
    g = torch.Generator().manual_seed(37)
    f = setup_filter([1, 3, 3, 1])
    x = torch.randn(2, 4, 6, 5, generator=g)
    weight = torch.randn(3, 4, 3, 3, generator=g)
    styles = torch.randn(2, 4, generator=g)

    def fn(t):
        return modulated_conv2d(t, weight, styles, up=2, padding=1, resample_filter=f, flip_weight=False,
                                backend="cpu")

    results = []
    for run in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        t = x.clone().requires_grad_(True)
        out = run(t)
        (gx,) = torch.autograd.grad(out, t, torch.ones_like(out))
        results.append((out.detach(), gx))
    torch._dynamo.reset()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- bad input

_X = torch.randn(2, 4, 8, 8)
_W = torch.randn(3, 4, 3, 3)
_S = torch.randn(2, 4)
_FILTER = setup_filter([1, 3, 3, 1])


@pytest.mark.parametrize("call, error, message", [
    (lambda: conv2d_resample(_X[0], _W), ValueError, r"x must have shape \[N, C, H, W\]"),
    (lambda: conv2d_resample(_X, _W[0]), ValueError, r"w must have shape \[O, C / groups, kh, kw\]"),
    (lambda: conv2d_resample(_X, torch.randn(3, 2, 3, 3)), ValueError, r"x has 4 channels .* expects w.shape\[1\]"),
    (lambda: conv2d_resample(_X, torch.randn(3, 2, 3, 3), groups=2), ValueError, "divisible by groups=2"),
    (lambda: conv2d_resample(_X, _W.double()), TypeError, "w must have x's dtype float32"),
    (lambda: conv2d_resample(_X, _W, _FILTER, up=0), ValueError, "up must be >= 1"),
    (lambda: conv2d_resample(_X, _W, _FILTER, down=-2), ValueError, "down must be >= 1"),
    (lambda: conv2d_resample(_X, _W, _FILTER, up=2.0), TypeError, "up must be an int"),
    (lambda: conv2d_resample(_X, _W, _FILTER, groups=0), ValueError, "groups must be >= 1"),
    (lambda: conv2d_resample(_X, _W, torch.ones(2, 2, 2), up=2), ValueError, r"f must be a 1-D \[fw\]"),
    (lambda: conv2d_resample(_X, _W, torch.ones(()), up=2), ValueError, r"f must be a 1-D \[fw\]"),
    (lambda: conv2d_resample(_X, _W, padding=[1, 2, 3]), ValueError, "padding must be an int"),
    (lambda: conv2d_resample(_X, _W, padding=-4), ValueError, "too small"),
    (lambda: conv2d_resample(_X, _W, flip_weight=0), TypeError, "flip_weight must be a bool"),
    (lambda: conv2d_resample(_X, _W, padding=1, backend="nope"), ValueError, "backend 'nope'"),
    (lambda: modulated_conv2d(_X[0], _W, _S), ValueError, r"x must have shape \[N, I, H, W\]"),
    (lambda: modulated_conv2d(_X, _W[0], _S), ValueError, r"weight must have shape \[O, I, kh, kw\]"),
    (lambda: modulated_conv2d(_X, torch.randn(3, 5, 3, 3), _S), ValueError, r"expects weight.shape\[1\] = 5"),
    (lambda: modulated_conv2d(_X, _W, torch.randn(2, 5)), ValueError, r"styles must have shape \[N, I\] = \[2, 4\]"),
    (lambda: modulated_conv2d(_X, _W, torch.randn(3, 4)), ValueError, r"styles must have shape \[N, I\]"),
    (lambda: modulated_conv2d(_X, _W, _S[0]), ValueError, r"styles must have shape \[N, I\]"),
    (lambda: modulated_conv2d(_X, _W, _S, up=0, resample_filter=_FILTER), ValueError, "up must be >= 1"),
    (lambda: modulated_conv2d(_X, _W, _S, noise=torch.randn(2, 1, 7, 8), padding=1), ValueError,
     r"noise of shape \[2, 1, 7, 8\] does not broadcast to the output's shape \[2, 3, 8, 8\]"),
    (lambda: modulated_conv2d(_X, _W, _S, noise=torch.randn(2, 3, 3, 8, 8), padding=1), ValueError,
     "does not broadcast"),
    (lambda: modulated_conv2d(_X, _W, _S, noise=[0.0], padding=1), TypeError, "noise must be a torch.Tensor"),
    (lambda: modulated_conv2d(_X, _W, _S, up=2, resample_filter=torch.ones(1, 2, 2, 2)), ValueError,
     r"f must be a 1-D \[fw\]"),
    (lambda: modulated_conv2d(_X, _W, _S, fused_modconv="inference_only"), TypeError,
     "fused_modconv must be a bool"),
    (lambda: modulated_conv2d(_X, _W, _S, demodulate=None), TypeError, "demodulate must be a bool"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
