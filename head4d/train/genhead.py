"""GenHead's GAN training (Portrait4D stage one): :class:`GenHeadTrainer`, :func:`train_genhead`.

One training step (``step``; N images per process, ``cur_nimg`` images seen so far by all
processes) runs StyleGAN2's phases, each with its own optimizer step:

- ``Gmain`` (every step): fakes from random z, each conditioned on the camera and FLAME
  codes of a random real label (fakes take their conditions from the data). With the
  pose-conditioning swap probability ``p = (1 - a) + a * gpc_reg_prob``, ``a = min(cur_nimg
  / (gpc_reg_fade_kimg * 1000), 1)`` (1 fading to 0.5 over 1000 kimg), a sample's mapping
  condition (camera + shape) is replaced by the next-in-batch one (the batch rolled by
  one); the render always uses the sample's own camera and codes. Loss: non-saturating
  ``softplus(-D(fake))``, plus the part-region terms below.
- ``Greg`` (every ``g_reg_interval`` = 4 steps, loss times the interval): the density
  regularizer (:func:`density_tv_loss`): 1000 points uniform in ``[-1, 1]^3`` per sample and
  the same points moved by ``N(0, 1) * density_reg_p_dist * box_warp`` (0.004 * 1.3). As
  upstream, both sets are taken as observation-space points of the sample's posed head and
  warped by its deformation (the phase's FLAME codes: the neck grids, then the part-wise
  step; no autograd through the warp); the part triplane is read at the eye-canonical
  points, the head triplane at the head-canonical points and the part triplane again at
  the mouth-canonical points (when GenHead has a mouth part). Per read, the L1 distance
  between the raw densities (the decoder's output: no eye-box factor, no part/head blend)
  at the two sets; their mean over the reads, times ``density_reg`` (0.25).
- ``Dmain`` (every step): ``softplus(D(fake)) + softplus(-D(real))``; its generator pass
  also updates the backbone mapping's ``w_avg`` (the background's is never updated, as upstream).
- ``Dreg`` (every ``d_reg_interval`` = 16 steps, loss times the interval): R1 on the real
  inputs, ``gamma / 2 * (|dD/d image_sr|^2 + |dD/d image|^2) + gamma_uv / 2 * |dD/d uv|^2 +
  gamma_seg / 2 * |dD/d seg|^2`` per sample (:func:`r1_penalty`; the gradient with respect to
  the image before the fade's blur), a double backward through head4d's StyleGAN2 ops.
- The EMA generator ``G_ema`` follows ``G`` (:func:`head4d.train.common.ema_beta`, half-life
  ``ema_kimg = 10 * B / 32`` kimg for a total batch B, ramp-up 0.05).

As in StyleGAN2, the real batch is drawn once per step and shared by the phases, while each
phase draws its own fake latents and conditions (:meth:`GenHeadTrainer.sample_batch`).

The discriminator's input (:class:`~head4d.nn.DualDiscriminatorDeform`, a dict):

- fakes: ``image_sr`` GenHead's super-resolved image, ``image`` its raw render, ``uv`` the
  correspondence map of its FLAME codes under its camera (:func:`correspondence_map`),
  ``seg = (1 - T_bg) * 2 - 1 = opacity * 2 - 1``.
- reals: ``image_sr`` the dataset image scaled to ``[-1, 1]``; ``image`` that image resized
  to the neural rendering resolution (antialiased bilinear) and blurred with the current
  blur sigma (upstream blurs the real raw image too); ``uv`` rendered online from the
  label's codes exactly as for fakes; ``seg`` the dataset's foreground mask (uint8, 255 on
  the head; :mod:`head4d.data.dataset`'s ``masks/``) mapped as upstream maps its head masks,
  ``mask / 127.5 - 1`` (0 -> -1 background, 255 -> +1 head), resized and blurred like the
  image (to the discriminator's resolution, then to the raw image's with its blur). A
  dataset without masks gets an all-ones seg (everything foreground) and a warning, once:
  with a background in its real images D can then tell the real seg from the fake one.
- During the blur fade the ``image_sr`` entry (``image`` without a super-resolution) is
  blurred with sigma ``blur_init_sigma * max(1 - cur_nimg / (blur_fade_kimg * 1000), 0)``
  (10 fading over ``200 * B / 32`` kimg for a total batch B, 200 at upstream's 32) for fakes and
  reals.

Part-region regularizers (``Gmain``, :func:`part_region_losses`, on the render's samples
from ``GenHead.render(..., return_samples=True)``), three per part with the part's mask
``M`` (the eye or the mouth mask of each ray, soft, in [0, 1]), as upstream:

- ``10 * mean(softplus(sigma_head * in_part) * M)`` over every ray and sample of both passes
  (coarse and fine): ``sigma_head`` the head triplane's raw density at the sample's
  head-canonical point (before the renderer's activation), ``in_part`` 1 inside an eye box
  and 0 outside for the eyes, the ray's mouth mask for the mouth: the head triplane is
  pushed to put no density where the part triplane renders (``part_density_weight``);
- ``100 * mean(distortion * M)`` over rays, ``distortion`` MipNeRF-360's distortion loss
  (:func:`~head4d.render.distortion_loss`) of the final composite's weights over its
  intervals (the merged sample depths as edges): the density on an eye or mouth ray
  gathers into one thin layer (``part_distortion_weight``);
- ``100 * mean(T_bg * M)``: no background shows through the eyes or the mouth
  (``part_t_weight``).

Defaults (:class:`GenHeadTrainingConfig`) are Portrait4D's ``genhead-ffhq512`` settings:
Adam betas (0, 0.99), eps 1e-8, G lr 0.0025, D lr 0.002 (both then adjusted for lazy
regularization), R1 gamma 1 / uv 10 / seg 1 (the config's values; the loss class's own
defaults, which the config overrides, are 10 / 30 / 10), minibatch-std group 2, neural
rendering resolution 64, density regularization 0.25 every 4 G steps (p_dist 0.004), swap
probability 0.5 after a 1000-kimg fade. ``batch`` is per process (upstream: 32 over 4 GPUs,
8 each).

Infrastructure (:mod:`head4d.train.common`): the real images come through a
:class:`~head4d.train.common.BatchStream` (``workers`` DataLoader processes, an endless
seeded order shared out among the ranks, its position in the checkpoint); ``precision
"bf16"`` autocasts the StyleGAN2 convolution blocks of G and D to bfloat16 on CUDA, the
mappings, the discriminator's epilogue, the renderer, the losses and R1 staying float32
(:class:`~head4d.train.common.MixedPrecision`); ``accumulate`` splits each phase's batch
into strided micro-batches (one optimizer step per phase). The discriminator's logits of a
micro-batch are those of the whole batch (its minibatch-std groups are kept,
:func:`~head4d.train.common.check_microbatch`), but a micro-batch is not the whole batch
for the generator's draws: the pose-conditioning swap rolls the conditions within the
micro-batch and the synthesis noise is drawn per micro-batch, as in StyleGAN2's rounds of
``batch_gpu`` samples. Upstream sums the rounds' mean losses; here each is divided by
``accumulate``, so the gradient is the batch mean whatever the split (Adam is nearly
insensitive to the difference).

Image grids: the reals at the start, then every ``image_every`` steps and at the end
:meth:`GenHeadTrainer.snapshot_images` (``G_ema`` on fixed latents and labels), as PNG files
under ``out/images/`` and in TensorBoard.

Resuming: the checkpoint holds rank 0's random states; on resume every other rank draws
from a state derived from the seed, its rank and the step (the ranks must not share noise).
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..head.labels import LABEL_SIZE, parse_labels
from ..models import GenHead
from ..models._common import triplane_point_decoder
from ..models.genhead import HEAD_PLANES, PART_PLANES, GenHeadConfig, clip_vertices
from ..nn.discriminator import DualDiscriminatorDeform, blur_discriminator_input, filtered_resizing
from ..render.losses import distortion_loss
from ..render.masks import correspondence_map
from .common import (EXPORT_NAME, BatchStream, CheckpointedTrainer, Distributed, MixedPrecision, accumulate_gradients,
                     check_microbatch, check_training_config, ema_beta, lazy_adam_settings, rank_seed, run_training,
                     split_microbatches, update_ema)

__all__ = ["GenHeadTrainer", "GenHeadTrainingConfig", "density_tv_loss", "part_region_losses", "r1_penalty",
           "small_discriminator_kwargs", "small_genhead_config", "train_genhead"]

#: The phases of a step, in order (each draws its own fake latents and conditions).
PHASES = ("Gmain", "Greg", "Dmain", "Dreg")


def small_genhead_config() -> Dict[str, Any]:
    """A tiny GenHead for CPU tests (``--small``): narrow backbone, 32^2 planes, no
    super-resolution, 16^2 renders with 8 + 8 samples."""
    return dict(z_dim=64, w_dim=64, channel_base=256, channel_max=16, triplane_resolution=32,
                background_resolution=16, background_channel_base=128, background_channel_max=16,
                background_mapping_layers=2, has_superresolution=False, depth_resolution=8,
                depth_resolution_importance=8, neural_rendering_resolution=16, fine_resolution=12,
                coarse_resolution=4, mask_resolution=32)


def small_discriminator_kwargs() -> Dict[str, Any]:
    """A tiny dual discriminator for :func:`small_genhead_config` (16^2 input, no super-resolution)."""
    return dict(channel_base=256, channel_max=16, num_fp16_res=0, has_superresolution=False,
                mapping_kwargs={"num_layers": 2})


@dataclass
class GenHeadTrainingConfig:
    """GenHead training settings (defaults: Portrait4D's; see the module docstring).

    Data and run: ``data`` (a dataset folder or zip), ``out`` (the output folder),
    ``batch`` (images per process), ``kimg`` (thousands of images to train on, all
    processes), ``xflip``, ``seed``, ``resume`` (continue from ``out/checkpoint.safetensors``),
    ``dry_run`` (two steps), ``log_every`` / ``checkpoint_every`` (steps), ``image_every``
    (steps between image grids of the EMA generator, also written at the end; None: at the
    end only), ``device`` (None: CUDA when available), ``workers`` (DataLoader worker
    processes reading the real images; 0: in the training process; the batches are the
    same for any count).
    Speed: ``precision`` (``"fp32"``, or ``"bf16"`` on CUDA: bfloat16 autocast in the
    StyleGAN2 convolution blocks, :class:`~head4d.train.common.MixedPrecision`),
    ``accumulate`` (each phase's ``batch`` split into this many micro-batches, one optimizer
    step; the micro-batch must be a multiple of the discriminator's minibatch-std group,
    :func:`~head4d.train.common.check_microbatch`).
    Networks: ``genhead`` (:class:`~head4d.models.GenHeadConfig` fields over its
    defaults), ``discriminator`` (:class:`~head4d.nn.DualDiscriminatorDeform` arguments;
    ``img_resolution`` and ``has_superresolution`` follow the generator).
    Optimizers: ``g_lr``, ``d_lr``, ``betas``, ``eps``, ``g_reg_interval``,
    ``d_reg_interval`` (None: no lazy regularization, the term on every step at weight 1).
    Losses: ``r1_gamma`` (image and raw image), ``r1_gamma_uv``, ``r1_gamma_seg``,
    ``blur_init_sigma``, ``blur_fade_kimg`` (None: ``200 * B / 32`` for a total batch B, as
    upstream scales it), ``gpc_reg_prob`` (None: zero condition),
    ``gpc_reg_fade_kimg``, ``density_reg``, ``density_reg_p_dist``, ``density_reg_points``;
    the part-region terms' weights: ``part_t_weight`` (transmittance, 100),
    ``part_density_weight`` (the head density in the part, 10), ``part_distortion_weight``
    (the distortion loss, 100).
    EMA: ``ema_kimg`` (None: ``10 * B / 32``, upstream's), ``ema_rampup``.
    """

    data: Optional[str] = None
    out: str = "train_out"
    batch: int = 8
    kimg: float = 25000
    xflip: bool = False
    seed: int = 0
    resume: bool = False
    dry_run: bool = False
    log_every: int = 10
    checkpoint_every: int = 1000
    image_every: Optional[int] = 1000
    device: Optional[str] = None
    workers: int = 0
    precision: str = "fp32"
    accumulate: int = 1
    genhead: Dict[str, Any] = field(default_factory=dict)
    discriminator: Dict[str, Any] = field(default_factory=dict)
    g_lr: float = 0.0025
    d_lr: float = 0.002
    betas: Tuple[float, float] = (0.0, 0.99)
    eps: float = 1e-8
    g_reg_interval: Optional[int] = 4
    d_reg_interval: Optional[int] = 16
    r1_gamma: float = 1.0
    r1_gamma_uv: float = 10.0
    r1_gamma_seg: float = 1.0
    blur_init_sigma: float = 10.0
    blur_fade_kimg: Optional[float] = None
    gpc_reg_prob: Optional[float] = 0.5
    gpc_reg_fade_kimg: float = 1000.0
    density_reg: float = 0.25
    density_reg_p_dist: float = 0.004
    density_reg_points: int = 1000
    part_t_weight: float = 100.0
    part_density_weight: float = 10.0
    part_distortion_weight: float = 100.0
    ema_kimg: Optional[float] = None
    ema_rampup: Optional[float] = 0.05

    @classmethod
    def small(cls, **kwargs) -> "GenHeadTrainingConfig":
        """The tiny CPU configuration (``--small``), with ``kwargs`` over it."""
        args = dict(genhead=small_genhead_config(), discriminator=small_discriminator_kwargs(), batch=2,
                    density_reg_points=64)
        args.update(kwargs)
        return cls(**args)

    def schedule_kimg(self, world_size: int) -> Tuple[float, float]:
        """``(blur_fade_kimg, ema_kimg)`` in effect for ``world_size`` processes: the set
        values, or upstream's batch-scaled defaults ``200 * B / 32`` and ``10 * B / 32`` with
        ``B = batch * world_size``."""
        total = self.batch * world_size
        blur = self.blur_fade_kimg if self.blur_fade_kimg is not None else 200 * total / 32
        ema = self.ema_kimg if self.ema_kimg is not None else 10 * total / 32
        return blur, ema

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        op = "GenHeadTrainingConfig"
        check_training_config(
            op, self,
            ints=("batch", "log_every", "checkpoint_every", "density_reg_points", "accumulate", "image_every"),
            numbers=("kimg", "g_lr", "d_lr", "eps", "r1_gamma", "r1_gamma_uv", "r1_gamma_seg", "blur_init_sigma",
                     "blur_fade_kimg", "gpc_reg_fade_kimg", "density_reg", "density_reg_p_dist", "part_t_weight",
                     "part_density_weight", "part_distortion_weight", "ema_kimg"),
            optional=("image_every", "blur_fade_kimg", "ema_kimg"))
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"{op}: workers must be an int >= 0, got {self.workers!r}")
        if self.gpc_reg_prob is not None and not 0 <= self.gpc_reg_prob <= 1:
            raise ValueError(f"{op}: gpc_reg_prob must be None or in [0, 1], got {self.gpc_reg_prob!r}")


# ---------------------------------------------------------------------- loss pieces
def r1_penalty(D: torch.nn.Module, img: Mapping[str, torch.Tensor], c: torch.Tensor, gamma: float,
               gamma_uv: float, gamma_seg: float, img_name: str = "image_sr",
               img_raw_name: Optional[str] = "image", blur_sigma: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """R1 on real inputs: ``(logits [N, 1], penalty [N])`` with ``penalty = gamma / 2 *
    (|g_img|^2 + |g_raw|^2) + gamma_uv / 2 * |g_uv|^2 + gamma_seg / 2 * |g_seg|^2``, g the
    gradient of ``sum(logits)`` with respect to each entry (summed over C, H, W), built with
    ``create_graph`` so that the penalty back-propagates into D (double backward).

    Args:
        D: a :class:`~head4d.nn.DualDiscriminatorDeform`.
        img: the real input dict (entries are detached and made to require gradients here).
        c: ``[N, 25]`` camera labels.
        img_name, img_raw_name: the image entries (``img_raw_name`` None without a
            super-resolution).
        blur_sigma: the blur fade's sigma, applied to ``img[img_name]`` after it is made to
            require gradients: the gradients are taken with respect to the unblurred
            input, through the blur, as upstream does.
    """
    names = [img_name] + ([img_raw_name] if img_raw_name is not None else [])
    names += (["uv"] if D.has_uv else []) + (["seg"] if D.has_seg else [])
    inputs = {k: v.detach().requires_grad_(k in names) for k, v in img.items()}
    logits = D(blur_discriminator_input(inputs, blur_sigma, img_name), c, img_name=img_name,
               img_raw_name=img_raw_name or "image")
    grads = torch.autograd.grad(outputs=[logits.sum()], inputs=[inputs[k] for k in names], create_graph=True)
    penalty = torch.zeros(logits.shape[0], device=logits.device, dtype=torch.float32)
    for name, grad in zip(names, grads):
        gamma_of = gamma_uv if name == "uv" else gamma_seg if name == "seg" else gamma
        penalty = penalty + grad.float().square().sum([1, 2, 3]) * (gamma_of / 2)
    return logits, penalty


def blur_sigma_at(cur_nimg: int, blur_init_sigma: float, blur_fade_kimg: float) -> float:
    """The blur fade: ``blur_init_sigma * max(1 - cur_nimg / (blur_fade_kimg * 1000), 0)``, 0
    without a fade."""
    if blur_fade_kimg <= 0:
        return 0.0
    return max(1 - cur_nimg / (blur_fade_kimg * 1e3), 0.0) * blur_init_sigma


def swapping_prob_at(cur_nimg: int, gpc_reg_prob: Optional[float], gpc_reg_fade_kimg: float) -> Optional[float]:
    """The pose-conditioning swap probability: ``(1 - a) + a * gpc_reg_prob`` with ``a =
    min(cur_nimg / (gpc_reg_fade_kimg * 1000), 1)`` (1 without a fade); None when
    ``gpc_reg_prob`` is None (the mapping then gets a zero condition)."""
    if gpc_reg_prob is None:
        return None
    alpha = min(cur_nimg / (gpc_reg_fade_kimg * 1e3), 1.0) if gpc_reg_fade_kimg > 0 else 1.0
    return (1 - alpha) + alpha * gpc_reg_prob


def labels_to_codes(labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``labels [N, 437]`` to the camera ``[N, 25]`` and the FLAME codes dict."""
    parts = parse_labels(labels)
    codes = {k: parts[k] for k in ("shape", "expression", "neck_pose", "jaw_pose", "eye_pose")}
    return parts["camera"], codes


def part_region_losses(fake: Mapping[str, torch.Tensor], t_weight: float, density_weight: float,
                       distortion_weight: float) -> Dict[str, torch.Tensor]:
    """Portrait4D's six part-region terms of ``Gmain`` (module docstring), scalars by log name.

    For each part (``eye``, ``mouth``) with its mask ``M [N, 1, r, r]`` (per ray ``M_ray [N, R]``):

    - ``Loss/G/loss_face_{part}``: ``density_weight * mean(softplus(head_density_{part}) *
      M_ray)``, the mean over every image, ray and sample (samples outside the part give
      ``softplus(0) = log 2`` times the mask, a constant, as upstream);
    - ``Loss/G/loss_{part}_density``: ``distortion_weight * mean(distortion_loss(depths,
      weights) * M_ray)`` over images and rays (:func:`~head4d.render.distortion_loss`);
    - ``Loss/G/loss_{part}_T``: ``t_weight * mean(T_bg * M)``, ``T_bg = 1 - opacity``.

    Args:
        fake: :meth:`GenHead.render`'s dict with ``return_samples=True``: ``opacity``,
            ``eye_mask``, ``mouth_mask`` ``[N, 1, r, r]``, ``sample_depths`` ``[N, R, S]``,
            ``sample_weights`` ``[N, R, S - 1]``, ``head_density_eye`` and
            ``head_density_mouth`` ``[N, R, S]``.
        t_weight, density_weight, distortion_weight: the terms' weights (100, 10, 100).
    """
    t_bg = 1 - fake["opacity"]
    distortion = distortion_loss(fake["sample_depths"], fake["sample_weights"])  # [N, R]
    losses = {}
    for part in ("eye", "mouth"):
        mask = fake[f"{part}_mask"]
        ray_mask = mask.reshape(mask.shape[0], -1)
        losses[f"Loss/G/loss_face_{part}"] = \
            (F.softplus(fake[f"head_density_{part}"]) * ray_mask.unsqueeze(-1)).mean() * density_weight
        losses[f"Loss/G/loss_{part}_density"] = (distortion * ray_mask).mean() * distortion_weight
        losses[f"Loss/G/loss_{part}_T"] = (t_bg * mask).mean() * t_weight
    return losses


def density_tv_loss(G: GenHead, planes: torch.Tensor, codes: Mapping[str, torch.Tensor], points: torch.Tensor,
                    perturbed: torch.Tensor) -> torch.Tensor:
    """The density regularizer's L1 term through the sample's deformation (upstream's order).

    ``points`` and ``perturbed`` (observation space, the image's posed head) are warped
    together by the deformation of ``codes`` (:meth:`PartwiseDeformation.warp`, without
    autograd, as upstream warps): the part triplane is read at the eye-canonical points, the
    head triplane at the head-canonical points and, when GenHead has a mouth part, the part
    triplane again at the mouth-canonical points. For each of these reads, the L1 distance
    between the raw densities (the decoder's output, no part-box factor) at the warped
    ``points`` and at the warped ``perturbed``; returns their mean over the reads.

    Args:
        G: the generator (its decoder, deformation and decode path).
        planes: ``[N, 6, C, H, W]`` from :meth:`GenHead.planes`.
        codes: the FLAME codes dict with N rows (:func:`labels_to_codes`).
        points, perturbed: ``[N, P, 3]`` float32.

    Returns:
        A scalar, differentiable with respect to ``planes`` and the decoder.
    """
    p = points.shape[1]
    both = torch.cat([points, perturbed], dim=1)
    codes = {k: v.to(G.head_model.dtype) for k, v in codes.items()}
    with G._scope():
        with torch.no_grad():
            warped = G.deformation.warp(both, G.deformation.build(**codes))
        reads = [(PART_PLANES, warped.eyes), (HEAD_PLANES, warped.head)]
        if warped.mouth is not None:
            reads.append((PART_PLANES, warped.mouth))
        decode = triplane_point_decoder(G.decoder, G.renderer, planes.device, G.config.fused, G.config.box_warp,
                                        G._ops_backend)
        total = 0
        for triplane, at in reads:
            sigma = decode(planes[:, triplane], at.to(planes.dtype))["sigma"]
            total = total + F.l1_loss(sigma[:, :p], sigma[:, p:])
    return total / len(reads)


# ---------------------------------------------------------------------- trainer
class GenHeadTrainer(CheckpointedTrainer):
    """Networks, optimizers and one training step of GenHead's GAN training.

    Args:
        config: :class:`GenHeadTrainingConfig`.
        dataset: items ``(uint8 image [3, R, R], float32 label [437])`` or with a foreground
            mask ``(image, label, uint8 mask [1, R, R])`` (:class:`head4d.data.ImageLabelDataset`
            or any such sequence).
        distributed: :class:`~head4d.train.common.Distributed` (None: one process).
        head_model: GenHead's head model (None: the built-in procedural head).

    Attributes: ``G``, ``D``, ``G_ema``, ``G_opt``, ``D_opt``, ``step_index`` (steps done),
    ``cur_nimg`` (images seen by all processes), ``last_losses``, ``precision``
    (:class:`~head4d.train.common.MixedPrecision`; with ``"bf16"`` its autocast hooks sit on
    ``G``'s and ``D``'s convolution blocks, not on ``G_ema``'s), ``stream`` (the real
    images, :class:`~head4d.train.common.BatchStream`).

    Building seeds torch's global generator (``config.seed`` for the weights, then a
    per-rank seed for the training's draws); the real images come in the order of an
    :class:`~head4d.train.common.InfiniteSampler` (seeded by ``config.seed``, this rank's
    share), the fakes' conditions from a generator of their own. Call :meth:`close` to stop
    the DataLoader's workers. Checkpoints: :class:`~head4d.train.common.CheckpointedTrainer`
    (``save``, ``load``, ``state``), with the data stream's position.
    """

    KIND = "genhead"

    def __init__(self, config: GenHeadTrainingConfig, dataset: Sequence, distributed: Optional[Distributed] = None,
                 head_model=None):
        config.check()
        self.config = config
        self.dist = distributed if distributed is not None else Distributed(
            device=config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = self.dist.device
        self.precision = MixedPrecision(config.precision, self.device)  # refuses bf16 off CUDA
        if len(dataset) < 1:
            raise ValueError("GenHeadTrainer: dataset is empty")
        self.dataset = dataset
        torch.manual_seed(config.seed)  # same initial weights on every rank (then broadcast)
        self.G = GenHead(GenHeadConfig(**config.genhead), head_model).to(self.device).train()
        g = self.G.config
        d_kwargs = dict(config.discriminator)
        d_kwargs.setdefault("has_superresolution", g.has_superresolution)
        d_kwargs.setdefault("img_resolution", g.img_resolution if g.has_superresolution
                            else g.neural_rendering_resolution)
        self.D = DualDiscriminatorDeform(c_dim=25, **d_kwargs).to(self.device).train()
        if self.D.has_superresolution != g.has_superresolution:
            raise ValueError("GenHeadTrainer: the discriminator must have a super-resolution input exactly when "
                             "GenHead has a super-resolution")
        self.dist.broadcast_parameters([self.G, self.D])
        mbstd = getattr(self.D.b4, "mbstd", None)
        self.micro_batch = check_microbatch(config.batch, config.accumulate,
                                            mbstd.group_size if mbstd is not None else 0, "GenHeadTrainer")
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.precision.autocast_blocks([self.G, self.D])
        g_lr, g_betas = lazy_adam_settings(config.g_lr, tuple(config.betas), config.g_reg_interval)
        d_lr, d_betas = lazy_adam_settings(config.d_lr, tuple(config.betas), config.d_reg_interval)
        self.G_opt = torch.optim.Adam(self.G.parameters(), lr=g_lr, betas=g_betas, eps=config.eps)
        self.D_opt = torch.optim.Adam(self.D.parameters(), lr=d_lr, betas=d_betas, eps=config.eps)
        self.data_generator = torch.Generator().manual_seed(rank_seed(config.seed, self.dist.rank, 0))
        self.stream = BatchStream(dataset, config.batch, seed=config.seed, rank=self.dist.rank,
                                  world_size=self.dist.world_size, workers=config.workers,
                                  pin_memory=self.device.type == "cuda")
        torch.manual_seed(rank_seed(config.seed, self.dist.rank, 0) + 1)
        self.step_index = 0
        self.cur_nimg = 0
        self.last_losses: Dict[str, float] = {}
        self._warned_no_masks = False
        head = self.G.head_model
        self._canonical = head.canonical_vertices().to(self.device)
        self.img_name = "image_sr" if g.has_superresolution else "image"
        self.img_raw_name = "image" if g.has_superresolution else None

    # ------------------------------------------------------------------ data
    def labels_of(self, index: torch.Tensor) -> torch.Tensor:
        """The labels ``[K, 437]`` float32 of dataset items ``index [K]`` (from the dataset's
        label table or ``get_label`` when it has one: no image is read)."""
        table = getattr(self.dataset, "labels", None)
        if isinstance(table, torch.Tensor) and table.dim() == 2 and table.shape[0] == len(self.dataset):
            return table[index].to(torch.float32)
        get_label = getattr(self.dataset, "get_label", None)
        items = [get_label(i) if get_label is not None else self.dataset[i][1] for i in index.tolist()]
        return torch.stack([torch.as_tensor(y) for y in items]).to(torch.float32)

    def sample_batch(self) -> Dict[str, torch.Tensor]:
        """One step's data, as StyleGAN2 draws it: N real images (``real_img`` float32 in
        [-1, 1]) with their labels (``real_labels [N, 437]``) and, when the dataset has masks,
        their seg (``real_seg [N, 1, R, R]`` float32, ``mask / 127.5 - 1``), the next batch of
        :attr:`stream`, shared by the phases; and per phase (:data:`PHASES` order) N fake
        latents and conditions, ``gen_z [4, N, z_dim]`` and ``gen_labels [4, N, 437]`` (labels
        of random items)."""
        n = self.config.batch
        p = len(PHASES)
        images, real_labels, *rest = self.stream.next()
        masks = rest[0] if rest else None
        gen_labels = self.labels_of(torch.randint(len(self.dataset), (p * n,), generator=self.data_generator))
        for name, labels in (("real_labels", real_labels), ("gen_labels", gen_labels)):
            if labels.dim() != 2 or labels.shape[1] != LABEL_SIZE:
                raise ValueError(f"GenHeadTrainer: dataset labels must have {LABEL_SIZE} numbers, got "
                                 f"{list(labels.shape[1:])} ({name})")
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"GenHeadTrainer: dataset images must be uint8 [3, R, R], got {images.dtype} "
                             f"{list(images.shape[1:])}")
        images = images.to(self.device, non_blocking=True)
        batch = {"real_img": images.to(torch.float32) / 127.5 - 1,
                 "real_labels": real_labels.to(self.device, torch.float32),
                 "gen_z": torch.randn(p, n, self.G.config.z_dim, device=self.device),
                 "gen_labels": gen_labels.to(self.device).reshape(p, n, LABEL_SIZE)}
        if masks is not None:
            if masks.dtype != torch.uint8 or masks.shape != (images.shape[0], 1) + images.shape[2:]:
                raise ValueError(f"GenHeadTrainer: dataset masks must be uint8 [1, R, R] like the images "
                                 f"{list(images.shape[1:])}, got {masks.dtype} {list(masks.shape[1:])}")
            batch["real_seg"] = masks.to(self.device, non_blocking=True).to(torch.float32) / 127.5 - 1
        elif not self._warned_no_masks:
            self._warned_no_masks = True
            warnings.warn("GenHeadTrainer: the dataset has no foreground masks, so the discriminator's real seg "
                          "is all ones (everything foreground); give the dataset a masks/ folder "
                          "(head4d.data.dataset) for real masks", stacklevel=2)
        return batch

    def correspondence(self, camera: torch.Tensor, codes: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The correspondence map ``[N, 3, R, R]`` (R the discriminator's resolution) of the
        head posed by ``codes`` under ``camera``; no gradient."""
        head = self.G.head_model
        n = camera.shape[0]
        r = self.D.img_resolution
        with torch.no_grad():
            verts = head(**{k: v.to(head.dtype) for k, v in codes.items()})
            clip = clip_vertices(verts, camera[:, :16].reshape(n, 4, 4), camera[:, 16:25].reshape(n, 3, 3))
            uv = correspondence_map(clip, head.faces, (r, r), self._canonical, head.face_indices, head.eye_indices)
        return uv.to(torch.float32)

    def real_inputs(self, batch: Mapping[str, torch.Tensor], blur_sigma: float) -> Dict[str, torch.Tensor]:
        """The discriminator's dict for the real images (module docstring), not yet blurred
        in the ``image_sr`` entry (:meth:`run_D` does that)."""
        img = batch["real_img"]
        camera, codes = labels_to_codes(batch["real_labels"])
        r = self.G.config.neural_rendering_resolution
        d_res = self.D.img_resolution
        if img.shape[-1] != d_res:
            img = filtered_resizing(img, d_res)
        out = {"uv": self.correspondence(camera, codes)}
        seg = batch.get("real_seg")
        if seg is None:
            seg = torch.ones_like(img[:, :1])
        elif seg.shape[-1] != d_res:
            seg = filtered_resizing(seg, d_res)
        if self.img_raw_name is not None:
            raw = filtered_resizing(img, r)
            seg = filtered_resizing(seg, r)
            if math.floor(3 * blur_sigma) > 0:
                raw = blur_discriminator_input({"image": raw}, blur_sigma, "image")["image"]
                seg = blur_discriminator_input({"seg": seg}, blur_sigma, "seg")["seg"]
            out[self.img_raw_name] = raw
        out[self.img_name] = img
        out["seg"] = seg
        return out

    def run_G(self, z: torch.Tensor, labels: torch.Tensor, swapping_prob: Optional[float],
              update_emas: bool = False, return_samples: bool = False) -> Dict[str, torch.Tensor]:
        """Fakes for latent ``z`` and the conditions of ``labels``: GenHead's render dict plus
        the discriminator entries (``uv``, ``seg``, ``image_sr`` with a super-resolution).
        ``update_emas``: the backbone mapping's running average of w (``w_avg``, the
        truncation's centre) moves towards this batch's ws, as upstream does in ``Dmain``.
        ``return_samples``: the render's samples for :func:`part_region_losses` too."""
        camera, codes = labels_to_codes(labels)
        cond = self.G.condition(camera, codes["shape"])
        if swapping_prob is None:
            cond = torch.zeros_like(cond)
        else:
            swap = torch.rand((cond.shape[0], 1), device=cond.device) < swapping_prob
            cond = torch.where(swap, torch.roll(cond, 1, 0), cond)
        ws = self.G.mapping(z, cond, update_emas=update_emas)
        planes = self.G.planes(ws, noise_mode="random")
        background = self.G.background_image(z, noise_mode="random")
        out = self.G.render(planes, camera, codes, ws=ws, background=background, return_samples=return_samples)
        out["uv"] = self.correspondence(camera, codes)
        out["seg"] = out["opacity"] * 2 - 1
        if self.img_raw_name is not None:
            out["image_sr"] = out["image"]
            out["image"] = out["image_raw"]
        else:
            out["image"] = out["image_raw"]
        out["planes"] = planes
        return out

    def run_D(self, img: Mapping[str, torch.Tensor], camera: torch.Tensor, blur_sigma: float) -> torch.Tensor:
        """Logits ``[N, 1]`` of the discriminator for an input dict, ``image_sr`` (``image``
        without a super-resolution) blurred with ``blur_sigma``."""
        img = blur_discriminator_input(img, blur_sigma, self.img_name)
        return self.D(img, camera, img_name=self.img_name, img_raw_name=self.img_raw_name or "image")

    def discriminator_loss(self, real: Mapping[str, torch.Tensor], real_c: torch.Tensor,
                           fake: Mapping[str, torch.Tensor], fake_c: torch.Tensor,
                           blur_sigma: float) -> torch.Tensor:
        """``mean(softplus(D(fake))) + mean(softplus(-D(real)))`` (fakes detached)."""
        fake = {k: v.detach() for k, v in fake.items()}
        return F.softplus(self.run_D(fake, fake_c, blur_sigma)).mean() + \
            F.softplus(-self.run_D(real, real_c, blur_sigma)).mean()

    def density_regularizer(self, z: torch.Tensor, labels: torch.Tensor,
                            swapping_prob: Optional[float]) -> torch.Tensor:
        """The density TV term (module docstring; :func:`density_tv_loss` through the warp of
        the phase's codes), times ``density_reg``."""
        cfg = self.config
        camera, codes = labels_to_codes(labels)
        cond = self.G.condition(camera, codes["shape"])
        if swapping_prob is None:
            cond = torch.zeros_like(cond)
        elif float(torch.rand([])) < swapping_prob:
            cond = torch.roll(cond, 1, 0)
        planes = self.G.planes(self.G.mapping(z, cond), noise_mode="random")
        n = z.shape[0]
        points = torch.rand((n, cfg.density_reg_points, 3), device=z.device) * 2 - 1
        moved = points + torch.randn_like(points) * cfg.density_reg_p_dist * self.G.config.box_warp
        return density_tv_loss(self.G, planes, codes, points, moved) * cfg.density_reg

    # ------------------------------------------------------------------ phases
    def _optimize(self, module: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        """The optimizer step on the accumulated gradients (averaged over the ranks, NaN and
        infinities replaced as StyleGAN2 does)."""
        params = [p for p in module.parameters() if p.requires_grad]
        self.dist.average_gradients(params)
        for p in params:
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()

    def phases(self, step_index: int) -> List[str]:
        """The phases of step ``step_index`` (0-based): ``Gmain``, ``Greg`` when the step is a
        multiple of ``g_reg_interval`` (and the density term is on), ``Dmain``, ``Dreg`` when a
        multiple of ``d_reg_interval`` (and some R1 gamma is > 0). An interval of None
        regularizes on every step at weight 1 (no lazy regularization)."""
        cfg = self.config
        out = ["Gmain"]
        if cfg.density_reg > 0 and step_index % (cfg.g_reg_interval or 1) == 0:
            out.append("Greg")
        out.append("Dmain")
        gammas = cfg.r1_gamma + cfg.r1_gamma_uv + cfg.r1_gamma_seg
        if gammas > 0 and step_index % (cfg.d_reg_interval or 1) == 0:
            out.append("Dreg")
        return out

    def phase_loss(self, phase: str, batch: Mapping[str, torch.Tensor], blur_sigma: float,
                   swapping_prob: Optional[float]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One phase's loss on a (micro-)batch: ``(loss, logged)``, ``loss`` the scalar to
        back-propagate (a regularizer's times its interval), ``logged`` the named terms.

        Args:
            phase: one of :data:`PHASES`.
            batch: ``real_img [n, 3, R, R]``, ``real_labels [n, 437]``, optionally ``real_seg
                [n, 1, R, R]``, ``gen_z [n, z_dim]``, ``gen_labels [n, 437]`` (this phase's fakes).
        """
        cfg = self.config
        gen_z, gen_labels = batch["gen_z"], batch["gen_labels"]
        gen_c = gen_labels[:, :25]
        if phase == "Gmain":
            fake = self.run_G(gen_z, gen_labels, swapping_prob, return_samples=True)
            loss_adv = F.softplus(-self.run_D(fake, gen_c, blur_sigma)).mean()
            parts = part_region_losses(fake, cfg.part_t_weight, cfg.part_density_weight, cfg.part_distortion_weight)
            return loss_adv + sum(parts.values()), {"Loss/G/loss": loss_adv, **parts}
        if phase == "Greg":
            loss = self.density_regularizer(gen_z, gen_labels, swapping_prob)
            return loss * (cfg.g_reg_interval or 1), {"Loss/G/TVloss": loss}
        real_c, _ = labels_to_codes(batch["real_labels"])
        if phase == "Dmain":
            with torch.no_grad():
                fake = self.run_G(gen_z, gen_labels, swapping_prob, update_emas=True)
            real = self.real_inputs(batch, blur_sigma)
            loss = self.discriminator_loss(real, real_c, fake, gen_c, blur_sigma)
            return loss, {"Loss/D/loss": loss}
        if phase == "Dreg":
            real = self.real_inputs(batch, blur_sigma)
            with self.precision.full_precision():  # R1's double backward in float32
                _, penalty = r1_penalty(self.D, real, real_c, cfg.r1_gamma, cfg.r1_gamma_uv, cfg.r1_gamma_seg,
                                        self.img_name, self.img_raw_name, blur_sigma)
            loss = penalty.mean()
            return loss * (cfg.d_reg_interval or 1), {"Loss/D/reg": loss}
        raise ValueError(f"GenHeadTrainer.phase_loss: phase must be one of {PHASES}, got {phase!r}")

    def accumulate_phase(self, phase: str, batch: Mapping[str, torch.Tensor], blur_sigma: float,
                         swapping_prob: Optional[float]) -> Dict[str, torch.Tensor]:
        """The gradients of one phase added into ``.grad`` over ``config.accumulate``
        micro-batches of ``batch`` (:meth:`sample_batch`'s, this phase's fakes picked), each
        loss scaled by ``1 / accumulate``; returns the logged terms' means (no optimizer step)."""
        p = PHASES.index(phase)
        phase_batch = {"real_img": batch["real_img"], "real_labels": batch["real_labels"],
                       "gen_z": batch["gen_z"][p], "gen_labels": batch["gen_labels"][p]}
        if "real_seg" in batch:
            phase_batch["real_seg"] = batch["real_seg"]
        return accumulate_gradients(split_microbatches(phase_batch, self.config.accumulate),
                                    lambda micro: self.phase_loss(phase, micro, blur_sigma, swapping_prob))

    def step(self) -> Dict[str, float]:
        """One training step (all its phases, each over ``config.accumulate`` micro-batches
        and one optimizer step), the EMA update; returns the losses (means over the
        micro-batches and the ranks) as floats and also keeps them in ``last_losses``."""
        cfg = self.config
        batch = self.sample_batch()
        blur_fade_kimg, ema_kimg = cfg.schedule_kimg(self.dist.world_size)
        blur_sigma = blur_sigma_at(self.cur_nimg, cfg.blur_init_sigma, blur_fade_kimg)
        swapping_prob = swapping_prob_at(self.cur_nimg, cfg.gpc_reg_prob, cfg.gpc_reg_fade_kimg)
        losses: Dict[str, torch.Tensor] = {}
        for phase in self.phases(self.step_index):
            training_g = phase.startswith("G")
            module, opt = (self.G, self.G_opt) if training_g else (self.D, self.D_opt)
            self.G.requires_grad_(training_g)
            self.D.requires_grad_(not training_g)
            opt.zero_grad(set_to_none=True)
            losses.update(self.accumulate_phase(phase, batch, blur_sigma, swapping_prob))
            self._optimize(module, opt)
        self.G.requires_grad_(True)
        self.D.requires_grad_(True)
        self.dist.average_running_means(self.G)
        world_batch = cfg.batch * self.dist.world_size
        # as StyleGAN2: the decay uses the images seen before this step (the first step copies G)
        update_ema(self.G_ema, self.G, ema_beta(world_batch, self.cur_nimg, ema_kimg, cfg.ema_rampup))
        self.cur_nimg += world_batch
        self.step_index += 1
        self.last_losses = {k: float(self.dist.mean(v.detach())) for k, v in losses.items()}
        return self.last_losses

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> Dict[str, Any]:
        """The real images' stream position, beside what every checkpoint holds
        (:class:`~head4d.train.common.CheckpointedTrainer`)."""
        return {"data_stream": self.stream.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        # every rank has consumed the same number of its own items: rank 0's position holds for all
        # (a checkpoint without one, from before the data stream, continues at step * batch)
        self.stream.load_state_dict(state.get("data_stream", {"position": self.step_index * self.config.batch}))

    @torch.no_grad()
    def snapshot_images(self, count: int = 8) -> torch.Tensor:
        """``G_ema``'s images ``[K, 3, R, R]`` in [-1, 1] (the super-resolved ones with a
        super-resolution), ``K = count``, for latents fixed by ``config.seed`` and the labels
        of dataset items ``0 .. K-1`` (repeated if fewer), constant noise, float32: the same
        grid at every call, so that grids show the training's progress."""
        generator = torch.Generator().manual_seed(self.config.seed + 104723)
        g = self.G_ema
        z = torch.randn(count, g.config.z_dim, generator=generator).to(self.device)
        labels = self.labels_of(torch.arange(count) % len(self.dataset)).to(self.device)
        camera, codes = labels_to_codes(labels)
        cond = g.condition(camera, codes["shape"])
        if self.config.gpc_reg_prob is None:
            cond = torch.zeros_like(cond)
        ws = g.mapping(z, cond)
        out = g.render(g.planes(ws, noise_mode="const"), camera, codes, ws=ws,
                       background=g.background_image(z, noise_mode="const"))
        return out["image" if g.superresolution is not None else "image_raw"].float().clamp(-1, 1)

    def real_images(self, count: int = 8) -> torch.Tensor:
        """Dataset items ``0 .. count-1`` (repeated if fewer) as ``[K, 3, R, R]`` in [-1, 1]."""
        items = [self.dataset[i % len(self.dataset)][0] for i in range(count)]
        return torch.stack([torch.as_tensor(x) for x in items]).float() / 127.5 - 1

    def close(self) -> None:
        """Stop the data workers and remove the mixed-precision hooks."""
        self.stream.close()
        self.precision.remove()


def _open_dataset(config: GenHeadTrainingConfig):
    if config.data is None:
        raise ValueError("train_genhead: config.data (--data) must name a dataset folder or zip")
    try:
        from ..data import ImageLabelDataset
    except ImportError as exc:
        raise RuntimeError("train_genhead: reading a dataset needs head4d.data (ImageLabelDataset), which this "
                           "head4d lacks") from exc
    return ImageLabelDataset(config.data, xflip=config.xflip)


def train_genhead(config: GenHeadTrainingConfig, dataset: Optional[Sequence] = None, head_model=None,
                  max_steps: Optional[int] = None) -> GenHeadTrainer:
    """Train GenHead: build (or resume from ``out/checkpoint.safetensors`` with ``config.resume``),
    run steps until ``config.kimg`` thousand images (two with ``dry_run``, at most
    ``max_steps`` when given), log, and write the checkpoint every ``checkpoint_every`` steps
    and at the end; at the end also export the EMA generator to ``out/G_ema`` with
    :meth:`GenHead.save` (for ``head4d demo --checkpoint`` and the synthesis). Works unchanged
    under ``torchrun`` (see :class:`Distributed`).

    Args:
        config: :class:`GenHeadTrainingConfig`.
        dataset: the items (None: ``ImageLabelDataset(config.data)``).
        head_model: GenHead's head model (None: the procedural head).
        max_steps: a cap on the steps of this call.

    Returns:
        the trainer after the last step.
    """
    config.check()
    dist_ = Distributed.from_env(config.device)
    try:
        return _train(config, dist_, dataset, head_model, max_steps)
    finally:
        dist_.close()


def _train(config: GenHeadTrainingConfig, dist_: Distributed, dataset: Optional[Sequence], head_model,
           max_steps: Optional[int]) -> GenHeadTrainer:
    """:func:`train_genhead`'s loop inside its process group."""
    if dataset is None:
        dataset = _open_dataset(config)
    trainer = GenHeadTrainer(config, dataset, dist_, head_model)
    return run_training(
        trainer, config, dist_, name="train_genhead", max_steps=max_steps,
        banner=(f"precision {config.precision}, {config.batch} images per process in {config.accumulate} "
                f"micro-batch(es), {dist_.world_size} process(es), {config.workers} data worker(s)"),
        export_note=f"generator to {Path(config.out) / EXPORT_NAME} (GenHead.load reads it)",
        write_snapshot=lambda log: log.images(trainer.step_index, "Images/fakes_ema", trainer.snapshot_images(),
                                              trainer.cur_nimg),
        write_start=lambda log: log.images(0, "Images/reals", trainer.real_images(), 0))
