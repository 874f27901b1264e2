"""``head4d.train``: GenHead's GAN training and the pieces shared by the trainings.

All on the CPU with the tiny configuration (``GenHeadTrainingConfig.small``: a 16^2
GenHead without super-resolution and a 16^2 discriminator) on a dataset built here in
memory (uint8 images and 437-number labels, as ``head4d.data.ImageLabelDataset`` yields).

- Two training steps: finite losses (every ``Gmain`` term named), the phases of each step (``Greg`` and ``Dreg`` on step
  0, not on step 1), weights moved, the EMA generator at the hand-computed EMA of ``G``.
- The discriminator loss on fixed real and fake inputs falls over 20 steps and ends with
  the real logits above the fake ones (a flipped sign would fail this).
- R1 (``r1_penalty``) against a plain autograd computation written here on a float64 copy
  of a discriminator with a super-resolution input, the four gammas distinct, without and
  with the fade's blur (gradients with respect to the unblurred image, the blur written
  here with ``F.conv2d``); the penalty's parameter gradients (double backward) too.
- The six part-region terms of ``Gmain`` (``part_region_losses`` on ``GenHead.render(...,
  return_samples=True)``) against the same terms computed in float64 from what a point
  field written here records in the same render (head densities in the eye boxes and the
  mouth, sample depths, the compositing weights written out, the distortion loss by its
  pairwise definition); each term reaches the planes.
- The density regularizer (``density_tv_loss``) against the reads written here through the
  codes' warp (not the unwarped value); the trainer's ``Greg`` term is it times
  ``density_reg`` on upstream's points.
- The lazy schedule and the adjusted Adam settings; the EMA decay and update by hand; the
  blur fade, the swap probability and upstream's batch scaling of their lengths by hand;
  each phase draws its own fakes.
- A checkpoint round trip: a run resumed from step 1 takes the same step 2 (losses and
  weights bit-exact); a write that fails after its temporary file exists leaves the
  previous checkpoint loadable and no temporary file; bad checkpoints are clear errors.
- Foreground masks: ``BatchStream`` passes a third item field through (0 and 2 workers);
  with ``head4d make-dataset``'s masks the real seg is ``mask / 127.5 - 1`` (resized like
  the image to the discriminator's resolution); without masks it is all ones, with one warning.
- ``head4d train genhead --small --dry-run`` writes the checkpoint after two steps and the
  EMA generator (``GenHead.load`` reads the checkpoint's EMA weights back), prints progress
  lines and logs (TensorBoard events, ``log.jsonl``, image grids of the reals and, with
  ``--image-every 1``, of the EMA generator after each step; a data worker process);
  ``--resume`` continues from it (and replaces the export), and from a version-1
  ``checkpoint.pt`` in a folder without the safetensors checkpoint.
- Gradient averaging over two processes (a gradient missing on one rank counts as zero,
  one missing everywhere stays missing); a mapping network's ``w_avg`` averaged over them,
  its weights left alone.
- ``torchrun --standalone --nproc_per_node 2`` (gloo) runs two steps on different data per
  rank; the ranks hold identical, changed weights after them (digests of their state dicts,
  equal to those of rank 0's checkpoint).
"""
import copy
import math
import os
import socket
import warnings

import pytest
import torch
import torch.nn.functional as F

import head4d.nn as hnn
from head4d.cli import main as cli_main
from head4d.train import common
from head4d.train.genhead import GenHeadTrainer, GenHeadTrainingConfig, r1_penalty

from head4d.render import TriplaneRenderer

from genhead_testing import camera, make_dataset, randomize
from torchrun_training import run_under_torchrun, state_digest

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def dataset():
    return make_dataset()


def flat_parameters(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_two_steps_finite_losses_phases_and_ema(dataset):
    # EMA half-life 2 images, no ramp-up: beta = 0.5 ** (2 / 2) = 0.5 on every step
    trainer = GenHeadTrainer(GenHeadTrainingConfig.small(ema_kimg=0.002, ema_rampup=None), dataset)
    g0, d0 = flat_parameters(trainer.G), flat_parameters(trainer.D)
    w_avg0 = trainer.G.backbone.mapping.w_avg.clone()
    bg_w_avg0 = trainer.G.background.mapping.w_avg.clone()
    assert torch.equal(flat_parameters(trainer.G_ema), g0)
    first = trainer.step()
    g1, ema1 = flat_parameters(trainer.G), flat_parameters(trainer.G_ema)
    assert torch.allclose(ema1, g1 + 0.5 * (g0 - g1), rtol=4 * EPS32, atol=4 * EPS32)
    gmain = {"Loss/G/loss"} | {f"Loss/G/loss_{name}" for name in ("face_eye", "eye_density", "eye_T", "face_mouth",
                                                                   "mouth_density", "mouth_T")}
    assert set(first) == gmain | {"Loss/G/TVloss", "Loss/D/loss", "Loss/D/reg"}
    second = trainer.step()
    assert set(second) == gmain | {"Loss/D/loss"}
    for losses in (first, second):
        assert all(math.isfinite(v) for v in losses.values()), losses
    assert trainer.step_index == 2 and trainer.cur_nimg == 4
    g, d = flat_parameters(trainer.G), flat_parameters(trainer.D)
    assert not torch.equal(g, g1) and not torch.equal(g1, g0) and not torch.equal(d, d0)
    assert torch.allclose(flat_parameters(trainer.G_ema), g + 0.5 * (ema1 - g), rtol=4 * EPS32, atol=4 * EPS32)
    # Dmain's generator pass tracks the backbone's w_avg (not the background's), G_ema copies it
    assert not torch.equal(trainer.G.backbone.mapping.w_avg, w_avg0)
    assert torch.equal(trainer.G.background.mapping.w_avg, bg_w_avg0)
    assert torch.equal(trainer.G_ema.backbone.mapping.w_avg, trainer.G.backbone.mapping.w_avg)


def test_ema_copies_on_the_first_step_with_rampup(dataset):
    """StyleGAN2's decay uses the images seen before the step: 0 on the first step with a
    ramp-up, so G_ema is then a copy of G."""
    trainer = GenHeadTrainer(GenHeadTrainingConfig.small(), dataset)
    trainer.step()
    assert torch.equal(flat_parameters(trainer.G_ema), flat_parameters(trainer.G))


def test_discriminator_loss_falls_on_fixed_data(dataset):
    trainer = GenHeadTrainer(GenHeadTrainingConfig.small(), dataset)
    batch = trainer.sample_batch()
    real_c = batch["real_labels"][:, :25]
    fake_c = batch["gen_labels"][2, :, :25]
    with torch.no_grad():
        fake = trainer.run_G(batch["gen_z"][2], batch["gen_labels"][2], 0.5)
    fake = {k: fake[k] for k in ("image", "uv", "seg")}
    real = trainer.real_inputs(batch, 0.0)
    losses = []
    for _ in range(20):
        trainer.D_opt.zero_grad(set_to_none=True)
        loss = trainer.discriminator_loss(real, real_c, fake, fake_c, 0.0)
        loss.backward()
        trainer.D_opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        assert (trainer.run_D(real, real_c, 0.0).min() > trainer.run_D(fake, fake_c, 0.0).max())


def _small_sr_discriminator():
    torch.manual_seed(3)
    D = hnn.DualDiscriminatorDeform(c_dim=25, img_resolution=16, channel_base=256, channel_max=16, num_fp16_res=0)
    with torch.no_grad():
        for name, p in D.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape))
    return D


