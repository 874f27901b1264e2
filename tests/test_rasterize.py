"""``rasterize_triangles`` and ``interpolate`` (head4d/ops/rasterize.py): every backend
(``torch`` reference, ``cpu``, ``cuda`` in the emulation and on a GPU) against a
brute-force z-buffer written here (every face at every pixel centre, float64, NDC-space
barycentrics: a different formulation from the kernels'), on fresh random scenes, away
from edges and depth near-ties; backends against each other exactly; perspective
correctness through the camera-space position; the edge and tie rules; culling;
faces behind the camera; empty images; bad input."""
import pytest
import torch

from head4d.ops import interpolate, rasterize_triangles

from conftest import CUDA_EMULATED, require_backend

FAST = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu), CUDA_EMULATED]
ALL = ["torch"] + FAST
F64 = torch.float64
FOCAL = 2.5           # NDC x = FOCAL * X / -Z
NEAR, FAR = 1.0, 10.0


def to_clip(points: torch.Tensor) -> torch.Tensor:
    """OpenGL perspective of camera-space ``[..., 3]`` points (the camera looks down -z)."""
    x, y, z = points.unbind(-1)
    a, b = -(FAR + NEAR) / (FAR - NEAR), -2 * FAR * NEAR / (FAR - NEAR)
    return torch.stack([FOCAL * x, FOCAL * y, a * z + b, -z], -1)


def random_scene(n, faces_per_mesh, g):
    """``n`` meshes of independent random triangles (different vertices per mesh, one
    face list) in front of the camera, overlapping in depth: camera-space vertices
    ``[n, 3F, 3]`` and faces ``[F, 3]`` with random winding."""
    centres = torch.stack([torch.rand(n, faces_per_mesh, generator=g, dtype=F64) * 2.4 - 1.2,
                           torch.rand(n, faces_per_mesh, generator=g, dtype=F64) * 2.4 - 1.2,
                           -(torch.rand(n, faces_per_mesh, generator=g, dtype=F64) * 3 + 2.5)], -1)
    offsets = torch.randn(n, faces_per_mesh, 3, 3, generator=g, dtype=F64) * 0.45
    verts = (centres[:, :, None, :] + offsets).reshape(n, 3 * faces_per_mesh, 3)
    faces = torch.arange(3 * faces_per_mesh).reshape(faces_per_mesh, 3)
    flip = torch.rand(faces_per_mesh, generator=g) < 0.5
    faces[flip] = faces[flip].flip(1)
    return verts, faces


def pixel_centres(height, width):
    """NDC ``(x, y)`` of every pixel centre, ``[H, W]`` each, from the documented convention."""
    j = torch.arange(width, dtype=F64)
    i = torch.arange(height, dtype=F64)
    x = -1 + (2 * j + 1) / width
    y = 1 - (2 * i + 1) / height
    return x[None, :].expand(height, width), y[:, None].expand(height, width)


