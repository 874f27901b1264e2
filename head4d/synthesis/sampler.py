"""Portrait4D's online training triplets from a frozen GenHead (:class:`TripletSampler`).

What one sample holds (Portrait4D's data synthesis for its reconstructor, restated):

* one latent ``z`` and one shape code for all three views, so one identity: view 0 the
  source, view 1 the driver, view 2 the target (the driver's motion, seen by another
  camera);
* the mapping's condition is the source's dataset camera with the shape (with no dataset
  cameras: the frontal camera of :func:`~head4d.synthesis.cameras.frontal_condition_camera`),
  the truncation ``truncation_psi`` (0.95) on every ws; the super-resolution gets the
  average w (truncation 0), as Portrait4D renders its synthesis;
* dynamic samples (the first ``N - floor(N * static_fraction)`` rows): two frames of one
  motion clip (:mod:`head4d.synthesis.motions`), the source in frame 0, the driver and the
  target in frame 1; each frame's jaw x-rotation replaced by ``U(0, jaw_perturb_max)`` with
  probability ``jaw_perturb_prob``; motion scale 1;
* static samples (the last ``floor(N * static_fraction)`` rows, Portrait4D's disentangled
  learning): one motion frame for all three views, no jaw perturbation, motion scale 0;
* the neck pose always 0;
* each view's camera, independently: with probability 1/2 a random row of
  ``dataset_cameras`` (when given), else Portrait4D's random look-at camera
  (:func:`~head4d.synthesis.cameras.sample_look_at_cameras`; with dataset cameras its
  intrinsics are those of the dataset row drawn for that view, as Portrait4D keeps the
  dataset's intrinsics);
* the triplane-feature targets: Portrait4D samples the target view's coarse points (the
  stratified 'auto-plane' depths of its rays), drops the points on rays inside the mouth
  mask and the points inside an eye box on rays inside the eye mask (the masks are soft:
  any value above 0 drops), and keeps K = 4,000 of the rest at random; a target is the
  point (observation space, the reconstructor's loss warps it with the target's codes) and
  the mean over the three head planes of GenHead's triplane features at the point's
  head-canonical position. head4d draws these coarse points afresh with the same
  distribution (the render's own samples stay inside the renderer); when fewer than K
  points qualify they are drawn with replacement.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..models._common import camera_rays
from ..models.genhead import HEAD_PLANES, FlameCodes, GenHead
from ..ops import auto_plane_limits, sample_triplanes, stratified_depths
from . import cameras as cams
from .motions import EXPRESSION, EYES, JAW, MotionSource, perturb_jaw

NAME = "TripletSampler"
#: The three views of a triplet, in order.
VIEWS = ("source", "driver", "target")
#: Triplane-feature target points per sample (Portrait4D's count).
TRIPLANE_POINTS = 4000


@dataclass
class TripletBatch:
    """N triplets (float32 tensors on the GenHead's device unless said otherwise; V = 3
    views in :data:`VIEWS` order, r the neural rendering resolution).

    Images: ``image`` ``[N, V, 3, H, W]`` (super-resolved, in [-1, 1]; None without a
    super-resolution), ``image_raw`` ``[N, V, 3, r, r]``, ``image_feature``
    ``[N, V, 32, r, r]`` (the rendered feature map), ``image_depth`` ``[N, V, 1, r, r]``,
    ``opacity`` ``[N, V, 1, r, r]`` (the foreground segmentation), ``eye_mask`` and
    ``mouth_mask`` ``[N, V, 1, r, r]``, ``background`` ``[N, 32, B, B]`` (GenHead's
    background features, one per identity, in (0, 1); None without a background).

    Labels: ``z`` ``[N, z_dim]``, ``shape`` ``[N, 300]`` (one per identity);
    ``expression`` ``[N, V, 100]``, ``jaw_pose`` ``[N, V, 3]``, ``eye_pose`` ``[N, V, 6]``,
    ``neck_pose`` ``[N, V, 3]`` (zero); ``motions`` ``[N, V, 109]`` (expression, jaw, eyes);
    ``cameras`` ``[N, V, 25]`` (each view's rendering camera); ``condition_camera``
    ``[N, 25]`` (the mapping's camera); ``motion_scale`` ``[N]`` (1 dynamic, 0 static);
    ``from_dataset`` ``[N, V]`` bool (the view's camera is a dataset row); ``jaw_perturbed``
    ``[N, 2]`` bool (frame 0 / frame 1 jaw replaced; False for static rows).

    Triplane targets of the target view: ``triplane_points`` ``[N, K, 3]`` (observation
    space), ``triplane_features`` ``[N, K, C]`` (mean of the three head planes at the
    head-canonical points). ``planes`` ``[N, 6, C, R, R]`` only when asked for.
    """

    image: Optional[torch.Tensor]
    image_raw: torch.Tensor
    image_feature: torch.Tensor
    image_depth: torch.Tensor
    opacity: torch.Tensor
    eye_mask: torch.Tensor
    mouth_mask: torch.Tensor
    background: Optional[torch.Tensor]
    z: torch.Tensor
    shape: torch.Tensor
    expression: torch.Tensor
    jaw_pose: torch.Tensor
    eye_pose: torch.Tensor
    neck_pose: torch.Tensor
    motions: torch.Tensor
    cameras: torch.Tensor
    condition_camera: torch.Tensor
    motion_scale: torch.Tensor
    from_dataset: torch.Tensor
    jaw_perturbed: torch.Tensor
    triplane_points: torch.Tensor
    triplane_features: torch.Tensor
    planes: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.z.shape[0])

    def codes(self, view: int) -> FlameCodes:
        """The :class:`~head4d.models.FlameCodes` of view ``view`` (0, 1 or 2), N rows."""
        if view not in (0, 1, 2):
            raise ValueError(f"TripletBatch.codes: view must be 0 (source), 1 (driver) or 2 (target), got {view!r}")
        return FlameCodes(shape=self.shape, expression=self.expression[:, view], neck_pose=self.neck_pose[:, view],
                          jaw_pose=self.jaw_pose[:, view], eye_pose=self.eye_pose[:, view])

    def tensors(self) -> Dict[str, torch.Tensor]:
        """Every field that is not None, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


def _check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{NAME}: {name} must be a number in [0, 1], got {value!r}")
    return float(value)


class TripletSampler:
    """Portrait4D's (source, driver, target) training triplets from a frozen GenHead,
    batched on its device (module docstring for what is drawn).

    Args:
        genhead: a :class:`~head4d.models.GenHead`, set to eval mode with its gradients off
            (it is frozen; nothing here trains it).
        truncation_psi: the mapping's truncation (Portrait4D: 0.95).
        static_fraction: the share of each batch that is static (the last rows; 0.5).
        jaw_perturb_prob, jaw_perturb_max: the jaw perturbation (0.5, 0.2 radians).
        dataset_cameras: ``[M, 25]`` camera labels to draw half the views from and the
            mapping's condition camera, or None (all views look-at; frontal condition).
        motions: ``[C, T, 109]`` motion clips, or None for head4d's random motion model
            (:mod:`head4d.synthesis.motions`).
        shapes: ``[S, 300]`` shape codes to draw from, or None: ``N(0, shape_std^2)``.
        shape_std: see ``shapes`` (0.5, head4d's choice).
        focal: normalized focal of the look-at cameras without dataset cameras.
        triplane_points: K, target points per sample (4,000).
        generator: a ``torch.Generator`` for every random number (labels on its device,
            then moved; the renderer's too), or None for the global generators.
    """

    def __init__(self, genhead: GenHead, *, truncation_psi: float = 0.95, static_fraction: float = 0.5,
                 jaw_perturb_prob: float = 0.5, jaw_perturb_max: float = 0.2,
                 dataset_cameras: Optional[torch.Tensor] = None, motions: Optional[torch.Tensor] = None,
                 shapes: Optional[torch.Tensor] = None, shape_std: float = 0.5, focal: float = cams.FOCAL,
                 triplane_points: int = TRIPLANE_POINTS, generator: Optional[torch.Generator] = None):
        if not isinstance(genhead, GenHead):
            raise TypeError(f"{NAME}: genhead must be a head4d.models.GenHead, got {type(genhead).__name__}")
        if isinstance(truncation_psi, bool) or not isinstance(truncation_psi, (int, float)):
            raise TypeError(f"{NAME}: truncation_psi must be a number, got {truncation_psi!r}")
        self.static_fraction = _check_probability("static_fraction", static_fraction)
        self.jaw_perturb_prob = _check_probability("jaw_perturb_prob", jaw_perturb_prob)
        if isinstance(jaw_perturb_max, bool) or not isinstance(jaw_perturb_max, (int, float)) or jaw_perturb_max < 0:
            raise ValueError(f"{NAME}: jaw_perturb_max must be a number >= 0, got {jaw_perturb_max!r}")
        for name, value in (("shape_std", shape_std), ("focal", focal)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (name == "focal" and value == 0):
                raise ValueError(f"{NAME}: {name} must be a finite number {'> 0' if name == 'focal' else '>= 0'}, "
                                 f"got {value!r}")
        if isinstance(triplane_points, bool) or not isinstance(triplane_points, int) or triplane_points < 1:
            raise ValueError(f"{NAME}: triplane_points must be a positive int, got {triplane_points!r}")
        if dataset_cameras is not None:
            if not isinstance(dataset_cameras, torch.Tensor) or not dataset_cameras.is_floating_point() \
                    or dataset_cameras.dim() != 2 or dataset_cameras.shape[1] != cams.CAMERA_SIZE \
                    or dataset_cameras.shape[0] < 1:
                raise ValueError(f"{NAME}: dataset_cameras must be a floating tensor [M, 25] with M >= 1 "
                                 f"(cam2world 16 + normalized intrinsics 9), got "
                                 f"{list(getattr(dataset_cameras, 'shape', [])) or type(dataset_cameras).__name__}")
            dataset_cameras = dataset_cameras.to(torch.float32)
        if shapes is not None:
            if not isinstance(shapes, torch.Tensor) or not shapes.is_floating_point() or shapes.dim() != 2 \
                    or shapes.shape[1] != 300 or shapes.shape[0] < 1:
                raise ValueError(f"{NAME}: shapes must be a floating tensor [S, 300] with S >= 1, got "
                                 f"{list(getattr(shapes, 'shape', [])) or type(shapes).__name__}")
            shapes = shapes.to(torch.float32)
        self.genhead = genhead.eval().requires_grad_(False)
        self.truncation_psi = float(truncation_psi)
        self.jaw_perturb_max = float(jaw_perturb_max)
        self.dataset_cameras = dataset_cameras
        self.motion_source = MotionSource(motions)
        self.shapes = shapes
        self.shape_std = float(shape_std)
        self.focal = float(focal)
        self.triplane_points = triplane_points
        self.generator = generator

    # ------------------------------------------------------------------ labels
    @property
    def device(self) -> torch.device:
        return next(self.genhead.parameters()).device

    def _draw_device(self) -> torch.device:
        return self.generator.device if self.generator is not None else torch.device("cpu")

    def _rand(self, *shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self._draw_device())

    def _randint(self, high: int, *shape) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=self.generator, device=self._draw_device())

    def num_static(self, batch: int) -> int:
        """How many of ``batch`` rows are static: ``floor(batch * static_fraction)``."""
        return int(math.floor(batch * self.static_fraction + 1e-9))

    def draw_motions(self, batch: int) -> Dict[str, torch.Tensor]:
        """``{"motions": [N, 3, 109], "motion_scale": [N], "jaw_perturbed": [N, 2]}`` on the
        draw device (the generator's; the CPU without one)."""
        n_static = self.num_static(batch)
        n_dynamic = batch - n_static
        frames = self.motion_source.dynamic(n_dynamic, self.generator)
        frames, perturbed = perturb_jaw(frames, self.jaw_perturb_prob, self.jaw_perturb_max, self.generator)
        dynamic = torch.cat([frames, frames[:, 1:]], dim=1)
        static = self.motion_source.static(n_static, self.generator).unsqueeze(1).expand(-1, 3, -1)
        motions = torch.cat([dynamic, static], dim=0)
        scale = torch.cat([torch.ones(n_dynamic), torch.zeros(n_static)]).to(motions.device)
        jaw_perturbed = torch.cat([perturbed, torch.zeros(n_static, 2, dtype=torch.bool, device=motions.device)])
        return {"motions": motions, "motion_scale": scale, "jaw_perturbed": jaw_perturbed}

    def draw_cameras(self, batch: int) -> Dict[str, torch.Tensor]:
        """``{"cameras": [N, 3, 25], "condition_camera": [N, 25], "from_dataset": [N, 3]}``
        on the draw device."""
        device = self._draw_device()
        look_at = cams.sample_look_at_cameras(batch * 3, generator=self.generator, device=device,
                                              focal=self.focal)
        if self.dataset_cameras is None:
            condition = cams.frontal_condition_camera(batch, self.focal, device)
            return {"cameras": look_at.view(batch, 3, -1), "condition_camera": condition,
                    "from_dataset": torch.zeros(batch, 3, dtype=torch.bool, device=device)}
        table = self.dataset_cameras.to(device)
        rows = table[self._randint(table.shape[0], batch * 3)]
        look_at = torch.cat([look_at[:, :16], rows[:, 16:]], dim=1)
        from_dataset = self._rand(batch * 3) < 0.5
        chosen = torch.where(from_dataset.unsqueeze(1), rows, look_at)
        return {"cameras": chosen.view(batch, 3, -1), "condition_camera": rows.view(batch, 3, -1)[:, 0],
                "from_dataset": from_dataset.view(batch, 3)}

    def draw_shapes(self, batch: int) -> torch.Tensor:
        """``[N, 300]`` on the draw device."""
        if self.shapes is not None:
            table = self.shapes.to(self._draw_device())
            return table[self._randint(table.shape[0], batch)]
        return self.shape_std * torch.randn(batch, 300, generator=self.generator, device=self._draw_device())

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, batch: int, *, return_planes: bool = False) -> TripletBatch:
        """``batch`` triplets as a :class:`TripletBatch` (no gradient)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"{NAME}.sample: batch must be a positive int, got {batch!r}")
        G, device = self.genhead, self.device
        z = torch.randn(batch, G.config.z_dim, generator=self.generator, device=self._draw_device()).to(device)
        shape = self.draw_shapes(batch).to(device)
        motion = {k: v.to(device) for k, v in self.draw_motions(batch).items()}
        camera = {k: v.to(device) for k, v in self.draw_cameras(batch).items()}
        motions = motion["motions"]
        neck = torch.zeros(batch, 3, 3, device=device)

        condition = G.condition(camera["condition_camera"], shape)
        ws = G.mapping(z, condition, truncation_psi=self.truncation_psi)
        ws_average = G.mapping(z, condition, truncation_psi=0)
        planes = G.planes(ws)
        background = G.background_image(z)
        codes = FlameCodes(shape=shape.repeat_interleave(3, dim=0),
                           expression=motions[..., EXPRESSION].reshape(-1, 100), neck_pose=neck.reshape(-1, 3),
                           jaw_pose=motions[..., JAW].reshape(-1, 3), eye_pose=motions[..., EYES].reshape(-1, 6))
        flat_cameras = camera["cameras"].reshape(batch * 3, -1)
        out = G.render(planes, flat_cameras, codes, ws=ws_average, background=background, generator=self.generator)

        def per_view(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if x is None else x.view(batch, 3, *x.shape[1:])

        target = slice(2, None, 3)
        target_codes = FlameCodes(**{k: v[target] for k, v in codes.as_dict().items()})
        points, features = self.triplane_targets(planes, flat_cameras[target], target_codes,
                                                 out["eye_mask"][target], out["mouth_mask"][target])
        return TripletBatch(
            image=per_view(out.get("image")), image_raw=per_view(out["image_raw"]),
            image_feature=per_view(out["image_feature"]), image_depth=per_view(out["image_depth"]),
            opacity=per_view(out["opacity"]), eye_mask=per_view(out["eye_mask"]),
            mouth_mask=per_view(out["mouth_mask"]), background=background, z=z, shape=shape,
            expression=motions[..., EXPRESSION].contiguous(), jaw_pose=motions[..., JAW].contiguous(),
            eye_pose=motions[..., EYES].contiguous(), neck_pose=neck, motions=motions, cameras=camera["cameras"],
            condition_camera=camera["condition_camera"], motion_scale=motion["motion_scale"],
            from_dataset=camera["from_dataset"], jaw_perturbed=motion["jaw_perturbed"], triplane_points=points,
            triplane_features=features, planes=planes if return_planes else None)

    def triplane_targets(self, planes: torch.Tensor, camera: torch.Tensor, codes: FlameCodes,
                         eye_mask: torch.Tensor, mouth_mask: torch.Tensor):
        """``(points [N, K, 3], features [N, K, C])`` of one view per identity (module
        docstring): ``planes [N, 6, C, R, R]``, ``camera [N, 25]``, ``codes`` N rows, the
        view's rendered ``eye_mask`` and ``mouth_mask`` ``[N, 1, r, r]``."""
        G = self.genhead
        cfg = G.config
        n, r = camera.shape[0], eye_mask.shape[-1]
        cam2world, origins, directions = camera_rays(camera, r)
        start, end = auto_plane_limits(cam2world, cfg.box_warp)
        depths = stratified_depths(start, end, cfg.depth_resolution, r * r, jitter="per_image",
                                   generator=self.generator)
        points = (origins.unsqueeze(2) + depths * directions.unsqueeze(2)).reshape(n, -1, 3)
        head_dtype = G.head_model.dtype
        fields = G.deformation.build(**{k: v.to(head_dtype) for k, v in codes.as_dict().items()})
        warped = G.deformation.warp(points.to(head_dtype), fields)
        per_point = cfg.depth_resolution
        eye = eye_mask.reshape(n, r * r).repeat_interleave(per_point, dim=1)
        mouth = mouth_mask.reshape(n, r * r).repeat_interleave(per_point, dim=1)
        kept = (eye * warped.inside_eye_box.to(eye.dtype) + mouth) == 0
        k = self.triplane_points
        chosen = []
        for row in range(n):
            weights = kept[row].to(torch.float32)
            count = int(weights.sum().item())
            if count == 0:
                raise RuntimeError(f"{NAME}: no coarse point of sample {row}'s target view lies outside the eye "
                                   f"and mouth regions; cannot draw its triplane-feature targets")
            draw_on = self._draw_device()
            chosen.append(torch.multinomial(weights.to(draw_on), k, replacement=count < k,
                                            generator=self.generator).to(points.device))
        index = torch.stack(chosen)
        picked_points = torch.gather(points, 1, index.unsqueeze(-1).expand(-1, -1, 3))
        head_points = torch.gather(warped.head, 1, index.unsqueeze(-1).expand(-1, -1, 3)).to(torch.float32)
        features = sample_triplanes(planes[:, HEAD_PLANES], head_points, box_warp=cfg.box_warp,
                                    plane_layout="portrait4d", reduce="mean", backend=G.backend)
        return picked_points, features
