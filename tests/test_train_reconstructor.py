"""``head4d.train.reconstructor``: the reconstructor's training on online synthetic triplets.

All on the CPU with the tiny configuration (``ReconstructorTrainingConfig.small``: an
untrained 16^2 GenHead as the synthesis, a 64^2-source reconstructor with one block each
way and no super-resolution, 16^2 renders fading to 32^2, a 32^2 discriminator) and LPIPS
with a random VGG16 backbone (built explicitly; it warns so).

- Each loss function against a plain computation written here (numpy in float64, and the
  triplane read with ``F.grid_sample`` per plane); the targets of the target view.
- The schedules at chosen kimg values: the resolution fade (upstream's rint), the loss
  cut-offs and starts, the phases (density TV every 16 steps, D only after the adversarial
  start), the decoder's gradient zeroing and the parameters it covers, the lazy Adam settings.
- Steps on one fixed batch: finite losses with the early terms, the decoder frozen while
  the encoders move, the total loss falling (a tiny overfit); after the adversarial start:
  every phase, D moves, the decoder moves, the identity term from a stand-in network (with
  the target's projected face points in their order); and
  a checkpoint round trip there: a fresh trainer resumed from it takes the same step, bit-exact.
- The feature image without background against a render without background.
- Gradient accumulation: the strided micro-batches of a TripletBatch (every field, the
  static half in each); the gradients of ``Gmain`` (every term, the adversarial one through
  the discriminator's minibatch std), ``Dmain`` and ``Dreg`` over 2 micro-batches equal
  those of the whole batch to float32 rounding (the renderer's jitter switched off, so that
  both see the same samples; ``Greg`` draws its points per micro-batch and is left out).
- Mixed precision: ``"bf16"`` on the CPU is refused (trainer and command).
- ``head4d train reconstructor --small --dry-run`` writes the checkpoint, the EMA export
  and the image grids (every step with ``--image-every 1``: the sources and targets fixed,
  the EMA renders moving; in TensorBoard too); bad configs and a missing ``--genhead`` are
  clear errors; the missing-VGG message; the global encoder's trunk from torchvision's cached
  ResNet-34 (the message when it is missing; G and G_ema holding it when present).
- ``torchrun --standalone --nproc_per_node 2`` (gloo) runs two steps; the ranks hold
  identical weights after them (digests of their state dicts, equal to those of rank 0's
  checkpoint).
"""
import dataclasses
import math
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from head4d.cli import main as cli_main
from head4d.media import decode_png
from head4d.train import common
from head4d.train import perceptual
from head4d.train.reconstructor import (ReconstructorTrainer, ReconstructorTrainingConfig, density_tv_loss,
                                        depth_loss, discriminator_loss, feature_loss, freezes_decoder_at,
                                        frozen_parameter_names, generator_adversarial_loss, image_losses,
                                        loss_weights_at, neural_resolution_at, phases_at, reconstruction_targets,
                                        segmentation_loss, split_triplets, triplane_feature_loss)

from torchrun_training import run_under_torchrun, state_digest

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def small_config(**kwargs):
    args = dict(lpips_backbone="random", device="cpu")
    args.update(kwargs)
    return ReconstructorTrainingConfig.small(**args)


def flat_parameters(module, prefix=None):
    return torch.cat([p.detach().reshape(-1) for n, p in module.named_parameters()
                      if prefix is None or n.startswith(prefix)])


@pytest.fixture(scope="class")
def trainer():
    """One small trainer for the tests of :class:`TestSmallTrainer` (freed after them)."""
    with pytest.warns(UserWarning) as record:
        built = ReconstructorTrainer(small_config())
    messages = " | ".join(str(w.message) for w in record)
    assert "random" in messages and "untrained GenHead" in messages and "identity loss is off" in messages
    return built