def brute_force(vertices_clip, faces, height, width, cull_backfaces=False, edge_eps=1e-3, depth_eps=1e-5):
    """The z-buffer by definition, float64, one face at a time over every pixel centre.

    Returns ``face [N, H, W]`` (-1 empty), perspective-correct ``bary [N, H, W, 3]``,
    ``depth [N, H, W]``, ``cond [N, H, W]`` (a conditioning factor of the winning face:
    its squared pixel extent over its pixel area) and ``unsure [N, H, W]``: pixels within
    ``edge_eps`` pixels of an edge of some face in front of the camera, or whose two
    nearest depths are within ``depth_eps``, where rounding may decide."""
    v = vertices_clip.to(F64)
    n = v.shape[0]
    px, py = pixel_centres(height, width)
    face = torch.full((n, height, width), -1, dtype=torch.long)
    bary = torch.zeros(n, height, width, 3, dtype=F64)
    depth = torch.full((n, height, width), float("inf"), dtype=F64)
    second = torch.full((n, height, width), float("inf"), dtype=F64)
    cond = torch.zeros(n, height, width, dtype=F64)
    unsure = torch.zeros(n, height, width, dtype=torch.bool)
    scale = torch.tensor([width / 2, height / 2], dtype=F64)  # NDC units -> pixels
    for b in range(n):
        for f, (i0, i1, i2) in enumerate(faces.tolist()):
            c = v[b, [i0, i1, i2]]
            w = c[:, 3]
            if (w <= 0).any():
                continue
            ndc = c[:, :3] / w[:, None]
            (x0, y0), (x1, y1), (x2, y2) = ndc[:, :2].tolist()
            area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)  # NDC, y up: > 0 counter-clockwise
            if area == 0 or (cull_backfaces and area < 0):
                continue
            # NDC barycentrics of the pixel centres
            l0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) / area
            l1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) / area
            l2 = 1 - l0 - l1
            lam = torch.stack([l0, l1, l2], -1)
            # distance (pixels) of each centre to each edge line, for the unsure set
            pix = ndc[:, :2] * scale
            for k in range(3):
                a, e = pix[(k + 1) % 3], pix[(k + 2) % 3]
                d = e - a
                t = ((px * scale[0] - a[0]) * d[0] + (py * scale[1] - a[1]) * d[1]) / (d @ d)
                t = t.clamp(0, 1)
                dist = torch.hypot(px * scale[0] - (a[0] + t * d[0]), py * scale[1] - (a[1] + t * d[1]))
                unsure[b] |= dist < edge_eps
            inside = (lam >= 0).all(-1)
            z = lam @ ndc[:, 2]
            pixel_area = abs(area) * scale[0] * scale[1] / 2
            extent = float((pix.amax(0) - pix.amin(0)).max())
            closer = inside & (z < depth[b])
            second[b] = torch.where(closer, depth[b], torch.where(inside, torch.minimum(second[b], z), second[b]))
            depth[b] = torch.where(closer, z, depth[b])
            face[b] = torch.where(closer, torch.full_like(face[b], f), face[b])
            p = lam / w
            bary[b] = torch.where(closer[..., None], p / p.sum(-1, keepdim=True), bary[b])
            cond[b] = torch.where(closer, torch.full_like(cond[b], extent ** 2 / float(pixel_area)), cond[b])
    unsure |= (second - depth).abs() <= depth_eps * (1 + depth.abs())
    depth = torch.where(face >= 0, depth, torch.zeros_like(depth))
    return face, bary, depth, cond, unsure


def scene_tolerance(dtype):
    """Per-pixel error scale of the kernels' arithmetic: the computation type's eps
    (float32 for half inputs, float64 for float64)."""
    return torch.finfo(F64 if dtype == F64 else torch.float32).eps


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("cull", [False, True])
def test_matches_brute_force(backend, dtype, cull):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(11 + int(cull))
    cam, faces = random_scene(2, 24, g)
    clip = to_clip(cam)
    height, width = 19, 27  # non-square, odd
    face, bary, depth = rasterize_triangles(clip.to(dtype).to(device), faces.to(device), (height, width),
                                            cull_backfaces=cull, backend=backend)
    out_dtype = F64 if dtype == F64 else torch.float32
    assert face.dtype == torch.int64 and bary.dtype == out_dtype and depth.dtype == out_dtype
    assert face.shape == (2, height, width) and bary.shape == (2, height, width, 3)
    # the brute force sees the vertices the kernels see (rounded to dtype)
    ref_face, ref_bary, ref_depth, cond, unsure = brute_force(clip.to(dtype), faces, height, width, cull)
    face, bary, depth = face.cpu(), bary.cpu().double(), depth.cpu().double()
    sure = ~unsure
    assert sure.float().mean() > 0.8 and (ref_face[sure] >= 0).sum() > 100  # the test tests something
    assert torch.equal(face[sure], ref_face[sure])
    covered = sure & (ref_face >= 0)
    tol = 64 * scene_tolerance(dtype) * cond[covered]
    assert ((bary[covered] - ref_bary[covered]).abs().amax(-1) <= tol).all()
    assert ((depth[covered] - ref_depth[covered]).abs() <= tol * (1 + ref_depth[covered].abs())).all()
    assert (bary[face < 0] == 0).all() and (depth[face < 0] == 0).all()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16])
