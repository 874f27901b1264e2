"""``head4d.models.GenHead``: Portrait4D's part-wise generator composed from head4d's modules.

- Upstream compatibility (full size, not run): the state-dict names, shapes, dtypes and
  parameter counts of ``backbone``, ``background``, ``superresolution`` and ``decoder``
  are upstream's (``tests/data/genhead_state_dict.txt`` and the decoder's six keys), and
  such a state dict loads as it is.
- A small GenHead (tiny channels and resolutions, few samples, the super-resolution's
  blocks narrowed at their upstream resolutions), random weights with non-zero biases,
  noise strengths and ``w_avg``:
  the full forward's shapes and value ranges; head4d's kernels against
  ``backend="torch"`` (every op on its reference) within float32 rounding (and the CUDA
  kernels, emulated, in the emulated process); ``render`` against the part/head blend
  and the background compositing written out from the parts; the fused decode against
  the unfused one; canonical
  codes leave the render equal to rendering without the warp; a neck rotation moves a
  density blob placed at the nose the right way in the opacity image; gradients reach
  every parameter; truncation; planes once then renders (batched cameras) equal the
  full forward; the named NVTX stages; argument errors.
"""
import copy
import math

import pytest
import torch

from head4d.head import ProceduralHead
from head4d.models import FlameCodes, GenHead, GenHeadConfig, clip_vertices
from head4d.ops import generate_rays, sample_triplanes
from head4d.render import TriplaneRenderer
from head4d.models import _common as models_common
from head4d.models import genhead as genhead_module

from conftest import require_backend
from genhead_testing import (SMALL_RES, camera, narrow_superresolution, randomize, small_genhead_config,
                             upstream_sections)
from head4d.models import GraphedRender

EPS32 = torch.finfo(torch.float32).eps
DECODER_KEYS = [("decoder.net.0.weight", (64, 32)), ("decoder.net.0.bias", (64,)),
                ("decoder.out_sigma.weight", (1, 64)), ("decoder.out_sigma.bias", (1,)),
                ("decoder.out_rgb.weight", (32, 64)), ("decoder.out_rgb.bias", (32,))]
RES = SMALL_RES  # neural rendering resolution of the small model


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


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


def posed_codes(head, n, seed=0):
    """Codes near the canonical ones: small shape, expression, jaw, eye and neck changes."""
    gen = torch.Generator().manual_seed(seed)
    codes = head.canonical_codes(n)
    codes["shape"] = 0.3 * torch.randn(n, 300, generator=gen)
    codes["expression"] = 0.3 * torch.randn(n, 100, generator=gen)
    codes["neck_pose"] = 0.1 * torch.randn(n, 3, generator=gen)
    codes["jaw_pose"] = codes["jaw_pose"] + 0.05 * torch.randn(n, 3, generator=gen)
    codes["eye_pose"] = 0.1 * torch.randn(n, 6, generator=gen)
    return codes


@pytest.fixture(scope="module")
def inputs(head):
    n = 2
    return torch.randn(n, 512, generator=torch.Generator().manual_seed(3)), camera(n), posed_codes(head, n)


@pytest.fixture(scope="module")
def forward_out(model, inputs):
    z, c, codes = inputs
    with torch.no_grad():
        return model(z, c, codes, generator=torch.Generator().manual_seed(7))


# ----------------------------------------------------------------------------------
# upstream names (full size, never run)
# ----------------------------------------------------------------------------------