# ---------------------------------------------------------------------- losses
def test_losses_against_plain_computations():
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1

    n, r = 2, 8
    fake = {k: rand(n, 3, r, r) for k in ("image_raw", "image_raw_wobg", "image_background", "image")}
    target = {k: rand(n, 3, r, r) for k in ("image_raw", "image_raw_wobg", "image_background")}  # no "image"

    def squared(a, b):  # an LPIPS stand-in: one distance per pair, [N, 1, 1, 1]
        return ((a - b) ** 2).mean(dim=(1, 2, 3), keepdim=True)

    l1, lp = image_losses(fake, target, squared)
    names = ("image_raw", "image_raw_wobg", "image_background")
    plain = {k: (fake[k].numpy(), target[k].numpy()) for k in names}
    assert abs(l1.item() - sum(np.abs(a - b).mean() for a, b in plain.values())) < 8 * EPS64
    assert abs(lp.item() - sum(((a - b) ** 2).reshape(n, -1).mean(1).mean() for a, b in plain.values())) < 8 * EPS64
    with pytest.raises(ValueError, match="no image pair"):
        image_losses({"image": fake["image"]}, target, squared)

    seg_f, seg_t = rand(n, 1, r, r), rand(n, 1, r, r)
    assert abs(segmentation_loss(seg_f, seg_t).item() - np.abs(seg_t.numpy() - seg_f.numpy()).mean()) < 4 * EPS64
    depth_f, depth_t = 4 + rand(n, 1, r, r), 4 + rand(n, 1, r, r)
    expected = np.mean(np.abs(depth_t.numpy() - depth_f.numpy()) * (seg_t.numpy() + 1) / 2)
    assert abs(depth_loss(depth_f, depth_t, seg_t).item() - expected) < 8 * EPS64

    feat_f, feat_t, bg_f, bg_t = (rand(n, 32, r, r) for _ in range(4))
    foreground = (seg_t.numpy() + 1) / 2
    masked = 2 * ((feat_t.numpy() + 1) / 2 * foreground) - 1
    expected = np.abs(masked - feat_f.numpy()).mean() + np.abs(bg_t.numpy() - bg_f.numpy()).mean()
    assert abs(feature_loss(feat_f, bg_f, feat_t, seg_t, bg_t).item() - expected) < 16 * EPS64
    assert abs(feature_loss(feat_f, None, feat_t, seg_t, bg_t).item() - np.abs(masked - feat_f.numpy()).mean()) \
        < 16 * EPS64

    sigma, moved = rand(n, 50, 1), rand(n, 50, 1)
    assert abs(density_tv_loss(sigma, moved, 0.25).item() - 0.25 * np.abs(sigma.numpy() - moved.numpy()).mean()) \
        < 4 * EPS64
    logits_f, logits_r = rand(n, 1) * 3, rand(n, 1) * 3
    softplus = lambda x: np.log1p(np.exp(x))  # noqa: E731
    assert abs(generator_adversarial_loss(logits_f).item() - softplus(-logits_f.numpy()).mean()) < 8 * EPS64
    expected = softplus(logits_f.numpy()).mean() + softplus(-logits_r.numpy()).mean()
    assert abs(discriminator_loss(logits_f, logits_r).item() - expected) < 8 * EPS64


