"""``head4d.synthesis``: Portrait4D's online training triplets from a frozen GenHead, and
``head4d synthesize``.

A small GenHead with random weights (tiny channels and resolutions, the super-resolution
narrowed), so that a batch renders in seconds on the CPU:

- identity: one z and one shape per triplet; the render receives one plane set per
  identity (row b) for the three views (rows 3b..3b+2), equal to the planes of the
  recorded z, condition camera and shape; the codes given to the render are the batch's;
- motions: the driver and the target share a motion, the static rows (configurable
  fraction, at the end) share one motion over all three views with motion scale 0, the
  dynamic rows take their two frames from one clip, the neck is 0;
- distributions, from many draws, with bounds derived in :func:`mean_bound`: the look-at
  yaw, elevation, roll, pivot and radius (ranges reached and means), the same angles
  read back from the camera matrices, the dataset/look-at split of the views, the jaw
  perturbation's fraction and values;
- the look-at construction (frontal camera, yaw direction, looking at the pivot,
  orthonormal, the angles round trip);
- the triplane-feature targets: at canonical codes the features are the head planes read
  at the points themselves; the eye and mouth exclusion;
- seeding: the same generator seed gives the same batch, another seed another;
- ``head4d synthesize`` writes N triplets (PNG per view) and a labels file that reads
  back equal to the sampler's batches of the same seed; argument errors.
"""
import math

import numpy as np
import pytest
import torch

from head4d import cli
from head4d.head import ProceduralHead
from head4d.models import FlameCodes, GenHead
from head4d.ops import sample_triplanes
from head4d.synthesis import (MOTION_SIZE, TripletSampler, look_at_angles, look_at_cameras, read_labels,
                              sample_look_at_cameras, sample_look_at_parameters)
from head4d.synthesis import cameras as cams
from head4d.synthesis import motions as motion_module

from genhead_testing import SMALL_RES, narrow_superresolution, randomize, small_genhead_config

RES = SMALL_RES  # neural rendering resolution of the small model
#: Standard deviations allowed between a sample mean and its expectation: a correct
#: sampler fails one such check with probability 2 * Phi(-5) ~ 6e-7.
SIGMAS = 5.0


small_config = small_genhead_config


@pytest.fixture(scope="module")
def head():
    return ProceduralHead()


@pytest.fixture(scope="module")
def model(head):
    torch.manual_seed(0)
    G = GenHead(small_config(), head)
    narrow_superresolution(G)
    return randomize(G, 1).eval()


def mean_bound(width: float, n: int) -> float:
    """Allowed |mean - expectation| of n independent U(a, a + width) draws: SIGMAS standard
    deviations of the mean, width / sqrt(12 n) each."""
    return SIGMAS * width / math.sqrt(12 * n)


def fraction_bound(p: float, n: int) -> float:
    """Allowed |fraction - p| of n Bernoulli(p) trials: SIGMAS * sqrt(p (1 - p) / n)."""
    return SIGMAS * math.sqrt(p * (1 - p) / n)


def check_uniform(values: torch.Tensor, low: float, high: float, name: str, slack: float = 0.0) -> None:
    """Values inside [low, high] (up to ``slack``), reaching within ``20 / n`` of the width
    of both ends (n draws all miss such an end with probability (1 - 20/n)^n < e^-20 ~ 2e-9),
    mean within :func:`mean_bound`."""
    values = values.double()
    n, width = values.numel(), high - low
    reach = 20 / n * width
    assert values.min() >= low - slack and values.max() <= high + slack, name
    assert values.min() <= low + reach + slack and values.max() >= high - reach - slack, name
    assert abs(values.mean().item() - (low + high) / 2) <= mean_bound(width, n) + slack, name


def canonical_clips(head, clips=1, frames=1):
    """Motion clips ``[clips, frames, 109]`` at the head's canonical codes."""
    codes = head.canonical_codes(1)
    frame = torch.cat([codes["expression"], codes["jaw_pose"], codes["eye_pose"]], dim=1).float()
    return frame.expand(clips, frames, MOTION_SIZE).clone()


