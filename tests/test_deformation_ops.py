"""Deformation ops (closest_triangles, surface_field_grid, sample_grid3d, smooth_grid3d,
mesh_one_ring, one_ring_deform) against independent restatements written here: a
per-point, per-triangle brute force in plain Python (Ericson's Voronoi-region
closest point), per-point loops, explicit trilinear and box-filter loops,
hand-written one-ring tables, and rigid motions whose surface field is known in
closed form."""
import itertools
import math

import pytest
import torch

from head4d import ops
from head4d.ops import deformation as D
from head4d.reference import deformation as R

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many tiny ops (gradcheck, per-point loops), which intra-op
    threads only slow down, badly so on a busy 2-core machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------
# meshes and independent helpers
# ----------------------------------------------------------------------------------

OCTA_VERTS = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
OCTA_FACES = [(0, 2, 4), (2, 1, 4), (1, 3, 4), (3, 0, 4), (2, 0, 5), (1, 2, 5), (3, 1, 5), (0, 3, 5)]


def octahedron(dtype=F64):
    return torch.tensor(OCTA_VERTS, dtype=dtype), torch.tensor(OCTA_FACES, dtype=torch.int64)


def icosphere(radius=0.4, generator=None, jitter=0.0, dtype=F64):
    """A once-subdivided icosahedron (42 vertices, 80 faces), outward oriented,
    with optional radial jitter (so no two faces are symmetric copies)."""
    t = (1 + math.sqrt(5)) / 2
    verts = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
             (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    faces = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2),
             (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5),
             (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    verts = [tuple(c / math.sqrt(sum(x * x for x in v)) for c in v) for v in verts]
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
    v = torch.tensor(verts, dtype=F64)
    if jitter:
        v = v * (1 + jitter * (torch.rand(v.shape[0], 1, generator=generator, dtype=F64) - 0.5))
    v = v * radius
    f = torch.tensor(sub, dtype=torch.int64)
    # orient outward (convex, centred at the origin)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    flip = (torch.cross(b - a, c - a, dim=-1) * (a + b + c)).sum(-1) < 0
    f[flip] = f[flip][:, [0, 2, 1]]
    return v.to(dtype), f


def rotation(axis, angle, dtype=F64):
    x, y, z = (a / math.sqrt(sum(c * c for c in axis)) for a in axis)
    c, s = math.cos(angle), math.sin(angle)
    k = torch.tensor([[0, -z, y], [z, 0, -x], [-y, x, 0]], dtype=F64)
    return (torch.eye(3, dtype=F64) + s * k + (1 - c) * (k @ k)).to(dtype)


def _sub(u, v):
    return (u[0] - v[0], u[1] - v[1], u[2] - v[2])


def _dot(u, v):
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


def _axpy(a, u, v):  # v + a * u
    return (v[0] + a * u[0], v[1] + a * u[1], v[2] + a * u[2])


def _cross(u, v):
    return (u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0])


def _closest_on_segment(p, a, b):
    ab = _sub(b, a)
    den = _dot(ab, ab)
    t = 0.0 if den == 0 else min(1.0, max(0.0, _dot(_sub(p, a), ab) / den))
    return _axpy(t, ab, a)


def closest_point_triangle(p, a, b, c):
    """Ericson, Real-Time Collision Detection 5.1.5, restated; zero-area triangles
    by their three segments."""
    ab, ac = _sub(b, a), _sub(c, a)
    n = _cross(ab, ac)
    if _dot(n, n) == 0.0:
        cands = [_closest_on_segment(p, a, b), _closest_on_segment(p, b, c), _closest_on_segment(p, c, a)]
        return min(cands, key=lambda q: _dot(_sub(p, q), _sub(p, q)))
    ap = _sub(p, a)
    d1, d2 = _dot(ab, ap), _dot(ac, ap)
    if d1 <= 0 and d2 <= 0:
        return a
    bp = _sub(p, b)
    d3, d4 = _dot(ab, bp), _dot(ac, bp)
    if d3 >= 0 and d4 <= d3:
        return b
    vc = d1 * d4 - d3 * d2
    if vc <= 0 and d1 >= 0 and d3 <= 0:
        return _axpy(d1 / (d1 - d3), ab, a)
    cp = _sub(p, c)
    d5, d6 = _dot(ab, cp), _dot(ac, cp)
    if d6 >= 0 and d5 <= d6:
        return c
    vb = d5 * d2 - d1 * d6
    if vb <= 0 and d2 >= 0 and d6 <= 0:
        return _axpy(d2 / (d2 - d6), ac, a)
    va = d3 * d6 - d5 * d4
    if va <= 0 and (d4 - d3) >= 0 and (d5 - d6) >= 0:
        return _axpy((d4 - d3) / ((d4 - d3) + (d5 - d6)), _sub(c, b), b)
    den = 1.0 / (va + vb + vc)
    return _axpy(vc * den, ac, _axpy(vb * den, ab, a))


def brute_force_sq_dists(points, verts, faces):
    """[M, F] squared point-triangle distances, one Python call per pair."""
    P = [tuple(p) for p in points.tolist()]
    V = [tuple(v) for v in verts.tolist()]
    out = []
    for p in P:
        row = []
        for i, j, k in faces.tolist():
            q = closest_point_triangle(p, V[i], V[j], V[k])
            d = _sub(p, q)
            row.append(_dot(d, d))
        out.append(row)
    return torch.tensor(out, dtype=F64)