def test_triplane_feature_loss_against_grid_sample():
    gen = torch.Generator().manual_seed(1)
    n, c, k, box = 2, 5, 40, 1.3
    planes = torch.randn(n, 3, c, 9, 11, generator=gen, dtype=torch.float64)
    points = (torch.rand(n, k, 3, generator=gen, dtype=torch.float64) - 0.5) * 1.5  # some outside the cube
    target = torch.randn(n, k, c, generator=gen, dtype=torch.float64)
    # Portrait4D's layout: planes over (x, y), (y, z), (z, x), the first coordinate the width
    reads = []
    for plane, (a, b) in enumerate(((0, 1), (1, 2), (2, 0))):
        grid = torch.stack([points[..., a], points[..., b]], dim=-1) * (2 / box)
        sampled = F.grid_sample(planes[:, plane], grid.unsqueeze(1), mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # [N, C, 1, K]
        reads.append(sampled[:, :, 0].permute(0, 2, 1))
    expected = (target - sum(reads) / 3).abs().mean()
    got = triplane_feature_loss(planes, points, target, box, backend="torch")
    assert abs(got.item() - expected.item()) < 64 * EPS64 * expected.item()


def test_reconstruction_targets():
    gen = torch.Generator().manual_seed(2)
    n, r = 2, 8

    def views(c, side):
        return torch.rand(n, 3, c, side, side, generator=gen) * 2 - 1

    opacity = torch.rand(n, 3, 1, 16, 16, generator=gen)
    batch = SimpleNamespace(image=views(3, 32), image_raw=views(3, 16), opacity=opacity,
                            image_depth=4 + views(1, 16), image_feature=views(32, 16),
                            background=torch.rand(n, 32, 16, 16, generator=gen),
                            cameras=torch.randn(n, 3, 25, generator=gen), triplane_points=torch.zeros(n, 4, 3),
                            triplane_features=torch.zeros(n, 4, 32))

    def resize(x):
        return F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)

    out = reconstruction_targets(batch, r)
    assert torch.equal(out["image"], batch.image[:, 2])
    torch.testing.assert_close(out["image_raw"], resize(batch.image[:, 2]), rtol=0, atol=4 * EPS32)
    seg = resize(2 * opacity[:, 2] - 1)
    torch.testing.assert_close(out["seg"], seg, rtol=0, atol=4 * EPS32)
    wobg = (out["image_raw"] + 1) / 2 * (seg + 1) / 2 * 2 - 1
    torch.testing.assert_close(out["image_raw_wobg"], wobg, rtol=0, atol=8 * EPS32)
    torch.testing.assert_close(out["background_feature"], resize(2 * batch.background - 1), rtol=0, atol=8 * EPS32)
    assert torch.equal(out["image_background"], out["background_feature"][:, :3])
    torch.testing.assert_close(out["depth"], resize(batch.image_depth[:, 2]), rtol=0, atol=16 * EPS32)
    assert torch.equal(out["camera"], batch.cameras[:, 2])
    # without a super-resolution the raw target is GenHead's raw image
    batch.image = None
    out = reconstruction_targets(batch, 16)
    assert "image" not in out and torch.equal(out["image_raw"], batch.image_raw[:, 2])


# ---------------------------------------------------------------------- schedules
def test_schedules_at_chosen_kimg():
    cfg = ReconstructorTrainingConfig(genhead="unused")

    def resolution(nimg):
        return neural_resolution_at(nimg, cfg.resolution_initial, cfg.resolution_final, cfg.adversarial_start_kimg,
                                    cfg.resolution_fade_kimg)

    # 64 -> 128 over 1000 kimg from 1000 kimg: rint(64 (1 - a) + 128 a)
    assert [resolution(k * 1000) for k in (0, 999, 1000, 1250, 1500, 1750, 2000, 9000)] == \
        [64, 64, 64, 80, 96, 112, 128, 128]
    assert resolution(1_007_812) == 64 and resolution(1_007_813) == 65  # 64.4999 and 64.5000: rint
    assert neural_resolution_at(5, 16, 32, 0.001, 0) == 32 and neural_resolution_at(0, 16, 32, 0.001, 0) == 16

    weights = {k: loss_weights_at(k, cfg) for k in (0, 399_999, 400_000, 999_999, 1_000_000)}
    assert weights[0] == {"l1": 1.0, "lpips": 1.0, "seg": 0.3, "depth": 1.0, "feature": 1.0, "triplane": 0.1,
                          "identity": 0.0, "adversarial": 0.0}
    assert weights[399_999] == weights[0]
    assert weights[400_000] == {**weights[0], "depth": 0.0, "feature": 0.0, "triplane": 0.0, "identity": 1.0}
    assert weights[999_999] == weights[400_000]
    assert weights[1_000_000] == {**weights[400_000], "adversarial": 0.01}

    assert phases_at(cfg, 0, 0) == ["Gmain", "Greg"] and phases_at(cfg, 1, 0) == ["Gmain"]
    assert phases_at(cfg, 16, 999_999) == ["Gmain", "Greg"]
    assert phases_at(cfg, 32, 1_000_000) == ["Gmain", "Greg", "Dmain", "Dreg"]
    assert phases_at(cfg, 33, 1_000_000) == ["Gmain", "Dmain"]
    lazy_none = ReconstructorTrainingConfig(genhead="unused", g_reg_interval=None, d_reg_interval=None)
    assert phases_at(lazy_none, 3, 2_000_000) == ["Gmain", "Greg", "Dmain", "Dreg"]
    assert freezes_decoder_at(cfg, 1_000_000) and not freezes_decoder_at(cfg, 1_000_001)
    assert not freezes_decoder_at(ReconstructorTrainingConfig(genhead="unused", freeze_kimg=None), 0)
    assert cfg.ema_kimg_for(8) == 10.0  # 4 per process on 8 GPUs: upstream's 10 * 32 / 32
    assert (cfg.g_lr, cfg.d_lr, cfg.betas, cfg.eps, cfg.kimg, cfg.truncation_psi, cfg.static_fraction) == \
        (1e-4, 1e-4, (0.9, 0.999), 1e-5, 15000, 0.95, 0.5)


