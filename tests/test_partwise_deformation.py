"""head4d.deform.PartwiseDeformation on the built-in ProceduralHead: the identity at the
canonical codes, a neck rotation undone near the surface (and the smoothed field far from
it), a jaw opening and an eye rotation undone by the mouth and eye parts, the eye boxes, a
step-by-step composition of the public ops written here, per-image batching, gradients
and bad inputs.

Cost: the neck grids are built with the reference ``surface_field_grid`` (brute force), so
the tests build as few fields as they can (module fixtures, one batch of four images) and
run single-threaded (faster than two threads on a busy 2-core machine)."""
import math

import pytest
import torch

from head4d import ops
from head4d.deform import (BLEND_THRESHOLD, COARSE_RESOLUTION, EYE_BOX_SCALE, FINE_RESOLUTION, SMOOTH_PASSES,
                           DeformationFields, PartwiseDeformation, WarpedPoints)
from head4d.deform import partwise as P
from head4d.head import ProceduralHead, rodrigues
from head4d.ops.deformation import PORTRAIT4D_COARSE_BOUND, PORTRAIT4D_FINE_BOUND

# the four images of the shared batch
CANONICAL, NECK, JAW, EYES = range(4)
NECK_POSE = (0.25, -0.3, 0.1)
JAW_POSE = (0.05, 0.0, 0.0)  # the canonical mesh has 0.3: this closes the mouth
EYE_POSE = (0.2, 0.3, 0.0, 0.2, 0.3, 0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def head():
    return ProceduralHead()


@pytest.fixture(scope="module")
def deformation(head):
    return PartwiseDeformation(head)


@pytest.fixture(scope="module")
def codes(head):
    c = head.canonical_codes(4)
    c["neck_pose"][NECK] = torch.tensor(NECK_POSE)
    c["jaw_pose"][JAW] = torch.tensor(JAW_POSE)
    c["eye_pose"][EYES] = torch.tensor(EYE_POSE)
    return c


@pytest.fixture(scope="module")
def fields(deformation, codes):
    with torch.no_grad():
        return deformation.build(**codes)


@pytest.fixture(scope="module")
def posed(head, codes):
    """The observed meshes and joints of the four images."""
    with torch.no_grad():
        return head(**codes, return_joints=True)


def image(fields: DeformationFields, i: int) -> DeformationFields:
    """The fields of image i alone (N = 1)."""
    return DeformationFields(**{k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v)
                                for k, v in fields.__dict__.items()})


def only(codes, i):
    return {k: v[i:i + 1] for k, v in codes.items()}


def vertex_normals(verts, faces):
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    fn = torch.cross(b - a, c - a, dim=-1)
    vn = torch.zeros_like(verts).index_add_(0, faces.reshape(-1), fn.repeat_interleave(3, 0))
    return vn / vn.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------
# fields
# ----------------------------------------------------------------------------------

def test_fields_layout(deformation, fields, head):
    r, rc = FINE_RESOLUTION, COARSE_RESOLUTION
    v = head.num_vertices
    assert (FINE_RESOLUTION, COARSE_RESOLUTION, SMOOTH_PASSES, BLEND_THRESHOLD) == (24, 8, 2, 3e-3)
    assert fields.fine.shape == (4, 4, r, r, r) and fields.smooth.shape == (4, 3, rc, rc, rc)
    assert fields.fine_offsets.shape == (4, 3, r, r, r)
    assert fields.fine_squared_distance.shape == (4, 1, r, r, r)
    assert fields.verts_target.shape == fields.verts_mouth.shape == fields.verts_canonical.shape == (4, v, 3)
    assert fields.eye_box_centre.shape == fields.eye_box_half.shape == (4, 2, 3)
    assert fields.dtype == torch.float32 and fields.batch_size == 4
    assert math.isclose(fields.fine_bound, PORTRAIT4D_FINE_BOUND, rel_tol=1e-12)
    assert math.isclose(fields.coarse_bound, PORTRAIT4D_COARSE_BOUND, rel_tol=1e-12)
    assert math.isclose(fields.fine_bound, 0.65 * (1 - 1 / 24), rel_tol=1e-12)
    assert (fields.fine_squared_distance >= 0).all()
    # neck 0 everywhere but image NECK: the surface field is the identity there
    for i in (CANONICAL, JAW, EYES):
        assert fields.fine_offsets[i].abs().max() < 1e-5
        assert fields.smooth[i].abs().max() < 1e-5
    assert fields.fine_offsets[NECK].abs().max() > 0.05
    assert "fine=24^3" in repr(deformation)


