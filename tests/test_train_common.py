"""``head4d.train.common``'s training infrastructure, and GenHead's trainer using it.

All on the CPU with tiny networks (``GenHeadTrainingConfig.small``, a 16^2 dual
discriminator) and in-memory datasets.

- Logs: ``ProgressLog`` writes ``log.jsonl`` and TensorBoard event files that tensorboard's
  ``EventAccumulator`` reads back (the scalars at their image counts, an image of the
  grid's size); image grids as PNG files of the right size, tiles in place, white gaps;
  without TensorBoard a warning (once) and the JSONL and PNG files still.
- Gradient accumulation: with per-sample-mean losses through a discriminator whose
  minibatch std couples samples in groups of 2, ``accumulate`` 2 and 4 give the gradients
  of the whole batch to float32 rounding (the strided split keeps the groups; a contiguous
  split, which changes them, is far off: the check can fail); micro-batches that would
  change the groups are clear errors; GenHead's R1 phase over 2 micro-batches equals it in
  one piece; a step with ``accumulate`` 2 runs.
- Data: ``InfiniteSampler``'s epochs are permutations shared out among the ranks;
  ``BatchStream`` with 2 workers yields the batches of 0 workers, and continues exactly
  from a stored position; the trainer's batches are the same with 2 workers, and a run
  with a worker resumed with none takes the same next step, bit for bit.
- Mixed precision: the StyleGAN2 layers work under autocast (bfloat16 outputs near the
  float32 ones); ``"bf16"`` on the CPU is refused (trainer and command); the autocast
  mechanism itself (allowed on the CPU here) autocasts inside the StyleGAN2 blocks only:
  every other module of G and D (the mappings, the decoder, the discriminator's camera
  mapping and epilogue) runs with autocast off, the blocks compute in bfloat16, the renders, planes and logits
  are float32, and ``full_precision`` turns it off; on CUDA (``gpu`` marker) a ``bf16``
  training step has finite losses.
"""
import io
import json
import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import head4d.nn as hnn
from head4d.cli import main as cli_main
from head4d.media import decode_png, to_uint8
from head4d.train import common
from head4d.train.genhead import GenHeadTrainer, GenHeadTrainingConfig

from genhead_testing import camera
from genhead_testing import make_dataset

EPS32 = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------- logs
def _read_events(out_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_progress_log_writes_tensorboard_jsonl_and_png_grids(tmp_path):
    stream = io.StringIO()
    log = common.ProgressLog(tmp_path, total_images=100, stream=stream)
    assert log.tensorboard
    log.report(1, 4, {"Loss/G/loss": 0.75, "Loss/D/loss": 1.25})
    log.report(2, 8, {"Loss/G/loss": 0.5, "Loss/D/loss": 1.5})
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 8, 6, generator=gen) * 2.4 - 1.2  # beyond [-1, 1]: clamped
    path = log.images(2, "Images/fakes", images, cur_nimg=8)
    log.close()

    lines = stream.getvalue().splitlines()
    assert lines[-1].startswith("step 2 kimg 0.008 img/s ") and "Loss/G/loss 0.5 " in lines[-1] and " eta " in lines[-1]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["nimg"], r["Loss/D/loss"]) for r in records] == [(1, 4, 1.25), (2, 8, 1.5)]

    events = _read_events(tmp_path)
    scalars = events.Tags()["scalars"]
    assert {"Loss/G/loss", "Loss/D/loss", "Progress/images_per_second"} <= set(scalars)
    assert [(e.step, e.value) for e in events.Scalars("Loss/G/loss")] == [(4, 0.75), (8, 0.5)]
    # 5 tiles in ceil(sqrt(5)) = 3 columns, 2 rows, 2-pixel gaps: 2 * (8 + 2) - 2 by 3 * (6 + 2) - 2
    (image_event,) = events.Images("Images/fakes")
    assert (image_event.step, image_event.height, image_event.width) == (8, 18, 22)

    assert path == tmp_path / "images" / "Images_fakes-00000002.png"
    grid = decode_png(path.read_bytes())
    assert grid.shape == (18, 22, 3)
    for i in range(5):
        row, col = divmod(i, 3)
        tile = grid[row * 10:row * 10 + 8, col * 8:col * 8 + 6]
        assert torch.equal(tile, to_uint8((images[i].clamp(-1, 1) + 1) / 2)), i
    assert torch.all(grid[8:10] == 255) and torch.all(grid[:, 6:8] == 255)
    assert torch.all(grid[10:, 16:] == 255)  # the missing sixth tile stays blank
    with pytest.raises(ValueError, match=r"images must be a floating tensor \[N >= 1, 3, H, W\]"):
        common.image_grid(torch.zeros(2, 1, 4, 4))


