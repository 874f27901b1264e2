"""The compiled backends of composite_rays (``cpu``, ``cuda``) against the reference
(head4d/reference/compositing.py), forward and gradients, including the edges where
autograd through the reference gives NaN (a ray with zero total weight whose depth
output is used) or routes the depth gradient to the global min / max of the depths."""
import pytest
import torch

from head4d.ops import compositing
from head4d.ops.compositing import composite_rays

from conftest import require_backend

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# (atol, rtol) per dtype, for outputs and gradients
TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}


def make_inputs(n, r, s, c, device, dtype=torch.float32, seed=0, background=False, density_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    colors = torch.randn(n, r, s, c, generator=g, dtype=torch.float64)
    dens = torch.randn(n, r, s, 1, generator=g, dtype=torch.float64) * density_scale
    depths = torch.sort(torch.rand(n, r, s, 1, generator=g, dtype=torch.float64) * 2 + 1.5, dim=2)[0]
    bg = torch.randn(n, r, c, generator=g, dtype=torch.float64) if background else None
    return [None if x is None else x.to(device=device, dtype=dtype) for x in (colors, dens, depths, bg)]


def run(backend, colors, dens, depths, bg, white_back, use=(True, True, True), seed=7):
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in (colors, dens, depths, bg)]
    outs = composite_rays(*leaves[:3], white_back=white_back, background=leaves[3], backend=backend)
    g = torch.Generator().manual_seed(seed)
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outs]
    loss = sum((o.double() * w.double()).sum() for o, w, u in zip(outs, cots, use) if u)
    loss.backward()
    return outs, [None if x is None else x.grad for x in leaves]


def assert_matches(backend, colors, dens, depths, bg=None, white_back=False, use=(True, True, True)):
    got_out, got_grad = run(backend, colors, dens, depths, bg, white_back, use)
    ref_out, ref_grad = run("torch", colors, dens, depths, bg, white_back, use)
    atol, rtol = TOL[colors.dtype]
    for name, a, b in zip(("rgb", "depth", "weights"), got_out, ref_out):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{name}: {m}")
    for name, a, b in zip(("colors", "densities", "depths", "background"), got_grad, ref_grad):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol * 10, rtol=rtol * 10, equal_nan=True,
                                   msg=lambda m: f"grad {name}: {m}")
    return got_out, got_grad


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_dispatch_prefers_compiled(backend, monkeypatch):
    device = require_backend(backend)
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_COMPOSITE_RAYS", raising=False)
    assert compositing.PREFERENCES[device.type][0] == backend
    colors, dens, depths, _ = make_inputs(1, 4, 6, 3, device, torch.float32, seed=9)
    colors.requires_grad_(True)
    rgb, _, _ = composite_rays(colors, dens, depths)
    assert "head4d_composite_rays" in type(rgb.grad_fn).__name__  # the custom operator's autograd node