def test_full_size_state_dict_is_upstreams(head):
    G = GenHead(head_model=head)
    assert G.config == GenHeadConfig() and G.num_ws == 14 and G.backbone.c_dim == 325
    assert G.background.num_ws == 10 and G.superresolution.use_ws_ones
    state = G.state_dict()
    sections = upstream_sections()
    for prefix, (num_keys, num_params, entries) in sections.items():
        mine = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items()
                if k.startswith(prefix + ".")]
        assert len(mine) == num_keys and mine == entries, f"{prefix}: {sorted(set(mine) ^ set(entries))[:6]}"
        assert sum(p.numel() for p in getattr(G, prefix).parameters()) == num_params
    assert [(k, tuple(v.shape)) for k, v in state.items() if k.startswith("decoder.")] == DECODER_KEYS
    # nothing else is in the state dict (the head model's arrays are non-persistent)
    assert len(state) == sum(s[0] for s in sections.values()) + len(DECODER_KEYS)
    assert sum(p.numel() for p in G.parameters()) == 54_985_537  # upstream's count without the deformer

    # an upstream-style state dict (random values, upstream's extra deformer / label keys) loads by name
    gen = torch.Generator().manual_seed(0)
    upstream = {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}
    upstream["deformer.flame_deform.flame_model.v_template"] = torch.zeros(5023, 3)
    upstream["dataset_label_std"] = torch.ones(25)
    result = G.load_state_dict(upstream, strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == ["dataset_label_std", "deformer.flame_deform.flame_model.v_template"]
    for key in ("backbone.synthesis.b256.torgb.weight", "background.mapping.fc7.bias",
                "superresolution.block1.conv1.affine.weight", "decoder.out_rgb.weight"):
        assert torch.equal(G.state_dict()[key], upstream[key])


def test_clip_vertices_inverts_the_rays():
    """Points on the ray through pixel (i, j) project to that pixel's centre in NDC (the
    rasterizer's convention: row 0 at the top), farther points to a larger NDC z."""
    r = 5
    cams = torch.cat([camera(1, yaw=0.4), camera(1, distance=3.0, yaw=-0.2)]).double()
    cams[1, 16 + 1] = 0.05  # some skew
    cams[1, 16 + 2] = 0.45  # an off-centre principal point
    c2w, k = cams[:, :16].reshape(2, 4, 4), cams[:, 16:].reshape(2, 3, 3)
    origins, directions = generate_rays(c2w, k, r, convention="opengl")
    t = torch.tensor([2.0, 4.0])
    points = origins[:, :, None] + t[None, None, :, None].double() * directions[:, :, None]  # [2, R*R, 2, 3]
    clip = clip_vertices(points.reshape(2, -1, 3), c2w, k).reshape(2, r * r, 2, 4)
    ndc = clip[..., :3] / clip[..., 3:]
    i, j = torch.arange(r).repeat_interleave(r), torch.arange(r).repeat(r)
    expected = torch.stack([-1 + (2 * j + 1) / r, 1 - (2 * i + 1) / r], dim=-1).double()
    torch.testing.assert_close(ndc[..., 0, :2], expected.expand(2, -1, -1))
    torch.testing.assert_close(ndc[..., 1, :2], expected.expand(2, -1, -1))
    assert (ndc[..., 1, 2] > ndc[..., 0, 2]).all() and (clip[..., 3] > 0).all()
    with pytest.raises(ValueError, match="clip_vertices: expected vertices"):
        clip_vertices(points.reshape(2, -1, 3), c2w[:1], k)


# ----------------------------------------------------------------------------------
# the small model
# ----------------------------------------------------------------------------------

def test_forward_shapes_and_ranges(forward_out, model):
    out = forward_out
    n = 2
    shapes = {"image": (n, 3, 512, 512), "image_raw": (n, 3, RES, RES), "image_depth": (n, 1, RES, RES),
              "image_feature": (n, 32, RES, RES), "opacity": (n, 1, RES, RES), "eye_mask": (n, 1, RES, RES),
              "mouth_mask": (n, 1, RES, RES), "ws": (n, 14 - 6, 512)}
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    for key, value in out.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
    # features in (-0.001, 1.001) and a background in (0, 1), composited to sum 1, then * 2 - 1
    assert out["image_feature"].abs().max() <= 1.002 + 1e-5
    assert torch.equal(out["image_raw"], out["image_feature"][:, :3])
    assert (out["opacity"] >= 0).all() and (out["opacity"] <= 1 + 1e-6).all() and out["opacity"].max() > 0.1
    # 'auto-plane' depths: camera distance 4 +- box_warp / 2
    assert (out["image_depth"] >= 4 - 0.65 - 1e-4).all() and (out["image_depth"] <= 4 + 0.65 + 1e-4).all()
    for key in ("eye_mask", "mouth_mask"):
        assert (out[key] >= 0).all() and (out[key] <= 1 + 1e-6).all()
    # the posed procedural head's lips cover some pixels around the image centre
    assert out["mouth_mask"].max() > 0.2
    assert out["image"].std() > 0


def test_kernels_match_torch_backend(model, inputs, forward_out):
    z, c, codes = inputs
    reference = copy.deepcopy(model)
    reference.backend = "torch"
    assert all(layer.backend == "torch" for layer in reference.modules() if hasattr(layer, "_backend"))
    with torch.no_grad():
        expected = reference(z, c, codes, generator=torch.Generator().manual_seed(7))
    # float32 throughout; the sample positions of the importance pass depend continuously
    # on the coarse weights, so rounding differences stay rounding-sized
    for key, value in forward_out.items():
        assert rel_err(value, expected[key]) < 64 * EPS32, key  # measured: under 3 eps
    assert model.backend is None


@pytest.mark.emulated
def test_emulated_cuda_kernels_match_torch_backend(model, head):
    """Every op of a render on head4d's CUDA kernels (run on the CPU by the emulation)
    against the references; one image, no super-resolution (its kernels are tested with
    the StyleGAN2 networks)."""
    require_backend("cuda_emulated")
    G = copy.copy(model)
    G._modules = dict(model._modules)
    G._modules["superresolution"] = None
    planes = torch.randn(1, 6, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    codes = posed_codes(head, 1)
    results = {}
    for backend in ("cuda_emulated", "torch"):
        G.backend = backend
        with torch.no_grad():
            results[backend] = G.render(planes, camera(1), codes, neural_rendering_resolution=8,
                                        generator=torch.Generator().manual_seed(1))
    G.backend = None
    for key, value in results["cuda_emulated"].items():
        assert rel_err(value, results["torch"][key]) < 64 * EPS32, key


def test_fused_decode_matches_unfused(model, head, monkeypatch):
    """Each triplane decoded by the fused decode_triplanes or by sample_triplanes + decoder:
    the same render (the training's samples included) and gradients, to float32 rounding."""
    calls = []
    real = models_common.decode_triplanes
    monkeypatch.setattr(models_common, "decode_triplanes", lambda *a, **k: calls.append(1) or real(*a, **k))
    G = copy.deepcopy(model)
    G.superresolution = None
    codes = posed_codes(head, 1)
    results = {}
    for fused in (False, True):
        G.config.fused = fused
        G.zero_grad(set_to_none=True)
        planes = torch.randn(1, 6, 32, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        out = G.render(planes, camera(1), codes, neural_rendering_resolution=8,
                       generator=torch.Generator().manual_seed(1), return_samples=True)
        gen = torch.Generator().manual_seed(2)
        sum((t * torch.randn(t.shape, generator=gen)).sum() for k, t in out.items() if t.requires_grad).backward()
        results[fused] = (out, planes.grad, {k: p.grad for k, p in G.decoder.named_parameters()})
    assert len(calls) == 4  # fused: both triplanes, coarse and fine passes
    assert {"sample_depths", "sample_weights", "head_density_eye", "head_density_mouth"} <= set(results[True][0])
    (out_u, planes_u, dec_u), (out_f, planes_f, dec_f) = results[False], results[True]
    for key in out_u:
        assert rel_err(out_f[key], out_u[key]) < 64 * EPS32, key
    assert rel_err(planes_f, planes_u) < 64 * EPS32
    for name in dec_u:
        assert rel_err(dec_f[name], dec_u[name]) < 64 * EPS32, name


def test_fused_training_step_matches_torch_backend(model, inputs, monkeypatch):
    """The configuration of the memory goal (``fused=True``: both triplanes decoded by
    decode_triplanes, coarse and fine) through the whole forward and backward: the outputs
    and every parameter's gradient equal the unfused path's on the same kernels to float32
    rounding, and the reference composition's (``backend="torch"``, decoded unfused) as
    closely as the unfused path does; it saves less for the backward than either."""
    calls = []
    real = models_common.decode_triplanes
    monkeypatch.setattr(models_common, "decode_triplanes", lambda *a, **k: calls.append(1) or real(*a, **k))
    z, c, codes = inputs
    keys = ("image", "image_raw", "image_feature", "image_depth", "opacity")
    results = {}
    for name, backend, fused in (("torch", "torch", None), ("unfused", None, False), ("fused", None, True)):
        G = copy.deepcopy(model)
        G.backend, G.config.fused = backend, fused
        saved = {}

        def pack(t):
            saved[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = G(z, c, codes, generator=torch.Generator().manual_seed(5))
        gen = torch.Generator().manual_seed(6)
        sum((out[k] * torch.randn(out[k].shape, generator=gen)).sum() for k in keys).backward()
        grads = {k: p.grad for k, p in G.named_parameters() if p.grad is not None}
        results[name] = ({k: out[k].detach() for k in keys}, grads, sum(saved.values()))
    assert len(calls) == 4  # fused only: both triplanes, coarse and fine passes
    (out_t, grads_t, saved_t), (out_u, grads_u, saved_u), (out_f, grads_f, saved_f) = results.values()
    assert set(grads_f) == set(grads_u) == set(grads_t) and len(grads_t) > 100
    for key in keys:
        assert rel_err(out_f[key], out_u[key]) < 64 * EPS32, key
        assert rel_err(out_f[key], out_t[key]) < 64 * EPS32, key
    for name in grads_t:
        # the decode is the only difference: measured under 30 eps (a noise strength's sum)
        assert rel_err(grads_f[name], grads_u[name]) < 64 * EPS32, name
        # against the reference: the unfused path's own distance (head4d's kernels elsewhere,
        # up to 3.4e-4 measured on the super-resolution's 512^2 sums) plus the decode's
        # share above (the triangle inequality)
        assert rel_err(grads_f[name], grads_t[name]) <= rel_err(grads_u[name], grads_t[name]) + 64 * EPS32, name
    assert saved_f < saved_u < saved_t


def test_render_samples_match_torch_backend_and_change_nothing_else(model, head):
    """``return_samples=True`` adds the training's samples (shapes and dtypes as documented)
    and leaves every other output bit-identical; on head4d's kernels they equal the
    reference composition's (``backend="torch"``) to float32 rounding; the weights of each
    ray sum to its opacity; without it, no extra key. (Their values against a computation
    written out: ``tests/test_train_genhead.py``.)"""
    G = copy.deepcopy(model)
    G.superresolution = None
    planes = torch.randn(1, 6, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    codes, r = posed_codes(head, 1), 8
    results = {}
    with torch.no_grad():
        for backend in (None, "torch"):
            G.backend = backend
            for samples in (False, True):
                results[backend, samples] = G.render(planes, camera(1), codes, neural_rendering_resolution=r,
                                                     generator=torch.Generator().manual_seed(1),
                                                     return_samples=samples)
    G.backend = None
    plain, full = results[None, False], results[None, True]
    new = {"sample_depths", "sample_weights", "head_density_eye", "head_density_mouth"}
    assert set(full) == set(plain) | new and not new & set(plain)
    for key in plain:
        assert torch.equal(full[key], plain[key]), key
    s = 8 + 8
    shapes = {"sample_depths": (1, r * r, s), "sample_weights": (1, r * r, s - 1), "head_density_eye": (1, r * r, s),
              "head_density_mouth": (1, r * r, s)}
    for key, shape in shapes.items():
        assert full[key].shape == shape and full[key].dtype == torch.float32, key
    assert torch.all(full["sample_depths"][..., 1:] >= full["sample_depths"][..., :-1])
    torch.testing.assert_close(full["sample_weights"].sum(-1).reshape(1, 1, r, r), full["opacity"], rtol=0, atol=0)
    for key in full:
        assert rel_err(full[key], results["torch", True][key]) < 64 * EPS32, key
    with pytest.raises(TypeError, match="return_samples must be a bool"):
        G.render(planes, camera(1), codes, neural_rendering_resolution=r, return_samples=1)


@pytest.mark.parametrize("r", [RES, 66])
def test_render_equals_plain_composition(model, head, r):
    """``render`` against the blend written out here from the parts (the warp, the
    reference triplane sampling, the decoder, TriplaneRenderer with a point field), with
    masks made up so that both the eye and the mouth terms weigh in, and a background.
    At 66 (above 64) the rays inside the hard mouth mask add the two densities and mix
    the features by a softmax over them; the others keep the blend of 64 and below."""
    G = copy.copy(model)
    G._modules = dict(model._modules)
    G._modules["superresolution"] = None
    gen = torch.Generator().manual_seed(0)
    eye = (torch.rand(1, 1, r, r, generator=gen) - 0.3).clamp(0, 1)
    mouth = (torch.rand(1, 1, r, r, generator=gen) - 0.5).clamp(0, 1) * (1 - eye)
    G.masks = lambda codes, camera, resolution: {"eye_mask": eye, "mouth_mask": mouth}
    planes = torch.randn(1, 6, 32, 16, 16, generator=gen)
    background = torch.rand(1, 32, 5, 5, generator=gen)
    codes, cam = posed_codes(head, 1), camera(1)
    with torch.no_grad():
        got = G.render(planes, cam, codes, background=background, neural_rendering_resolution=r,
                       generator=torch.Generator().manual_seed(1))

        fields = G.deformation.build(**codes)
        e_ray, m_ray = eye.reshape(1, r * r), mouth.reshape(1, r * r)
        inside_counts, fused_counts = [], []

        def field(points, directions):
            per_ray = points.shape[1] // (r * r)
            e = e_ray.repeat_interleave(per_ray, 1)[..., None]
            m = m_ray.repeat_interleave(per_ray, 1)[..., None]
            w = G.deformation.warp(points, fields)
            inbox = w.inside_eye_box[..., None].float()
            inside_counts.append(int(inbox.sum()))
            part_points = torch.where(m > 0, w.mouth, w.eyes)
            decode = lambda p, x: G.decoder(sample_triplanes(p, x, box_warp=1.3, plane_layout="portrait4d",  # noqa
                                                             backend="torch"))
            head_out, part_out = decode(planes[:, 3:], w.head), decode(planes[:, :3], part_points)
            part_sigma = part_out["sigma"] * (inbox + m)
            sigma = part_sigma * (e * inbox) + part_sigma * m + head_out["sigma"] * (1 - e * inbox - m)
            rgb = part_out["rgb"] * (e * inbox) + part_out["rgb"] * m + head_out["rgb"] * (1 - e * inbox - m)
            if r > 64:
                hard = (m > 0).float()
                mix = torch.softmax(torch.stack([part_sigma, head_out["sigma"]], dim=-1), dim=-1)
                fused_rgb = mix[..., 0] * part_out["rgb"] + mix[..., 1] * head_out["rgb"]
                sigma = sigma * (1 - hard) + (part_sigma + head_out["sigma"]) * hard
                rgb = rgb * (1 - hard) + fused_rgb * hard
                fused_counts.append(int(hard.sum()))
            return {"rgb": rgb, "sigma": sigma}

        c2w, k = cam[:, :16].reshape(1, 4, 4), cam[:, 16:].reshape(1, 3, 3)
        origins, directions = generate_rays(c2w, k, r, convention="opengl")
        bg = torch.nn.functional.interpolate(background, size=(r, r), mode="bilinear", align_corners=False)
        options = dict(box_warp=1.3, ray_start="auto-plane", ray_end="auto-plane", depth_resolution=8,
                       depth_resolution_importance=8, plane_layout="portrait4d")
        features, depth, opacity = TriplaneRenderer("portrait4d")(
            field, None, origins, directions, options, background=bg.permute(0, 2, 3, 1).reshape(1, r * r, 32),
            generator=torch.Generator().manual_seed(1), cam2world=c2w)
    assert sum(inside_counts) > 0  # some samples are inside the eye boxes
    if r > 64:  # some rays, not all, take the fused rule
        assert 0 < sum(fused_counts) < r * r * (8 + 8)
    image = lambda t: t.permute(0, 2, 1).reshape(1, t.shape[-1], r, r)  # noqa: E731
    expected = {"image_feature": image(features), "image_depth": image(depth), "opacity": image(opacity)}
    for key, value in expected.items():
        assert rel_err(got[key], value) < 64 * EPS32, key
    # the background adds T_bg * background before * 2 - 1
    with torch.no_grad():
        bare = G.render(planes, cam, codes, neural_rendering_resolution=r, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got["image_feature"] - bare["image_feature"], 2 * (1 - bare["opacity"]) * bg,
                               rtol=0, atol=16 * EPS32)


def test_canonical_codes_render_as_without_warp(model, head):
    """At the canonical codes the deformation is the identity, so the render equals the
    canonical planes rendered at the observation points directly (masks and blend as is)."""
    torch.manual_seed(5)
    planes = torch.randn(1, 6, 32, 16, 16)
    ws = torch.randn(1, 14 - 6, 512)
    codes = head.canonical_codes(1)
    with torch.no_grad():
        warped = model.render(planes, camera(1), codes, ws=ws, generator=torch.Generator().manual_seed(2))
        direct = model.render(planes, camera(1), codes, ws=ws, generator=torch.Generator().manual_seed(2),
                              deform=False)
    # the warp is the identity to ~1e-5 in position (float32 grids and one-ring sums);
    # features vary by at most |plane values| * resolution / box per unit length
    for key in ("image_raw", "image_feature", "opacity", "image_depth"):
        assert rel_err(warped[key], direct[key]) < 1e-4, key
    assert torch.equal(warped["mouth_mask"], direct["mouth_mask"])


def nose_blob(model, head, planes_resolution=48, sigma=0.1):
    """Planes and decoder weights whose density is a blob at the head's nose: each plane's
    channel 0 is a Gaussian of its two coordinates about the nose, the decoder's density is
    ``softplus(100 (mean - 0.7)) - 10``."""
    canon = head.canonical_vertices()[head.face_indices]
    nose = canon[canon[:, 2].argmax()] - torch.tensor([0.0, 0.0, 0.05])
    half = model.config.box_warp / 2
    u = (torch.arange(planes_resolution) * 2 + 1) / planes_resolution - 1  # pixel centres in [-1, 1]
    coord = u * half
    planes = torch.zeros(1, 6, 32, planes_resolution, planes_resolution)
    # layout 'portrait4d': (x, y), (y, z), (z, x); the first coordinate indexes the width
    for k, (a, b) in enumerate(((0, 1), (1, 2), (2, 0))):
        g = torch.exp(-((coord[None, :] - nose[a]) ** 2 + (coord[:, None] - nose[b]) ** 2) / (2 * sigma ** 2))
        planes[0, k, 0] = planes[0, 3 + k, 0] = g
    decoder = copy.deepcopy(model.decoder)
    with torch.no_grad():
        for p in decoder.parameters():
            p.zero_()
        decoder.net[0].weight[0, 0] = 100 * math.sqrt(32)
        decoder.net[0].bias[0] = -70
        decoder.out_sigma.weight[0, 0] = math.sqrt(64)
        decoder.out_sigma.bias[0] = -10
    return planes, decoder


def centroid_x(opacity):
    weights = opacity[:, 0]
    cols = torch.arange(weights.shape[-1], dtype=weights.dtype)
    return ((weights * cols).sum() / weights.sum()).item()


def test_neck_rotation_rotates_the_head(model, head):
    planes, decoder = nose_blob(model, head)
    G = copy.copy(model)  # shares the modules but the decoder
    G._modules = dict(model._modules)
    G._modules["decoder"] = decoder
    ws = torch.zeros(1, 14 - 6, 512)
    centres, opacities = {}, {}
    for yaw in (-0.3, 0.0, 0.3):
        codes = head.canonical_codes(1)
        codes["neck_pose"][0, 1] = yaw
        with torch.no_grad():
            out = G.render(planes, camera(1), codes, ws=ws, generator=torch.Generator().manual_seed(0))
        opacities[yaw] = out["opacity"]
        centres[yaw] = centroid_x(out["opacity"])
    assert opacities[0.0].max() > 0.5  # the blob renders
    assert (opacities[0.3] - opacities[0.0]).abs().max() > 0.3
    # a positive yaw about +y turns the nose (+z) towards +x: to the right in the image
    # (columns run along the camera's right, +x for this camera); the nose is ~0.4 in
    # front of the neck joint, so it moves by about 0.4 sin(0.3) * focal / distance of
    # the image width (~1.7 pixels at 12)
    shift = 0.4 * math.sin(0.3) * 4.757 / 4 * RES
    assert centres[0.3] - centres[0.0] > 0.5 * shift
    assert centres[0.0] - centres[-0.3] > 0.5 * shift
    assert abs(centres[0.0] - (RES - 1) / 2) < 1.0  # the canonical nose is in the middle


def test_gradients_reach_every_parameter(model, inputs):
    z, c, codes = inputs
    G = copy.deepcopy(model).train()
    out = G(z[:1], c[:1], {k: v[:1] for k, v in codes.items()}, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(4)
    loss = sum((out[k] * torch.randn(out[k].shape, generator=gen)).sum()
               for k in ("image", "image_raw", "image_feature", "image_depth"))
    loss.backward()
    for name, p in G.named_parameters():
        if name.startswith("superresolution.") and name.endswith("noise_strength"):
            # the super-resolution runs with noise_mode='none' (as upstream): no gradient
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_truncation(model, inputs, head):
    z, c, codes = inputs
    cond = model.condition(c, codes["shape"])
    assert torch.equal(cond, torch.cat([c, codes["shape"]], dim=1))
    w_avg = model.backbone.mapping.w_avg
    with torch.no_grad():
        ws = model.mapping(z, cond)
        assert torch.allclose(model.mapping(z, cond, truncation_psi=0), w_avg.expand_as(ws))
        half = model.mapping(z, cond, truncation_psi=0.5, truncation_cutoff=3)
        torch.testing.assert_close(half[:, :3], w_avg + 0.5 * (ws[:, :3] - w_avg))
        assert torch.equal(half[:, 3:], ws[:, 3:])
        small = copy.deepcopy(model)
        small.superresolution = None
        out = small(z, c, codes, truncation_psi=0.5, truncation_cutoff=3, neural_rendering_resolution=4,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["ws"], half) and "image" not in out


def test_planes_once_then_render(model, inputs, forward_out, monkeypatch):
    z, c, codes = inputs
    ranges = []
    real = genhead_module.nvtx_range

    def recording(name):
        ranges.append(name)
        return real(name)

    monkeypatch.setattr(genhead_module, "nvtx_range", recording)
    with torch.no_grad():
        ws = model.mapping(z, model.condition(c, codes["shape"]))
        planes = model.planes(ws)
        background = model.background_image(z)
        out = model.render(planes, c, codes, ws=ws, background=background, generator=torch.Generator().manual_seed(7))
    for key, value in out.items():
        assert torch.equal(value, forward_out[key]), key
    assert planes.shape == (2, 6, 32, 32, 32)
    for stage in ("mapping", "backbone", "background", "deformation", "masks", "rays", "raymarch", "field",
                  "decode", "blend", "superresolution"):
        assert f"head4d.genhead.{stage}" in ranges, stage

    # batched cameras: identity b's K views are rows b * K + k; the same as repeating the planes
    monkeypatch.setattr(genhead_module, "nvtx_range", real)
    cams = torch.cat([camera(1), camera(1, yaw=0.2), camera(1, distance=4.3)])
    one = {k: v[:1] for k, v in codes.items()}
    with torch.no_grad():
        batched = model.render(planes[:1], cams, one, neural_rendering_resolution=6, ws=ws[:1],
                               background=background[:1], generator=torch.Generator().manual_seed(1))
        repeated = model.render(planes[:1].repeat(3, 1, 1, 1, 1), cams, FlameCodes.of(one).repeat_interleave(3),
                                neural_rendering_resolution=6, ws=ws[:1].repeat(3, 1, 1),
                                background=background[:1].repeat(3, 1, 1, 1),
                                generator=torch.Generator().manual_seed(1))
        flat = model.render(planes[:1].flatten(1, 2), cams, one, neural_rendering_resolution=6, ws=ws[:1],
                            background=background[:1], generator=torch.Generator().manual_seed(1))
    for key, value in batched.items():
        assert torch.equal(value, repeated[key]) and torch.equal(value, flat[key]), key
    assert (batched["image_raw"][0] - batched["image_raw"][1]).abs().max() > 1e-3


def test_bad_arguments(model, inputs, head):
    z, c, codes = inputs
    planes = torch.zeros(1, 6, 32, 8, 8)
    with pytest.raises(ValueError, match=r"GenHead: c must have shape \[N, 25\]"):
        model(z, torch.zeros(2, 325), codes)
    with pytest.raises(ValueError, match="codes lacks"):
        model.render(planes, c[:1], {"shape": codes["shape"][:1]})
    with pytest.raises(TypeError, match="codes must be a FlameCodes"):
        model.render(planes, c[:1], [1, 2])
    with pytest.raises(ValueError, match="neural_rendering_resolution must be at most 128"):
        model.render(planes, c[:1], {k: v[:1] for k, v in codes.items()}, neural_rendering_resolution=130)
    with pytest.raises(ValueError, match=r"planes must have shape \[B, 6, 32, H, W\]"):
        model.render(torch.zeros(1, 5, 32, 8, 8), c[:1], {k: v[:1] for k, v in codes.items()})
    with pytest.raises(ValueError, match="must be a multiple"):
        model.render(torch.zeros(2, 6, 32, 8, 8), c[:1].repeat(3, 1), {k: v[:1] for k, v in codes.items()})
    with pytest.raises(ValueError, match="ws .* is needed for the super-resolution"):
        model.render(planes, c[:1], {k: v[:1] for k, v in codes.items()})
    with pytest.raises(ValueError, match="backend must be"):
        model.backend = "fastest"
    with pytest.raises(TypeError, match="head_model must be a head4d.head.HeadModel"):
        GenHead(small_config(), head_model="flame")
    with pytest.raises(ValueError, match="triplane_channels must be a multiple of 6"):
        GenHead(small_config(triplane_channels=100), head)


@pytest.mark.gpu
def test_graphed_render_replays_the_eager_render(model, head):
    """``render_graphed``: a CUDA graph of ``render`` (with the super-resolution and a
    background) replays what an eager call seeded alike renders, for new cameras and codes."""
    require_backend("cuda")
    dev = torch.device("cuda")
    G = copy.deepcopy(model).to(dev)
    gen = torch.Generator().manual_seed(0)
    planes = torch.randn(1, 6, 32, 16, 16, generator=gen).to(dev)
    ws = torch.randn(1, G.num_ws, 512, generator=gen).to(dev)
    background = torch.rand(1, 32, 16, 16, generator=gen).to(dev)
    on_device = lambda codes: {k: v.to(dev) for k, v in codes.items()}  # noqa: E731
    graphed = G.render_graphed(planes, camera(1).to(dev), on_device(posed_codes(head, 1)), ws=ws,
                               background=background)
    images = []
    for cam, codes in ((camera(1), posed_codes(head, 1)), (camera(1, yaw=0.2), posed_codes(head, 1, seed=3))):
        cam, codes = cam.to(dev), on_device(codes)
        torch.cuda.manual_seed(11)
        with torch.no_grad():
            eager = G.render(planes, cam, codes, ws=ws, background=background)
        torch.cuda.manual_seed(11)
        got = graphed(cam, codes)
        torch.cuda.synchronize()
        for key, value in eager.items():
            assert rel_err(got[key], value) < 64 * EPS32, key
        images.append(got["image_raw"].clone())
    assert (images[0] - images[1]).abs().max() > 1e-3


def test_graphed_render_needs_cuda_and_the_captured_shapes(model, head):
    with pytest.raises(ValueError, match="GraphedRender: a CUDA graph needs CUDA tensors; camera is on cpu"):
        model.render_graphed(torch.zeros(1, 6, 32, 8, 8), camera(1), posed_codes(head, 1))
    with pytest.raises(TypeError, match="GraphedRender: model must be a GenHead"):
        GraphedRender(torch.nn.Linear(1, 1), torch.zeros(1, 6, 32, 8, 8), camera(1), posed_codes(head, 1))
    # the argument checks of a replay, on a stand-in that skips the capture
    stand_in = GraphedRender.__new__(GraphedRender)
    stand_in.inputs = {"camera": torch.zeros(1, 25), "planes": torch.zeros(1, 6, 32, 8, 8), "ws": None,
                       "background": None}
    stand_in.codes = {k: v.clone() for k, v in posed_codes(head, 1).items()}
    with pytest.raises(ValueError, match=r"camera must have the captured shape \[1, 25\], got \[2, 25\]"):
        stand_in(camera(2), posed_codes(head, 1))
    with pytest.raises(ValueError, match="ws was None at capture"):
        stand_in(camera(1), posed_codes(head, 1), ws=torch.zeros(1, 8, 512))
