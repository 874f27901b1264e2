"""Renderer ops (generate_rays, ray_box_limits, auto_plane_limits, stratified_depths,
composite_rays, sample_importance, merge_samples), the decoder and the unfused
renderer, against independent restatements of EG3D's / Portrait4D's code written
here: hand-computed values, per-ray loops, and the whole pipeline in plain PyTorch (the
final composite's depths and weights of ``return_samples=True`` too)."""
import bisect
import math

import pytest
import torch
import torch.nn.functional as F

import head4d
from head4d.ops import (auto_plane_limits, composite_rays, generate_rays, merge_samples, ray_box_limits,
                        sample_importance, stratified_depths)
from head4d.render import TriplaneDecoder, TriplaneRenderer, map_upstream_decoder_state_dict

F64 = torch.float64


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def intrinsics(n, focal=4.2647, dtype=F64, skew=0.0):
    k = torch.tensor([[focal, skew, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]], dtype=dtype)
    return k.expand(n, 3, 3).clone()


def rotation(yaw: float, pitch: float, dtype=F64) -> torch.Tensor:
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=dtype)
    rx = torch.tensor([[1, 0, 0], [0, cp, -sp], [0, sp, cp]], dtype=dtype)
    return ry @ rx


def orbit_cameras(angles, distance, convention, dtype=F64) -> torch.Tensor:
    """cam2world for cameras on a sphere around the origin, looking at it."""
    mats = []
    for yaw, pitch in angles:
        rot = rotation(yaw, pitch, dtype)
        if convention == "opencv":  # looks along its +z, y down
            rot = rot @ torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=dtype))
            pos = -distance * rot[:, 2]
        else:  # OpenGL: looks along its -z
            pos = distance * rot[:, 2]
        m = torch.eye(4, dtype=dtype)
        m[:3, :3] = rot
        m[:3, 3] = pos
        mats.append(m)
    return torch.stack(mats)


# ----------------------------------------------------------------------------------
# composite_rays
# ----------------------------------------------------------------------------------

def test_composite_two_and_three_samples_by_hand():
    c = [[0.2, 0.5, 0.9], [0.6, 0.1, 0.3], [0.0, 1.0, 0.5]]
    s = [0.7, 2.3, -0.4]
    t = [2.0, 2.4, 2.5]
    colors = torch.tensor(c, dtype=F64).reshape(1, 1, 3, 3)
    dens = torch.tensor(s, dtype=F64).reshape(1, 1, 3, 1)
    depths = torch.tensor(t, dtype=F64).reshape(1, 1, 3, 1)

    # two samples: one interval
    sig0 = softplus((s[0] + s[1]) / 2 - 1)
    a0 = -math.expm1(-sig0 * (t[1] - t[0]))
    cm0 = [(x + y) / 2 for x, y in zip(c[0], c[1])]
    rgb, depth, w = composite_rays(colors[:, :, :2], dens[:, :, :2], depths[:, :, :2])
    assert w.shape == (1, 1, 1, 1) and rgb.shape == (1, 1, 3) and depth.shape == (1, 1, 1)
    assert w.item() == pytest.approx(a0, rel=1e-12)
    assert rgb[0, 0].tolist() == pytest.approx([(a0 * x) * 2 - 1 for x in cm0], rel=1e-12)
    assert depth.item() == pytest.approx((t[0] + t[1]) / 2, rel=1e-12)

    # three samples: the second weight carries (1 - a0 + 1e-10)
    sig1 = softplus((s[1] + s[2]) / 2 - 1)
    a1 = -math.expm1(-sig1 * (t[2] - t[1]))
    w1 = a1 * (1 - a0 + 1e-10)
    cm1 = [(x + y) / 2 for x, y in zip(c[1], c[2])]
    rgb, depth, w = composite_rays(colors, dens, depths)
    assert w[0, 0, :, 0].tolist() == pytest.approx([a0, w1], rel=1e-12)
    expected_depth = (a0 * (t[0] + t[1]) / 2 + w1 * (t[1] + t[2]) / 2) / (a0 + w1)
    assert depth.item() == pytest.approx(expected_depth, rel=1e-12)
    plain = [a0 * x + w1 * y for x, y in zip(cm0, cm1)]
    assert rgb[0, 0].tolist() == pytest.approx([v * 2 - 1 for v in plain], rel=1e-12)
    # white background and an explicit background: + (1 - sum w) * bg before * 2 - 1
    t_bg = 1 - a0 - w1
    rgb_w, _, _ = composite_rays(colors, dens, depths, white_back=True)
    assert rgb_w[0, 0].tolist() == pytest.approx([(v + t_bg) * 2 - 1 for v in plain], rel=1e-12)
    bg = torch.tensor([[[0.25, -1.0, 3.0]]], dtype=F64)
    rgb_b, _, _ = composite_rays(colors, dens, depths, background=bg)
    assert rgb_b[0, 0].tolist() == pytest.approx([(v + t_bg * b) * 2 - 1 for v, b in zip(plain, [0.25, -1.0, 3.0])],
                                                 rel=1e-12)
    assert torch.allclose(composite_rays(colors, dens, depths, background=torch.ones_like(bg))[0], rgb_w)


def test_composite_zero_and_empty_densities():
    s, n_rays = 6, 3
    depths = torch.linspace(2.0, 3.0, s, dtype=F64).reshape(1, 1, s, 1).repeat(1, n_rays, 1, 1)
    colors = torch.rand(1, n_rays, s, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    # raw density 0 is sigma = softplus(-1), not zero
    _, depth, w = composite_rays(colors, torch.zeros(1, n_rays, s, 1, dtype=F64), depths)
    a = -math.expm1(-softplus(-1.0) * 0.2)
    expected = torch.tensor([a * (1 - a + 1e-10) ** k for k in range(s - 1)], dtype=F64)
    assert torch.allclose(w[0, :, :, 0], expected.expand(n_rays, -1), rtol=1e-12, atol=0)
    # empty space: weights 0, depth NaN -> inf -> clamped to the largest depth, rgb -1 (or +1 on white)
    empty = torch.full((1, n_rays, s, 1), -1e4, dtype=F64)
    rgb, depth, w = composite_rays(colors, empty, depths)
    assert torch.all(w == 0) and torch.all(rgb == -1) and torch.all(depth == 3.0)
    rgb, _, _ = composite_rays(colors, empty, depths, white_back=True)
    assert torch.all(rgb == 1)


def test_composite_depth_clamp_uses_the_whole_batch():
    """N > 1: an empty ray's depth is clamped to the max over ALL images' depths (EG3D)."""
    g = torch.Generator().manual_seed(1)
    depths = torch.stack([torch.linspace(1.0, 2.0, 5, dtype=F64), torch.linspace(3.0, 4.5, 5, dtype=F64)])
    depths = depths.reshape(2, 1, 5, 1)
    colors = torch.rand(2, 1, 5, 3, dtype=F64, generator=g)
    dens = torch.randn(2, 1, 5, 1, dtype=F64, generator=g)
    dens[0] = -1e4
    rgb, depth, w = composite_rays(colors, dens, depths)
    assert depth[0].item() == 4.5  # from image 1's range, outside image 0's own
    single = composite_rays(colors[1:], dens[1:], depths[1:])
    assert torch.allclose(rgb[1:], single[0]) and torch.allclose(w[1:], single[2])
    # single ray
    rgb1, depth1, w1 = composite_rays(colors[1:, :, :2], dens[1:, :, :2], depths[1:, :, :2])
    assert rgb1.shape == (1, 1, 3) and w1.shape == (1, 1, 1, 1)


def test_composite_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    colors = torch.rand(2, 2, 4, 3, dtype=F64, generator=g).requires_grad_(True)
    dens = torch.randn(2, 2, 4, 1, dtype=F64, generator=g).requires_grad_(True)
    depths = (2.0 + torch.sort(torch.rand(2, 2, 4, 1, dtype=F64, generator=g), dim=2).values)
    depths = depths.requires_grad_(True)
    bg = torch.rand(2, 2, 3, dtype=F64, generator=g).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c, s, t: composite_rays(c, s, t), (colors, dens, depths))
    assert torch.autograd.gradcheck(lambda c, s, t, b: composite_rays(c, s, t, background=b),
                                    (colors, dens, depths, bg))
    assert torch.autograd.gradcheck(lambda c, s, t: composite_rays(c, s, t, white_back=True)[:2],
                                    (colors, dens, depths))