def _plain_blur(image, sigma):
    """The blur fade written out: the separable kernel ``2^(-(k / sigma)^2)``, ``k = -r..r``,
    ``r = floor(3 sigma)``, normalised, zero padding."""
    r = math.floor(3 * sigma)
    k = torch.arange(-r, r + 1, dtype=image.dtype).div(sigma).square().neg().exp2()
    k = k / k.sum()
    c = image.shape[1]
    image = F.conv2d(image, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), padding=(0, r), groups=c)
    return F.conv2d(image, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), padding=(r, 0), groups=c)


@pytest.mark.parametrize("blur_sigma", [0.0, 0.7])
def test_r1_penalty_equals_plain_autograd(blur_sigma):
    D = _small_sr_discriminator()
    gen = torch.Generator().manual_seed(5)
    img = {"image_sr": torch.randn(4, 3, 16, 16, generator=gen), "image": torch.randn(4, 3, 8, 8, generator=gen),
           "uv": torch.randn(4, 3, 16, 16, generator=gen), "seg": torch.randn(4, 1, 8, 8, generator=gen)}
    c = camera(4)
    gammas = (2.0, 5.0, 7.0)
    logits, penalty = r1_penalty(D, img, c, *gammas, blur_sigma=blur_sigma)
    penalty.mean().backward()
    grads = {n: p.grad.clone() for n, p in D.named_parameters() if p.grad is not None}

    # Reference: a float64 copy on the plain-torch ops (its epilogue computes in float32, as
    # the discriminator always does), the gradients taken one by one.
    ref = hnn.set_stylegan2_backend(copy.deepcopy(D).double(), "torch")
    ref.zero_grad(set_to_none=True)
    inputs = {k: v.double().requires_grad_(True) for k, v in img.items()}
    blurred = dict(inputs, image_sr=_plain_blur(inputs["image_sr"], blur_sigma) if blur_sigma else inputs["image_sr"])
    ref_logits = ref(blurred, c.double())
    g_sr, g_raw, g_uv, g_seg = torch.autograd.grad(ref_logits.sum(), [inputs[k] for k in ("image_sr", "image", "uv",
                                                                                          "seg")], create_graph=True)
    ref_penalty = (g_sr.square().sum([1, 2, 3]) + g_raw.square().sum([1, 2, 3])) * gammas[0] / 2 \
        + g_uv.square().sum([1, 2, 3]) * gammas[1] / 2 + g_seg.square().sum([1, 2, 3]) * gammas[2] / 2
    ref_penalty.mean().backward()
    tol = 1e3 * EPS32  # float32 against float64 through a double backward of ~10 layers
    logits, ref_logits = logits.detach().double(), ref_logits.detach().double()
    ref_penalty = ref_penalty.detach().double()
    assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()) < tol
    assert torch.all(ref_penalty > 0)
    assert ((penalty.detach().double() - ref_penalty).abs().max() / ref_penalty.abs().max()) < tol
    ref_grads = {n: p.grad.double() for n, p in ref.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads)
    flat = torch.cat([grads[n].double().reshape(-1) for n in ref_grads])
    flat_ref = torch.cat([g.reshape(-1) for g in ref_grads.values()])
    assert ((flat - flat_ref).norm() / flat_ref.norm()) < tol
    # Per parameter: the R1 gradients of the convolution biases cancel strongly (a plain
    # float32 computation is off by ~1e-4 there), so each parameter's error is held to a
    # few times that of the float32 plain-torch computation of the same penalty.
    probe = hnn.set_stylegan2_backend(copy.deepcopy(D), "torch")
    _, probe_penalty = r1_penalty(probe, img, c, *gammas, blur_sigma=blur_sigma)
    probe_penalty.mean().backward()
    for name, p in probe.named_parameters():
        if p.grad is None:
            continue
        scale = ref_grads[name].abs().max().clamp_min(1e-30)
        err = (grads[name].double() - ref_grads[name]).abs().max() / scale
        err32 = (p.grad.double() - ref_grads[name]).abs().max() / scale
        assert err <= max(4 * err32, 100 * EPS32), (name, err.item(), err32.item())


