"""The compiled backends of sample_importance (``cpu``, ``cuda``) against the reference
(head4d/reference/sampling.py): the same u from the same generator state, agreement to
float32 rounding, bit-exact agreement with the reference whose only difference (the
order of the weights' sum) is removed, and the edges (S = 4, one ray, zero weights,
long rays, non-contiguous inputs, bad inputs)."""
import pytest
import torch

from head4d import _backend
from head4d.ops import sampling
from head4d.ops.sampling import sample_importance, stratified_depths
from head4d.reference import sampling as reference

from conftest import CUDA_EMULATED, require_backend

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu), CUDA_EMULATED]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_coarse(n, r, s, device, dtype=torch.float32, seed=0, power=4.0):
    """Sorted depths in [2, 3] and compositing-like weights (mostly small, a few large)."""
    g = torch.Generator().manual_seed(seed)
    depths = 2.0 + torch.sort(torch.rand(n, r, s, 1, dtype=torch.float64, generator=g), dim=2).values
    weights = torch.rand(n, r, s - 1, 1, dtype=torch.float64, generator=g) ** power
    return depths.to(device=device, dtype=dtype), weights.to(device=device, dtype=dtype)


def run(backend, depths, weights, n_imp, det=False, seed=123):
    gen = None if det else torch.Generator(device=depths.device).manual_seed(seed)
    return sample_importance(depths, weights, n_imp, det=det, generator=gen, backend=backend)


def tolerance(depths, weights, extra_cdf_ulps=0):
    """Per ray, how far float32-rounding differences may move a sample: a CDF value
    off by a few ulps moves a sample by that much times (bin width / CDF step), at
    most over the ray's bins; the interpolation itself rounds at |z|; a half-precision
    output rounds at |z| once more. ``extra_cdf_ulps`` allows for a float32 cumsum
    (torch's CUDA scan) on the reference's side."""
    n, r, s, _ = depths.shape
    compute = compute_dtype(depths.dtype)
    z = depths.double().reshape(n * r, s)
    w = weights.double().reshape(n * r, s - 1)
    v = reference.smooth_weights(w)[:, 1:-1] + 1e-5
    pdf = v / v.sum(-1, keepdim=True)
    bins = 0.5 * (z[:, :-1] + z[:, 1:])
    width = (bins[:, 1:s - 2] - bins[:, :s - 3]).abs()
    sensitivity = (width / pdf).amax(-1) if s > 3 else torch.zeros(n * r, dtype=torch.float64)
    zmax = z.abs().amax(-1)
    eps = torch.finfo(compute).eps
    tol = (8 + extra_cdf_ulps) * eps * sensitivity + 8 * eps * zmax
    if depths.dtype != compute:
        tol = tol + torch.finfo(depths.dtype).eps * zmax
    return tol.reshape(n, r, 1, 1)


def assert_close_to_reference(got, ref, depths, weights, extra_cdf_ulps=0):
    assert got.shape == ref.shape and got.dtype == ref.dtype and got.device == ref.device
    diff = (got.double() - ref.double()).abs()
    tol = tolerance(depths, weights, extra_cdf_ulps).to(diff.device)
    assert torch.isfinite(got).all()
    bad = diff > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} samples differ beyond float32 rounding; "
                           f"max diff {diff.max().item():.3g}, max of diff / tol {(diff / tol).max().item():.3g}")


def reference_exact_total(depths, weights, u):
    """The reference with its one order-dependent step, ``sum(pdf weights)``, done
    exactly (float64 accumulation, then rounded), as the kernels do it; the rest is the
    reference's code path. On the CPU (whose cumsum accumulates in float64) the
    kernels must match this bit for bit."""
    n, r, s, _ = depths.shape
    compute = compute_dtype(depths.dtype)
    z = depths.reshape(n * r, s).to(compute)
    w = reference.smooth_weights(weights.reshape(n * r, s - 1).to(compute))[:, 1:-1] + 1e-5
    k = w.shape[-1]
    pdf = w / w.double().sum(dim=-1, keepdim=True).to(compute)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, dim=-1)], dim=-1)
    u = u.expand(n * r, -1).contiguous()
    idx = torch.searchsorted(cdf, u, right=True)
    below, above = (idx - 1).clamp(min=0), idx.clamp(max=k)
    bins = 0.5 * (z[:, :-1] + z[:, 1:])
    cb, ca = cdf.gather(1, below), cdf.gather(1, above)
    bb, ba = bins.gather(1, below), bins.gather(1, above)
    step = ca - cb
    step = torch.where(step < 1e-5, torch.ones_like(step), step)
    out = bb + (u - cb) / step * (ba - bb)
    return out.reshape(n, r, -1, 1).to(depths.dtype)


