"""The compiled backends of composite_rays (``cpu``, ``cuda``) against the reference
(head4d/reference/compositing.py), forward and gradients, including the edges where
autograd through the reference gives NaN (a ray with zero total weight whose depth
output is used) or routes the depth gradient to the global min / max of the depths."""
import math

import pytest
import torch

from head4d.ops import compositing
from head4d.ops.compositing import composite_rays

from conftest import CUDA_EMULATED, require_backend

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu), CUDA_EMULATED]

#: Safety factor over the error estimate of :func:`assert_close_to_truth`.
SAFETY = 4.0


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def assert_close_to_truth(name, got, truth, reference_error, dtype, samples, nan):
    """``got`` (a backend's result in ``dtype``) against ``truth`` (the reference in
    float64 on the same input values), elementwise:

        |got - truth| <= u(dtype) |truth| + SAFETY (e_ref + samples u(compute) max|truth|)

    The kernels compute in float32 (float64 for float64 inputs) and round each result
    once to ``dtype``: ``u(dtype) |truth|``. Their arithmetic errs like any evaluation of
    the same formulas in the compute type: ``e_ref``, the reference's own error in the
    compute type on these inputs, measures that, conditioning included (EG3D's
    ``1 - alpha + 1e-10`` and ``1 - exp(-x)`` cancel where alpha is near 1 or 0); a sum or
    scan over ``samples`` terms adds up to ``samples u(compute)`` of the largest values.
    ``nan``: where the reference gives NaN in ``dtype`` (a ray whose weights all vanish in
    that dtype, its depth output used); ``got`` must be NaN exactly there."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    got, truth = got.double(), truth.double()
    assert torch.equal(torch.isnan(got), nan), f"{name}: NaN at other places than the reference"
    nan = nan | torch.isnan(truth)
    finite = truth[~nan]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    allowed = (unit_roundoff(dtype) * truth.abs()
               + SAFETY * (reference_error + samples * unit_roundoff(compute) * scale))
    err = (got - truth).abs()
    bad = ~nan & ~(err <= allowed)
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements beyond the bound; worst "
                           f"error {err[bad].max().item():.3g} where {allowed[bad][err[bad].argmax()].item():.3g} "
                           f"was allowed")


def formula_conditioning(dens, depths) -> torch.Tensor:
    """``[N, R]``: how much EG3D's compositing formulas amplify the rounding of one ray.
    ``alpha = 1 - exp(-x)`` is exact to an absolute roundoff, a relative one over
    ``alpha`` (large where ``x`` is tiny); each factor ``1 - alpha + 1e-10`` of the
    transmittance likewise over its value (large where ``alpha`` is near 1); both carry
    into every weight, so into every output and gradient of the ray."""
    d, t = dens.double(), depths.double()
    x = torch.nn.functional.softplus((d[:, :, 1:] + d[:, :, :-1]) / 2 - 1) * (t[:, :, 1:] - t[:, :, :-1])
    alpha = -torch.expm1(-x)
    inv_alpha = torch.where(alpha > 0, 1 / alpha, torch.zeros_like(alpha))  # alpha = 0 is exact
    return (inv_alpha.amax(dim=(2, 3)) + (1 / (1 - alpha + 1e-10)).sum(dim=(2, 3)))


def make_inputs(n, r, s, c, device, dtype=torch.float32, seed=0, background=False, density_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    colors = torch.randn(n, r, s, c, generator=g, dtype=torch.float64)
    dens = torch.randn(n, r, s, 1, generator=g, dtype=torch.float64) * density_scale
    depths = torch.sort(torch.rand(n, r, s, 1, generator=g, dtype=torch.float64) * 2 + 1.5, dim=2)[0]
    bg = torch.randn(n, r, c, generator=g, dtype=torch.float64) if background else None
    return [None if x is None else x.to(device=device, dtype=dtype) for x in (colors, dens, depths, bg)]


def run(backend, colors, dens, depths, bg, white_back, use=(True, True, True), seed=7, dtype=None):
    """Outputs and input gradients of ``backend`` on copies of the inputs cast to ``dtype``
    (default: theirs), for cotangents that are exact in the inputs' dtype."""
    dtype = colors.dtype if dtype is None else dtype
    leaves = [None if x is None else x.detach().to(dtype).requires_grad_(True) for x in (colors, dens, depths, bg)]
    outs = composite_rays(*leaves[:3], white_back=white_back, background=leaves[3], backend=backend)
    g = torch.Generator().manual_seed(seed)
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(colors.dtype).to(o) for o in outs]
    loss = sum((o.double() * w.double()).sum() for o, w, u in zip(outs, cots, use) if u)
    loss.backward()
    return outs, [None if x is None else x.grad for x in leaves]