def test_backends_agree_exactly(backend, dtype):
    """The backends share the arithmetic: the same face everywhere, the same bits."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(5)
    cam, faces = random_scene(3, 40, g)
    clip = to_clip(cam).to(dtype)
    for cull in (False, True):
        got = rasterize_triangles(clip.to(device), faces.to(device), (33, 20), cull_backfaces=cull, backend=backend)
        ref = rasterize_triangles(clip, faces, (33, 20), cull_backfaces=cull, backend="torch")
        assert (ref[0] >= 0).sum() > 300
        for a, b in zip(got, ref):
            assert a.dtype == b.dtype
            assert torch.equal(a.cpu(), b), "backends must agree bit for bit"


@pytest.mark.parametrize("backend", FAST)
def test_backends_agree_on_a_head(backend):
    """The procedural head (closed surfaces, many shared edges, eyeballs inside) seen
    from the front: the same face at every pixel as the reference, the same bits."""
    from head4d.head import ProceduralHead

    device = require_backend(backend)
    head = ProceduralHead()
    with torch.no_grad():
        verts = head.v_template[None].double()
    verts = (verts - verts.mean(1, keepdim=True)) / verts.abs().amax() * 0.9
    cam = verts + torch.tensor([0.0, 0.0, -2.2], dtype=F64)
    clip = to_clip(cam).float()
    faces = head.faces
    got = rasterize_triangles(clip.to(device), faces.to(device), (48, 40), backend=backend)
    ref = rasterize_triangles(clip, faces, (48, 40), backend="torch")
    assert (ref[0] >= 0).float().mean() > 0.2
    for a, b in zip(got, ref):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("backend", ALL)
def test_interpolated_camera_position_projects_to_the_pixel_centre(backend):
    """Perspective-correct barycentrics: interpolating the camera-space position (linear
    in 3-D) gives a point on the face that projects onto the pixel centre."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(23)
    cam, faces = random_scene(2, 16, g)
    clip = to_clip(cam)
    height, width = 21, 30
    face, bary, _ = rasterize_triangles(clip.to(device), faces.to(device), (height, width), backend=backend)
    pos = interpolate(cam.to(device), faces.to(device), face, bary).cpu()  # float64: promoted with float32 bary
    assert pos.shape == (2, height, width, 3) and pos.dtype == F64
    covered = face.cpu() >= 0
    assert covered.sum() > 200
    px, py = pixel_centres(height, width)
    proj_x = FOCAL * pos[..., 0] / -pos[..., 2]
    proj_y = FOCAL * pos[..., 1] / -pos[..., 2]
    eps = torch.finfo(torch.float32).eps
    # barycentrics in float32: errors of a few eps times the pixel extent of the faces (~10 px)
    torch.testing.assert_close(proj_x[covered], px.expand(2, -1, -1)[covered], atol=2e3 * eps, rtol=0)
    torch.testing.assert_close(proj_y[covered], py.expand(2, -1, -1)[covered], atol=2e3 * eps, rtol=0)
    assert (pos[~covered] == 0).all()


def test_interpolate_matches_a_loop():
    g = torch.Generator().manual_seed(3)
    attrs = torch.randn(2, 9, 4, generator=g, dtype=F64, requires_grad=True)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [2, 5, 8]])
    face_index = torch.randint(-1, 4, (2, 5, 6), generator=g)
    bary = torch.rand(2, 5, 6, 3, generator=g, dtype=F64, requires_grad=True)
    out = interpolate(attrs, faces, face_index, bary)
    expected = torch.zeros(2, 5, 6, 4, dtype=F64)
    for n in range(2):
        for i in range(5):
            for j in range(6):
                f = int(face_index[n, i, j])
                if f >= 0:
                    expected[n, i, j] = sum(bary[n, i, j, k] * attrs[n, faces[f, k]] for k in range(3))
    torch.testing.assert_close(out, expected, atol=1e-14, rtol=1e-14)
    assert torch.autograd.gradcheck(lambda a, b: interpolate(a, faces, face_index, b), (attrs, bary))


