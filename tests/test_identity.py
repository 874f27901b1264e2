"""ArcFace's iresnet (head4d.nn.iresnet) and Portrait4D's identity loss (head4d.train.identity).

- The network against an independent composition of torch.nn.functional calls in float64,
  sharing one set of random weights with non-trivial BatchNorm running statistics, forward
  and backward; its state dict's names and shapes against ``tests/data/iresnet18_state_dict.txt``
  (listed from arcface_torch's definition), and a file of those names loading strictly.
- The alignment: the least-squares similarity against a generic least-squares solve, the warp
  against a per-pixel bilinear sampler written out here, the fixed face points against the
  procedural head they were measured on.
- The face points of posed meshes (``face_points``) against the rule applied here to posed
  vertices; their projection (``project_points``) against ``K [R | t]`` written out here in
  OpenCV's convention for random cameras; the projected nose tip and mouth corners land on
  the rasterizer's visible surface there, for turned heads (the two projections agree).
- The loss: 0 for identical images, 2 for opposite embeddings, in [0, 2]; its gradient (a
  central difference in float64) reaches the image and nothing else; clear errors.
"""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from genhead_testing import camera
from head4d.nn.iresnet import IResNet, STAGE_DEPTHS, iresnet18, iresnet34, iresnet50, iresnet100
from head4d.train.identity import (ARCFACE_TEMPLATE, CANONICAL_FACE_POINTS, IdentityLoss, face_points,
                                   project_points, similarity_to_template, warp_to_crop)

DATA = Path(__file__).parent / "data" / "iresnet18_state_dict.txt"
EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


def _listed_state_dict():
    """[(name, shape)] from the data file, in order, and the header's key and parameter counts."""
    entries, keys, params = [], None, None
    for line in DATA.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("=="):
            counts = line.split(":", 1)[1].split(",")
            keys, params = int(counts[0].split()[0]), int(counts[1].split()[0])
            continue
        name, shape = line.split(" ", 1)
        entries.append((name, tuple(ast.literal_eval(shape))))  # shapes are written as Python tuples
    return entries, keys, params


def _random_state(entries, generator, dtype=torch.float64):
    """Random values for every listed name, scaled so that activations stay of order 1:
    convs and fc He-like, BatchNorm weights near 1 with running statistics far from (0, 1),
    PReLU slopes in (0, 0.5)."""
    state = {}
    for name, shape in entries:
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(int(torch.randint(1, 1000, (), generator=generator)))
        elif name.endswith("running_mean"):
            state[name] = 0.3 * torch.randn(shape, generator=generator, dtype=dtype)
        elif name.endswith("running_var"):
            state[name] = 0.5 + 1.5 * torch.rand(shape, generator=generator, dtype=dtype)
        elif name.endswith("prelu.weight"):
            state[name] = 0.5 * torch.rand(shape, generator=generator, dtype=dtype)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            state[name] = torch.randn(shape, generator=generator, dtype=dtype) * math.sqrt(1.0 / fan_in)
        elif name.endswith("weight"):  # BatchNorm scales
            state[name] = 0.8 + 0.4 * torch.rand(shape, generator=generator, dtype=dtype)
        else:  # BatchNorm shifts and fc's bias
            state[name] = 0.1 * torch.randn(shape, generator=generator, dtype=dtype)
    return state


def _plain_iresnet(state, x, layers=(2, 2, 2, 2)):
    """arcface_torch's iresnet written as functional calls on a state dict (names as listed)."""
    def bn(prefix, t):
        return F.batch_norm(t, state[prefix + ".running_mean"], state[prefix + ".running_var"],
                            state[prefix + ".weight"], state[prefix + ".bias"], training=False, eps=1e-5)

    t = F.conv2d(x, state["conv1.weight"], padding=1)
    t = F.prelu(bn("bn1", t), state["prelu.weight"])
    for stage, depth in enumerate(layers, start=1):
        for i in range(depth):
            p = f"layer{stage}.{i}"
            stride = 2 if i == 0 else 1
            r = F.conv2d(bn(p + ".bn1", t), state[p + ".conv1.weight"], padding=1)
            r = F.prelu(bn(p + ".bn2", r), state[p + ".prelu.weight"])
            r = bn(p + ".bn3", F.conv2d(r, state[p + ".conv2.weight"], stride=stride, padding=1))
            skip = t if i > 0 else bn(p + ".downsample.1", F.conv2d(t, state[p + ".downsample.0.weight"], stride=2))
            t = r + skip
    t = bn("bn2", t).reshape(t.shape[0], -1)
    t = F.linear(t, state["fc.weight"], state["fc.bias"])
    return bn("features", t)