# ---------------------------------------------------------------------- part-region and density terms
def _small_generator():
    """The trainer's tiny GenHead (16^2, 8 + 8 samples, no super-resolution) with random
    biases and density weights (a fresh decoder's density layer is zero), on the built-in head."""
    from head4d.models import GenHead, GenHeadConfig
    from head4d.train.genhead import small_genhead_config

    torch.manual_seed(0)
    return randomize(GenHead(GenHeadConfig(**small_genhead_config())), 1)


def _posed_codes(G, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = G.head_model.canonical_codes(1)
    codes["shape"] = 0.3 * torch.randn(1, 300, generator=gen)
    codes["expression"] = 0.3 * torch.randn(1, 100, generator=gen)
    codes["jaw_pose"] = codes["jaw_pose"] + 0.05 * torch.randn(1, 3, generator=gen)
    codes["eye_pose"] = 0.1 * torch.randn(1, 6, generator=gen)
    return codes


def _reference_decode(G, planes, points):
    """A triplane read on the reference ``sample_triplanes`` then the decoder."""
    from head4d.ops import sample_triplanes

    return G.decoder(sample_triplanes(planes, points, box_warp=G.config.box_warp, plane_layout="portrait4d",
                                      backend="torch"))


def _pairwise_distortion(depths, weights):
    """MipNeRF-360's distortion loss by its definition (every pair of intervals)."""
    mid = (depths[..., 1:] + depths[..., :-1]) / 2
    pairs = weights[..., :, None] * weights[..., None, :] * (mid[..., :, None] - mid[..., None, :]).abs()
    return pairs.sum((-1, -2)) + (weights.square() * (depths[..., 1:] - depths[..., :-1])).sum(-1) / 3


def test_part_region_terms_against_plain_computation():
    """The six part-region terms of ``Gmain`` from a render with ``return_samples=True``,
    against the same terms computed here in float64 from what a point field written here
    records in the same render (the warp, the reference triplane read, the blend): the head
    densities times the eye-box indicator and the mouth mask, each sample's depth (from its
    point), and the compositing weights written out (EG3D's marcher on the depth-sorted
    samples); the distortion loss by its O(S^2) definition. Made-up masks so that both
    parts weigh in (the built-in head's own eye mask is empty)."""
    from head4d.ops import generate_rays
    from head4d.train.genhead import part_region_losses

    G = _small_generator()
    r = G.config.neural_rendering_resolution
    gen = torch.Generator().manual_seed(0)
    eye = (torch.rand(1, 1, r, r, generator=gen) - 0.3).clamp(0, 1)
    mouth = (torch.rand(1, 1, r, r, generator=gen) - 0.5).clamp(0, 1) * (1 - eye)
    G.masks = lambda codes, camera, resolution: {"eye_mask": eye, "mouth_mask": mouth}
    planes = torch.randn(1, 6, 32, 16, 16, generator=gen).requires_grad_(True)
    codes, cam = _posed_codes(G, 1), camera(1)
    got = G.render(planes, cam, codes, generator=torch.Generator().manual_seed(1), return_samples=True)
    s_all = G.config.depth_resolution + G.config.depth_resolution_importance
    assert got["sample_depths"].shape == (1, r * r, s_all) and got["sample_weights"].shape == (1, r * r, s_all - 1)
    assert got["head_density_eye"].shape == got["head_density_mouth"].shape == (1, r * r, s_all)

    # the same render through a point field written here, recording every pass
    c2w, k = cam[:, :16].reshape(1, 4, 4), cam[:, 16:].reshape(1, 3, 3)
    origins, directions = generate_rays(c2w, k, r, convention="opengl")
    fields = G.deformation.build(**codes)
    e_ray, m_ray = eye.reshape(1, r * r), mouth.reshape(1, r * r)
    passes = []

    def field(points, dirs):
        per_ray = points.shape[1] // (r * r)
        e = e_ray.repeat_interleave(per_ray, 1)[..., None]
        m = m_ray.repeat_interleave(per_ray, 1)[..., None]
        w = G.deformation.warp(points, fields)
        inbox = w.inside_eye_box[..., None].float()
        head_out = _reference_decode(G, planes[:, 3:], w.head)
        part_out = _reference_decode(G, planes[:, :3], torch.where(m > 0, w.mouth, w.eyes))
        part_sigma = part_out["sigma"] * (inbox + m)
        sigma = part_sigma * (e * inbox) + part_sigma * m + head_out["sigma"] * (1 - e * inbox - m)
        rgb = part_out["rgb"] * (e * inbox) + part_out["rgb"] * m + head_out["rgb"] * (1 - e * inbox - m)
        depth = ((points - origins.repeat_interleave(per_ray, 1)) * dirs).sum(-1)
        as_rays = lambda t: t.reshape(1, r * r, per_ray).double()  # noqa: E731
        passes.append({"eye": as_rays(head_out["sigma"] * inbox), "mouth": as_rays(head_out["sigma"] * m),
                       "inside": int(inbox.sum()), "sigma": as_rays(sigma), "depth": as_rays(depth)})
        return {"rgb": rgb, "sigma": sigma}

    options = dict(G.config.rendering_options())
    with torch.no_grad():
        TriplaneRenderer("portrait4d")(field, None, origins, directions, options,
                                       generator=torch.Generator().manual_seed(1), cam2world=c2w)
    assert len(passes) == 2 and sum(p["inside"] for p in passes) > 0  # some samples in the eye boxes
    joined = {key: torch.cat([p[key] for p in passes], dim=2) for key in ("eye", "mouth", "sigma", "depth")}
    depths, order = joined["depth"].sort(dim=2)
    sigma = joined["sigma"].gather(2, order)
    # EG3D's marcher: midpoint densities, softplus(s - 1), alpha, transmittance with its 1e-10
    mid_sigma = (sigma[..., 1:] + sigma[..., :-1]) / 2
    alpha = 1 - torch.exp(-F.softplus(mid_sigma - 1) * (depths[..., 1:] - depths[..., :-1]))
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha + 1e-10], dim=2), dim=2)[..., :-1]
    weights = alpha * trans

    def close(a, b, tol):
        a, b = a.detach().double(), b.detach().double()
        return ((a - b).abs().max() / b.abs().max()).item() < tol

    # head densities: the reference triplane read against head4d's kernels (float32 rounding)
    assert close(got["head_density_eye"], joined["eye"], 64 * EPS32)
    assert close(got["head_density_mouth"], joined["mouth"], 64 * EPS32)
    assert joined["eye"].abs().max() > 0 and joined["mouth"].abs().max() > 0
    assert close(got["sample_depths"], depths, 8 * EPS32)
    # products along 16 samples of float32 densities (measured 30 eps of the largest weight)
    assert close(got["sample_weights"], weights, 128 * EPS32)
    torch.testing.assert_close(got["sample_weights"].sum(-1).reshape(1, 1, r, r), got["opacity"], rtol=0, atol=0)

    terms = part_region_losses(got, 100.0, 10.0, 100.0)
    distortion = _pairwise_distortion(depths, weights)
    want = {}
    for part, mask in (("eye", eye), ("mouth", mouth)):
        ray_mask = mask.reshape(1, r * r).double()
        want[f"Loss/G/loss_face_{part}"] = (F.softplus(joined[part]) * ray_mask[..., None]).mean() * 10
        want[f"Loss/G/loss_{part}_density"] = (distortion * ray_mask).mean() * 100
        want[f"Loss/G/loss_{part}_T"] = ((1 - weights.sum(-1)) * ray_mask).mean() * 100
    assert set(terms) == set(want)
    for name, value in want.items():
        assert value > 0, name
        # means of float32 values (measured under 1 eps)
        assert abs(terms[name].item() - value.item()) <= 16 * EPS32 * value.item(), (name, terms[name], value)
    # each term reaches the planes: the head triplane (density terms) and both (distortion, T)
    for name, term in terms.items():
        grad, = torch.autograd.grad(term, planes, retain_graph=True)
        assert torch.isfinite(grad).all() and grad[:, 3:].abs().max() > 0, name
        if "face" not in name:
            assert grad[:, :3].abs().max() > 0, name


