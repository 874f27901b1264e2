"""Reference ray generation and depth ranges: EG3D's ``RaySampler`` and
``get_ray_limits_box`` and Portrait4D's 'auto-plane' range, as plain PyTorch.

Arguments are assumed valid; :mod:`head4d.ops.rays` checks them.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def generate_rays(cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int,
                  convention: str = "opencv") -> Tuple[torch.Tensor, torch.Tensor]:
    """One ray per pixel centre of an ``resolution x resolution`` image, row-major.

    Pixel (row i, column j) has normalized image coordinates
    ``u = j / R + 0.5 / R`` and ``v = i / R + 0.5 / R`` (EG3D's rounding of
    ``(j + 0.5) / R``). With ``fx, fy, cx, cy, sk`` the entries ``[0,0], [1,1],
    [0,2], [1,2], [0,1]`` of the intrinsics, the camera-space direction is

    * ``"opencv"`` (EG3D; x right, y down, looking along +z):
      ``(x, y, 1)`` with ``x = (u - cx + cy*sk/fy - sk*v/fy) / fx`` and ``y = (v - cy) / fy``;
    * ``"opengl"`` (Portrait4D; x right, y up, looking along -z): ``(x, -y, -1)``.

    The world direction is ``cam2world[:3, :3] @ camera direction``, normalized;
    the origin is ``cam2world[:3, 3]``. The last row of ``cam2world`` is not used.

    Args:
        cam2world: ``[N, 4, 4]`` floating point.
        intrinsics: ``[N, 3, 3]`` normalized intrinsics, same dtype and device.
        resolution: R, the image is R x R.
        convention: ``"opencv"`` or ``"opengl"``.

    Returns:
        ``(origins [N, R*R, 3], directions [N, R*R, 3])`` in ``cam2world.dtype``
        (computed in float32, or float64 for float64 inputs).
    """
    dtype = cam2world.dtype
    compute = _compute(dtype)
    device = cam2world.device
    c2w = cam2world.to(compute)
    k = intrinsics.to(compute)
    n = c2w.shape[0]

    centres = torch.arange(resolution, dtype=compute, device=device) * (1.0 / resolution) + (0.5 / resolution)
    v, u = torch.meshgrid(centres, centres, indexing="ij")  # v follows the row i, u the column j
    u = u.reshape(1, -1)
    v = v.reshape(1, -1)

    fx, fy = k[:, 0, 0, None], k[:, 1, 1, None]
    cx, cy = k[:, 0, 2, None], k[:, 1, 2, None]
    sk = k[:, 0, 1, None]
    x = (u - cx + cy * sk / fy - sk * v / fy) / fx  # [N, R*R]
    y = (v - cy) / fy
    ones = torch.ones_like(x)
    if convention == "opencv":
        cam_dirs = torch.stack((x, y, ones), dim=-1)
    else:
        cam_dirs = torch.stack((x, -y, -ones), dim=-1)

    rotation = c2w[:, :3, :3]
    directions = F.normalize(torch.einsum("nij,nrj->nri", rotation, cam_dirs), dim=-1)
    origins = c2w[:, None, :3, 3].expand(n, resolution * resolution, 3).contiguous()
    return origins.to(dtype), directions.to(dtype)


def ray_box_intersections(origins: torch.Tensor, directions: torch.Tensor,
                          box_side: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Slab-method entry and exit distances of the cube ``[-box_side/2, box_side/2]^3``.

    Per axis a, with ``inv = 1 / d_a``, the near slab face is ``-h`` when ``inv >= 0``
    and ``+h`` when ``inv < 0`` (h = box_side / 2), the far face the other one, and
    ``t_near_a = (near - o_a) * inv``, ``t_far_a = (far - o_a) * inv``. The axes are
    combined in the order x, y, z: a ray is marked missing when the running interval
    and the next axis' interval do not overlap (``t_near > t_far_a`` or
    ``t_near_a > t_far``); then ``t_near = max(t_near, t_near_a)`` and
    ``t_far = min(t_far, t_far_a)``. Missing rays get ``(-1, -2)``. This is EG3D's
    ``get_ray_limits_box``, including its treatment of zero direction components
    (``1/0 = inf``) and of NaN.

    Returns ``(start, end)``, each ``[*origins.shape[:-1], 1]``, detached.
    """
    dtype = origins.dtype
    compute = _compute(dtype)
    o = origins.detach().to(compute)
    d = directions.detach().to(compute)
    half = box_side / 2
    inv = 1 / d
    near_face = torch.where(inv < 0, torch.full_like(inv, half), torch.full_like(inv, -half))
    far_face = -near_face
    t_near_axes = (near_face - o) * inv
    t_far_axes = (far_face - o) * inv

    t_near, t_far = t_near_axes[..., 0], t_far_axes[..., 0]
    valid = torch.ones_like(t_near, dtype=torch.bool)
    for axis in (1, 2):
        near_a, far_a = t_near_axes[..., axis], t_far_axes[..., axis]
        valid = valid & ~((t_near > far_a) | (near_a > t_far))
        t_near = torch.maximum(t_near, near_a)
        t_far = torch.minimum(t_far, far_a)
    t_near = torch.where(valid, t_near, torch.full_like(t_near, -1.0))
    t_far = torch.where(valid, t_far, torch.full_like(t_far, -2.0))
    return t_near.unsqueeze(-1).to(dtype), t_far.unsqueeze(-1).to(dtype)