def test_progress_log_without_tensorboard_warns_once_and_keeps_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import now raises ImportError
    monkeypatch.setattr(common, "_TENSORBOARD_WARNED", False)
    with pytest.warns(RuntimeWarning, match="tensorboard"):
        log = common.ProgressLog(tmp_path / "a", total_images=None, stream=io.StringIO())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second log warns no more
        other = common.ProgressLog(tmp_path / "b", total_images=None, stream=log.stream)
    assert not log.tensorboard and not other.tensorboard
    log.report(1, 2, {"Loss/D/loss": 1.0})
    path = log.images(1, "Images/reals", torch.zeros(1, 3, 4, 4))
    log.close()
    assert decode_png(path.read_bytes()).shape == (4, 4, 3)
    assert (tmp_path / "a" / "log.jsonl").read_text().count("\n") == 1
    assert not list((tmp_path / "a").glob("events.out.tfevents.*"))
    # rank != 0 writes nothing
    quiet = common.ProgressLog(tmp_path / "c", total_images=None, enabled=False)
    quiet.report(1, 2, {"x": 1.0})
    assert quiet.images(1, "t", torch.zeros(1, 3, 4, 4)) is None and not (tmp_path / "c").exists()


# ---------------------------------------------------------------------- gradient accumulation
def _discriminator(mbstd_group_size=2):
    torch.manual_seed(3)
    D = hnn.DualDiscriminatorDeform(c_dim=25, img_resolution=16, channel_base=256, channel_max=16, num_fp16_res=0,
                                    has_superresolution=False, epilogue_kwargs={"mbstd_group_size": mbstd_group_size})
    with torch.no_grad():
        for name, p in D.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape))
    return D


def _discriminator_batch(n, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 16, 16, generator=gen), "uv": torch.randn(n, 3, 16, 16, generator=gen),
            "seg": torch.randn(n, 1, 16, 16, generator=gen), "c": camera(n) + 0.05 * torch.randn(n, 25, generator=gen)}


def _gradients(D, micro_batches):
    D.zero_grad(set_to_none=True)

    def loss_fn(micro):
        logits = D({k: micro[k] for k in ("image", "uv", "seg")}, micro["c"], img_name="image")
        loss = F.softplus(logits).mean()  # a per-sample mean
        return loss, {"loss": loss}

    logged = common.accumulate_gradients(micro_batches, loss_fn)
    return torch.cat([p.grad.reshape(-1) for p in D.parameters()]), logged["loss"]


def test_accumulation_equals_one_batch_through_minibatch_std():
    D = _discriminator(mbstd_group_size=2)
    batch = _discriminator_batch(8)
    whole, whole_loss = _gradients(D, common.split_microbatches(batch, 1))
    assert whole.norm() > 0
    # float32 sums over 8 samples regrouped: a few roundings per term, relative to the norm
    tol = 16 * EPS32
    for accumulate in (2, 4):
        assert common.check_microbatch(8, accumulate, 2) == 8 // accumulate
        micro = common.split_microbatches(batch, accumulate)
        assert len(micro) == accumulate and micro[1]["image"].shape[0] == 8 // accumulate
        assert torch.equal(micro[1]["image"][1], batch["image"][1 + accumulate])  # strided
        grads, loss = _gradients(D, micro)
        assert (grads - whole).norm() / whole.norm() < tol, accumulate
        assert abs(float(loss) - float(whole_loss)) <= 4 * EPS32 * abs(float(whole_loss))
    # a contiguous split puts other samples together in the minibatch-std groups: not equal
    contiguous = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    grads, _ = _gradients(D, contiguous)
    assert (grads - whole).norm() / whole.norm() > 1e3 * tol