def test_density_regularizer_reads_through_the_warp(dataset, monkeypatch):
    """``density_tv_loss`` against the reads written here: both point sets warped by the
    codes' deformation, the part triplane at the eye and the mouth points, the head triplane
    at the head points, each on the reference triplane read; the mean of the three L1
    distances. Posed codes move the points, so the value is not the unwarped one. The
    trainer's ``Greg`` term is it times ``density_reg``, on its uniform points and their
    perturbation by ``p_dist * box_warp``."""
    from head4d.train import genhead as genhead_module
    from head4d.train.genhead import density_tv_loss

    G = _small_generator()
    gen = torch.Generator().manual_seed(4)
    planes = torch.randn(1, 6, 32, 16, 16, generator=gen).requires_grad_(True)
    codes = _posed_codes(G, 2)
    codes["neck_pose"] = torch.tensor([[0.0, 0.3, 0.0]])
    points = torch.rand(1, 200, 3, generator=gen) * 1.3 - 0.65
    moved = points + 0.05 * torch.randn(points.shape, generator=gen)
    got = density_tv_loss(G, planes, codes, points, moved)

    with torch.no_grad():
        warped = G.deformation.warp(torch.cat([points, moved], 1), G.deformation.build(**codes))
    reads = [(planes[:, :3], warped.eyes), (planes[:, 3:], warped.head), (planes[:, :3], warped.mouth)]
    l1 = lambda s: (s[:, :200] - s[:, 200:]).abs().mean()  # noqa: E731
    want = sum(l1(_reference_decode(G, p, x)["sigma"].double()) for p, x in reads) / 3
    assert abs(got.item() - want.item()) <= 64 * EPS32 * want.item()
    both = torch.cat([points, moved], 1)
    unwarped = sum(l1(_reference_decode(G, p, both)["sigma"].double()) for p, _ in reads) / 3
    assert abs(unwarped.item() - want.item()) > 0.01 * want.item()
    grad, = torch.autograd.grad(got, planes)
    assert grad[:, :3].abs().max() > 0 and grad[:, 3:].abs().max() > 0

    calls = []
    real = genhead_module.density_tv_loss
    monkeypatch.setattr(genhead_module, "density_tv_loss",
                        lambda *a: calls.append((a, real(*a))) or calls[-1][1])
    trainer = GenHeadTrainer(GenHeadTrainingConfig.small(density_reg_points=500), dataset)
    batch = trainer.sample_batch()
    loss = trainer.density_regularizer(batch["gen_z"][1], batch["gen_labels"][1], None)
    (_, planes_, codes_, points_, moved_), value = calls[0]
    assert loss.item() == pytest.approx(0.25 * value.item(), rel=1e-6)
    assert points_.shape == (2, 500, 3) and points_.min() >= -1 and points_.max() <= 1
    assert points_.abs().max() > 0.9  # the whole [-1, 1] cube, as upstream (wider than the planes' 1.3)
    assert (moved_ - points_).std().item() == pytest.approx(0.004 * 1.3, rel=0.1)
    _, phase_codes = genhead_module.labels_to_codes(batch["gen_labels"][1])
    for key, value in phase_codes.items():
        assert torch.equal(codes_[key], value), key