def within_arithmetic(got, truth, same_arithmetic, dtype):
    """Frobenius norms: ``got`` (in ``dtype``) against ``truth`` (float64, same input values)
    errs by at most its final rounding to ``dtype`` plus SAFETY times what the same
    computation in float32 by the reference (``same_arithmetic``) errs: the error of the
    arithmetic on these very inputs, conditioning included."""
    got, truth, same = (t.detach().double() for t in (got, truth, same_arithmetic))
    err = (got - truth).norm().item()
    bound = torch.finfo(dtype).eps / 2 * truth.norm().item() + 4.0 * (same - truth).norm().item()
    assert err <= bound, (err, bound)


def test_composite_half_precision_and_dtypes(monkeypatch):
    """The default backend in float32 and in bfloat16, each against the reference in
    float64 on the same (rounded) values."""
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_COMPOSITE_RAYS", raising=False)
    g = torch.Generator().manual_seed(3)
    colors = torch.rand(1, 4, 6, 3, generator=g)
    dens = torch.randn(1, 4, 6, 1, generator=g)
    depths = torch.linspace(2, 3, 6).reshape(1, 1, 6, 1).repeat(1, 4, 1, 1)
    for dtype in (torch.float32, torch.bfloat16):
        inputs = [t.to(dtype) for t in (colors, dens, depths)]
        out = composite_rays(*inputs)
        assert all(o.dtype == dtype for o in out)
        truth = composite_rays(*[t.double() for t in inputs], backend="torch")
        in_float32 = composite_rays(*[t.float() for t in inputs], backend="torch")
        for a, b, c in zip(out, truth, in_float32):
            within_arithmetic(a, b, c, dtype)


def test_composite_errors():
    c, s, t = torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4, 1), torch.zeros(1, 2, 4, 1)
    with pytest.raises(ValueError, match="S >= 2"):
        composite_rays(c[:, :, :1], s[:, :, :1], t[:, :, :1])
    with pytest.raises(ValueError, match="densities has shape \\[1, 2, 3, 1\\].*N, R and S must match"):
        composite_rays(c, s[:, :, :3], t)
    with pytest.raises(ValueError, match="depths has shape \\[2, 2, 4, 1\\]"):
        composite_rays(c, s, torch.zeros(2, 2, 4, 1))
    with pytest.raises(ValueError, match="depths must have shape \\[N, R, S, 1\\]"):
        composite_rays(c, s, torch.zeros(1, 2, 4, 2))
    with pytest.raises(ValueError, match="colors must have shape \\[N, R, S, C\\]"):
        composite_rays(c[0], s, t)
    with pytest.raises(TypeError, match="densities has dtype float64 but colors has float32"):
        composite_rays(c, s.double(), t)
    with pytest.raises(TypeError, match="depths must have a dtype in"):
        composite_rays(c, s, t.long())
    with pytest.raises(TypeError, match="colors must be a torch.Tensor"):
        composite_rays(c.numpy(), s, t)
    with pytest.raises(ValueError, match="depths is on meta but colors is on cpu"):
        composite_rays(c, s, t.to("meta"))
    with pytest.raises(ValueError, match="not both"):
        composite_rays(c, s, t, white_back=True, background=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="background must have shape \\[N, R, C\\] = \\[1, 2, 3\\]"):
        composite_rays(c, s, t, background=torch.zeros(1, 2, 4))
    with pytest.raises(RuntimeError, match="not implemented for this op"):
        composite_rays(c, s, t, backend="triton")  # it has cpu, cuda and torch


def test_reference_only_backend_selection(monkeypatch):
    c, s = torch.rand(1, 2, 4, 3), torch.zeros(1, 2, 4, 1)
    t = torch.linspace(1, 2, 4).reshape(1, 1, 4, 1).repeat(1, 2, 1, 1)
    ref = composite_rays(c, s, t, backend="torch")
    # composite_rays has cpu / cuda / torch but no triton backend
    monkeypatch.setenv("HEAD4D_BACKEND", "triton")  # a process-wide choice: ops without it run the reference
    assert torch.equal(composite_rays(c, s, t)[0], ref[0])
    monkeypatch.setenv("HEAD4D_BACKEND_COMPOSITE_RAYS", "triton")  # asked for this op by name: an error
    with pytest.raises(RuntimeError, match="HEAD4D_BACKEND_COMPOSITE_RAYS"):
        composite_rays(c, s, t)


# ----------------------------------------------------------------------------------
# generate_rays
# ----------------------------------------------------------------------------------

def eg3d_rays(cam2world, k, res, opengl=False):
    """EG3D's (OpenCV) / Portrait4D's (OpenGL) RaySampler restated: homogeneous camera
    points through the full 4x4 matrix, minus the camera position."""
    n = cam2world.shape[0]
    idx = torch.arange(res, dtype=cam2world.dtype)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")
    u = (cols.reshape(-1) * (1.0 / res) + 0.5 / res)[None]
    v = (rows.reshape(-1) * (1.0 / res) + 0.5 / res)[None]
    fx, fy, cx, cy, sk = (k[:, 0, 0, None], k[:, 1, 1, None], k[:, 0, 2, None], k[:, 1, 2, None], k[:, 0, 1, None])
    z = (-1.0 if opengl else 1.0) * torch.ones(n, res * res, dtype=cam2world.dtype)
    x_lift = (u - cx + cy * sk / fy - sk * v / fy) / fx * z
    if opengl:
        x_lift = -x_lift
    y_lift = (v - cy) / fy * z
    pts = torch.stack([x_lift, y_lift, z, torch.ones_like(z)], dim=-1)
    world = torch.bmm(cam2world, pts.permute(0, 2, 1)).permute(0, 2, 1)[..., :3]
    dirs = F.normalize(world - cam2world[:, None, :3, 3], dim=2)
    return cam2world[:, None, :3, 3].expand_as(dirs), dirs


