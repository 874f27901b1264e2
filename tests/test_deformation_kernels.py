"""The compiled backends (``cpu``, ``cuda``) of ``sample_grid3d`` and ``one_ring_deform``
(csrc/grid3d/, csrc/onering/) against the reference (head4d/reference/deformation.py),
forward and gradients, on fresh random inputs: every dtype, zeros and border padding,
points inside, on the boundary, on grid planes and far outside, 1 / 3 / 32 channels,
vertex subsets (unsorted, repeated), padded one-ring rows, exact distance ties, batches,
non-contiguous inputs, each backward strategy of the CPU kernels, and bad input."""
import pytest
import torch

from head4d import _backend
from head4d.ops import deformation as D
from head4d.ops.deformation import one_ring_deform, sample_grid3d

from conftest import CUDA_EMULATED, require_backend

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu), CUDA_EMULATED]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
F64 = torch.float64

# (atol, rtol) per dtype for outputs; gradients get GRAD_SCALE times these
TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (2e-6, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
GRAD_SCALE = 10


def tol(dtype, scale=1):
    atol, rtol = TOL[dtype]
    return dict(atol=atol * scale, rtol=rtol * scale)


def rand(shape, g, lo=-1.0, hi=1.0):
    return torch.rand(shape, generator=g, dtype=F64) * (hi - lo) + lo


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def extension():
    """head4d._C; skips without it (fails in strict mode, as CI runs)."""
    require_backend("cuda_emulated" if _backend.emulating() else "cpu")
    return _backend.extension()


# ----------------------------------------------------------------------------------
# sample_grid3d
# ----------------------------------------------------------------------------------

def grid_points_mix(n, m, bound, g, sizes):
    """Points inside, on the box's faces / edges / corners, on grid planes, just and far
    outside. ``bound`` should be a power of two so that ``p / bound`` is exact whether a
    backend divides or multiplies by the reciprocal (grid-plane points then sit exactly
    on a plane for every backend, and one-sided gradients agree)."""
    w, h, d = sizes
    pts = rand((n, m, 3), g, -1.3, 1.3) * bound
    k = m // 6
    # on the faces of the box (and on its edges and corners where two or three hit)
    face = torch.randint(0, 2, (n, k, 3), generator=g).to(F64) * 2 - 1
    mask = torch.rand(n, k, 3, generator=g) < 0.5
    pts[:, :k] = torch.where(mask, face * bound, pts[:, :k])
    # on grid planes: coordinate j / (size - 1) * 2 - 1 in grid units
    sizes_t = torch.tensor([w, h, d], dtype=F64)
    planes = torch.floor(torch.rand(n, k, 3, generator=g, dtype=F64) * sizes_t) / (sizes_t - 1).clamp(min=1) * 2 - 1
    pts[:, k:2 * k] = planes * bound
    # far outside (finite in float16 too: an infinite coordinate samples NaN)
    pts[:, 2 * k:2 * k + 3] = torch.tensor([[40.0, 0.1, 0.2], [-3e4, 0.0, 0.0], [0.3, -0.2, 7.0]], dtype=F64) * bound
    return pts


def run_grid(backend, grid, pts, bound, padding, cot_seed=5):
    a, b = leaves(grid, pts)
    out = sample_grid3d(a, b, bound=bound, padding=padding, backend=backend)
    g = torch.Generator().manual_seed(cot_seed)
    cot = torch.randn(out.shape, generator=g, dtype=F64)
    (out.double() * cot).sum().backward()
    return out, a.grad, b.grad


def assert_grid_matches(backend, grid, pts, bound, padding, out_scale=1):
    got = run_grid(backend, grid, pts, bound, padding)
    ref = run_grid("torch", grid.cpu(), pts.cpu(), bound, padding)
    dtype = grid.dtype
    for name, a, b, scale in zip(("out", "grad_grid", "grad_points"), got, ref, (out_scale, GRAD_SCALE, GRAD_SCALE)):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # point gradients scale with the grid resolution / bound
        s = scale * (max(grid.shape[2:]) / bound if name == "grad_points" else 1)
        torch.testing.assert_close(a.cpu(), b, **tol(dtype, s), msg=lambda m: f"{name}: {m}")
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("channels", [1, 3, 32])
def test_grid3d_matches_reference(backend, dtype, padding, channels):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(100 + channels)
    bound = 0.5
    grid = torch.randn(2, channels, 5, 6, 7, generator=g, dtype=F64).to(device=device, dtype=dtype)
    pts = grid_points_mix(2, 60, bound, g, (7, 6, 5)).to(device=device, dtype=dtype)
    out, _, _ = assert_grid_matches(backend, grid, pts, bound, padding)
    if padding == "zeros":
        assert (out[:, 20:22] == 0).all()  # far outside (rows 2k, 2k + 1 with k = 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_grid3d_portrait4d_shapes(backend, padding):
    """The 24^3 displacement grid and the 8^3 squared-distance grid at their bounds,
    with points spread over the 1.3 box (a few outside the grid's bound)."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(7)
    for res, channels, bound in ((24, 3, D.PORTRAIT4D_FINE_BOUND), (8, 1, D.PORTRAIT4D_COARSE_BOUND)):
        grid = torch.randn(1, channels, res, res, res, generator=g).to(device)
        pts = (rand((1, 3000, 3), g) * 0.65).float().to(device)
        assert_grid_matches(backend, grid, pts, bound, padding)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_grid3d_gradcheck(backend, padding):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(11)
    grid = torch.randn(2, 3, 3, 4, 5, generator=g, dtype=F64).to(device).requires_grad_(True)
    pts = (rand((2, 9, 3), g, -0.75, 0.75)).to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: sample_grid3d(a, b, bound=0.6, padding=padding, backend=backend),
                                    (grid, pts), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grid3d_degenerate_sizes_and_points_dtype(backend):
    """D, H or W of 1 (align_corners=True maps every coordinate to that one plane),
    points in another dtype than the grid, and a bigger batch."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(12)
    for shape in ((3, 2, 1, 4, 5), (3, 2, 4, 1, 1), (3, 1, 1, 1, 1)):
        grid = torch.randn(shape, generator=g, dtype=F64).float().to(device)
        pts = rand((3, 25, 3), g, -1.2, 1.2).to(device)  # float64 points, float32 grid
        for padding in ("zeros", "border"):
            got = run_grid(backend, grid, pts, 1.0, padding)
            ref = run_grid("torch", grid.cpu(), pts.cpu(), 1.0, padding)
            for a, b in zip(got, ref):
                assert a.dtype == b.dtype
                torch.testing.assert_close(a.cpu(), b, **tol(torch.float32, GRAD_SCALE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grid3d_non_contiguous(backend):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(13)
    base = torch.randn(2, 6, 5, 4, 6, generator=g, dtype=F64).to(device)
    pts_base = rand((2, 3, 40), g, -0.8, 0.8).to(device)
    pts = pts_base.transpose(1, 2)  # [2, 40, 3], not contiguous
    for grid in (base[:, ::2],                                                  # strided channels
                 base.contiguous(memory_format=torch.channels_last_3d),         # channels-last
                 base.permute(0, 1, 2, 4, 3)):                                  # swapped H, W
        assert not grid.is_contiguous()
        assert_grid_matches(backend, grid, pts, 0.7, "zeros")
        assert_grid_matches(backend, grid.float(), pts.float(), 0.7, "border")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grid3d_partial_gradients(backend):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(14)
    grid = torch.randn(1, 3, 4, 4, 4, generator=g).to(device)
    pts = rand((1, 50, 3), g).float().to(device)
    for wants in ((True, False), (False, True)):
        a = grid.detach().clone().requires_grad_(wants[0])
        b = pts.detach().clone().requires_grad_(wants[1])
        sample_grid3d(a, b, bound=0.9, backend=backend).sum().backward()
        ra = grid.detach().cpu().clone().requires_grad_(wants[0])
        rb = pts.detach().cpu().clone().requires_grad_(wants[1])
        sample_grid3d(ra, rb, bound=0.9, backend="torch").sum().backward()
        for x, r in ((a, ra), (b, rb)):
            assert (x.grad is None) == (r.grad is None)
            if r.grad is not None:
                torch.testing.assert_close(x.grad.cpu(), r.grad, **tol(torch.float32, 100))


def test_grid3d_cpu_backward_strategies():
    """The CPU grid gradient goes through one task (few points), private per-thread
    buffers (Portrait4D-sized grids) or bands of depth slices (a large grid); each is
    deterministic and matches the reference."""
    require_backend("cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(15)
        cases = [((1, 3, 6, 6, 6), 500),         # one task
                 ((2, 3, 8, 8, 8), 6000),        # private buffers
                 ((1, 1, 130, 100, 90), 9000)]   # bands (grid larger than the buffer budget)
        for shape, m in cases:
            grid = torch.randn(shape, generator=g)
            pts = rand((shape[0], m, 3), g, -1.1, 1.1).float()
            first = run_grid("cpu", grid, pts, 1.0, "zeros")
            second = run_grid("cpu", grid, pts, 1.0, "zeros")
            assert all(torch.equal(x, y) for x, y in zip(first, second)), shape
            ref = run_grid("torch", grid, pts, 1.0, "zeros")
            for a, b in zip(first, ref):
                torch.testing.assert_close(a, b, **tol(torch.float32, 50))
    finally:
        torch.set_num_threads(before)


def test_grid3d_default_backend_and_empty():
    require_backend("cpu")
    grid = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    out = sample_grid3d(grid, torch.zeros(1, 5, 3), bound=1.0)
    assert "head4d_sample_grid3d" in out.grad_fn.name()  # the custom operator's autograd node
    assert sample_grid3d(grid, torch.zeros(1, 0, 3), bound=1.0, backend="cpu").shape == (1, 0, 3)
    assert sample_grid3d(grid[:, :0], torch.zeros(1, 4, 3), bound=1.0, backend="cpu").shape == (1, 4, 0)
    empty = sample_grid3d(torch.zeros(0, 2, 3, 3, 3), torch.zeros(0, 4, 3), bound=1.0, backend="cpu")
    assert empty.shape == (0, 4, 2)
    z = sample_grid3d(grid, torch.zeros(1, 0, 3, requires_grad=True), bound=1.0, backend="cpu")
    z.sum().backward()
    assert torch.equal(grid.grad, torch.zeros_like(grid))


def test_grid3d_extension_rejects_bad_input():
    ext = extension()
    grid, pts = torch.zeros(1, 2, 3, 3, 3), torch.zeros(1, 4, 3)
    with pytest.raises(ValueError, match="grid must have shape"):
        ext.sample_grid3d_forward(grid[0], pts, 1.0, 0)
    with pytest.raises(ValueError, match="points must have shape"):
        ext.sample_grid3d_forward(grid, pts[..., :2], 1.0, 0)
    with pytest.raises(ValueError, match="batch"):
        ext.sample_grid3d_forward(grid, pts.repeat(2, 1, 1), 1.0, 0)
    with pytest.raises(ValueError, match="padding"):
        ext.sample_grid3d_forward(grid, pts, 1.0, 2)
    with pytest.raises(ValueError, match="bound"):
        ext.sample_grid3d_forward(grid, pts, 0.0, 0)
    with pytest.raises(TypeError, match="points must be floating"):
        ext.sample_grid3d_forward(grid, pts.int(), 1.0, 0)
    with pytest.raises(TypeError, match="grid must be"):
        ext.sample_grid3d_forward(grid.int(), pts, 1.0, 0)
    with pytest.raises(ValueError, match="grad_out"):
        ext.sample_grid3d_backward(torch.zeros(3), grid, pts, 1.0, 0, True, True)
    with pytest.raises(RuntimeError, match="sample_grid3d: backend 'cuda'"):
        sample_grid3d(grid, pts, bound=1.0, backend="cuda")


# ----------------------------------------------------------------------------------
# one_ring_deform
# ----------------------------------------------------------------------------------

def ring_table(v, k, g, padding=True):
    """A [V, K] table: each vertex first, random others, some -1 padding (also inside a row)."""
    table = torch.randint(0, v, (v, k), generator=g)
    table[:, 0] = torch.arange(v)
    if padding:
        pad = torch.rand(v, k, generator=g) < 0.3
        pad[:, 0] = False
        table[pad] = -1
        table[1::5, 0] = -1   # a row whose own vertex is padding (others remain)
        table[1::5, 1] = 1
    return table


def mesh_like(n, v, g, scale=0.3):
    obs = torch.randn(n, v, 3, generator=g, dtype=F64) * scale
    canon = obs + 0.05 * torch.randn(n, v, 3, generator=g, dtype=F64)
    return obs, canon


def run_ring(backend, pts, obs, canon, table, subset, wants=(True, True, True), cot_seed=3):
    leafs = [t.detach().clone().requires_grad_(w) for t, w in zip((pts, obs, canon), wants)]
    out = one_ring_deform(*leafs, table, vertex_subset=subset, backend=backend)
    g = torch.Generator().manual_seed(cot_seed)
    cot = torch.randn(out.shape, generator=g, dtype=F64)
    if any(wants):
        (out.double() * cot).sum().backward()
    return [out] + [t.grad for t in leafs]


def assert_ring_matches(backend, pts, obs, canon, table, subset=None, wants=(True, True, True), grad_scale=GRAD_SCALE):
    got = run_ring(backend, pts, obs, canon, table, subset, wants)
    cpu = [t.cpu() for t in (pts, obs, canon, table)]
    ref = run_ring("torch", *cpu, None if subset is None else subset.cpu(), wants)
    dtype = pts.dtype
    for name, a, b in zip(("out", "grad_points", "grad_obs", "grad_canon"), got, ref):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = 1 if name == "out" else grad_scale
        torch.testing.assert_close(a.cpu(), b, **tol(dtype, scale), equal_nan=True, msg=lambda m: f"{name}: {m}")
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_subset", [False, True])
def test_one_ring_matches_reference(backend, dtype, use_subset):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(20)
    v, k = 300, 10
    obs, canon = mesh_like(2, v, g)
    table = ring_table(v, k, g)
    pts = torch.randn(2, 500, 3, generator=g, dtype=F64) * 0.35
    pts[:, :5] = obs[:, 10:15]                   # exactly on vertices
    pts[:, 5:8] = torch.tensor([[4.0, 0.0, 0.0], [0.0, -9.0, 1.0], [30.0, 30.0, 30.0]], dtype=F64)  # far away
    subset = None
    if use_subset:  # unsorted, with repeats, int32
        subset = torch.cat([torch.randperm(v, generator=g)[:120], torch.tensor([7, 7, 3])]).to(torch.int32)
    args = [t.to(device=device, dtype=dtype) for t in (pts, obs, canon)]
    # half precision: the loose tolerance applies to values of size ~1, the gradients are larger
    assert_ring_matches(backend, *args, table.to(device), None if subset is None else subset.to(device),
                        grad_scale=GRAD_SCALE if dtype in (F64, torch.float32) else 100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_ring_exact_ties_and_lattice(backend):
    """Vertices and points on a dyadic lattice: many exact distance ties, which must go to
    the lowest vertex index (within the subset) exactly as in the reference; the vertex
    order is shuffled so that the lowest index is not the first one in space."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(21)
    ax = torch.arange(-4, 4, dtype=F64) * 0.125
    lattice = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)  # 512 vertices
    lattice = lattice[torch.randperm(lattice.shape[0], generator=g)]
    v = lattice.shape[0]
    obs = lattice.unsqueeze(0)
    canon = obs + 0.01 * torch.arange(v, dtype=F64).view(1, v, 1)  # each vertex moves differently
    table = ring_table(v, 6, g, padding=False)
    # points at cell centres, edge and face midpoints: equidistant from 8, 2 or 4 vertices
    pts = (torch.randint(-8, 6, (1, 400, 3), generator=g).to(F64) * 0.0625)
    subset = torch.randperm(v, generator=g)[:200]
    for dtype in (torch.float32, F64):
        for sub in (None, subset):
            args = [t.to(device=device, dtype=dtype) for t in (pts, obs, canon)]
            got = run_ring(backend, *args, table.to(device), None if sub is None else sub.to(device))[0]
            ref = run_ring("torch", pts.to(dtype), obs.to(dtype), canon.to(dtype), table, sub)[0]
            # a different tie-break would move a point by >= 0.01 / K: far beyond rounding
            torch.testing.assert_close(got.cpu(), ref, **tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_ring_gradcheck(backend):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(22)
    obs, canon = mesh_like(2, 30, g)
    table = ring_table(30, 5, g).to(device)
    pts = (torch.randn(2, 7, 3, generator=g, dtype=F64) * 0.3)
    args = [t.to(device).requires_grad_(True) for t in (pts, obs, canon)]
    assert torch.autograd.gradcheck(lambda p, o, c: one_ring_deform(p, o, c, table, backend=backend), args,
                                    eps=1e-7, atol=1e-5, rtol=1e-4)
    subset = torch.tensor([3, 17, 4, 22, 9], device=device)
    assert torch.autograd.gradcheck(
        lambda p, o, c: one_ring_deform(p, o, c, table, vertex_subset=subset, backend=backend), args,
        eps=1e-7, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_ring_partial_gradients_and_non_contiguous(backend):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(23)
    obs, canon = mesh_like(3, 80, g)
    big = torch.randint(0, 80, (80, 12), generator=g)
    big[:, 0] = torch.arange(80)
    table = big[:, ::2]                              # non-contiguous int64 table
    pts = torch.randn(3, 3, 90, generator=g, dtype=F64).transpose(1, 2) * 0.3  # [3, 90, 3], non-contiguous
    obs_nc = torch.cat([obs, obs], dim=2)[:, :, ::2]  # non-contiguous copies of other data
    assert not (table.is_contiguous() or pts.is_contiguous() or obs_nc.is_contiguous())
    for wants in ((True, False, False), (False, True, False), (False, False, True), (True, True, True)):
        args = [t.to(device) for t in (pts, obs_nc, canon)]
        assert_ring_matches(backend, *args, table.to(device), None, wants)


def test_one_ring_cpu_multithreaded_backward_and_determinism():
    """Enough points for private per-task vertex-gradient buffers on 2 threads."""
    require_backend("cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(24)
        obs, canon = mesh_like(2, 200, g)
        table = ring_table(200, 8, g)
        pts = torch.randn(2, 3000, 3, generator=g, dtype=F64) * 0.3
        args = [t.float() for t in (pts, obs, canon)]
        first = assert_ring_matches("cpu", *args, table)
        second = run_ring("cpu", *args, table, None)
        assert all(torch.equal(x, y) for x, y in zip(first, second))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_ring_non_finite(backend):
    """A NaN point gives NaN (as the reference); a point so far away that every squared
    distance overflows float32 gives 0/0 = NaN weights (as the reference); the other
    points are unaffected."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(25)
    obs, canon = mesh_like(1, 50, g)
    table = ring_table(50, 6, g)
    pts = torch.randn(1, 6, 3, generator=g, dtype=F64) * 0.3
    pts[0, 1, 1] = float("nan")
    pts[0, 3] = torch.tensor([1e30, 0.0, 0.0])
    args = [t.float().to(device) for t in (pts, obs, canon)]
    out = one_ring_deform(*args, table.to(device), backend=backend).cpu()
    ref = one_ring_deform(*[t.float() for t in (pts, obs, canon)], table, backend="torch")
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[0, 3]).all()
    torch.testing.assert_close(out, ref, equal_nan=True, **tol(torch.float32))


def test_one_ring_default_backend_and_empty():
    require_backend("cpu")
    g = torch.Generator().manual_seed(26)
    obs, canon = mesh_like(1, 20, g)
    table = ring_table(20, 4, g)
    pts = torch.randn(1, 5, 3, dtype=F64, requires_grad=True)
    out = one_ring_deform(pts, obs, canon, table)
    assert "head4d_one_ring_deform" in out.grad_fn.name()  # the custom operator's autograd node
    assert one_ring_deform(pts[:, :0], obs, canon, table, backend="cpu").shape == (1, 0, 3)
    none = one_ring_deform(torch.zeros(0, 4, 3, dtype=F64), obs[:0], canon[:0], table, backend="cpu")
    assert none.shape == (0, 4, 3)
    e = one_ring_deform(pts[:, :0], obs.requires_grad_(True), canon, table, backend="cpu")
    e.sum().backward()
    assert torch.equal(obs.grad, torch.zeros_like(obs))


def test_one_ring_extension_rejects_bad_input():
    ext = extension()
    p, v = torch.zeros(1, 4, 3), torch.zeros(1, 6, 3)
    table = torch.zeros(6, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="points must have shape"):
        ext.one_ring_deform_forward(p[0], v, v, table, None)
    with pytest.raises(ValueError, match="verts_obs must have shape"):
        ext.one_ring_deform_forward(p, v.repeat(2, 1, 1), v, table, None)
    with pytest.raises(ValueError, match="verts_canon has shape"):
        ext.one_ring_deform_forward(p, v, v[:, :5], table, None)
    with pytest.raises(ValueError, match="neighbours must have shape"):
        ext.one_ring_deform_forward(p, v, v, table[:5], None)
    with pytest.raises(TypeError, match="neighbours must be int32 or int64"):
        ext.one_ring_deform_forward(p, v, v, table.float(), None)
    with pytest.raises(TypeError, match="one dtype"):
        ext.one_ring_deform_forward(p, v.double(), v, table, None)
    with pytest.raises(TypeError, match="points must be"):
        ext.one_ring_deform_forward(p.int(), v.int(), v.int(), table, None)
    with pytest.raises(ValueError, match="vertex_subset must have shape"):
        ext.one_ring_deform_forward(p, v, v, table, torch.zeros(0, dtype=torch.int64))
    with pytest.raises(TypeError, match="vertex_subset must be int32 or int64"):
        ext.one_ring_deform_forward(p, v, v, table, torch.zeros(2))
    out, nearest = ext.one_ring_deform_forward(p, v, v, table, None)
    with pytest.raises(ValueError, match="nearest does not match"):
        ext.one_ring_deform_backward(out, p, v, v, table, nearest.long(), True, True, True)
    with pytest.raises(ValueError, match="grad_out"):
        ext.one_ring_deform_backward(out[:, :2], p, v, v, table, nearest, True, True, True)
    with pytest.raises(RuntimeError, match="one_ring_deform: backend 'cuda'"):
        one_ring_deform(p, v, v, table, backend="cuda")