def test_lazy_schedule_and_adjusted_adam(dataset):
    config = GenHeadTrainingConfig.small()
    trainer = GenHeadTrainer(config, dataset)
    greg = [i for i in range(40) if "Greg" in trainer.phases(i)]
    dreg = [i for i in range(40) if "Dreg" in trainer.phases(i)]
    assert greg == list(range(0, 40, 4)) and dreg == [0, 16, 32]
    assert all(trainer.phases(i)[0] == "Gmain" and "Dmain" in trainer.phases(i) for i in range(40))
    g_group, d_group = trainer.G_opt.param_groups[0], trainer.D_opt.param_groups[0]
    assert g_group["lr"] == pytest.approx(0.0025 * 4 / 5, rel=1e-15)
    assert g_group["betas"] == pytest.approx((0.0, 0.99 ** (4 / 5)), rel=1e-15)
    assert d_group["lr"] == pytest.approx(0.002 * 16 / 17, rel=1e-15)
    assert d_group["betas"] == pytest.approx((0.0, 0.99 ** (16 / 17)), rel=1e-15)
    assert g_group["eps"] == 1e-8
    assert common.lazy_adam_settings(0.1, (0.5, 0.9), None) == (0.1, (0.5, 0.9))
    with pytest.raises(ValueError, match="reg_interval"):
        common.lazy_adam_settings(0.1, (0.5, 0.9), 0)
    # gamma 0 everywhere: no R1 phase; no density weight: no Greg phase
    quiet = GenHeadTrainer(GenHeadTrainingConfig.small(r1_gamma=0, r1_gamma_uv=0, r1_gamma_seg=0, density_reg=0),
                           dataset)
    assert quiet.phases(0) == ["Gmain", "Dmain"]
    # no lazy regularization: both terms on every step, the optimizers' settings as given
    eager = GenHeadTrainer(GenHeadTrainingConfig.small(g_reg_interval=None, d_reg_interval=None), dataset)
    assert all(eager.phases(i) == ["Gmain", "Greg", "Dmain", "Dreg"] for i in range(5))
    assert eager.G_opt.param_groups[0]["lr"] == 0.0025 and eager.D_opt.param_groups[0]["betas"] == (0.0, 0.99)


def test_ema_arithmetic_by_hand():
    assert common.ema_beta(4, 100, 10, 0.05) == 0.5 ** (4 / 5)
    assert common.ema_beta(4, 10 ** 6, 10, 0.05) == 0.5 ** (4 / 10000)
    assert common.ema_beta(4, 100, 10, None) == 0.5 ** (4 / 10000)
    assert common.ema_beta(4, 0, 10, 0.05) == 0.0
    with pytest.raises(ValueError, match="batch"):
        common.ema_beta(0, 0, 10, 0.05)
    torch.manual_seed(0)
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        for m in (model, ema):
            m.weight.normal_()
            m.bias.normal_()
            m.running_mean.normal_()
    before = [p.detach().clone() for p in ema.parameters()]
    model.requires_grad_(False)
    ema.requires_grad_(False)
    common.update_ema(ema, model, 0.25)
    for p_ema, p_old, p in zip(ema.parameters(), before, model.parameters()):
        for i in range(3):
            want = float(p[i]) + 0.25 * (float(p_old[i]) - float(p[i]))
            assert abs(float(p_ema[i]) - want) <= 4 * EPS32 * max(abs(want), 1)
    assert torch.equal(ema.running_mean, model.running_mean)


def test_schedules_by_hand(dataset):
    from head4d.train.genhead import blur_sigma_at, swapping_prob_at

    assert blur_sigma_at(0, 10, 200) == 10
    assert blur_sigma_at(50_000, 10, 200) == 10 * (1 - 50_000 / 200_000)
    assert blur_sigma_at(300_000, 10, 200) == 0 and blur_sigma_at(5, 10, 0) == 0
    assert swapping_prob_at(0, 0.5, 1000) == 1
    assert swapping_prob_at(250_000, 0.5, 1000) == 0.75 * 1 + 0.25 * 0.5
    assert swapping_prob_at(2_000_000, 0.5, 1000) == 0.5
    assert swapping_prob_at(10, None, 1000) is None
    # upstream scales the blur fade and the EMA half-life with the total batch (32 -> 200, 10)
    assert GenHeadTrainingConfig(batch=8).schedule_kimg(4) == (200.0, 10.0)
    assert GenHeadTrainingConfig(batch=2).schedule_kimg(1) == (200 * 2 / 32, 10 * 2 / 32)
    assert GenHeadTrainingConfig(batch=2, blur_fade_kimg=7, ema_kimg=3).schedule_kimg(1) == (7, 3)
    trainer = GenHeadTrainer(GenHeadTrainingConfig.small(), dataset)
    batch = trainer.sample_batch()
    assert batch["real_img"].shape == (2, 3, 16, 16) and batch["real_img"].dtype == torch.float32
    assert batch["real_img"].min() >= -1 and batch["real_img"].max() <= 1
    assert batch["gen_z"].shape == (4, 2, 64) and batch["gen_labels"].shape == (4, 2, 437)
    assert not torch.equal(batch["gen_z"][0], batch["gen_z"][2])  # each phase draws its own fakes
    with pytest.raises(ValueError, match="dataset is empty"):
        GenHeadTrainer(GenHeadTrainingConfig.small(), [])