def test_microbatch_errors():
    with pytest.raises(ValueError, match=r"micro-batch \(8 / accumulate 8 = 1 samples\) must be a multiple of the "
                                         r"discriminator's minibatch-std group size \(2\)"):
        common.check_microbatch(8, 8, 2)
    with pytest.raises(ValueError, match="must divide the batch per process"):
        common.check_microbatch(6, 4, 2)
    with pytest.raises(ValueError, match="groups the whole batch"):
        common.check_microbatch(8, 2, None)
    with pytest.raises(ValueError, match="accumulate must be an int >= 1"):
        common.check_microbatch(8, 0, 2)
    assert common.check_microbatch(8, 8, 0) == 1 and common.check_microbatch(8, 1, None) == 8
    with pytest.raises(ValueError, match="same number of samples"):
        common.split_microbatches({"a": torch.zeros(4), "b": torch.zeros(2)}, 2)
    with pytest.raises(ValueError, match="micro_batches is empty"):
        common.accumulate_gradients([], lambda micro: (torch.zeros(()), {}))
    dataset = make_dataset(4)
    with pytest.raises(ValueError, match="minibatch-std group size"):
        GenHeadTrainer(GenHeadTrainingConfig.small(batch=2, accumulate=2), dataset)
    with pytest.raises(ValueError, match=r"accumulate \(2\) must divide batch \(3\)"):
        GenHeadTrainingConfig.small(batch=3, accumulate=2).check()


def test_genhead_r1_phase_accumulated_equals_one_piece():
    dataset = make_dataset(4)
    grads = {}
    for accumulate in (1, 2):
        trainer = GenHeadTrainer(GenHeadTrainingConfig.small(batch=4, accumulate=accumulate, seed=2), dataset)
        batch = trainer.sample_batch()
        trainer.D_opt.zero_grad(set_to_none=True)
        logged = trainer.accumulate_phase("Dreg", batch, 0.0, None)
        grads[accumulate] = (torch.cat([p.grad.reshape(-1) for p in trainer.D.parameters() if p.grad is not None]),
                             float(logged["Loss/D/reg"]), batch["real_img"])
        trainer.close()
    assert torch.equal(grads[1][2], grads[2][2])  # the same real batch
    assert grads[1][0].norm() > 0 and grads[1][1] > 0
    # a double backward in float32, the sums over 4 samples regrouped
    assert (grads[2][0] - grads[1][0]).norm() / grads[1][0].norm() < 64 * EPS32
    assert abs(grads[2][1] - grads[1][1]) <= 16 * EPS32 * grads[1][1]


def test_genhead_step_with_accumulation_runs():
    trainer = GenHeadTrainer(GenHeadTrainingConfig.small(batch=4, accumulate=2), make_dataset(4))
    assert trainer.micro_batch == 2
    losses = trainer.step()
    assert set(losses) >= {"Loss/G/loss", "Loss/D/loss", "Loss/D/reg", "Loss/G/TVloss"}
    assert all(math.isfinite(v) for v in losses.values()) and trainer.cur_nimg == 4
    trainer.close()