def assert_matches(backend, colors, dens, depths, bg=None, white_back=False, use=(True, True, True)):
    """``backend`` on the inputs (in their dtype) against the reference in float64 on the
    same values, outputs and gradients, within :func:`assert_close_to_truth`'s bound."""
    args = (colors, dens, depths, bg, white_back, use)
    got = run(backend, *args)
    same_dtype = run("torch", *args)
    truth = run("torch", *args, dtype=torch.float64)
    # the reference's own error in the compute type: float32 measured directly; float64
    # estimated from float32's, scaled by the ratio of their roundoffs (first order), and
    # from the conditioning of EG3D's formulas per ray (see formula_conditioning)
    in_float32 = run("torch", *args, dtype=torch.float32)
    shrink = unit_roundoff(torch.float64) / unit_roundoff(torch.float32) if colors.dtype == torch.float64 else 1.0
    kappa = formula_conditioning(dens, depths) if colors.dtype == torch.float64 else None
    names = ("rgb", "depth", "weights", "colors", "densities", "depths", "background")
    flat = [tuple(r[0]) + tuple(r[1]) for r in (got, truth, in_float32, same_dtype)]
    for name, a, b, c, d in zip(names, *flat):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == colors.dtype and a.shape == b.shape, name
        reference_error = torch.nan_to_num((c.double() - b).abs(), nan=0.0, posinf=0.0) * shrink
        if kappa is not None:  # per ray, broadcast over samples and channels
            finite = b[torch.isfinite(b)]
            scale = finite.abs().max().item() if finite.numel() else 0.0
            per_ray = kappa.reshape(kappa.shape + (1,) * (b.dim() - 2))
            reference_error = reference_error + unit_roundoff(torch.float64) * per_ray * scale
        assert_close_to_truth(name, a, b, reference_error, colors.dtype, colors.shape[2], torch.isnan(d))
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["none", "white", "tensor"])
def test_matches_reference(backend, dtype, mode):
    device = require_backend(backend)
    colors, dens, depths, bg = make_inputs(2, 17, 13, 5, device, dtype, seed=1, background=mode == "tensor")
    assert_matches(backend, colors, dens, depths, bg, white_back=mode == "white")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 2, 1), (1, 1, 9, 3), (3, 4, 2, 2), (2, 33, 48, 32), (1, 7, 5, 19)])