@pytest.mark.parametrize("convention", ["opencv", "opengl"])
def test_generate_rays_centre_pixel_and_norms(convention):
    c2w = torch.eye(4, dtype=F64)[None]
    origins, dirs = generate_rays(c2w, intrinsics(1), 9, convention=convention)
    assert origins.shape == dirs.shape == (1, 81, 3)
    centre = dirs[0, 4 * 9 + 4]
    expected_z = 1.0 if convention == "opencv" else -1.0
    assert torch.allclose(centre, torch.tensor([0.0, 0.0, expected_z], dtype=F64), atol=1e-12)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(1, 81, dtype=F64), atol=1e-12)
    assert torch.all(origins == 0)
    # pixel (row 0, column 8): to the camera's right and towards the top of the image
    top_right = dirs[0, 8]
    assert top_right[0] > 0
    assert (top_right[1] < 0) if convention == "opencv" else (top_right[1] > 0)  # y down vs y up


@pytest.mark.parametrize("convention", ["opencv", "opengl"])
def test_generate_rays_matches_eg3d_restatement(convention):
    c2w = orbit_cameras([(0.3, -0.2), (-0.5, 0.1)], 2.7, convention)
    k = intrinsics(2, focal=3.1, skew=0.05)
    k[1, 0, 2] = 0.45
    origins, dirs = generate_rays(c2w, k, 7, convention=convention)
    ref_o, ref_d = eg3d_rays(c2w, k, 7, opengl=convention == "opengl")
    assert torch.allclose(origins, ref_o, atol=1e-12) and torch.allclose(dirs, ref_d, atol=1e-12)
    # float32 in, float32 out, within float32 rounding
    o32, d32 = generate_rays(c2w.float(), k.float(), 7, convention=convention)
    assert d32.dtype == torch.float32 and torch.allclose(d32.double(), ref_d, atol=1e-6)
    # the orbit cameras look at the origin: the central rays pass near it
    mid = dirs[:, 3 * 7 + 3]
    closest = origins[:, 0] - (origins[:, 0] * mid).sum(-1, keepdim=True) * mid
    assert closest.norm(dim=-1).max() < 0.05


def test_generate_rays_errors():
    c2w, k = torch.eye(4)[None], intrinsics(1, dtype=torch.float32)
    with pytest.raises(ValueError, match="cam2world must have shape \\[N, 4, 4\\]"):
        generate_rays(c2w[:, :3], k, 4)
    with pytest.raises(ValueError, match="intrinsics has batch size 2 but cam2world has 1"):
        generate_rays(c2w, k.repeat(2, 1, 1), 4)
    with pytest.raises(TypeError, match="intrinsics has dtype float64 but cam2world has float32"):
        generate_rays(c2w, k.double(), 4)
    with pytest.raises(TypeError, match="cam2world must have a dtype in"):
        generate_rays(c2w.int(), k, 4)
    with pytest.raises(ValueError, match="intrinsics is on meta but cam2world is on cpu"):
        generate_rays(c2w, k.to("meta"), 4)
    with pytest.raises(ValueError, match="resolution must be >= 1"):
        generate_rays(c2w, k, 0)
    with pytest.raises(TypeError, match="resolution must be an int"):
        generate_rays(c2w, k, 4.0)
    with pytest.raises(ValueError, match="convention must be one of"):
        generate_rays(c2w, k, 4, convention="blender")


# ----------------------------------------------------------------------------------
# ray_box_limits, auto_plane_limits
# ----------------------------------------------------------------------------------

def test_ray_box_limits_by_hand():
    o = torch.tensor([[[0.0, 0.0, -3.0], [0.2, -0.1, -3.0], [0.0, 0.0, 0.0], [2.0, 0.0, -3.0],
                       [0.0, 0.0, 3.0], [-3.0, -3.0, 0.0]]], dtype=F64)
    d = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0],
                       [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]], dtype=F64)
    d = F.normalize(d, dim=-1)
    start, end = ray_box_limits(o, d, 1.0)
    assert start.shape == end.shape == (1, 6, 1)
    half_diag = math.sqrt(2) * 2.5  # diagonal ray enters at (-0.5, -0.5): distance 2.5 * sqrt 2
    # ray 4 points away from the box: the box is behind it, EG3D keeps it (negative distances)
    expected_start = [2.5, 2.5, -0.5, None, -3.5, half_diag]
    expected_end = [3.5, 3.5, 0.5, None, -2.5, math.sqrt(2) * 3.5]
    for i in (0, 1, 2, 4, 5):
        assert start[0, i, 0].item() == pytest.approx(expected_start[i])
        assert end[0, i, 0].item() == pytest.approx(expected_end[i])
    valid_starts = [expected_start[i] for i in (0, 1, 2, 4, 5)]
    valid_ends = [expected_end[i] for i in (0, 1, 2, 4, 5)]
    # ray 3 misses: min of the valid starts, and EG3D's end = max of the valid STARTS
    assert start[0, 3, 0].item() == pytest.approx(min(valid_starts))
    assert end[0, 3, 0].item() == pytest.approx(max(valid_starts))
    _, end2 = ray_box_limits(o, d, 1.0, invalid_end="max_end")
    assert end2[0, 3, 0].item() == pytest.approx(max(valid_ends))
    # nothing hits: EG3D's markers -1 / -2 stay
    s0, e0 = ray_box_limits(o[:, 3:4], d[:, 3:4], 1.0)
    assert s0.item() == -1 and e0.item() == -2


def test_ray_box_limits_against_textbook_slabs():
    """Random rays (no zero direction components), N > 1, some missing."""
    g = torch.Generator().manual_seed(4)
    o = torch.randn(3, 200, 3, dtype=F64, generator=g) * 2.0
    d = F.normalize(torch.randn(3, 200, 3, dtype=F64, generator=g), dim=-1)
    box = 1.3
    start, end = ray_box_limits(o, d, box, invalid_end="max_end")
    lo, hi = (-box / 2 - o) / d, (box / 2 - o) / d
    t0 = torch.minimum(lo, hi).max(dim=-1).values
    t1 = torch.maximum(lo, hi).min(dim=-1).values
    hit = t1 > t0
    assert 0 < hit.sum() < hit.numel()
    assert torch.allclose(start[..., 0][hit], t0[hit]) and torch.allclose(end[..., 0][hit], t1[hit])
    assert torch.all(start[..., 0][~hit] == t0[hit].min())  # over the whole batch, all images
    assert torch.all(end[..., 0][~hit] == t1[hit].max())


def test_auto_plane_limits():
    c2w = orbit_cameras([(0.4, 0.1), (0.0, 0.0), (-0.3, 0.25)], 4.0, "opengl")
    c2w[:, :3, 3] += torch.tensor([0.01, -0.02, 0.03], dtype=F64)  # a pivot off the origin
    start, end = auto_plane_limits(c2w, 1.3)
    assert start.shape == end.shape == (3, 1, 1)
    cam_z = torch.linalg.inv(c2w)[:, 2, 3]
    assert torch.allclose(start[:, 0, 0], cam_z.abs() - 0.65) and torch.allclose(end[:, 0, 0], cam_z.abs() + 0.65)
    assert torch.allclose(end - start, torch.full_like(start, 1.3))
    with pytest.raises(ValueError, match="box_warp must be finite and positive"):
        auto_plane_limits(c2w, 0.0)
    with pytest.raises(ValueError, match="cam2world must have shape \\[N, 4, 4\\]"):
        auto_plane_limits(c2w[0], 1.0)


