"""``head4d.models.Reconstructor``: Portrait4D's one-shot reconstructor composed from head4d's
modules (its sub-networks are tested against plain compositions in
``test_reconstructor_encoders.py`` and ``test_reconstructor_transformer.py``).

- Upstream compatibility (full size, built but not run): every state-dict name and shape
  is upstream's, and such a state dict loads as it is.
- A reconstructor at a small source size (every network is convolutional: a 64 x 64
  source gives 4 x 4 canonical tokens and a 32 x 32 triplane), the full widths, random
  weights with non-zero biases and ``w_avg``, few samples, the super-resolution's blocks
  narrowed at their upstream resolutions: the forward's shapes and ranges;
  ``encode`` + ``reenact`` equals the one-call forward; frames batched over sources;
  ``motion_scale`` 0 (a number or a per-sample tensor) makes the output independent of
  both motions; head4d's kernels against ``backend="torch"``; a zero neck pose renders as
  no warp and a turned neck changes the image; gradients reach every parameter; the
  safetensors round trip; argument errors.
"""
import copy

import pytest
import torch

from head4d.head import ProceduralHead
from head4d.models import GenHead, GenHeadConfig, Reconstructor, ReconstructorConfig

from genhead_testing import RECONSTRUCTOR_DATA, camera, narrow_superresolution, randomize, upstream_sections

EPS32 = torch.finfo(torch.float32).eps
SOURCE = 64  # source image side of the small model
RES = 8  # neural rendering resolution of the small model


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def small_config(**kwargs):
    args = dict(source_resolution=SOURCE, depth_resolution=6, depth_resolution_importance=6,
                neural_rendering_resolution=RES, fine_resolution=8, coarse_resolution=4)
    args.update(kwargs)
    return ReconstructorConfig(**args)


@pytest.fixture(scope="module")
def head():
    return ProceduralHead()


@pytest.fixture(scope="module")
def model(head):
    torch.manual_seed(0)
    R = Reconstructor(small_config(), head)
    narrow_superresolution(R)
    randomize(R, 1)
    with torch.no_grad():  # a density that is not ~0 everywhere, so the renders see the planes
        R.decoder.out_sigma.bias.fill_(2.0)
    return R.eval()


def inputs_of(model, b=2, k=1, seed=3):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, SOURCE, SOURCE, generator=gen) * 2 - 1
    source_motion = torch.randn(b, model.motion_dim, generator=gen)
    driving_motion = torch.randn(b * k, model.motion_dim, generator=gen)
    return image, source_motion, driving_motion, camera(b * k)


@pytest.fixture(scope="module")
def inputs(model):
    return inputs_of(model)


@pytest.fixture(scope="module")
def forward_out(model, inputs):
    with torch.no_grad():
        return model(*inputs, generator=torch.Generator().manual_seed(7))


def gen():
    return torch.Generator().manual_seed(7)


# ----------------------------------------------------------------------------------
# upstream names (full size, built, never run)
# ----------------------------------------------------------------------------------
def test_full_size_state_dict_is_upstreams(head):
    R = Reconstructor(head_model=head)
    state = R.state_dict()
    expected = {}
    for section in upstream_sections(path=RECONSTRUCTOR_DATA).values():
        expected.update({name: shape for name, shape, _ in section[2]})
    genhead = GenHead(GenHeadConfig(), head).state_dict()
    expected.update({k: tuple(v.shape) for k, v in genhead.items()
                     if k.startswith(("superresolution.", "decoder."))})
    expected["w_avg"] = (512,)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    # an upstream-named state dict (plus the keys head4d leaves out) loads as it is
    upstream = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in state.items()}
    upstream["dataset_label_std"] = torch.tensor(1.0)
    missing, unexpected = R.load_state_dict(upstream, strict=False)
    assert missing == [] and unexpected == ["dataset_label_std"]
    total = sum(p.numel() for p in R.parameters())
    assert 224_000_000 < total < 226_000_000  # about 224.8M upstream