def test_shapes(backend, shape):
    device = require_backend(backend)
    colors, dens, depths, bg = make_inputs(*shape, device, torch.float32, seed=2, background=True)
    assert_matches(backend, colors, dens, depths, bg)
    assert_matches(backend, colors, dens, depths, None, white_back=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    device = require_backend(backend)
    colors, dens, depths, bg = make_inputs(2, 6, 8, 4, device, torch.float64, seed=3, background=True)
    colors = colors.transpose(0, 1).contiguous().transpose(0, 1)
    depths = depths.expand(2, 6, 8, 1)[:, :, :, :]
    assert not colors.is_contiguous()
    assert_matches(backend, colors, dens, depths, bg[:, :, :])


def composite_truth(colors, dens, depths, bg):
    """rgb, depth and weights of each ray computed independently of torch, one interval
    at a time in float64 with Python's math library, alpha as -expm1(-x) (the exact
    formula, accurate to a few ulp for any x >= 0). Also returns the transmittance
    factors keep_k = 1 - alpha_k + 1e-10, whose conditioning the error bounds need."""
    c, s, t = (x.detach().double().cpu() for x in (colors, dens, depths))
    b = None if bg is None else bg.detach().double().cpu()
    n, r, S, C = c.shape
    rgb, depth, weights = torch.zeros(n, r, C, dtype=torch.float64), torch.zeros(n, r, 1, dtype=torch.float64), \
        torch.zeros(n, r, S - 1, 1, dtype=torch.float64)
    keeps = torch.zeros(n, r, S - 1, 1, dtype=torch.float64)
    t_lo, t_hi = float(t.min()), float(t.max())
    for i in range(n):
        for j in range(r):
            trans, total, dsum = 1.0, 0.0, 0.0
            acc = [0.0] * C
            for k in range(S - 1):
                z = (float(s[i, j, k, 0]) + float(s[i, j, k + 1, 0])) / 2 - 1
                sigma = z if z > 20 else math.log1p(math.exp(z))
                alpha = -math.expm1(-sigma * (float(t[i, j, k + 1, 0]) - float(t[i, j, k, 0])))
                w = alpha * trans
                keeps[i, j, k, 0] = 1 - alpha + 1e-10
                trans *= keeps[i, j, k, 0].item()
                weights[i, j, k, 0] = w
                total += w
                dsum += w * (float(t[i, j, k, 0]) + float(t[i, j, k + 1, 0])) / 2
                for ch in range(C):
                    acc[ch] += w * (float(c[i, j, k, ch]) + float(c[i, j, k + 1, ch])) / 2
            d = dsum / total if total > 0 else math.inf
            depth[i, j, 0] = min(max(d, t_lo), t_hi)
            for ch in range(C):
                v = acc[ch] + (0.0 if b is None else (1 - total) * float(b[i, j, ch]))
                rgb[i, j, ch] = v * 2 - 1
    return rgb, depth, weights, keeps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_densities_and_saturated_densities(backend, dtype):
    """Densities where alpha is ~1e-14 (1 - exp(-x) would keep only exp's last rounding
    bits), exactly 1 (the transmittance collapses to 1e-10 factors) and in softplus'
    linear branch. Both the kernel and the reference are held to a float64 truth with a
    bound that follows the conditioning: each weight is a product of O(S) correctly
    rounded steps whose relative error is at most ~(|z| + 16 S) eps (z the softplus
    argument: softplus(z) ~ exp(z) turns z's absolute rounding error into a relative
    one), plus 2 eps / keep_j for every earlier factor keep_j = 1 - alpha_j + 1e-10
    (alpha's absolute rounding error, relative to a keep that can be 1e-10); the depth, a weighted mean, moves by at most that relative error times the
    spread of the midpoints around it (this is what made a ray of alpha ~1e-14 fail by
    7% with 1 - exp); rgb by that times sum_k w_k |c_k|. Weights that underflow in
    float32 (the saturated ray) add an absolute error of S times the smallest normal."""
    device = require_backend(backend)
    colors, dens, depths, bg = make_inputs(1, 6, 10, 3, device, dtype, seed=4, background=True)
    dens[0, 0] = 0.0
    dens[0, 1] = 40.0   # softplus in its linear branch, alpha == 1: T collapses to 1e-10 factors
    dens[0, 2, 3:] = 25.0
    dens[0, 3] = -30.0  # alpha ~ 1e-14: the cancellation of 1 - exp(-x)
    assert_matches(backend, colors, dens, depths, bg)

    rgb_true, depth_true, w_true, keeps = composite_truth(colors, dens, depths, bg)
    S = dens.shape[2]
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    z_max = float((dens.double().abs().max() + 1))
    keep_err = torch.cumsum(2 * eps / keeps, dim=2) - 2 * eps / keeps  # sum over j < k
    w_err = ((z_max + 16 * S) * eps + keep_err) * w_true + S * tiny  # [N, R, S-1, 1]
    t = depths.double().cpu()
    t_mid = (t[:, :, 1:] + t[:, :, :-1]) / 2
    total = w_true.sum(dim=2)
    depth_bound = (w_err * (t_mid - depth_true[:, :, None]).abs()).sum(dim=2) / total * 2 + 4 * eps * depth_true
    c = colors.double().cpu()
    c_mid = ((c[:, :, 1:] + c[:, :, :-1]) / 2).abs()
    rgb_bound = 2 * (w_err * c_mid).sum(dim=2) + 2 * w_err.sum(dim=2) * bg.double().cpu().abs() \
        + 8 * S * eps * (1 + (w_true * c_mid).sum(dim=2) + bg.double().cpu().abs())
    assert float((w_true[0, 3].sum())) < 1e-12  # the ray that exercises the small-alpha branch
    for name in (backend, "torch"):
        rgb, depth, weights = composite_rays(colors, dens, depths, background=bg, backend=name)
        for what, got, want, bound in (("weights", weights, w_true, w_err), ("depth", depth, depth_true, depth_bound),
                                       ("rgb", rgb, rgb_true, rgb_bound)):
            err = (got.double().cpu() - want).abs()
            assert bool((err <= bound).all()), \
                f"{name} {what}: error {float((err / bound).max()):.3g} times the bound"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use", [(True, True, True), (True, False, False), (False, False, True),
                                 (False, True, False)])