class TestSmallTrainer:
    """Steps of one small trainer (built once for the class, freed after it, before the
    command and two-process tests build their own)."""

    def test_frozen_parameters_and_adam_settings(self, trainer):
        names = [n for n, _ in trainer.G.named_parameters()]
        frozen = frozen_parameter_names(trainer.G)
        assert frozen and all(n.startswith("decoder.") for n in frozen)  # no super-resolution in the small one
        assert sorted(frozen) == sorted(n for n in names if n.startswith("decoder."))
        assert any(n.startswith("encoder_global.") and "decoder" in n for n in names)  # excluded by name
        group = trainer.G_opt.param_groups[0]
        assert group["lr"] == pytest.approx(1e-4 * 16 / 17, rel=1e-12)
        assert group["betas"] == pytest.approx((0.9 ** (16 / 17), 0.999 ** (16 / 17)), rel=1e-12)
        assert trainer.D_opt.param_groups[0]["eps"] == 1e-5

    def test_steps_on_a_fixed_batch_fall_and_keep_the_decoder_frozen(self, trainer):
        batch = trainer.sampler.sample(2)
        assert batch.motion_scale.tolist() == [1.0, 0.0]  # the static half: motion scale 0
        decoder0, encoder0 = flat_parameters(trainer.G, "decoder."), flat_parameters(trainer.G, "encoder_detail.")
        ema0 = flat_parameters(trainer.G_ema)
        d0 = flat_parameters(trainer.D)
        history = [trainer.step(batch) for _ in range(4)]
        for losses in history:
            assert all(math.isfinite(v) for v in losses.values()), losses
            for key in ("Loss/G/lrecon_l1", "Loss/G/lrecon_lpips", "Loss/G/lrecon_seg", "Loss/G/lrecon_depth",
                        "Loss/G/lrecon_feature", "Loss/G/lrecon_triplane"):
                assert key in losses, key
            assert not any(k in losses for k in ("Loss/G/l_id", "Loss/G/loss", "Loss/D/loss", "Loss/D/reg"))
        assert "Loss/G/TVloss" in history[0] and "Loss/G/TVloss" not in history[1]
        assert trainer.step_index == 4 and trainer.cur_nimg == 8
        assert torch.equal(flat_parameters(trainer.G, "decoder."), decoder0)  # gradients zeroed before 1000 kimg
        assert not torch.equal(flat_parameters(trainer.G, "encoder_detail."), encoder0)
        assert torch.equal(flat_parameters(trainer.D), d0)  # no D phase before its start
        assert not torch.equal(flat_parameters(trainer.G_ema), ema0)
        totals = [h["Loss/G/total"] for h in history]
        assert totals[-1] < totals[0] * 0.9, totals


    def test_feature_image_without_background_matches_a_render_without_one(self, trainer):
        batch = trainer.sampler.sample(2)
        inputs = trainer.source_inputs(batch)
        camera = batch.cameras[:, 2]
        with torch.no_grad():
            torch.manual_seed(5)
            out = trainer.run_G(inputs, camera, 16)
            encoded = trainer.G.encode(inputs["source_image"], inputs["source_motion"],
                                       motion_scale=inputs["motion_scale"])
            planes = trainer.G.triplanes(encoded, inputs["driving_motion"])
            torch.manual_seed(5)
            bare = trainer.G.render(planes, camera, background=None, neural_rendering_resolution=16)
        torch.testing.assert_close(out["image_feature_wobg"], bare["image_feature"], rtol=0, atol=16 * EPS32)
        assert torch.equal(out["seg"], out["opacity"] * 2 - 1)
        assert out["background_feature"].shape == (2, 32, 16, 16)


    def test_after_the_adversarial_start_every_phase_runs_and_a_resumed_trainer_repeats_it(self, trainer,
                                                                                            tmp_path):
        """One step with every phase, from a checkpoint written just before it; then a fresh
        trainer resumed from that checkpoint (the global random state disturbed first) takes
        the same step: losses, G, D and the EMA bit-exact."""
        calls = []

        def identity(fake, target, landmarks):  # a stand-in identity network: 1 - cos of the flattened images
            value = 1 - F.cosine_similarity(fake.flatten(1), target.flatten(1), dim=1)
            calls.append((fake.shape, target.shape, value.detach(), landmarks))
            return value

        trainer.identity = identity
        trainer.cur_nimg, trainer.step_index = 1_500_000, 16  # resolution rint(16 / 2 + 32 / 2) = 24
        d0, decoder0 = flat_parameters(trainer.D), flat_parameters(trainer.G, "decoder.")
        path = trainer.save(tmp_path / common.CHECKPOINT_NAME)
        try:
            losses = trainer.step()
        finally:
            trainer.identity = None
        expected = [flat_parameters(m) for m in (trainer.G, trainer.D, trainer.G_ema)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = ReconstructorTrainer(small_config(), identity=identity)
        torch.manual_seed(123)  # disturb the global state: the checkpoint must restore it
        other.load(path)
        assert other.step_index == 16 and other.cur_nimg == 1_500_000
        again = other.step()
        for key in ("Loss/G/loss", "Loss/G/l_id", "Loss/D/loss", "Loss/D/reg", "Loss/G/TVloss"):
            assert key in losses and math.isfinite(losses[key]), (key, losses)
        assert not any(k in losses for k in ("Loss/G/lrecon_depth", "Loss/G/lrecon_feature", "Loss/G/lrecon_triplane"))
        assert calls[0][:2] == ((2, 3, 24, 24), (2, 3, 24, 24))
        # the target's face points in the 24^2 images: right eye left of the left eye, the
        # mouth corners below the eyes and the nose, inside the image
        landmarks = calls[0][3]
        assert landmarks.shape == (2, 5, 2) and torch.isfinite(landmarks).all()
        assert ((landmarks > -0.5) & (landmarks < 23.5)).all()
        assert (landmarks[:, 0, 0] < landmarks[:, 1, 0]).all() and (landmarks[:, 3, 0] < landmarks[:, 4, 0]).all()
        assert (landmarks[:, 3:, 1] > landmarks[:, 2:3, 1]).all()
        assert (landmarks[:, 2, 1] > landmarks[:, :2, 1].max(1).values).all()
        assert losses["Loss/G/l_id"] == pytest.approx(calls[0][2].mean().item(), rel=1e-6)
        assert not torch.equal(expected[1], d0)
        assert not torch.equal(flat_parameters(trainer.G, "decoder."), decoder0)  # no freeze after 1000 kimg

        assert again == losses
        for module, value in zip((other.G, other.D, other.G_ema), expected):
            assert torch.equal(flat_parameters(module), value)
        state = common.load_checkpoint(path)
        assert state["kind"] == "reconstructor" and state["step"] == 16 and "D_opt" in state and "data_rng" in state
        common.save_checkpoint(tmp_path / "other.pt", {"kind": "genhead"})
        with pytest.raises(ValueError, match="not a reconstructor one"):
            other.load(tmp_path / "other.pt")


    def test_accumulated_phases_equal_the_whole_batch(self, trainer, monkeypatch):
        batch = trainer.sampler.sample(4)
        micro = split_triplets(batch, 2)
        assert batch.motion_scale.tolist() == [1.0, 1.0, 0.0, 0.0]
        assert [m.motion_scale.tolist() for m in micro] == [[1.0, 0.0], [1.0, 0.0]]  # the static half in each
        for j, m in enumerate(micro):
            fields = m.tensors()
            assert sorted(fields) == sorted(batch.tensors()) and m.image is None and batch.image is None
            for name, value in batch.tensors().items():
                assert torch.equal(fields[name], value[j::2]), name
        assert len(split_triplets(batch, 1)) == 1 and split_triplets(batch, 1)[0] is batch
        with pytest.raises(ValueError, match="must divide the batch"):
            split_triplets(batch, 3)
        # the same samples along every ray in both runs: no jitter, deterministic importance sampling
        options = {**trainer.G.config.rendering_options(), "jitter": "none", "det_importance": True}
        monkeypatch.setattr(trainer.G.config, "rendering_options", lambda: options)
        r = 16
        weights = {"l1": 1.0, "lpips": 1.0, "seg": 0.3, "depth": 1.0, "feature": 1.0, "triplane": 0.1,
                   "identity": 0.0, "adversarial": 0.01}
        # the conditioning: the same batch with every floating field nudged by one float32 rounding
        nudged = dataclasses.replace(batch, **{k: v * (1 + EPS32) for k, v in batch.tensors().items()
                                               if v.is_floating_point()})
        runs = {"whole": split_triplets(batch, 1), "split": split_triplets(batch, 2),
                "nudged": split_triplets(nudged, 1)}
        prepared = {run: [trainer.step_inputs(m, r, True) for m in micro] for run, micro in runs.items()}
        try:
            for phase in ("Gmain", "Dmain", "Dreg"):
                training_g = phase.startswith("G")
                module = trainer.G if training_g else trainer.D
                trainer.G.requires_grad_(training_g)
                trainer.D.requires_grad_(not training_g)
                results = {}
                for run, micro_batches in prepared.items():
                    module.zero_grad(set_to_none=True)
                    logged = trainer.accumulate_phase(phase, micro_batches, r, weights)
                    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                       for p in module.parameters()])
                    results[run] = grads, {k: float(v) for k, v in logged.items()}
                (whole, whole_logged), (split, split_logged), (nudge, _) = (results[k] for k in
                                                                            ("whole", "split", "nudged"))
                assert whole.norm() > 0, phase
                # the float32 sums over the 4 samples regrouped (matrix products of another size round
                # differently): through the reconstructor's depth that moves the gradient as much as a
                # rounding of the inputs does, so the bound is a few times the nudged batch's change
                # (and at least 64 float32 roundings); a change of what the samples see is far beyond it
                error = ((split - whole).norm() / whole.norm()).item()
                rounding = ((nudge - whole).norm() / whole.norm()).item()
                assert error < max(4 * rounding, 64 * EPS32), (phase, error, rounding)
                assert sorted(split_logged) == sorted(whole_logged)
                for name, value in whole_logged.items():
                    assert abs(split_logged[name] - value) <= 64 * EPS32 * abs(value), (name, split_logged[name],
                                                                                       value)
        finally:
            trainer.G.requires_grad_(True)
            trainer.D.requires_grad_(True)
            trainer.G.zero_grad(set_to_none=True)
            trainer.D.zero_grad(set_to_none=True)

    def test_identity_warning_names_the_switch(self, trainer):
        with pytest.warns(UserWarning, match="identity loss is off.*--identity-weights"):
            assert trainer._load_identity() is None