def test_ray_box_limits_errors():
    o = torch.zeros(1, 4, 3)
    with pytest.raises(ValueError, match="directions has shape \\[1, 5, 3\\] but origins has \\[1, 4, 3\\]"):
        ray_box_limits(o, torch.ones(1, 5, 3), 1.0)
    with pytest.raises(ValueError, match="origins must have shape \\[N, R, 3\\]"):
        ray_box_limits(torch.zeros(1, 4, 2), torch.ones(1, 4, 2), 1.0)
    with pytest.raises(TypeError, match="directions has dtype float64"):
        ray_box_limits(o, torch.ones(1, 4, 3, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="directions is on meta"):
        ray_box_limits(o, torch.ones(1, 4, 3, device="meta"), 1.0)
    with pytest.raises(ValueError, match="box_side must be finite and positive"):
        ray_box_limits(o, torch.ones(1, 4, 3), -1.0)
    with pytest.raises(ValueError, match="invalid_end must be one of"):
        ray_box_limits(o, torch.ones(1, 4, 3), 1.0, invalid_end="mean")


# ----------------------------------------------------------------------------------
# stratified_depths
# ----------------------------------------------------------------------------------

def test_stratified_deterministic_and_eg3d_jitter():
    s = 12
    det = stratified_depths(2.25, 3.3, s, 5, jitter="none", batch_size=2, dtype=F64)
    assert det.shape == (2, 5, s, 1)
    assert torch.allclose(det[1, 3, :, 0], torch.linspace(2.25, 3.3, s, dtype=F64), atol=1e-14)
    # per-sample jitter: EG3D's linspace + rand_like * delta, numbers in the order of rand([N, R, S, 1])
    out = stratified_depths(2.25, 3.3, s, 5, batch_size=2, dtype=F64, generator=torch.Generator().manual_seed(7))
    u = torch.rand(2, 5, s, 1, dtype=F64, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(out, det + u * (3.3 - 2.25) / (s - 1), atol=1e-14)
    # per-ray tensor limits
    g = torch.Generator().manual_seed(8)
    start = 2.0 + torch.rand(2, 5, 1, dtype=F64, generator=g)
    end = start + 0.5 + torch.rand(2, 5, 1, dtype=F64, generator=g)
    out = stratified_depths(start, end, s, 5, generator=torch.Generator().manual_seed(9))
    u = torch.rand(2, 5, s, 1, dtype=F64, generator=torch.Generator().manual_seed(9))
    k = torch.arange(s, dtype=F64).reshape(1, 1, s, 1) / (s - 1)
    delta = ((end - start) / (s - 1))[..., None]
    assert torch.allclose(out, start[..., None] + k * (end - start)[..., None] + u * delta, atol=1e-14)


@pytest.mark.parametrize("s", [48, 12, 97])
def test_stratified_bitwise_eg3d(s):
    """float32 depths are EG3D's bit for bit given the same random numbers: its
    expressions restated with torch.linspace (number limits) and its tensor linspace
    (per-ray 'auto' limits, per-image 'auto-plane' limits with one draw per image)."""
    n, r = 2, 9
    start, end = 2.25, 3.3
    u = torch.rand(n, r, s, 1, generator=torch.Generator().manual_seed(11))
    eg3d = torch.linspace(start, end, s).reshape(1, 1, s, 1).repeat(n, r, 1, 1)
    eg3d += torch.rand(n, r, s, 1, generator=torch.Generator().manual_seed(11)) * ((end - start) / (s - 1))
    out = stratified_depths(start, end, s, r, batch_size=n, generator=torch.Generator().manual_seed(11))
    assert out.dtype == torch.float32 and torch.equal(out, eg3d)
    if s == 48:  # the test can tell: at FFHQ's setting start + k/(S-1) * (end - start) rounds some differently
        steps = (torch.arange(s, dtype=torch.float32) / (s - 1)).reshape(1, 1, s, 1)
        start32, end32 = torch.tensor(start), torch.tensor(end)
        assert not torch.equal(start32 + steps * (end32 - start32) + u * ((end32 - start32) / (s - 1)), eg3d)

    def eg3d_tensor_linspace(lo, hi):  # [N, R, 1] limits -> [N, R, S, 1]
        k = (torch.arange(s, dtype=torch.float32) / (s - 1)).reshape(s, 1, 1, 1)
        return (lo[None] + k * (hi - lo)[None]).permute(1, 2, 0, 3)

    g = torch.Generator().manual_seed(12)
    lo = 2.0 + torch.rand(n, r, 1, generator=g)
    hi = lo + 0.5 + torch.rand(n, r, 1, generator=g)
    eg3d = eg3d_tensor_linspace(lo, hi)
    eg3d += torch.rand(n, r, s, 1, generator=torch.Generator().manual_seed(13)) * ((hi - lo) / (s - 1))[..., None]
    out = stratified_depths(lo, hi, s, r, generator=torch.Generator().manual_seed(13))
    assert torch.equal(out, eg3d)

    lo, hi = lo[:, :1], hi[:, :1]  # one range per image, one jitter vector per image
    eg3d = eg3d_tensor_linspace(lo, hi).repeat(1, r, 1, 1)
    eg3d += (torch.rand(n, 1, s, 1, generator=torch.Generator().manual_seed(14))
             * ((hi - lo) / (s - 1))[..., None]).repeat(1, r, 1, 1)
    out = stratified_depths(lo, hi, s, r, jitter="per_image", generator=torch.Generator().manual_seed(14))
    assert torch.equal(out, eg3d)

    # disparity space, number limits
    t = torch.linspace(0, 1, s).reshape(1, 1, s, 1).repeat(n, r, 1, 1)
    t += torch.rand(n, r, s, 1, generator=torch.Generator().manual_seed(15)) * (1 / (s - 1))
    eg3d = 1. / (1. / start * (1. - t) + 1. / end * t)
    out = stratified_depths(start, end, s, r, disparity=True, batch_size=n,
                            generator=torch.Generator().manual_seed(15))
    assert torch.equal(out, eg3d)


def test_stratified_per_image_and_disparity():
    s, r = 8, 6
    start, end = torch.tensor([[[3.0]], [[3.5]]], dtype=F64), torch.tensor([[[4.3]], [[4.8]]], dtype=F64)
    out = stratified_depths(start, end, s, r, jitter="per_image", generator=torch.Generator().manual_seed(3))
    assert out.shape == (2, r, s, 1)
    assert torch.equal(out, out[:, :1].expand_as(out))  # every ray of an image shares the depths
    u = torch.rand(2, 1, s, 1, dtype=F64, generator=torch.Generator().manual_seed(3))  # one draw per image
    k = torch.arange(s, dtype=F64).reshape(1, 1, s, 1) / (s - 1)
    assert torch.allclose(out[:, :1], start[..., None] + k * 1.3 + u * 1.3 / (s - 1), atol=1e-14)
    assert not torch.allclose(out[0], out[1] - 0.5)  # images get different jitter
    # disparity: t-space jitter, then inversion
    out = stratified_depths(2.0, 4.0, s, r, disparity=True, dtype=F64, generator=torch.Generator().manual_seed(5))
    u = torch.rand(1, r, s, 1, dtype=F64, generator=torch.Generator().manual_seed(5))
    t = torch.linspace(0, 1, s, dtype=F64).reshape(1, 1, s, 1) + u / (s - 1)
    assert torch.allclose(out, 1 / (1 / 2.0 * (1 - t) + 1 / 4.0 * t), atol=1e-14)
    det = stratified_depths(2.0, 4.0, s, r, disparity=True, jitter="none", dtype=F64)
    assert torch.allclose(1 / det[0, 0, :, 0], torch.linspace(0.5, 0.25, s, dtype=F64), atol=1e-14)


def test_stratified_errors():
    with pytest.raises(ValueError, match="n_samples must be >= 2"):
        stratified_depths(2.0, 3.0, 1, 4)
    with pytest.raises(ValueError, match="ray_start must have shape \\[N, 4, 1\\] or \\[N, 1, 1\\]"):
        stratified_depths(torch.zeros(1, 3, 1), 3.0, 8, 4)
    with pytest.raises(ValueError, match="ray_end has batch size 2 but ray_start has 1"):
        stratified_depths(torch.zeros(1, 4, 1), torch.ones(2, 1, 1), 8, 4)
    with pytest.raises(TypeError, match="ray_end has dtype float64 but ray_start has float32"):
        stratified_depths(torch.zeros(1, 4, 1), torch.ones(1, 1, 1, dtype=F64), 8, 4)
    with pytest.raises(ValueError, match="ray_end is on meta"):
        stratified_depths(torch.zeros(1, 4, 1), torch.ones(1, 1, 1, device="meta"), 8, 4)
    with pytest.raises(TypeError, match="ray_start must have a dtype in"):
        stratified_depths(torch.zeros(1, 4, 1, dtype=torch.long), 3.0, 8, 4)
    with pytest.raises(ValueError, match="jitter must be one of"):
        stratified_depths(2.0, 3.0, 8, 4, jitter="per_ray")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        stratified_depths(2.0, 3.0, 8, 4, generator=0)
    with pytest.raises(ValueError, match="only for number limits"):
        stratified_depths(torch.zeros(1, 4, 1), 3.0, 8, 4, batch_size=1)


# ----------------------------------------------------------------------------------
# sample_importance
# ----------------------------------------------------------------------------------

def importance_loop(depths, weights, u):
    """sample_importance for one ray in plain Python, for the given u values."""
    s = len(depths)
    w = list(weights)
    pooled = [w[0]] + [max(w[k - 1], w[k]) for k in range(1, s - 1)] + [w[-1]]  # max_pool1d(2, 1, pad 1)
    smoothed = [(pooled[k] + pooled[k + 1]) / 2 + 0.01 for k in range(s - 1)]  # avg_pool1d(2, 1) + 0.01
    inner = [x + 1e-5 for x in smoothed[1:-1]]
    total = sum(inner)
    cdf = [0.0]
    for x in inner:
        cdf.append(cdf[-1] + x / total)
    bins = [(depths[k] + depths[k + 1]) / 2 for k in range(s - 1)]
    out = []
    for x in u:
        idx = bisect.bisect_right(cdf, x)
        below, above = max(idx - 1, 0), min(idx, s - 3)
        step = cdf[above] - cdf[below]
        step = 1.0 if step < 1e-5 else step
        out.append(bins[below] + (x - cdf[below]) / step * (bins[above] - bins[below]))
    return out


def make_coarse(n, r, s, seed):
    g = torch.Generator().manual_seed(seed)
    depths = 2.0 + torch.sort(torch.rand(n, r, s, 1, dtype=F64, generator=g), dim=2).values
    weights = torch.rand(n, r, s - 1, 1, dtype=F64, generator=g) ** 4
    weights[0, 0] = 0.0  # an empty ray
    return depths, weights


@pytest.mark.parametrize("n,r,s,n_imp", [(1, 1, 4, 5), (2, 3, 12, 12), (1, 4, 9, 1)])
def test_sample_importance_det_matches_loop(n, r, s, n_imp):
    depths, weights = make_coarse(n, r, s, seed=s)
    out = sample_importance(depths, weights, n_imp, det=True)
    assert out.shape == (n, r, n_imp, 1) and out.dtype == F64
    u = [k / (n_imp - 1) for k in range(n_imp)] if n_imp > 1 else [0.0]
    for b in range(n):
        for i in range(r):
            expected = importance_loop(depths[b, i, :, 0].tolist(), weights[b, i, :, 0].tolist(), u)
            assert out[b, i, :, 0].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_sample_importance_random_matches_loop_and_no_grad():
    depths, weights = make_coarse(2, 3, 10, seed=11)
    depths.requires_grad_(True)
    out = sample_importance(depths, weights, 7, generator=torch.Generator().manual_seed(12))
    assert not out.requires_grad
    u = torch.rand(6, 7, dtype=F64, generator=torch.Generator().manual_seed(12))  # one rand([N*R, n])
    for b in range(2):
        for i in range(3):
            expected = importance_loop(depths[b, i, :, 0].tolist(), weights[b, i, :, 0].tolist(), u[b * 3 + i].tolist())
            assert out[b, i, :, 0].tolist() == pytest.approx(expected, rel=1e-12)
    # samples stay within the reachable bins [mid_0, mid_{S-3}]
    mids = (depths[:, :, 1:] + depths[:, :, :-1]).detach() / 2
    assert torch.all(out >= mids[:, :, :1] - 1e-12) and torch.all(out <= mids[:, :, -2:-1] + 1e-12)


def test_sample_importance_errors():
    d, w = torch.zeros(1, 2, 8, 1), torch.zeros(1, 2, 7, 1)
    with pytest.raises(ValueError, match="S >= 4"):
        sample_importance(d[:, :, :3], w[:, :, :2], 4)
    with pytest.raises(ValueError, match="weights must have shape \\[N, R, S-1, 1\\] = \\[1, 2, 7, 1\\]"):
        sample_importance(d, torch.zeros(1, 2, 8, 1), 4)
    with pytest.raises(ValueError, match="weights must have shape"):
        sample_importance(d, torch.zeros(1, 3, 7, 1), 4)
    with pytest.raises(ValueError, match="n_importance must be >= 1"):
        sample_importance(d, w, 0)
    with pytest.raises(TypeError, match="weights has dtype float64 but depths has float32"):
        sample_importance(d, w.double(), 4)
    with pytest.raises(TypeError, match="depths must have a dtype in"):
        sample_importance(d.int(), w, 4)
    with pytest.raises(ValueError, match="weights is on meta"):
        sample_importance(d, w.to("meta"), 4)
    with pytest.raises(ValueError, match="depths must have shape \\[N, R, S, 1\\]"):
        sample_importance(d[..., 0], w, 4)


# ----------------------------------------------------------------------------------
# merge_samples
# ----------------------------------------------------------------------------------

def test_merge_samples_sorted_and_carried():
    g = torch.Generator().manual_seed(13)
    da = 2 + torch.rand(2, 3, 5, 1, dtype=F64, generator=g)
    db = 2 + torch.rand(2, 3, 4, 1, dtype=F64, generator=g)
    scale = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    depths, colors, dens = merge_samples(da, da * scale, da ** 2, db, db * scale, db ** 2)
    assert depths.shape == (2, 3, 9, 1) and colors.shape == (2, 3, 9, 3) and dens.shape == (2, 3, 9, 1)
    assert torch.all(depths[:, :, 1:] >= depths[:, :, :-1])
    assert torch.equal(torch.sort(torch.cat([da, db], 2), dim=2).values, depths)
    assert torch.equal(colors, depths * scale) and torch.equal(dens, depths ** 2)
    # ties keep a before b (stable)
    t = torch.full((1, 1, 2, 1), 2.5)
    _, c, _ = merge_samples(t, torch.zeros(1, 1, 2, 1), t, t, torch.ones(1, 1, 2, 1), t)
    assert c[0, 0, :, 0].tolist() == [0, 0, 1, 1]
    # gradients flow to every input
    inputs = [x.clone().requires_grad_(True) for x in (da, da * scale, da ** 2, db, db * scale, db ** 2)]
    sum(o.sum() for o in merge_samples(*inputs)).backward()
    assert all(x.grad is not None and torch.all(x.grad == 1) for x in inputs)


def test_merge_samples_errors():
    d, c, s = torch.zeros(1, 2, 4, 1), torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4, 1)
    with pytest.raises(ValueError, match="colors_b has shape \\[1, 2, 5, 3\\] but depths_b has \\[1, 2, 4, 1\\]"):
        merge_samples(d, c, s, d, torch.zeros(1, 2, 5, 3), s)
    with pytest.raises(ValueError, match="densities_a has shape"):
        merge_samples(d, c, torch.zeros(1, 2, 3, 1), d, c, s)
    with pytest.raises(ValueError, match="depths_b has shape \\[1, 3, 4, 1\\]"):
        merge_samples(d, c, s, torch.zeros(1, 3, 4, 1), torch.zeros(1, 3, 4, 3), torch.zeros(1, 3, 4, 1))
    with pytest.raises(ValueError, match="colors_b has 2 channels but colors_a has 3"):
        merge_samples(d, c, s, d, torch.zeros(1, 2, 4, 2), s)
    with pytest.raises(TypeError, match="densities_b has dtype float64"):
        merge_samples(d, c, s, d, c, s.double())
    with pytest.raises(ValueError, match="colors_b is on meta"):
        merge_samples(d, c, s, d, c.to("meta"), s)


# ----------------------------------------------------------------------------------
# TriplaneDecoder
# ----------------------------------------------------------------------------------

def fc(layer, x, lr_mul):
    return x @ (layer.weight * (lr_mul / math.sqrt(layer.weight.shape[1]))).t() + layer.bias * lr_mul


def osg_decode(decoder, per_plane_features, lr_mul=1.0):
    """Upstream OSGDecoder restated: mean over planes, FC, softplus, FC, sigmoid clamp."""
    x = per_plane_features.mean(1)
    h = F.softplus(fc(decoder.net[0], x, lr_mul))
    if decoder.variant == "eg3d":
        y = fc(decoder.net[2], h, lr_mul)
        sigma, raw = y[..., :1], y[..., 1:]
    else:
        sigma, raw = fc(decoder.out_sigma, h, lr_mul), fc(decoder.out_rgb, h, lr_mul)
    return torch.sigmoid(raw) * 1.002 - 0.001, sigma


@pytest.mark.parametrize("variant", ["eg3d", "portrait4d"])
def test_decoder_matches_osg_decoder(variant):
    torch.manual_seed(0)
    dec = TriplaneDecoder(n_features=8, hidden=16, out_features=5, variant=variant, lr_multiplier=0.5).double()
    if variant == "portrait4d":
        assert torch.all(dec.out_sigma.weight == 0) and torch.all(dec.out_sigma.bias == 0)
        assert sorted(dec.state_dict()) == sorted(["net.0.weight", "net.0.bias", "out_sigma.weight",
                                                   "out_sigma.bias", "out_rgb.weight", "out_rgb.bias"])
        with torch.no_grad():
            dec.out_sigma.weight.normal_()
            dec.out_sigma.bias.fill_(0.3)
    else:
        assert sorted(dec.state_dict()) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    assert torch.all(dec.net[0].bias == 0)
    per_plane = torch.randn(2, 3, 10, 8, dtype=F64)
    out = dec(per_plane.mean(1))
    rgb, sigma = osg_decode(dec, per_plane, lr_mul=0.5)
    assert out["rgb"].shape == (2, 10, 5) and out["sigma"].shape == (2, 10, 1)
    assert torch.allclose(out["rgb"], rgb, atol=1e-12) and torch.allclose(out["sigma"], sigma, atol=1e-12)

    # upstream state dicts (a generator's, with the decoder. prefix) load into a fresh decoder
    upstream = {"decoder." + k: v.clone() for k, v in dec.state_dict().items()}
    upstream["backbone.something"] = torch.zeros(3)
    fresh = TriplaneDecoder(8, 16, 5, variant=variant, lr_multiplier=0.5).double()
    fresh.load_eg3d_state_dict(upstream)
    assert torch.equal(fresh(per_plane.mean(1))["rgb"], out["rgb"])
    built = TriplaneDecoder.from_eg3d_state_dict(upstream, lr_multiplier=0.5).double()
    assert built.variant == variant and (built.n_features, built.hidden, built.out_features) == (8, 16, 5)
    # (built with float32 parameters: the float64 values are rounded on loading)
    assert torch.allclose(built(per_plane.mean(1))["sigma"], out["sigma"], atol=1e-5)
    assert sorted(map_upstream_decoder_state_dict(upstream)) == sorted(dec.state_dict())


def test_decoder_errors():
    dec = TriplaneDecoder()
    with pytest.raises(ValueError, match="take .mean\\(1\\) first"):
        dec(torch.zeros(1, 3, 4, 32))
    with pytest.raises(ValueError, match="features must have 32 channels"):
        dec(torch.zeros(1, 4, 16))
    with pytest.raises(ValueError, match="variant must be one of"):
        TriplaneDecoder(variant="next3d")
    with pytest.raises(KeyError, match="lacks"):
        TriplaneDecoder(variant="portrait4d").load_eg3d_state_dict(dec.state_dict())


# ----------------------------------------------------------------------------------
# TriplaneRenderer against the EG3D / Portrait4D pipeline restated in plain PyTorch
# ----------------------------------------------------------------------------------

PLANE_MATRICES = {
    "eg3d": torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                          [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
                          [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], dtype=F64),
    "portrait4d": torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                                [[0, 1, 0], [0, 0, 1], [1, 0, 0]],
                                [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], dtype=F64),
}