def _random_network(seed=0, dtype=torch.float64, small=False):
    """iresnet18 with random weights (``small``: one block per stage and 64 features, for the
    loss tests, where the depth does not matter) and its state dict."""
    if small:
        network = IResNet(layers=(1, 1, 1, 1), num_features=64)
        entries = [(name, tuple(value.shape)) for name, value in network.state_dict().items()]
    else:
        network = iresnet18()
        entries, _, _ = _listed_state_dict()
    state = _random_state(entries, torch.Generator().manual_seed(seed), dtype)
    network = network.to(dtype)
    network.load_state_dict(state, strict=True)
    return network.eval(), state


# ---------------------------------------------------------------------------- the network
def test_state_dict_names_and_shapes_are_arcface_torchs():
    entries, keys, params = _listed_state_dict()
    assert len(entries) == keys
    got = [(name, tuple(value.shape)) for name, value in iresnet18().state_dict().items()]
    assert got == entries
    assert sum(p.numel() for p in iresnet18().parameters()) == params
    for build, depths in ((iresnet34, (3, 4, 6, 3)), (iresnet50, (3, 4, 14, 3)), (iresnet100, (3, 13, 30, 3))):
        assert build().layers_per_stage == depths == STAGE_DEPTHS[build.__name__]
    assert [len(getattr(iresnet50(), f"layer{i}")) for i in range(1, 5)] == [3, 4, 14, 3]