def projection_barycentric(p, a, b, c):
    """Barycentrics of p's projection onto the plane, by least squares (numpy-free)."""
    e0, e1, q = b - a, c - a, p - a
    m = torch.stack([e0, e1], dim=1)  # [3, 2]
    vw = torch.linalg.lstsq(m, q.unsqueeze(1)).solution.squeeze(1)
    return torch.stack([1 - vw[0] - vw[1], vw[0], vw[1]])


# ----------------------------------------------------------------------------------
# closest_triangles
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mesh", ["soup", "sphere"])
def test_closest_triangles_against_brute_force(mesh):
    g = torch.Generator().manual_seed(1 if mesh == "soup" else 2)
    n = 2
    if mesh == "soup":
        verts = torch.rand(n, 45, 3, generator=g, dtype=F64) * 2 - 1
        faces = torch.arange(45).reshape(15, 3)
        faces = faces[torch.randperm(15, generator=g)]
    else:
        base, faces = icosphere(0.5, g, jitter=0.3)
        verts = torch.stack([base, base @ rotation((1, 2, 3), 0.7).T * 1.1])
    points = torch.rand(n, 120, 3, generator=g, dtype=F64) * 1.6 - 0.8
    points[:, :10] *= 0.05  # near the centre: many faces nearly tied

    face, bary, signed, sq = ops.closest_triangles(points, verts, faces.to(torch.int32))
    assert face.dtype == torch.int64 and face.shape == (n, 120)
    assert bary.shape == (n, 120, 3) and signed.shape == (n, 120) and sq.shape == (n, 120)
    for b in range(n):
        ref = brute_force_sq_dists(points[b], verts[b], faces)
        best, _ = ref.min(dim=1)
        torch.testing.assert_close(sq[b], best, rtol=0, atol=1e-12)
        chosen = ref.gather(1, face[b].unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(chosen, best, rtol=0, atol=1e-12)
        # ties: a shared vertex or edge is the closest feature of many points outside the
        # sphere; its distance is computed identically for every face that has it, so the
        # lowest of the (numerically) tied faces wins
        tied = ref <= best.unsqueeze(1) + 1e-12
        lowest = torch.where(tied, torch.arange(ref.shape[1]), ref.shape[1]).min(dim=1).values
        assert torch.equal(face[b], lowest)
        if mesh == "sphere":
            assert (tied.sum(1) > 1).sum() > 20  # the tie rule was exercised
        for m in range(120):
            a, bb, c = (verts[b, faces[face[b, m], k]] for k in range(3))
            torch.testing.assert_close(bary[b, m], projection_barycentric(points[b, m], a, bb, c),
                                       rtol=0, atol=1e-9)
            normal = torch.cross(bb - a, c - a, dim=-1)
            normal = normal / normal.norm()
            torch.testing.assert_close(signed[b, m], ((points[b, m] - a) * normal).sum(), rtol=0, atol=1e-12)


def test_closest_triangles_float32_and_chunking(monkeypatch):
    g = torch.Generator().manual_seed(3)
    base, faces = icosphere(0.5, g, jitter=0.3)
    verts = base.unsqueeze(0)
    points = torch.rand(1, 300, 3, generator=g, dtype=F64) * 1.6 - 0.8
    full = ops.closest_triangles(points, verts, faces)
    monkeypatch.setitem(R.PAIRS_PER_CHUNK, "cpu", 7 * faces.shape[0] + 3)  # odd chunks of 7 points
    chunked = ops.closest_triangles(points, verts, faces)
    for x, y in zip(full, chunked):
        assert torch.equal(x, y)
    f32 = ops.closest_triangles(points.float(), verts.float(), faces)
    assert all(t.dtype == torch.float32 for t in f32[1:])
    ref = brute_force_sq_dists(points[0], verts[0], faces)
    chosen = ref.gather(1, f32[0][0].unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(chosen, ref.min(dim=1).values, rtol=0, atol=1e-6)
    torch.testing.assert_close(f32[3].double(), full[3], rtol=1e-5, atol=1e-7)


def test_points_on_vertices_edges_and_faces():
    verts, faces = octahedron()
    fl = faces.tolist()
    pts, expect = [], []
    # vertices: distance 0, the lowest face holding the vertex, a one-hot barycentric
    for v in range(6):
        pts.append(verts[v])
        f = min(i for i, fc in enumerate(fl) if v in fc)
        expect.append(("vertex", v, [f]))
    # edges at a few parameters: distance 0, one of the two faces, barycentrics (1-t, t, 0)
    edges = sorted({tuple(sorted((fc[i], fc[(i + 1) % 3]))) for fc in fl for i in range(3)})
    assert len(edges) == 12
    for (i, j), t in itertools.product(edges, (0.5, 0.25)):
        pts.append((1 - t) * verts[i] + t * verts[j])
        expect.append(("edge", (i, j, t), [k for k, fc in enumerate(fl) if i in fc and j in fc]))
    # face interiors
    for k, fc in enumerate(fl):
        w = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
        pts.append(w[0] * verts[fc[0]] + w[1] * verts[fc[1]] + w[2] * verts[fc[2]])
        expect.append(("face", w, [k]))
    points = torch.stack(pts).unsqueeze(0)
    face, bary, signed, sq = ops.closest_triangles(points, verts.unsqueeze(0), faces)
    for m, (kind, what, allowed) in enumerate(expect):
        f = int(face[0, m])
        assert f in allowed, (kind, what, f, allowed)
        assert sq[0, m].item() <= 1e-28, (kind, what, sq[0, m].item())
        assert abs(signed[0, m].item()) <= 1e-14
        b = bary[0, m]
        if kind == "vertex":
            assert sq[0, m].item() == 0.0 and f == allowed[0]
            expected = torch.tensor([1.0 if u == what else 0.0 for u in fl[f]], dtype=F64)
        elif kind == "edge":
            i, j, t = what
            expected = torch.tensor([(1 - t) if u == i else t if u == j else 0.0 for u in fl[f]], dtype=F64)
        else:
            expected = what
        torch.testing.assert_close(b, expected, rtol=0, atol=1e-12)

    # off the surface along the outward normal: positive signed distance, 1/sqrt(3) off
    centre = verts[list(fl[0])].mean(0)
    normal = torch.ones(3, dtype=F64) / math.sqrt(3)
    outside = (centre + 0.3 * normal).view(1, 1, 3)
    inside = (centre - 0.1 * normal).view(1, 1, 3)
    res_out = ops.closest_triangles(outside, verts.unsqueeze(0), faces)
    res_in = ops.closest_triangles(inside, verts.unsqueeze(0), faces)
    assert res_out[0].item() == 0 and res_in[0].item() == 0
    assert res_out[2].item() == pytest.approx(0.3, abs=1e-12)
    assert res_out[3].item() == pytest.approx(0.09, abs=1e-12)
    assert res_in[2].item() == pytest.approx(-0.1, abs=1e-12)
    torch.testing.assert_close(res_out[1][0, 0], torch.full((3,), 1 / 3, dtype=F64))


def test_ties_go_to_the_lowest_face_index():
    verts, faces = octahedron()
    # beyond vertex 4 along +z, closest feature vertex 4 shared by faces 0..3
    p = torch.tensor([[[0.0, 0.0, 3.0], [0.0, 0.0, -2.0], [2.0, 2.0, 0.0]]], dtype=F64)
    face, bary, _, sq = ops.closest_triangles(p, verts.unsqueeze(0), faces)
    assert face.tolist() == [[0, 4, 0]]  # vertex 4 -> face 0; vertex 5 -> face 4; edge (0, 2) -> faces 0, 4
    assert sq.tolist()[0] == pytest.approx([4.0, 1.0, 2 * 1.5 ** 2], abs=1e-12)
    # same mesh, faces listed in reverse: the answer is the new lowest index
    rev = faces.flip(0)
    face_r = ops.closest_triangles(p, verts.unsqueeze(0), rev)[0]
    assert face_r.tolist() == [[4, 0, 3]]


def test_degenerate_triangles_no_nan():
    verts = torch.tensor([[0, 0, 0], [1, 0, 0], [2, 0, 0], [0, 1, 0], [0.5, 0.5, 1.0], [3, 3, 3]], dtype=F64)
    faces = torch.tensor([[0, 1, 2],   # collinear
                          [5, 5, 5],   # a single point
                          [3, 3, 4],   # a repeated vertex: the segment 3-4
                          [0, 1, 3]])  # a proper triangle
    g = torch.Generator().manual_seed(4)
    points = (torch.rand(1, 60, 3, generator=g, dtype=F64) * 5 - 1).requires_grad_(True)
    vv = verts.unsqueeze(0).clone().requires_grad_(True)
    face, bary, signed, sq = ops.closest_triangles(points, vv, faces)
    for t in (bary, signed, sq):
        assert torch.isfinite(t).all()
    ref = brute_force_sq_dists(points[0].detach(), verts, faces)
    torch.testing.assert_close(sq[0].detach(), ref.min(1).values, rtol=0, atol=1e-12)
    assert (face[0] != 3).any() and (face[0] == 3).any()
    (bary.sum() + signed.sum() + sq.sum()).backward()
    # the default (compiled where built) backend's gradients against the reference's, float64
    p_ref, v_ref = points.detach().clone().requires_grad_(True), verts.unsqueeze(0).clone().requires_grad_(True)
    _, bary_r, signed_r, sq_r = ops.closest_triangles(p_ref, v_ref, faces, backend="torch")
    (bary_r.sum() + signed_r.sum() + sq_r.sum()).backward()
    torch.testing.assert_close(points.grad, p_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vv.grad, v_ref.grad, rtol=1e-10, atol=1e-10)
    # only degenerate triangles: zero normal, zero signed distance
    face, bary, signed, sq = ops.closest_triangles(points.detach(), verts.unsqueeze(0), faces[:3])
    assert torch.isfinite(bary).all() and (signed == 0).all()
    ref = brute_force_sq_dists(points[0].detach(), verts, faces[:3])
    torch.testing.assert_close(sq[0], ref.min(1).values, rtol=0, atol=1e-12)


def test_closest_triangles_gradients():
    g = torch.Generator().manual_seed(5)
    base, faces = icosphere(0.5, g, jitter=0.3)
    verts = base.unsqueeze(0).clone().requires_grad_(True)
    points = (torch.rand(1, 12, 3, generator=g, dtype=F64) * 1.4 - 0.7).requires_grad_(True)

    def fn(p, v):
        _, b, s, d = ops.closest_triangles(p, v, faces)
        return b, s, d

    assert torch.autograd.gradcheck(fn, (points, verts), eps=1e-7, atol=1e-6)


# ----------------------------------------------------------------------------------
# surface_field_grid
# ----------------------------------------------------------------------------------

def grid_coords(res, bound, dtype=F64):
    """[R, R, R, 3] point of every (d, h, w): (g[w], g[h], g[d])."""
    g = torch.linspace(-bound, bound, res, dtype=dtype)
    out = torch.empty(res, res, res, 3, dtype=dtype)
    for d, h, w in itertools.product(range(res), repeat=3):
        out[d, h, w] = torch.stack([g[w], g[h], g[d]])
    return out


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_identity_deformation_gives_zero_displacement(dtype):
    g = torch.Generator().manual_seed(6)
    a, faces = icosphere(0.4, g, jitter=0.3)
    b, _ = icosphere(0.3, g, jitter=0.5)
    verts = torch.stack([a, b]).to(dtype)
    disp, sq = ops.surface_field_grid(verts, verts, faces, resolution=9, bound=D.PORTRAIT4D_FINE_BOUND)
    assert disp.shape == (2, 3, 9, 9, 9) and sq.shape == (2, 1, 9, 9, 9)
    assert disp.dtype == dtype and sq.dtype == dtype
    tol = 1e-12 if dtype == F64 else 2e-6
    assert disp.abs().max().item() <= tol
    # squared distance: against the brute force
    pts = grid_coords(9, D.PORTRAIT4D_FINE_BOUND).reshape(-1, 3)[::7]
    ref = brute_force_sq_dists(pts, verts[1].double(), faces).min(1).values
    torch.testing.assert_close(sq[1].reshape(-1)[::7].double(), ref, rtol=1e-5 if dtype != F64 else 0,
                               atol=1e-12 if dtype == F64 else 1e-6)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_rigid_motion_is_reproduced(dtype):
    """verts_obs = verts_canon R^T + t: x = sum b v_obs + d n_obs holds exactly for the
    closest triangle, so x_canon = R^T (x - t) at every grid point, and trilinear
    interpolation of that affine field is exact everywhere inside the grid."""
    g = torch.Generator().manual_seed(7)
    canon, faces = icosphere(0.45, g, jitter=0.3)
    rots = [rotation((0.3, 1.0, 0.2), 0.5), rotation((1.0, -0.4, 0.7), -1.1)]
    shifts = [torch.tensor([0.05, -0.02, 0.03], dtype=F64), torch.zeros(3, dtype=F64)]
    obs = torch.stack([canon @ r.T + t for r, t in zip(rots, shifts)])
    can = torch.stack([canon, canon * 1.0])
    res, bound = 7, 0.6
    disp, sq = ops.surface_field_grid(obs.to(dtype), can.to(dtype), faces, resolution=res, bound=bound)
    x = grid_coords(res, bound)
    tol = 1e-10 if dtype == F64 else 1e-5
    for n in range(2):
        expected = (x - shifts[n]) @ rots[n] - x  # R^T (x - t) as row vectors
        got = disp[n].permute(1, 2, 3, 0).double()
        assert (got - expected).abs().max().item() <= tol
    # read back with sample_grid3d: exact at the grid points, exact inside (affine field)
    q = torch.rand(2, 200, 3, generator=g, dtype=F64) * 2 * bound - bound
    q[:, :res] = x.reshape(-1, 3)[:res]
    sampled = ops.sample_grid3d(disp, q.to(dtype), bound=bound).double()
    for n in range(2):
        expected = (q[n] - shifts[n]) @ rots[n] - q[n]
        assert (sampled[n] - expected).abs().max().item() <= tol


def test_surface_field_grid_layout_and_default_bound():
    """Each voxel (d, h, w) holds the field at (g[w], g[h], g[d]): a translation of the
    mesh by t gives -t everywhere; an anisotropic scaling shows the axis order."""
    verts, faces = octahedron()
    verts = verts * 0.3
    t = torch.tensor([0.01, -0.02, 0.03], dtype=F64)
    disp, _ = ops.surface_field_grid((verts + t).unsqueeze(0), verts.unsqueeze(0), faces, resolution=4)
    torch.testing.assert_close(disp[0].permute(1, 2, 3, 0), (-t).expand(4, 4, 4, 3), rtol=0, atol=1e-12)
    # the axis order (x along W, y along H, z along D) is checked by the rigid-motion test,
    # whose expected field comes from grid_coords; here a rotation about z alone shows it too
    rot = rotation((0, 0, 1), 0.4)
    disp, _ = ops.surface_field_grid((verts @ rot.T).unsqueeze(0), verts.unsqueeze(0), faces, resolution=3)
    x = grid_coords(3, 0.65)
    torch.testing.assert_close(disp[0].permute(1, 2, 3, 0), x @ rot - x, rtol=0, atol=1e-12)
    assert disp[0, 2].abs().max() < 1e-12  # no z motion


def test_portrait4d_bounds():
    assert D.PORTRAIT4D_FINE_BOUND == pytest.approx(0.65 * (1 - 1 / 24), abs=0)
    assert ops.cell_centre_bound(24) == D.PORTRAIT4D_FINE_BOUND
    assert ops.cell_centre_bound(8) == D.PORTRAIT4D_COARSE_BOUND == pytest.approx(0.65 * 7 / 8)
    assert ops.cell_centre_bound(4, 2.0) == pytest.approx(0.75)
    # the outermost grid points are the centres of the edge cells of the 1.3 box
    g = torch.linspace(-D.PORTRAIT4D_FINE_BOUND, D.PORTRAIT4D_FINE_BOUND, 24, dtype=F64)
    centres = -0.65 + (torch.arange(24, dtype=F64) + 0.5) * 1.3 / 24
    torch.testing.assert_close(g, centres, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------------
# sample_grid3d and smooth_grid3d
# ----------------------------------------------------------------------------------

def trilinear_loop(grid, point, bound, padding):
    """One point, [C]: align_corners=True indices, zeros or clamped outside."""
    c, d, h, w = grid.shape
    pos = [(point[i] / bound + 1) / 2 * (size - 1) for i, size in enumerate((w, h, d))]
    if padding == "border":
        pos = [min(max(p, 0.0), size - 1) for p, size in zip(pos, (w, h, d))]
    lo = [math.floor(p) for p in pos]
    out = torch.zeros(c, dtype=grid.dtype)
    for corner in itertools.product((0, 1), repeat=3):
        idx = [lo[i] + corner[i] for i in range(3)]
        wt = 1.0
        for i in range(3):
            frac = pos[i] - lo[i]
            wt *= frac if corner[i] else 1 - frac
        ix, iy, iz = idx
        if 0 <= ix < w and 0 <= iy < h and 0 <= iz < d:
            out += wt * grid[:, iz, iy, ix]
    return out


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_sample_grid3d_against_loop_and_far_points(padding):
    g = torch.Generator().manual_seed(8)
    grid = torch.randn(2, 3, 4, 5, 6, generator=g, dtype=F64)
    bound = 0.7
    pts = torch.rand(2, 40, 3, generator=g, dtype=F64) * 1.8 - 0.9  # some just outside
    pts[:, 0] = torch.tensor([5.0, -7.0, 3.0])
    pts[:, 1] = torch.tensor([1e6, 0.1, -0.2])
    pts[:, 2] = torch.tensor([bound, -bound, bound], dtype=F64)  # a corner
    out = ops.sample_grid3d(grid, pts, bound=bound, padding=padding)
    assert out.shape == (2, 40, 3)
    for n, m in itertools.product(range(2), range(40)):
        torch.testing.assert_close(out[n, m], trilinear_loop(grid[n], pts[n, m].tolist(), bound, padding),
                                   rtol=0, atol=1e-12)
    if padding == "zeros":
        assert (out[:, :2] == 0).all()
    else:
        torch.testing.assert_close(out[:, 0], grid[:, :, -1, 0, -1])  # x -> W end, y -> H 0, z -> D end
        assert not (out[:, 1] == 0).all()
    torch.testing.assert_close(out[:, 2], grid[:, :, -1, 0, -1])
    # half precision grids: computed in float32, returned in the grid's dtype
    half = ops.sample_grid3d(grid.to(torch.bfloat16), pts.float(), bound=bound, padding=padding)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), out, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_sample_grid3d_gradcheck(padding):
    g = torch.Generator().manual_seed(9)
    grid = torch.randn(2, 2, 3, 4, 3, generator=g, dtype=F64, requires_grad=True)
    pts = (torch.rand(2, 7, 3, generator=g, dtype=F64) * 1.6 - 0.8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ops.sample_grid3d(a, b, bound=0.6, padding=padding),
                                    (grid, pts))


def test_smooth_grid3d_against_loop():
    g = torch.Generator().manual_seed(10)
    grid = torch.randn(2, 3, 4, 5, 3, generator=g, dtype=F64)

    def one_pass(x):
        out = torch.empty_like(x)
        _, _, d, h, w = x.shape
        for k, j, i in itertools.product(range(d), range(h), range(w)):
            acc = 0
            for dk, dj, di in itertools.product((-1, 0, 1), repeat=3):
                acc = acc + x[:, :, min(max(k + dk, 0), d - 1), min(max(j + dj, 0), h - 1),
                              min(max(i + di, 0), w - 1)]
            out[:, :, k, j, i] = acc / 27
        return out

    torch.testing.assert_close(ops.smooth_grid3d(grid, passes=1), one_pass(grid), rtol=0, atol=1e-13)
    torch.testing.assert_close(ops.smooth_grid3d(grid), one_pass(one_pass(grid)), rtol=0, atol=1e-13)
    zero = ops.smooth_grid3d(grid, passes=0)
    assert torch.equal(zero, grid) and zero is not grid
    const = torch.full((1, 2, 8, 8, 8), 3.5)
    torch.testing.assert_close(ops.smooth_grid3d(const), const)
    assert ops.smooth_grid3d(grid.to(torch.float16)).dtype == torch.float16
    gg = grid.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ops.smooth_grid3d(x), (gg,))


# ----------------------------------------------------------------------------------
# mesh_one_ring
# ----------------------------------------------------------------------------------

def test_mesh_one_ring_octahedron():
    _, faces = octahedron()
    table = ops.mesh_one_ring(faces, 6, max_neighbours=6)
    expected = [[0, 2, 3, 4, 5, -1],
                [1, 2, 3, 4, 5, -1],
                [2, 0, 1, 4, 5, -1],
                [3, 0, 1, 4, 5, -1],
                [4, 0, 1, 2, 3, -1],
                [5, 0, 1, 2, 3, -1]]
    assert table.dtype == torch.int64 and table.tolist() == expected
    assert ops.mesh_one_ring(faces.to(torch.int32), 6).shape == (6, 10)


def test_mesh_one_ring_quad_grid():
    # 3 x 3 vertices (index r * 3 + c), 2 x 2 quads, each split along (r, c)-(r+1, c+1)
    faces = []
    for r, c in itertools.product(range(2), range(2)):
        v00 = r * 3 + c
        faces += [(v00, v00 + 1, v00 + 4), (v00, v00 + 4, v00 + 3)]
    faces = torch.tensor(faces)
    table = ops.mesh_one_ring(faces, 10, max_neighbours=7)  # vertex 9 is used by no face
    expected = [[0, 1, 3, 4, -1, -1, -1],
                [1, 0, 2, 4, 5, -1, -1],
                [2, 1, 5, -1, -1, -1, -1],
                [3, 0, 4, 6, 7, -1, -1],
                [4, 0, 1, 3, 5, 7, 8],
                [5, 1, 2, 4, 8, -1, -1],
                [6, 3, 7, -1, -1, -1, -1],
                [7, 3, 4, 6, 8, -1, -1],
                [8, 4, 5, 7, -1, -1, -1],
                [9, -1, -1, -1, -1, -1, -1]]
    assert table.tolist() == expected
    with pytest.raises(ValueError, match=r"vertex 4 has 6 edge-neighbours.*max_neighbours >= 7"):
        ops.mesh_one_ring(faces, 10, max_neighbours=6)
    # repeated indices add no self-edge; duplicate faces add nothing
    table2 = ops.mesh_one_ring(torch.cat([faces, faces, torch.tensor([[2, 2, 5]])]), 10, max_neighbours=7)
    assert table2.tolist() == expected


# ----------------------------------------------------------------------------------
# one_ring_deform
# ----------------------------------------------------------------------------------

def one_ring_loop(points, verts_obs, verts_canon, neighbours, subset):
    out = torch.empty_like(points)
    cands = list(range(verts_obs.shape[1])) if subset is None else sorted(subset.tolist())
    for n in range(points.shape[0]):
        vo, vc = verts_obs[n].tolist(), verts_canon[n].tolist()
        for m in range(points.shape[1]):
            x = points[n, m].tolist()
            best, best_d = None, math.inf
            for v in cands:
                d = sum((x[k] - vo[v][k]) ** 2 for k in range(3))
                if d < best_d:  # strict: the first (lowest) index keeps a tie
                    best, best_d = v, d
            ws, acc = 0.0, [0.0, 0.0, 0.0]
            for i in neighbours[best].tolist():
                if i < 0:
                    continue
                wt = 1.0 / (sum((x[k] - vo[i][k]) ** 2 for k in range(3)) + 1e-10)
                ws += wt
                for k in range(3):
                    acc[k] += wt * (vc[i][k] - vo[i][k])
            out[n, m] = torch.tensor([x[k] + acc[k] / ws for k in range(3)], dtype=points.dtype)
    return out


@pytest.mark.parametrize("use_subset", [False, True])
def test_one_ring_deform_against_loop(use_subset):
    g = torch.Generator().manual_seed(11)
    canon, faces = icosphere(0.4, g, jitter=0.3)
    table = ops.mesh_one_ring(faces, canon.shape[0])
    obs = torch.stack([canon + 0.02 * torch.randn(canon.shape, generator=g, dtype=F64),
                       canon @ rotation((0, 1, 0), 0.3).T])
    can = torch.stack([canon, canon * 1.05])
    pts = torch.rand(2, 80, 3, generator=g, dtype=F64) * 1.2 - 0.6
    pts[:, :3] = obs[:, :3]  # exactly on vertices
    subset = torch.tensor([30, 2, 17, 5, 40, 11, 23]) if use_subset else None
    out = ops.one_ring_deform(pts, obs, can, table, vertex_subset=subset)
    torch.testing.assert_close(out, one_ring_loop(pts, obs, can, table, subset), rtol=0, atol=1e-12)
    # float32, and int32 indices
    out32 = ops.one_ring_deform(pts.float(), obs.float(), can.float(), table.to(torch.int32),
                                vertex_subset=None if subset is None else subset.to(torch.int32))
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out, rtol=0, atol=2e-5)