# ----------------------------------------------------------------------------------
# behaviour
# ----------------------------------------------------------------------------------

def test_identity_at_canonical_codes(deformation, fields, head):
    canon = head.canonical_vertices()
    g = torch.Generator().manual_seed(0)
    near = canon[torch.randint(0, canon.shape[0], (600,), generator=g)] + 0.01 * torch.randn(600, 3, generator=g)
    box = torch.rand(200, 3, generator=g) * 1.4 - 0.7  # some just outside the grids
    x = torch.cat([near, box]).unsqueeze(0)
    out = deformation.warp(x, image(fields, CANONICAL))
    assert isinstance(out, WarpedPoints)
    for name in ("neck", "head", "eyes", "mouth"):
        value = getattr(out, name)
        assert value.shape == x.shape and value.dtype == torch.float32
        assert (value - x).abs().max() < 1e-5, name
    assert out.inside_eye_box.shape == x.shape[:2] and out.inside_eye_box.dtype == torch.bool
    assert torch.equal(out.part_points(), out.eyes)


def test_neck_rotation_near_surface(deformation, fields, head, posed):
    """Points on and near the rigidly rotating head go back by the inverse neck rotation
    about the neck joint, to within a small fraction of the 5.4 cm grid cell."""
    verts, joints = posed
    rigid = (head.lbs_weights[head.companion_indices, 1] > 0.999).all(dim=1)  # companion vertices on the head
    assert int(rigid.sum()) > 200
    comp = head.companion_vertices(verts[NECK])
    normals = vertex_normals(comp, head.companion_faces)
    rot = rodrigues(torch.tensor(NECK_POSE))
    joint = joints[NECK, 1]
    for offset in (0.0, 0.02, -0.02):
        x = (comp[rigid] + offset * normals[rigid]).unsqueeze(0)
        x1 = deformation.warp_neck(x, image(fields, NECK))
        expected = (x - joint) @ rot + joint  # R^T (x - J) + J, row vectors
        moved = (x - expected).norm(dim=-1)
        err = (x1 - expected).norm(dim=-1)
        assert moved.mean() > 0.05
        assert err.max() < 5e-3 and err.mean() < 5e-4, (offset, float(err.max()), float(err.mean()))


def test_far_points_use_the_smoothed_field(deformation, fields):
    f = image(fields, NECK)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 2000, 3, generator=g) * 1.3 - 0.65
    d2 = ops.sample_grid3d(f.fine_squared_distance, x, bound=f.fine_bound)[0, :, 0]
    far = d2 > 0.02  # blend weight below exp(-17)
    near = d2 < BLEND_THRESHOLD
    assert far.sum() > 500 and near.sum() > 20
    x1 = deformation.warp_neck(x, f)
    smooth = ops.sample_grid3d(f.smooth, x, bound=f.coarse_bound)
    fine = ops.sample_grid3d(f.fine_offsets, x, bound=f.fine_bound)
    assert ((x1 - x - smooth)[0, far]).abs().max() < 1e-6
    assert ((x1 - x - fine)[0, near]).abs().max() < 1e-6
    assert ((fine - smooth)[0, far]).abs().max() > 1e-3  # the two fields do differ there


