"""The compiled backends (``cpu``, ``cuda``) of ``closest_triangles`` and
``surface_field_grid`` (csrc/closest_triangles/) against the reference
(head4d/reference/deformation.py) on fresh random inputs: triangle soups with shared and
repeated vertices, a jittered icosphere with points near its centre (many near-ties),
exactly on its vertices, edges and faces and far outside, degenerate triangles (collinear,
a point, a repeated vertex, slivers at the interior threshold), ProceduralHead's companion
mesh on a grid and its full mesh, identity and rigid-motion fields, batches, every dtype,
gradients, NaN inputs, thread counts and bad input.

The CPU kernel computes the reference's distances bit for bit (the same operations in
the same order, cross products rounded as torch's CPU kernel rounds them), so its face
indices and squared distances are compared for equality. The CUDA kernel runs the same
operations, so it is compared for equality with the CPU kernel, and with the reference
on the GPU up to choices between faces whose reference distances tie within rounding."""
import math

import pytest
import torch

from head4d import _backend, ops
from head4d.ops import deformation as D
from head4d.reference import deformation as R

from conftest import CUDA_EMULATED, require_backend

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu), CUDA_EMULATED]
F64 = torch.float64
F32 = torch.float32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The reference's many [P, F] tensor ops run badly with intra-op threads on a busy
    2-core machine (tens of times slower); one thread keeps the file short. Restored
    afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def extension():
    """head4d._C; skips without it (fails in strict mode, as CI runs)."""
    require_backend("cuda_emulated" if _backend.emulating() else "cpu")
    return _backend.extension()


# ----------------------------------------------------------------------------------
# meshes and points
# ----------------------------------------------------------------------------------

def icosphere(radius=0.5, generator=None, jitter=0.0, subdivisions=1):
    """A subdivided icosahedron (42 vertices / 80 faces once subdivided), outward
    oriented, optionally jittered radially, float64."""
    t = (1 + math.sqrt(5)) / 2
    verts = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
             (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    faces = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2),
             (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5),
             (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    verts = [tuple(c / math.sqrt(sum(x * x for x in v)) for c in v) for v in verts]
    for _ in range(subdivisions):
        mid = {}

        def midpoint(i, j):
            key = (min(i, j), max(i, j))
            if key not in mid:
                m = [(a + b) / 2 for a, b in zip(verts[i], verts[j])]
                n = math.sqrt(sum(x * x for x in m))
                verts.append(tuple(x / n for x in m))
                mid[key] = len(verts) - 1
            return mid[key]

        sub = []
        for a, b, c in faces:
            ab, bc, ca = midpoint(a, b), midpoint(b, c), midpoint(c, a)
            sub += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = sub
    v = torch.tensor(verts, dtype=F64)
    if jitter:
        v = v * (1 + jitter * (torch.rand(v.shape[0], 1, generator=generator, dtype=F64) - 0.5))
    return v * radius, torch.tensor(faces, dtype=torch.int64)


def rotation(axis, angle):
    x, y, z = (a / math.sqrt(sum(c * c for c in axis)) for a in axis)
    c, s = math.cos(angle), math.sin(angle)
    k = torch.tensor([[0, -z, y], [z, 0, -x], [-y, x, 0]], dtype=F64)
    return torch.eye(3, dtype=F64) + s * k + (1 - c) * (k @ k)


def feature_points(verts, faces, g):
    """Points exactly on every vertex, on edges (midpoints and a quarter along), inside
    faces, and just off them along the normal: [P, 3]."""
    f = faces.long()
    edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]).sort(1).values.unique(dim=0)
    a, b = verts[edges[:, 0]], verts[edges[:, 1]]
    w = torch.rand(f.shape[0], 3, generator=g, dtype=F64) + 0.1
    w = w / w.sum(1, keepdim=True)
    inside = (w.unsqueeze(-1) * verts[f]).sum(1)
    n = torch.cross(verts[f[:, 1]] - verts[f[:, 0]], verts[f[:, 2]] - verts[f[:, 0]], dim=-1)
    off = inside + 0.05 * n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.cat([verts, 0.5 * (a + b), 0.75 * a + 0.25 * b, inside, off])