def upstream_run_model(planes, decoder, points, box_warp, layout, noise_std, rng):
    n, _, c, h, w = planes.shape
    m = points.shape[1]
    inv = torch.linalg.inv(PLANE_MATRICES[layout])
    coords = (2 / box_warp) * points
    proj = torch.stack([(coords @ inv[k])[..., :2] for k in range(3)], dim=1).reshape(n * 3, 1, m, 2)
    feats = F.grid_sample(planes.reshape(n * 3, c, h, w), proj, mode="bilinear", padding_mode="zeros",
                          align_corners=False).permute(0, 3, 2, 1).reshape(n, 3, m, c)
    rgb, sigma = osg_decode(decoder, feats)
    if noise_std > 0:
        sigma = sigma + torch.randn(sigma.shape, dtype=sigma.dtype, generator=rng) * noise_std
    return rgb, sigma


def upstream_march(colors, densities, depths, white_back=False, background=None):
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    cm = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    sm = F.softplus((densities[:, :, :-1] + densities[:, :, 1:]) / 2 - 1)
    tm = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    alpha = 1 - torch.exp(-sm * deltas)
    shifted = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
    weights = alpha * torch.cumprod(shifted, -2)[:, :, :-1]
    rgb = torch.sum(weights * cm, -2)
    total = weights.sum(2)
    depth = torch.clamp(torch.nan_to_num(torch.sum(weights * tm, -2) / total, float("inf")),
                        torch.min(depths), torch.max(depths))
    if white_back:
        rgb = rgb + 1 - total
    if background is not None:
        rgb = rgb + (1 - total) * background
    return rgb * 2 - 1, depth, weights