def test_jaw_lips_go_to_canonical(deformation, fields, head, posed):
    verts, _ = posed
    canon = head.canonical_vertices()
    lips = head.lips_indices
    lower = lips[head.lbs_weights[lips, 2] > 0.5]  # the lower lip follows the jaw
    assert lower.numel() > 20
    x = verts[JAW:JAW + 1, lower]
    assert (x - canon[lower]).norm(dim=-1).mean() > 0.03
    out = deformation.warp(x, image(fields, JAW))
    assert (out.mouth - canon[lower]).abs().max() < 1e-5
    assert (out.head - canon[lower]).abs().max() < 1e-5
    # slightly off the vertices: the local offset is kept
    g = torch.Generator().manual_seed(2)
    xn = x + 5e-4 * torch.randn(x.shape, generator=g)
    out = deformation.warp(xn, image(fields, JAW))
    assert (out.mouth - (xn + canon[lower] - x)).norm(dim=-1).max() < 5e-3


def test_mouth_ignores_expression(deformation, head):
    """The mouth part's target mesh has zero expression and eye pose: with an expression but
    the canonical jaw, lips points move only by the expression-free lips mesh (identity)."""
    c = head.canonical_codes(1)
    c["expression"][0, 0] = 2.0  # the procedural head's mouth-opening expression
    with torch.no_grad():
        f = deformation.build(**c)
        verts = head(**c)
    assert torch.allclose(f.verts_mouth, f.verts_canonical, atol=1e-6)
    lips = head.lips_indices
    x = verts[:, lips]
    out = deformation.warp(x, f)
    assert (out.mouth - x).abs().max() < 1e-5
    assert (out.head - head.canonical_vertices()[lips]).abs().max() < 1e-5
    assert (x - head.canonical_vertices()[lips]).abs().max() > 1e-3


def test_eye_rotation_is_undone_rigidly(deformation, fields, head, posed):
    verts, joints = posed
    canon = head.canonical_vertices()
    canon_joints = head.canonical_joints()
    f = image(fields, EYES)
    g = torch.Generator().manual_seed(3)
    for k, (indices, joint) in enumerate(((head.left_eye_indices, 3), (head.right_eye_indices, 4))):
        x = verts[EYES:EYES + 1, indices]
        out = deformation.warp(x, f)
        assert (out.eyes - canon[indices]).abs().max() < 1e-5
        assert out.inside_eye_box.all()
        # random points on the rotated eyeball's sphere: rigidly back, within the mesh's resolution
        centre = joints[EYES, joint]
        radius = (x[0] - centre).norm(dim=-1).mean()
        dirs = torch.randn(1, 300, 3, generator=g)
        p = centre + radius * dirs / dirs.norm(dim=-1, keepdim=True)
        rot = rodrigues(torch.tensor(EYE_POSE[3 * k:3 * k + 3]))
        expected = (p - centre) @ rot + canon_joints[joint]
        out = deformation.warp(p, f)
        err = (out.eyes - expected).norm(dim=-1)
        assert (p - expected).norm(dim=-1).mean() > 0.008
        assert err.max() < 2.5e-3 and err.mean() < 1e-3
        assert out.inside_eye_box.all()


def test_eye_boxes(deformation, fields, head, posed):
    for i in (CANONICAL, EYES):
        f = image(fields, i)
        for k, indices in enumerate((head.left_eye_indices, head.right_eye_indices)):
            eyeball = f.verts_target[0, indices]
            lo, hi = eyeball.amin(0), eyeball.amax(0)
            centre, half = eyeball.mean(0), 0.5 * EYE_BOX_SCALE * (hi - lo)
            assert torch.allclose(f.eye_box_centre[0, k], centre, atol=1e-7)
            assert torch.allclose(f.eye_box_half[0, k], half, atol=1e-7)
            axes = torch.eye(3)
            inside = torch.cat([centre + 0.98 * half * axes, centre - 0.98 * half * axes, centre[None]])
            outside = torch.cat([centre + 1.02 * half * axes, centre - 1.02 * half * axes])
            got = deformation.warp(torch.cat([inside, outside]).unsqueeze(0), f).inside_eye_box[0]
            assert got[:7].all() and not got[7:].any()
        out = deformation.warp(torch.tensor([[[0.0, -0.3, -0.2], [0.5, 0.5, 0.5]]]), f)
        assert not out.inside_eye_box.any()
    # membership is tested on the neck-corrected point x1: the eyeballs of the neck-rotated
    # head lie outside the (neck 0) boxes, their stage-1 points inside
    verts, _ = posed
    x = verts[NECK:NECK + 1, head.eye_indices]
    f = image(fields, NECK)
    raw = ((x.unsqueeze(2) - f.eye_box_centre.unsqueeze(1)).abs() < f.eye_box_half.unsqueeze(1)).all(-1).any(-1)
    assert not raw.any()
    assert deformation.warp(x, f).inside_eye_box.all()


