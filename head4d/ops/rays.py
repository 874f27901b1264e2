"""Rays and depth ranges: ``generate_rays``, ``ray_box_limits``, ``auto_plane_limits``.

Where things live:
    reference   head4d/reference/rays.py   (the ``torch`` backend, the only one so far)
    tests       tests/test_rendering.py
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _backend
from .._checks import check_choice, check_dim, check_int, check_positive_finite, check_same_device, check_tensor
from .._nvtx import nvtx_range
from ..reference import rays as _reference
from ._common import check_same_dtype, resolve_implemented

#: Backend preference per device type. Only the reference exists so far.
PREFERENCES = {
    "cpu": ("torch",),
    "cuda": ("torch",),
}

for _op in ("generate_rays", "ray_box_limits", "auto_plane_limits"):
    _backend.declare(_op, ("torch",), PREFERENCES)

CONVENTIONS = ("opencv", "opengl")
INVALID_END = ("max_start", "max_end")


def generate_rays(cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int, *,
                  convention: str = "opencv", backend: Optional[str] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Camera rays through the pixel centres of an R x R image (EG3D's ``RaySampler``).

    Pixel (row i, column j) is ray ``i * R + j`` (row-major) and has normalized
    image coordinates ``u = (j + 0.5) / R``, ``v = (i + 0.5) / R`` (computed as
    EG3D does, ``j * (1/R) + 0.5/R``). With normalized intrinsics
    ``fx = K[0,0], fy = K[1,1], cx = K[0,2], cy = K[1,2]`` and skew ``sk = K[0,1]``,
    let ``x = (u - cx + cy*sk/fy - sk*v/fy) / fx`` and ``y = (v - cy) / fy``. The
    camera-space direction is

    * ``convention="opencv"`` (EG3D: x right, y down, looking along +z): ``(x, y, 1)``;
    * ``convention="opengl"`` (Portrait4D: x right, y up, looking along -z):
      ``(x, -y, -1)``. This is Portrait4D's ``z_cam = -1`` with its x term negated:
      it computes ``x_lift = -x * z_cam = x`` and ``y_lift = y * z_cam = -y``, so
      image columns still run to the camera's right and rows downwards.

    World directions are ``cam2world[:3, :3] @ direction``, normalized to unit length;
    every ray of an image starts at the camera position ``cam2world[:3, 3]``. The
    bottom row of ``cam2world`` is ignored.

    Args:
        cam2world: ``[N, 4, 4]`` float16, bfloat16, float32 or float64 camera-to-world matrices.
        intrinsics: ``[N, 3, 3]`` normalized intrinsics (focal lengths and principal
            point in units of the image size), same dtype and device.
        resolution: R >= 1.
        convention: ``"opencv"`` or ``"opengl"``.
        backend: ``None``/``"auto"`` or ``"torch"`` (no other backend yet).

    Returns:
        ``(origins [N, R*R, 3], directions [N, R*R, 3])`` in ``cam2world.dtype``,
        computed in float32 (float64 for float64 inputs).
    """
    op = "generate_rays"
    check_tensor(op, "cam2world", cam2world, "[N, 4, 4]", 3)
    check_tensor(op, "intrinsics", intrinsics, "[N, 3, 3]", 3)
    if tuple(cam2world.shape[1:]) != (4, 4):
        raise ValueError(f"{op}: cam2world must have shape [N, 4, 4], got {list(cam2world.shape)}")
    if tuple(intrinsics.shape[1:]) != (3, 3):
        raise ValueError(f"{op}: intrinsics must have shape [N, 3, 3], got {list(intrinsics.shape)}")
    if intrinsics.shape[0] != cam2world.shape[0]:
        raise ValueError(f"{op}: intrinsics has batch size {intrinsics.shape[0]} but cam2world has "
                         f"{cam2world.shape[0]}; they must match")
    check_same_dtype(op, [("cam2world", cam2world), ("intrinsics", intrinsics)])
    device = check_same_device(op, [("cam2world", cam2world), ("intrinsics", intrinsics)])
    resolution = check_int(op, "resolution", resolution, 1)
    check_choice(op, "convention", convention, CONVENTIONS)
    resolve_implemented(op, device, backend, PREFERENCES)
    with nvtx_range("head4d.generate_rays"):
        return _reference.generate_rays(cam2world, intrinsics, resolution, convention)