def extra_ulps(backend, s):
    # torch's CUDA cumsum scans in float32: allow its rounding to grow with the bins
    return s if backend == "cuda" else 0


# ----------------------------------------------------------------------------------
# Agreement with the reference
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("det", [False, True])
def test_matches_reference(backend, dtype, det):
    device = require_backend(backend)
    depths, weights = make_coarse(3, 150, 48, device, dtype, seed=1)
    weights[0, 0] = 0.0  # an empty ray
    got = run(backend, depths, weights, 48, det=det)
    ref = run("torch", depths, weights, 48, det=det)
    assert got.shape == (3, 150, 48, 1) and got.dtype == dtype
    assert_close_to_reference(got, ref, depths, weights, extra_ulps(backend, 48))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 4, 5), (1, 1, 48, 48), (4, 3, 4, 7), (2, 5, 5, 1), (2, 9, 12, 33),
                                   (1, 20, 200, 64), (3, 2, 97, 200)])
def test_shapes(backend, shape):
    n, r, s, n_imp = shape
    device = require_backend(backend)
    depths, weights = make_coarse(n, r, s, device, torch.float32, seed=s + n_imp)
    for det in (False, True):
        got = run(backend, depths, weights, n_imp, det=det)
        ref = run("torch", depths, weights, n_imp, det=det)
        assert got.shape == (n, r, n_imp, 1)
        assert_close_to_reference(got, ref, depths, weights, extra_ulps(backend, s))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("det", [False, True])
def test_cpu_bit_exact_but_for_the_sum_order(dtype, det):
    """Everything but the order of one sum follows the reference op by op."""
    device = require_backend("cpu")
    depths, weights = make_coarse(2, 200, 48, device, dtype, seed=2)
    got = run("cpu", depths, weights, 33, det=det, seed=5)
    compute = compute_dtype(dtype)
    if det:
        u = torch.linspace(0, 1, 33, dtype=compute).expand(1, 33)
    else:
        u = torch.rand(400, 33, generator=torch.Generator().manual_seed(5), dtype=compute)
    expected = reference_exact_total(depths, weights, u)
    if dtype == torch.float64:  # torch's float64 sum is not exact either: last-bit differences
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-12)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("det", [False, True])
def test_unsorted_cdf_follows_torchs_search(det):
    """Negative weights can make pdf values negative and the CDF unsorted; there the
    result depends on the binary search's probes, and the kernels use torch's."""
    device = require_backend("cpu")
    g = torch.Generator().manual_seed(21)
    depths = 2.0 + torch.sort(torch.rand(2, 50, 12, 1, generator=g), dim=2).values
    weights = torch.randn(2, 50, 11, 1, generator=g) * 0.3 - 0.1
    got = run("cpu", depths, weights, 25, det=det, seed=4)
    u = torch.linspace(0, 1, 25).expand(1, 25) if det else torch.rand(100, 25, generator=torch.Generator().manual_seed(4))
    expected = reference_exact_total(depths, weights, u)
    assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", [4, 48, 200])