def test_checkpoint_round_trip_resumes_bit_exact(dataset, tmp_path):
    config = GenHeadTrainingConfig.small(seed=1, batch=1)
    trainer = GenHeadTrainer(config, dataset)
    trainer.step()
    path = trainer.save(tmp_path / common.CHECKPOINT_NAME)
    expected = trainer.step()
    expected_g = flat_parameters(trainer.G)
    expected_ema = flat_parameters(trainer.G_ema)

    other = GenHeadTrainer(GenHeadTrainingConfig.small(seed=1, batch=1), dataset)
    torch.manual_seed(123)  # disturb the global state: the checkpoint must restore it
    other.load(path)
    assert other.step_index == 1 and other.cur_nimg == 1
    # the file is plain safetensors: the networks' weights read without head4d, by name
    from safetensors.torch import load_file
    raw = load_file(str(path))
    for prefix, module in (("G", other.G), ("D", other.D), ("G_ema", other.G_ema)):
        named = module.state_dict()
        assert {f"{prefix}/{k}" for k in named} <= set(raw)
        assert all(torch.equal(raw[f"{prefix}/{k}"], v) for k, v in named.items())
    got = other.step()
    assert got == expected
    assert torch.equal(flat_parameters(other.G), expected_g)
    assert torch.equal(flat_parameters(other.G_ema), expected_ema)
    state = common.load_checkpoint(path)
    assert state["config"]["seed"] == 1 and state["step"] == 1 and "D_opt" in state and "rng" in state


@pytest.mark.gpu
def test_checkpoint_round_trip_on_cuda(tmp_path):
    # the checkpoint is read onto the CPU whatever the device (random states must be CPU
    # tensors); the networks and the optimizer moments land on CUDA through load_state_dict
    config = GenHeadTrainingConfig.small(seed=1, batch=1, device="cuda")
    trainer = GenHeadTrainer(config, make_dataset(4))
    trainer.step()
    path = trainer.save(tmp_path / common.CHECKPOINT_NAME)
    saved_g, saved_d = flat_parameters(trainer.G), flat_parameters(trainer.D)
    expected = trainer.step()
    other = GenHeadTrainer(GenHeadTrainingConfig.small(seed=1, batch=1, device="cuda"), make_dataset(4))
    other.load(path)
    assert other.step_index == 1 and torch.equal(flat_parameters(other.G), saved_g)
    assert torch.equal(flat_parameters(other.D), saved_d)
    moments = [v for state in other.G_opt.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    assert moments and all(v.is_cuda for v in moments)
    got = other.step()
    # CUDA's atomic additions in the backward passes add in no fixed order: the same step
    # agrees to float32 rounding, not bit for bit
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-3, abs=1e-5), key


