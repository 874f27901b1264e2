"""``PartwiseDeformation``: Portrait4D's observation-to-canonical warp of sample points.

What it computes (``docs/design.md``, "The deformation of sample points"; Portrait4D
appendix B.1), for an image with FLAME-style codes
``(shape, expression, neck_pose, jaw_pose, eye_pose)`` and a sample point x:

**Stage 1, the neck** (GNARF's surface field on voxel grids). On the head model's simplified
companion mesh (``companion_vertices`` / ``companion_faces``), with target mesh = the
current mesh and canonical mesh = the same codes with the neck pose set to 0:

* a fine grid: :func:`~head4d.ops.surface_field_grid` at 24^3 over the cell centres of the
  1.3 box (``bound = cell_centre_bound(24) = PORTRAIT4D_FINE_BOUND``): offsets
  ``x_canon - x`` (3 channels) and squared distances to the target mesh (1 channel);
* a coarse grid: its own :func:`~head4d.ops.surface_field_grid` at 8^3 over the cell
  centres of the same box (``bound = cell_centre_bound(8) = PORTRAIT4D_COARSE_BOUND``;
  Portrait4D evaluates the surface field a second time at resolution 8, it does not
  downsample the fine grid), then :func:`~head4d.ops.smooth_grid3d` with two passes of
  the 3x3x3 box filter (replicate padding);
* per point: :func:`~head4d.ops.sample_grid3d` (trilinear, ``align_corners=True``, zero
  padding, each grid at its own bound, so corner cell centres map to +-1) of the fine
  offsets ``f``, the fine squared distance ``d2`` and the smoothed coarse offsets ``s``;
  ``w = exp(-1000 * relu(d2 - 3e-3))``, ``x1 = x + w * f + (1 - w) * s``.

**Stage 2, face, eyes and mouth** (:func:`~head4d.ops.one_ring_deform` on x1, each part
with its own nearest-vertex set; canonical mesh = the head model's canonical mesh: zero
shape and expression, jaw 0.3, the rest 0):

* head (Portrait4D's ``canonical_face``): target = the model at ``(shape, expression,
  neck 0, jaw, eyes)``, nearest vertex among ``face_indices`` (every non-eyeball vertex);
* eyes (``canonical_eye``): the same target, nearest vertex among ``eye_indices``;
* mouth (``canonical_mouth``): target = the model at ``(shape, expression 0, neck 0, jaw,
  eyes 0)`` (the teeth follow the jaw only), nearest vertex among ``lips``;
* eye boxes (``inside_bbox_eye``): per eyeball, the axis-aligned box of its stage-2 target
  vertices scaled 1.2x about its centre; x1 is inside when strictly inside either box.

How a renderer uses the results (design note, "Part rendering"): the head triplane is
sampled at ``WarpedPoints.head``; the part triplane (eyes and mouth share it) at the eye
points, or the mouth points on rays where the 2D mouth mask is > 0
(:meth:`WarpedPoints.part_points`); the part triplane's raw density is multiplied by
``inside_eye_box + mouth_mask``.

Differences from the released code, on purpose: Portrait4D runs the whole warp without
autograd and detaches x1; here every step is differentiable w.r.t. the points (and,
through :meth:`PartwiseDeformation.build`, the codes), which density regularization can
use; wrap calls in ``torch.no_grad()`` to match Portrait4D's cost. Portrait4D pads its
one-ring table with a far point at 1e3 (weight about 1e-6 relative); the head models'
tables are padded with -1, which :func:`~head4d.ops.one_ring_deform` skips.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .._checks import FLOATING, check_bool, check_choice, check_dim, check_int, check_positive_finite, check_tensor
from .._nvtx import nvtx_range
from ..head.base import HeadModel
from ..ops.deformation import (PORTRAIT4D_BOX_SIDE, cell_centre_bound, one_ring_deform, sample_grid3d,
                               smooth_grid3d, surface_field_grid)

NAME = "PartwiseDeformation"

#: Portrait4D's neck grids: 24^3 surface field, 8^3 smoothed surface field.
FINE_RESOLUTION = 24
COARSE_RESOLUTION = 8
#: Box-filter passes over the coarse grid.
SMOOTH_PASSES = 2
#: Blend ``w = exp(-BLEND_SHARPNESS * relu(d2 - BLEND_THRESHOLD))`` (d2 the squared distance).
BLEND_SHARPNESS = 1000.0
BLEND_THRESHOLD = 3e-3
#: Each eye box is its eyeball's bounding box scaled by this about its centre.
EYE_BOX_SCALE = 1.2
#: Where an eye box is centred: "mean" (the eyeball vertices' mean, as the released code)
#: or "box" (the bounding box's midpoint).
EYE_BOX_CENTRES = ("mean", "box")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


@dataclass
class DeformationFields:
    """Per-image tensors of :class:`PartwiseDeformation` (from :meth:`~PartwiseDeformation.build`).

    Built once per image and read by every :meth:`~PartwiseDeformation.warp` of that image
    (the coarse and the fine pass). N images, V head-model vertices, R = fine resolution
    (24), r = coarse resolution (8); floating tensors in the head model's dtype, on its
    device. Grids are laid out as :func:`~head4d.ops.surface_field_grid` writes them
    (x along W, y along H, z along D).

    Attributes:
        fine: ``[N, 4, R, R, R]`` the fine neck grid: channels 0-2 the surface-field offsets
            ``x_canon - x`` (x, y, z), channel 3 the squared distance to the target
            companion mesh (Portrait4D's ``grids_c`` and ``grids_dists`` at 24^3), stacked
            so one trilinear lookup reads both.
        smooth: ``[N, 3, r, r, r]`` the coarse neck offsets after the box filter
            (Portrait4D's ``grids_c_smooth``).
        fine_bound, coarse_bound: the outermost grid coordinates of ``fine`` and ``smooth``
            (cell centres of the box: ``cell_centre_bound(R)``, ``cell_centre_bound(r)``).
        blend_threshold: the squared distance below which the fine field is used as is.
        verts_target: ``[N, V, 3]`` the stage-2 target mesh: the model at
            ``(shape, expression, neck 0, jaw, eyes)``.
        verts_mouth: ``[N, V, 3]`` the mouth target mesh: ``(shape, 0, neck 0, jaw, 0)``;
            None when the mouth part is off.
        verts_canonical: ``[N, V, 3]`` the canonical mesh (the same for every image).
        eye_box_centre: ``[N, 2, 3]`` the eye boxes' centres (left eye, right eye).
        eye_box_half: ``[N, 2, 3]`` the eye boxes' half sizes (0.6 x each eyeball's extent).
    """

    fine: torch.Tensor
    smooth: torch.Tensor
    fine_bound: float
    coarse_bound: float
    blend_threshold: float
    verts_target: torch.Tensor
    verts_mouth: Optional[torch.Tensor]
    verts_canonical: torch.Tensor
    eye_box_centre: torch.Tensor
    eye_box_half: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.fine.shape[0])

    @property
    def device(self) -> torch.device:
        return self.fine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fine.dtype

    @property
    def fine_offsets(self) -> torch.Tensor:
        """``[N, 3, R, R, R]`` view: the fine surface-field offsets."""
        return self.fine[:, :3]

    @property
    def fine_squared_distance(self) -> torch.Tensor:
        """``[N, 1, R, R, R]`` view: the fine grid's squared distances to the target mesh."""
        return self.fine[:, 3:]

    def detach(self) -> "DeformationFields":
        """A copy whose tensors are detached from autograd."""
        d = lambda t: None if t is None else t.detach()  # noqa: E731
        return DeformationFields(d(self.fine), d(self.smooth), self.fine_bound, self.coarse_bound,
                                 self.blend_threshold, d(self.verts_target), d(self.verts_mouth),
                                 d(self.verts_canonical), d(self.eye_box_centre), d(self.eye_box_half))


@dataclass
class WarpedPoints:
    """Per-point results of :meth:`PartwiseDeformation.warp` for points ``[N, M, 3]``
    (floating tensors in the head model's dtype).

    Attributes:
        neck: ``[N, M, 3]`` x1, the points after stage 1 (the neck pose removed; Portrait4D's
            ``x_c`` before the part-wise step, and the whole deformation of its reconstructor).
        head: ``[N, M, 3]`` head-canonical points: x1 through the face part (nearest vertex
            among the non-eyeball vertices); Portrait4D's ``canonical_face``, the input of
            the head triplane.
        eyes: ``[N, M, 3]`` eye-canonical points: x1 through the eyeball part; Portrait4D's
            ``canonical_eye``.
        mouth: ``[N, M, 3]`` mouth-canonical points: x1 through the jaw-only lips part;
            Portrait4D's ``canonical_mouth``. None when the mouth part is off.
        inside_eye_box: ``[N, M]`` bool, x1 strictly inside either eye box; Portrait4D's
            ``inside_bbox_eye`` (there a float 0/1).
    """

    neck: torch.Tensor
    head: torch.Tensor
    eyes: torch.Tensor
    mouth: Optional[torch.Tensor]
    inside_eye_box: torch.Tensor

    def part_points(self, mouth_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The part triplane's input points ``[N, M, 3]``: the mouth points where
        ``mouth_mask > 0``, the eye points elsewhere (Portrait4D's renderer).

        Args:
            mouth_mask: None (the eye points everywhere, Portrait4D without a mouth mask),
                or the 2D mouth mask sampled per point ``[N, M]`` or per ray ``[N, R]``
                with M = R * S, the S samples of each ray contiguous (ray-major, as the
                renderers lay points out); any real dtype.

        Returns:
            ``[N, M, 3]``.
        """
        op = "WarpedPoints.part_points"
        if mouth_mask is None:
            return self.eyes
        if self.mouth is None:
            raise ValueError(f"{op}: a mouth_mask needs the mouth points, but this warp ran without the "
                             f"mouth part (PartwiseDeformation(..., mouth=False))")
        if not isinstance(mouth_mask, torch.Tensor):
            raise TypeError(f"{op}: mouth_mask must be a torch.Tensor of shape [N, M] or [N, R], "
                            f"got {type(mouth_mask).__name__}")
        n, m = self.eyes.shape[0], self.eyes.shape[1]
        if mouth_mask.dim() != 2 or mouth_mask.shape[0] != n or mouth_mask.shape[1] == 0 \
                or m % mouth_mask.shape[1] != 0:
            raise ValueError(f"{op}: mouth_mask must have shape [N, M] = [{n}, {m}] or [N, R] with M a "
                             f"multiple of R, got {_shape(mouth_mask)}")
        if mouth_mask.device != self.eyes.device:
            raise ValueError(f"{op}: mouth_mask is on {mouth_mask.device} but the points are on "
                             f"{self.eyes.device}")
        select = mouth_mask > 0
        if select.shape[1] != m:
            select = select.repeat_interleave(m // select.shape[1], dim=1)
        return torch.where(select.unsqueeze(-1), self.mouth, self.eyes)


class PartwiseDeformation(nn.Module):
    """Portrait4D's part-wise deformation field (see the module docstring for the math).

    The per-image work (posing the meshes, building the neck grids, the eye boxes) is
    :meth:`build`; the per-point work (grid lookups, one-ring deformations, box tests)
    is :meth:`warp`, so a renderer builds once per image and warps both the coarse and
    the fine samples. ``forward`` does both.

    Args:
        head_model: a :class:`~head4d.head.HeadModel` (:class:`~head4d.head.FLAME` or
            :class:`~head4d.head.ProceduralHead`), held as a submodule (``.to()`` moves it).
            It needs a lips vertex set when ``mouth`` is on (FLAME: the masks file).
        box_side: the side of the cube the neck grids cover (Portrait4D: 1.3, the renderer's
            ``box_warp``).
        fine_resolution, coarse_resolution: grid points per axis of the neck grids
            (Portrait4D: 24 and 8); each grid's points are the cell centres of the box.
        smooth_passes: box-filter passes over the coarse grid (Portrait4D: 2).
        blend_threshold: the squared distance of the blend (Portrait4D: 3e-3).
        mouth: compute the mouth part (Portrait4D computes it when the renderer has a
            mouth mask).
        eye_box_centre: ``"mean"`` (the eyeball vertices' mean, as the released code) or
            ``"box"`` (the bounding box's midpoint).
    """

    def __init__(self, head_model: HeadModel, *, box_side: float = PORTRAIT4D_BOX_SIDE,
                 fine_resolution: int = FINE_RESOLUTION, coarse_resolution: int = COARSE_RESOLUTION,
                 smooth_passes: int = SMOOTH_PASSES, blend_threshold: float = BLEND_THRESHOLD,
                 mouth: bool = True, eye_box_centre: str = "mean"):
        super().__init__()
        if not isinstance(head_model, HeadModel):
            raise TypeError(f"{NAME}: head_model must be a head4d.head.HeadModel (FLAME or ProceduralHead), "
                            f"got {type(head_model).__name__}")
        self.box_side = check_positive_finite(NAME, "box_side", box_side)
        self.fine_resolution = check_int(NAME, "fine_resolution", fine_resolution, 2)
        self.coarse_resolution = check_int(NAME, "coarse_resolution", coarse_resolution, 2)
        self.smooth_passes = check_int(NAME, "smooth_passes", smooth_passes, 0)
        self.blend_threshold = float(blend_threshold)
        if not math.isfinite(self.blend_threshold) or self.blend_threshold < 0:
            raise ValueError(f"{NAME}: blend_threshold must be finite and >= 0, got {blend_threshold}")
        self.mouth = check_bool(NAME, "mouth", mouth)
        self.eye_box_centre = check_choice(NAME, "eye_box_centre", eye_box_centre, EYE_BOX_CENTRES)
        if self.mouth and not head_model.has_lips:
            raise ValueError(f"{NAME}: the mouth part needs the head model's lips vertex set, which "
                             f"{type(head_model).__name__} lacks (FLAME: load it with "
                             f"masks_path='FLAME_masks.pkl'); or pass mouth=False")
        if head_model.left_eye_indices.numel() == 0 or head_model.right_eye_indices.numel() == 0:
            raise ValueError(f"{NAME}: the head model has no eyeball vertices")
        self.head_model = head_model
        self.fine_bound = cell_centre_bound(self.fine_resolution, self.box_side)
        self.coarse_bound = cell_centre_bound(self.coarse_resolution, self.box_side)

    def extra_repr(self) -> str:
        return (f"box_side={self.box_side}, fine={self.fine_resolution}^3, coarse={self.coarse_resolution}^3 "
                f"(smoothed x{self.smooth_passes}), blend_threshold={self.blend_threshold}, mouth={self.mouth}, "
                f"eye_box_centre={self.eye_box_centre!r}")

    # ------------------------------------------------------------------ per image
    def build(self, shape: torch.Tensor, expression: torch.Tensor, neck_pose: torch.Tensor,
              jaw_pose: torch.Tensor, eye_pose: torch.Tensor) -> DeformationFields:
        """The per-image part: pose the meshes, build the neck grids and the eye boxes.

        Args:
            shape: ``[N, 300]``; expression: ``[N, 100]``; neck_pose: ``[N, 3]``;
            jaw_pose: ``[N, 3]``; eye_pose: ``[N, 6]`` (left then right eye): floating, on
            the head model's device (computed in its dtype), one row per image.

        Returns:
            :class:`DeformationFields` for the N images, differentiable w.r.t. the codes
            (piecewise: the closest-triangle choices are constant).

        Cost: three head-model evaluations (V vertices), two surface-field grids on the
        companion mesh (``N * (R^3 + r^3)`` grid points against its faces) and a box filter.
        """
        head = self.head_model
        with nvtx_range("head4d.deform.build"):
            # the observed mesh (validates every code), then neck 0 (the neck's canonical
            # mesh and the stage-2 target), then the jaw-only mouth mesh
            verts_obs = head(shape, expression, neck_pose, jaw_pose, eye_pose)
            n = verts_obs.shape[0]
            zero_neck = torch.zeros_like(neck_pose)
            verts_target = head(shape, expression, zero_neck, jaw_pose, eye_pose)
            verts_mouth = None
            if self.mouth:
                verts_mouth = head(shape, torch.zeros_like(expression), zero_neck, jaw_pose,
                                   torch.zeros_like(eye_pose))
            verts_canonical = head.canonical_vertices().unsqueeze(0).expand(n, -1, -1).contiguous()

            comp_faces = head.companion_faces
            comp_obs = head.companion_vertices(verts_obs)
            comp_canon = head.companion_vertices(verts_target)
            fine_offsets, fine_d2 = surface_field_grid(comp_obs, comp_canon, comp_faces,
                                                       resolution=self.fine_resolution, bound=self.fine_bound)
            coarse_offsets, _ = surface_field_grid(comp_obs, comp_canon, comp_faces,
                                                   resolution=self.coarse_resolution, bound=self.coarse_bound)
            smooth = smooth_grid3d(coarse_offsets, passes=self.smooth_passes)
            fine = torch.cat([fine_offsets, fine_d2], dim=1)

            centres, halves = [], []
            for indices in (head.left_eye_indices, head.right_eye_indices):
                eyeball = verts_target[:, indices]  # [N, E, 3]
                lo, hi = eyeball.amin(dim=1), eyeball.amax(dim=1)
                centres.append(eyeball.mean(dim=1) if self.eye_box_centre == "mean" else 0.5 * (lo + hi))
                halves.append(0.5 * EYE_BOX_SCALE * (hi - lo))
            return DeformationFields(
                fine=fine, smooth=smooth, fine_bound=self.fine_bound, coarse_bound=self.coarse_bound,
                blend_threshold=self.blend_threshold, verts_target=verts_target, verts_mouth=verts_mouth,
                verts_canonical=verts_canonical, eye_box_centre=torch.stack(centres, dim=1),
                eye_box_half=torch.stack(halves, dim=1))

    # ------------------------------------------------------------------ per point
    def _check_points(self, op: str, points, fields) -> torch.Tensor:
        if not isinstance(fields, DeformationFields):
            raise TypeError(f"{op}: fields must be the DeformationFields of {NAME}.build(...), "
                            f"got {type(fields).__name__}")
        check_tensor(op, "points", points, "[N, M, 3]", 3, FLOATING)
        check_dim(op, "points", points, 2, 3, "[N, M, 3]")
        if points.shape[0] != fields.batch_size:
            raise ValueError(f"{op}: points has batch size {points.shape[0]} but fields were built for "
                             f"{fields.batch_size} images; they must match")
        if points.device != fields.device:
            raise ValueError(f"{op}: points is on {points.device} but fields are on {fields.device}")
        if fields.verts_target.shape[1] != self.head_model.num_vertices:
            raise ValueError(f"{op}: fields hold meshes of {fields.verts_target.shape[1]} vertices but the head "
                             f"model has {self.head_model.num_vertices}; build them with this deformation")
        return points.to(fields.dtype)

    def _neck(self, points: torch.Tensor, fields: DeformationFields) -> torch.Tensor:
        with nvtx_range("head4d.deform.neck"):
            fine = sample_grid3d(fields.fine, points, bound=fields.fine_bound, padding="zeros")  # [N, M, 4]
            smooth = sample_grid3d(fields.smooth, points, bound=fields.coarse_bound, padding="zeros")
            weight = torch.exp(-BLEND_SHARPNESS * torch.relu(fine[..., 3:] - fields.blend_threshold))
            return points + weight * fine[..., :3] + (1.0 - weight) * smooth

    def warp_neck(self, points: torch.Tensor, fields: DeformationFields) -> torch.Tensor:
        """Stage 1 only: the points with the neck pose removed (Portrait4D's reconstructor
        uses only this).

        Args:
            points: ``[N, M, 3]`` floating, observation space, on the fields' device.
            fields: from :meth:`build` for the same N images.

        Returns:
            ``[N, M, 3]`` in the head model's dtype, differentiable w.r.t. points and fields.
        """
        points = self._check_points(f"{NAME}.warp_neck", points, fields)
        return self._neck(points, fields)

    def warp(self, points: torch.Tensor, fields: DeformationFields) -> WarpedPoints:
        """The per-point part: stage 1 (neck grids), then the face, eye and mouth parts and
        the eye-box test on the stage-1 points.

        Args:
            points: ``[N, M, 3]`` floating (converted to the head model's dtype), observation
                space (the renderer's sample points), on the fields' device.
            fields: :class:`DeformationFields` from :meth:`build` for the same N images.

        Returns:
            :class:`WarpedPoints`: ``neck``, ``head``, ``eyes``, ``mouth`` ``[N, M, 3]`` and
            ``inside_eye_box`` ``[N, M]`` bool. Differentiable w.r.t. ``points`` and the
            fields (the nearest-vertex choices are piecewise constant).

        Cost per point: three trilinear lookups (4 + 3 channels), three nearest-vertex
        searches (over the face, eyeball and lips vertices) and their one-ring sums.
        """
        op = f"{NAME}.warp"
        points = self._check_points(op, points, fields)
        head = self.head_model
        with nvtx_range("head4d.deform.warp"):
            x1 = self._neck(points, fields)
            with nvtx_range("head4d.deform.parts"):
                ring = head.one_ring
                canonical = fields.verts_canonical
                x_head = one_ring_deform(x1, fields.verts_target, canonical, ring, vertex_subset=head.face_indices)
                x_eyes = one_ring_deform(x1, fields.verts_target, canonical, ring, vertex_subset=head.eye_indices)
                x_mouth = None
                if fields.verts_mouth is not None:
                    x_mouth = one_ring_deform(x1, fields.verts_mouth, canonical, ring,
                                              vertex_subset=head.lips_indices)
                with torch.no_grad():
                    rel = (x1.unsqueeze(2) - fields.eye_box_centre.unsqueeze(1)).abs()  # [N, M, 2, 3]
                    inside = (rel < fields.eye_box_half.unsqueeze(1)).all(dim=-1).any(dim=-1)
        return WarpedPoints(neck=x1, head=x_head, eyes=x_eyes, mouth=x_mouth, inside_eye_box=inside)

    def forward(self, points: torch.Tensor, shape: torch.Tensor, expression: torch.Tensor,
                neck_pose: torch.Tensor, jaw_pose: torch.Tensor, eye_pose: torch.Tensor) -> WarpedPoints:
        """``warp(points, build(shape, expression, neck_pose, jaw_pose, eye_pose))``; see both."""
        return self.warp(points, self.build(shape, expression, neck_pose, jaw_pose, eye_pose))