def labelled_clips(clips=5, frames=7):
    """Clips whose expression 0 is the clip index, expression 1 the frame index, the jaw
    x-rotation -1 (never a perturbed value) and eye values identifying the frame."""
    m = torch.zeros(clips, frames, MOTION_SIZE)
    m[..., 0] = torch.arange(clips, dtype=torch.float32).view(-1, 1)
    m[..., 1] = torch.arange(frames, dtype=torch.float32).view(1, -1)
    m[..., 100] = -1.0
    m[..., 103:109] = (m[..., 0] * 100 + m[..., 1]).unsqueeze(-1) / 1000
    return m


# ----------------------------------------------------------------------------------
# one batch through the model
# ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recorded(model):
    """A batch of 4 (2 dynamic, 2 static) with the render's and the planes' arguments recorded."""
    calls = {}
    render, planes = model.render, model.planes

    def recording_render(p, camera, codes, **kwargs):
        calls["render"] = (p, camera, FlameCodes.of(codes), kwargs)
        return render(p, camera, codes, **kwargs)

    def recording_planes(ws, **kwargs):
        calls.setdefault("planes_ws", []).append(ws)
        return planes(ws, **kwargs)

    model.render, model.planes = recording_render, recording_planes
    try:
        sampler = TripletSampler(model, generator=torch.Generator().manual_seed(0), triplane_points=300)
        batch = sampler.sample(4, return_planes=True)
    finally:
        del model.render, model.planes
    return batch, calls


def test_batch_shapes(recorded, model):
    batch, _ = recorded
    n, r, k = 4, RES, 300
    expected = {"image": (n, 3, 3, 512, 512), "image_raw": (n, 3, 3, r, r), "image_feature": (n, 3, 32, r, r),
                "image_depth": (n, 3, 1, r, r), "opacity": (n, 3, 1, r, r), "eye_mask": (n, 3, 1, r, r),
                "mouth_mask": (n, 3, 1, r, r), "background": (n, 32, 16, 16), "z": (n, 512), "shape": (n, 300),
                "expression": (n, 3, 100), "jaw_pose": (n, 3, 3), "eye_pose": (n, 3, 6), "neck_pose": (n, 3, 3),
                "motions": (n, 3, 109), "cameras": (n, 3, 25), "condition_camera": (n, 25), "motion_scale": (n,),
                "from_dataset": (n, 3), "jaw_perturbed": (n, 2), "triplane_points": (n, k, 3),
                "triplane_features": (n, k, 32), "planes": (n, 6, 32, 32, 32)}
    got = {name: tuple(t.shape) for name, t in batch.tensors().items()}
    assert got == expected
    for name, t in batch.tensors().items():
        assert not t.requires_grad, name
        if t.is_floating_point():
            assert torch.isfinite(t).all(), name


def test_views_share_one_identity(recorded, model):
    """One plane set per identity reaches the render for its three views, and it is the
    planes of the recorded z, condition camera and shape at truncation 0.95."""
    batch, calls = recorded
    planes, camera, codes, kwargs = calls["render"]
    assert planes.shape[0] == 4 and camera.shape[0] == 12  # render's rule: row 3b + k uses planes row b
    assert torch.equal(camera, batch.cameras.reshape(12, 25))
    assert torch.equal(planes, batch.planes)
    with torch.no_grad():
        ws = model.mapping(batch.z, model.condition(batch.condition_camera, batch.shape), truncation_psi=0.95)
        assert torch.equal(model.planes(ws), batch.planes)
        ws_average = model.mapping(batch.z, model.condition(batch.condition_camera, batch.shape), truncation_psi=0)
    assert torch.equal(kwargs["ws"], ws_average)  # the super-resolution on the average w
    # the three views' codes carry the identity's shape; their motions are the batch's
    shape = codes.shape.view(4, 3, 300)
    assert torch.equal(shape, batch.shape.unsqueeze(1).expand(-1, 3, -1))
    assert torch.equal(codes.expression.view(4, 3, 100), batch.expression)
    assert torch.equal(codes.jaw_pose.view(4, 3, 3), batch.jaw_pose)
    assert torch.equal(codes.eye_pose.view(4, 3, 6), batch.eye_pose)
    assert torch.equal(codes.neck_pose, torch.zeros(12, 3))
    for view in range(3):
        assert torch.equal(batch.codes(view).expression, batch.expression[:, view])
    # distinct identities differ
    assert not torch.equal(batch.planes[0], batch.planes[1])


