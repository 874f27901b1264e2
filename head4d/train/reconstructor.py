"""The reconstructor's training (Portrait4D stage two): :class:`ReconstructorTrainer`,
:func:`train_reconstructor`.

The data is synthetic and online: every step draws N fresh (source, driver, target)
triplets from a frozen GenHead (:class:`~head4d.synthesis.TripletSampler`: one identity per
triplet, the target shows the driver's motion from another camera; the last
``floor(N * static_fraction)`` rows are static, one expression for all three views, and
are run with motion scale 0: Portrait4D's disentangled learning as its released code does
it, a fixed split rather than a probability). The student :class:`~head4d.models.Reconstructor`
encodes the source image (view 0, resized to its source resolution) with the source's
motion, re-enacts it with the driver's motion (view 1) and renders it with the target's
camera (view 2); every loss compares that render with the target view. Motions are the
sampler's 109-number FLAME motions (expression, jaw, eyes), so the reconstructor is built
with ``motion_dim`` 109 (Portrait4D's FLAME-motion option; its default PD-FGC motion
needs an image motion encoder head4d does not have). The sampler's neck pose is always 0,
for which the reconstructor's neck warp is the identity, so the render gets no codes.

One training step (``step``; N triplets per process, ``cur_nimg`` images seen so far by all
processes) runs StyleGAN2's phases, each with its own optimizer step:

- ``Gmain`` (every step), the sum of (r the neural rendering resolution of the step):

  * L1 and LPIPS (VGG; :func:`head4d.train.perceptual.build_lpips`) on four image pairs
    (:func:`image_losses`), each a mean over its pixels / samples, weight 1: the
    super-resolved image against the target's (only with a super-resolution); the raw image
    against the target's image resized to r (antialiased bilinear); the raw image without
    background against the resized target times its foreground ``(seg + 1) / 2`` over black;
    the reconstructor's background RGB against GenHead's background RGB (both resized to r;
    when both have a background).
  * segmentation (:func:`segmentation_loss`): L1 between ``2 * opacity - 1`` and the
    target's, weight ``seg_weight`` 0.3.
  * before ``warmup_kimg`` (400) kimg only: depth (:func:`depth_loss`, L1 weighted by the
    target's foreground, weight ``depth_weight`` 1), feature maps (:func:`feature_loss`:
    the 32-channel feature image without background against GenHead's feature image times
    its foreground, plus the two backgrounds' 32 features, weight ``feature_weight`` 1) and
    triplane features (:func:`triplane_feature_loss`: the reconstructor's triplane read at
    the sampler's 4,000 target points against GenHead's features there, weight
    ``triplane_weight`` 0.1). These weights are those of the released loss code, which adds
    depth and feature maps at weight 1 and only the triplane term times 0.1.
  * from ``identity_start_kimg`` (400) kimg: the identity loss ``mean(1 - cos)`` of an ArcFace
    network between the super-resolved render and the target (weight 1), both aligned to
    ArcFace's crop by the five face points of the target's FLAME mesh projected with the
    target camera (:meth:`ReconstructorTrainer.face_points`,
    :mod:`head4d.train.identity`), when ``identity_weights`` names the network's weights;
    otherwise the term is off, with a warning.
  * from ``adversarial_start_kimg`` (1000) kimg: ``adversarial_weight`` (0.01) times the
    non-saturating ``softplus(-D(fake))``.

- ``Greg`` (every ``g_reg_interval`` = 16 steps, loss times the interval): the density TV
  term (:func:`density_tv_loss`): 1000 points uniform in ``[-1, 1]^3`` per sample and the
  same points moved by ``N(0, 1) * 0.004 * box_warp``, L1 between the raw densities of the
  re-enacted triplane at the two, times ``density_reg`` (0.25); a fresh encoder pass.
- ``Dmain`` and ``Dreg`` only from ``adversarial_start_kimg`` kimg (the discriminator is
  built from the start; its phases are skipped before): ``softplus(D(fake)) +
  softplus(-D(real))`` with the fakes from a fresh generator pass, and R1 every
  ``d_reg_interval`` = 16 steps (:func:`head4d.train.genhead.r1_penalty`, gammas 1 / uv 10 /
  seg 1), no blur (Portrait4D's blur sigma is 0 for this training).

The discriminator (:class:`~head4d.nn.DualDiscriminatorDeform`, 10 channels as in
GenHead's training) sees, for the fakes: the super-resolved image, the raw image, the
correspondence map of the target's FLAME codes under the target camera, and ``seg = 2 *
opacity - 1``; for the reals the target view's image, its resized raw image, the same
correspondence map and the target's seg; both conditioned on the target camera. Without a
super-resolution the raw images are resized to the discriminator's resolution.

Schedules: the neural rendering resolution fades from ``resolution_initial`` (64) to
``resolution_final`` (128) over ``resolution_fade_kimg`` (1000) kimg starting when the
adversarial term starts: ``r = rint(64 * (1 - a) + 128 * a)``, ``a = clamp((cur_nimg - 1000k)
/ 1000k, 0, 1)``, rendered at that r directly (:func:`neural_resolution_at`); the depth and
feature targets are GenHead's renders (at its resolution, resized to r when they differ,
which the released schedule never needs: their terms end before the fade starts). The
gradients of the point decoder (``decoder``) and the super-resolution are zeroed in the
generator phases while ``cur_nimg <= freeze_kimg * 1000`` (1000 kimg,
:func:`frozen_parameter_names`), as the paper and the released loop's comment state it (the
released loop compares its phase names, ``Gmain`` / ``Greg``, with ``'G'``, so as released
the zeroing never happens; ``freeze_kimg=None`` reproduces that).

Defaults (:class:`ReconstructorTrainingConfig`) are the released v1 settings
(``portrait4d-genhead512``): Adam (0.9, 0.999), eps 1e-5, lr 1e-4 for G and D, both then
adjusted for lazy regularization (interval 16: lr times 16/17, betas to the power 16/17), 15,000
kimg, GenHead truncation 0.95, static fraction 0.5, EMA half-life ``10 * B / 32`` kimg for a
total batch B (10 at upstream's 32, 8 GPUs of 4), ramp-up 0.05; ``batch`` is per process.
The global encoder's ResNet-34 trunk starts from torchvision's cached ImageNet weights, as
upstream's does (``global_encoder_init``). Gaps: the identity loss's five face points are mesh vertices picked by a rule (eyeball centres, nose
tip, mouth corners), where upstream projects FLAME's landmark embedding, which head4d does
not ship.

Infrastructure (:mod:`head4d.train.common`, as GenHead's training uses it): ``precision
"bf16"`` (CUDA only) autocasts the StyleGAN2 convolution blocks to bfloat16 (the
reconstructor's super-resolution and background generator where it has them, and the
discriminator's blocks; :class:`~head4d.train.common.MixedPrecision`): the encoders, the
transformer, the triplane decoder, the renderer, LPIPS, the identity network, the losses
and R1 stay float32, and so does the frozen GenHead's synthesis. ``accumulate`` splits
each step's triplets into strided micro-batches (:func:`split_triplets`: micro-batch ``j``
holds rows ``j, j + k, ...`` of every :class:`~head4d.synthesis.TripletBatch` field), each
phase's loss divided by ``k`` before its backward, one optimizer step per phase. Every row
keeps its motion scale, so the step trains on exactly the whole batch's dynamic and
static rows; the static rows are the batch's last ``s``, and a micro-batch holds ``s / k``
of them when ``k`` divides ``s`` (the default batches: half of each micro-batch static),
otherwise the micro-batches' counts differ by one. That does not change the gradient:
every loss is a mean over the samples, the reconstructor has no layer coupling samples
(no batch normalization), and the discriminator's minibatch-std groups are kept by the
strided split (:func:`~head4d.train.common.check_microbatch`). The random draws (the ray
marcher's jitter, the density TV's points) are made per micro-batch. Image grids
(:meth:`ReconstructorTrainer.snapshot_images`: the sources, the targets and the EMA
reconstructor's renders of a fixed set of triplets) every ``image_every`` steps and at the
end, as PNG files under ``out/images/`` and in TensorBoard.

Resuming: the checkpoint holds rank 0's random states and the sampler's generator; on
resume every other rank draws from states derived from the seed, its rank and the step.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..models import GenHead, Reconstructor, ReconstructorConfig
from ..models._common import triplane_point_decoder
from ..models.genhead import GenHeadConfig, clip_vertices
from ..models.reconstructor import FLAME_MOTION_DIM
from ..nn.discriminator import DualDiscriminatorDeform, filtered_resizing
from ..ops import sample_triplanes
from ..render.masks import correspondence_map
from ..synthesis import TripletBatch, TripletSampler
from .common import (EXPORT_NAME, CheckpointedTrainer, Distributed, MixedPrecision, accumulate_gradients,
                     check_microbatch, check_training_config, ema_beta, lazy_adam_settings, rank_seed, run_training,
                     split_microbatches, update_ema)
from .genhead import r1_penalty, small_discriminator_kwargs, small_genhead_config
from .perceptual import LPIPS_BACKBONES, build_lpips
from .weights import resnet34_state_dict

__all__ = ["ReconstructorTrainer", "ReconstructorTrainingConfig", "density_tv_loss", "depth_loss",
           "discriminator_loss", "feature_loss", "freezes_decoder_at", "frozen_parameter_names",
           "generator_adversarial_loss", "image_losses", "loss_weights_at", "neural_resolution_at", "phases_at",
           "reconstruction_targets", "segmentation_loss", "small_reconstructor_config", "split_triplets",
           "train_reconstructor", "triplane_feature_loss"]

NAME = "ReconstructorTrainer"
#: Where the global encoder's trunk starts from (``ReconstructorTrainingConfig.global_encoder_init``).
GLOBAL_ENCODER_INITS = ("imagenet", "random")
#: The phases of a step, in order.
PHASES = ("Gmain", "Greg", "Dmain", "Dreg")
#: The image pairs of the L1 and LPIPS terms: entries of the fake and target dicts.
IMAGE_PAIRS = ("image", "image_raw", "image_raw_wobg", "image_background")
#: The image grids' tag (rows: the sources, the targets, the EMA reconstructor's renders).
SNAPSHOT_TAG = "Images/source_target_ema"


def small_reconstructor_config() -> Dict[str, Any]:
    """A tiny reconstructor for CPU tests (``--small``): FLAME motion, a 64^2 source (a 32^2
    triplane), one canonicalization and one re-enactment block, 8 + 8 samples, 16^2
    renders, no super-resolution (the encoders keep the released widths)."""
    return dict(motion_dim=FLAME_MOTION_DIM, source_resolution=64, num_blocks_neutral=1, num_blocks_motion=1,
                depth_resolution=8, depth_resolution_importance=8, neural_rendering_resolution=32,
                has_superresolution=False, fine_resolution=12, coarse_resolution=4)


@dataclass
class ReconstructorTrainingConfig:
    """The reconstructor's training settings (defaults: the released v1 ones; see the module
    docstring).

    Run: ``genhead`` (the frozen GenHead: a Portrait4D ``genhead-*.pkl`` or a directory
    written by ``GenHead.save``), ``out``, ``batch`` (triplets per process), ``kimg``,
    ``seed``, ``resume``, ``dry_run`` (two steps), ``log_every`` / ``checkpoint_every``
    (steps), ``image_every`` (steps between image grids of the EMA reconstructor, also
    written at the end; None: at the end only), ``device`` (None: CUDA when available),
    ``untrained_genhead`` (GenHeadConfig fields of an untrained GenHead used when
    ``genhead`` is None; ``--small`` only).
    Speed: ``precision`` (``"fp32"``, or ``"bf16"`` on CUDA: bfloat16 autocast in the
    StyleGAN2 convolution blocks, :class:`~head4d.train.common.MixedPrecision`),
    ``accumulate`` (each step's ``batch`` triplets split into this many strided
    micro-batches, one optimizer step per phase; the micro-batch must be a multiple of the
    discriminator's minibatch-std group, :func:`~head4d.train.common.check_microbatch`).
    Networks: ``reconstructor`` (:class:`~head4d.models.ReconstructorConfig` fields over its
    defaults; ``motion_dim`` 109 and ``neural_rendering_resolution = resolution_final`` unless
    given), ``discriminator`` (:class:`~head4d.nn.DualDiscriminatorDeform` arguments),
    ``global_encoder_init`` (``"imagenet"``: the global encoder's ResNet-34 trunk starts from
    torchvision's cached ImageNet weights, as upstream's does,
    :meth:`~head4d.nn.EncoderGlobal.load_imagenet_trunk`; ``"random"``: from torchvision's
    random init, with a warning outside ``--small``; a resumed run reads no file).
    Loss networks: ``lpips_backbone`` (``"pretrained"`` or ``"random"``, see
    :func:`~head4d.train.perceptual.build_lpips`), ``identity_weights`` (the identity
    network's weights file, or None: the identity term is off).
    Synthesis: ``truncation_psi``, ``static_fraction``, ``triplane_points``.
    Optimizers: ``g_lr``, ``d_lr``, ``betas``, ``eps``, ``g_reg_interval``, ``d_reg_interval``.
    Losses: ``seg_weight``, ``depth_weight``, ``feature_weight``, ``triplane_weight``,
    ``warmup_kimg`` (the end of the depth, feature and triplane terms), ``identity_weight``,
    ``identity_start_kimg``, ``adversarial_weight``, ``adversarial_start_kimg``, ``r1_gamma``,
    ``r1_gamma_uv``, ``r1_gamma_seg``, ``density_reg``, ``density_reg_p_dist``,
    ``density_reg_points``. Schedules: ``resolution_initial``, ``resolution_final``,
    ``resolution_fade_kimg``, ``freeze_kimg`` (None: no gradient zeroing). EMA: ``ema_kimg``
    (None: ``10 * B / 32``), ``ema_rampup``.
    """

    genhead: Optional[str] = None
    out: str = "train_out"
    batch: int = 4
    kimg: float = 15000
    seed: int = 0
    resume: bool = False
    dry_run: bool = False
    log_every: int = 10
    checkpoint_every: int = 1000
    image_every: Optional[int] = 1000
    device: Optional[str] = None
    precision: str = "fp32"
    accumulate: int = 1
    untrained_genhead: Optional[Dict[str, Any]] = None
    reconstructor: Dict[str, Any] = field(default_factory=dict)
    discriminator: Dict[str, Any] = field(default_factory=dict)
    global_encoder_init: str = "imagenet"
    lpips_backbone: str = "pretrained"
    identity_weights: Optional[str] = None
    truncation_psi: float = 0.95
    static_fraction: float = 0.5
    triplane_points: int = 4000
    g_lr: float = 1e-4
    d_lr: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-5
    g_reg_interval: Optional[int] = 16
    d_reg_interval: Optional[int] = 16
    seg_weight: float = 0.3
    depth_weight: float = 1.0
    feature_weight: float = 1.0
    triplane_weight: float = 0.1
    warmup_kimg: float = 400.0
    identity_weight: float = 1.0
    identity_start_kimg: float = 400.0
    adversarial_weight: float = 0.01
    adversarial_start_kimg: float = 1000.0
    r1_gamma: float = 1.0
    r1_gamma_uv: float = 10.0
    r1_gamma_seg: float = 1.0
    density_reg: float = 0.25
    density_reg_p_dist: float = 0.004
    density_reg_points: int = 1000
    resolution_initial: int = 64
    resolution_final: int = 128
    resolution_fade_kimg: float = 1000.0
    freeze_kimg: Optional[float] = 1000.0
    ema_kimg: Optional[float] = None
    ema_rampup: Optional[float] = 0.05

    def __post_init__(self):
        for name in ("genhead", "identity_weights"):  # paths kept as text: checkpoints store plain values
            if isinstance(getattr(self, name), Path):
                setattr(self, name, str(getattr(self, name)))

    @classmethod
    def small(cls, **kwargs) -> "ReconstructorTrainingConfig":
        """The tiny CPU configuration (``--small``), with ``kwargs`` over it: the
        reconstructor of :func:`small_reconstructor_config`, a 32^2 discriminator, the
        untrained GenHead of :func:`~head4d.train.genhead.small_genhead_config` when no
        ``genhead`` is given, 2 triplets, 16^2 renders fading to 32^2, 256 triplane points,
        64 density points, the global encoder from random weights."""
        args = dict(reconstructor=small_reconstructor_config(), discriminator=small_discriminator_kwargs(),
                    untrained_genhead=small_genhead_config(), batch=2, triplane_points=256, density_reg_points=64,
                    resolution_initial=16, resolution_final=32, global_encoder_init="random")
        args.update(kwargs)
        return cls(**args)

    def ema_kimg_for(self, world_size: int) -> float:
        """The EMA half-life in kimg for ``world_size`` processes: ``ema_kimg``, or upstream's
        ``10 * B / 32`` with ``B = batch * world_size``."""
        return self.ema_kimg if self.ema_kimg is not None else 10 * self.batch * world_size / 32

    def check(self) -> None:
        """Raise ``ValueError`` (``TypeError`` for a wrongly typed path) naming the first bad
        setting."""
        op = "ReconstructorTrainingConfig"
        check_training_config(
            op, self, ints=("batch", "log_every", "checkpoint_every", "density_reg_points", "triplane_points",
                            "resolution_initial", "resolution_final", "accumulate", "image_every"),
            numbers=("kimg", "g_lr", "d_lr", "eps", "seg_weight", "depth_weight", "feature_weight", "triplane_weight",
                     "warmup_kimg", "identity_weight", "identity_start_kimg", "adversarial_weight",
                     "adversarial_start_kimg", "r1_gamma", "r1_gamma_uv", "r1_gamma_seg", "density_reg",
                     "density_reg_p_dist", "resolution_fade_kimg", "truncation_psi", "ema_kimg", "freeze_kimg"),
            optional=("image_every", "ema_kimg", "freeze_kimg"))
        if self.ema_rampup is not None and (isinstance(self.ema_rampup, bool) or
                                            not isinstance(self.ema_rampup, (int, float)) or self.ema_rampup < 0):
            raise ValueError(f"{op}: ema_rampup must be None or a number >= 0, got {self.ema_rampup!r}")
        if isinstance(self.static_fraction, bool) or not isinstance(self.static_fraction, (int, float)) \
                or not 0 <= self.static_fraction <= 1:
            raise ValueError(f"{op}: static_fraction must be a number in [0, 1], got {self.static_fraction!r}")
        if self.resolution_final > 128:
            raise ValueError(f"{op}: resolution_final must be at most 128 (the reconstructor renders at most 128^2 "
                             f"before its super-resolution), got {self.resolution_final}")
        if self.global_encoder_init not in GLOBAL_ENCODER_INITS:
            raise ValueError(f"{op}: global_encoder_init must be one of {GLOBAL_ENCODER_INITS}, got "
                             f"{self.global_encoder_init!r}")
        if self.lpips_backbone not in LPIPS_BACKBONES:
            raise ValueError(f"{op}: lpips_backbone must be one of {LPIPS_BACKBONES}, got {self.lpips_backbone!r}")
        for name in ("genhead", "identity_weights"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{op}: {name} must be a path or None, got {type(value).__name__}")
        if self.genhead is None and self.untrained_genhead is None:
            raise ValueError(f"{op}: genhead (--genhead) must name the frozen GenHead's checkpoint (a Portrait4D "
                             f"genhead-*.pkl or a GenHead.save directory); only --small runs without one")
        for name in ("reconstructor", "discriminator"):
            if not isinstance(getattr(self, name), Mapping):
                raise TypeError(f"{op}: {name} must be a dict of settings, got {type(getattr(self, name)).__name__}")
        motion_dim = self.reconstructor.get("motion_dim", FLAME_MOTION_DIM)
        if motion_dim != FLAME_MOTION_DIM:
            raise ValueError(f"{op}: reconstructor motion_dim must be {FLAME_MOTION_DIM} (the synthesis gives FLAME "
                             f"motions: expression 100, jaw 3, eyes 6; head4d has no PD-FGC motion encoder), got "
                             f"{motion_dim!r}")


# ---------------------------------------------------------------------- schedules
def neural_resolution_at(cur_nimg: int, initial: int, final: int, start_kimg: float, fade_kimg: float) -> int:
    """The neural rendering resolution after ``cur_nimg`` images: ``rint(initial * (1 - a) +
    final * a)`` with ``a = clamp((cur_nimg - start_kimg * 1000) / (fade_kimg * 1000), 0, 1)``
    (``a`` jumps from 0 to 1 at the start without a fade)."""
    if fade_kimg > 0:
        alpha = min(max((cur_nimg - start_kimg * 1e3) / (fade_kimg * 1e3), 0.0), 1.0)
    else:
        alpha = 1.0 if cur_nimg >= start_kimg * 1e3 else 0.0
    return int(round(initial * (1 - alpha) + final * alpha))  # round: half to even, as numpy's rint


def loss_weights_at(cur_nimg: int, config: ReconstructorTrainingConfig) -> Dict[str, float]:
    """Each generator term's weight after ``cur_nimg`` images (0: off): ``l1`` and ``lpips``
    1; ``seg``; ``depth``, ``feature``, ``triplane`` while ``cur_nimg < warmup_kimg * 1000``;
    ``identity`` from ``identity_start_kimg`` kimg; ``adversarial`` from
    ``adversarial_start_kimg`` kimg."""
    warm = cur_nimg < config.warmup_kimg * 1e3
    return {"l1": 1.0, "lpips": 1.0, "seg": config.seg_weight,
            "depth": config.depth_weight if warm else 0.0, "feature": config.feature_weight if warm else 0.0,
            "triplane": config.triplane_weight if warm else 0.0,
            "identity": config.identity_weight if cur_nimg >= config.identity_start_kimg * 1e3 else 0.0,
            "adversarial": config.adversarial_weight if cur_nimg >= config.adversarial_start_kimg * 1e3 else 0.0}


def phases_at(config: ReconstructorTrainingConfig, step_index: int, cur_nimg: int) -> List[str]:
    """The phases of step ``step_index`` (0-based) after ``cur_nimg`` images: ``Gmain``;
    ``Greg`` when the step is a multiple of ``g_reg_interval`` (and the density term is on);
    from the adversarial start ``Dmain``, and ``Dreg`` on multiples of ``d_reg_interval``
    (when some R1 gamma is > 0). An interval of None: every step, at weight 1."""
    out = ["Gmain"]
    if config.density_reg > 0 and step_index % (config.g_reg_interval or 1) == 0:
        out.append("Greg")
    if cur_nimg >= config.adversarial_start_kimg * 1e3:
        out.append("Dmain")
        gammas = config.r1_gamma + config.r1_gamma_uv + config.r1_gamma_seg
        if gammas > 0 and step_index % (config.d_reg_interval or 1) == 0:
            out.append("Dreg")
    return out


def freezes_decoder_at(config: ReconstructorTrainingConfig, cur_nimg: int) -> bool:
    """Whether the generator phases zero the decoder's and super-resolution's gradients after
    ``cur_nimg`` images: ``cur_nimg <= freeze_kimg * 1000`` (never with ``freeze_kimg`` None)."""
    return config.freeze_kimg is not None and cur_nimg <= config.freeze_kimg * 1e3


def frozen_parameter_names(model: torch.nn.Module) -> List[str]:
    """The parameters whose gradients are zeroed during the freeze: the point decoder's and
    the super-resolution's (upstream's rule on its names: ``superresolution`` in the name, or
    ``decoder`` but not ``encoder_global``, whose ASPP head is also called decoder)."""
    return [n for n, _ in model.named_parameters()
            if "superresolution" in n or ("decoder" in n and "encoder_global" not in n)]


# ---------------------------------------------------------------------- losses
def image_losses(fake: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                 lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(l1, lpips)``: the sums over the image pairs of :data:`IMAGE_PAIRS` present in both
    dicts of ``mean(|fake - target|)`` and ``mean(lpips(fake, target))`` (LPIPS's per-sample
    distances averaged over the batch). Images ``[N, 3, H, W]`` in [-1, 1], each pair one
    size."""
    l1 = lp = None
    for name in IMAGE_PAIRS:
        if name in fake and name in target:
            a, b = fake[name], target[name]
            term_l1, term_lp = (a - b).abs().mean(), lpips(a, b).mean()
            l1 = term_l1 if l1 is None else l1 + term_l1
            lp = term_lp if lp is None else lp + term_lp
    if l1 is None:
        raise ValueError(f"image_losses: no image pair: fake has {sorted(fake)}, target has {sorted(target)}")
    return l1, lp


def segmentation_loss(fake_seg: torch.Tensor, target_seg: torch.Tensor) -> torch.Tensor:
    """``mean(|target_seg - fake_seg|)``, segs ``[N, 1, r, r]`` in [-1, 1] (``2 * opacity - 1``)."""
    return (target_seg - fake_seg).abs().mean()


def depth_loss(fake_depth: torch.Tensor, target_depth: torch.Tensor, target_seg: torch.Tensor) -> torch.Tensor:
    """``mean(|target_depth - fake_depth| * (target_seg + 1) / 2)``: depth L1 on the target's
    foreground; all ``[N, 1, r, r]``."""
    return ((target_depth - fake_depth) * (target_seg + 1) * 0.5).abs().mean()


def feature_loss(fake_feature_wobg: torch.Tensor, fake_background: Optional[torch.Tensor],
                 target_feature: torch.Tensor, target_seg: torch.Tensor,
                 target_background: Optional[torch.Tensor]) -> torch.Tensor:
    """The feature-map term: ``mean(|(2 * ((target_feature + 1) / 2 * (target_seg + 1) / 2) -
    1) - fake_feature_wobg|) + mean(|target_background - fake_background|)`` (the second part
    only when both backgrounds are given).

    Args:
        fake_feature_wobg: ``[N, 32, r, r]`` the reconstructor's feature image without
            background, in [-1, 1].
        fake_background: ``[N, 32, r, r]`` its background features, ``2 * b - 1``.
        target_feature: ``[N, 32, r, r]`` GenHead's feature image (background composited).
        target_seg: ``[N, 1, r, r]`` the target's ``2 * opacity - 1``.
        target_background: ``[N, 32, r, r]`` GenHead's background features, ``2 * b - 1``.
    """
    masked = 2 * ((target_feature + 1) * 0.5 * (target_seg + 1) * 0.5) - 1
    loss = (masked - fake_feature_wobg).abs().mean()
    if fake_background is not None and target_background is not None:
        loss = loss + (target_background - fake_background).abs().mean()
    return loss


def triplane_feature_loss(planes: torch.Tensor, points: torch.Tensor, target_features: torch.Tensor,
                          box_warp: float, backend: Optional[str] = None) -> torch.Tensor:
    """``mean(|target_features - mean over the three planes of planes at points|)``.

    Args:
        planes: ``[N, 3, C, H, W]`` the reconstructor's triplane (Portrait4D layout).
        points: ``[N, K, 3]`` the target points (the neck warp is the identity: no warp).
        target_features: ``[N, K, C]`` GenHead's mean head-plane features there.
        box_warp: the planes' cube side.
        backend: :func:`~head4d.ops.sample_triplanes`' backend.
    """
    features = sample_triplanes(planes, points.to(planes.dtype), box_warp=box_warp, plane_layout="portrait4d",
                                reduce="mean", backend=backend)
    return (target_features - features).abs().mean()


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss ``mean(softplus(-D(fake)))`` (before its weight)."""
    return F.softplus(-fake_logits).mean()


def discriminator_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """``mean(softplus(D(fake))) + mean(softplus(-D(real)))``."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def density_tv_loss(sigma: torch.Tensor, sigma_moved: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * mean(|sigma - sigma_moved|)``: raw densities ``[N, M, 1]`` at points and at
    the same points slightly moved."""
    return F.l1_loss(sigma, sigma_moved) * weight


def _resized(image: torch.Tensor, size: int) -> torch.Tensor:
    return image if image.shape[-1] == size else filtered_resizing(image, size)


@torch.no_grad()
def reconstruction_targets(batch: TripletBatch, resolution: int) -> Dict[str, torch.Tensor]:
    """The target view's (view 2's) targets at neural rendering resolution r (images in
    [-1, 1]; resized with :func:`~head4d.nn.filtered_resizing` where sizes differ):

    ``image`` (GenHead's super-resolved image, only when it has one), ``image_raw`` (that
    image resized to r; without one, GenHead's raw image), ``seg`` (``2 * opacity - 1``),
    ``image_raw_wobg`` (``2 * ((image_raw + 1) / 2 * (seg + 1) / 2) - 1``), with a GenHead
    background ``background_feature`` (``2 * b - 1``, 32 channels) and ``image_background``
    (its first three), ``depth``, ``feature`` (GenHead's feature image), ``camera`` ``[N,
    25]``, ``triplane_points`` and ``triplane_features``."""
    r = resolution
    view = 2  # the target view
    out = {"seg": _resized(batch.opacity[:, view] * 2 - 1, r), "depth": _resized(batch.image_depth[:, view], r),
           "feature": _resized(batch.image_feature[:, view], r), "camera": batch.cameras[:, view],
           "triplane_points": batch.triplane_points, "triplane_features": batch.triplane_features}
    if batch.image is not None:
        out["image"] = batch.image[:, view]
        out["image_raw"] = filtered_resizing(batch.image[:, view], r)
    else:
        out["image_raw"] = _resized(batch.image_raw[:, view], r)
    out["image_raw_wobg"] = 2 * ((out["image_raw"] + 1) * 0.5 * (out["seg"] + 1) * 0.5) - 1
    if batch.background is not None:
        out["background_feature"] = _resized(batch.background * 2 - 1, r)
        out["image_background"] = out["background_feature"][:, :3]
    return out


def split_triplets(batch: TripletBatch, accumulate: int) -> List[TripletBatch]:
    """``batch``'s N triplets as ``accumulate`` strided micro-batches: micro-batch ``j`` holds
    rows ``j, j + accumulate, ...`` of every field (:func:`~head4d.train.common.split_microbatches`;
    fields that are None stay None). Each row keeps its ``motion_scale``: with the static
    rows the last ``s``, a micro-batch holds ``s / accumulate`` of them when ``accumulate``
    divides ``s``, else the counts differ by one between micro-batches (module docstring).

    Raises:
        ValueError: ``accumulate`` is not an int >= 1 or does not divide N.
    """
    if accumulate == 1:
        return [batch]
    return [dataclasses.replace(batch, **micro) for micro in split_microbatches(batch.tensors(), accumulate)]


# ---------------------------------------------------------------------- trainer
class ReconstructorTrainer(CheckpointedTrainer):
    """Networks, optimizers and one training step of the reconstructor's training.

    Args:
        config: :class:`ReconstructorTrainingConfig`.
        genhead: the frozen :class:`~head4d.models.GenHead` (None: read ``config.genhead``, or
            with neither, an untrained one of ``config.untrained_genhead``, with a warning).
        distributed: :class:`~head4d.train.common.Distributed` (None: one process).
        lpips: an LPIPS module (None: :func:`~head4d.train.perceptual.build_lpips` of
            ``config.lpips_backbone``).
        identity: an identity loss ``identity(fake, target, landmarks) -> [N]``, ``landmarks``
            ``[N, 5, 2]`` the pixel coordinates of the five face points in both images
            (:class:`~head4d.train.identity.IdentityLoss`'s ``forward``; None: from
            ``config.identity_weights`` when set, else off with a warning).

    Attributes: ``G`` (the reconstructor), ``D``, ``G_ema``, ``G_opt``, ``D_opt``,
    ``genhead``, ``sampler``, ``step_index``, ``cur_nimg``, ``last_losses``, ``micro_batch``
    (triplets per micro-batch), ``precision`` (:class:`~head4d.train.common.MixedPrecision`;
    with ``"bf16"`` its autocast hooks sit on ``G``'s and ``D``'s StyleGAN2 blocks, not on
    ``G_ema``'s or the frozen GenHead's). Call :meth:`close` to remove the hooks.
    Checkpoints: :class:`~head4d.train.common.CheckpointedTrainer` (``save``, ``load``,
    ``state``); the frozen GenHead is not stored (``config.genhead`` names it; an untrained
    one is rebuilt from the seed).
    """

    KIND = "reconstructor"

    def __init__(self, config: ReconstructorTrainingConfig, genhead: Optional[GenHead] = None,
                 distributed: Optional[Distributed] = None, lpips: Optional[torch.nn.Module] = None,
                 identity: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None):
        config.check()
        self.config = config
        self.dist = distributed if distributed is not None else Distributed(
            device=config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = self.dist.device
        self.precision = MixedPrecision(config.precision, self.device)  # refuses bf16 off CUDA, before any building
        # the loss networks first: a missing weights file stops the run before the big networks are built
        self.lpips = (lpips if lpips is not None else build_lpips(config.lpips_backbone, seed=config.seed))
        self.lpips = self.lpips.to(self.device).eval().requires_grad_(False)
        self.identity = identity if identity is not None else self._load_identity()
        trunk = self._imagenet_trunk()
        torch.manual_seed(config.seed)  # same initial weights on every rank (then broadcast)
        if genhead is None:
            genhead = self._load_genhead()
        if not isinstance(genhead, GenHead):
            raise TypeError(f"{NAME}: genhead must be a head4d.models.GenHead, got {type(genhead).__name__}")
        self.genhead = genhead.to(self.device).eval().requires_grad_(False)
        r_kwargs = dict(config.reconstructor)
        r_kwargs.setdefault("motion_dim", FLAME_MOTION_DIM)
        r_kwargs.setdefault("neural_rendering_resolution", config.resolution_final)
        self.G = Reconstructor(ReconstructorConfig(**r_kwargs), self.genhead.head_model)
        if trunk is not None:
            self.G.encoder_global.load_imagenet_trunk(trunk)
        self.G = self.G.to(self.device).train()
        rc = self.G.config
        if rc.has_superresolution and (not self.genhead.config.has_superresolution
                                       or self.genhead.config.img_resolution != rc.img_resolution):
            raise ValueError(f"{NAME}: a reconstructor with a super-resolution to {rc.img_resolution}^2 needs a "
                             f"GenHead with one to the same size (its target images)")
        d_kwargs = dict(config.discriminator)
        d_kwargs.setdefault("has_superresolution", rc.has_superresolution)
        d_kwargs.setdefault("img_resolution", rc.img_resolution if rc.has_superresolution else config.resolution_final)
        self.D = DualDiscriminatorDeform(c_dim=25, **d_kwargs).to(self.device).train()
        if self.D.has_superresolution != rc.has_superresolution:
            raise ValueError(f"{NAME}: the discriminator must have a super-resolution input exactly when the "
                             f"reconstructor has a super-resolution")
        self.dist.broadcast_parameters([self.G, self.D])
        mbstd = getattr(self.D.b4, "mbstd", None)
        self.micro_batch = check_microbatch(config.batch, config.accumulate,
                                            mbstd.group_size if mbstd is not None else 0, NAME)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.precision.autocast_blocks([self.G, self.D])  # after the copy: G_ema computes in float32
        g_lr, g_betas = lazy_adam_settings(config.g_lr, tuple(config.betas), config.g_reg_interval)
        d_lr, d_betas = lazy_adam_settings(config.d_lr, tuple(config.betas), config.d_reg_interval)
        self.G_opt = torch.optim.Adam(self.G.parameters(), lr=g_lr, betas=g_betas, eps=config.eps)
        self.D_opt = torch.optim.Adam(self.D.parameters(), lr=d_lr, betas=d_betas, eps=config.eps)
        self.frozen = set(frozen_parameter_names(self.G))
        self.data_generator = torch.Generator(self.device).manual_seed(rank_seed(config.seed, self.dist.rank, 0))
        self.sampler = TripletSampler(self.genhead, truncation_psi=config.truncation_psi,
                                      static_fraction=config.static_fraction, triplane_points=config.triplane_points,
                                      generator=self.data_generator)
        torch.manual_seed(rank_seed(config.seed, self.dist.rank, 0) + 1)
        self.step_index = 0
        self.cur_nimg = 0
        self.last_losses: Dict[str, float] = {}
        head = self.genhead.head_model
        self._canonical = head.canonical_vertices().to(self.device)
        self.img_name = "image_sr" if rc.has_superresolution else "image"
        self.img_raw_name = "image" if rc.has_superresolution else None
        self._fixed_batch: Optional[TripletBatch] = None

    # ------------------------------------------------------------------ building
    def _load_genhead(self) -> GenHead:
        cfg = self.config
        if cfg.genhead is not None:
            from ..checkpoints import load
            return load(str(cfg.genhead), device=self.device, kind="GenHead")
        warnings.warn("no GenHead checkpoint (--genhead): the training triplets come from an untrained GenHead built "
                      "from config.untrained_genhead, which only exercises the training (its images are noise)",
                      stacklevel=3)
        return GenHead(GenHeadConfig(**cfg.untrained_genhead))

    def _imagenet_trunk(self) -> Optional[Dict[str, torch.Tensor]]:
        """torchvision's ImageNet ResNet-34 state dict for the global encoder's trunk, or None
        (``global_encoder_init="random"``, or a resumed run, whose checkpoint holds the weights)."""
        cfg = self.config
        if cfg.resume:
            return None
        if cfg.global_encoder_init == "random":
            if cfg.untrained_genhead is None:  # a real run (--small builds an untrained GenHead)
                warnings.warn("the global encoder starts from random weights (global_encoder_init='random'); "
                              "upstream starts its ResNet-34 trunk from ImageNet weights", stacklevel=3)
            return None
        return resnet34_state_dict()

    def _load_identity(self):
        if self.config.identity_weights is None:
            warnings.warn("the identity loss is off: no identity network weights were given; pass "
                          "identity_weights (--identity-weights FILE, ArcFace iresnet18 weights) to switch it on from "
                          f"{self.config.identity_start_kimg:g} kimg", stacklevel=3)
            return None
        from .identity import IdentityLoss  # imported here: the identity network is optional
        return IdentityLoss.from_file(self.config.identity_weights).to(self.device).eval().requires_grad_(False)

    # ------------------------------------------------------------------ inputs
    def source_inputs(self, batch: TripletBatch) -> Dict[str, torch.Tensor]:
        """The reconstructor's inputs: ``source_image`` (view 0's image, super-resolved when
        GenHead has a super-resolution, resized to the source resolution), ``source_motion``
        (view 0), ``driving_motion`` (view 1), ``motion_scale`` (1 dynamic, 0 static)."""
        image = batch.image[:, 0] if batch.image is not None else batch.image_raw[:, 0]
        return {"source_image": _resized(image, self.G.config.source_resolution),
                "source_motion": batch.motions[:, 0], "driving_motion": batch.motions[:, 1],
                "motion_scale": batch.motion_scale}

    def correspondence(self, batch: TripletBatch) -> torch.Tensor:
        """The correspondence map ``[N, 3, R, R]`` (R the discriminator's resolution) of the
        target's FLAME codes under the target camera; no gradient."""
        head = self.genhead.head_model
        camera = batch.cameras[:, 2]
        n, r = camera.shape[0], self.D.img_resolution
        with torch.no_grad():
            verts = head(**{k: v.to(head.dtype) for k, v in batch.codes(2).as_dict().items()})
            clip = clip_vertices(verts, camera[:, :16].reshape(n, 4, 4), camera[:, 16:25].reshape(n, 3, 3))
            uv = correspondence_map(clip, head.faces, (r, r), self._canonical, head.face_indices, head.eye_indices)
        return uv.to(torch.float32)

    def face_points(self, batch: TripletBatch) -> torch.Tensor:
        """The five face points ``[N, 5, 3]`` (float32, world space) of the target's FLAME
        codes on GenHead's head model (:func:`~head4d.train.identity.face_points`): the
        identity loss aligns its crops to their projections; no gradient."""
        from .identity import face_points  # the identity loss is optional

        head = self.genhead.head_model
        with torch.no_grad():
            verts = head(**{k: v.to(head.dtype) for k, v in batch.codes(2).as_dict().items()})
            return face_points(head, verts).to(torch.float32)

    def run_G(self, inputs: Mapping[str, torch.Tensor], camera: torch.Tensor,
              resolution: int) -> Dict[str, torch.Tensor]:
        """The reconstructor's render of the target view at ``resolution``, with the entries
        the losses read: :meth:`Reconstructor.render`'s dict plus ``seg`` (``2 * opacity -
        1``), ``image_feature_wobg`` (the feature image without background) and
        ``background_feature`` (``2 * b - 1`` at r, b the background resized as the render
        resizes it)."""
        G = self.G
        encoded = G.encode(inputs["source_image"], inputs["source_motion"], motion_scale=inputs["motion_scale"])
        planes = G.triplanes(encoded, inputs["driving_motion"])
        out = G.render(planes, camera, background=encoded.background, neural_rendering_resolution=resolution)
        out["seg"] = out["opacity"] * 2 - 1
        out["image_feature_wobg"] = out["image_feature"]
        if encoded.background is not None:
            bg = F.interpolate(encoded.background.to(torch.float32), size=(resolution, resolution), mode="bilinear",
                               align_corners=False, antialias=False)
            # the render composites feature_wobg + 2 * T_bg * bg (T_bg = 1 - opacity): take it back off
            out["image_feature_wobg"] = out["image_feature"] - 2.0 * (1.0 - out["opacity"]) * bg
            out["background_feature"] = bg * 2 - 1
        return out

    def discriminator_inputs(self, images: Mapping[str, torch.Tensor], uv: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The discriminator's dict from a render-like dict (``image`` with a super-resolution,
        ``image_raw``, ``seg``): the super-resolved image as ``image_sr`` and the raw one as
        ``image``; without a super-resolution the raw image, resized to the discriminator's
        resolution, as ``image``."""
        out = {"uv": uv, "seg": images["seg"]}
        if self.img_raw_name is not None:
            out["image_sr"], out["image"] = images["image"], images["image_raw"]
        else:
            out["image"] = _resized(images["image_raw"], self.D.img_resolution)
        return out

    def run_D(self, img: Mapping[str, torch.Tensor], camera: torch.Tensor) -> torch.Tensor:
        return self.D(img, camera, img_name=self.img_name, img_raw_name=self.img_raw_name or "image")

    # ------------------------------------------------------------------ phases
    def generator_loss(self, inputs: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], uv: torch.Tensor,
                       resolution: int, weights: Mapping[str, float]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``Gmain``'s loss and its logged terms (module docstring)."""
        fake = self.run_G(inputs, target["camera"], resolution)
        l1, lp = image_losses(fake, target, self.lpips)
        seg = segmentation_loss(fake["seg"], target["seg"])
        logged = {"Loss/G/lrecon_l1": l1, "Loss/G/lrecon_lpips": lp, "Loss/G/lrecon_seg": seg}
        loss = l1 * weights["l1"] + lp * weights["lpips"] + seg * weights["seg"]
        if weights["depth"] > 0:
            term = depth_loss(fake["image_depth"], target["depth"], target["seg"])
            logged["Loss/G/lrecon_depth"] = term
            loss = loss + term * weights["depth"]
        if weights["feature"] > 0:
            term = feature_loss(fake["image_feature_wobg"], fake.get("background_feature"), target["feature"],
                                target["seg"], target.get("background_feature"))
            logged["Loss/G/lrecon_feature"] = term
            loss = loss + term * weights["feature"]
        if weights["triplane"] > 0:
            term = triplane_feature_loss(fake["planes"], target["triplane_points"], target["triplane_features"],
                                         self.G.config.box_warp, self.G._ops_backend)
            logged["Loss/G/lrecon_triplane"] = term
            loss = loss + term * weights["triplane"]
        if weights["identity"] > 0 and self.identity is not None:
            from .identity import project_points

            name = "image" if "image" in fake and "image" in target else "image_raw"
            landmarks = project_points(target["face_points"], target["camera"], target[name].shape[-1])
            term = self.identity(fake[name], target[name], landmarks).mean()
            logged["Loss/G/l_id"] = term
            loss = loss + term * weights["identity"]
        if weights["adversarial"] > 0:
            term = generator_adversarial_loss(self.run_D(self.discriminator_inputs(fake, uv), target["camera"]))
            logged["Loss/G/loss"] = term
            loss = loss + term * weights["adversarial"]
        return loss, logged

    def density_regularizer(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``Greg``'s density TV term (module docstring), times ``density_reg``."""
        cfg, G = self.config, self.G
        encoded = G.encode(inputs["source_image"], inputs["source_motion"], motion_scale=inputs["motion_scale"])
        planes = G.triplanes(encoded, inputs["driving_motion"])
        n, m = planes.shape[0], cfg.density_reg_points
        points = torch.rand((n, m, 3), device=planes.device) * 2 - 1
        moved = points + torch.randn_like(points) * cfg.density_reg_p_dist * G.config.box_warp
        with G._scope():
            decode = triplane_point_decoder(G.decoder, G.renderer, planes.device, G.config.fused, G.config.box_warp,
                                            G._ops_backend)
            sigma = decode(planes, torch.cat([points, moved], dim=1))["sigma"]
        return density_tv_loss(sigma[:, :m], sigma[:, m:], cfg.density_reg)

    def _optimize(self, module: torch.nn.Module, opt: torch.optim.Optimizer, freeze: bool = False) -> None:
        """The optimizer step on the accumulated gradients: the frozen parameters' zeroed
        (``freeze``), averaged over the ranks, NaN and infinities replaced as StyleGAN2 does."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if freeze:
            for name, p in named:
                if name in self.frozen and p.grad is not None:
                    p.grad.zero_()
        params = [p for _, p in named]
        self.dist.average_gradients(params)
        for p in params:
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()

    def step_inputs(self, batch: TripletBatch, resolution: int, with_uv: bool) -> Dict[str, Any]:
        """What the phases read of (micro-)batch ``batch`` at neural rendering resolution
        ``resolution``: ``inputs`` (:meth:`source_inputs`), ``target``
        (:func:`reconstruction_targets`) and ``uv`` (:meth:`correspondence` when
        ``with_uv``, else None), all with the batch's rows; with an identity loss the target
        also holds ``face_points`` (:meth:`face_points`)."""
        target = reconstruction_targets(batch, resolution)
        if self.identity is not None:
            target["face_points"] = self.face_points(batch)
        return {"inputs": self.source_inputs(batch), "target": target,
                "uv": self.correspondence(batch) if with_uv else None}

    def phase_loss(self, phase: str, micro: Mapping[str, Any], resolution: int,
                   weights: Mapping[str, float]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One phase's loss on a (micro-)batch's :meth:`step_inputs`: ``(loss, logged)``,
        ``loss`` the scalar to back-propagate (a regularizer's times its interval, every
        term a mean over the samples), ``logged`` the named terms.

        Args:
            phase: one of :data:`PHASES`.
            micro: :meth:`step_inputs` of the micro-batch.
            resolution: the neural rendering resolution r.
            weights: :func:`loss_weights_at`'s.
        """
        cfg = self.config
        inputs, target, uv = micro["inputs"], micro["target"], micro["uv"]
        if phase == "Gmain":
            loss, logged = self.generator_loss(inputs, target, uv, resolution, weights)
            return loss, {**logged, "Loss/G/total": loss}
        if phase == "Greg":
            loss = self.density_regularizer(inputs)
            return loss * (cfg.g_reg_interval or 1), {"Loss/G/TVloss": loss}
        if phase == "Dmain":
            with torch.no_grad():
                fake = self.run_G(inputs, target["camera"], resolution)
            fake_logits = self.run_D(self.discriminator_inputs(fake, uv), target["camera"])
            real_logits = self.run_D(self.discriminator_inputs(target, uv), target["camera"])
            loss = discriminator_loss(fake_logits, real_logits)
            return loss, {"Loss/D/loss": loss}
        if phase == "Dreg":
            with self.precision.full_precision():  # R1's double backward in float32
                _, penalty = r1_penalty(self.D, self.discriminator_inputs(target, uv), target["camera"], cfg.r1_gamma,
                                        cfg.r1_gamma_uv, cfg.r1_gamma_seg, self.img_name, self.img_raw_name)
            loss = penalty.mean()
            return loss * (cfg.d_reg_interval or 1), {"Loss/D/reg": loss}
        raise ValueError(f"{NAME}.phase_loss: phase must be one of {PHASES}, got {phase!r}")

    def accumulate_phase(self, phase: str, micro_batches: Sequence[Mapping[str, Any]], resolution: int,
                         weights: Mapping[str, float]) -> Dict[str, torch.Tensor]:
        """The gradients of one phase added into ``.grad`` over the micro-batches
        (:meth:`step_inputs` of each), each loss divided by their count; returns the logged
        terms' means (no optimizer step)."""
        return accumulate_gradients(micro_batches, lambda micro: self.phase_loss(phase, micro, resolution, weights))

    def step(self, batch: Optional[TripletBatch] = None) -> Dict[str, float]:
        """One training step (its phases, each over ``config.accumulate`` micro-batches and
        one optimizer step), the EMA update; returns the losses (means over the micro-batches
        and the ranks) as floats and keeps them in ``last_losses``. ``batch``: the triplets
        to train on (None: a fresh draw of ``config.batch`` from the sampler)."""
        cfg = self.config
        if batch is None:
            batch = self.sampler.sample(cfg.batch)
        r = neural_resolution_at(self.cur_nimg, cfg.resolution_initial, cfg.resolution_final,
                                 cfg.adversarial_start_kimg, cfg.resolution_fade_kimg)
        weights = loss_weights_at(self.cur_nimg, cfg)
        phases = phases_at(cfg, self.step_index, self.cur_nimg)
        micro_batches = [self.step_inputs(micro, r, "Dmain" in phases)
                         for micro in split_triplets(batch, cfg.accumulate)]
        freeze = freezes_decoder_at(cfg, self.cur_nimg)
        losses: Dict[str, torch.Tensor] = {}
        for phase in phases:
            training_g = phase.startswith("G")
            module, opt = (self.G, self.G_opt) if training_g else (self.D, self.D_opt)
            self.G.requires_grad_(training_g)
            self.D.requires_grad_(not training_g)
            opt.zero_grad(set_to_none=True)
            losses.update(self.accumulate_phase(phase, micro_batches, r, weights))
            self._optimize(module, opt, freeze=training_g and freeze)
        self.G.requires_grad_(True)
        self.D.requires_grad_(True)
        self.dist.average_running_means(self.G)
        world_batch = cfg.batch * self.dist.world_size
        update_ema(self.G_ema, self.G, ema_beta(world_batch, self.cur_nimg, cfg.ema_kimg_for(self.dist.world_size),
                                                cfg.ema_rampup))
        self.cur_nimg += world_batch
        self.step_index += 1
        self.last_losses = {k: float(self.dist.mean(v.detach())) for k, v in losses.items()}
        return self.last_losses

    # ------------------------------------------------------------------ checkpoints

    # ------------------------------------------------------------------ images
    def fixed_batch(self, count: int = 4) -> TripletBatch:
        """``count`` triplets drawn once (then kept) from a generator of their own, seeded by
        ``config.seed``: the training's random states are left as they were, so image grids
        change no training step (nor a resumed run's)."""
        if self._fixed_batch is None or self._fixed_batch.batch_size != count:
            cfg = self.config
            generator = torch.Generator(self.device).manual_seed(cfg.seed + 104723)
            sampler = TripletSampler(self.genhead, truncation_psi=cfg.truncation_psi,
                                     static_fraction=cfg.static_fraction, triplane_points=cfg.triplane_points,
                                     generator=generator)
            with _global_rng_kept(self.device):
                self._fixed_batch = sampler.sample(count)
        return self._fixed_batch

    @torch.no_grad()
    def snapshot_images(self, count: int = 4) -> torch.Tensor:
        """The image grid's rows for :meth:`fixed_batch`'s ``count`` triplets, ``[3 * K, 3,
        S, S]`` float32 in [-1, 1] (``K = count``): the sources (view 0, as the reconstructor
        sees them), the targets (view 2) and ``G_ema``'s renders of the targets (the
        super-resolved image with a super-resolution, else the raw one, at the step's neural
        rendering resolution; the renderer's random numbers from a fixed seed), all resized
        to the render's size S. The global random states are left as they were."""
        cfg = self.config
        batch = self.fixed_batch(count)
        r = neural_resolution_at(self.cur_nimg, cfg.resolution_initial, cfg.resolution_final,
                                 cfg.adversarial_start_kimg, cfg.resolution_fade_kimg)
        G = self.G_ema
        inputs = self.source_inputs(batch)
        generator = torch.Generator(self.device).manual_seed(cfg.seed + 104729)
        with _global_rng_kept(self.device):
            encoded = G.encode(inputs["source_image"], inputs["source_motion"], motion_scale=inputs["motion_scale"])
            planes = G.triplanes(encoded, inputs["driving_motion"])
            out = G.render(planes, batch.cameras[:, 2], background=encoded.background,
                           neural_rendering_resolution=r, generator=generator)
        fake = (out["image"] if "image" in out else out["image_raw"]).float()
        target = batch.image[:, 2] if batch.image is not None else batch.image_raw[:, 2]
        size = fake.shape[-1]
        rows = [_resized(inputs["source_image"].float(), size), _resized(target.float(), size), fake]
        return torch.cat(rows).clamp(-1, 1)

    def close(self) -> None:
        """Remove the mixed-precision hooks."""
        self.precision.remove()


def _global_rng_kept(device: torch.device):
    """A context in which the global torch random states (the CPU's and ``device``'s when
    it is CUDA) are saved and restored after."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def train_reconstructor(config: ReconstructorTrainingConfig, genhead: Optional[GenHead] = None,
                        max_steps: Optional[int] = None, lpips: Optional[torch.nn.Module] = None,
                        identity=None) -> ReconstructorTrainer:
    """Train the reconstructor: build (or resume from ``out/checkpoint.safetensors`` with
    ``config.resume``), run steps until ``config.kimg`` thousand images (two with
    ``dry_run``, at most ``max_steps`` when given), log, write image grids
    (:meth:`ReconstructorTrainer.snapshot_images`) every ``image_every`` steps and at the
    end, write the checkpoint every ``checkpoint_every`` steps and at the end, and export the EMA reconstructor to
    ``out/G_ema`` with :meth:`Reconstructor.save` (``head4d reenact --checkpoint`` reads it).
    Works unchanged under ``torchrun`` (see :class:`~head4d.train.common.Distributed`).

    Args:
        config: :class:`ReconstructorTrainingConfig`.
        genhead, lpips, identity: as :class:`ReconstructorTrainer`.
        max_steps: a cap on the steps of this call.

    Returns:
        the trainer after the last step.
    """
    config.check()
    dist_ = Distributed.from_env(config.device)
    try:
        return _train(config, dist_, genhead, max_steps, lpips, identity)
    finally:
        dist_.close()


def _train(config: ReconstructorTrainingConfig, dist_: Distributed, genhead: Optional[GenHead],
           max_steps: Optional[int], lpips, identity) -> ReconstructorTrainer:
    """:func:`train_reconstructor`'s loop inside its process group."""
    trainer = ReconstructorTrainer(config, genhead, dist_, lpips, identity)
    count = 4  # triplets in the image grids
    return run_training(
        trainer, config, dist_, name="train_reconstructor", max_steps=max_steps,
        banner=(f"precision {config.precision}, {config.batch} triplets per process in {config.accumulate} "
                f"micro-batch(es), {dist_.world_size} process(es)"),
        export_note=(f"reconstructor to {Path(config.out) / EXPORT_NAME} (Reconstructor.load and head4d reenact "
                     f"read it)"),
        write_snapshot=lambda log: log.images(trainer.step_index, SNAPSHOT_TAG, trainer.snapshot_images(count),
                                              trainer.cur_nimg, columns=count))