def test_zero_weight_rays(backend, use):
    """All depths of a ray equal: zero weights, depth 0/0 = NaN -> inf -> the global max.
    Autograd through the reference gives NaN gradients for that ray's densities and
    depths when the depth output is used, and sends its depth gradient to the
    element(s) holding the global max; the kernels must do the same."""
    device = require_backend(backend)
    colors, dens, depths, _ = make_inputs(2, 5, 6, 3, device, torch.float64, seed=5)
    depths[0, 1] = 2.0
    depths[1, 3] = 1.0
    depths[1, 4, -1] = depths.max() + 1.0  # a unique global max
    depths[1, 2, -2:] = depths.max()      # ... now a tied one
    out, grads = assert_matches(backend, colors, dens, depths, use=use)
    assert out[1][0, 1, 0] == depths.max()
    if use[1]:
        assert torch.isnan(grads[1][0, 1]).all() and torch.isnan(grads[2][0, 1]).all()
    else:
        assert torch.isfinite(grads[1]).all() and torch.isfinite(grads[2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_depths_equal(backend):
    device = require_backend(backend)
    colors, dens, depths, bg = make_inputs(1, 3, 4, 2, device, torch.float64, seed=6, background=True)
    depths = torch.full_like(depths, 2.5)
    assert_matches(backend, colors, dens, depths, bg)
    assert_matches(backend, colors, dens, depths, bg, use=(True, False, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    device = require_backend(backend)
    colors, dens, depths, bg = make_inputs(2, 3, 5, 3, device, torch.float64, seed=8, background=True)
    inputs = [x.requires_grad_(True) for x in (colors, dens, depths, bg)]

    def fn(c, s, t, b):
        return composite_rays(c, s, t, background=b, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)

    def fn_white(c, s, t):
        return composite_rays(c, s, t, white_back=True, backend=backend)

    assert torch.autograd.gradcheck(fn_white, inputs[:3], eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b is not CUDA_EMULATED])  # a test-only backend
def test_auto_dispatch_prefers_compiled(backend, monkeypatch):
    device = require_backend(backend)
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_COMPOSITE_RAYS", raising=False)
    assert compositing.PREFERENCES[device.type][0] == backend
    colors, dens, depths, _ = make_inputs(1, 4, 6, 3, device, torch.float32, seed=9)
    colors.requires_grad_(True)
    rgb, _, _ = composite_rays(colors, dens, depths)
    assert "head4d_composite_rays" in type(rgb.grad_fn).__name__  # the custom operator's autograd node
