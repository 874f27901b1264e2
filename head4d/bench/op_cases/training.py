"""Benchmark cases of the trainings: one whole training step (every phase's forward,
backward and optimizer step, and the EMA update) with head4d's kernels (each op on its
default) against the same step with every op on its plain-PyTorch reference
(``backend="torch"`` on the networks and :func:`head4d._backend.backend_scope` around
the step), in one run, on the same state and the same draws.

- ``train_genhead``: :meth:`head4d.train.genhead.GenHeadTrainer.step`.
- ``train_reconstructor``: :meth:`head4d.train.reconstructor.ReconstructorTrainer.step`,
  the triplets' online synthesis by the frozen GenHead included (it is part of every step's
  cost and runs on the same backend as the rest).

The pass is ``step`` (:data:`head4d.bench.case.STEP_PASS`): the case's ``run`` computes its
own gradients and updates the weights. Every call first restores the trainer to one
snapshot (weights, optimizer moments, EMA, counters) and reseeds its random draws, so
every timed call is the same step; the restore (a copy of the weights and moments, the
real-data stream's position) is
inside the timed region on both sides alike. The snapshot is taken after one warm-up
step, so Adam's moments are non-zero and its update ``m / (sqrt(v) + eps)`` is well
conditioned: a rounding-level gradient difference moves the update by the same relative
amount, not by a flipped sign.

GenHead: the step timed is the trainer's second (``step_index`` 1): ``Gmain`` and ``Dmain``, no
lazy regularization. The regularization phases run on every 4th (``Greg``, the density
term) and every 16th step (``Dreg``, R1 with its double backward); the step-0 row
``..._reg`` times a step with all four phases, so the amortized cost per step is
``step + (reg - step) * (1/4 + 1/16)``, roughly.

Reconstructor: the step timed is one of the adversarial stage, where 14 of the 15,000 kimg
of a run are spent: ``cur_nimg`` at the adversarial start (1000 kimg), ``step_index`` 1, so
``Gmain`` (the image, segmentation and adversarial terms; the depth, feature and
triplane terms are over; the identity term is off, as no identity weights are given) and
``Dmain``; LPIPS with a fixed random VGG backbone (``lpips_backbone="random"``: no weights
file is needed, and its cost is the pretrained one's) and the global encoder from random
weights (``global_encoder_init="random"``, for the same reason).

Output: the step's losses, sorted by name; the tolerance is :data:`STEP_TOLERANCE`
(relative norm): the generator's optimizer step sits between ``Gmain`` and ``Dmain``,
so ``Dmain``'s loss sees weights that differ by the two backends' gradient rounding times
the learning rate, on top of each pass's own float32 rounding over a whole model.

Goals (issue "Learning from synthetic data"): on an H100 at batch 8 per GPU, at least
2.5x the ``torch`` backend's images per second and at most half its peak memory; on the
CPU, at least 1.3x (one torch thread, the sizes below).

Sizes. CUDA: the released ``genhead-ffhq512`` generator and its dual discriminator at
512^2 (FP16 blocks as released), batch 2, and 8 too in the full mode (``--batch``
overrides); the reconstructor's training at its released sizes on an untrained released
GenHead, batch 1, and 4 too in the full mode (the reference at 8 would not fit in 80 GB: its
reconstructor alone keeps ~28 GB for the backward at batch 4, float32, counted on fake
tensors by ``benchmarks/reconstructor_memory.py``). CPU: GenHead reduced as in the ``genhead`` case (channel_base 1024,
channel_max 32, triplanes at 64^2, background at 32^2, 16^2 neural rendering with 48 + 48
samples) without the super-resolution, and a 16^2 discriminator narrowed to channel_base
256, channel_max 32 and a 2-layer camera mapping; batch 2. The reconstructor's training:
:meth:`ReconstructorTrainingConfig.small <head4d.train.reconstructor.ReconstructorTrainingConfig.small>`
(a 64^2 source, encoders at their released widths, one block each way, 16^2 renders, no
super-resolution, the small untrained GenHead) with the released 48 + 48 samples in both
renders, batch 2.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Callable, Dict, List, Optional

import torch

from ... import _backend
from ..case import REFERENCE, STEP_PASS, Case, Inputs, Settings, register
from .genhead import _fast_backends, _head

#: Relative-norm bound on a step's losses (module docstring).
STEP_TOLERANCE = 1e-3


def _genhead_training_config(cuda: bool, batch: int):
    from ...train.genhead import GenHeadTrainingConfig

    if cuda:
        return GenHeadTrainingConfig(batch=batch, log_every=10 ** 9, checkpoint_every=10 ** 9)
    genhead = dict(channel_base=1024, channel_max=32, triplane_resolution=64, background_resolution=32,
                   background_channel_base=256, background_channel_max=32, background_mapping_layers=2,
                   neural_rendering_resolution=16, mask_resolution=64, fine_resolution=12, coarse_resolution=4,
                   has_superresolution=False)
    discriminator = dict(channel_base=256, channel_max=32, num_fp16_res=0, mapping_kwargs={"num_layers": 2})
    return GenHeadTrainingConfig(batch=batch, genhead=genhead, discriminator=discriminator, device="cpu",
                                 log_every=10 ** 9, checkpoint_every=10 ** 9, density_reg_points=1000)


def _dataset(count: int, resolution: int, seed: int):
    """``count`` items ``(uint8 [3, R, R], float32 [437], uint8 [1, R, R])``: random images,
    the procedural dataset's label distribution (cameras, expressions, jaw) and foreground
    masks (255 inside a disc of radius 0.4 R at a random offset from the centre, 0 outside),
    so that the discriminator's real segmentation takes the masks' path."""
    from ...data.procedural import sample_procedural_labels

    gen = torch.Generator().manual_seed(seed)
    labels = sample_procedural_labels(count, gen).float()
    images = torch.randint(0, 256, (count, 3, resolution, resolution), generator=gen, dtype=torch.uint8)
    centres = (0.5 + 0.1 * (torch.rand(count, 2, generator=gen) - 0.5)) * resolution
    pixel = torch.arange(resolution, dtype=torch.float32) + 0.5
    inside = ((pixel[None, None, :] - centres[:, 0, None, None]) ** 2
              + (pixel[None, :, None] - centres[:, 1, None, None]) ** 2) <= (0.4 * resolution) ** 2
    masks = (inside.to(torch.uint8) * 255).unsqueeze(1)
    return [(images[i], labels[i], masks[i]) for i in range(count)]


class _StepBench:
    """A trainer built once per device, its snapshot after one warm-up step, and the timed
    step: restore, reseed, one ``step()`` on the asked backend, the losses as a tensor."""

    def __init__(self, build: Callable[[torch.device], object], step_index: int, cur_nimg: Optional[int] = None):
        self.build, self.step_index, self.cur_nimg = build, step_index, cur_nimg
        self.trainers: Dict[str, object] = {}
        self.snapshots: Dict[str, dict] = {}

    def trainer(self, device: torch.device):
        key = str(device)
        if key not in self.trainers:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                trainer = self.build(device)
                trainer.step()  # warm-up: Adam's moments exist and are non-zero
            self.trainers[key] = trainer
            self.snapshots[key] = {name: copy.deepcopy(getattr(trainer, name).state_dict())
                                   for name in self._stateful(trainer)}
        return self.trainers[key]

    @staticmethod
    def _stateful(trainer) -> List[str]:
        # the networks, the optimizers and the real-data stream (its position)
        return [name for name in ("G", "D", "G_ema", "G_opt", "D_opt", "stream") if hasattr(trainer, name)]

    def run(self, inputs: Inputs, backend: str) -> torch.Tensor:
        seed = inputs["seed"]
        device = seed.device
        trainer = self.trainer(device)
        for name, state in self.snapshots[str(device)].items():
            # an optimizer adopts the tensors of the state it loads (and then updates them
            # in place), so it gets a copy; a module copies into its own tensors
            getattr(trainer, name).load_state_dict(copy.deepcopy(state) if name != "G" and name != "D"
                                                   and name != "G_ema" else state)
        trainer.step_index = self.step_index
        trainer.cur_nimg = self.step_index * trainer.config.batch if self.cur_nimg is None else self.cur_nimg
        torch.manual_seed(int(seed.item()))
        trainer.data_generator.manual_seed(int(seed.item()) + 1)
        reference = backend == REFERENCE
        _set_backend(trainer, "torch" if reference else None)
        try:
            with _backend.backend_scope("torch" if reference else None), torch.enable_grad():
                losses = trainer.step()
        finally:
            _set_backend(trainer, None)
        return torch.tensor([losses[k] for k in sorted(losses)], dtype=torch.float64, device=device)


def _set_backend(trainer, backend) -> None:
    from ...nn import set_stylegan2_backend

    trainer.G.backend = backend
    set_stylegan2_backend(trainer.D, backend)
    if getattr(trainer, "genhead", None) is not None:  # the reconstructor's frozen GenHead
        trainer.genhead.backend = backend


@register("train_genhead", whole_model=True)
def _train_genhead_cases(settings: Settings) -> List[Case]:
    """One GenHead training step (module docstring), without and with the lazy
    regularization phases."""
    device = settings.device
    cuda = device.type == "cuda"
    batches = settings.batches or ((2, 8) if cuda and settings.full else (2,))
    return [train_genhead_case(n, cuda, reg) for n in batches for reg in (False, True)]


def train_genhead_case(n: int, cuda: bool, reg: bool, config=None) -> Case:
    """The ``train_genhead`` case at batch ``n`` (``reg``: the step with every phase);
    ``config`` a :class:`~head4d.train.genhead.GenHeadTrainingConfig` in place of the
    module docstring's (its batch replaced by ``n``; for tests)."""
    from ...models import GenHeadConfig
    from ...train.genhead import GenHeadTrainer

    config = _genhead_training_config(cuda, n) if config is None else dataclasses.replace(config, batch=n)
    g = GenHeadConfig(**config.genhead)
    resolution = g.img_resolution if g.has_superresolution else g.neural_rendering_resolution

    def build(device: torch.device):
        cfg = copy.deepcopy(config)
        cfg.device = str(device)
        return GenHeadTrainer(cfg, _dataset(4 * n, resolution, seed=0), head_model=_head(device))

    bench = _StepBench(build, step_index=0 if reg else 1)

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        return {"seed": torch.tensor([1000 + seed], device=device)}

    label = (f"N{n}_img{g.img_resolution if g.has_superresolution else g.neural_rendering_resolution}"
             f"_R{g.neural_rendering_resolution}_S{g.depth_resolution}+{g.depth_resolution_importance}"
             f"_planes{g.triplane_resolution}_base{g.channel_base}_fp32" + ("_reg" if reg else ""))
    return Case(
        op="train_genhead",
        shape=label,
        passes=(STEP_PASS,),
        make_inputs=make_inputs,
        run=bench.run,
        grad_of=(),
        # rough: the generator's planes written and read in each G pass (two per step),
        # and the images D reads; the convolutions dominate
        nbytes={STEP_PASS: 2 * 6 * n * g.triplane_channels * g.triplane_resolution ** 2 * 4},
        flops={STEP_PASS: 0},
        dtype=torch.float32,
        backends=_fast_backends(torch.device("cuda" if cuda else "cpu")),
        measure_memory=True,
        tolerance=STEP_TOLERANCE,
    )