def soup(g, n, num_verts, num_faces):
    """Random triangles over a shared vertex pool (shared vertices and edges, some
    repeated indices: degenerate faces)."""
    verts = torch.rand(n, num_verts, 3, generator=g, dtype=F64) * 2 - 1
    faces = torch.randint(0, num_verts, (num_faces, 3), generator=g)
    return verts, faces


def mixed_points(g, n, m, scale=1.2):
    p = torch.rand(n, m, 3, generator=g, dtype=F64) * 2 * scale - scale
    p[:, : m // 8] *= 0.02   # near the centre: many faces nearly tied
    p[:, m // 8: m // 4] *= 40.0  # far outside
    return p


# ----------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------

def ref_sq_dists(points, verts, faces):
    """The reference's [N, M, F] distance matrix (what its argmin runs on)."""
    f = faces.long()
    out = []
    for i in range(points.shape[0]):
        v = verts[i]
        tri = R._triangle_data(v[f[:, 0]], v[f[:, 1]], v[f[:, 2]], f[:, 0], f[:, 1], f[:, 2])
        tri = {k: t.unsqueeze(0) for k, t in tri.items()}
        p = points[i]
        out.append(R._sq_dist(p[:, 0:1], p[:, 1:2], p[:, 2:3], tri))
    return torch.stack(out)


def assert_same_choice(face, face_ref, points, verts, faces, exact):
    """exact: identical indices. Otherwise a differing index must name a face whose
    reference distance ties the reference's choice within float32 rounding."""
    if exact:
        assert torch.equal(face, face_ref), (face != face_ref).nonzero()[:10]
        return
    differ = face != face_ref
    if not differ.any():
        return
    d = ref_sq_dists(points.to(verts.dtype), verts, faces)
    got = d.gather(2, face.unsqueeze(-1)).squeeze(-1)
    want = d.gather(2, face_ref.unsqueeze(-1)).squeeze(-1)
    tol = 1e-5 * want.abs() + 1e-10
    assert ((got - want).abs() <= tol)[differ].all()


def closest(backend, points, verts, faces):
    return ops.closest_triangles(points, verts, faces, backend=backend)


def check_closest(backend, device, points, verts, faces, atol=None):
    """The backend against the reference on the same device: indices (exact on the CPU),
    squared distances (bitwise on the CPU), barycentrics and signed distances to
    rounding; on CUDA also against the CPU kernel, bit for bit."""
    points, verts, faces = points.to(device), verts.to(device), faces.to(device)
    got = closest(backend, points, verts, faces)
    ref = R.closest_triangles(points, verts, faces)
    exact = backend == "cpu"
    assert got[0].dtype == torch.int64 and got[0].shape == ref[0].shape
    for t, r in zip(got[1:], ref[1:]):
        assert t.dtype == r.dtype and t.shape == r.shape
    assert_same_choice(got[0], ref[0], points, verts, faces, exact)
    same = got[0] == ref[0]
    if exact:
        assert torch.equal(got[3], ref[3])
    else:
        torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-12)
    if atol is None:
        atol = 1e-12 if points.dtype == F64 else 5e-6
    scale = 1 + points.abs().amax(-1)  # bary and signed grow with the distance to the face
    torch.testing.assert_close((got[1] / scale.unsqueeze(-1))[same], (ref[1] / scale.unsqueeze(-1))[same],
                               rtol=0, atol=atol)
    torch.testing.assert_close((got[2] / scale)[same], (ref[2] / scale)[same], rtol=0, atol=atol)
    if backend == "cuda":
        cpu = closest("cpu", points.cpu(), verts.cpu(), faces.cpu())
        assert torch.equal(got[0].cpu(), cpu[0]) and torch.equal(got[3].cpu(), cpu[3])
        for t, c in zip(got[1:3], cpu[1:3]):
            torch.testing.assert_close(t.cpu(), c, rtol=0, atol=atol)
    return got


# ----------------------------------------------------------------------------------
# closest_triangles
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_soups(backend, dtype, index_dtype):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(10 + (dtype == F64) + 2 * (index_dtype == torch.int32))
    verts, faces = soup(g, 2, 90, 150)
    points = mixed_points(g, 2, 700)
    points[:, 700 - 90:] = verts  # exactly on the (shared) vertices
    check_closest(backend, device, points.to(dtype), verts.to(dtype), faces.to(index_dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_icosphere_features_and_ties(backend, dtype):
    """Points on vertices (distance 0, the lowest face holding the vertex), on shared
    edges, inside faces, off them, near the centre and far outside."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(20 + (dtype == F64))
    base, faces = icosphere(0.5, g, jitter=0.3, subdivisions=2)  # 162 vertices, 320 faces
    rot = rotation((1.0, 2.0, 3.0), 0.7)
    verts = torch.stack([base, base @ rot.T * 1.1])
    feats = torch.stack([feature_points(verts[i], faces, g) for i in range(2)])
    points = torch.cat([feats, mixed_points(g, 2, 400)], 1)
    got = check_closest(backend, device, points.to(dtype), verts.to(dtype), faces)
    # on a vertex: squared distance 0, and the lowest face holding it
    nv = verts.shape[1]
    on_vertex = got[0][:, :nv].cpu()
    lowest = torch.tensor([min(i for i, f in enumerate(faces.tolist()) if v in f) for v in range(nv)])
    assert torch.equal(on_vertex, lowest.expand(2, -1))
    assert (got[3][:, :nv] == 0).all()
    # many points outside had several exactly tied faces (shared vertex / edge)
    d = ref_sq_dists(points.to(dtype), verts.to(dtype), faces)
    best = d.min(-1, keepdim=True).values
    assert ((d == best).sum(-1) > 1).sum() > 100


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["far_from_origin", "mixed_scales", "quantized"])
def test_rounding_stress(backend, case):
    """Configurations where rounding is largest relative to the geometry: a small mesh
    far from the origin in float32, tiny triangles next to big ones, and coordinates on
    a coarse lattice (many exact ties between unrelated faces)."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(25 + ["far_from_origin", "mixed_scales", "quantized"].index(case))
    verts, faces = soup(g, 1, 120, 200)
    points = mixed_points(g, 1, 500)
    if case == "far_from_origin":
        verts, points = verts * 0.05 + 300.0, points * 0.05 + 300.0
    elif case == "mixed_scales":
        small = torch.rand(1, 120, 1, generator=g) < 0.8
        verts = torch.where(small, verts * 0.01, verts)
        points[:, :250] *= 0.02
    else:
        verts, points = torch.round(verts * 4) / 4, torch.round(points * 8) / 8
    for dtype in (F32, F64):
        check_closest(backend, device, points.to(dtype), verts.to(dtype), faces)


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_triangles(backend):
    """Collinear, a point, a repeated vertex, slivers on both sides of the interior
    threshold (sin^2 of the angle at the first corner against float32 eps), mixed with
    proper triangles; and a mesh of degenerate triangles only."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(30)
    eps = torch.finfo(F32).eps
    s_in, s_out = math.sqrt(eps) * 3, math.sqrt(eps) / 3
    verts = torch.tensor([[0, 0, 0], [1, 0, 0], [2, 0, 0], [0, 1, 0], [0.5, 0.5, 1.0], [3, 3, 3],
                          [0, 0, 1], [1, s_in, 1], [1, s_out, 1], [2, 0, 1], [-1, 0.5, -1], [1, 2, 0.5]],
                         dtype=F64)
    faces = torch.tensor([[0, 1, 2],   # collinear
                          [5, 5, 5],   # a point
                          [3, 3, 4],   # a repeated vertex: the segment 3-4
                          [6, 9, 7],   # a sliver above the interior threshold
                          [6, 9, 8],   # a sliver below it
                          [0, 1, 3],   # proper
                          [10, 11, 4]])
    points = torch.rand(1, 400, 3, generator=g, dtype=F64) * 5 - 1.5
    points[0, :12] = verts
    points[0, 12:20] = torch.tensor([1.0, 0.0, 1.0], dtype=F64) + 1e-3 * torch.randn(8, 3, generator=g, dtype=F64)
    for dtype in (F32, F64):
        got = check_closest(backend, device, points.to(dtype), verts.unsqueeze(0).to(dtype), faces)
        assert all(torch.isfinite(t).all() for t in got[1:])
        only = check_closest(backend, device, points.to(dtype), verts.unsqueeze(0).to(dtype), faces[:3])
        assert (only[2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_procedural_head_full_mesh(backend):
    """The ~10 k-face head: points near its surface and spread over the box."""
    from head4d.head import ProceduralHead

    device = require_backend(backend)
    head = _head()
    verts = head.canonical_vertices().to(F64).unsqueeze(0)
    faces = head.faces
    g = torch.Generator().manual_seed(40)
    near = verts[0, torch.randint(0, verts.shape[1], (150,), generator=g)]
    near = near + 0.01 * torch.randn(150, 3, generator=g, dtype=F64)
    spread = torch.rand(100, 3, generator=g, dtype=F64) * 1.3 - 0.65
    points = torch.cat([near, spread, verts[0, :20]]).unsqueeze(0)
    for dtype in (F32, F64):
        check_closest(backend, device, points.to(dtype), verts.to(dtype), faces.to(torch.int32))


_HEAD = []


def _head():
    if not _HEAD:
        from head4d.head import ProceduralHead

        _HEAD.append(ProceduralHead())
    return _HEAD[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(backend, dtype):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(50)
    base, faces = icosphere(0.5, g, jitter=0.3)
    verts = base.unsqueeze(0).to(dtype)
    points = mixed_points(g, 1, 300).to(dtype)
    got = closest(backend, points.to(device), verts.to(device), faces.to(device))
    ref = R.closest_triangles(points.to(device), verts.to(device), faces.to(device))
    assert all(t.dtype == dtype for t in got[1:])
    assert_same_choice(got[0], ref[0], points.to(device), verts.float().to(device), faces.to(device),
                       backend == "cpu")
    for t, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(t.float(), r.float(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closest_triangles_gradients(backend):
    """Gradients w.r.t. points and verts equal the reference's (the compiled search,
    then the reference's own recomputation of the chosen faces)."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(60)
    base, faces = icosphere(0.5, g, jitter=0.3)
    verts0 = torch.stack([base, base * 0.9 + 0.02])
    points0 = mixed_points(g, 2, 200, scale=0.8)
    w = [torch.randn(2, 200, 3, generator=g, dtype=F64), torch.randn(2, 200, generator=g, dtype=F64),
         torch.randn(2, 200, generator=g, dtype=F64)]
    grads = []
    for which in (backend, "torch"):
        p = points0.to(device).requires_grad_(True)
        v = verts0.to(device).requires_grad_(True)
        face, bary, signed, sq = ops.closest_triangles(p, v, faces.to(device), backend=which)
        assert bary.requires_grad and signed.requires_grad and sq.requires_grad
        loss = (bary * w[0].to(device)).sum() + (signed * w[1].to(device)).sum() + (sq * w[2].to(device)).sum()
        loss.backward()
        grads.append((face, bary.detach(), p.grad, v.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=1e-13)
    torch.testing.assert_close(grads[0][2], grads[1][2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0][3], grads[1][3], rtol=1e-10, atol=1e-10)
    # only verts requiring a gradient; and under no_grad nothing is tracked
    v_grads = []
    for which in (backend, "torch"):
        v = verts0.to(device).requires_grad_(True)
        _, _, _, sq = ops.closest_triangles(points0.to(device), v, faces.to(device), backend=which)
        sq.sum().backward()
        v_grads.append(v.grad)
    torch.testing.assert_close(v_grads[0], v_grads[1], rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        out = ops.closest_triangles(points0.to(device), v, faces.to(device), backend=backend)
    assert not any(t.requires_grad for t in out[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_values_match_recomputed_values(backend):
    """The in-kernel values (no gradient needed) against the autograd recomputation."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(70)
    verts, faces = soup(g, 1, 40, 60)
    points = mixed_points(g, 1, 300)
    for dtype, atol in ((F64, 1e-12), (F32, 5e-6)):
        p, v, f = points.to(device, dtype), verts.to(device, dtype), faces.to(device)
        plain = closest(backend, p, v, f)
        tracked = closest(backend, p.clone().requires_grad_(True), v, f)
        assert torch.equal(plain[0], tracked[0]) and torch.equal(plain[3], tracked[3].detach())
        scale = 1 + p.abs().amax(-1)
        torch.testing.assert_close(plain[1] / scale.unsqueeze(-1), tracked[1].detach() / scale.unsqueeze(-1),
                                   rtol=0, atol=atol)
        torch.testing.assert_close(plain[2] / scale, tracked[2].detach() / scale, rtol=0, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_follow_argmin(backend):
    """A NaN point's distances are all NaN: argmin picks face 0. A face with a NaN
    corner has NaN distances and wins everywhere (argmin treats NaN as smallest)."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(80)
    verts, faces = soup(g, 1, 30, 50)
    points = mixed_points(g, 1, 100)
    points[0, 3, 1] = float("nan")
    points[0, 5] = float("inf")
    got = closest(backend, points.to(device), verts.to(device), faces.to(device))
    ref = R.closest_triangles(points.to(device), verts.to(device), faces.to(device))
    assert torch.equal(got[0], ref[0]) and got[0][0, 3] == 0
    torch.testing.assert_close(got[3], ref[3], rtol=0, atol=0, equal_nan=True)
    bad = verts.clone()
    v_nan = int(faces[17, 1])
    bad[0, v_nan, 0] = float("nan")
    got = closest(backend, points.to(device), bad.to(device), faces.to(device))
    ref = R.closest_triangles(points.to(device), bad.to(device), faces.to(device))
    assert torch.equal(got[0], ref[0])
    first = min(i for i, f in enumerate(faces.tolist()) if v_nan in f)
    assert got[0][0, 3] == 0  # the NaN point: every distance NaN, the first face
    assert (got[0][0, :3] == first).all() and (got[0][0, 4:] == first).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_strides_and_empty(backend):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(90)
    verts, faces = soup(g, 3, 50, 80)
    points = mixed_points(g, 3, 160)
    # non-contiguous views
    p = points.transpose(1, 2).contiguous().transpose(1, 2)
    v = torch.stack([verts, -verts], -1)[..., 0]
    f = torch.stack([faces, -faces], -1)[..., 0]
    assert not (p.is_contiguous() or v.is_contiguous() or f.is_contiguous())
    got = check_closest(backend, device, p, v, f)
    for i in range(3):  # each batch element on its own
        one = closest(backend, points[i:i + 1].to(device), verts[i:i + 1].to(device), faces.to(device))
        for t, o in zip(got, one):
            assert torch.equal(t[i:i + 1], o)
    # empty point sets and batches
    e = closest(backend, points[:, :0].to(device), verts.to(device), faces.to(device))
    assert [t.shape for t in e] == [(3, 0), (3, 0, 3), (3, 0), (3, 0)]
    e = closest(backend, points[:0].to(device), verts[:0].to(device), faces.to(device))
    assert [t.shape for t in e] == [(0, 160), (0, 160, 3), (0, 160), (0, 160)]


def test_cpu_results_do_not_depend_on_threads():
    require_backend("cpu")
    g = torch.Generator().manual_seed(100)
    verts, faces = soup(g, 2, 60, 100)
    points = mixed_points(g, 2, 500)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = closest("cpu", points, verts, faces)
        torch.set_num_threads(2)
        two = closest("cpu", points, verts, faces)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_many_tiles_unranked():
    """More than 2048 tiles of 64 faces: the CUDA kernel walks the tiles unranked."""
    device = require_backend("cuda")
    g = torch.Generator().manual_seed(110)
    verts, faces = soup(g, 1, 3000, 140_000)
    points = mixed_points(g, 1, 40)
    check_closest("cuda", device, points.float(), verts.float(), faces)


# ----------------------------------------------------------------------------------
# surface_field_grid
# ----------------------------------------------------------------------------------

def check_field(backend, device, obs, canon, faces, resolution, bound, exact_index=True, atol=None):
    """The field against the reference; the kernel's grid search against the reference's
    closest_triangles on the same grid points."""
    obs, canon, faces = obs.to(device), canon.to(device), faces.to(device)
    disp, sq = ops.surface_field_grid(obs, canon, faces, resolution=resolution, bound=bound, backend=backend)
    rdisp, rsq = R.surface_field_grid(obs, canon, faces, resolution, bound)
    assert disp.shape == rdisp.shape and disp.dtype == rdisp.dtype and sq.shape == rsq.shape
    compute = R._compute(obs.dtype)
    x = R.grid_points(resolution, bound, compute, device).unsqueeze(0).expand(obs.shape[0], -1, -1)
    face = extension().surface_field_grid_forward(obs, None, faces, resolution, bound)[0]
    rface = R.closest_triangles(x, obs.to(compute), faces)[0]
    exact = backend == "cpu" and exact_index
    assert_same_choice(face, rface, x, obs.to(compute), faces, exact)
    same = (face == rface).reshape(rsq.shape)
    if atol is None:
        atol = 1e-12 if obs.dtype == F64 else 5e-6
    if exact:
        assert torch.equal(sq, rsq)
    else:
        torch.testing.assert_close(sq, rsq, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(disp[same.expand_as(disp)], rdisp[same.expand_as(rdisp)], rtol=0, atol=atol)
    if backend == "cuda":
        cdisp, csq = ops.surface_field_grid(obs.cpu(), canon.cpu(), faces.cpu(), resolution=resolution, bound=bound,
                                            backend="cpu")
        assert torch.equal(sq.cpu(), csq)
        torch.testing.assert_close(disp.cpu(), cdisp, rtol=0, atol=atol)
    return disp, sq


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_companion_mesh_grid(backend, dtype):
    """ProceduralHead's companion mesh (~1,450 faces), posed against canonical, on an
    8^3 grid at Portrait4D's fine bound, and a 9^3 grid past the mesh (bound 0.9)."""
    device = require_backend(backend)
    head = _head()
    codes = head.canonical_codes(2)
    g = torch.Generator().manual_seed(120)
    codes["neck_pose"] = torch.randn(2, 3, generator=g).to(codes["neck_pose"].dtype) * 0.3
    codes["jaw_pose"] = codes["jaw_pose"] * 0.3
    with torch.no_grad():
        obs = head.companion_vertices(head(**codes)).to(dtype)
        canon = head.companion_vertices(head.canonical_vertices()).to(dtype).expand(2, -1, -1)
    faces = head.companion_faces
    check_field(backend, device, obs, canon, faces, 8, D.PORTRAIT4D_FINE_BOUND)
    check_field(backend, device, obs, canon, faces.to(torch.int32), 9, 0.9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_companion_mesh_portrait4d_grid(backend):
    """Portrait4D's own grid: 24^3 cell centres of the 1.3 box, float32."""
    device = require_backend(backend)
    head = _head()
    codes = head.canonical_codes(1)
    codes["neck_pose"] = torch.tensor([[0.25, -0.3, 0.1]], dtype=codes["neck_pose"].dtype)
    with torch.no_grad():
        obs = head.companion_vertices(head(**codes))
        canon = head.companion_vertices(head.canonical_vertices()).unsqueeze(0)
    check_field(backend, device, obs, canon, head.companion_faces, 24, D.PORTRAIT4D_FINE_BOUND)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_mesh_small_grid(backend):
    device = require_backend(backend)
    head = _head()
    with torch.no_grad():
        canon = head.canonical_vertices().unsqueeze(0)
        obs = canon @ rotation((0.2, 1.0, 0.1), 0.3).float().T + torch.tensor([0.01, -0.02, 0.0])
    check_field(backend, device, obs, canon, head.faces, 5, D.PORTRAIT4D_FINE_BOUND)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_identity_and_rigid_motion(backend, dtype):
    """An identity deformation gives zero displacement; a rigid motion gives
    R^T (x - t) - x at every grid point, with the reference's values."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(130)
    a, faces = icosphere(0.4, g, jitter=0.3)
    b, _ = icosphere(0.3, g, jitter=0.5)
    verts = torch.stack([a, b]).to(dtype)
    disp, _ = check_field(backend, device, verts, verts, faces, 9, D.PORTRAIT4D_FINE_BOUND)
    assert disp.abs().max().item() <= (1e-12 if dtype == F64 else 2e-6)

    canon, faces = icosphere(0.45, g, jitter=0.3)
    rots = [rotation((0.3, 1.0, 0.2), 0.5), rotation((1.0, -0.4, 0.7), -1.1)]
    shifts = [torch.tensor([0.05, -0.02, 0.03], dtype=F64), torch.zeros(3, dtype=F64)]
    obs = torch.stack([canon @ r.T + t for r, t in zip(rots, shifts)])
    res, bound = 7, 0.6
    disp, _ = check_field(backend, device, obs.to(dtype), torch.stack([canon, canon]).to(dtype), faces, res, bound)
    gl = torch.linspace(-bound, bound, res, dtype=F64)
    zz, yy, xx = torch.meshgrid(gl, gl, gl, indexing="ij")
    x = torch.stack([xx, yy, zz], -1)
    for n in range(2):
        expected = (x - shifts[n]) @ rots[n] - x
        got = disp[n].permute(1, 2, 3, 0).double().cpu()
        assert (got - expected).abs().max().item() <= (1e-10 if dtype == F64 else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_surface_field_gradients(backend):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(140)
    canon, faces = icosphere(0.45, g, jitter=0.3)
    obs = canon @ rotation((0.3, 1.0, 0.2), 0.4).T * 1.05
    w_disp = torch.randn(1, 3, 6, 6, 6, generator=g, dtype=F64).to(device)
    w_sq = torch.randn(1, 1, 6, 6, 6, generator=g, dtype=F64).to(device)
    results = []
    for which in (backend, "torch"):
        o = obs.unsqueeze(0).to(device).requires_grad_(True)
        c = canon.unsqueeze(0).to(device).requires_grad_(True)
        disp, sq = ops.surface_field_grid(o, c, faces.to(device), resolution=6, bound=0.6, backend=which)
        ((disp * w_disp).sum() + (sq * w_sq).sum()).backward()
        results.append((disp.detach(), sq.detach(), o.grad, c.grad))
    for got, ref in zip(results[0], results[1]):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # the no-grad field equals the tracked one
    disp, sq = ops.surface_field_grid(obs.unsqueeze(0).to(device), canon.unsqueeze(0).to(device), faces.to(device),
                                      resolution=6, bound=0.6, backend=backend)
    torch.testing.assert_close(disp, results[0][0], rtol=0, atol=1e-12)
    assert torch.equal(sq, results[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_surface_field_half_and_layout(backend):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(150)
    canon, faces = icosphere(0.45, g, jitter=0.3)
    t = torch.tensor([0.01, -0.02, 0.03], dtype=F64)
    obs = (canon + t).unsqueeze(0)
    for dtype in (torch.float16, torch.bfloat16):
        disp, sq = ops.surface_field_grid(obs.to(device, dtype), canon.unsqueeze(0).to(device, dtype),
                                          faces.to(device), resolution=5, backend=backend)
        rdisp, rsq = R.surface_field_grid(obs.to(device, dtype), canon.unsqueeze(0).to(device, dtype),
                                          faces.to(device), 5, 0.65)
        assert disp.dtype == dtype and sq.dtype == dtype
        torch.testing.assert_close(disp.float(), rdisp.float(), rtol=0, atol=0)
        torch.testing.assert_close(sq.float(), rsq.float(), rtol=0, atol=0)
    # a translation: -t everywhere, in the [N, 3, D, H, W] layout
    disp, _ = ops.surface_field_grid(obs.to(device), canon.unsqueeze(0).to(device), faces.to(device),
                                     resolution=4, backend=backend)
    torch.testing.assert_close(disp[0].permute(1, 2, 3, 0).cpu(), (-t).expand(4, 4, 4, 3), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    device = require_backend(backend)
    ext = extension()
    verts, faces = icosphere(0.5)
    v = verts.unsqueeze(0).to(device)
    f = faces.to(device)
    p = torch.zeros(1, 4, 3, dtype=F64, device=device)
    # through the public API
    with pytest.raises(ValueError, match=r"faces holds vertex indices in \[0, 42\]"):
        ops.closest_triangles(p, v, torch.cat([f, torch.tensor([[0, 1, 42]], device=device)]), backend=backend)
    with pytest.raises(TypeError, match=r"faces must have a dtype in"):
        ops.closest_triangles(p, v, f.float(), backend=backend)
    with pytest.raises(ValueError, match=r"\[F, 3\]"):
        ops.surface_field_grid(v, v, f[:, :2], backend=backend)
    with pytest.raises(TypeError, match=r"verts has dtype float32 but points has float64"):
        ops.closest_triangles(p, v.float(), f, backend=backend)
    with pytest.raises(ValueError, match=r"resolution must be >= 2"):
        ops.surface_field_grid(v, v, f, resolution=1, backend=backend)
    # the extension's own checks
    with pytest.raises(ValueError, match=r"points must have shape \[N, M, 3\]"):
        ext.closest_triangles_forward(p[0], v, f, True)
    with pytest.raises(ValueError, match=r"faces must have shape \[F, 3\]"):
        ext.closest_triangles_forward(p, v, f[:, :2], True)
    with pytest.raises(ValueError, match=r"1 <= F"):
        ext.closest_triangles_forward(p, v, f[:0], True)
    with pytest.raises(TypeError, match=r"faces must be int32 or int64"):
        ext.closest_triangles_forward(p, v, f.to(torch.int16), True)
    with pytest.raises(TypeError, match=r"one dtype"):
        ext.closest_triangles_forward(p, v.float(), f, True)
    with pytest.raises(ValueError, match=r"batch size"):
        ext.closest_triangles_forward(p, v.expand(2, -1, -1), f, True)
    with pytest.raises(TypeError, match=r"float16, bfloat16, float32 or float64"):
        ext.closest_triangles_forward(p.long(), v.long(), f, True)
    with pytest.raises(ValueError, match=r"verts_canon has shape"):
        ext.surface_field_grid_forward(v, v[:, :5], f, 4, 0.5)
    with pytest.raises(ValueError, match=r"resolution must lie in"):
        ext.surface_field_grid_forward(v, v, f, 0, 0.5)
    # indices out of range reach the kernel only through the extension: NaN, no crash
    out = ext.closest_triangles_forward(p, v, torch.tensor([[0, 1, 99]], device=device), True)
    assert torch.isnan(out[3]).all()
