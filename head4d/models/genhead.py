"""``GenHead``: Portrait4D's part-wise 4D head generator (stage one), composed from head4d's
modules: the StyleGAN2 networks (:mod:`head4d.nn`), the part-wise deformation
(:class:`~head4d.deform.PartwiseDeformation`), the mask rasterizer
(:func:`~head4d.render.rasterize_masks`) and the ray marcher
(:class:`~head4d.render.TriplaneRenderer`).

Drop-in compatibility: the module tree and the parameter and buffer names are the upstream
generator's, so for the prefixes ``backbone.`` (``mapping`` + ``synthesis``),
``background.``, ``superresolution.`` (``block0``, ``block1``) and ``decoder.`` a
Portrait4D state dict loads as it is. The deformation lives under ``deformation.`` and
holds no state-dict entry (the head model's arrays are non-persistent buffers); the
upstream ``deformer.*`` buffers and ``dataset_label_std`` are not modules here, so load
an upstream state dict with ``strict=False`` or drop those keys first.

What one image goes through (:meth:`GenHead.forward`; N images, r the neural rendering
resolution):

1. **Mapping**: the condition is the 25-number camera label followed by the 300 shape
   coefficients (325 numbers, times ``c_scale``); ``backbone.mapping`` turns ``(z, c)``
   into 14 ws, truncated towards ``w_avg`` over the first ``truncation_cutoff`` of them.
2. **Backbone**: ``backbone.synthesis(ws)`` gives ``[N, 192, 256, 256]``, viewed as six
   planes of 32 channels: planes 0-2 are the part triplane (eyes and mouth share it),
   planes 3-5 the head triplane, each in the order XY, YZ, ZX (layout ``"portrait4d"``).
3. **Background**: a StyleGAN2 generator of its own, on ``z_bg`` (``z`` by default) with no
   condition and no truncation; sigmoid, then a bilinear resize (no antialiasing) to r.
4. **Deformation**: :meth:`PartwiseDeformation.build` on the codes (neck grids, posed
   meshes, eye boxes); every sample point is warped by
   :meth:`~PartwiseDeformation.warp` into head, eye and mouth canonical points.
5. **Masks**: the posed head is projected with the image's camera and rasterized at
   ``mask_resolution`` into the eye and mouth masks (:func:`~head4d.render.rasterize_masks`),
   then resized to r (bilinear, antialiased).
6. **Rendering** (:class:`~head4d.render.TriplaneRenderer`, 'auto-plane' depths, coarse
   plus importance samples): at each sample the head triplane is read at the
   head-canonical point and the part triplane at the eye point, or at the mouth point on
   rays whose mouth mask is > 0; one decoder (``decoder``) turns both into raw density and
   32 features (each triplane read and decoded by the fused
   :func:`~head4d.ops.decode_triplanes` where the renderer would fuse, see ``fused``). The part density is multiplied by ``inside_eye_box + mouth``; with
   ``e = eye_mask * inside_eye_box`` and ``m = mouth_mask`` (per ray),
   ``sigma = sigma_part * e + sigma_part * m + sigma_head * (1 - e - m)`` and the same mix
   of the features (after the decoder's sigmoid). This is Portrait4D's blend at neural
   resolutions up to 64 (:data:`MOUTH_FUSE_ABOVE`). Above 64 (Portrait4D renders at 128
   for its reconstructor) rays whose mouth mask is non-zero (a hard mask, ``m > 0``)
   take another rule instead: the two densities add, ``sigma = sigma_part + sigma_head``
   (``sigma_part`` already scaled as above), and the features are a two-way softmax mix
   weighted by the raw densities, ``w = softmax(sigma_part, sigma_head)``,
   ``rgb = w_part * rgb_part + w_head * rgb_head``; every other ray keeps the blend
   above. Resolutions above 128 are refused (``ValueError``): there Portrait4D skips the
   super-resolution and composites the background differently.
   The composited features get the background added with the transmittance
   ``T_bg = 1 - opacity``, then ``* 2 - 1``: ``image_feature``; its channels 0-2 are
   ``image_raw``.
7. **Super-resolution**: ``superresolution(image_raw, image_feature, ws, noise_mode='none')``
   with w = ones (``use_ws_ones``): ``image`` at 512.

The split for repeated renders: ``ws = G.mapping(z, G.condition(camera, shape))``,
``planes = G.planes(ws)``, ``background = G.background_image(z)``, then any number of
``G.render(planes, camera, codes, ws=ws, background=background)`` with new cameras and
codes; a triplane batch of B renders B * K cameras (K views per identity).
``G.render(..., return_samples=True)`` also returns the final pass's sample depths and
weights and the head triplane's densities in the eye boxes and the mouth, which GenHead's
training regularizes (:mod:`head4d.train.genhead`). On CUDA,
``G.render_graphed(...)`` captures that render once in a CUDA graph
(:class:`GraphedRender`, opt-in, inference only) and replays it for new cameras and codes.

Checkpoints: :func:`head4d.checkpoints.load_network_pkl` builds a GenHead (config,
weights, FLAME) from a Portrait4D pickle; :meth:`GenHead.save` / :meth:`GenHead.load`
are head4d's own format (``model.safetensors`` + ``config.json``, bit-exact).

Backends: ``GenHead(backend=None)`` runs every op on its default (head4d's compiled
kernels where built); ``backend="torch"`` runs every op inside the model on the plain
PyTorch references (StyleGAN2 layers, deformation, rasterizer, renderer), through
:func:`head4d._backend.backend_scope`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from .._checks import FLOATING, check_tensor
from .._nvtx import nvtx_range
from ..deform import PartwiseDeformation
from ..head.base import HeadModel
from ..nn import Generator, SuperresolutionHybrid8XDC
from ..render import TriplaneDecoder, TriplaneRenderer, rasterize_masks
from ._common import (CAMERA_SIZE, RenderingSettings, TriplaneHeadModel, camera_rays, check_rows, rays_to_image, repeat_rows,
                      triplane_point_decoder)

NAME = "GenHead"

#: Planes per triplane and the two triplanes' slices of the backbone's six planes.
PART_PLANES = slice(0, 3)
HEAD_PLANES = slice(3, 6)
#: FLAME shape size (the mapping's condition is the camera label, then the shape).
SHAPE_SIZE = 300
#: Above this neural rendering resolution, rays inside the hard mouth mask add the part
#: and head densities and mix their features by a softmax of the densities (module docstring).
MOUTH_FUSE_ABOVE = 64
#: head4d's own format (GenHead.save / GenHead.load): format tag and version.
SAVE_FORMAT = "head4d.GenHead"
SAVE_VERSION = 1
#: Near and far planes of the mask rasterizer's projection (world units; the camera
#: sits about 4 units from the head).
MASK_NEAR, MASK_FAR = 0.1, 20.0


@dataclass
class GenHeadConfig(RenderingSettings):
    """GenHead's settings; the defaults are the released ``genhead-ffhq512`` ones.

    Backbone: ``z_dim``, ``w_dim``, ``mapping_layers`` (its mapping depth), ``channel_base``,
    ``channel_max``, ``triplane_resolution``, ``triplane_channels`` (six planes, so six
    times the decoder's input features), ``num_fp16_res``, ``conv_clamp``,
    ``fused_modconv_default``, ``c_scale`` (the condition's scale).
    Background: ``has_background``, ``background_resolution``, ``background_channels``,
    ``background_channel_base``, ``background_channel_max``, ``background_mapping_layers``
    (the rest are StyleGAN2's defaults: FP16 in its 4 highest blocks on CUDA, clamp 256).
    Super-resolution: ``has_superresolution``, ``img_resolution`` (512), ``sr_num_fp16_res``,
    ``sr_antialias``, ``use_ws_ones``.
    Masks: ``mask_resolution`` (rasterized there, then resized to the neural resolution).
    The decoder, rendering (``neural_rendering_resolution``: 64, the default of
    :meth:`GenHead.forward`), neck-grid, ``fused`` and ``backend`` settings are
    :class:`~head4d.models._common.RenderingSettings`'.
    """

    z_dim: int = 512
    w_dim: int = 512
    c_scale: float = 1.0
    mapping_layers: int = 2
    channel_base: int = 32768
    channel_max: int = 512
    triplane_resolution: int = 256
    triplane_channels: int = 192
    num_fp16_res: int = 0
    conv_clamp: Optional[float] = None
    fused_modconv_default: Union[bool, str] = "inference_only"
    has_background: bool = True
    background_resolution: int = 64
    background_channels: int = 32
    background_channel_base: int = 16384
    background_channel_max: int = 512
    background_mapping_layers: int = 8
    has_superresolution: bool = True
    img_resolution: int = 512
    sr_num_fp16_res: int = 4
    sr_antialias: bool = True
    use_ws_ones: bool = True
    neural_rendering_resolution: int = 64
    mask_resolution: int = 512

    @property
    def plane_features(self) -> int:
        """Channels per plane (the decoder's input): ``triplane_channels // 6``."""
        return self.triplane_channels // 6


@dataclass
class FlameCodes:
    """FLAME-style codes of N heads (the head model's parameters), floating tensors:

    ``shape [N, 300]``, ``expression [N, 100]``, ``neck_pose [N, 3]`` (axis-angle),
    ``jaw_pose [N, 3]`` (axis-angle; Portrait4D's canonical mouth is ``(0.3, 0, 0)``),
    ``eye_pose [N, 6]`` (left then right eye axis-angles). A dict with these keys (as
    ``HeadModel.canonical_codes`` returns) is accepted wherever these are.
    """

    shape: torch.Tensor
    expression: torch.Tensor
    neck_pose: torch.Tensor
    jaw_pose: torch.Tensor
    eye_pose: torch.Tensor

    FIELDS = ("shape", "expression", "neck_pose", "jaw_pose", "eye_pose")

    @classmethod
    def of(cls, codes: Union["FlameCodes", Mapping[str, torch.Tensor]]) -> "FlameCodes":
        """``codes`` as :class:`FlameCodes` (from itself or from a dict with the five keys)."""
        if isinstance(codes, FlameCodes):
            return codes
        if not isinstance(codes, Mapping):
            raise TypeError(f"{NAME}: codes must be a FlameCodes or a dict with keys {cls.FIELDS}, "
                            f"got {type(codes).__name__}")
        missing = [k for k in cls.FIELDS if k not in codes]
        if missing:
            raise ValueError(f"{NAME}: codes lacks {missing}; it needs {cls.FIELDS}")
        return cls(**{k: codes[k] for k in cls.FIELDS})

    @property
    def batch_size(self) -> int:
        return int(self.shape.shape[0])

    def as_dict(self) -> Dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.FIELDS}

    def repeat_interleave(self, repeats: int) -> "FlameCodes":
        """Each head's codes repeated ``repeats`` times in a row."""
        return FlameCodes(**{k: v.repeat_interleave(repeats, dim=0) for k, v in self.as_dict().items()})


def clip_vertices(vertices: torch.Tensor, cam2world: torch.Tensor, intrinsics: torch.Tensor,
                  near: float = MASK_NEAR, far: float = MASK_FAR) -> torch.Tensor:
    """World points to the rasterizer's clip space for Portrait4D's OpenGL cameras.

    The projection is the one :func:`head4d.ops.generate_rays` inverts with
    ``convention="opengl"``: a camera-space point ``p`` (the camera looks along -z) lands
    at normalized image coordinates ``u = cx + (fx * p_x - sk * p_y) / (-p_z)``,
    ``v = cy - fy * p_y / (-p_z)`` (``v`` down the rows), i.e. NDC ``x = 2u - 1``,
    ``y = 1 - 2v`` (:mod:`head4d.ops.rasterize`: row 0 at the top). ``w = -p_z``; ``z`` is
    OpenGL's depth for the ``near`` / ``far`` planes (smaller is nearer).

    Args:
        vertices: ``[N, V, 3]`` floating, world space.
        cam2world: ``[N, 4, 4]`` camera-to-world (rotation columns right, up, backward).
        intrinsics: ``[N, 3, 3]`` normalized intrinsics.

    Returns:
        ``[N, V, 4]`` clip-space vertices in ``vertices.dtype``.
    """
    op = "clip_vertices"
    check_tensor(op, "vertices", vertices, "[N, V, 3]", 3, FLOATING)
    check_tensor(op, "cam2world", cam2world, "[N, 4, 4]", 3, FLOATING)
    check_tensor(op, "intrinsics", intrinsics, "[N, 3, 3]", 3, FLOATING)
    n = vertices.shape[0]
    if vertices.shape[2] != 3 or tuple(cam2world.shape) != (n, 4, 4) or tuple(intrinsics.shape) != (n, 3, 3):
        raise ValueError(f"{op}: expected vertices [N, V, 3], cam2world [N, 4, 4] and intrinsics [N, 3, 3] with one "
                         f"N, got {list(vertices.shape)}, {list(cam2world.shape)} and {list(intrinsics.shape)}")
    dtype = vertices.dtype
    cam2world, intrinsics = cam2world.to(dtype), intrinsics.to(dtype)
    rotation, centre = cam2world[:, :3, :3], cam2world[:, :3, 3]
    p = torch.einsum("nji,nvj->nvi", rotation, vertices - centre[:, None])  # R^T (x - c)
    depth = -p[..., 2]
    fx, fy = intrinsics[:, 0, 0, None], intrinsics[:, 1, 1, None]
    cx, cy, sk = intrinsics[:, 0, 2, None], intrinsics[:, 1, 2, None], intrinsics[:, 0, 1, None]
    x = (2 * cx - 1) * depth + 2 * (fx * p[..., 0] - sk * p[..., 1])
    y = (1 - 2 * cy) * depth + 2 * fy * p[..., 1]
    z = (far + near) / (far - near) * depth - 2 * far * near / (far - near)
    return torch.stack([x, y, z, depth], dim=-1)


def blend_parts(part: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor], eye: torch.Tensor,
                mouth: torch.Tensor, inside_eye_box: torch.Tensor, fuse_mouth: bool) -> Dict[str, torch.Tensor]:
    """Portrait4D's part/head blend at M sample points (module docstring, stage 6).

    Args:
        part, head: the decoder's outputs for the part and the head triplane: ``"sigma"``
            ``[N, M, 1]`` (raw density) and ``"rgb"`` ``[N, M, C]`` (features after the sigmoid).
        eye, mouth: ``[N, M]`` the eye and mouth masks of each point's ray, in [0, 1].
        inside_eye_box: ``[N, M]`` 1 where the point lies in an eye box, else 0.
        fuse_mouth: the rule above 64: where ``mouth > 0``, ``sigma = sigma_part + sigma_head``
            and the features mixed by ``softmax(sigma_part, sigma_head)``.

    Returns:
        ``{"sigma": [N, M, 1], "rgb": [N, M, C]}`` in the inputs' dtype.
    """
    w_eye = (eye * inside_eye_box).unsqueeze(-1)
    w_mouth = mouth.unsqueeze(-1)
    w_part = w_eye + w_mouth
    w_head = 1 - w_part
    part_sigma = part["sigma"] * (inside_eye_box.unsqueeze(-1) + w_mouth)
    sigma = part_sigma * w_part + head["sigma"] * w_head
    rgb = part["rgb"] * w_part + head["rgb"] * w_head
    if fuse_mouth:
        hard_mouth = w_mouth > 0
        # a softmax over two logits is the sigmoid of their difference
        mix_part = torch.sigmoid(part_sigma - head["sigma"])
        fused_rgb = head["rgb"] + mix_part * (part["rgb"] - head["rgb"])
        sigma = torch.where(hard_mouth, part_sigma + head["sigma"], sigma)
        rgb = torch.where(hard_mouth, fused_rgb, rgb)
    return {"sigma": sigma, "rgb": rgb}


class GenHead(TriplaneHeadModel):
    """Portrait4D's GenHead (``PartTriPlaneGeneratorDeform``) on head4d's kernels (see the
    module docstring for the computation).

    Modules (upstream names): ``backbone`` (:class:`~head4d.nn.Generator`: ``mapping`` with
    the 325-number condition, ``synthesis`` to the 192-channel planes), ``background``
    (:class:`~head4d.nn.Generator`, no condition), ``superresolution``
    (:class:`~head4d.nn.SuperresolutionHybrid8XDC`), ``decoder``
    (:class:`~head4d.render.TriplaneDecoder`, variant ``"portrait4d"``); head4d's own:
    ``deformation`` (:class:`~head4d.deform.PartwiseDeformation`, holding the head model),
    ``renderer`` (:class:`~head4d.render.TriplaneRenderer`). ``background`` and
    ``superresolution`` are None when the config turns them off.

    Args:
        config: :class:`GenHeadConfig` (None: the released defaults).
        head_model: a :class:`~head4d.head.HeadModel` (None: ``ProceduralHead()``;
            ``FLAME.from_file(...)`` for the real one). Its eyeball set makes the eye mask;
            the mouth mask uses its ``inner_mouth_indices`` when it has them, else its lips
            set (the built-in procedural head has no separate inner-mouth surface: its
            mouth is a pocket of the head mesh, and the lips mark the region); a head
            without lips renders without the mouth part (mouth mask 0).
    """

    NAME = NAME
    SAVE_FORMAT = SAVE_FORMAT
    SAVE_VERSION = SAVE_VERSION
    CONFIG_CLASS = GenHeadConfig

    def __init__(self, config: Optional[GenHeadConfig] = None, head_model: Optional[HeadModel] = None):
        super().__init__()
        config = self._own_config(config)
        if config.triplane_channels % 6 != 0:
            raise ValueError(f"{NAME}: config.triplane_channels must be a multiple of 6 (six planes), "
                             f"got {config.triplane_channels}")
        if head_model is None:
            from ..head import ProceduralHead
            head_model = ProceduralHead()
        if not isinstance(head_model, HeadModel):
            raise TypeError(f"{NAME}: head_model must be a head4d.head.HeadModel (FLAME or ProceduralHead), "
                            f"got {type(head_model).__name__}")
        self.config = config
        c = self.config
        self.c_dim = CAMERA_SIZE + SHAPE_SIZE
        self.backbone = Generator(c.z_dim, self.c_dim, c.w_dim, img_resolution=c.triplane_resolution,
                                  img_channels=c.triplane_channels, mapping_kwargs={"num_layers": c.mapping_layers},
                                  channel_base=c.channel_base, channel_max=c.channel_max,
                                  num_fp16_res=c.num_fp16_res, conv_clamp=c.conv_clamp,
                                  fused_modconv_default=c.fused_modconv_default)
        self.background = None
        if c.has_background:
            self.background = Generator(c.z_dim, 0, c.w_dim, img_resolution=c.background_resolution,
                                        img_channels=c.background_channels,
                                        mapping_kwargs={"num_layers": c.background_mapping_layers},
                                        channel_base=c.background_channel_base,
                                        channel_max=c.background_channel_max)
        self.superresolution = None
        if c.has_superresolution:
            self.superresolution = SuperresolutionHybrid8XDC(
                channels=c.plane_features, img_resolution=c.img_resolution, sr_num_fp16_res=c.sr_num_fp16_res,
                sr_antialias=c.sr_antialias, channel_base=c.channel_base, channel_max=c.channel_max,
                fused_modconv_default=c.fused_modconv_default, use_ws_ones=c.use_ws_ones)
        self.decoder = TriplaneDecoder(c.plane_features, c.decoder_hidden, c.plane_features, variant="portrait4d",
                                       lr_multiplier=c.decoder_lr_mul)
        self.has_mouth = bool(head_model.has_lips)
        self.deformation = PartwiseDeformation(head_model, box_side=c.box_warp, fine_resolution=c.fine_resolution,
                                               coarse_resolution=c.coarse_resolution, mouth=self.has_mouth)
        self.renderer = TriplaneRenderer(plane_layout="portrait4d")
        self.backend = c.backend

    # ------------------------------------------------------------------ settings
    @property
    def num_ws(self) -> int:
        return self.backbone.num_ws

    def extra_repr(self) -> str:
        return f"backend={self._ops_backend!r}, num_ws={self.num_ws}"

    # ------------------------------------------------------------------ stages
    def condition(self, camera: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        """The mapping's condition ``[N, 325]``: the camera label ``[N, 25]`` then the shape
        coefficients ``[N, 300]``, times ``c_scale``."""
        op = f"{NAME}.condition"
        check_rows(op, "camera", camera, CAMERA_SIZE)
        check_rows(op, "shape", shape, SHAPE_SIZE, camera.shape[0])
        return torch.cat([camera, shape.to(camera.dtype)], dim=1) * self.config.c_scale

    def mapping(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1,
                truncation_cutoff: Optional[int] = None, update_emas: bool = False) -> torch.Tensor:
        """ws ``[N, 14, w_dim]`` float32 from ``z [N, z_dim]`` and the condition ``c [N, 325]``
        (:meth:`condition`); upstream's ``G.mapping``."""
        with self._scope(), nvtx_range("head4d.genhead.mapping"):
            return self.backbone.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                                         update_emas=update_emas)

    def planes(self, ws: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        """The six planes ``[N, 6, C, H, W]`` float32 (part triplane 0-2, head triplane 3-5)
        from ws ``[N, 14, w_dim]``; ``noise_mode`` as the synthesis network's."""
        with self._scope(), nvtx_range("head4d.genhead.backbone"):
            planes = self.backbone.synthesis(ws, noise_mode=noise_mode)
            n, _, h, w = planes.shape
            return planes.view(n, 6, self.config.plane_features, h, w)

    def background_image(self, z_bg: torch.Tensor, noise_mode: str = "const") -> Optional[torch.Tensor]:
        """The background features ``[N, 32, B, B]`` in (0, 1) (sigmoid of the background
        generator, at its own resolution B), or None without a background."""
        if self.background is None:
            return None
        with self._scope(), nvtx_range("head4d.genhead.background"):
            return torch.sigmoid(self.background(z_bg, None, noise_mode=noise_mode))

    def masks(self, codes: Union[FlameCodes, Mapping[str, torch.Tensor]], camera: torch.Tensor,
              resolution: int) -> Dict[str, torch.Tensor]:
        """Portrait4D's eye and mouth masks ``[N, 1, r, r]`` float32 in [0, 1], r = ``resolution``:
        the posed head rasterized at ``mask_resolution`` with the image's camera, then resized
        (bilinear, antialiased). No gradient."""
        codes = FlameCodes.of(codes)
        head = self.head_model
        n = camera.shape[0]
        with self._scope(), nvtx_range("head4d.genhead.masks"), torch.no_grad():
            verts = head(**codes.as_dict())
            cam2world = camera[:, :16].reshape(n, 4, 4)
            intrinsics = camera[:, 16:25].reshape(n, 3, 3)
            clip = clip_vertices(verts, cam2world, intrinsics)
            size = self.config.mask_resolution
            if self.has_mouth:
                inner = getattr(head, "inner_mouth_indices", None)
                inner = head.lips_indices if inner is None else inner
            else:
                inner = head.eye_indices.new_zeros(0)
            eye, mouth = rasterize_masks(clip, head.faces, (size, size), head.eye_indices, inner,
                                         backend=self._ops_backend)
            if not self.has_mouth:
                mouth = torch.zeros_like(mouth)
            if size != resolution:
                eye = F.interpolate(eye, size=(resolution, resolution), mode="bilinear", align_corners=False,
                                    antialias=True)
                mouth = F.interpolate(mouth, size=(resolution, resolution), mode="bilinear", align_corners=False,
                                      antialias=True)
            return {"eye_mask": eye, "mouth_mask": mouth}

    def _point_field(self, part_planes, head_planes, fields, eye_rays, mouth_rays, deform: bool,
                     fuse_mouth: bool = False, head_samples: Optional[List[Dict[str, torch.Tensor]]] = None):
        """The renderer's point field: warp, read both triplanes, decode, blend (module docstring);
        ``fuse_mouth``: the rule above 64 inside the hard mouth mask (:func:`blend_parts`).
        ``head_samples``: a list that each call (coarse pass, then fine) appends its head
        densities in the part regions to (:meth:`_head_densities_in_parts`)."""
        decode = triplane_point_decoder(self.decoder, self.renderer, head_planes.device, self.config.fused,
                                        self.config.box_warp, self._ops_backend)

        def field(points: torch.Tensor, directions: torch.Tensor) -> Dict[str, torch.Tensor]:
            n, m, _ = points.shape
            per_ray = m // eye_rays.shape[1]
            with nvtx_range("head4d.genhead.field"):
                if deform:
                    warped = self.deformation.warp(points, fields)
                    head_points = warped.head
                    part_points = warped.part_points(mouth_rays if self.has_mouth else None)
                    inside = warped.inside_eye_box.to(points.dtype)
                else:
                    head_points = part_points = points
                    with torch.no_grad():
                        rel = (points.unsqueeze(2) - fields.eye_box_centre.unsqueeze(1)).abs()
                        inside = (rel < fields.eye_box_half.unsqueeze(1)).all(-1).any(-1).to(points.dtype)
                with nvtx_range("head4d.genhead.decode"):
                    head_out = decode(head_planes, head_points)
                    part_out = decode(part_planes, part_points)
                with nvtx_range("head4d.genhead.blend"):
                    eye = eye_rays.repeat_interleave(per_ray, dim=1).to(points.dtype)
                    mouth = mouth_rays.repeat_interleave(per_ray, dim=1).to(points.dtype)
                    if head_samples is not None:
                        head_samples.append(self._head_densities_in_parts(head_out["sigma"], inside, mouth,
                                                                          per_ray))
                    return blend_parts(part_out, head_out, eye, mouth, inside, fuse_mouth)

        return field

    @staticmethod
    def _head_densities_in_parts(head_sigma: torch.Tensor, inside_eye_box: torch.Tensor, mouth: torch.Tensor,
                                 per_ray: int) -> Dict[str, torch.Tensor]:
        """The head triplane's raw densities in the part regions, per ray and sample
        (Portrait4D's ``densities_face_ineye`` / ``_inmouth``): ``head_sigma [N, M, 1]`` times
        ``inside_eye_box [N, M]`` (0 or 1), and times ``mouth [N, M]`` (the ray's mouth mask),
        each reshaped to ``[N, M / per_ray, per_ray]``."""
        sigma = head_sigma[..., 0]
        n, m = sigma.shape
        return {"eye": (sigma * inside_eye_box).reshape(n, m // per_ray, per_ray),
                "mouth": (sigma * mouth).reshape(n, m // per_ray, per_ray)}

    def render(self, planes: torch.Tensor, camera: torch.Tensor, codes: Union[FlameCodes, Mapping[str, torch.Tensor]],
               *, ws: Optional[torch.Tensor] = None, background: Optional[torch.Tensor] = None,
               neural_rendering_resolution: Optional[int] = None, generator: Optional[torch.Generator] = None,
               deform: bool = True, return_samples: bool = False) -> Dict[str, torch.Tensor]:
        """Render given planes with new cameras and codes (no backbone).

        Args:
            planes: ``[B, 6, C, H, W]`` from :meth:`planes` (or ``[B, 6 * C, H, W]``).
            camera: ``[N, 25]`` camera labels (cam2world 16 + normalized intrinsics 9), N a
                multiple of B: row ``b * K + k`` is view k of identity b (K = N / B).
            codes: :class:`FlameCodes` (or a dict) with N or B rows.
            ws: ``[N or B, 14, w_dim]`` for the super-resolution (unused with
                ``use_ws_ones``, but its batch must fit); needed when it is on.
            background: ``[N or B, 32, Hb, Wb]`` from :meth:`background_image`, or None (no
                background: the features are composited over 0).
            neural_rendering_resolution: r (None: the config's), at most 128; above 64
                the mouth rays take the other blend (module docstring).
            generator: ``torch.Generator`` for the renderer's random numbers (depth jitter,
                importance sampling), or None (the global one).
            deform: False samples both triplanes at the observation-space points (no warp;
                the masks and the blend stay), to compare against.
            return_samples: also return what GenHead's training regularizers read (below);
                off by default, so that inference keeps nothing more.

        Returns:
            A dict: ``image`` ``[N, 3, 512, 512]`` (only with the super-resolution),
            ``image_raw`` ``[N, 3, r, r]``, ``image_depth`` ``[N, 1, r, r]``,
            ``image_feature`` ``[N, 32, r, r]`` (in [-1, 1] when the background is in [0, 1]),
            ``opacity`` ``[N, 1, r, r]``, ``eye_mask`` and ``mouth_mask`` ``[N, 1, r, r]``;
            float32. With ``return_samples``, also (R = r * r rays, row-major like the
            images; S = ``depth_resolution + depth_resolution_importance`` samples per ray),
            float32:

            - ``sample_depths`` ``[N, R, S]``: the final composite's sample depths (coarse and
              fine merged, sorted), the edges of its S - 1 intervals (no gradient);
            - ``sample_weights`` ``[N, R, S - 1]``: each interval's compositing weight
              (their sum over an image's ray is its ``opacity``); Portrait4D's
              ``interval`` and ``all_weights``, for :func:`~head4d.render.distortion_loss`;
            - ``head_density_eye`` ``[N, R, S]``: the head triplane's raw density (the
              decoder's output before the renderer's ``softplus(s - 1)``) at each sample's
              head-canonical point, times 1 inside an eye box and 0 outside; the
              coarse pass's samples first, then the fine pass's, in the order drawn (not
              sorted by depth); Portrait4D's ``densities_face_ineye``;
            - ``head_density_mouth`` ``[N, R, S]``: the same raw density times the ray's
              mouth mask (soft, in [0, 1]); Portrait4D's ``densities_face_inmouth``.

            The densities are read before the renderer's ``density_noise`` (0 in
            Portrait4D's configurations) is added.
        """
        op = f"{NAME}.render"
        c = self.config
        r = c.neural_resolution(op, neural_rendering_resolution)
        if not isinstance(return_samples, bool):
            raise TypeError(f"{op}: return_samples must be a bool, got {type(return_samples).__name__}")
        check_tensor(op, "planes", planes, f"[B, 6, {c.plane_features}, H, W]", planes.dim()
                     if isinstance(planes, torch.Tensor) and planes.dim() in (4, 5) else 5, FLOATING)
        if planes.dim() == 4 and planes.shape[1] == 6 * c.plane_features:
            planes = planes.view(planes.shape[0], 6, c.plane_features, *planes.shape[2:])
        if planes.dim() != 5 or planes.shape[1] != 6 or planes.shape[2] != c.plane_features:
            raise ValueError(f"{op}: planes must have shape [B, 6, {c.plane_features}, H, W], got {list(planes.shape)}")
        check_rows(op, "camera", camera, CAMERA_SIZE)
        n = camera.shape[0]
        codes = FlameCodes.of(codes)
        for name, value in codes.as_dict().items():
            check_tensor(op, f"codes.{name}", value, "[N, *]", 2, FLOATING)
        codes = FlameCodes(**{k: repeat_rows(op, f"codes.{k}", v, n) for k, v in codes.as_dict().items()})
        planes = repeat_rows(op, "planes", planes, n)
        ws = repeat_rows(op, "ws", ws, n)
        background = repeat_rows(op, "background", background, n)
        if self.superresolution is not None and ws is None:
            raise ValueError(f"{op}: ws [N, {self.num_ws}, {c.w_dim}] is needed for the super-resolution")
        head_dtype = self.head_model.dtype
        codes = FlameCodes(**{k: v.to(head_dtype) for k, v in codes.as_dict().items()})

        with self._scope(), nvtx_range("head4d.genhead.render"):
            with nvtx_range("head4d.genhead.deformation"):
                fields = self.deformation.build(**codes.as_dict())
            masks = self.masks(codes, camera, r)
            eye_rays = masks["eye_mask"].reshape(n, r * r)
            mouth_rays = masks["mouth_mask"].reshape(n, r * r)
            with nvtx_range("head4d.genhead.rays"):
                cam2world, origins, directions = camera_rays(camera, r)
            bg = None
            if background is not None:
                bg = F.interpolate(background.to(torch.float32), size=(r, r), mode="bilinear", align_corners=False,
                                   antialias=False)
                bg = bg.permute(0, 2, 3, 1).reshape(n, r * r, bg.shape[1])
            head_samples = [] if return_samples else None
            field = self._point_field(planes[:, PART_PLANES], planes[:, HEAD_PLANES], fields, eye_rays, mouth_rays,
                                      deform, fuse_mouth=r > MOUTH_FUSE_ABOVE, head_samples=head_samples)
            with nvtx_range("head4d.genhead.raymarch"):
                rendered = self.renderer(field, None, origins, directions, c.rendering_options(), background=bg,
                                         generator=generator, cam2world=cam2world, return_samples=return_samples)
                features, depth, opacity = rendered[:3]
            feature_image = rays_to_image(features, r)
            out = {"image_raw": feature_image[:, :3], "image_depth": rays_to_image(depth, r),
                   "image_feature": feature_image, "opacity": rays_to_image(opacity, r),
                   "eye_mask": masks["eye_mask"], "mouth_mask": masks["mouth_mask"]}
            if return_samples:
                samples = rendered[3]
                out["sample_depths"] = samples["depths"][..., 0].to(torch.float32)
                out["sample_weights"] = samples["weights"][..., 0].to(torch.float32)
                for part in ("eye", "mouth"):
                    out[f"head_density_{part}"] = torch.cat([h[part] for h in head_samples], dim=2).to(torch.float32)
            if self.superresolution is not None:
                with nvtx_range("head4d.genhead.superresolution"):
                    out["image"] = self.superresolution(out["image_raw"], feature_image, ws, noise_mode="none")
            return out

    def render_graphed(self, planes: torch.Tensor, camera: torch.Tensor,
                       codes: Union[FlameCodes, Mapping[str, torch.Tensor]], *, ws: Optional[torch.Tensor] = None,
                       background: Optional[torch.Tensor] = None,
                       neural_rendering_resolution: Optional[int] = None) -> "GraphedRender":
        """:meth:`render` captured once in a CUDA graph for these shapes (opt-in, inference
        only): returns a :class:`GraphedRender`, which renders new cameras and codes (and
        planes, ws, background of the same shapes) by replaying the graph. The arguments
        are :meth:`render`'s, on one CUDA device; they serve as the capture's example."""
        return GraphedRender(self, planes, camera, codes, ws=ws, background=background,
                             neural_rendering_resolution=neural_rendering_resolution)

    def forward(self, z: torch.Tensor, c: torch.Tensor, codes: Union[FlameCodes, Mapping[str, torch.Tensor]], *,
                neural_rendering_resolution: Optional[int] = None, truncation_psi: float = 1,
                truncation_cutoff: Optional[int] = None, noise_mode: str = "const",
                z_bg: Optional[torch.Tensor] = None, c_render: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """The whole generator (module docstring).

        Args:
            z: ``[N, z_dim]`` latent codes.
            c: ``[N, 25]`` camera labels (cam2world 16 + normalized intrinsics 9): the
                condition (with ``codes.shape``) and, unless ``c_render`` is given, the camera.
            codes: :class:`FlameCodes` (or a dict) with N rows.
            neural_rendering_resolution: r (None: the config's, 64), at most 128.
            truncation_psi, truncation_cutoff: the backbone mapping's truncation.
            noise_mode: the backbone's and the background's noise (``'const'``,
                ``'random'``, ``'none'``); the super-resolution uses none.
            z_bg: the background latent (None: ``z``, as Portrait4D).
            c_render: ``[N, 25]`` the rendering camera, when it differs from the condition's.
            generator: for the renderer's random numbers.

        Returns:
            :meth:`render`'s dict, plus ``ws`` ``[N, 14, w_dim]``.
        """
        op = NAME
        codes = FlameCodes.of(codes)
        check_rows(op, "c", c, CAMERA_SIZE)
        with self._scope(), nvtx_range("head4d.genhead"):
            ws = self.mapping(z, self.condition(c, codes.shape), truncation_psi=truncation_psi,
                              truncation_cutoff=truncation_cutoff)
            planes = self.planes(ws, noise_mode=noise_mode)
            background = self.background_image(z if z_bg is None else z_bg, noise_mode=noise_mode)
            out = self.render(planes, c if c_render is None else c_render, codes, ws=ws, background=background,
                              neural_rendering_resolution=neural_rendering_resolution, generator=generator)
            out["ws"] = ws
            return out


class GraphedRender:
    """:meth:`GenHead.render` captured in a CUDA graph: the render-only path (planes cached;
    new camera and codes) replayed without Python or launch overhead. Opt-in, inference
    only (no gradient); build it with :meth:`GenHead.render_graphed`.

    ``graphed(camera, codes, *, planes=None, ws=None, background=None)`` copies the given
    tensors into the captured inputs (same shapes as at capture; ``None`` keeps the
    previous values) and replays. It returns the captured output dict: the same tensors
    on every call, overwritten by the next replay (clone what you keep).

    What the capture needs, and what this path does for it:

    - No host syncs: the value checks of the rasterizer's faces, the mask index sets and
      the deformation ops' index tables run as device asserts while a graph is captured
      (:func:`head4d.ops._common.values_off_host`); everything else checks only shapes.
    - No host-to-device copies: the masks' blur kernel is made on the device.
    - No data-dependent shapes: the rasterizer counts its large-face list on the device
      and loops over it in a grid-stride kernel; importance sampling draws a fixed count.
    - Random numbers (depth jitter, importance sampling) come from the global CUDA
      generator, which graphs support: each replay draws fresh numbers, as eager calls
      do, and ``torch.cuda.manual_seed`` before a replay reproduces an eager call seeded
      alike. A ``torch.Generator`` argument is not supported.

    Fixed at capture: the shapes and dtypes, the neural rendering resolution, the ops'
    backends (the model's ``backend`` and the environment then), and the weights' storage:
    updating parameters in place is seen by later replays, replacing them is not.

    Args:
        model: the :class:`GenHead` (its parameters and buffers on the inputs' CUDA device).
        planes, camera, codes, ws, background, neural_rendering_resolution: as for
            :meth:`GenHead.render`; copied into the graph's static inputs.
        warmup: eager calls on a side stream before the capture (lazy initialization,
            allocator warm-up), at least 1.
    """

    def __init__(self, model: GenHead, planes: torch.Tensor, camera: torch.Tensor,
                 codes: Union[FlameCodes, Mapping[str, torch.Tensor]], *, ws: Optional[torch.Tensor] = None,
                 background: Optional[torch.Tensor] = None, neural_rendering_resolution: Optional[int] = None,
                 warmup: int = 2):
        op = "GraphedRender"
        if not isinstance(model, GenHead):
            raise TypeError(f"{op}: model must be a GenHead, got {type(model).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"{op}: warmup must be an int >= 1, got {warmup!r}")
        check_tensor(op, "camera", camera, f"[N, {CAMERA_SIZE}]", 2, FLOATING)
        if not camera.is_cuda:
            raise ValueError(f"{op}: a CUDA graph needs CUDA tensors; camera is on {camera.device}")
        self.model = model
        self.resolution = neural_rendering_resolution
        self.inputs: Dict[str, Optional[torch.Tensor]] = {
            "planes": planes.detach().clone(), "camera": camera.detach().clone(),
            "ws": None if ws is None else ws.detach().clone(),
            "background": None if background is None else background.detach().clone()}
        self.codes = {k: v.detach().clone() for k, v in FlameCodes.of(codes).as_dict().items()}
        side = torch.cuda.Stream(camera.device)
        side.wait_stream(torch.cuda.current_stream(camera.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                self._render()
        torch.cuda.current_stream(camera.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.outputs = self._render()

    def _render(self) -> Dict[str, torch.Tensor]:
        x = self.inputs
        return self.model.render(x["planes"], x["camera"], self.codes, ws=x["ws"], background=x["background"],
                                 neural_rendering_resolution=self.resolution)

    @staticmethod
    def _copy(name: str, static: Optional[torch.Tensor], value) -> None:
        if value is None:
            return
        if static is None:
            raise ValueError(f"GraphedRender: {name} was None at capture; capture again with a {name} to pass one")
        if not isinstance(value, torch.Tensor) or value.shape != static.shape:
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"GraphedRender: {name} must have the captured shape {list(static.shape)}, got {got}")
        static.copy_(value)

    def __call__(self, camera: torch.Tensor, codes: Union[FlameCodes, Mapping[str, torch.Tensor]], *,
                 planes: Optional[torch.Tensor] = None, ws: Optional[torch.Tensor] = None,
                 background: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Replays the render for new inputs; returns the captured outputs (see the class)."""
        self._copy("camera", self.inputs["camera"], camera)
        for key, value in FlameCodes.of(codes).as_dict().items():
            self._copy(f"codes.{key}", self.codes[key], value)
        for name, value in (("planes", planes), ("ws", ws), ("background", background)):
            self._copy(name, self.inputs[name], value)
        self.graph.replay()
        return self.outputs