def _check_rays(op: str, origins, directions) -> torch.device:
    check_tensor(op, "origins", origins, "[N, R, 3]", 3)
    check_tensor(op, "directions", directions, "[N, R, 3]", 3)
    check_dim(op, "origins", origins, 2, 3, "[N, R, 3]")
    if directions.shape != origins.shape:
        raise ValueError(f"{op}: directions has shape {list(directions.shape)} but origins has "
                         f"{list(origins.shape)}; they must match")
    check_same_dtype(op, [("origins", origins), ("directions", directions)])
    return check_same_device(op, [("origins", origins), ("directions", directions)])


def ray_box_limits(origins: torch.Tensor, directions: torch.Tensor, box_side: float, *,
                   invalid_end: str = "max_start", backend: Optional[str] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of the cube of side ``box_side`` centred at the origin
    (EG3D's ``ray_start = ray_end = 'auto'``).

    Per ray the slab method gives ``start`` (entry) and ``end`` (exit) along
    ``directions`` (distances in units of the direction's length; EG3D's rays are
    unit length). A ray is invalid when it misses the cube (including grazing it,
    ``end <= start``). Invalid rays borrow from the valid rays of the whole tensor
    (all images together): ``start = min(start over valid rays)`` and

    * ``invalid_end="max_start"`` (default): ``end = max(start over valid rays)``.
      This is what EG3D's and Portrait4D's renderers do (they fill ``ray_end`` from
      ``ray_start``), so missing rays still march an interval, which matters for
      the background of 'auto' renders;
    * ``invalid_end="max_end"``: ``end = max(end over valid rays)``.

    If no ray hits the cube every ray keeps EG3D's markers ``start = -1, end = -2``.
    Rays that start inside the cube get a negative ``start`` (the entry behind
    them), and a cube behind a ray is not a miss; both as in EG3D.

    Args:
        origins: ``[N, R, 3]`` floating point.
        directions: ``[N, R, 3]``, same dtype and device.
        box_side: the cube's side, > 0 (EG3D passes ``box_warp``).
        invalid_end: ``"max_start"`` or ``"max_end"``.
        backend: ``None``/``"auto"`` or ``"torch"``.

    Returns:
        ``(start [N, R, 1], end [N, R, 1])`` in ``origins.dtype``, without gradient.
    """
    op = "ray_box_limits"
    device = _check_rays(op, origins, directions)
    box_side = check_positive_finite(op, "box_side", box_side)
    check_choice(op, "invalid_end", invalid_end, INVALID_END)
    resolve_implemented(op, device, backend, PREFERENCES)
    with nvtx_range("head4d.ray_box_limits"):
        return _reference.ray_box_limits(origins, directions, box_side, invalid_end)


def auto_plane_limits(cam2world: torch.Tensor, box_warp: float, *, backend: Optional[str] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Portrait4D's 'auto-plane' depth range: one ``[start, end]`` per image.

    ``cam_z`` is the camera-space depth of the world origin, the z translation of
    the world-to-camera matrix, computed like Portrait4D as the rigid inverse of
    ``cam2world``: ``cam_z = -(R^T t)_z``. Then ``start = |cam_z| - box_warp / 2``
    and ``end = |cam_z| + box_warp / 2``. Use it with
    ``stratified_depths(..., jitter="per_image")`` to reproduce Portrait4D.

    Args:
        cam2world: ``[N, 4, 4]`` floating point (a rotation and a translation).
        box_warp: the head cube's side, > 0.
        backend: ``None``/``"auto"`` or ``"torch"``.

    Returns:
        ``(start [N, 1, 1], end [N, 1, 1])`` in ``cam2world.dtype``.
    """
    op = "auto_plane_limits"
    check_tensor(op, "cam2world", cam2world, "[N, 4, 4]", 3)
    if tuple(cam2world.shape[1:]) != (4, 4):
        raise ValueError(f"{op}: cam2world must have shape [N, 4, 4], got {list(cam2world.shape)}")
    box_warp = check_positive_finite(op, "box_warp", box_warp)
    resolve_implemented(op, cam2world.device, backend, PREFERENCES)
    with nvtx_range("head4d.auto_plane_limits"):
        return _reference.auto_plane_limits(cam2world, box_warp)