# ---------------------------------------------------------------------- data
def test_infinite_sampler_epochs_and_ranks():
    size, world = 5, 2
    ranks = [common.InfiniteSampler(size, seed=7, rank=r, world_size=world) for r in range(world)]
    streams = [[s.index(p) for p in range(10)] for s in ranks]
    merged = [streams[g % world][g // world] for g in range(20)]  # the global order
    for epoch in range(4):
        assert sorted(merged[epoch * size:(epoch + 1) * size]) == list(range(size))
    assert merged[:size] != merged[size:2 * size] or merged[:size] != merged[2 * size:3 * size]
    late = common.InfiniteSampler(size, seed=7, rank=1, world_size=world, start=6)
    it = iter(late)
    assert [next(it) for _ in range(4)] == streams[1][6:10]
    other_seed = common.InfiniteSampler(size, seed=8, rank=0, world_size=world)
    assert [other_seed.index(p) for p in range(10)] != streams[0]
    with pytest.raises(ValueError, match="rank must be < world_size"):
        common.InfiniteSampler(5, rank=2, world_size=2)


def _read(stream, count):
    return [stream.next() for _ in range(count)]


def test_batch_stream_workers_and_resume():
    dataset = make_dataset(7)
    plain = common.BatchStream(dataset, 3, seed=4, workers=0)
    expected = _read(plain, 5)
    state = plain.state_dict()
    assert state["position"] == 15
    following = _read(plain, 2)
    workers = common.BatchStream(dataset, 3, seed=4, workers=2)
    try:
        got = _read(workers, 5)
        workers.load_state_dict(state)  # back to position 15 (its workers had prefetched beyond)
        got_following = _read(workers, 2)
    finally:
        workers.close()
    for (a, la), (b, lb) in zip(expected + following, got + got_following):
        assert a.dtype == torch.uint8 and a.shape == (3, 3, 16, 16)
        assert torch.equal(a, b) and torch.equal(la, lb)
    images = torch.stack([x for x, _ in dataset])
    index = [common.InfiniteSampler(7, seed=4).index(p) for p in range(3)]
    assert torch.equal(expected[0][0], images[index])
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        common.BatchStream(dataset, 3, workers=-1)


def test_genhead_trainer_batches_same_with_workers():
    dataset = make_dataset(4)
    batches = []
    for workers in (0, 2):
        trainer = GenHeadTrainer(GenHeadTrainingConfig.small(workers=workers, seed=3), dataset)
        try:
            batches.append([trainer.sample_batch() for _ in range(3)])
        finally:
            trainer.close()
    for a, b in zip(*batches):
        for key in ("real_img", "real_labels", "gen_labels"):
            assert torch.equal(a[key], b[key]), key


def test_resume_bit_exact_across_worker_counts(tmp_path):
    """A run with a data worker process saved after step 1 and resumed with none takes the same step 2."""
    dataset = make_dataset(4)
    config = dict(seed=5, batch=2, workers=1)
    trainer = GenHeadTrainer(GenHeadTrainingConfig.small(**config), dataset)
    try:
        trainer.step()
        path = trainer.save(tmp_path / common.CHECKPOINT_NAME)
        expected = trainer.step()
        expected_g = torch.cat([p.detach().reshape(-1) for p in trainer.G.parameters()])
    finally:
        trainer.close()
    other = GenHeadTrainer(GenHeadTrainingConfig.small(**dict(config, workers=0)), dataset)
    other.load(path)
    assert other.stream.position == 2
    assert other.step() == expected
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in other.G.parameters()]), expected_g)
    other.close()


# ---------------------------------------------------------------------- mixed precision
def test_bf16_refused_on_cpu(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="precision 'bf16' needs a CUDA device"):
        GenHeadTrainer(GenHeadTrainingConfig.small(precision="bf16", device="cpu"), make_dataset(2))
    with pytest.raises(ValueError, match="precision must be one of"):
        GenHeadTrainingConfig.small(precision="fp16").check()
    from head4d.train import genhead as genhead_module

    monkeypatch.setattr(genhead_module, "_open_dataset", lambda config: make_dataset(2))
    rc = cli_main(["train", "genhead", "--data", "unused", "--out", str(tmp_path), "--small", "--dry-run",
                   "--device", "cpu", "--precision", "bf16"])
    assert rc == 2 and "precision 'bf16' needs a CUDA device" in capsys.readouterr().err


def test_stylegan2_layers_under_autocast():
    """head4d's StyleGAN2 layers take their bias in the dtype of the product, which autocast
    makes bfloat16: the outputs are bfloat16 and within bfloat16 rounding of float32's
    (inputs and output rounded to 8 significant bits, float32 sums in between)."""
    torch.manual_seed(0)
    fc = hnn.FullyConnectedLayer(64, 32, activation="lrelu", bias_init=0.3)
    conv = hnn.Conv2dLayer(8, 16, kernel_size=3, activation="lrelu", down=2)
    with torch.no_grad():
        conv.bias.normal_()
    x, image = torch.randn(4, 64), torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        want = (fc(x), conv(image))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = (fc(x), conv(image))
    tol = 2 * torch.finfo(torch.bfloat16).eps
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and w.dtype == torch.float32
        assert (g.float() - w).abs().max() <= tol * w.abs().max()