@pytest.mark.parametrize("backend", ALL)
def test_equal_depth_goes_to_the_lower_face_index(backend):
    """Two coincident faces (either winding), and a square split along its diagonal with
    pixel centres exactly on the diagonal (inclusive rule: both cover them, equal
    depth): the lower face index wins, and the square has no crack."""
    device = require_backend(backend)
    # a tilted face listed twice with the same corners: the same arithmetic, equal depths
    tilted = torch.tensor([[[-0.7, -0.6, 0.3, 1.1], [0.8, -0.5, -0.2, 0.9], [0.1, 0.9, 0.7, 1.3]]], device=device)
    # a face at z = 0.5 (w = 1): the depth is exactly 0.5 whatever the corner order, so
    # coincident copies in other orders and windings tie too
    flat = torch.tensor([[[-0.7, -0.6, 0.5, 1.0], [0.8, -0.5, 0.5, 1.0], [0.1, 0.9, 0.5, 1.0]]], device=device)
    for verts, faces in ((tilted, [[0, 1, 2], [0, 1, 2]]), (tilted, [[1, 2, 0], [1, 2, 0], [1, 2, 0]]),
                         (flat, [[2, 1, 0], [0, 1, 2]]), (flat, [[0, 1, 2], [1, 2, 0], [2, 1, 0]])):
        face, _, _ = rasterize_triangles(verts, torch.tensor(faces, device=device), (16, 16), backend=backend)
        assert (face >= 0).sum() > 50 and set(face.unique().tolist()) == {-1, 0}
    # the square [-1, 1]^2 at 8 x 8: the diagonal from (-1, -1) to (1, 1) passes through 8 pixel centres
    square = torch.tensor([[[-1, -1, 0.5, 1], [1, -1, 0.5, 1], [1, 1, 0.5, 1], [-1, 1, 0.5, 1]]],
                          dtype=torch.float32, device=device)
    for faces, diagonal_owner in (([[0, 1, 2], [0, 2, 3]], 0), ([[0, 2, 3], [0, 1, 2]], 0)):
        face, bary, depth = rasterize_triangles(square, torch.tensor(faces, device=device), (8, 8), backend=backend)
        face = face[0].cpu()
        assert (face >= 0).all(), "no crack along the shared edge"
        assert (face.flip(1).diagonal() == diagonal_owner).all()  # centres with x == y: row i, column 7 - i
        assert torch.equal(depth.cpu(), torch.full_like(depth.cpu(), 0.5))
        torch.testing.assert_close(bary.sum(-1).cpu(), torch.ones(1, 8, 8))


@pytest.mark.parametrize("backend", ALL)
def test_backface_culling(backend):
    device = require_backend(backend)
    ccw = torch.tensor([[-0.5, -0.5, 0.0, 1.0], [0.5, -0.5, 0.0, 1.0], [0.0, 0.5, 0.0, 1.0]])  # front (y up)
    verts = torch.cat([ccw, ccw + torch.tensor([0.0, 0.0, 0.2, 0.0])])[None].to(device)
    front, back = [0, 1, 2], [5, 4, 3]  # the back one is behind (larger z)
    faces = torch.tensor([front, back], device=device)
    for cull, expected in ((False, {-1, 0}), (True, {-1, 0})):
        face, _, _ = rasterize_triangles(verts, faces, (12, 12), cull_backfaces=cull, backend=backend)
        assert set(face.unique().tolist()) == expected
    faces = torch.tensor([back, front], device=device)  # now the back face has index 0 but is farther
    face, _, _ = rasterize_triangles(verts, faces, (12, 12), cull_backfaces=False, backend=backend)
    assert set(face.unique().tolist()) == {-1, 1}
    # the clockwise face alone: drawn without culling, skipped with it
    faces = torch.tensor([back], device=device)
    drawn, _, _ = rasterize_triangles(verts, faces, (12, 12), backend=backend)
    culled, _, _ = rasterize_triangles(verts, faces, (12, 12), cull_backfaces=True, backend=backend)
    assert (drawn == 0).sum() > 10 and (culled == -1).all()
    # the same face counter-clockwise: drawn either way, over the same pixels
    faces = torch.tensor([[3, 4, 5]], device=device)
    kept, _, _ = rasterize_triangles(verts, faces, (12, 12), cull_backfaces=True, backend=backend)
    assert torch.equal(kept, drawn)


@pytest.mark.parametrize("backend", ALL)
def test_faces_behind_the_camera_are_dropped(backend):
    """A face with one vertex at w <= 0 is dropped whole (no clipping), while the same
    face with that vertex in front is drawn."""
    device = require_backend(backend)
    cam = torch.tensor([[-0.5, -0.5, -2.0], [0.5, -0.5, -2.0], [0.0, 0.4, -2.0]], dtype=F64)
    faces = torch.tensor([[0, 1, 2]], device=device)
    face, _, _ = rasterize_triangles(to_clip(cam)[None].float().to(device), faces, (16, 16), backend=backend)
    assert (face == 0).sum() > 10
    for w in (0.0, -0.5):
        clip = to_clip(cam)
        clip[2, 3] = w
        face, bary, depth = rasterize_triangles(clip[None].float().to(device), faces, (16, 16), backend=backend)
        assert (face == -1).all() and (bary == 0).all() and (depth == 0).all()