def upstream_importance(z_vals, weights, n_imp, det, rng):
    n, r, s, _ = z_vals.shape
    z = z_vals.reshape(n * r, s)
    w = F.max_pool1d(weights.reshape(n * r, 1, -1), 2, 1, padding=1)
    w = F.avg_pool1d(w, 2, 1).reshape(n * r, -1) + 0.01
    bins = 0.5 * (z[:, :-1] + z[:, 1:])
    pw = w[:, 1:-1] + 1e-5
    pdf = pw / pw.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)
    if det:
        u = torch.linspace(0, 1, n_imp, dtype=z.dtype).expand(n * r, n_imp).contiguous()
    else:
        u = torch.rand(n * r, n_imp, dtype=z.dtype, generator=rng)
    inds = torch.searchsorted(cdf, u, right=True)
    below, above = torch.clamp_min(inds - 1, 0), torch.clamp_max(inds, pw.shape[1])
    sampled = torch.stack([below, above], -1).view(n * r, 2 * n_imp)
    cdf_g = torch.gather(cdf, 1, sampled).view(n * r, n_imp, 2)
    bins_g = torch.gather(bins, 1, sampled).view(n * r, n_imp, 2)
    denom = cdf_g[..., 1] - cdf_g[..., 0]
    denom[denom < 1e-5] = 1
    samples = bins_g[..., 0] + (u - cdf_g[..., 0]) / denom * (bins_g[..., 1] - bins_g[..., 0])
    return samples.reshape(n, r, n_imp, 1)