def _record_autocast(modules):
    """Forward pre-hooks recording, per module call, whether CPU autocast is on (registered
    after the mixed-precision hooks, so they see the block's own region)."""
    seen = {}
    handles = []
    for prefix, root in modules.items():
        for name, module in root.named_modules():
            def hook(module, args, name=f"{prefix}.{name}" if name else prefix):
                seen.setdefault(name, set()).add(torch.is_autocast_enabled("cpu"))
            handles.append(module.register_forward_pre_hook(hook))
    return seen, handles


def test_autocast_only_inside_stylegan2_blocks():
    trainer = GenHeadTrainer(GenHeadTrainingConfig.small(), make_dataset(4))
    precision = common.MixedPrecision("bf16", "cpu", allow_cpu=True)
    assert precision.autocast_blocks([trainer.G, trainer.D]) == 9  # backbone 4, background 3, D 2
    block_names = {f"{prefix}.{name}" for prefix, root in (("G", trainer.G), ("D", trainer.D))
                   for name, m in root.named_modules() if isinstance(m, (hnn.SynthesisBlock, hnn.DiscriminatorBlock))}
    block_outputs = {}

    def keep_dtype(module, args, output):
        block_outputs[module] = output[0].dtype

    for root in (trainer.G, trainer.D):
        for m in root.modules():
            if isinstance(m, (hnn.SynthesisBlock, hnn.DiscriminatorBlock)):
                m.register_forward_hook(keep_dtype)
    seen, _ = _record_autocast({"G": trainer.G, "D": trainer.D})
    batch = trainer.sample_batch()
    gen_c = batch["gen_labels"][0][:, :25]
    fake = trainer.run_G(batch["gen_z"][0], batch["gen_labels"][0], 0.5)
    logits = trainer.run_D(fake, gen_c, 0.0)
    logits.sum().backward()
    assert not torch.is_autocast_enabled("cpu")
    inside = {name for name, states in seen.items() if any(name == b or name.startswith(b + ".") for b in block_names)}
    assert inside and all(seen[name] == {True} for name in inside)
    outside = set(seen) - inside
    # the mappings, the decoder, D's camera mapping and epilogue: float32 regions
    assert {"G.backbone.mapping", "G.background.mapping", "G.decoder", "D.mapping", "D.b4"} <= outside
    assert all(seen[name] == {False} for name in outside), {n: seen[n] for n in outside if seen[n] != {False}}
    assert set(block_outputs.values()) == {torch.bfloat16}
    for key in ("image", "image_raw", "opacity", "planes", "uv", "seg"):
        assert fake[key].dtype == torch.float32, key
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    grads = [p.grad for p in trainer.D.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # full_precision: the blocks in float32, no autocast anywhere
    block_outputs.clear()
    seen.clear()
    with precision.full_precision():
        trainer.run_D(fake, gen_c, 0.0)
    assert set(block_outputs.values()) == {torch.float32} and all(v == {False} for v in seen.values())
    # G_ema (copied before) has no hooks; removing them restores float32 blocks
    block_outputs.clear()
    precision.remove()
    trainer.run_D(fake, gen_c, 0.0)
    assert set(block_outputs.values()) == {torch.float32}
    trainer.close()


@pytest.mark.gpu
def test_bf16_training_step_on_cuda():
    trainer = GenHeadTrainer(GenHeadTrainingConfig.small(precision="bf16", device="cuda", batch=4, accumulate=2),
                             make_dataset(4))
    try:
        for _ in range(2):
            losses = trainer.step()
            assert all(math.isfinite(v) for v in losses.values()), losses
        assert all(torch.isfinite(p).all() for p in trainer.G.parameters())
    finally:
        trainer.close()