def test_iresnet_matches_a_plain_composition_in_float64():
    network, state = _random_network(seed=1)
    x = (torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1)
    x.requires_grad_(True)
    got = network(x)
    want = _plain_iresnet(state, x)
    assert got.shape == (1, 512) and got.dtype == torch.float64
    scale = want.abs().max().item()
    assert 0.1 < scale < 1e3, scale  # the random weights keep the embedding well scaled
    # float64 rounding through ~20 layers of sums of up to 25,088 terms.
    torch.testing.assert_close(got, want, rtol=0, atol=1e4 * EPS64 * scale)
    direction = torch.randn(got.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (grad_got,) = torch.autograd.grad((got * direction).sum(), x)
    (grad_want,) = torch.autograd.grad((want * direction).sum(), x)
    torch.testing.assert_close(grad_got, grad_want, rtol=0, atol=1e4 * EPS64 * grad_want.abs().max().item())


def test_iresnet_uses_running_statistics_in_eval_mode():
    network, _ = _random_network(seed=4, small=True)
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1
    together = network(x)
    alone = torch.cat([network(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e3 * EPS64 * together.abs().max().item())
    assert not network.features.weight.requires_grad  # arcface_torch freezes the embedding BN's scale


def test_iresnet_rejects_wrong_input():
    network = iresnet18()
    with pytest.raises(ValueError, match=r"head4d.nn.IResNet: x must have shape \[N, 3, 112, 112\]"):
        network(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match="x must have shape"):
        network(torch.zeros(1, 4, 112, 112))
    with pytest.raises(ValueError, match="4 dimensions"):
        network(torch.zeros(3, 112, 112))
    with pytest.raises(ValueError, match="pretrained"):
        iresnet18(pretrained=True)
    with pytest.raises(ValueError, match="layers must be four positive ints"):
        IResNet(layers=(2, 2, 2))


# ---------------------------------------------------------------------------- loading weights
def test_a_file_with_arcface_torchs_names_loads_strictly(tmp_path):
    entries, _, _ = _listed_state_dict()
    state = _random_state(entries, torch.Generator().manual_seed(6), torch.float32)
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    loss = IdentityLoss.from_file(path)
    loaded = loss.network.state_dict()
    assert list(loaded) == [name for name, _ in entries]
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


def test_from_file_round_trip(tmp_path):
    network, _ = _random_network(seed=7, dtype=torch.float32)
    original = IdentityLoss(network)
    torch.save(network.state_dict(), tmp_path / "backbone.pth")
    from safetensors.torch import save_file
    save_file(network.state_dict(), str(tmp_path / "backbone.safetensors"))
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(8)) * 2 - 1
    target = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(9)) * 2 - 1
    want = original(image, target)
    for name in ("backbone.pth", "backbone.safetensors"):
        loaded = IdentityLoss.from_file(tmp_path / name)
        assert all(torch.equal(value, network.state_dict()[key]) for key, value in loaded.network.state_dict().items())
        assert torch.equal(loaded(image, target), want)


def test_from_file_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no identity network weights at .*nothing.pth"):
        IdentityLoss.from_file(tmp_path / "nothing.pth")
    state = iresnet18().state_dict()
    short = dict(state)
    del short["layer2.0.conv1.weight"]
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"1 missing \(first: layer2.0.conv1.weight\)"):
        IdentityLoss.from_file(tmp_path / "short.pth")
    prefixed = {"module." + k: v for k, v in state.items()}
    torch.save(prefixed, tmp_path / "prefixed.pth")
    with pytest.raises(ValueError, match=r"187 missing \(first: conv1.weight, bn1.weight.*187 unexpected "
                                         r"\(first: module.conv1.weight"):
        IdentityLoss.from_file(tmp_path / "prefixed.pth")
    wrong = dict(state)
    wrong["fc.weight"] = torch.zeros(512, 100)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"fc.weight has shape \[512, 100\], iresnet18 expects \[512, 25088\]"):
        IdentityLoss.from_file(tmp_path / "wrong.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="must hold a state dict"):
        IdentityLoss.from_file(tmp_path / "list.pth")
    with pytest.raises(ValueError, match="arch must be one of"):
        IdentityLoss.from_file(tmp_path / "short.pth", arch="resnet18")


# ---------------------------------------------------------------------------- alignment
def _similarity_by_lstsq(points, template):
    """The same fit as a generic linear least-squares problem in (a, b, tx, ty)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(points.tolist(), template.tolist()):
        rows += [[x, -y, 1.0, 0.0], [y, x, 0.0, 1.0]]
        rhs += [u, v]
    a, b, tx, ty = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                                      torch.tensor(rhs, dtype=torch.float64)[:, None]).solution[:, 0].tolist()
    return torch.tensor([[a, -b, tx], [b, a, ty]], dtype=torch.float64)


def test_similarity_is_the_least_squares_fit():
    template = torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float64)
    generator = torch.Generator().manual_seed(10)
    angle, scale, shift = 0.3, 3.7, torch.tensor([140.0, 95.0], dtype=torch.float64)
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                            dtype=torch.float64)
    exact = template @ (scale * rotation).T + shift  # the template placed in a larger image
    noisy = exact + 2.0 * torch.randn(exact.shape, generator=generator, dtype=torch.float64)
    matrices = similarity_to_template(torch.stack([exact, noisy]))
    assert matrices.shape == (2, 2, 3)
    mapped = exact @ matrices[0, :, :2].T + matrices[0, :, 2]
    torch.testing.assert_close(mapped, template, rtol=0, atol=1e3 * EPS64 * 200)
    torch.testing.assert_close(matrices[1], _similarity_by_lstsq(noisy, template), rtol=0, atol=1e-10)
    coincident = torch.full((1, 5, 2), 7.0, dtype=torch.float64)
    torch.testing.assert_close(similarity_to_template(coincident)[0],
                               torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64))


def _bilinear_reference(image, matrix, size):
    """Crop pixel (x, y) = bilinear sample of image at M^-1 (x, y), taps outside are zero."""
    n, c, h, w = image.shape
    out = torch.zeros(n, c, size, size, dtype=image.dtype)
    for k in range(n):
        linear, shift = matrix[k, :, :2], matrix[k, :, 2]
        inverse = torch.linalg.inv(linear)
        for y in range(size):
            for x in range(size):
                sx, sy = (inverse @ (torch.tensor([x, y], dtype=image.dtype) - shift)).tolist()
                x0, y0 = math.floor(sx), math.floor(sy)
                for dy in (0, 1):
                    for dx in (0, 1):
                        xi, yi = x0 + dx, y0 + dy
                        weight = (1 - abs(sx - xi)) * (1 - abs(sy - yi))
                        if 0 <= xi < w and 0 <= yi < h:
                            out[k, :, y, x] += weight * image[k, :, yi, xi]
    return out


def test_warp_is_bilinear_with_zeros_outside():
    generator = torch.Generator().manual_seed(11)
    image = torch.randn(2, 3, 20, 20, generator=generator, dtype=torch.float64)
    points = torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float64) / 112 * 20
    points = torch.stack([points * 1.3 + 1.0, points * 0.9 + torch.tensor([3.0, -2.0], dtype=torch.float64)])
    points = points + 0.3 * torch.randn(points.shape, generator=generator, dtype=torch.float64)
    matrix = similarity_to_template(points, torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float64) / 112 * 12)
    got = warp_to_crop(image, matrix, size=12)
    want = _bilinear_reference(image, matrix, 12)
    torch.testing.assert_close(got, want, rtol=0, atol=100 * EPS64 * image.abs().max().item())
    assert (want == 0).any()  # the crops reach past the image's border


def test_template_landmarks_in_a_112_image_crop_it_as_it_is():
    loss = IdentityLoss(torch.nn.Flatten())
    image = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(12), dtype=torch.float64) * 2.4 - 1.2
    landmarks = torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float64).expand(2, 5, 2)
    torch.testing.assert_close(loss.double().crop(image, landmarks), image.clamp(-1, 1), rtol=0,
                               atol=100 * EPS64)


def test_canonical_face_points_are_the_procedural_heads_in_the_frontal_camera():
    from head4d.head import ProceduralHead
    from head4d.synthesis.cameras import CONDITION_DISTANCE, FOCAL
    head = ProceduralHead().double()
    vertices = head.v_template
    eye_right, eye_left = vertices[head.right_eye_indices].mean(0), vertices[head.left_eye_indices].mean(0)
    face = vertices[head.face_indices]
    nose = face[face[:, 2].argmax()]
    lips = vertices[head.lips_indices]
    mouth_right, mouth_left = lips[lips[:, 0].argmin()], lips[lips[:, 0].argmax()]
    # the head's right (-x) appears on the image's left in the frontal camera (looking down -z)
    points = torch.stack([eye_right, eye_left, nose, mouth_right, mouth_left])
    depth = CONDITION_DISTANCE - points[:, 2]
    projected = torch.stack([0.5 + FOCAL * points[:, 0] / depth, 0.5 - FOCAL * points[:, 1] / depth], dim=1)
    torch.testing.assert_close(projected, torch.tensor(CANONICAL_FACE_POINTS, dtype=torch.float64), rtol=0,
                               atol=0.01)
    # the fixed alignment puts the eyes within a few pixels of the template's
    matrix = similarity_to_template(torch.tensor(CANONICAL_FACE_POINTS, dtype=torch.float64)[None] * 512 - 0.5)[0]
    eyes = (torch.tensor(CANONICAL_FACE_POINTS, dtype=torch.float64)[:2] * 512 - 0.5) @ matrix[:, :2].T + matrix[:, 2]
    assert (eyes - torch.tensor(ARCFACE_TEMPLATE[:2], dtype=torch.float64)).norm(dim=1).max() < 6.0


# ---------------------------------------------------------------------------- the loss
def test_loss_is_zero_for_identical_images_and_within_zero_two():
    network, _ = _random_network(seed=13, dtype=torch.float32, small=True)
    loss = IdentityLoss(network)
    generator = torch.Generator().manual_seed(14)
    image = torch.rand(3, 3, 128, 128, generator=generator) * 2 - 1
    other = torch.rand(3, 3, 128, 128, generator=generator) * 2 - 1
    same = loss(image, image.clone())
    assert same.shape == (3,) and same.dtype == torch.float32
    assert same.abs().max() < 50 * EPS32  # 1 - cos of one vector with itself, float32 rounding
    different = loss(image, other)
    assert ((different >= 0) & (different <= 2)).all() and (different > 1e3 * EPS32).all()
    # Independently: the embeddings of the crops, compared by cosine.
    want = 1 - F.cosine_similarity(network(loss.crop(image)), network(loss.crop(other)), dim=-1)
    torch.testing.assert_close(different, want)
    # autocast does not reach the network: the same numbers under CPU bfloat16 autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss(image, other)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, different, rtol=0, atol=0)
    # Opposite embeddings reach the upper end: with the identity (flatten) network, negating an
    # image negates its crop.
    flat = IdentityLoss(torch.nn.Flatten())
    torch.testing.assert_close(flat(image, -image), torch.full((3,), 2.0), rtol=0, atol=50 * EPS32)


def test_landmarks_choose_the_crop():
    loss = IdentityLoss(torch.nn.Flatten()).double()
    generator = torch.Generator().manual_seed(15)
    image = torch.rand(2, 3, 128, 128, generator=generator, dtype=torch.float64) * 2 - 1
    default = torch.tensor(CANONICAL_FACE_POINTS, dtype=torch.float64).expand(2, 5, 2) * 128 - 0.5
    torch.testing.assert_close(loss.crop(image), loss.crop(image, default), rtol=0, atol=0)
    moved = default + torch.tensor([6.0, -4.0], dtype=torch.float64)
    shifted = loss.crop(image, moved)
    assert not torch.allclose(shifted, loss.crop(image))
    # moving the face points by whole pixels moves the crop's source by the same pixels
    rolled = torch.roll(image, shifts=(-4, 6), dims=(2, 3))  # the content at (x, y) now at (x + 6, y - 4)
    torch.testing.assert_close(loss.crop(rolled, moved)[..., 20:90, 20:90], loss.crop(image)[..., 20:90, 20:90],
                               rtol=0, atol=1e3 * EPS64)


def test_gradient_reaches_the_image_and_not_the_network():
    network, _ = _random_network(seed=16, small=True)
    loss = IdentityLoss(network)
    generator = torch.Generator().manual_seed(17)
    image = (torch.rand(2, 3, 120, 120, generator=generator, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    target = (torch.rand(2, 3, 120, 120, generator=generator, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    value = loss(image, target)
    value.sum().backward()
    assert image.grad is not None and torch.isfinite(image.grad).all() and image.grad.abs().max() > 0
    assert target.grad is None  # the target's embedding is detached
    assert all(p.grad is None and not p.requires_grad for p in loss.network.parameters())
    # the gradient is the derivative: a central difference along a random direction (float64).
    # Inputs stay inside (-1, 1), away from the clamp's kinks; the step is small so that few
    # PReLU units cross their kink (each crossing adds an error of the order of the step).
    direction = torch.randn(image.shape, generator=generator, dtype=torch.float64)
    step = 1e-7
    with torch.no_grad():
        difference = (loss(image + step * direction, target) - loss(image - step * direction, target)).sum()
    derivative = difference / (2 * step)
    analytic = (image.grad * direction).sum()
    assert abs(derivative - analytic) <= 1e-5 * max(abs(analytic.item()), 1e-3), (derivative, analytic)
    # train() leaves the network in eval mode
    loss.train()
    assert loss.training and not loss.network.training


def test_bad_images_raise_clear_errors():
    loss = IdentityLoss(torch.nn.Flatten())
    good = torch.zeros(2, 3, 128, 128)
    with pytest.raises(ValueError, match=r"head4d.train.IdentityLoss: image must have shape \[N, 3, S, S\]"):
        loss(torch.zeros(2, 4, 128, 128), good)
    with pytest.raises(ValueError, match=r"image must have shape \[N, 3, S, S\] with S >= 112, got \[2, 3, 64, 64\]"):
        loss(torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"got \[2, 3, 128, 120\]"):
        loss(torch.zeros(2, 3, 128, 120), torch.zeros(2, 3, 128, 120))
    with pytest.raises(ValueError, match="4 dimensions"):
        loss(torch.zeros(3, 128, 128), good)
    with pytest.raises(ValueError, match=r"target must have image's shape \[2, 3, 128, 128\], got \[1, 3, 128, 128\]"):
        loss(good, torch.zeros(1, 3, 128, 128))
    with pytest.raises(TypeError, match="image must have a dtype"):
        loss(torch.zeros(2, 3, 128, 128, dtype=torch.uint8), good)
    with pytest.raises(ValueError, match=r"landmarks must have shape \[N, 5, 2\] = \[2, 5, 2\]"):
        loss(good, good, torch.zeros(2, 68, 2))
    with pytest.raises(TypeError, match="network must be a torch.nn.Module"):
        IdentityLoss(lambda x: x)


# ---------------------------------------------------------------------- face points of a mesh
def _random_cameras(n, gen):
    """``[n, 25]`` float64 Portrait4D cameras at random yaws, pitches and distances looking at
    the origin, with random focal lengths, principal points and skews."""
    yaw, pitch = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 1.2, \
        (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 0.6
    distance = 3.5 + torch.rand(n, generator=gen, dtype=torch.float64)
    cams = []
    for i in range(n):
        cy, sy, cp, sp = math.cos(yaw[i]), math.sin(yaw[i]), math.cos(pitch[i]), math.sin(pitch[i])
        rot = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64) @ \
            torch.tensor([[1, 0, 0], [0, cp, -sp], [0, sp, cp]], dtype=torch.float64)
        cam2world = torch.eye(4, dtype=torch.float64)
        cam2world[:3, :3] = rot
        cam2world[:3, 3] = rot @ torch.tensor([0, 0, float(distance[i])], dtype=torch.float64)
        f = 4.0 + torch.rand(2, generator=gen, dtype=torch.float64)
        c = 0.5 + 0.05 * torch.randn(2, generator=gen, dtype=torch.float64)
        skew = 0.05 * torch.randn((), generator=gen, dtype=torch.float64)
        intrinsics = torch.tensor([[f[0], skew, c[0]], [0, f[1], c[1]], [0, 0, 1]], dtype=torch.float64)
        cams.append(torch.cat([cam2world.reshape(16), intrinsics.reshape(9)]))
    return torch.stack(cams)


def test_project_points_is_k_times_the_world_to_camera_transform():
    gen = torch.Generator().manual_seed(5)
    n, size = 4, 512
    cameras = _random_cameras(n, gen)
    points = 0.3 * torch.randn(n, 7, 3, generator=gen, dtype=torch.float64)
    got = project_points(points, cameras, size)
    # OpenGL's camera looks along -z with y up; OpenCV's along +z with y down: flip y and z
    world_to_camera = torch.linalg.inv(cameras[:, :16].reshape(n, 4, 4))
    homogeneous = torch.cat([points, torch.ones(n, 7, 1, dtype=torch.float64)], dim=2)
    camera_points = (homogeneous @ world_to_camera.transpose(1, 2))[..., :3] * torch.tensor(
        [1.0, -1.0, -1.0], dtype=torch.float64)
    image = camera_points @ cameras[:, 16:].reshape(n, 3, 3).transpose(1, 2)
    expected = image[..., :2] / image[..., 2:] * size - 0.5  # pixel centres at integers
    torch.testing.assert_close(got, expected, rtol=0, atol=size * 1e3 * EPS64)
    with pytest.raises(ValueError, match=r"camera must have shape \[N, 25\]"):
        project_points(points, cameras[:, :16], size)


def test_face_points_follow_the_rule_on_posed_meshes():
    from head4d.head import ProceduralHead
    head = ProceduralHead().double()
    gen = torch.Generator().manual_seed(6)
    n = 3
    codes = {"shape": 0.5 * torch.randn(n, 300, generator=gen, dtype=torch.float64),
             "expression": 0.5 * torch.randn(n, 100, generator=gen, dtype=torch.float64),
             "neck_pose": 0.1 * torch.randn(n, 3, generator=gen, dtype=torch.float64),
             "jaw_pose": torch.tensor([[0.2, 0.0, 0.0]], dtype=torch.float64).repeat(n, 1),
             "eye_pose": 0.1 * torch.randn(n, 6, generator=gen, dtype=torch.float64)}
    vertices = head(**codes)
    got = face_points(head, vertices)
    template = head.v_template
    face, lips = head.face_indices.tolist(), head.lips_indices.tolist()
    nose = max(face, key=lambda i: float(template[i, 2]))
    corner_right = min(lips, key=lambda i: float(template[i, 0]))
    corner_left = max(lips, key=lambda i: float(template[i, 0]))
    for k in range(n):
        expected = torch.stack([vertices[k, head.right_eye_indices].mean(0), vertices[k, head.left_eye_indices].mean(0),
                                vertices[k, nose], vertices[k, corner_right], vertices[k, corner_left]])
        torch.testing.assert_close(got[k], expected, rtol=0, atol=0)
    # a frontal, neutral head lands on the fixed face points
    neutral = face_points(head, head(**{k: torch.zeros_like(v) for k, v in codes.items()}))
    from head4d.synthesis.cameras import CONDITION_DISTANCE, FOCAL
    frontal = torch.zeros(1, 25, dtype=torch.float64)  # identity rotation at +z, centred principal point
    frontal[0, :16] = torch.eye(4, dtype=torch.float64).reshape(16)
    frontal[0, 11] = CONDITION_DISTANCE
    frontal[0, 16:] = torch.tensor([[FOCAL, 0, 0.5], [0, FOCAL, 0.5], [0, 0, 1]], dtype=torch.float64).reshape(9)
    fractions = (project_points(neutral[:1], frontal, 1) + 0.5)[0]
    torch.testing.assert_close(fractions, torch.tensor(CANONICAL_FACE_POINTS, dtype=torch.float64), rtol=0, atol=0.01)
    with pytest.raises(ValueError, match="vertices must have shape"):
        face_points(head, vertices[:, :10])


def test_projected_face_points_land_on_the_rasterized_surface():
    """The nose tip and the mouth corners are on the surface and visible from these yaws: at
    the pixel each projects to, the rasterizer's visible surface point (its barycentrics
    over the world vertices) is that point, to the pixel's footprint (rounding to the pixel
    centre moves up to 0.71 pixel, the slope of the surface a little more). The eyeball
    centres lie inside the head and are left out."""
    from head4d.head import ProceduralHead
    from head4d.models.genhead import clip_vertices
    from head4d.ops.rasterize import rasterize_triangles
    head = ProceduralHead().double()
    yaws = [-0.5, -0.25, 0.0, 0.25, 0.5]
    n, size = len(yaws), 256
    cams = torch.cat([camera(1, yaw=y) for y in yaws]).double()
    vertices = head(**head.zero_codes(n))
    clip = clip_vertices(vertices, cams[:, :16].reshape(n, 4, 4), cams[:, 16:].reshape(n, 3, 3))
    face, bary, _ = rasterize_triangles(clip, head.faces, (size, size), backend="torch")
    points = face_points(head, vertices)
    pixels = project_points(points, cams, size).round().long()
    footprint = 4.0 / (float(cams[0, 16]) * size)  # world size of a pixel at the head (distance 4)
    for k in range(n):
        for j in (2, 3, 4):  # nose tip, mouth corners
            x, y = pixels[k, j].tolist()
            f = int(face[k, y, x])
            assert f >= 0, (yaws[k], j)
            seen = (bary[k, y, x, :, None] * vertices[k, head.faces[f]]).sum(0)
            assert (seen - points[k, j]).norm() < 1.5 * footprint, (yaws[k], j)