@register("train_reconstructor", whole_model=True)
def _train_reconstructor_cases(settings: Settings) -> List[Case]:
    """One reconstructor training step of the adversarial stage (module docstring)."""
    device = settings.device
    cuda = device.type == "cuda"
    batches = settings.batches or ((1, 4) if cuda and settings.full else (1,) if cuda else (2,))
    return [train_reconstructor_case(n, cuda) for n in batches]


def train_reconstructor_case(n: int, cuda: bool, config=None) -> Case:
    """The ``train_reconstructor`` case at batch ``n``; ``config`` a
    :class:`~head4d.train.reconstructor.ReconstructorTrainingConfig` in place of the module
    docstring's (its batch replaced by ``n``; for tests)."""
    from ...train.reconstructor import ReconstructorTrainer, ReconstructorTrainingConfig

    if config is None:
        common = dict(batch=n, lpips_backbone="random", global_encoder_init="random", log_every=10 ** 9,
                      checkpoint_every=10 ** 9)
        if cuda:
            config = ReconstructorTrainingConfig(untrained_genhead={}, **common)
        else:  # the small config with the released 48 + 48 samples, in the synthesis too
            from ...train.genhead import small_genhead_config
            from ...train.reconstructor import small_reconstructor_config

            samples = dict(depth_resolution=48, depth_resolution_importance=48)
            config = ReconstructorTrainingConfig.small(device="cpu", reconstructor={**small_reconstructor_config(),
                                                                                    **samples},
                                                       untrained_genhead={**small_genhead_config(), **samples},
                                                       **common)
    else:
        config = dataclasses.replace(config, batch=n)

    def build(device: torch.device):
        cfg = copy.deepcopy(config)
        cfg.device = str(device)
        with warnings.catch_warnings():  # the untrained GenHead and the identity term's absence: known here
            warnings.simplefilter("ignore")
            return ReconstructorTrainer(cfg)

    bench = _StepBench(build, step_index=1, cur_nimg=int(config.adversarial_start_kimg * 1000))

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        return {"seed": torch.tensor([1000 + seed], device=device)}

    r = dict(config.reconstructor)
    label = (f"N{n}_src{r.get('source_resolution', 512)}_R{config.resolution_initial}"
             f"_S{r.get('depth_resolution', 48)}+{r.get('depth_resolution_importance', 48)}"
             f"_{'sr' if r.get('has_superresolution', True) else 'nosr'}_fp32")
    planes = 3 * 32 * (r.get("source_resolution", 512) // 2) ** 2 * 4  # the triplane, float32
    return Case(
        op="train_reconstructor",
        shape=label,
        passes=(STEP_PASS,),
        make_inputs=make_inputs,
        run=bench.run,
        grad_of=(),
        # rough: the triplane written and read in the synthesis and in each reconstructor pass
        nbytes={STEP_PASS: 3 * 2 * n * planes},
        flops={STEP_PASS: 0},
        dtype=torch.float32,
        backends=_fast_backends(torch.device("cuda" if cuda else "cpu")),
        measure_memory=True,
        tolerance=STEP_TOLERANCE,
    )