def test_eye_box_centre_option(head, fields):
    f = image(fields, EYES)
    c = head.canonical_codes(1)
    c["eye_pose"][0] = torch.tensor(EYE_POSE)
    # the centre only changes the eye boxes: build cheaply with small grids
    d_box = PartwiseDeformation(head, eye_box_centre="box", mouth=False, fine_resolution=3, coarse_resolution=2)
    with torch.no_grad():
        fb = d_box.build(**c)
    for k, indices in enumerate((head.left_eye_indices, head.right_eye_indices)):
        eyeball = f.verts_target[0, indices]
        assert torch.allclose(fb.eye_box_centre[0, k], 0.5 * (eyeball.amin(0) + eyeball.amax(0)), atol=1e-7)
    assert torch.allclose(fb.eye_box_half, f.eye_box_half, atol=1e-7)
    # (on the procedural head's symmetric eyeballs the two centres agree to ~1e-8)
    assert torch.allclose(fb.eye_box_centre, f.eye_box_centre, atol=1e-5)
    assert fb.verts_mouth is None


def test_part_points_select_mouth_by_mask(deformation, fields):
    g = torch.Generator().manual_seed(4)
    x = torch.rand(4, 6 * 5, 3, generator=g) * 0.4 - 0.2  # 6 rays x 5 samples per image
    out = deformation.warp(x, fields)
    ray_mask = torch.zeros(4, 6)
    ray_mask[:, 2] = 0.5
    ray_mask[1, 4] = 1.0
    part = out.part_points(ray_mask)
    point_mask = ray_mask.repeat_interleave(5, dim=1) > 0
    assert torch.equal(part, torch.where(point_mask[..., None], out.mouth, out.eyes))
    assert torch.equal(out.part_points(point_mask), part)
    assert torch.equal(out.part_points(None), out.eyes)


# ----------------------------------------------------------------------------------
# the composition, written out with the public ops
# ----------------------------------------------------------------------------------

