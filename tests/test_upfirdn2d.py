"""``upfirdn2d`` and its wrappers (``setup_filter``, ``upsample2d``, ``downsample2d``,
``filter2d``): the reference (head4d/reference/upfirdn2d.py) against a direct loop over
the definition, and the compiled backends (``cpu``, ``cuda``: csrc/upfirdn2d/; ``triton``:
kernels/upfirdn2d.py, in Triton's interpreter without a GPU) against
the reference in float64, forward, gradients and second derivatives (gradgradcheck),
on fresh random inputs: odd sizes, cropping padding, up and down together, 1-D and 2-D
filters, flip_filter, gain, every dtype, the specialized 2x cases, and bad input."""
import pytest
import torch

from head4d.ops import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d
from head4d.reference import upfirdn2d as R

from conftest import CUDA_EMULATED, require_backend

BACKENDS = ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu), CUDA_EMULATED]
ALL_BACKENDS = ["torch"] + BACKENDS
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
F64 = torch.float64

# (up, down, padding, filter shape, flip_filter, gain): every case has odd sizes somewhere
CASES = [
    ((2, 2), (1, 1), (2, 1, 2, 1), (4, 4), False, 4.0),      # upsample2d's 4-tap case (specialized)
    ((1, 1), (2, 2), (1, 1, 1, 1), (4, 4), False, 1.0),      # downsample2d's 4-tap case (specialized)
    ((2, 2), (1, 1), (2, 1, 2, 1), (4,), False, 4.0),        # 1-D separable, 2x up (specialized)
    ((1, 1), (2, 2), (1, 1, 1, 1), (4,), True, 1.0),         # 1-D separable, 2x down, flipped (specialized)
    ((3, 2), (2, 3), (1, -2, 3, 0), (3, 5), False, 1.7),     # up and down together, cropping
    ((1, 1), (1, 1), (-1, 2, 0, -3), (2, 3), True, -0.5),    # filter only, crop on two sides, gain < 0
    ((2, 1), (1, 2), (0, 0, 0, 0), (5,), False, 2.5),        # separable odd taps
    ((1, 3), (3, 1), (4, -1, -2, 2), (1, 1), False, 1.0),    # single tap
    ((4, 4), (2, 2), (3, 3, 3, 3), (4, 4), True, 16.0),      # 4x4 filter but not a specialized factor
]


def make_inputs(shape, fshape, dtype, g, device="cpu"):
    x = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    f = torch.rand(fshape, generator=g, dtype=F64).float() + 0.1
    return x.to(device), f.to(device)


def direct_upfirdn2d(x, f, up, down, padding, flip_filter, gain):
    """The definition read literally, one output at a time (float64): upsampled sample
    (Y, X) of the padded image is input (Y / upy, X / upx) when both divide exactly."""
    x, f = x.double(), f.double()
    (upx, upy), (downx, downy), (px0, px1, py0, py1) = up, down, padding
    f = f * gain ** (f.dim() / 2)  # a 1-D filter is applied twice: gain ** (1 / 2) each time
    w2 = torch.outer(f, f) if f.dim() == 1 else f
    if not flip_filter:  # a true convolution: correlation with the flipped filter
        w2 = w2.flip([0, 1])
    n, c, h, w = x.shape
    fh, fw = w2.shape
    oh = (h * upy + py0 + py1 - fh) // downy + 1
    ow = (w * upx + px0 + px1 - fw) // downx + 1
    out = torch.zeros(n, c, oh, ow, dtype=F64)
    for oy in range(oh):
        for ox in range(ow):
            for i in range(fh):
                for j in range(fw):
                    yy, xx = oy * downy + i - py0, ox * downx + j - px0
                    if yy % upy or xx % upx:
                        continue
                    iy, ix = yy // upy, xx // upx
                    if 0 <= iy < h and 0 <= ix < w:
                        out[:, :, oy, ox] += w2[i, j] * x[:, :, iy, ix]
    return out


def effective_l1(f, gain):
    """Sum of |taps| of the effective 2-D filter: bounds |out| / max|x|."""
    f = f.double().abs()
    return float((f.sum() ** 2 if f.dim() == 1 else f.sum()) * abs(gain))