# ----------------------------------------------------------------------------------
# the small model
# ----------------------------------------------------------------------------------
def test_forward_shapes_and_ranges(model, forward_out):
    n = 2
    shapes = {"image": (n, 3, 512, 512), "image_raw": (n, 3, RES, RES), "image_depth": (n, 1, RES, RES),
              "image_feature": (n, 32, RES, RES), "opacity": (n, 1, RES, RES), "image_raw_wobg": (n, 3, RES, RES),
              "image_background": (n, 3, RES, RES), "planes": (n, 3, 32, SOURCE // 2, SOURCE // 2)}
    assert {k: tuple(v.shape) for k, v in forward_out.items()} == shapes
    for value in forward_out.values():
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
    opacity = forward_out["opacity"]
    assert (opacity >= 0).all() and (opacity <= 1 + 4 * EPS32).all() and opacity.max() > 0.05
    # features in [-1, 1]: the decoder's sigmoid range widened by its 0.001 margins
    assert forward_out["image_feature"].abs().max() <= 1.002 + 1e-5
    assert forward_out["image_background"].abs().max() <= 1.0


def test_encode_then_reenact_equals_forward(model, inputs, forward_out):
    image, source_motion, driving_motion, cam = inputs
    with torch.no_grad():
        encoded = model.encode(image, source_motion)
        out = model.reenact(encoded, driving_motion, cam, generator=gen())
    for key, value in forward_out.items():
        assert torch.equal(out[key], value), key


def test_frames_batched_over_sources(model):
    """Two sources, three frames each, in one reenact: frame b*3+k equals source b alone."""
    image, source_motion, driving_motion, cam = inputs_of(model, b=2, k=3, seed=5)
    with torch.no_grad():
        encoded = model.encode(image, source_motion)
        batched = model.triplanes(encoded, driving_motion)
        single = model.triplanes(model.encode(image[1:], source_motion[1:]), driving_motion[3:])
    assert batched.shape == (6, 3, 32, SOURCE // 2, SOURCE // 2)
    assert rel_err(batched[3:], single) < 16 * EPS32


@pytest.mark.parametrize("scale", [0, "tensor"])
def test_motion_scale_zero_ignores_the_motions(model, inputs, scale):
    image, source_motion, driving_motion, cam = inputs
    if scale == "tensor":
        scale = torch.zeros(image.shape[0])
    with torch.no_grad():
        a = model(image, source_motion, driving_motion, cam, motion_scale=scale, generator=gen())
        b = model(image, source_motion.flip(0) * 3, -driving_motion, cam, motion_scale=scale, generator=gen())
        moved = model(image, source_motion, driving_motion, cam, generator=gen())
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["planes"], moved["planes"])


def test_motion_scale_per_sample(model, inputs):
    """A [B] scale switches the motion off for some samples of a batch only."""
    image, source_motion, driving_motion, cam = inputs
    with torch.no_grad():
        mixed = model.encode(image, source_motion, motion_scale=torch.tensor([1.0, 0.0]))
        planes_mixed = model.triplanes(mixed, driving_motion)
        on = model.triplanes(model.encode(image[:1], source_motion[:1]), driving_motion[:1])
        off = model.triplanes(model.encode(image[1:], source_motion[1:], motion_scale=0.0), driving_motion[1:])
    assert rel_err(planes_mixed[:1], on) < 16 * EPS32
    assert rel_err(planes_mixed[1:], off) < 16 * EPS32


def test_kernels_match_torch_backend(model, inputs, forward_out):
    reference = copy.deepcopy(model)
    reference.backend = "torch"
    with torch.no_grad():
        expected = reference(*inputs, generator=gen())
    # float32 throughout; importance-sample positions depend continuously on the coarse
    # weights, so rounding differences stay rounding-sized
    for key, value in forward_out.items():
        assert rel_err(value, expected[key]) < 64 * EPS32, key
    assert model.backend is None


def test_neck_warp(model, inputs, head):
    image, source_motion, driving_motion, cam = inputs
    codes = head.canonical_codes(2)
    with torch.no_grad():
        encoded = model.encode(image, source_motion)
        planes = model.triplanes(encoded, driving_motion)
        plain = model.render(planes, cam, background=encoded.background, generator=gen())
        still = model.render(planes, cam, background=encoded.background, codes=codes, generator=gen())
        codes["neck_pose"] = torch.tensor([[0.0, 0.5, 0.0]]).repeat(2, 1)
        turned = model.render(planes, cam, background=encoded.background, codes=codes, generator=gen())
    # a zero neck pose: the fine offsets are zero, so only rounding of the warp remains
    assert rel_err(still["image_feature"], plain["image_feature"]) < 1e-4
    assert rel_err(turned["image_feature"], plain["image_feature"]) > 1e-3


def test_gradients_reach_every_parameter(model, inputs):
    R = copy.deepcopy(model).train()
    image, source_motion, driving_motion, cam = inputs
    out = R(image[:1], source_motion[:1], driving_motion[:1], cam[:1], generator=gen())
    g = torch.Generator().manual_seed(4)
    loss = sum((out[k] * torch.randn(out[k].shape, generator=g)).sum()
               for k in ("image", "image_raw", "image_feature", "image_depth"))
    loss.backward()
    for name, p in R.named_parameters():
        if name.startswith("superresolution.") and name.endswith("noise_strength"):
            assert p.grad is None, name  # noise_mode='none', as upstream
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_save_load_round_trip(tmp_path, head):
    torch.manual_seed(2)
    R = randomize(Reconstructor(small_config(backend="torch"), head), 3)
    R.save(tmp_path / "r")
    loaded = Reconstructor.load(tmp_path / "r")
    assert loaded.config == R.config and loaded.backend == "torch"
    for (k, v), (k2, v2) in zip(R.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and v.dtype == v2.dtype and torch.equal(v, v2), k
    G = GenHead(GenHeadConfig(channel_base=256, channel_max=16, triplane_resolution=32, background_resolution=16,
                              background_channel_base=128, background_channel_max=16), head)
    G.save(tmp_path / "g")
    with pytest.raises(ValueError, match="head4d.GenHead.*not 'head4d.Reconstructor'"):
        Reconstructor.load(tmp_path / "g")


def test_bad_arguments(model, inputs):
    image, source_motion, driving_motion, cam = inputs
    with pytest.raises(ValueError, match=rf"source_image must be an RGB image batch \[B, 3, {SOURCE}, {SOURCE}\]"):
        model.encode(image[:, :1], source_motion)
    with pytest.raises(ValueError, match="source_image must be an RGB image batch"):
        model.encode(image[..., :32, :32], source_motion)
    with pytest.raises(ValueError, match=r"source_motion must have shape \[N, 548\] \(PD-FGC"):
        model.encode(image, source_motion[:, :109])
    with pytest.raises(ValueError, match="driving_motion must have shape"):
        model(image, source_motion, driving_motion[:, :100], cam)
    with pytest.raises(ValueError, match=r"camera must have shape \[N, 25\]"):
        model(image, source_motion, driving_motion, cam[:, :16])
    with pytest.raises(ValueError, match="motion_scale must be a number or a tensor of shape"):
        model.encode(image, source_motion, motion_scale=torch.ones(3))
    with pytest.raises(ValueError, match="at most 128"):
        model(image, source_motion, driving_motion, cam, neural_rendering_resolution=256)
    encoded = model.encode(image, source_motion)
    with pytest.raises(ValueError, match="multiple"):
        model.reenact(encoded, driving_motion[:1].repeat(3, 1), camera(3))
    with pytest.raises(ValueError, match="source_resolution must be a positive multiple of 16"):
        Reconstructor(ReconstructorConfig(source_resolution=100))
    with pytest.raises(TypeError, match="config must be a ReconstructorConfig"):
        Reconstructor(GenHeadConfig())


def test_flame_motion_config(head):
    R = Reconstructor(small_config(motion_dim=109, has_superresolution=False, has_background=False), head).eval()
    assert R.encoder_canonical.maps[0].weight.shape == (512, 109)
    image, source_motion, driving_motion, cam = inputs_of(R, b=1)
    with torch.no_grad():
        out = R(image, source_motion, driving_motion, cam, generator=gen())
    assert "image" not in out and "image_background" not in out
    assert out["image_raw"].shape == (1, 3, RES, RES)