@pytest.mark.parametrize("signed", [False, True])
def test_cuda_bit_exact_with_cpu(dtype, s, signed):
    """The CUDA kernel runs the CPU kernel's math in the same order: the same bits
    (``signed``: weights of both signs, unsorted CDFs)."""
    device = require_backend("cuda")
    require_backend("cpu")
    depths, weights = make_coarse(2, 300, s, torch.device("cpu"), dtype, seed=s)
    if signed:
        weights = (weights.float() * 0.6 - 0.15).to(dtype)
    for det in (False, True):
        gen_cpu = None if det else torch.Generator().manual_seed(9)
        gen_cpu2 = None if det else torch.Generator().manual_seed(9)  # CPU generator for the CUDA call too
        cpu = sample_importance(depths, weights, 48, det=det, generator=gen_cpu, backend="cpu")
        cuda = sample_importance(depths.to(device), weights.to(device), 48, det=det, generator=gen_cpu2,
                                 backend="cuda")
        assert cuda.device.type == "cuda"
        assert torch.equal(cuda.cpu(), cpu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_u_same_generator_same_result(backend):
    device = require_backend(backend)
    depths, weights = make_coarse(2, 40, 24, device, torch.float32, seed=3)
    g_fast = torch.Generator(device=device).manual_seed(77)
    g_ref = torch.Generator(device=device).manual_seed(77)
    got = sample_importance(depths, weights, 16, generator=g_fast, backend=backend)
    ref = sample_importance(depths, weights, 16, generator=g_ref, backend="torch")
    assert_close_to_reference(got, ref, depths, weights, extra_ulps(backend, 24))
    # the generators advanced identically: the next draw agrees
    assert torch.equal(g_fast.get_state(), g_ref.get_state())
    # a second call (the streams have moved on) agrees again and differs from the first
    got2 = sample_importance(depths, weights, 16, generator=g_fast, backend=backend)
    ref2 = sample_importance(depths, weights, 16, generator=g_ref, backend="torch")
    assert_close_to_reference(got2, ref2, depths, weights, extra_ulps(backend, 24))
    assert not torch.equal(got, got2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_generator(backend):
    device = require_backend(backend)
    depths, weights = make_coarse(1, 30, 16, device, torch.float32, seed=4)
    torch.manual_seed(2024)
    got = sample_importance(depths, weights, 10, backend=backend)
    torch.manual_seed(2024)
    ref = sample_importance(depths, weights, 10, backend="torch")
    assert_close_to_reference(got, ref, depths, weights, extra_ulps(backend, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_generator_for_cuda_tensors(backend):
    """A generator on another device than the tensors: drawn there, then moved (as the reference)."""
    device = require_backend(backend)
    depths, weights = make_coarse(1, 10, 8, device, torch.float32, seed=5)
    got = sample_importance(depths, weights, 6, generator=torch.Generator().manual_seed(1), backend=backend)
    ref = sample_importance(depths, weights, 6, generator=torch.Generator().manual_seed(1), backend="torch")
    assert got.device == depths.device
    assert_close_to_reference(got, ref, depths, weights, extra_ulps(backend, 8))


# ----------------------------------------------------------------------------------
# Edges
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_zero_weights(backend, dtype):
    """A uniform PDF over the S-3 reachable bins: det samples are the inverse CDF of
    a piecewise-uniform density, i.e. evenly spread over [bins[0], bins[S-3]] when the
    coarse depths are evenly spaced."""
    device = require_backend(backend)
    s = 11
    depths = torch.linspace(2.0, 3.0, s, dtype=dtype, device=device).reshape(1, 1, s, 1).repeat(2, 3, 1, 1)
    weights = torch.zeros(2, 3, s - 1, 1, dtype=dtype, device=device)
    got = run(backend, depths, weights, 9, det=True)
    ref = run("torch", depths, weights, 9, det=True)
    assert_close_to_reference(got, ref, depths, weights, extra_ulps(backend, s))
    bins = 0.5 * (depths[0, 0, :-1, 0] + depths[0, 0, 1:, 0])
    expected = torch.linspace(bins[0].item(), bins[s - 3].item(), 9, dtype=dtype, device=device)
    torch.testing.assert_close(got[1, 2, :, 0], expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    rnd = run(backend, depths, weights, 9)
    assert_close_to_reference(rnd, run("torch", depths, weights, 9), depths, weights, extra_ulps(backend, s))


@pytest.mark.parametrize("backend", BACKENDS)
def test_minimum_s_is_linear_in_u(backend):
    """S = 4: one reachable bin pair, the CDF is [0, 1]: sample = bins[0] + u * (bins[1] - bins[0])."""
    device = require_backend(backend)
    depths, weights = make_coarse(3, 4, 4, device, torch.float64, seed=6)
    got = run(backend, depths, weights, 5, det=True)
    bins = 0.5 * (depths[..., :-1, :] + depths[..., 1:, :])
    u = torch.linspace(0, 1, 5, dtype=torch.float64, device=device).reshape(1, 1, 5, 1)
    expected = bins[:, :, :1] + u * (bins[:, :, 1:2] - bins[:, :, :1])
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got, run("torch", depths, weights, 5, det=True), rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_stay_in_reachable_bins(backend):
    device = require_backend(backend)
    s = 30
    depths, weights = make_coarse(2, 64, s, device, torch.float32, seed=7, power=8.0)
    bins = 0.5 * (depths[..., :-1, :] + depths[..., 1:, :])
    for det in (False, True):
        got = run(backend, depths, weights, 40, det=det)
        # bins[0] .. bins[S-3] (K = S-3; the last midpoint is never reached)
        assert torch.all(got >= bins[:, :, :1] - 1e-6) and torch.all(got <= bins[:, :, s - 3:s - 2] + 1e-6)
    assert torch.any(got > bins[:, :, s - 4:s - 3])  # ... but the last reachable bin is


@pytest.mark.parametrize("backend", BACKENDS)
def test_very_long_rays(backend):
    """S beyond what one warp's shared memory holds on the GPU (the global-scratch path)."""
    device = require_backend(backend)
    depths, weights = make_coarse(1, 3, 13000, device, torch.float32, seed=8, power=1.0)
    for det in (False, True):
        got = run(backend, depths, weights, 70, det=det)
        ref = run("torch", depths, weights, 70, det=det)
        assert_close_to_reference(got, ref, depths, weights, extra_ulps(backend, 13000))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    device = require_backend(backend)
    depths, weights = make_coarse(3, 8, 20, device, torch.float32, seed=9)
    d_nc = depths.transpose(0, 1).contiguous().transpose(0, 1)          # permuted strides
    w_big = torch.zeros(3, 8, 2 * 19, 2, dtype=weights.dtype, device=device)
    w_big[:, :, ::2, 1:] = weights
    w_nc = w_big[:, :, ::2, 1:]                                            # strided view
    assert not d_nc.is_contiguous() and not w_nc.is_contiguous()
    for det in (False, True):
        got = run(backend, d_nc, w_nc, 12, det=det)
        ref = run("torch", depths, weights, 12, det=det)
        assert_close_to_reference(got, ref, depths, weights, extra_ulps(backend, 20))
    # expanded rays (stride 0 along R)
    d_exp = depths[:, :1].expand(3, 8, 20, 1)
    got = run(backend, d_exp, weights, 12, det=True)
    ref = run("torch", d_exp.contiguous(), weights, 12, det=True)
    assert_close_to_reference(got, ref, d_exp, weights, extra_ulps(backend, 20))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rays_and_one_sample(backend):
    device = require_backend(backend)
    depths, weights = make_coarse(2, 0, 6, device, torch.float32)
    g1, g2 = torch.Generator(device=device).manual_seed(1), torch.Generator(device=device).manual_seed(1)
    out = sample_importance(depths, weights, 4, generator=g1, backend=backend)
    sample_importance(depths, weights, 4, generator=g2, backend="torch")
    assert out.shape == (2, 0, 4, 1)
    assert torch.equal(g1.get_state(), g2.get_state())
    depths, weights = make_coarse(2, 3, 6, device, torch.float32, seed=10)
    got = run(backend, depths, weights, 1, det=True)  # u = linspace(0, 1, 1) = [0]: the first bin's midpoint
    torch.testing.assert_close(got, 0.5 * (depths[:, :, :1] + depths[:, :, 1:2]), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_weights_propagate_like_the_reference(backend):
    device = require_backend(backend)
    depths, weights = make_coarse(1, 4, 10, device, torch.float32, seed=11)
    weights[0, 1, 4] = float("nan")
    got = run(backend, depths, weights, 8, det=True)
    ref = run("torch", depths, weights, 8, det=True)
    assert torch.isnan(got[0, 1]).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient(backend):
    device = require_backend(backend)
    depths, weights = make_coarse(1, 5, 8, device, torch.float32, seed=12)
    depths.requires_grad_(True)
    weights.requires_grad_(True)
    out = run(backend, depths, weights, 6)
    assert not out.requires_grad and out.grad_fn is None


# ----------------------------------------------------------------------------------
# Dispatch and errors
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b is not CUDA_EMULATED])  # a test-only backend
def test_auto_dispatch_prefers_compiled(backend, monkeypatch):
    device = require_backend(backend)
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_SAMPLE_IMPORTANCE", raising=False)
    assert sampling.PREFERENCES[device.type][0] == backend
    calls = []
    real = sampling._sample_importance_compiled

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(sampling, "_sample_importance_compiled", spy)
    depths, weights = make_coarse(1, 3, 8, device, torch.float32, seed=13)
    sample_importance(depths, weights, 4)
    assert calls == [1]


def test_backends_of_the_other_sampling_ops(monkeypatch):
    require_backend("cpu")
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    depths, weights = make_coarse(1, 3, 8, torch.device("cpu"), torch.float32, seed=14)
    with pytest.raises(RuntimeError, match="not implemented for this op"):
        sample_importance(depths, weights, 4, backend="triton")
    # stratified_depths / merge_samples stay reference-only, also under the shared PREFERENCES
    assert stratified_depths(2.0, 3.0, 8, 4, jitter="none").shape == (1, 4, 8, 1)
    with pytest.raises(RuntimeError, match="not implemented for this op"):
        stratified_depths(2.0, 3.0, 8, 4, backend="cpu")
    monkeypatch.setenv("HEAD4D_BACKEND", "cpu")  # process-wide: ops without it run the reference
    assert stratified_depths(2.0, 3.0, 8, 4, jitter="none").shape == (1, 4, 8, 1)
    sample_importance(depths, weights, 4)


def test_errors_name_the_argument():
    require_backend("cpu")
    d, w = make_coarse(1, 2, 8, torch.device("cpu"), torch.float32, seed=15)
    with pytest.raises(ValueError, match="S >= 4"):
        sample_importance(d[:, :, :3], w[:, :, :2], 4, backend="cpu")
    with pytest.raises(ValueError, match="weights must have shape \\[N, R, S-1, 1\\] = \\[1, 2, 7, 1\\]"):
        sample_importance(d, torch.zeros(1, 2, 8, 1), 4, backend="cpu")
    with pytest.raises(ValueError, match="weights must have shape"):
        sample_importance(d, w[:, :1], 4, backend="cpu")
    with pytest.raises(TypeError, match="weights has dtype float64 but depths has float32"):
        sample_importance(d, w.double(), 4, backend="cpu")
    with pytest.raises(TypeError, match="depths must have a dtype in"):
        sample_importance(d.int(), w, 4, backend="cpu")
    with pytest.raises(TypeError, match="weights must have a dtype in"):
        sample_importance(d, w.long(), 4, backend="cpu")
    with pytest.raises(ValueError, match="weights is on meta but depths is on cpu"):
        sample_importance(d, w.to("meta"), 4, backend="cpu")
    with pytest.raises(ValueError, match="n_importance must be >= 1"):
        sample_importance(d, w, 0, backend="cpu")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        sample_importance(d, w, 4, backend="cuda")  # CPU tensors


def test_extension_checks_its_inputs():
    """head4d._C.sample_importance checks too (it is reachable without the Python op)."""
    require_backend("cpu")
    ext = _backend.extension()
    d, w = make_coarse(1, 2, 8, torch.device("cpu"), torch.float32, seed=16)
    u = torch.rand(2, 5)
    assert ext.sample_importance(d, w, u).shape == (1, 2, 5, 1)
    assert ext.sample_importance(d, w, u[0]).shape == (1, 2, 5, 1)
    with pytest.raises(ValueError, match="depths must have S >= 4"):
        ext.sample_importance(d[:, :, :3], w[:, :, :2], u)
    with pytest.raises(ValueError, match="weights must have shape \\[N, R, S-1, 1\\]"):
        ext.sample_importance(d, w[:, :, :6], u)
    with pytest.raises(TypeError, match="weights has dtype"):
        ext.sample_importance(d, w.double(), u)
    with pytest.raises(TypeError, match="depths must be float16, bfloat16, float32 or float64"):
        ext.sample_importance(d.int(), w.int(), u)
    with pytest.raises(TypeError, match="u must have dtype Float"):
        ext.sample_importance(d, w, u.double())
    with pytest.raises(ValueError, match="u must have shape"):
        ext.sample_importance(d, w, torch.rand(3, 5))
    with pytest.raises(ValueError, match="weights is on meta"):
        ext.sample_importance(d, w.to("meta"), u)