def step_by_step(head, points, shape, expression, neck_pose, jaw_pose, eye_pose):
    """Portrait4D's part-wise deformation (design note, "Deformation"), one public op at a time."""
    n = points.shape[0]
    box = 1.3
    fine_bound, coarse_bound = ops.cell_centre_bound(24, box), ops.cell_centre_bound(8, box)
    observed = head(shape, expression, neck_pose, jaw_pose, eye_pose)
    target = head(shape, expression, torch.zeros_like(neck_pose), jaw_pose, eye_pose)
    mouth_mesh = head(shape, torch.zeros_like(expression), torch.zeros_like(neck_pose), jaw_pose,
                      torch.zeros_like(eye_pose))
    canonical = head.canonical_vertices().expand(n, -1, -1).contiguous()
    # stage 1: the neck, on the companion mesh
    c_obs, c_can = head.companion_vertices(observed), head.companion_vertices(target)
    fine, fine_d2 = ops.surface_field_grid(c_obs, c_can, head.companion_faces, resolution=24, bound=fine_bound)
    coarse, _ = ops.surface_field_grid(c_obs, c_can, head.companion_faces, resolution=8, bound=coarse_bound)
    smooth = ops.smooth_grid3d(coarse, passes=2)
    f = ops.sample_grid3d(fine, points, bound=fine_bound, padding="zeros")
    d2 = ops.sample_grid3d(fine_d2, points, bound=fine_bound, padding="zeros")
    s = ops.sample_grid3d(smooth, points, bound=coarse_bound, padding="zeros")
    w = torch.exp(-1000.0 * torch.relu(d2 - 3e-3))
    x1 = points + w * f + (1 - w) * s
    # stage 2: the parts
    ring = head.one_ring
    x_head = ops.one_ring_deform(x1, target, canonical, ring, vertex_subset=head.face_indices)
    x_eyes = ops.one_ring_deform(x1, target, canonical, ring, vertex_subset=head.eye_indices)
    x_mouth = ops.one_ring_deform(x1, mouth_mesh, canonical, ring, vertex_subset=head.lips)
    inside = torch.zeros(points.shape[:2], dtype=torch.bool)
    for indices in (head.left_eye_indices, head.right_eye_indices):
        eyeball = target[:, indices]
        centre = eyeball.mean(1, keepdim=True)
        half = 0.6 * (eyeball.amax(1, keepdim=True) - eyeball.amin(1, keepdim=True))
        inside |= ((x1 - centre).abs() < half).all(-1)
    return x1, x_head, x_eyes, x_mouth, inside


def random_codes(head, n, seed):
    g = torch.Generator().manual_seed(seed)
    c = head.zero_codes(n)
    c["shape"] = torch.randn(n, 300, generator=g) * 0.5
    c["expression"] = torch.randn(n, 100, generator=g) * 0.5
    c["neck_pose"] = torch.randn(n, 3, generator=g) * 0.2
    c["jaw_pose"] = torch.rand(n, 3, generator=g) * torch.tensor([0.4, 0.05, 0.05])
    c["eye_pose"] = torch.randn(n, 6, generator=g) * 0.2
    return c


