"""``Reconstructor``: Portrait4D's one-shot 4D head reconstructor (stage two,
``TriPlaneReconstructorNeutralize``), composed from head4d's modules: the encoders
(:mod:`head4d.nn.encoders`), the canonicalization / re-enactment transformer and the
triplane decoder (:mod:`head4d.nn.triplane_transformer`, attention on
:func:`head4d.ops.attention`), GenHead's super-resolution and point decoder, the neck warp
of :class:`~head4d.deform.PartwiseDeformation` and the ray marcher
(:class:`~head4d.render.TriplaneRenderer`).

Drop-in compatibility: the module tree and the parameter and buffer names are upstream's
(``encoder_global``, ``encoder_detail``, ``encoder_canonical``, ``generator_triplane``,
``background``, ``superresolution``, ``decoder``, the buffer ``w_avg``), as are the
sub-modules' call signatures, so ``load_state_dict`` takes a Portrait4D reconstructor state
dict for those names as it is. The upstream ``deformer.*`` buffers (the FLAME model) and
``dataset_label_std`` are not modules here (:func:`head4d.checkpoints.load_network_pkl`
turns the FLAME buffers into the head model); load an upstream state dict with
``strict=False`` or drop those keys first.

What one source image and one driving motion go through (B sources, N = B * K frames, r
the neural rendering resolution, 128 by default):

1. **Encode** (:meth:`Reconstructor.encode`, once per source): ``encoder_global`` (a dilated
   ResNet-34 without normalization, then an ASPP decoder: 256 channels at 64 x 64),
   ``encoder_detail`` (96 channels at 256 x 256), both fed the RGB image with two
   coordinate channels appended; ``encoder_canonical.canonicalize``: 32 x 32 = 1,024
   tokens of 1,024 channels through the canonicalization blocks, which cross-attend to the
   source motion's 64 tokens (neutralizing the source expression); ``background``: a
   U-Net on the source image, sigmoid: 32 features at 512 x 512.
2. **Re-enact** (:meth:`Reconstructor.reenact`, per frame, batched): the re-enactment blocks
   cross-attend to the driving motion's tokens; pixel shuffle to 256 x 64 x 64, two
   bilinear (corner-aligned) x2 upsamplings with convolutions: 96 channels at 256 x 256;
   ``generator_triplane`` with the detail features: the triplane, 3 planes of 32 channels
   at 256 x 256 (one triplane, the Portrait4D plane layout).
3. **Render**: every sample point is warped by the neck surface field when FLAME codes are
   given (:meth:`~head4d.deform.PartwiseDeformation.warp_neck`; expression comes only from
   the motion tokens), read from the triplane and decoded (``decoder``); 48 + 48 samples,
   'auto-plane' depths. The background, resized (bilinear) to r, is added with the
   transmittance ``T_bg = 1 - opacity``, then ``* 2 - 1``: ``image_feature``, channels 0-2
   ``image_raw``.
4. **Super-resolution**: ``superresolution(image_raw, image_feature, ws, noise_mode='none')``
   with every w the buffer ``w_avg`` (the reconstructor's super-resolution is conditioned
   on that fixed vector, GenHead's on ones): ``image`` at 512.

``motion_scale`` multiplies every cross-attention branch: 1 re-enacts, 0 switches the
motion off (Portrait4D's static half of each training batch). It is always a tensor ``[B]``
inside, so a batch may mix both and nothing syncs with the host.

Differences from the released code: neural resolutions above 128 are refused (there
upstream bypasses the super-resolution and reads an empty plane list); the renderer's
background compositing is done here in closed form, which is the same arithmetic.

Backends: ``Reconstructor(backend=None)`` runs every op on its default (head4d's kernels
where built); ``backend="torch"`` runs every op inside the model on the plain PyTorch
references through :func:`head4d._backend.backend_scope`.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .._checks import FLOATING, check_tensor
from .._nvtx import nvtx_range
from ..deform import PartwiseDeformation
from ..head.base import HeadModel
from ..nn import (DecoderTriplane, EncoderBG, EncoderCanonical, EncoderDetail, EncoderGlobal,
                  SuperresolutionHybrid8XDC)
from ..render import TriplaneDecoder, TriplaneRenderer
from ._common import (CAMERA_SIZE, RenderingSettings, TriplaneHeadModel, camera_rays, check_rows, rays_to_image, repeat_rows,
                      triplane_point_decoder)
from .genhead import FlameCodes

NAME = "Reconstructor"

#: The motion inputs: PD-FGC's motion vector (eyes 6 + emotion 30 + mouth 512; the head
#: pose is excluded) and the FLAME alternative (expression 100 + jaw 3 + eyes 6).
PDFGC_MOTION_DIM = 548
FLAME_MOTION_DIM = 109
#: The source image: aligned RGB at 512 x 512 in [-1, 1] (the released models').
SOURCE_RESOLUTION = 512
#: The triplane: 3 planes of 32 channels.
PLANE_FEATURES = 32
#: head4d's own format (Reconstructor.save / Reconstructor.load): format tag and version.
SAVE_FORMAT = "head4d.Reconstructor"
SAVE_VERSION = 1


@dataclass
class ReconstructorConfig(RenderingSettings):
    """The reconstructor's settings; the defaults are the released v1 ones
    (``portrait4d-genhead512``).

    Motion: ``motion_dim`` (548 for PD-FGC's motion vector, 109 for FLAME's expression, jaw
    and eyes), ``source_resolution`` (the source image's side, 512: every network is
    convolutional, so a multiple of 16 gives the same computation at a smaller size, the
    triplane at half of it and 1 / 256 of its pixels as canonical tokens, which tests
    use), ``num_blocks_neutral`` and ``num_blocks_motion`` (canonicalization and
    re-enactment blocks), ``motion_map_layers`` (the motion MLPs' depth).
    Background: ``has_background``. Super-resolution: ``has_superresolution``,
    ``img_resolution`` (512), ``sr_num_fp16_res``, ``sr_antialias``, ``channel_base``,
    ``channel_max``, ``fused_modconv_default``. The decoder, rendering, neck-grid,
    ``fused`` and ``backend`` settings are :class:`RenderingSettings`' (here
    ``neural_rendering_resolution`` defaults to 128, the reconstructor's).
    """

    motion_dim: int = PDFGC_MOTION_DIM
    source_resolution: int = SOURCE_RESOLUTION
    num_blocks_neutral: int = 4
    num_blocks_motion: int = 4
    motion_map_layers: int = 2
    has_background: bool = True
    has_superresolution: bool = True
    img_resolution: int = 512
    sr_num_fp16_res: int = 4
    sr_antialias: bool = True
    channel_base: int = 32768
    channel_max: int = 512
    fused_modconv_default: Union[bool, str] = "inference_only"
    neural_rendering_resolution: int = 128


@dataclass
class EncodedSource:
    """What :meth:`Reconstructor.encode` keeps of B source images for any number of frames.

    Attributes:
        tokens: ``[B, h*w, 1024]`` the canonicalized tokens (after the canonicalization
            blocks), row-major over the ``grid``.
        grid: ``(h, w)`` the token grid (32, 32).
        detail: ``[B, 96, 256, 256]`` the detail encoder's features.
        background: ``[B, 32, 512, 512]`` the background features in (0, 1) (sigmoid), or
            None without a background.
        motion_scale: ``[B]`` the motion scale the canonicalization used, the default of
            :meth:`Reconstructor.reenact`.
    """

    tokens: torch.Tensor
    grid: Tuple[int, int]
    detail: torch.Tensor
    background: Optional[torch.Tensor]
    motion_scale: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def detach(self) -> "EncodedSource":
        """The same tensors without autograd history."""
        bg = None if self.background is None else self.background.detach()
        return EncodedSource(self.tokens.detach(), self.grid, self.detail.detach(), bg, self.motion_scale.detach())


def _motion_scale(op: str, scale, batch: int, device: torch.device) -> torch.Tensor:
    """``scale`` (a real number, or a real tensor of shape [] or [batch]) as a float32
    tensor ``[batch]`` on ``device``."""
    if isinstance(scale, torch.Tensor):
        if scale.is_complex() or scale.dtype == torch.bool:
            raise TypeError(f"{op}: motion_scale must be real, got a {str(scale.dtype).replace('torch.', '')} tensor")
        if scale.dim() == 0:
            return scale.to(device=device, dtype=torch.float32).expand(batch)
        if scale.dim() == 1 and scale.shape[0] == batch:
            if scale.device != device:
                raise ValueError(f"{op}: motion_scale is on {scale.device} but the inputs are on {device}")
            return scale.to(torch.float32)
        raise ValueError(f"{op}: motion_scale must be a number or a tensor of shape [{batch}] (one per sample) or "
                         f"[], got shape {list(scale.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: motion_scale must be a real number or a tensor, got {type(scale).__name__}")
    return torch.full((batch,), float(scale), dtype=torch.float32, device=device)


class Reconstructor(TriplaneHeadModel):
    """Portrait4D's reconstructor (``TriPlaneReconstructorNeutralize``) on head4d's kernels
    (see the module docstring for the computation).

    Modules (upstream names): ``encoder_global`` (:class:`~head4d.nn.EncoderGlobal`),
    ``encoder_detail`` (:class:`~head4d.nn.EncoderDetail`), ``encoder_canonical``
    (:class:`~head4d.nn.EncoderCanonical`), ``generator_triplane``
    (:class:`~head4d.nn.DecoderTriplane`), ``background`` (:class:`~head4d.nn.EncoderBG`,
    None without a background), ``superresolution``
    (:class:`~head4d.nn.SuperresolutionHybrid8XDC`, None without), ``decoder``
    (:class:`~head4d.render.TriplaneDecoder`, variant ``"portrait4d"``), the buffer
    ``w_avg`` ``[512]`` (the super-resolution's w); head4d's own: ``deformation`` (the neck
    warp, holding the head model; no state-dict entry) and ``renderer``. ``save`` /
    ``load``: head4d's safetensors format (format tag ``"head4d.Reconstructor"``).

    Args:
        config: :class:`ReconstructorConfig` (None: the released v1 defaults).
        head_model: the :class:`~head4d.head.HeadModel` whose neck pose warps the sample
            points when codes are given (None: ``ProceduralHead()``).
    """

    NAME = NAME
    SAVE_FORMAT = SAVE_FORMAT
    SAVE_VERSION = SAVE_VERSION
    CONFIG_CLASS = ReconstructorConfig

    def __init__(self, config: Optional[ReconstructorConfig] = None, head_model: Optional[HeadModel] = None):
        super().__init__()
        config = self._own_config(config)
        if isinstance(config.motion_dim, bool) or not isinstance(config.motion_dim, int) or config.motion_dim < 1:
            raise ValueError(f"{NAME}: config.motion_dim must be a positive int ({PDFGC_MOTION_DIM} for PD-FGC "
                             f"motion, {FLAME_MOTION_DIM} for FLAME motion), got {config.motion_dim!r}")
        side = config.source_resolution
        if isinstance(side, bool) or not isinstance(side, int) or side < 16 or side % 16:
            raise ValueError(f"{NAME}: config.source_resolution must be a positive multiple of 16 (released: "
                             f"{SOURCE_RESOLUTION}), got {side!r}")
        if head_model is None:
            from ..head import ProceduralHead
            head_model = ProceduralHead()
        if not isinstance(head_model, HeadModel):
            raise TypeError(f"{NAME}: head_model must be a head4d.head.HeadModel (FLAME or ProceduralHead), "
                            f"got {type(head_model).__name__}")
        self.config = config
        c = self.config
        self.encoder_global = EncoderGlobal()
        self.encoder_detail = EncoderDetail()
        self.encoder_canonical = EncoderCanonical(mot_dims=c.motion_dim, num_blocks_neutral=c.num_blocks_neutral,
                                                  num_blocks_motion=c.num_blocks_motion,
                                                  mapping_layers=c.motion_map_layers)
        self.generator_triplane = DecoderTriplane()
        self.background = EncoderBG() if c.has_background else None
        self.superresolution = None
        if c.has_superresolution:
            self.superresolution = SuperresolutionHybrid8XDC(
                channels=PLANE_FEATURES, img_resolution=c.img_resolution, sr_num_fp16_res=c.sr_num_fp16_res,
                sr_antialias=c.sr_antialias, channel_base=c.channel_base, channel_max=c.channel_max,
                fused_modconv_default=c.fused_modconv_default, use_ws_ones=False)
        self.decoder = TriplaneDecoder(PLANE_FEATURES, c.decoder_hidden, PLANE_FEATURES, variant="portrait4d",
                                       lr_multiplier=c.decoder_lr_mul)
        self.register_buffer("w_avg", torch.zeros(512))
        self.deformation = PartwiseDeformation(head_model, box_side=c.box_warp, fine_resolution=c.fine_resolution,
                                               coarse_resolution=c.coarse_resolution, mouth=False)
        self.renderer = TriplaneRenderer(plane_layout="portrait4d")
        self.backend = c.backend

    # ------------------------------------------------------------------ settings
    @property
    def motion_dim(self) -> int:
        return self.config.motion_dim

    def extra_repr(self) -> str:
        return f"backend={self._ops_backend!r}, motion_dim={self.motion_dim}"

    # ------------------------------------------------------------------ checks
    def _check_image(self, op: str, image) -> torch.Tensor:
        side = self.config.source_resolution
        check_tensor(op, "source_image", image, f"[B, 3, {side}, {side}]", 4, FLOATING)
        if image.shape[1] != 3 or image.shape[2:] != (side, side):
            raise ValueError(f"{op}: source_image must be an RGB image batch [B, 3, {side}, {side}] in [-1, 1], "
                             f"aligned as Portrait4D aligns faces; got shape {list(image.shape)}")
        if image.shape[0] == 0:
            raise ValueError(f"{op}: source_image holds no image (batch 0)")
        return image

    def _check_motion(self, op: str, name: str, motion, batch: Optional[int] = None) -> torch.Tensor:
        check_tensor(op, name, motion, f"[N, {self.motion_dim}]", 2, FLOATING)
        if motion.shape[1] != self.motion_dim:
            kind = {PDFGC_MOTION_DIM: "PD-FGC motion vectors", FLAME_MOTION_DIM: "FLAME motion (expression 100, "
                    "jaw 3, eyes 6)"}.get(self.motion_dim, "motion vectors")
            raise ValueError(f"{op}: {name} must have shape [N, {self.motion_dim}] ({kind}, as the config's "
                             f"motion_dim), got {list(motion.shape)}")
        if batch is not None and motion.shape[0] != batch:
            raise ValueError(f"{op}: {name} has {motion.shape[0]} rows but {batch} were expected")
        return motion

    # ------------------------------------------------------------------ stages
    def encode(self, source_image: torch.Tensor, source_motion: torch.Tensor, *,
               motion_scale: Union[float, torch.Tensor] = 1.0) -> EncodedSource:
        """Encode B source images once (encoders, canonicalization blocks, background).

        Args:
            source_image: ``[B, 3, S, S]`` floating RGB in [-1, 1], aligned; S the config's
                ``source_resolution`` (512).
            source_motion: ``[B, motion_dim]`` the source's motion vectors.
            motion_scale: a number or a tensor ``[B]``: the canonicalization blocks'
                cross-attention scale (0: motion off).

        Returns:
            :class:`EncodedSource`, for :meth:`reenact`.
        """
        op = f"{NAME}.encode"
        self._check_image(op, source_image)
        b = source_image.shape[0]
        self._check_motion(op, "source_motion", source_motion, b)
        if source_motion.device != source_image.device:
            raise ValueError(f"{op}: source_motion is on {source_motion.device} but source_image is on "
                             f"{source_image.device}")
        scale = _motion_scale(op, motion_scale, b, source_image.device)
        with self._scope(), nvtx_range("head4d.reconstructor.encode"):
            with nvtx_range("head4d.reconstructor.encoder_global"):
                features_global = self.encoder_global(source_image)
            with nvtx_range("head4d.reconstructor.encoder_detail"):
                detail = self.encoder_detail(source_image)
            with nvtx_range("head4d.reconstructor.canonicalize"):
                tokens, grid = self.encoder_canonical.canonicalize(features_global, source_motion, scale=scale)
            background = None
            if self.background is not None:
                with nvtx_range("head4d.reconstructor.background"):
                    background = torch.sigmoid(self.background(source_image))
        return EncodedSource(tokens=tokens, grid=tuple(grid), detail=detail, background=background,
                             motion_scale=scale)

    def triplanes(self, encoded: EncodedSource, driving_motion: torch.Tensor, *,
                  motion_scale: Union[None, float, torch.Tensor] = None) -> torch.Tensor:
        """The re-enacted triplanes ``[N, 3, 32, 256, 256]`` of N frames (re-enactment
        blocks, upsampling convolutions, ``generator_triplane``); N a multiple of B, frame
        ``b * K + k`` of source b. ``motion_scale``: None (the encoded one), a number, or a
        tensor ``[N]`` / ``[B]``."""
        op = f"{NAME}.triplanes"
        if not isinstance(encoded, EncodedSource):
            raise TypeError(f"{op}: encoded must be the EncodedSource of Reconstructor.encode, "
                            f"got {type(encoded).__name__}")
        self._check_motion(op, "driving_motion", driving_motion)
        n = driving_motion.shape[0]
        if driving_motion.device != encoded.tokens.device:
            raise ValueError(f"{op}: driving_motion is on {driving_motion.device} but the encoded source is on "
                             f"{encoded.tokens.device}")
        if motion_scale is None:
            scale = repeat_rows(op, "encoded.motion_scale", encoded.motion_scale, n)
        elif isinstance(motion_scale, torch.Tensor) and motion_scale.dim() == 1 and motion_scale.shape[0] != n:
            scale = repeat_rows(op, "motion_scale", _motion_scale(op, motion_scale, motion_scale.shape[0],
                                                                  driving_motion.device), n)
        else:
            scale = _motion_scale(op, motion_scale, n, driving_motion.device)
        tokens = repeat_rows(op, "encoded.tokens", encoded.tokens, n)
        detail = repeat_rows(op, "encoded.detail", encoded.detail, n)
        h, w = encoded.grid
        with self._scope(), nvtx_range("head4d.reconstructor.triplanes"):
            with nvtx_range("head4d.reconstructor.reenact_blocks"):
                _, features_canonical = self.encoder_canonical.reenact(tokens, h, w, driving_motion, scale=scale)
            with nvtx_range("head4d.reconstructor.generator_triplane"):
                planes = self.generator_triplane(features_canonical, detail)
            return planes.view(n, 3, PLANE_FEATURES, planes.shape[-2], planes.shape[-1])

    def render(self, planes: torch.Tensor, camera: torch.Tensor, *, background: Optional[torch.Tensor] = None,
               codes: Union[None, FlameCodes, Mapping[str, torch.Tensor]] = None,
               neural_rendering_resolution: Optional[int] = None,
               generator: Optional[torch.Generator] = None, super_resolve: bool = True) -> Dict[str, torch.Tensor]:
        """Render triplanes with cameras (no encoder): volume rendering, background,
        super-resolution (:meth:`superresolve`; ``super_resolve=False`` leaves it out, and
        ``image`` with it).

        Args:
            planes: ``[N, 3, 32, H, W]`` from :meth:`triplanes` (or ``[N, 96, H, W]``).
            camera: ``[N, 25]`` camera labels (cam2world 16 + normalized intrinsics 9).
            background: ``[N or B, 32, Hb, Wb]`` background features in (0, 1)
                (:attr:`EncodedSource.background`), or None (composited over 0).
            codes: :class:`~head4d.models.FlameCodes` with N (or B) rows whose neck pose
                warps the sample points (the other codes only pose the mesh the neck field
                is built on), or None: no warp (the same as a zero neck pose).
            neural_rendering_resolution: r (None: the config's, 128), at most 128.
            generator: ``torch.Generator`` for the renderer's random numbers.

        Returns:
            A dict of float32 tensors: ``image`` ``[N, 3, 512, 512]`` (with the
            super-resolution), ``image_raw`` ``[N, 3, r, r]``, ``image_depth`` ``[N, 1, r, r]``,
            ``image_feature`` ``[N, 32, r, r]`` (in [-1, 1]), ``opacity`` ``[N, 1, r, r]``,
            ``image_raw_wobg`` ``[N, 3, r, r]`` (the head over black: upstream's
            ``image_wobg``), ``image_background`` ``[N, 3, r, r]`` (the background's RGB in
            [-1, 1], only with a background), ``planes`` (the input, ``[N, 3, 32, H, W]``).
        """
        op = f"{NAME}.render"
        c = self.config
        r = c.neural_resolution(op, neural_rendering_resolution)
        check_tensor(op, "planes", planes, f"[N, 3, {PLANE_FEATURES}, H, W]",
                     planes.dim() if isinstance(planes, torch.Tensor) and planes.dim() in (4, 5) else 5, FLOATING)
        if planes.dim() == 4 and planes.shape[1] == 3 * PLANE_FEATURES:
            planes = planes.view(planes.shape[0], 3, PLANE_FEATURES, *planes.shape[2:])
        if planes.dim() != 5 or planes.shape[1] != 3 or planes.shape[2] != PLANE_FEATURES:
            raise ValueError(f"{op}: planes must have shape [N, 3, {PLANE_FEATURES}, H, W], got {list(planes.shape)}")
        check_rows(op, "camera", camera, CAMERA_SIZE)
        n = camera.shape[0]
        planes = repeat_rows(op, "planes", planes, n)
        if background is not None:
            check_tensor(op, "background", background, f"[N, {PLANE_FEATURES}, H, W]", 4, FLOATING)
            background = repeat_rows(op, "background", background, n)
        fields = None
        if codes is not None:
            codes = FlameCodes.of(codes)
            for name, value in codes.as_dict().items():
                check_tensor(op, f"codes.{name}", value, "[N, *]", 2, FLOATING)
            head_dtype = self.head_model.dtype
            codes = FlameCodes(**{k: repeat_rows(op, f"codes.{k}", v, n).to(head_dtype)
                                  for k, v in codes.as_dict().items()})

        with self._scope(), nvtx_range("head4d.reconstructor.render"):
            if codes is not None:
                with nvtx_range("head4d.reconstructor.deformation"):
                    fields = self.deformation.build(**codes.as_dict())
            with nvtx_range("head4d.reconstructor.rays"):
                cam2world, origins, directions = camera_rays(camera, r)
            decode = triplane_point_decoder(self.decoder, self.renderer, planes.device, c.fused, c.box_warp,
                                            self._ops_backend)

            def field(points: torch.Tensor, directions: torch.Tensor) -> Dict[str, torch.Tensor]:
                if fields is not None:
                    points = self.deformation.warp_neck(points, fields).to(points.dtype)
                return decode(planes, points)

            with nvtx_range("head4d.reconstructor.raymarch"):
                features, depth, opacity = self.renderer(field, None, origins, directions, c.rendering_options(),
                                                         generator=generator, cam2world=cam2world)
            feature_wobg = rays_to_image(features, r)
            opacity = rays_to_image(opacity, r)
            out = {"image_raw_wobg": feature_wobg[:, :3], "image_depth": rays_to_image(depth, r),
                   "opacity": opacity, "planes": planes}
            feature_image = feature_wobg
            if background is not None:
                bg = F.interpolate(background.to(torch.float32), size=(r, r), mode="bilinear", align_corners=False,
                                   antialias=False)
                # (2 * (f + T_bg * bg) - 1) = (2 * f - 1) + 2 * T_bg * bg, T_bg = 1 - opacity
                feature_image = feature_wobg + 2.0 * (1.0 - opacity) * bg
                out["image_background"] = 2.0 * bg[:, :3] - 1.0
            out["image_feature"] = feature_image
            out["image_raw"] = feature_image[:, :3]
            if self.superresolution is not None and super_resolve:
                out["image"] = self.superresolve(out["image_raw"], feature_image)
            return out

    def superresolve(self, image_raw: torch.Tensor, image_feature: torch.Tensor) -> torch.Tensor:
        """The super-resolution alone: ``superresolution(image_raw, image_feature, ws,
        noise_mode='none')`` with every w the buffer ``w_avg``.

        Args:
            image_raw: ``[N, 3, r, r]`` and ``image_feature``: ``[N, 32, r, r]``, as
                :meth:`render` returns them (``render(..., super_resolve=False)`` skips
                this step, so that a caller can time it apart).

        Returns:
            ``image`` ``[N, 3, 512, 512]``.
        """
        op = f"{NAME}.superresolve"
        if self.superresolution is None:
            raise ValueError(f"{op}: this reconstructor has no super-resolution (config.has_superresolution False)")
        check_tensor(op, "image_raw", image_raw, "[N, 3, r, r]", 4, FLOATING)
        check_tensor(op, "image_feature", image_feature, f"[N, {PLANE_FEATURES}, r, r]", 4, FLOATING)
        if image_raw.shape[1] != 3 or image_feature.shape[1] != PLANE_FEATURES or \
                image_raw.shape[0] != image_feature.shape[0] or image_raw.shape[2:] != image_feature.shape[2:]:
            raise ValueError(f"{op}: image_raw must be [N, 3, r, r] and image_feature [N, {PLANE_FEATURES}, r, r] "
                             f"(one N and r), got {list(image_raw.shape)} and {list(image_feature.shape)}")
        with self._scope(), nvtx_range("head4d.reconstructor.superresolution"):
            ws = self.w_avg.to(torch.float32).reshape(1, 1, -1).expand(image_raw.shape[0], 1, -1)
            return self.superresolution(image_raw, image_feature, ws, noise_mode="none")

    def reenact(self, encoded: EncodedSource, driving_motion: torch.Tensor, camera: torch.Tensor, *,
                codes: Union[None, FlameCodes, Mapping[str, torch.Tensor]] = None,
                neural_rendering_resolution: Optional[int] = None,
                motion_scale: Union[None, float, torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Re-enact encoded sources with N driving motions and cameras (the per-frame part,
        batched over frames): :meth:`triplanes` then :meth:`render`.

        Args:
            encoded: from :meth:`encode` (B sources).
            driving_motion: ``[N, motion_dim]``, N a multiple of B (frame ``b * K + k`` of
                source b).
            camera: ``[N, 25]``.
            codes, neural_rendering_resolution, generator: as :meth:`render`.
            motion_scale: None (the encoded one), a number, or a tensor ``[N]`` or ``[B]``.

        Returns:
            :meth:`render`'s dict.
        """
        op = f"{NAME}.reenact"
        check_rows(op, "camera", camera, CAMERA_SIZE)
        self._check_motion(op, "driving_motion", driving_motion, camera.shape[0])
        with self._scope(), nvtx_range("head4d.reconstructor.reenact"):
            planes = self.triplanes(encoded, driving_motion, motion_scale=motion_scale)
            return self.render(planes, camera, background=encoded.background, codes=codes,
                               neural_rendering_resolution=neural_rendering_resolution, generator=generator)

    def forward(self, source_image: torch.Tensor, source_motion: torch.Tensor, driving_motion: torch.Tensor,
                camera: torch.Tensor, *, neural_rendering_resolution: Optional[int] = None,
                motion_scale: Union[float, torch.Tensor] = 1.0,
                codes: Union[None, FlameCodes, Mapping[str, torch.Tensor]] = None,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """The whole reconstructor: :meth:`encode` then :meth:`reenact`.

        Args:
            source_image: ``[B, 3, S, S]`` floating RGB in [-1, 1], aligned; S the config's
                ``source_resolution`` (512).
            source_motion: ``[B, motion_dim]``.
            driving_motion: ``[N, motion_dim]``, N a multiple of B.
            camera: ``[N, 25]``.
            neural_rendering_resolution: r (None: the config's, 128), at most 128.
            motion_scale: a number or a tensor ``[B]`` (0: the motion is switched off in
                every block, so the output does not depend on either motion).
            codes: FLAME codes for the neck warp, or None (:meth:`render`).
            generator: for the renderer's random numbers.

        Returns:
            :meth:`render`'s dict.
        """
        with self._scope(), nvtx_range("head4d.reconstructor"):
            encoded = self.encode(source_image, source_motion, motion_scale=motion_scale)
            return self.reenact(encoded, driving_motion, camera, codes=codes,
                                neural_rendering_resolution=neural_rendering_resolution, generator=generator)