def test_static_half_and_driver_target_motion(recorded):
    batch, _ = recorded
    m = batch.motions
    assert torch.equal(m[:, 1], m[:, 2])  # the target has the driver's motion
    assert torch.equal(batch.motion_scale, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    for row in (2, 3):  # static: one motion for all three views
        assert torch.equal(m[row, 0], m[row, 1])
    assert not batch.jaw_perturbed[2:].any()
    assert torch.equal(batch.motions, torch.cat([batch.expression, batch.jaw_pose, batch.eye_pose], dim=2))
    assert torch.equal(batch.neck_pose, torch.zeros_like(batch.neck_pose))


def test_static_fraction_is_configurable(model):
    sampler = TripletSampler(model, static_fraction=0.25, generator=torch.Generator().manual_seed(1))
    drawn = sampler.draw_motions(8)
    assert torch.equal(drawn["motion_scale"], torch.tensor([1.0] * 6 + [0.0] * 2))
    m = drawn["motions"]
    assert torch.equal(m[6:, 0], m[6:, 2]) and torch.equal(m[6:, 0], m[6:, 1])
    assert not torch.equal(m[:6, 0], m[:6, 1])  # the random model's two frames differ
    assert TripletSampler(model, static_fraction=0.0).num_static(5) == 0
    assert TripletSampler(model, static_fraction=1.0).num_static(5) == 5


def test_dynamic_frames_come_from_one_clip(model):
    clips = labelled_clips()
    sampler = TripletSampler(model, motions=clips, jaw_perturb_prob=0.0, generator=torch.Generator().manual_seed(2))
    drawn = sampler.draw_motions(400)
    m = drawn["motions"]
    dynamic, static = m[:200], m[200:]
    assert torch.equal(dynamic[:, 0, 0], dynamic[:, 1, 0])  # same clip for source and driver
    frames = dynamic[:, :2, 1]
    assert (frames[:, 0] != frames[:, 1]).any()  # two frames of it
    # every drawn frame is a frame of the clips (eyes apart: drawn from any frame)
    flat = clips.reshape(-1, MOTION_SIZE)
    for frame in torch.cat([dynamic[:, 0], static[:, 0]]):
        match = (flat[:, :103] == frame[:103]).all(dim=1)
        assert match.any()
        assert ((flat[:, 103:] == frame[103:]).all(dim=1)).any()


def test_random_motion_model(model):
    drawn = TripletSampler(model, jaw_perturb_prob=0.0, generator=torch.Generator().manual_seed(3)).draw_motions(200)
    m = drawn["motions"]
    jaw = m[..., 100:103]
    assert (jaw[..., 0] >= 0).all() and (jaw[..., 0] <= motion_module.JAW_MAX).all()
    assert torch.equal(jaw[..., 1:], torch.zeros_like(jaw[..., 1:]))
    assert torch.equal(m[..., 103:106], m[..., 106:109])  # both eyes look the same way
    # per-frame expression: centre std 0.5 plus frame std 0.25 (variance 0.3125 per coefficient)
    e = m[:100, 0, :100].reshape(-1).double()
    n = e.numel()
    assert abs(e.var().item() - 0.3125) < SIGMAS * 0.3125 * math.sqrt(2 / n)


# ----------------------------------------------------------------------------------
# cameras
# ----------------------------------------------------------------------------------

def test_look_at_construction():
    d = torch.float64
    frontal = look_at_cameras(torch.zeros(1, dtype=d), torch.zeros(1, dtype=d), torch.zeros(1, dtype=d),
                              torch.zeros(1, 3, dtype=d), torch.full((1,), 4.0, dtype=d))
    expected = torch.eye(4, dtype=d)
    expected[2, 3] = 4.0
    assert torch.allclose(frontal[0, :16].view(4, 4), expected, atol=1e-12)
    assert torch.allclose(frontal[0, 16:], cams.intrinsics_label(1, cams.FOCAL, dtype=d)[0])
    # a positive yaw moves the camera towards -x; a positive elevation lifts it
    side = look_at_cameras(torch.tensor([0.5], dtype=d), torch.tensor([0.3], dtype=d), torch.zeros(1, dtype=d),
                           torch.zeros(1, 3, dtype=d), torch.full((1,), 4.0, dtype=d))
    assert side[0, 3] < 0 and side[0, 7] > 0
    gen = torch.Generator().manual_seed(4)
    n = 64
    yaw = torch.rand(n, generator=gen, dtype=d) * 1.56 - 0.78
    elevation = torch.rand(n, generator=gen, dtype=d) * 0.9 - 0.25
    roll = torch.rand(n, generator=gen, dtype=d) * 0.5 - 0.25
    pivot = torch.rand(n, 3, generator=gen, dtype=d) * 0.1
    radius = 3.65 + 0.8 * torch.rand(n, generator=gen, dtype=d)
    c = look_at_cameras(yaw, elevation, roll, pivot, radius)
    cam2world = c[:, :16].view(n, 4, 4)
    rot = cam2world[:, :3, :3]
    assert torch.allclose(rot.transpose(1, 2) @ rot, torch.eye(3, dtype=d).expand(n, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(n, dtype=d), atol=1e-12)
    assert torch.equal(cam2world[:, 3], torch.tensor([0.0, 0, 0, 1], dtype=d).expand(n, 4))
    to_pivot = torch.nn.functional.normalize(pivot - cam2world[:, :3, 3], dim=1)
    assert torch.allclose(to_pivot, -cam2world[:, :3, 2], atol=1e-12)  # looks at the pivot along -z
    got = look_at_angles(c)
    for name, value, want in zip(("yaw", "elevation", "roll", "radius"), got, (yaw, elevation, roll, radius)):
        assert torch.allclose(value, want, atol=1e-10), name


def test_look_at_distribution():
    n = 20000
    params = sample_look_at_parameters(n, generator=torch.Generator().manual_seed(5))
    check_uniform(params["yaw"], -0.78, 0.78, "yaw")
    check_uniform(params["elevation"], 0.2 - 0.45, 0.2 + 0.45, "elevation")
    check_uniform(params["roll"], -0.25, 0.25, "roll")
    check_uniform(params["radius"], 3.65, 4.45, "radius")
    for axis, (low, high) in enumerate(((-0.03, 0.03), (-0.03, 0.03), (0.06, 0.12))):
        check_uniform(params["pivot"][:, axis], low, high, f"pivot {axis}")
    # the same distribution read back from the float32 camera matrices (slack: float32
    # rounding of the trigonometry, a few ulp of values below 5)
    cameras = sample_look_at_cameras(n, generator=torch.Generator().manual_seed(5))
    yaw, elevation, roll, radius = look_at_angles(cameras.double())
    for name, value, (low, high) in (("yaw", yaw, (-0.78, 0.78)), ("elevation", elevation, (-0.25, 0.65)),
                                     ("roll", roll, (-0.25, 0.25)), ("radius", radius, (3.65, 4.45))):
        check_uniform(value, low, high, name, slack=1e-5)
    assert torch.equal(cameras[:, 16:], cams.intrinsics_label(n))


def test_dataset_camera_split(model):
    gen = torch.Generator().manual_seed(6)
    table = sample_look_at_cameras(7, generator=gen)
    table[:, 16] = table[:, 20] = 5.0  # the dataset's own focal
    sampler = TripletSampler(model, dataset_cameras=table, generator=gen)
    n = 3000
    drawn = sampler.draw_cameras(n)
    cameras, flags = drawn["cameras"].reshape(-1, 25), drawn["from_dataset"].reshape(-1)
    assert abs(flags.double().mean().item() - 0.5) <= fraction_bound(0.5, 3 * n)
    is_row = (cameras.unsqueeze(1) == table.unsqueeze(0)).all(-1).any(-1)
    assert torch.equal(is_row, flags)  # dataset views are dataset rows, the others are not
    assert (cameras[:, 16] == 5.0).all()  # look-at views keep the dataset's intrinsics
    assert ((drawn["condition_camera"].unsqueeze(1) == table.unsqueeze(0)).all(-1).any(-1)).all()
    # without dataset cameras: all look-at, the frontal condition camera
    plain = TripletSampler(model, generator=torch.Generator().manual_seed(6)).draw_cameras(5)
    assert not plain["from_dataset"].any()
    assert torch.equal(plain["condition_camera"], cams.frontal_condition_camera(5))


def test_jaw_perturbation(model):
    sampler = TripletSampler(model, motions=labelled_clips(), generator=torch.Generator().manual_seed(7))
    drawn = sampler.draw_motions(4000)
    jaw_x = drawn["motions"][:2000, :2, 100]
    flags = drawn["jaw_perturbed"][:2000]
    assert abs(flags.double().mean().item() - 0.5) <= fraction_bound(0.5, flags.numel())
    assert torch.equal(jaw_x[~flags], torch.full_like(jaw_x[~flags], -1.0))  # the clip's value kept
    check_uniform(jaw_x[flags], 0.0, 0.2, "perturbed jaw")
    assert torch.equal(drawn["motions"][:2000, 2, 100], jaw_x[:, 1])  # the target has the driver's jaw
    assert (drawn["motions"][2000:, :, 100] == -1.0).all()  # static rows unperturbed


# ----------------------------------------------------------------------------------
# triplane-feature targets
# ----------------------------------------------------------------------------------

def test_triplane_targets_at_canonical_codes(model, head):
    """At the canonical codes (zero shape) the head warp is the identity, so the targets
    are the head planes read at the observation points themselves; position error ~1e-5
    (the warp's float32 grids) times the plane slope (32 texels over 1.3) keeps the
    features within 1e-3 relative."""
    sampler = TripletSampler(model, motions=canonical_clips(head), shapes=torch.zeros(1, 300),
                             jaw_perturb_prob=0.0, triplane_points=500, generator=torch.Generator().manual_seed(8))
    batch = sampler.sample(2, return_planes=True)
    direct = sample_triplanes(batch.planes[:, 3:6], batch.triplane_points, box_warp=1.3, plane_layout="portrait4d")
    err = ((batch.triplane_features - direct).norm() / direct.norm()).item()
    assert err < 1e-3
    assert direct.abs().max() > 0  # points inside the planes' box


def test_triplane_targets_are_read_at_the_head_canonical_points(model, head):
    """Away from the canonical codes the points stay in observation space (the
    reconstructor's loss warps them with the target's codes) and the features are the
    head planes read at their head-canonical positions, not at the points themselves."""
    sampler = TripletSampler(model, static_fraction=0.0, triplane_points=300,
                             generator=torch.Generator().manual_seed(10))
    batch = sampler.sample(2, return_planes=True)
    fields = model.deformation.build(**{k: v.to(head.dtype) for k, v in batch.codes(2).as_dict().items()})
    canonical = model.deformation.warp(batch.triplane_points.to(head.dtype), fields).head.float()
    at_canonical = sample_triplanes(batch.planes[:, 3:6], canonical, box_warp=1.3, plane_layout="portrait4d")
    at_points = sample_triplanes(batch.planes[:, 3:6], batch.triplane_points, box_warp=1.3,
                                 plane_layout="portrait4d")
    eps = torch.finfo(torch.float32).eps
    assert torch.allclose(batch.triplane_features, at_canonical, rtol=0, atol=64 * eps * at_canonical.abs().max())
    assert ((at_points - at_canonical).norm() / at_canonical.norm()).item() > 1e-2  # the warp matters here


def test_triplane_targets_skip_eye_and_mouth_rays(model, head):
    sampler = TripletSampler(model, triplane_points=200, generator=torch.Generator().manual_seed(9))
    planes = torch.randn(1, 6, 32, 32, 32, generator=torch.Generator().manual_seed(9))
    camera = sample_look_at_cameras(1, generator=torch.Generator().manual_seed(9))
    codes = FlameCodes(**head.canonical_codes(1))
    eye = torch.zeros(1, 1, RES, RES)
    mouth = torch.ones(1, 1, RES, RES)
    mouth[0, 0, 5, 7] = 0.0  # one ray outside the mouth mask
    points, _ = sampler.triplane_targets(planes, camera, codes, eye, mouth)
    from head4d.models._common import camera_rays
    _, origins, directions = camera_rays(camera, RES)
    o, d = origins[0, 5 * RES + 7], directions[0, 5 * RES + 7]
    offset = points[0] - o
    off_ray = offset - (offset @ d).unsqueeze(1) * d
    assert off_ray.norm(dim=1).max() < 1e-5  # every point lies on that ray
    # eye mask everywhere: only points outside the eye boxes remain
    points, _ = sampler.triplane_targets(planes, camera, codes, torch.ones(1, 1, RES, RES),
                                         torch.zeros(1, 1, RES, RES))
    fields = model.deformation.build(**{k: v.to(head.dtype) for k, v in codes.as_dict().items()})
    assert not model.deformation.warp(points.to(head.dtype), fields).inside_eye_box.any()


# ----------------------------------------------------------------------------------
# seeding, errors
# ----------------------------------------------------------------------------------

def test_same_seed_same_batch(model):
    def draw(seed):
        return TripletSampler(model, triplane_points=100, generator=torch.Generator().manual_seed(seed)).sample(2)

    a, b, c = draw(11), draw(11), draw(12)
    for name, value in a.tensors().items():
        assert torch.equal(value, getattr(b, name)), name
    assert not torch.equal(a.z, c.z) and not torch.equal(a.image_raw, c.image_raw)


def test_bad_arguments(model):
    with pytest.raises(TypeError, match="genhead"):
        TripletSampler("G")
    with pytest.raises(ValueError, match="static_fraction"):
        TripletSampler(model, static_fraction=1.5)
    with pytest.raises(ValueError, match="jaw_perturb_prob"):
        TripletSampler(model, jaw_perturb_prob=-0.1)
    with pytest.raises(ValueError, match=r"dataset_cameras.*\[M, 25\]"):
        TripletSampler(model, dataset_cameras=torch.zeros(3, 16))
    with pytest.raises(ValueError, match=r"motions.*\[C, T, 109\]"):
        TripletSampler(model, motions=torch.zeros(3, 109))
    with pytest.raises(ValueError, match=r"shapes.*\[S, 300\]"):
        TripletSampler(model, shapes=torch.zeros(3, 100))
    with pytest.raises(ValueError, match="focal"):
        TripletSampler(model, focal=0.0)
    with pytest.raises(ValueError, match="shape_std"):
        TripletSampler(model, shape_std=-1.0)
    with pytest.raises(ValueError, match="triplane_points"):
        TripletSampler(model, triplane_points=0)
    with pytest.raises(ValueError, match="batch"):
        TripletSampler(model).sample(0)
    with pytest.raises(ValueError, match="pivot"):
        look_at_cameras(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(3), torch.ones(2))


# ----------------------------------------------------------------------------------
# head4d synthesize
# ----------------------------------------------------------------------------------

def test_synthesize_command(tmp_path, head, capsys):
    torch.manual_seed(0)
    G = randomize(GenHead(small_config(has_superresolution=False), head), 2).eval()
    G.save(tmp_path / "genhead")
    out = tmp_path / "triplets"
    assert cli.main(["synthesize", "--genhead", str(tmp_path / "genhead"), "--out", str(out), "--count", "3",
                     "--batch", "2", "--seed", "5", "--device", "cpu"]) == 0
    assert "3/3" in capsys.readouterr().err  # the progress counter (no tqdm) or tqdm's bar, on stderr
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == sorted(f"{i:06d}_{v}.png" for i in range(3) for v in ("source", "driver", "target"))
    assert len(list((out / "raw").iterdir())) == 9
    assert (out / "images" / "000000_source.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = read_labels(out)
    assert list(labels["views"]) == ["source", "driver", "target"]
    # the file holds the batches the sampler draws with the same seed (2 then 1)
    sampler = TripletSampler(GenHead.load(tmp_path / "genhead"), generator=torch.Generator().manual_seed(5))
    first, second = sampler.sample(2), sampler.sample(1)
    for name in ("cameras", "motions", "motion_scale", "z", "shape", "jaw_perturbed", "triplane_features",
                 "opacity", "eye_mask"):
        want = torch.cat([getattr(first, name), getattr(second, name)]).numpy()
        assert labels[name].shape == want.shape, name
        assert np.array_equal(labels[name], want), name
    assert labels["triplane_points"].shape == (3, 4000, 3)


def test_synthesize_command_errors(tmp_path, capsys):
    assert cli.main(["synthesize", "--genhead", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                     "--count", "1", "--device", "cpu"]) == 2
    assert "head4d synthesize" in capsys.readouterr().err
    assert cli.main(["synthesize", "--genhead", str(tmp_path), "--out", str(tmp_path / "o"), "--count", "0",
                     "--device", "cpu"]) == 2
    assert "--count" in capsys.readouterr().err
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    assert cli.main(["synthesize", "--genhead", str(bad), "--out", str(tmp_path / "o"), "--count", "1",
                     "--device", "cpu"]) == 2
    assert "head4d synthesize" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["synthesize", "--out", str(tmp_path / "o"), "--count", "1"])


def test_synthesize_command_reads_a_pickle_and_the_optional_arrays(tmp_path, head, monkeypatch, capsys):
    """--genhead goes through head4d.checkpoints.load with kind GenHead (the loader replaced
    here; its own tests read real pickles and directories); --motions and --cameras arrays
    reach the sampler."""
    import head4d.checkpoints

    torch.manual_seed(0)
    small = randomize(GenHead(small_config(has_superresolution=False), head), 3).eval()
    loaded = []
    monkeypatch.setattr(head4d.checkpoints, "load",
                        lambda path, device="cpu", kind=None: loaded.append((str(path), device, kind)) or small)
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(b"read by the replaced loader only")
    clips = labelled_clips(2, 3).numpy()
    table = sample_look_at_cameras(2, generator=torch.Generator().manual_seed(1)).numpy()
    np.save(tmp_path / "motions.npy", clips)
    np.save(tmp_path / "cameras.npy", table)
    out = tmp_path / "out"
    assert cli.main(["synthesize", "--genhead", str(pkl), "--out", str(out), "--count", "2", "--device", "cpu",
                     "--motions", str(tmp_path / "motions.npy"), "--cameras", str(tmp_path / "cameras.npy")]) == 0
    assert loaded == [(str(pkl), "cpu", "GenHead")]
    labels = read_labels(out / "labels.npz")
    # the dynamic row's expression comes from the clips (coefficient 1 is a frame index)
    assert set(labels["motions"][0, :, 1].tolist()) <= {0.0, 1.0, 2.0}
    assert (labels["condition_camera"][:, None] == table[None]).all(-1).any(-1).all()  # a dataset row