def bound(dtype, f, gain, magnitude):
    """Error bound of an output against float64 truth: the output's rounding to dtype
    plus float32 (float64) accumulation over every tap, relative to sum|f| * max|x|."""
    acc = F64 if dtype == F64 else torch.float32
    taps = f.numel() ** (2 if f.dim() == 1 else 1)
    return 2 * (torch.finfo(dtype).eps + taps * torch.finfo(acc).eps) * effective_l1(f, gain) * magnitude


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_the_definition(case):
    up, down, padding, fshape, flip, gain = case
    g = torch.Generator().manual_seed(101)
    x, f = make_inputs((2, 3, 5, 7), fshape, F64, g)
    f = f.double()  # the gain multiplies the filter in its dtype: float64 as the loop does
    out = upfirdn2d(x, f, up=list(up), down=list(down), padding=list(padding), flip_filter=flip, gain=gain,
                    backend="torch")
    torch.testing.assert_close(out, direct_upfirdn2d(x, f, up, down, padding, flip, gain), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradient_float64(backend, case):
    device = require_backend(backend)
    up, down, padding, fshape, flip, gain = case
    g = torch.Generator().manual_seed(7)
    x, f = make_inputs((2, 3, 9, 7), fshape, F64, g, device)
    xa = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    args = dict(up=up, down=down, padding=padding, flip_filter=flip, gain=gain)
    out = upfirdn2d(xa, f, **args, backend=backend)
    ref = upfirdn2d(xr, f, **args, backend="torch")
    assert out.shape == ref.shape and out.dtype == F64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    cot = torch.randn(ref.shape, generator=g, dtype=F64).to(device)
    (gx,) = torch.autograd.grad(out, xa, cot)
    (gr,) = torch.autograd.grad(ref, xr, cot)
    torch.testing.assert_close(gx, gr, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize("factor", ["up", "down", "filter"])
def test_specialized_4_tap_cases_over_paddings_and_sizes(backend, factor, separable):
    """2x up, 2x down and filtering alone with a 4-tap filter run a bounds-free loop in
    the interior of each row and the general code near the borders: every padding from
    cropping to wide and widths from too narrow for an interior to wide must give the
    reference's answer."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(11)
    fshape = (4,) if separable else (4, 4)
    up, down = {"up": ((2, 2), (1, 1)), "down": ((1, 1), (2, 2)), "filter": ((1, 1), (1, 1))}[factor]
    for w in (1, 2, 3, 4, 5, 8, 13):
        for px0, px1, py0 in ((0, 0, 0), (2, 1, 2), (-3, 4, 1), (5, -2, -1), (-1, -1, 3), (3, 3, 0)):
            x, f = make_inputs((1, 2, 6, w), fshape, F64, g, device)
            args = dict(up=up, down=down, padding=(px0, px1, py0, 1), flip_filter=bool(w % 2), gain=2.0)
            try:
                ref = upfirdn2d(x, f, **args, backend="torch")
            except ValueError:  # the padding crops everything away at this width
                continue
            out = upfirdn2d(x, f, **args, backend=backend)
            torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12, msg=f"width {w}, padding {args['padding']}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", CASES[:7])
def test_gradgradcheck_float64(backend, case):
    device = require_backend(backend)
    up, down, padding, fshape, flip, gain = case
    g = torch.Generator().manual_seed(3)
    x, f = make_inputs((1, 2, 5, 4), fshape, F64, g, device)
    x.requires_grad_(True)

    def op(t):
        return upfirdn2d(t, f, up=up, down=down, padding=padding, flip_filter=flip, gain=gain, backend=backend)

    # Triton's interpreter takes ~10 ms a launch: there the checks compare the analytical
    # and numerical derivatives along random directions (fast mode) instead of column by
    # column (a few launches instead of hundreds)
    fast = backend == "triton" and device.type == "cpu"
    assert torch.autograd.gradcheck(op, (x,), fast_mode=fast)
    assert torch.autograd.gradgradcheck(op, (x,), fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_matches_reference(backend):
    """R1's pattern: a penalty on the input gradient, differentiated again."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(11)
    x, f = make_inputs((2, 3, 8, 6), (4, 4), F64, g, device)
    w = torch.randn(2, 3, 8, 6, generator=g, dtype=F64).to(device)
    grads = []
    for b in (backend, "torch"):
        t = x.clone().requires_grad_(True)
        y = downsample2d(upsample2d(t, f, backend=b) ** 2, f, backend=b)
        (gx,) = torch.autograd.grad((y * w).sum(), t, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.square().sum(), t)
        grads.append(ggx)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_every_dtype_against_float64_truth(backend, dtype, case):
    device = require_backend(backend)
    up, down, padding, fshape, flip, gain = case
    g = torch.Generator().manual_seed(23)
    x, f = make_inputs((2, 5, 11, 6), fshape, dtype, g, device)
    args = dict(up=up, down=down, padding=padding, flip_filter=flip, gain=gain)
    xa = x.clone().requires_grad_(True)
    out = upfirdn2d(xa, f, **args, backend=backend)
    assert out.dtype == dtype
    # truth: the same float32 filter (the gain multiplies it in float32 on every backend), float64 data
    truth = upfirdn2d(x.double(), f, **args, backend="torch")
    err = (out.double() - truth).abs().max().item()
    assert err <= bound(dtype, f, gain, x.double().abs().max().item())
    cot = torch.randn(out.shape, generator=g, dtype=F64).to(dtype).to(device)
    (gx,) = torch.autograd.grad(out, xa, cot)
    xt = x.double().requires_grad_(True)
    (gt,) = torch.autograd.grad(upfirdn2d(xt, f, **args, backend="torch"), xt, cot.double())
    assert gx.dtype == dtype
    assert (gx.double() - gt).abs().max().item() <= bound(dtype, f, gain, cot.double().abs().max().item())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_wrappers_sizes_and_conventions(backend):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(5)
    f = setup_filter([1, 3, 3, 1], device=device)
    x = torch.randn(2, 3, 7, 10, generator=g, dtype=F64).to(device)
    assert upsample2d(x, f, backend=backend).shape == (2, 3, 14, 20)
    assert downsample2d(x, f, backend=backend).shape == (2, 3, 3, 5)
    assert filter2d(x, f, backend=backend).shape == x.shape
    # StyleGAN2's paddings and gains, spelled out
    torch.testing.assert_close(upsample2d(x, f, backend=backend),
                               upfirdn2d(x, f, up=2, padding=[2, 1, 2, 1], gain=4, backend="torch"))
    torch.testing.assert_close(downsample2d(x, f, padding=1, backend=backend),
                               upfirdn2d(x, f, down=2, padding=[2, 2, 2, 2], backend="torch"))
    f3 = setup_filter([1, 2, 4], device=device)
    torch.testing.assert_close(filter2d(x, f3, padding=[1, 0], backend=backend),
                               upfirdn2d(x, f3, padding=[2, 2, 1, 1], backend="torch"))
    # no filter: zero insertion alone
    zeros_inserted = torch.zeros(2, 3, 14, 20, dtype=F64, device=device)
    zeros_inserted[..., ::2, ::2] = x
    torch.testing.assert_close(upfirdn2d(x, None, up=2, backend=backend), zeros_inserted,
                               atol=0, rtol=0)
    # a normalized filter with upsample2d's gain keeps a constant image constant inside
    ones = torch.full((1, 1, 6, 6), 2.5, dtype=F64, device=device)
    inner = upsample2d(ones, f, backend=backend)[..., 3:-3, 3:-3]
    torch.testing.assert_close(inner, torch.full_like(inner, 2.5))


def test_setup_filter():
    f = setup_filter([1, 3, 3, 1])
    assert f.dtype == torch.float32 and f.shape == (4, 4)
    torch.testing.assert_close(f, torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])) / 64)
    long = setup_filter(list(range(1, 9)))  # >= 8 taps stays 1-D
    assert long.shape == (8,) and abs(long.sum().item() - 1) < 1e-6
    assert setup_filter([1, 2], separable=True).shape == (2,)
    torch.testing.assert_close(setup_filter([1, 2, 3], normalize=False, gain=4, separable=True),
                               torch.tensor([2., 4, 6]))
    torch.testing.assert_close(setup_filter([[1, 2], [3, 4]], normalize=False, flip_filter=True, gain=3),
                               torch.tensor([[12., 9], [6, 3]]))
    assert setup_filter(None).shape == (1, 1)
    with pytest.raises(ValueError, match="1-D filter needs gain >= 0"):
        setup_filter([1, 2], separable=True, gain=-1)
    with pytest.raises(ValueError, match="separable=True needs a 1-D"):
        setup_filter([[1, 2], [3, 4]], separable=True)
    with pytest.raises(ValueError, match="1-D or a 2-D"):
        setup_filter(torch.ones(2, 2, 2))