@pytest.mark.parametrize("backend", ALL)
def test_empty_images(backend):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(2)
    cam, faces = random_scene(2, 6, g)
    clip = to_clip(cam).float().to(device)
    offscreen = clip.clone()
    offscreen[..., 0] = offscreen[..., 0].abs() + 1.6 * offscreen[..., 3]  # every NDC x > 1.6
    for verts, f in ((clip, faces[:0]), (offscreen, faces)):
        face, bary, depth = rasterize_triangles(verts, f.to(device), (7, 9), backend=backend)
        assert face.shape == (2, 7, 9) and (face == -1).all() and (bary == 0).all() and (depth == 0).all()


@pytest.mark.parametrize("backend", ALL)
def test_each_mesh_of_a_batch_is_its_own(backend):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(8)
    cam, faces = random_scene(3, 10, g)
    clip = to_clip(cam).float().to(device)
    faces = faces.to(device)
    batch = rasterize_triangles(clip, faces, (10, 13), backend=backend)
    assert not torch.equal(batch[0][0], batch[0][1])
    for n in range(3):
        alone = rasterize_triangles(clip[n:n + 1], faces, (10, 13), backend=backend)
        for a, b in zip(batch, alone):
            assert torch.equal(a[n:n + 1], b)


@pytest.mark.parametrize("backend", ALL)
def test_no_gradient(backend):
    device = require_backend(backend)
    verts = torch.rand(1, 3, 4, device=device, requires_grad=True)
    faces = torch.tensor([[0, 1, 2]], device=device)
    with pytest.raises(RuntimeError, match="no gradient.*detach"):
        rasterize_triangles(verts, faces, (4, 4), backend=backend)
    rasterize_triangles(verts.detach(), faces, (4, 4), backend=backend)
    with torch.no_grad():
        rasterize_triangles(verts, faces, (4, 4), backend=backend)