def test_one_ring_deform_ties_identity_and_chunking(monkeypatch):
    verts, faces = octahedron()
    table = ops.mesh_one_ring(faces, 6)
    vo = verts.unsqueeze(0)
    vc = (verts + torch.arange(6, dtype=F64).unsqueeze(1)).unsqueeze(0)  # vertex i moves by (i, i, i)
    # the origin is equidistant from all six vertices: vertex 0 wins (with a subset, the lowest listed)
    origin = torch.zeros(1, 1, 3, dtype=F64)
    out = ops.one_ring_deform(origin, vo, vc, table)
    # ring of 0 = {0, 2, 3, 4, 5}, all at distance 1: mean shift (0+2+3+4+5)/5
    torch.testing.assert_close(out[0, 0], torch.full((3,), 14 / 5, dtype=F64))
    out = ops.one_ring_deform(origin, vo, vc, table, vertex_subset=torch.tensor([5, 3, 4]))
    # nearest = 3: ring {3, 0, 1, 4, 5}
    torch.testing.assert_close(out[0, 0], torch.full((3,), 13 / 5, dtype=F64))
    # identity: no displacement
    pts = torch.randn(1, 50, 3, dtype=F64)
    torch.testing.assert_close(ops.one_ring_deform(pts, vo, vo, table), pts, rtol=0, atol=0)
    # a point on a vertex takes (almost) exactly that vertex's displacement
    on = verts[2].view(1, 1, 3)
    torch.testing.assert_close(ops.one_ring_deform(on, vo, vc, table)[0, 0], verts[2] + 2, rtol=0, atol=1e-8)
    # chunking does not change the answer
    g = torch.Generator().manual_seed(12)
    pts = torch.randn(2, 37, 3, generator=g, dtype=F64)
    vo2, vc2 = vo.expand(2, -1, -1), vc.expand(2, -1, -1)
    full = ops.one_ring_deform(pts, vo2, vc2, table)
    monkeypatch.setitem(R.PAIRS_PER_CHUNK, "cpu", 25)
    assert torch.equal(ops.one_ring_deform(pts, vo2, vc2, table), full)