def test_warp_equals_step_by_step_composition(deformation, head):
    c = random_codes(head, 2, seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        verts = head(**c)
        near = verts[:, torch.randint(0, head.num_vertices, (400,), generator=g)]
        near = near + 0.02 * torch.randn(near.shape, generator=g)
        x = torch.cat([near, torch.rand(2, 200, 3, generator=g) * 1.4 - 0.7], dim=1)
        out = deformation(x, **c)
        expected = step_by_step(head, x, **c)
    for name, value in zip(("neck", "head", "eyes", "mouth"), expected[:4]):
        assert torch.allclose(getattr(out, name), value, atol=2e-6, rtol=0), name
    assert torch.equal(out.inside_eye_box, expected[4])
    assert out.inside_eye_box.any() and not out.inside_eye_box.all()
    # the parts differ from one another (the test would not notice swapped sets otherwise)
    for a, b in (("head", "eyes"), ("head", "mouth"), ("eyes", "mouth"), ("neck", "head")):
        assert (getattr(out, a) - getattr(out, b)).abs().max() > 1e-3, (a, b)


def test_batch_images_are_independent(deformation, fields, codes, head):
    """N = 4 images with different codes: each image's warp is what it gives alone, and
    build gives each image the fields it builds alone.

    Building alone can differ in the last bit of the posed vertices (batched matrix
    products), which can flip the closest-triangle choice at a grid point equidistant
    from two triangles: a handful of the 13,824 fine voxels may then differ (the surface
    field jumps there), so the fields are compared voxel by voxel with that allowance."""
    g = torch.Generator().manual_seed(7)
    x = torch.rand(4, 300, 3, generator=g) * 0.8 - 0.4
    names = ("neck", "head", "eyes", "mouth")
    with torch.no_grad():
        out = deformation.warp(x, fields)
        for i in range(4):
            alone = deformation.warp(x[i:i + 1], image(fields, i))
            for name in names:
                assert torch.equal(getattr(alone, name), getattr(out, name)[i:i + 1]), (i, name)
            assert torch.equal(alone.inside_eye_box, out.inside_eye_box[i:i + 1])
        for i in (NECK, EYES):
            built = deformation.build(**only(codes, i))
            mine = image(fields, i)
            for name in ("verts_target", "verts_mouth", "verts_canonical", "eye_box_centre", "eye_box_half"):
                assert torch.allclose(getattr(built, name), getattr(mine, name), atol=1e-6), (i, name)
            assert ((built.fine - mine.fine).abs() > 1e-5).float().mean() < 1e-3
            assert torch.allclose(built.smooth, mine.smooth, atol=1e-3)
            alone = deformation(x[i:i + 1], **only(codes, i))  # forward = build + warp
            for name in names:
                close = (getattr(alone, name) - getattr(out, name)[i:i + 1]).abs().amax(-1) < 1e-5
                assert close.float().mean() > 0.97, (i, name)
    # the same points give different results in different images
    assert (out.neck[NECK] - out.neck[CANONICAL]).abs().max() > 1e-2
    assert (out.eyes[EYES] - out.eyes[CANONICAL]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------
# gradients, backends, NVTX
# ----------------------------------------------------------------------------------

def test_gradients_reach_points(deformation, fields, posed, monkeypatch):
    verts, _ = posed
    g = torch.Generator().manual_seed(8)
    near = verts[:, torch.randint(0, verts.shape[1], (200,), generator=g)] + 0.01 * torch.randn(4, 200, 3,
                                                                                                generator=g)
    x = torch.cat([near, torch.rand(4, 100, 3, generator=g) - 0.5], dim=1)
    weights = [torch.randn(x.shape, generator=g) for _ in range(4)]

    def run():
        p = x.clone().requires_grad_(True)
        out = deformation.warp(p, fields)
        loss = sum((getattr(out, k) * w).sum() for k, w in zip(("neck", "head", "eyes", "mouth"), weights))
        loss.backward()
        return p.grad, out

    grad, out = run()
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the default (compiled) backends against the references: values and gradients
    monkeypatch.setenv("HEAD4D_BACKEND", "torch")
    grad_ref, out_ref = run()
    for k in ("neck", "head", "eyes", "mouth"):
        assert torch.allclose(getattr(out, k), getattr(out_ref, k), atol=1e-5), k
    assert torch.allclose(grad, grad_ref, atol=1e-3, rtol=1e-4)


def test_gradcheck_float64_and_codes():
    """Finite differences in float64 (small grids: the same code path, cheaper): w.r.t.
    points, and through build w.r.t. the expression codes."""
    head64 = ProceduralHead(dtype=torch.float64)
    d = PartwiseDeformation(head64, fine_resolution=6, coarse_resolution=4)
    c = random_codes(head64, 1, seed=9)
    c = {k: v.double() for k, v in c.items()}
    with torch.no_grad():
        f = d.build(**c)
        verts = head64(**c)
    g = torch.Generator().manual_seed(10)
    # points near distinct vertices: far from the nearest-vertex boundaries
    idx = torch.tensor([100, 2000, 3000, int(head64.eye_indices[7]), int(head64.lips_indices[5])])
    x = (verts[:, idx] + 1e-4 * torch.randn(1, idx.numel(), 3, generator=g, dtype=torch.float64))
    x.requires_grad_(True)

    def fn(p):
        out = d.warp(p, f)
        return out.neck, out.head, out.eyes, out.mouth

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-7, atol=1e-5, rtol=1e-4)
    # through build, w.r.t. three expression coefficients (each one a whole build per
    # finite difference, so not all hundred)
    rest = c["expression"][:, 3:]

    def of_expression(first):
        out = d(x.detach(), c["shape"], torch.cat([first, rest], dim=1), c["neck_pose"], c["jaw_pose"],
                c["eye_pose"])
        return out.head, out.neck

    first = c["expression"][:, :3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(of_expression, (first,), eps=1e-7, atol=1e-5, rtol=1e-4)
    jacobian = torch.autograd.functional.jacobian(lambda e: of_expression(e)[0], first)
    assert jacobian.abs().amax() > 1e-3  # the comparison is not of zeros: the face moves


def test_nvtx_ranges(deformation, fields, monkeypatch, head):
    names = []

    class _Range:
        def __init__(self, name):
            names.append(name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(P, "nvtx_range", _Range)
    small = PartwiseDeformation(head, fine_resolution=3, coarse_resolution=2)
    f = small.build(**head.canonical_codes(1))
    small.warp(torch.zeros(1, 4, 3), f)
    assert names == ["head4d.deform.build", "head4d.deform.warp", "head4d.deform.neck", "head4d.deform.parts"]


# ----------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------

def test_bad_constructor_arguments(head):
    with pytest.raises(TypeError, match="head_model"):
        PartwiseDeformation(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="box_side"):
        PartwiseDeformation(head, box_side=-1.0)
    with pytest.raises(ValueError, match="fine_resolution"):
        PartwiseDeformation(head, fine_resolution=1)
    with pytest.raises(TypeError, match="coarse_resolution"):
        PartwiseDeformation(head, coarse_resolution=8.0)
    with pytest.raises(ValueError, match="blend_threshold"):
        PartwiseDeformation(head, blend_threshold=float("nan"))
    with pytest.raises(TypeError, match="mouth"):
        PartwiseDeformation(head, mouth=1)
    with pytest.raises(ValueError, match="eye_box_centre"):
        PartwiseDeformation(head, eye_box_centre="median")
    no_lips = ProceduralHead()
    no_lips._has_lips = False
    with pytest.raises(ValueError, match="lips"):
        PartwiseDeformation(no_lips)
    d = PartwiseDeformation(no_lips, mouth=False, fine_resolution=3, coarse_resolution=2)
    out = d(torch.zeros(1, 3, 3), **no_lips.canonical_codes(1))
    assert out.mouth is None
    with pytest.raises(ValueError, match="mouth"):
        out.part_points(torch.ones(1, 3))


def test_bad_build_inputs(deformation, head):
    c = head.canonical_codes(1)
    with pytest.raises(ValueError, match="expression"):
        deformation.build(**dict(c, expression=torch.zeros(1, 50)))
    with pytest.raises(ValueError, match="eye_pose"):
        deformation.build(**dict(c, eye_pose=torch.zeros(2, 6)))
    with pytest.raises(TypeError, match="neck_pose"):
        deformation.build(**dict(c, neck_pose=torch.zeros(1, 3, dtype=torch.int64)))


def test_bad_warp_inputs(deformation, fields):
    x = torch.zeros(4, 5, 3)
    with pytest.raises(TypeError, match="fields"):
        deformation.warp(x, {"fine": fields.fine})
    with pytest.raises(TypeError, match="points"):
        deformation.warp(x.long(), fields)
    with pytest.raises(TypeError, match="points"):
        deformation.warp(x.numpy(), fields)
    with pytest.raises(ValueError, match="points"):
        deformation.warp(x[0], fields)
    with pytest.raises(ValueError, match="points"):
        deformation.warp(x[..., :2], fields)
    with pytest.raises(ValueError, match="batch size"):
        deformation.warp(x[:2], fields)
    with pytest.raises(ValueError, match="batch size"):
        deformation.warp_neck(x[:1], fields)
    other = DeformationFields(**dict(fields.__dict__, verts_target=fields.verts_target[:, :100]))
    with pytest.raises(ValueError, match="vertices"):
        deformation.warp(x, other)
    out = deformation.warp(x, fields)
    with pytest.raises(ValueError, match="mouth_mask"):
        out.part_points(torch.ones(4, 4))
    with pytest.raises(ValueError, match="mouth_mask"):
        out.part_points(torch.ones(4, 5, 1))
    with pytest.raises(TypeError, match="mouth_mask"):
        out.part_points([[1.0] * 5] * 4)
    # other floating dtypes are converted to the head model's
    assert deformation.warp(x.double(), fields).head.dtype == torch.float32