# ---------------------------------------------------------------------- config, command, LPIPS
def test_config_errors():
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        ReconstructorTrainingConfig(genhead="x", batch=0).check()
    with pytest.raises(ValueError, match="genhead .--genhead. must name"):
        ReconstructorTrainingConfig().check()
    with pytest.raises(ValueError, match="static_fraction"):
        ReconstructorTrainingConfig(genhead="x", static_fraction=1.5).check()
    with pytest.raises(ValueError, match="resolution_final must be at most 128"):
        ReconstructorTrainingConfig(genhead="x", resolution_final=256).check()
    with pytest.raises(ValueError, match="lpips_backbone"):
        ReconstructorTrainingConfig(genhead="x", lpips_backbone="alex").check()
    with pytest.raises(ValueError, match="adversarial_weight must be a finite number"):
        ReconstructorTrainingConfig(genhead="x", adversarial_weight=float("nan")).check()
    with pytest.raises(ValueError, match="motion_dim must be 109"):
        small_config(reconstructor={"motion_dim": 548}).check()
    with pytest.raises(ValueError, match="precision must be one of"):
        small_config(precision="fp16").check()
    with pytest.raises(ValueError, match=r"accumulate \(2\) must divide batch \(3\)"):
        small_config(batch=3, accumulate=2).check()
    with pytest.raises(ValueError, match="accumulate must be an int >= 1"):
        small_config(accumulate=0).check()
    with pytest.raises(ValueError, match="image_every must be an int >= 1"):
        small_config(image_every=0).check()
    small_config(image_every=None).check()