def upstream_render(planes, decoder, o, d, opts, rng, cam2world=None, background=None, samples=None):
    """EG3D's ImportanceRenderer (and Portrait4D's 'auto-plane' / background), restated;
    ``samples``, a dict, receives the final composite's depths and weights."""
    n, r, _ = o.shape
    s, n_imp = opts["depth_resolution"], opts["depth_resolution_importance"]
    jitter = opts.get("jitter", "per_sample")
    if opts["ray_start"] == "auto":
        inv = 1 / d
        sign = (inv < 0).long()
        bounds = torch.tensor([[-opts["box_warp"] / 2] * 3, [opts["box_warp"] / 2] * 3], dtype=o.dtype)
        tmin = tmax = None
        valid = torch.ones(n, r, dtype=torch.bool)
        for a in range(3):
            lo = (bounds[sign[..., a], a] - o[..., a]) * inv[..., a]
            hi = (bounds[1 - sign[..., a], a] - o[..., a]) * inv[..., a]
            if tmin is None:
                tmin, tmax = lo, hi
                continue
            valid &= ~((tmin > hi) | (lo > tmax))
            tmin, tmax = torch.max(tmin, lo), torch.min(tmax, hi)
        tmin[~valid], tmax[~valid] = -1, -2
        start, end = tmin[..., None], tmax[..., None]
        ok = end > start
        start[~ok] = start[ok].min()
        end[~ok] = start[ok].max()  # EG3D fills ray_end from ray_start
        start, end = start[..., None], end[..., None]  # [N, R, 1, 1]
    elif opts["ray_start"] == "auto-plane":
        cam_z = torch.linalg.inv(cam2world)[:, 2, 3]
        start = (cam_z.abs() - opts["box_warp"] / 2).reshape(n, 1, 1, 1)
        end = (cam_z.abs() + opts["box_warp"] / 2).reshape(n, 1, 1, 1)
    else:
        start, end = opts["ray_start"], opts["ray_end"]
    steps = (torch.arange(s, dtype=o.dtype) / (s - 1)).reshape(1, 1, s, 1)
    depths = start + steps * (end - start) + torch.zeros(n, r, s, 1, dtype=o.dtype)
    if jitter != "none":
        shape = (n, r, s, 1) if jitter == "per_sample" else (n, 1, s, 1)
        depths = depths + torch.rand(shape, dtype=o.dtype, generator=rng) * (end - start) / (s - 1)

    def run(z):
        k = z.shape[2]
        pts = (o.unsqueeze(-2) + z * d.unsqueeze(-2)).reshape(n, -1, 3)
        rgb, sigma = upstream_run_model(planes, decoder, pts, opts["box_warp"], opts["plane_layout"],
                                        opts.get("density_noise", 0), rng)
        return rgb.reshape(n, r, k, -1), sigma.reshape(n, r, k, 1)

    colors, dens = run(depths)
    _, _, weights = upstream_march(colors, dens, depths)
    fine = upstream_importance(depths, weights, n_imp, opts.get("det_importance", False), rng)
    colors_f, dens_f = run(fine)
    all_d = torch.cat([depths, fine], -2)
    order = torch.sort(all_d, dim=-2).indices
    all_d = torch.gather(all_d, -2, order)
    all_c = torch.gather(torch.cat([colors, colors_f], -2), -2, order.expand(-1, -1, -1, colors.shape[-1]))
    all_s = torch.gather(torch.cat([dens, dens_f], -2), -2, order)
    rgb, depth, w = upstream_march(all_c, all_s, all_d, opts.get("white_back", False), background)
    if samples is not None:
        samples.update(depths=all_d, weights=w)
    return rgb, depth, w.sum(2)