def test_checkpoint_killed_mid_write_keeps_previous(tmp_path):
    path = tmp_path / common.CHECKPOINT_NAME
    common.save_checkpoint(path, {"step": 1, "weights": torch.arange(5.0)})

    def crash(tmp):
        assert tmp.exists() and tmp.parent.parent == path.parent and tmp.stat().st_size > 0
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"step": 2, "weights": torch.zeros(5)}, _before_replace=crash)
    state = common.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.arange(5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


_WRITER = """
import sys, time, torch
from head4d.train import common
path = sys.argv[1]
for step in (1, 2, 3):  # checkpoints of 16 MB, step k holding the value k everywhere
    common.save_checkpoint(path, {"step": step, "weights": torch.full((4, 1 << 20), float(step))})
    print(step, flush=True)

def stall(tmp):  # step 4's file is written in full; the kill comes before its rename
    print("written", flush=True)
    time.sleep(600)

common.save_checkpoint(path, {"step": 4, "weights": torch.full((4, 1 << 20), 4.0)}, _before_replace=stall)
"""


def test_checkpoint_of_a_process_killed_while_writing_still_loads(tmp_path):
    """A process writes three checkpoints, then is killed with SIGKILL (no clean-up runs) in
    the middle of the fourth: its file written in full, not yet renamed. The checkpoint at
    the final name is then the third, whole."""
    import signal
    import subprocess
    import sys

    path = tmp_path / common.CHECKPOINT_NAME
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        lines = [writer.stdout.readline().strip() for _ in range(4)]
        assert lines == ["1", "2", "3", "written"], lines
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    finally:
        writer.kill()
        writer.wait()
    state = common.load_checkpoint(path)
    assert state["step"] == 3
    assert torch.equal(state["weights"], torch.full((4, 1 << 20), 3.0))
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the killed write's leftover
    common.save_checkpoint(path, {"step": 0})  # the next write removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        common.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a head4d training checkpoint"):
        common.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(TypeError, match="state must be a dict"):
        common.save_checkpoint(tmp_path / "x.pt", [1, 2])
    with pytest.raises(TypeError, match="opt/hook is a object"):
        common.save_checkpoint(tmp_path / "x.pt", {"opt": {"hook": object()}})
    assert not (tmp_path / "x.pt").exists()
    from safetensors.torch import save_file
    newer = common.CHECKPOINT_VERSION + 1
    save_file({}, str(tmp_path / "newer.safetensors"), metadata={"format": common.CHECKPOINT_FORMAT,
                                                                  "version": str(newer), "state": "{}"})
    with pytest.raises(ValueError, match=f"has version {newer}"):
        common.load_checkpoint(tmp_path / "newer.safetensors")
    save_file({"w": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a head4d training checkpoint"):
        common.load_checkpoint(tmp_path / "model.safetensors")
    # damaged or foreign files: text, empty, a truncated checkpoint
    whole = common.save_checkpoint(tmp_path / "whole.safetensors", {"w": torch.ones(1000)}).read_bytes()
    for name, data in (("text.pt", b"hello world"), ("empty.pt", b""), ("cut.safetensors", whole[:len(whole) // 2])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a head4d training checkpoint"):
            common.load_checkpoint(tmp_path / name)


def test_checkpoint_values_round_trip_and_version_1_files_still_load(tmp_path):
    """Everything a state holds comes back as it was: tensors (views and tensors sharing
    memory too), int-keyed dicts (optimizer states), tuples (Adam's betas), None, NaN."""
    base = torch.arange(10.0)
    state = {"view": base[2:5], "twice": [base, base], "ints": {0: {"step": torch.tensor(3.0)}, 7: "x"},
             "betas": (0.0, 0.99), "none": None, "nan": float("nan"), "flag": True, "text": "a/b"}
    back = common.load_checkpoint(common.save_checkpoint(tmp_path / "c.safetensors", state))
    assert torch.equal(back["view"], base[2:5]) and all(torch.equal(t, base) for t in back["twice"])
    assert list(back["ints"]) == [0, 7] and torch.equal(back["ints"][0]["step"], torch.tensor(3.0))
    assert back["betas"] == (0.0, 0.99) and back["none"] is None and math.isnan(back["nan"])
    assert back["flag"] is True and back["text"] == "a/b" and back["version"] == common.CHECKPOINT_VERSION
    # head4d 0.x wrote torch.save files (version 1); they still load, without running code
    torch.save({"format": common.CHECKPOINT_FORMAT, "version": 1, "step": 4, "w": torch.ones(2)}, tmp_path / "old.pt")
    old = common.load_checkpoint(tmp_path / "old.pt")
    assert old["step"] == 4 and torch.equal(old["w"], torch.ones(2))


def test_rng_state_round_trip():
    import random

    import numpy as np
    state = common.get_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    common.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_config_errors_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        GenHeadTrainingConfig(batch=0).check()
    with pytest.raises(ValueError, match="gpc_reg_prob"):
        GenHeadTrainingConfig(gpc_reg_prob=2.0).check()
    rc = cli_main(["train", "genhead", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out"),
                   "--small", "--dry-run", "--device", "cpu"])
    assert rc == 2
    assert "head4d train genhead:" in capsys.readouterr().err


def _with_masks(items, seed=1):
    """``items`` with a random uint8 mask ``[1, R, R]`` (values 0..255) appended to each."""
    gen = torch.Generator().manual_seed(seed)
    return [(image, label, torch.randint(0, 256, (1,) + image.shape[1:], generator=gen, dtype=torch.uint8))
            for image, label in items]


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_stream_passes_masks_through(workers):
    dataset = _with_masks(make_dataset(5))
    stream = common.BatchStream(dataset, 2, seed=3, workers=workers)
    try:
        batches = [stream.next() for _ in range(3)]
    finally:
        stream.close()
    sampler = common.InfiniteSampler(len(dataset), seed=3)
    for b, fields in enumerate(batches):
        assert len(fields) == 3
        index = [sampler.index(2 * b + k) for k in range(2)]
        for field, column in zip(fields, range(3)):
            assert torch.equal(field, torch.stack([dataset[i][column] for i in index]))


def test_real_seg_is_the_mask_mapped_to_signed_range(tmp_path):
    """With a dataset that has masks (``head4d make-dataset``'s, at the discriminator's
    resolution and at twice it), the real seg is ``mask / 127.5 - 1`` (resized like the image
    where the resolutions differ), not all ones; a step trains on it."""
    from head4d.data import ImageLabelDataset, make_procedural_dataset
    from head4d.nn.discriminator import filtered_resizing

    config = GenHeadTrainingConfig.small()
    for resolution in (16, 32):
        dataset = ImageLabelDataset(make_procedural_dataset(4, tmp_path / f"r{resolution}", resolution=resolution))
        assert dataset.has_masks
        trainer = GenHeadTrainer(config, dataset)
        assert trainer.D.img_resolution == 16
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "no masks" warning
            batch = trainer.sample_batch()
        sampler = common.InfiniteSampler(len(dataset), seed=config.seed)
        masks = torch.stack([dataset[sampler.index(k)][2] for k in range(config.batch)])
        expected = masks.double() / 127.5 - 1  # 0 -> -1 (background), 255 -> +1 (head)
        torch.testing.assert_close(batch["real_seg"].double(), expected, rtol=0, atol=EPS32)
        seg = trainer.real_inputs(batch, 0.0)["seg"]
        if resolution != 16:
            expected = filtered_resizing(expected, 16)
        torch.testing.assert_close(seg.double(), expected, rtol=0, atol=8 * EPS32)
        assert (seg < 0).any() and (seg > 0.99).any()
        losses = trainer.step()
        assert all(math.isfinite(v) for v in losses.values()), losses
        trainer.close()


def test_dataset_without_masks_warns_once_and_uses_ones(dataset):
    trainer = GenHeadTrainer(GenHeadTrainingConfig.small(), dataset)
    with pytest.warns(UserWarning, match="no foreground masks"):
        batch = trainer.sample_batch()
    assert "real_seg" not in batch
    assert torch.equal(trainer.real_inputs(batch, 0.0)["seg"], torch.ones(2, 1, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.sample_batch()
    bad = GenHeadTrainer(GenHeadTrainingConfig.small(), [(i, l, m.float()) for i, l, m in _with_masks(dataset)])
    with pytest.raises(ValueError, match="dataset masks must be uint8 \\[1, R, R\\]"):
        bad.sample_batch()


def test_cli_dry_run_runs_two_steps_and_writes(tmp_path, monkeypatch, capsys):
    """``head4d train genhead --small --dry-run``, the dataset reader replaced by the
    in-memory one (this test is about the command, not the dataset format)."""
    from head4d.train import genhead as genhead_module

    monkeypatch.setattr(genhead_module, "_open_dataset", lambda config: make_dataset(4))
    out = tmp_path / "out"
    rc = cli_main(["train", "genhead", "--data", "unused", "--out", str(out), "--small", "--dry-run",
                   "--device", "cpu", "--batch", "1", "--image-every", "1", "--workers", "1"])
    assert rc == 0
    state = common.load_checkpoint(out / common.CHECKPOINT_NAME)
    assert state["step"] == 2 and state["cur_nimg"] == 2 and state["config"]["dry_run"]
    assert state["config"]["workers"] == 1 and state["data_stream"]["position"] == 2
    printed = capsys.readouterr().out
    assert "step 1 " in printed and "step 2 " in printed and "img/s" in printed and "Loss/D/loss" in printed
    from head4d.models import GenHead
    exported = GenHead.load(out / "G_ema")
    for name, value in exported.state_dict().items():
        assert torch.equal(value, state["G_ema"][name]), name
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary left
    assert list(out.glob("events.out.tfevents.*")) and (out / "log.jsonl").read_text().count("\n") == 2
    # image grids: the reals at the start, the EMA generator's 8 fixed samples after each step
    # (--image-every 1); 8 tiles of 16^2 in 3 columns and 3 rows, 2-pixel gaps
    from head4d.media import decode_png
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "Images_fakes_ema-00000001.png", "Images_fakes_ema-00000002.png", "Images_reals-00000000.png"]
    for path in (out / "images").iterdir():
        assert decode_png(path.read_bytes()).shape == (3 * 18 - 2, 3 * 18 - 2, 3), path.name
    # --resume continues from step 2 (two more steps with --dry-run)
    rc = cli_main(["train", "genhead", "--data", "unused", "--out", str(out), "--small", "--dry-run",
                   "--device", "cpu", "--batch", "1", "--resume"])
    assert rc == 0 and common.load_checkpoint(out / common.CHECKPOINT_NAME)["step"] == 4
    # a folder of a head4d that wrote checkpoint.pt (version 1, torch.save) resumes from it
    state = common.load_checkpoint(out / common.CHECKPOINT_NAME)
    torch.save({**state, "version": 1}, out / common.LEGACY_CHECKPOINT_NAME)
    (out / common.CHECKPOINT_NAME).unlink()
    rc = cli_main(["train", "genhead", "--data", "unused", "--out", str(out), "--small", "--dry-run",
                   "--device", "cpu", "--batch", "1", "--resume"])
    assert rc == 0 and common.load_checkpoint(out / common.CHECKPOINT_NAME)["step"] == 6


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _average_gradients_worker(rank, world_size, port, out_dir):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    group = common.Distributed.from_env("cpu")
    try:
        both, one, none = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
        both.grad = torch.full((3,), float(rank + 1))   # 1 and 2: mean 1.5
        if rank == 0:
            one.grad = torch.full((3,), 4.0)             # 4 and (none) 0: mean 2
        group.average_gradients([both, one, none])
        mapping = hnn.MappingNetwork(z_dim=4, c_dim=0, w_dim=4, num_ws=2, num_layers=1)
        mapping.w_avg.copy_(torch.arange(4.0) * (rank + 1))  # ranks 0 and 1: mean 1.5 * arange
        weight = mapping.fc0.weight.detach().clone()
        group.average_running_means(mapping)
        torch.save({"both": both.grad, "one": one.grad, "none": none.grad, "rank": group.rank,
                    "world": group.world_size, "w_avg": mapping.w_avg, "weight_kept": torch.equal(weight,
                    mapping.fc0.weight)}, out_dir / f"grads{rank}.pt")
    finally:
        group.close()


def test_average_gradients_and_running_means_over_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_average_gradients_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"grads{rank}.pt")
        assert got["rank"] == rank and got["world"] == 2
        assert torch.equal(got["both"], torch.full((3,), 1.5)) and torch.equal(got["one"], torch.full((3,), 2.0))
        assert got["none"] is None
        assert torch.equal(got["w_avg"], 1.5 * torch.arange(4.0)) and got["weight_kept"]


def test_torchrun_two_processes_hold_identical_changed_weights(tmp_path):
    r0, r1 = run_under_torchrun("genhead", tmp_path)
    assert (r0["rank"], r1["rank"], r0["world_size"], r1["world_size"]) == (0, 1, 2, 2)
    assert r0["step"] == r1["step"] == 2 and r0["nimg"] == r1["nimg"] == 4
    assert r0["digests"] == r1["digests"]
    assert r0["losses"] == r1["losses"] and all(math.isfinite(v) for v in r0["losses"].values())
    state = common.load_checkpoint(tmp_path / common.CHECKPOINT_NAME)  # rank 0's
    assert state["step"] == 2 and {name: state_digest(state[name]) for name in ("G", "D", "G_ema")} == r0["digests"]
    torch.manual_seed(0)  # the initial weights of both ranks (seed 0, then broadcast)
    fresh = GenHeadTrainer(GenHeadTrainingConfig.small(batch=1), make_dataset(4))
    assert state_digest(fresh.G.state_dict()) != r0["digests"]["G"]
