"""The compiled backends of composite_rays (``cpu``, ``cuda``) against the reference
(head4d/reference/compositing.py), forward and gradients, including the edges where
autograd through the reference gives NaN (a ray with zero total weight whose depth
output is used) or routes the depth gradient to the global min / max of the depths."""
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_densities_and_saturated_densities(backend, dtype):
    device = require_backend(backend)
    colors, dens, depths, bg = make_inputs(1, 6, 10, 3, device, dtype, seed=4, background=True)
    dens[0, 0] = 0.0
    dens[0, 1] = 40.0   # softplus in its linear branch, alpha == 1: T collapses to 1e-10 factors
    dens[0, 2, 3:] = 25.0
    dens[0, 3] = -30.0  # alpha ~ 0
    assert_matches(backend, colors, dens, depths, bg)


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