CASES = {
    # EG3D FFHQ-like, deterministic
    "eg3d_det": dict(convention="opencv", focal=4.2647, variant="eg3d",
                     opts=dict(ray_start=2.25, ray_end=3.3, jitter="none", det_importance=True, white_back=False)),
    # EG3D 'auto' with a wide field of view (rays miss the box), random with seeds, density noise, white back
    "eg3d_auto_random": dict(convention="opencv", focal=1.1, variant="eg3d",
                             opts=dict(ray_start="auto", ray_end="auto", density_noise=0.5, white_back=True)),
    # Portrait4D: OpenGL cameras, 'auto-plane', per-image jitter, its plane layout, background compositing
    "portrait4d": dict(convention="opengl", focal=4.757, variant="portrait4d",
                       opts=dict(ray_start="auto-plane", ray_end="auto-plane", jitter="per_image")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_renderer_matches_upstream_pipeline(case):
    spec = CASES[case]
    torch.manual_seed(21)
    layout = "portrait4d" if spec["variant"] == "portrait4d" else "eg3d"
    planes = torch.randn(1, 3, 8, 16, 16, dtype=F64) * 5
    decoder = TriplaneDecoder(n_features=8, hidden=16, out_features=4, variant=spec["variant"]).double()
    with torch.no_grad():  # a strong, varied density field: some rays nearly opaque, some nearly empty
        if spec["variant"] == "portrait4d":
            sigma_weight, sigma_bias = decoder.out_sigma.weight, decoder.out_sigma.bias
        else:
            sigma_weight, sigma_bias = decoder.net[2].weight[:1], decoder.net[2].bias[:1]
        sigma_weight.normal_().mul_(4.0)
        sigma_bias.fill_(5.0)
    distance = 4.2 if spec["convention"] == "opengl" else 2.7
    c2w = orbit_cameras([(0.2, -0.1)], distance, spec["convention"])
    o, d = generate_rays(c2w, intrinsics(1, focal=spec["focal"]), 8, convention=spec["convention"])
    box_warp = 1.3 if spec["variant"] == "portrait4d" else 1.0
    opts = dict(box_warp=box_warp, depth_resolution=12, depth_resolution_importance=12,
                disparity_space_sampling=False, clamp_mode="softplus", plane_layout=layout,
                superresolution_module="ignored", **spec["opts"])
    background = torch.rand(1, 64, 4, dtype=F64) if spec["variant"] == "portrait4d" else None

    renderer = TriplaneRenderer(plane_layout="eg3d")
    out = renderer(planes, decoder, o, d, opts, background=background, cam2world=c2w,
                   generator=torch.Generator().manual_seed(5))
    ref_samples = {}
    ref = upstream_render(planes, decoder, o, d, opts, torch.Generator().manual_seed(5), cam2world=c2w,
                          background=background, samples=ref_samples)
    assert [x.shape for x in out] == [(1, 64, 4), (1, 64, 1), (1, 64, 1)]
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)
    # return_samples: the same render plus the final composite's depths and weights
    *same, samples = renderer(planes, decoder, o, d, opts, background=background, cam2world=c2w,
                              generator=torch.Generator().manual_seed(5), return_samples=True)
    assert all(torch.equal(a, b) for a, b in zip(same, out))
    assert samples["depths"].shape == (1, 64, 24, 1) and samples["weights"].shape == (1, 64, 23, 1)
    for key in ("depths", "weights"):
        assert torch.allclose(samples[key], ref_samples[key], rtol=1e-9, atol=1e-10), key
    opacity = out[2]
    assert opacity.min() < 0.3 and opacity.max() > 0.6  # a non-trivial picture
    if case == "portrait4d":  # the camera may also come in the options
        again = renderer(planes, decoder, o, d, dict(opts, cam2world=c2w), background=background,
                         generator=torch.Generator().manual_seed(5))
        assert all(torch.equal(a, b) for a, b in zip(again, out))
    if case == "eg3d_auto_random":
        again = renderer(planes, decoder, o, d, opts, generator=torch.Generator().manual_seed(6))
        assert not torch.allclose(again[0], out[0])  # the seed matters


def test_renderer_float32_gradients_and_coarse_only(monkeypatch):
    """The default path in float32, outputs and gradients (planes and every decoder
    parameter), against the same render in float64 by the references."""
    import copy

    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    torch.manual_seed(3)
    planes = torch.randn(2, 3, 32, 16, 16, requires_grad=True)
    decoder = TriplaneDecoder()
    c2w = orbit_cameras([(0.1, 0.0), (-0.2, 0.1)], 2.7, "opencv", dtype=torch.float32)
    o, d = generate_rays(c2w, intrinsics(2, dtype=torch.float32), 6)
    opts = dict(ray_start=2.25, ray_end=3.3, box_warp=1.0, depth_resolution=8, depth_resolution_importance=8,
                jitter="none", det_importance=True)

    def render(planes, decoder, o, d):
        planes = planes.detach().requires_grad_(True)
        decoder.zero_grad(set_to_none=True)
        rgb, depth, opacity = TriplaneRenderer()(planes, decoder, o, d, opts)
        (rgb.sum() + depth.sum()).backward()
        grads = [planes.grad] + [p.grad for p in decoder.parameters()]
        assert all(gr is not None for gr in grads)
        return [rgb, depth, opacity] + grads

    got = render(planes, decoder, o, d)
    assert got[0].dtype == torch.float32 and got[0].shape == (2, 36, 32)
    monkeypatch.setenv("HEAD4D_BACKEND", "torch")
    in_float32 = render(planes, decoder, o, d)
    truth = render(planes.double(), copy.deepcopy(decoder).double(), o.double(), d.double())
    monkeypatch.delenv("HEAD4D_BACKEND")
    for a, b, c in zip(got, truth, in_float32):
        within_arithmetic(a, b, c, torch.float32)
    # coarse only: one composite of the stratified samples
    opts0 = dict(opts, depth_resolution_importance=0, jitter="none")
    rgb0, _, _ = TriplaneRenderer()(planes, decoder, o, d, opts0)
    depths = stratified_depths(2.25, 3.3, 8, 36, jitter="none", batch_size=2)
    pts = (o.unsqueeze(-2) + depths * d.unsqueeze(-2)).reshape(2, -1, 3)
    dec = decoder(head4d.sample_triplanes(planes, pts, plane_layout="eg3d"))
    expected = composite_rays(dec["rgb"].reshape(2, 36, 8, 32), dec["sigma"].reshape(2, 36, 8, 1), depths)[0]
    assert torch.allclose(rgb0, expected, atol=1e-6)


def test_renderer_errors():
    planes = torch.zeros(1, 3, 8, 4, 4)
    decoder = TriplaneDecoder(n_features=8, out_features=3)
    o, d = torch.zeros(1, 4, 3), torch.ones(1, 4, 3)
    base = dict(ray_start=2.0, ray_end=3.0, box_warp=1.0, depth_resolution=6, depth_resolution_importance=6)
    r = TriplaneRenderer()
    with pytest.raises(ValueError, match="options\\['box_warp'\\] is required"):
        r(planes, decoder, o, d, {k: v for k, v in base.items() if k != "box_warp"})
    with pytest.raises(ValueError, match="clamp_mode"):
        r(planes, decoder, o, d, dict(base, clamp_mode="relu"))
    with pytest.raises(TypeError, match="return_samples must be a bool"):
        r(planes, decoder, o, d, base, return_samples="yes")
    with pytest.raises(ValueError, match="both 'auto' or both 'auto-plane'"):
        r(planes, decoder, o, d, dict(base, ray_start="auto"))
    with pytest.raises(ValueError, match="needs the camera"):
        r(planes, decoder, o, d, dict(base, ray_start="auto-plane", ray_end="auto-plane"))
    with pytest.raises(ValueError, match="plane_layout"):
        r(planes, decoder, o, d, dict(base, plane_layout="xy"))
    with pytest.raises(ValueError, match="plane_layout must be one of"):
        TriplaneRenderer("xy")
    with pytest.raises(ValueError, match="S >= 4"):
        r(planes, decoder, o, d, dict(base, depth_resolution=3))
    with pytest.raises(ValueError, match="ray_origins and ray_directions must both have shape"):
        r(planes, decoder, o, d[:, :3], base)
    with pytest.raises(TypeError, match="must return a dict"):
        r(planes, lambda f, _: f, o, d, base)