def test_one_ring_deform_gradcheck():
    g = torch.Generator().manual_seed(13)
    canon, faces = icosphere(0.4, g, jitter=0.3)
    table = ops.mesh_one_ring(faces, canon.shape[0])
    obs = (canon + 0.02 * torch.randn(canon.shape, generator=g, dtype=F64)).unsqueeze(0).repeat(2, 1, 1)
    obs[1] *= 0.9
    can = canon.unsqueeze(0).repeat(2, 1, 1)
    pts = torch.rand(2, 6, 3, generator=g, dtype=F64) * 1.0 - 0.5
    args = [t.clone().requires_grad_(True) for t in (pts, obs, can)]
    assert torch.autograd.gradcheck(lambda p, o, c: ops.one_ring_deform(p, o, c, table), args)
    args = [t.clone().requires_grad_(True) for t in (pts, obs, can)]
    subset = torch.arange(0, 42, 3)
    assert torch.autograd.gradcheck(lambda p, o, c: ops.one_ring_deform(p, o, c, table, vertex_subset=subset),
                                    args)


# ----------------------------------------------------------------------------------
# bad input, backends
# ----------------------------------------------------------------------------------

def test_bad_input_errors():
    verts, faces = octahedron()
    v = verts.unsqueeze(0)
    p = torch.zeros(1, 4, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"faces holds vertex indices in \[0, 6\].*verts has 6 vertices"):
        ops.closest_triangles(p, v[:, :6], torch.cat([faces, torch.tensor([[0, 1, 6]])]))
    with pytest.raises(ValueError, match=r"faces holds vertex indices in \[-1, 5\]"):
        ops.closest_triangles(p, v, torch.cat([faces, torch.tensor([[0, 1, -1]])]))
    with pytest.raises(ValueError, match=r"faces must have shape \[F, 3\].*got \[8, 4\]"):
        ops.closest_triangles(p, v, torch.cat([faces, faces[:, :1]], 1))
    with pytest.raises(TypeError, match=r"faces must have a dtype in \(int32, int64\), got float64"):
        ops.closest_triangles(p, v, faces.double())
    with pytest.raises(TypeError, match=r"points must have a dtype in .* got int64"):
        ops.closest_triangles(p.long(), v, faces)
    with pytest.raises(ValueError, match=r"points must have shape \[N, M, 3\].*got \[4, 3\]"):
        ops.closest_triangles(p[0], v, faces)
    with pytest.raises(ValueError, match=r"verts must have shape \[N, V, 3\] with size 3 in dimension 2"):
        ops.closest_triangles(p, v[..., :2], faces)
    with pytest.raises(ValueError, match=r"verts has batch size 2 but points has 1"):
        ops.closest_triangles(p, v.repeat(2, 1, 1), faces)
    with pytest.raises(TypeError, match=r"verts has dtype float32 but points has float64"):
        ops.closest_triangles(p, v.float(), faces)
    with pytest.raises(ValueError, match=r"faces must hold at least one triangle"):
        ops.closest_triangles(p, v, faces[:0])
    with pytest.raises(TypeError, match=r"faces must be a torch.Tensor"):
        ops.closest_triangles(p, v, OCTA_FACES)

    with pytest.raises(ValueError, match=r"verts_canon has shape \[1, 5, 3\] but verts_obs has \[1, 6, 3\]"):
        ops.surface_field_grid(v, v[:, :5], faces)
    with pytest.raises(ValueError, match=r"resolution must be >= 2"):
        ops.surface_field_grid(v, v, faces, resolution=1)
    with pytest.raises(TypeError, match=r"resolution must be an int"):
        ops.surface_field_grid(v, v, faces, resolution=8.0)
    with pytest.raises(ValueError, match=r"bound must be finite and positive"):
        ops.surface_field_grid(v, v, faces, bound=-0.5)
    with pytest.raises(ValueError, match=r"faces holds vertex indices .* verts_obs has 6 vertices"):
        ops.surface_field_grid(v, v, faces + 1)

    grid = torch.zeros(1, 3, 4, 4, 4)
    with pytest.raises(ValueError, match=r"grid must have shape \[N, C, D, H, W\] \(5 dimensions\)"):
        ops.sample_grid3d(grid[0], p.float(), bound=1.0)
    with pytest.raises(ValueError, match=r"points has batch size 2 but grid has 1"):
        ops.sample_grid3d(grid, p.float().repeat(2, 1, 1), bound=1.0)
    with pytest.raises(ValueError, match=r"padding must be one of \('zeros', 'border'\), got 'reflection'"):
        ops.sample_grid3d(grid, p.float(), bound=1.0, padding="reflection")
    with pytest.raises(TypeError, match=r"points must have a dtype in"):
        ops.sample_grid3d(grid, p.int(), bound=1.0)
    with pytest.raises(TypeError, match=r"bound must be a real number"):
        ops.sample_grid3d(grid, p.float(), bound="1")
    with pytest.raises(TypeError, match=r"grid must have a dtype in"):
        ops.smooth_grid3d(grid.long())
    with pytest.raises(ValueError, match=r"passes must be >= 0"):
        ops.smooth_grid3d(grid, passes=-1)

    with pytest.raises(ValueError, match=r"faces holds vertex indices in \[0, 5\] but num_verts is 5"):
        ops.mesh_one_ring(faces, 5)
    with pytest.raises(ValueError, match=r"faces must have shape \[F, 3\]"):
        ops.mesh_one_ring(faces[:, :2], 6)

    table = ops.mesh_one_ring(faces, 6)
    with pytest.raises(ValueError, match=r"neighbours must have shape \[V, K\] with V = 6.*got \[5, 10\]"):
        ops.one_ring_deform(p, v, v, table[:5])
    with pytest.raises(TypeError, match=r"neighbours must have a dtype in \(int32, int64\)"):
        ops.one_ring_deform(p, v, v, table.float())
    bad = table.clone()
    bad[2, 3] = 6
    with pytest.raises(ValueError, match=r"neighbours holds entries in \[-1, 6\]"):
        ops.one_ring_deform(p, v, v, bad)
    bad = table.clone()
    bad[3] = -1
    with pytest.raises(ValueError, match=r"neighbours row 3 holds only -1"):
        ops.one_ring_deform(p, v, v, bad)
    ops.one_ring_deform(p, v, v, bad, vertex_subset=torch.tensor([0, 1]))  # row 3 cannot be chosen
    with pytest.raises(ValueError, match=r"vertex_subset holds indices in \[0, 9\] but verts_obs has 6"):
        ops.one_ring_deform(p, v, v, table, vertex_subset=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match=r"vertex_subset must hold at least one"):
        ops.one_ring_deform(p, v, v, table, vertex_subset=torch.tensor([], dtype=torch.int64))
    with pytest.raises(TypeError, match=r"vertex_subset must have a dtype in"):
        ops.one_ring_deform(p, v, v, table, vertex_subset=torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"verts_canon has shape"):
        ops.one_ring_deform(p, v, v[:, :5], table)
    with pytest.raises(ValueError, match=r"verts_obs has batch size 2 but points has 1"):
        ops.one_ring_deform(p, v.repeat(2, 1, 1), v.repeat(2, 1, 1), table)
    with pytest.raises(TypeError, match=r"verts_obs has dtype float32 but points has float64"):
        ops.one_ring_deform(p, v.float(), v.float(), table)