def ray_box_limits(origins: torch.Tensor, directions: torch.Tensor, box_side: float,
                   invalid_end: str = "max_start") -> Tuple[torch.Tensor, torch.Tensor]:
    """EG3D's 'auto' depth range: the box limits, with rays that miss borrowing from the others.

    A ray is valid when ``end > start`` after :func:`ray_box_intersections`. If any
    ray in the whole tensor is valid, every invalid ray gets ``start = min(start of
    the valid rays)`` and ``end = max(start of the valid rays)`` for
    ``invalid_end="max_start"`` (what EG3D's and Portrait4D's renderers do) or
    ``end = max(end of the valid rays)`` for ``invalid_end="max_end"``. If no ray is
    valid, they all keep ``(-1, -2)``, as in EG3D.

    Args:
        origins, directions: ``[N, R, 3]``.
        box_side: the cube's side (EG3D passes ``box_warp``).
        invalid_end: ``"max_start"`` or ``"max_end"``.

    Returns:
        ``(start [N, R, 1], end [N, R, 1])`` in ``origins.dtype``, detached.
    """
    start, end = ray_box_intersections(origins, directions, box_side)
    valid = end > start
    if bool(valid.any()):
        fill_start = start[valid].min()
        fill_end = (start if invalid_end == "max_start" else end)[valid].max()
        start = torch.where(valid, start, fill_start)
        end = torch.where(valid, end, fill_end)
    return start, end


def auto_plane_limits(cam2world: torch.Tensor, box_warp: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Portrait4D's 'auto-plane' depth range, one per image.

    ``cam_z`` is the z translation of the world-to-camera transform, taken as the
    rigid inverse of ``cam2world`` (rotation R, translation t):
    ``cam_z = -(R^T t)_z = -sum_k R[k, 2] * t[k]``. Then
    ``start = |cam_z| - box_warp / 2`` and ``end = |cam_z| + box_warp / 2``.

    Returns ``(start [N, 1, 1], end [N, 1, 1])`` in ``cam2world.dtype``.
    """
    dtype = cam2world.dtype
    c2w = cam2world.to(_compute(dtype))
    cam_z = -(c2w[:, :3, 2] * c2w[:, :3, 3]).sum(dim=-1)
    depth = cam_z.abs().reshape(-1, 1, 1)
    return (depth - box_warp / 2).to(dtype), (depth + box_warp / 2).to(dtype)