def test_bf16_is_refused_on_the_cpu(tmp_path, capsys):
    with pytest.raises(ValueError, match="precision 'bf16' needs a CUDA device"):
        ReconstructorTrainer(small_config(precision="bf16"))
    rc = cli_main(["train", "reconstructor", "--out", str(tmp_path / "out"), "--small", "--device", "cpu",
                   "--lpips-backbone", "random", "--precision", "bf16"])
    assert rc == 2 and "needs a CUDA device" in capsys.readouterr().err


def test_missing_vgg_error_says_what_to_place_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    with pytest.raises(perceptual.MissingWeightsError) as info:
        perceptual.build_lpips("pretrained")
    message = str(info.value)
    assert str(expected) in message and "vgg16-397923af.pth" in message and "random" in message
    with pytest.raises(ValueError, match="backbone must be one of"):
        perceptual.build_lpips("vgg")
    # the command stops with the same message before building any network
    rc = cli_main(["train", "reconstructor", "--out", str(tmp_path / "out"), "--small", "--device", "cpu",
                   "--lpips-backbone", "pretrained"])
    assert rc == 2 and str(expected) in capsys.readouterr().err
    # with the file in place, its features are the backbone's and the heads the package's own
    import lpips
    import torchvision
    expected.parent.mkdir(parents=True)
    vgg = torchvision.models.vgg16(weights=None)
    # only the feature layers are read: leaving out the 0.47 GB classifier keeps the file small
    torch.save({f"features.{k}": v for k, v in vgg.features.state_dict().items()}, expected)
    model = perceptual.build_lpips("pretrained")
    assert torch.equal(model.net.slice1[0].weight, vgg.features[0].weight)
    assert torch.equal(model.net.slice5._modules["28"].bias, vgg.features[28].bias)
    heads = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth"), map_location="cpu")
    assert torch.equal(model.lin0.model[1].weight, heads["lin0.model.1.weight"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_global_encoder_starts_from_the_cached_imagenet_resnet34(tmp_path, monkeypatch, capsys):
    from head4d.train import weights
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / weights.RESNET34_FILE
    with pytest.raises(weights.MissingWeightsError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ReconstructorTrainer(small_config(global_encoder_init="imagenet"))
    assert str(expected) in str(info.value) and "--global-encoder-init random" in str(info.value)
    rc = cli_main(["train", "reconstructor", "--out", str(tmp_path / "out"), "--small", "--device", "cpu",
                   "--lpips-backbone", "random", "--global-encoder-init", "imagenet"])
    assert rc == 2 and str(expected) in capsys.readouterr().err
    # with the file in place (torchvision's names; random stand-in weights), G and its EMA start from it
    import torchvision
    torch.manual_seed(3)
    source = {k: v for k, v in torchvision.models.resnet34(weights=None).state_dict().items() if "bn" not in k}
    expected.parent.mkdir(parents=True)
    torch.save(source, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ReconstructorTrainer(small_config(global_encoder_init="imagenet"))
    for module in (trainer.G, trainer.G_ema):
        trunk = module.encoder_global.encoder
        assert torch.equal(trunk.layer3[1].conv2.weight, source["layer3.1.conv2.weight"])
        assert torch.equal(trunk.conv1.weight[:, 3], source["conv1.weight"][:, 0] * 0.6)
    with pytest.raises(ValueError, match="global_encoder_init must be one of"):
        small_config(global_encoder_init="coco").check()


def test_cli_requires_genhead_without_small(tmp_path, capsys):
    rc = cli_main(["train", "reconstructor", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2 and "--genhead CKPT is needed" in capsys.readouterr().err


def test_cli_dry_run_small_writes_checkpoint_and_export(tmp_path, capsys):
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rc = cli_main(["train", "reconstructor", "--out", str(out), "--small", "--dry-run", "--device", "cpu",
                       "--batch", "1", "--lpips-backbone", "random", "--image-every", "1", "--precision", "fp32",
                       "--accumulate", "1"])
    assert rc == 0
    messages = " | ".join(str(w.message) for w in record)
    assert "untrained GenHead" in messages and "randomly initialised VGG16" in messages, messages
    state = common.load_checkpoint(out / common.CHECKPOINT_NAME)
    assert state["step"] == 2 and state["cur_nimg"] == 2 and state["config"]["dry_run"]
    printed = capsys.readouterr().out
    assert "step 1 " in printed and "step 2 " in printed and "Loss/G/lrecon_l1" in printed
    from head4d.models import Reconstructor
    exported = Reconstructor.load(out / "G_ema")
    for name, value in exported.state_dict().items():
        assert torch.equal(value, state["G_ema"][name]), name
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert state["config"]["image_every"] == 1 and state["config"]["precision"] == "fp32"
    # image grids at steps 1 and 2 (none again at the end): 3 rows (sources, targets, EMA renders) of
    # 4 tiles, 16^2 renders (the resolution before the fade) with 2-pixel gaps
    grids = sorted((out / "images").iterdir())
    assert [p.name for p in grids] == ["Images_source_target_ema-00000001.png", "Images_source_target_ema-00000002.png"]
    first, second = (decode_png(p.read_bytes()) for p in grids)
    assert first.shape == second.shape == (3 * 18 - 2, 4 * 18 - 2, 3)
    assert torch.equal(first[:34], second[:34])  # the fixed sources and targets
    assert not torch.equal(first[36:], second[36:])  # the EMA reconstructor moved
    assert first[:34].float().std() > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("Images/source_target_ema")] == [1, 2]


# ---------------------------------------------------------------------- torchrun
def test_torchrun_two_processes_hold_identical_weights(tmp_path):
    r0, r1 = run_under_torchrun("reconstructor", tmp_path)
    assert (r0["rank"], r1["rank"], r0["world_size"], r1["world_size"]) == (0, 1, 2, 2)
    assert r0["step"] == r1["step"] == 2 and r0["nimg"] == r1["nimg"] == 4
    assert r0["digests"] == r1["digests"]
    assert r0["losses"] == r1["losses"] and all(math.isfinite(v) for v in r0["losses"].values())
    state = common.load_checkpoint(tmp_path / common.CHECKPOINT_NAME)  # rank 0's
    assert state["step"] == 2 and {name: state_digest(state[name]) for name in ("G", "D", "G_ema")} == r0["digests"]