def test_backend_selection():
    verts, faces = octahedron()
    p = torch.zeros(1, 2, 3, dtype=F64)
    with pytest.raises(RuntimeError, match=r"mesh_one_ring: backend 'cpu' .* not implemented"):
        ops.mesh_one_ring(faces, 6, backend="cpu")
    with pytest.raises(ValueError, match=r"backend= must be one of"):
        ops.sample_grid3d(torch.zeros(1, 1, 2, 2, 2), p, bound=1.0, backend="nope")
    out = ops.sample_grid3d(torch.zeros(1, 1, 2, 2, 2), p, bound=1.0, backend="torch")
    assert out.shape == (1, 2, 1)


def test_empty_point_sets():
    verts, faces = octahedron()
    v = verts.unsqueeze(0)
    p = torch.zeros(1, 0, 3, dtype=F64)
    face, bary, signed, sq = ops.closest_triangles(p, v, faces)
    assert face.shape == (1, 0) and bary.shape == (1, 0, 3)
    assert ops.sample_grid3d(torch.zeros(1, 2, 3, 3, 3), p, bound=1.0).shape == (1, 0, 2)
    assert ops.one_ring_deform(p, v, v, ops.mesh_one_ring(faces, 6)).shape == (1, 0, 3)
    none = torch.zeros(0, 5, 3, dtype=F64)
    assert [t.shape for t in ops.closest_triangles(none, v[:0], faces)] == [(0, 5), (0, 5, 3), (0, 5), (0, 5)]


def test_half_precision_inputs():
    verts, faces = octahedron(torch.bfloat16)
    v = verts.unsqueeze(0)
    p = torch.tensor([[[0.5, 0.5, 0.5], [0.0, 0.0, 2.0]]], dtype=torch.bfloat16)
    face, bary, signed, sq = ops.closest_triangles(p, v, faces)
    assert bary.dtype == signed.dtype == sq.dtype == torch.bfloat16 and face.tolist() == [[0, 0]]
    disp, sq = ops.surface_field_grid(v.half(), v.half(), faces, resolution=3)
    assert disp.dtype == torch.float16 and disp.abs().max() < 1e-2
    out = ops.one_ring_deform(p.half(), v.half(), v.half(), ops.mesh_one_ring(faces, 6))
    assert out.dtype == torch.float16 and torch.equal(out, p.half())