def test_filter_gradient_runs_the_reference():
    g = torch.Generator().manual_seed(9)
    x, f = make_inputs((1, 2, 5, 5), (3, 3), F64, g)
    f.requires_grad_(True)
    out = upfirdn2d(x, f, up=2)  # auto: the compiled kernels give no filter gradient
    (gf,) = torch.autograd.grad(out.sum(), f)
    assert gf.shape == f.shape and gf.abs().sum() > 0
    for backend in ("cpu", "triton"):
        with pytest.raises(RuntimeError, match="constant"):
            upfirdn2d(x, f, backend=backend)


@pytest.mark.parametrize("backend, op_name", [("cpu", "head4d_upfirdn2d"), ("triton", "head4d_upfirdn2d_triton")])
def test_custom_op_in_graph(backend, op_name):
    require_backend(backend)
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    f = setup_filter([1, 3, 3, 1])
    out = upfirdn2d(x, f, up=2, padding=[2, 1, 2, 1], backend=backend)
    assert op_name in out.grad_fn.name()


@pytest.mark.parametrize("call, error, message", [
    (lambda x, f: upfirdn2d(x, torch.ones(2, 2, 2)), ValueError, r"f must be a 1-D \[fw\]"),
    (lambda x, f: upfirdn2d(x, torch.ones(())), ValueError, r"f must be a 1-D \[fw\]"),
    (lambda x, f: upfirdn2d(x, torch.ones(3, dtype=torch.int64)), TypeError, "f must be floating point"),
    (lambda x, f: upfirdn2d(x, [1.0, 2.0]), TypeError, "f must be a torch.Tensor"),
    (lambda x, f: upfirdn2d(x, f, up=-1), ValueError, "up must be >= 1"),
    (lambda x, f: upfirdn2d(x, f, down=0), ValueError, "down must be >= 1"),
    (lambda x, f: upfirdn2d(x, f, up=[2, -2]), ValueError, r"up\[1\] must be >= 1"),
    (lambda x, f: upfirdn2d(x, f, down=[1, 2, 3]), ValueError, r"down must be an int or \[x, y\]"),
    (lambda x, f: upfirdn2d(x, f, up=2.0), TypeError, "up must be an int"),
    (lambda x, f: upfirdn2d(x, f, padding=[1, 2, 3]), ValueError, "padding must be an int"),
    (lambda x, f: upfirdn2d(x[0], f), ValueError, r"x must have shape \[N, C, H, W\]"),
    (lambda x, f: upfirdn2d(x.long(), f), TypeError, "x must have a dtype"),
    (lambda x, f: upfirdn2d(x, f, padding=-3), ValueError, "smaller than the filter"),
    (lambda x, f: upfirdn2d(x, f, gain=float("nan")), TypeError, "gain must be a finite"),
    (lambda x, f: upfirdn2d(x, torch.ones(3), gain=-1.0), ValueError, "1-D filter needs gain >= 0"),
    (lambda x, f: upfirdn2d(x, f, flip_filter=1), TypeError, "flip_filter must be a bool"),
    (lambda x, f: upsample2d(x, f, up=0), ValueError, "up must be >= 1"),
    (lambda x, f: downsample2d(x, torch.ones(2, 2, 2)), ValueError, r"f must be a 1-D \[fw\]"),
])
def test_bad_input(call, error, message):
    x = torch.randn(1, 2, 4, 4)
    f = setup_filter([1, 3, 3, 1])
    with pytest.raises(error, match=message):
        call(x, f)