def test_bad_input():
    v = torch.rand(1, 5, 4)
    f = torch.tensor([[0, 1, 2], [2, 3, 4]])
    cases = [
        ((v.long(), f, (4, 4)), TypeError, "vertices_clip must have a dtype"),
        ((v[..., :3], f, (4, 4)), ValueError, r"vertices_clip must have shape \[N, V, 4\]"),
        ((v[0], f, (4, 4)), ValueError, r"vertices_clip must have shape \[N, V, 4\]"),
        ((v, f.float(), (4, 4)), TypeError, "faces must have a dtype"),
        ((v, f[:, :2], (4, 4)), ValueError, r"faces must have shape \[F, 3\]"),
        ((v, f.tolist(), (4, 4)), TypeError, "faces must be a torch.Tensor"),
        ((v, f + 1, (4, 4)), ValueError, r"faces must index vertices in \[0, 5\)"),
        ((v, f - 1, (4, 4)), ValueError, r"faces must index vertices in \[0, 5\)"),
        ((v, f, (0, 4)), ValueError, "resolution must be .H, W., two positive ints; H is 0"),
        ((v, f, (4, 2.5)), ValueError, "resolution must be .H, W., two positive ints; W is 2.5"),
        ((v, f, (4,)), ValueError, "resolution must be .H, W."),
        ((v, f, 4), ValueError, "resolution must be .H, W."),
        ((v, f, (True, 4)), ValueError, "H is True"),
        ((v, f.to("meta"), (4, 4)), ValueError, "faces is on meta but vertices_clip is on cpu"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            rasterize_triangles(*args)
    with pytest.raises(TypeError, match="cull_backfaces must be a bool"):
        rasterize_triangles(v, f, (4, 4), cull_backfaces=1)
    face, bary, _ = rasterize_triangles(v, f, (4, 4))
    attrs = torch.rand(1, 5, 2)
    with pytest.raises(ValueError, match=r"barycentric must have shape \[N, H, W, 3\]"):
        interpolate(attrs, f, face, bary[..., :2])
    with pytest.raises(ValueError, match=r"attributes must have shape \[N, V, C\] with N = 1"):
        interpolate(attrs.expand(2, -1, -1), f, face, bary)
    with pytest.raises(ValueError, match=r"face_index must be in \[-1, 2\)"):
        interpolate(attrs, f, face.clamp(min=0) + 2, bary)
    with pytest.raises(ValueError, match=r"faces must index vertices in \[0, 4\)"):
        interpolate(attrs[:, :4], f, face, bary)
    with pytest.raises(TypeError, match="face_index must have a dtype"):
        interpolate(attrs, f, face.int(), bary)


def test_opcheck():
    from head4d.ops import _library

    require_backend("cpu")
    g = torch.Generator().manual_seed(4)
    cam, faces = random_scene(2, 5, g)
    torch.library.opcheck(_library.rasterize_triangles, (to_clip(cam).float(), faces, 6, 7, False))
    torch.library.opcheck(_library.rasterize_triangles, (to_clip(cam), faces.int(), 5, 3, True))


def test_torch_compile_fullgraph():
    """The public ops trace into one graph (the custom op, the interpolation around it)."""
    require_backend("cpu")
    g = torch.Generator().manual_seed(9)
    cam, faces = random_scene(2, 12, g)
    clip = to_clip(cam).float()

    def draw(clip, faces, attributes):
        face_index, barycentric, depth = rasterize_triangles(clip, faces, (14, 11), cull_backfaces=True, backend="cpu")
        return interpolate(attributes, faces, face_index, barycentric), depth

    compiled = torch.compile(draw, fullgraph=True, backend="aot_eager")
    got = compiled(clip, faces, cam.float())
    expected = draw(clip, faces, cam.float())
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert (expected[1] != 0).sum() > 20


@pytest.mark.parametrize("backend", ALL)
def test_no_depth_clipping(backend):
    """Only w > 0 is required: faces beyond NDC z = +-1 are drawn, with their depth."""
    device = require_backend(backend)
    faces = torch.tensor([[0, 1, 2]], device=device)
    for z in (-1.5, 2.5):
        verts = torch.tensor([[[-0.5 * 2, -0.5 * 2, z * 2, 2.0], [0.5 * 2, -0.5 * 2, z * 2, 2.0],
                               [0.0, 0.5 * 2, z * 2, 2.0]]], device=device)
        face, _, depth = rasterize_triangles(verts, faces, (10, 10), backend=backend)
        assert (face == 0).sum() > 10
        assert (depth[face == 0] == z).all() and (depth[face < 0] == 0).all()


def shared_edge_pair(size, direction, s0, s1):
    """Two faces, one on each side of the edge from ``p0 + s0 d`` to ``p0 + s1 d`` (pixel
    coordinates, ``p0`` a pixel centre, ``d`` an integer direction), so the edge runs
    through the centres ``p0 + k d`` up to the rounding of its endpoints. Returns
    clip-space vertices ``[1, 4, 4]``, faces and the ``(row, col)`` of those centres."""
    p0 = (3.5, 2.5)
    dx, dy = direction
    a = (p0[0] + s0 * dx, p0[1] + s0 * dy)
    b = (p0[0] + s1 * dx, p0[1] + s1 * dy)
    length = (dx * dx + dy * dy) ** 0.5
    normal = (-dy / length * 60, dx / length * 60)
    mid = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
    c1 = (mid[0] + normal[0], mid[1] + normal[1])
    c2 = (mid[0] - normal[0], mid[1] - normal[1])
    w = 1.7
    clip = torch.tensor([[(x / (size / 2) - 1) * w, (1 - y / (size / 2)) * w, 0.5 * w, w] for x, y in (a, b, c1, c2)],
                        dtype=F64).float()
    centres = [(int(p0[1] - 0.5) + k * dy, int(p0[0] - 0.5) + k * dx) for k in range(1, int(s1))]
    return clip[None], torch.tensor([[0, 1, 2], [1, 0, 3]]), [(i, j) for i, j in centres if i < size and j < size]


@pytest.mark.parametrize("backend", ALL)
def test_shared_edges_leave_no_crack(backend):
    """Pixel centres (nearly) on an edge shared by two faces are covered by one of them:
    evaluating the edge from each face's own corner lets both miss some of these
    (17 of 1,593 here when tried)."""
    device = require_backend(backend)
    size, tested = 128, 0
    for direction in [(1, 2), (2, 3), (3, 1), (1, 3), (3, 2), (2, 5), (5, 3), (1, 1), (4, 1)]:
        for s0 in (-0.37, -0.11, -0.73):
            for s1 in (20.41, 17.29, 25.83):
                clip, faces, centres = shared_edge_pair(size, direction, s0, s1)
                face, _, _ = rasterize_triangles(clip.to(device), faces.to(device), (size, size), backend=backend)
                rows, cols = torch.tensor(centres).T
                assert (face[0].cpu()[rows, cols] >= 0).all(), f"crack along the edge in direction {direction}"
                tested += len(centres)
    assert tested > 1500