@pytest.mark.parametrize("backend, op", [("cpu", "upfirdn2d"), ("triton", "upfirdn2d_triton")])
@pytest.mark.parametrize("case", [CASES[0], CASES[4]])
def test_opcheck_and_compile(backend, op, case):
    """The backend's custom operator: schema, fake implementation and autograd
    (torch.library.opcheck), and torch.compile(fullgraph=True) tracing forward and
    backward like eager."""
    require_backend(backend)
    up, down, padding, fshape, flip, gain = case
    g = torch.Generator().manual_seed(31)
    x, f = make_inputs((2, 3, 6, 5), fshape, torch.float32, g)
    torch.library.opcheck(getattr(torch.ops.head4d, op).default,
                          (x.clone().requires_grad_(True), f, list(up), list(down), list(padding), flip, gain))

    def fn(t):
        return upfirdn2d(t, f, up=up, down=down, padding=padding, flip_filter=flip, gain=gain, backend=backend)

    results = []
    for run in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        t = x.clone().requires_grad_(True)
        out = run(t)
        (gx,) = torch.autograd.grad(out, t, torch.ones_like(out))
        results.append((out.detach(), gx))
    torch._dynamo.reset()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_empty_inputs(backend):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(41)
    f = setup_filter([1, 3, 3, 1], device=device)
    x = torch.randn(2, 9, 7, 3, generator=g, dtype=F64).to(device).permute(0, 3, 2, 1)  # [2, 3, 7, 9], strided
    assert not x.is_contiguous()
    for resample in (upsample2d, downsample2d, filter2d):
        torch.testing.assert_close(resample(x, f, backend=backend), resample(x, f, backend="torch"),
                                   atol=1e-12, rtol=1e-12)
    empty = torch.zeros(0, 3, 5, 5, dtype=F64, device=device)
    assert upsample2d(empty, f, backend=backend).shape == (0, 3, 10, 10)
