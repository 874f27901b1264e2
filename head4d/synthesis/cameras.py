"""Portrait4D's synthesis cameras: look-at camera labels and the random look-at
distribution of its reconstructor training.

Convention (the one head4d's GenHead renders with, and Portrait4D's): a camera label is
25 numbers, the cam2world matrix ``[4, 4]`` row-major (16) then the normalized intrinsics
``[3, 3]`` (9: focal lengths in units of the image side, principal point (0.5, 0.5)).
The camera is OpenGL-style: its x axis points right in the image, its y axis up, and it
looks along its -z axis. The world is y-up; a frontal camera sits on +z.

Angles of :func:`look_at_cameras` (the parametrization of EG3D's and Portrait4D's
look-at sampler, restated):

* the camera's position is ``radius * (sin q cos h, cos q, sin q sin h)`` about the world
  origin, with ``h = pi/2 + yaw`` and ``cos q = 2 * elevation / pi``: yaw 0 and elevation
  0 put the camera on +z; a positive yaw moves it towards -x; a positive elevation lifts
  it (the elevation is not the angle above the horizon: its sine-like map
  ``y / radius = 2 * elevation / pi`` is EG3D's uniform-in-cos parametrization);
* it looks at ``pivot`` (not at the origin; the radius is still measured from the
  origin);
* its up vector is the world's +y made orthogonal to the viewing direction, then rolled
  by ``roll`` radians about it (positive roll turns the image's up towards the camera's
  right);
* the cam2world columns are (right, up, -forward) and the position.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

#: Normalized focal length of the synthesis cameras when no dataset cameras give theirs
#: (the focal head4d's demo renders with; Portrait4D takes the intrinsics of its dataset labels).
FOCAL = 4.2647
#: Camera-label size: cam2world 16 + intrinsics 9.
CAMERA_SIZE = 25
#: Distance of the mapping-condition camera (identity rotation, on +z) used when no
#: dataset cameras are given, as Portrait4D's frontal condition camera.
CONDITION_DISTANCE = 4.0

#: Portrait4D's look-at distribution: yaw = U(-0.78, 0.78), elevation = 0.2 + U(-0.45, 0.45),
#: roll = U(-0.25, 0.25), pivot = 3 * (U(-0.01, 0.01), U(-0.01, 0.01), 0.03 + U(-0.01, 0.01)),
#: radius = U(3.65, 4.45).
YAW_RANGE = (-0.78, 0.78)
ELEVATION_RANGE = (0.2 - 0.45, 0.2 + 0.45)
ROLL_RANGE = (-0.25, 0.25)
PIVOT_LOW = (-0.03, -0.03, 0.06)
PIVOT_HIGH = (0.03, 0.03, 0.12)
RADIUS_RANGE = (3.65, 4.45)


def intrinsics_label(n: int, focal: float = FOCAL, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[n, 9]`` normalized intrinsics: ``focal`` on the diagonal, principal point (0.5, 0.5)."""
    k = torch.tensor([focal, 0.0, 0.5, 0.0, focal, 0.5, 0.0, 0.0, 1.0], device=device, dtype=dtype)
    return k.expand(n, 9).clone()


def look_at_cameras(yaw: torch.Tensor, elevation: torch.Tensor, roll: torch.Tensor, pivot: torch.Tensor,
                    radius: torch.Tensor, focal: float = FOCAL) -> torch.Tensor:
    """Camera labels ``[N, 25]`` (module docstring for the convention and the angles).

    Args:
        yaw, elevation, roll, radius: ``[N]`` floating tensors (radians; radius > 0).
        pivot: ``[N, 3]`` the point looked at.
        focal: normalized focal length of the intrinsics.
    """
    for name, value in (("yaw", yaw), ("elevation", elevation), ("roll", roll), ("radius", radius)):
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] != yaw.shape[0]:
            raise ValueError(f"look_at_cameras: {name} must be a 1-D tensor [N] like yaw, got "
                             f"{getattr(value, 'shape', type(value).__name__)}")
    if not isinstance(pivot, torch.Tensor) or tuple(pivot.shape) != (yaw.shape[0], 3):
        raise ValueError(f"look_at_cameras: pivot must have shape [{yaw.shape[0]}, 3], "
                         f"got {getattr(pivot, 'shape', type(pivot).__name__)}")
    n = yaw.shape[0]
    h = math.pi / 2 + yaw
    cos_q = (2 * elevation / math.pi).clamp(-1 + 1e-7, 1 - 1e-7)
    sin_q = (1 - cos_q * cos_q).sqrt()
    position = radius.unsqueeze(1) * torch.stack([sin_q * torch.cos(h), cos_q, sin_q * torch.sin(h)], dim=1)
    forward = F.normalize(pivot - position, dim=1)
    world_up = torch.tensor([0.0, 1.0, 0.0], dtype=position.dtype, device=position.device).expand(n, 3)
    right = F.normalize(torch.linalg.cross(forward, world_up), dim=1)
    up = F.normalize(torch.linalg.cross(right, forward), dim=1)
    rolled_up = up * torch.cos(roll).unsqueeze(1) + right * torch.sin(roll).unsqueeze(1)
    right = F.normalize(torch.linalg.cross(forward, rolled_up), dim=1)
    up = F.normalize(torch.linalg.cross(right, forward), dim=1)
    cam2world = torch.eye(4, dtype=position.dtype, device=position.device).repeat(n, 1, 1)
    cam2world[:, :3, 0], cam2world[:, :3, 1], cam2world[:, :3, 2] = right, up, -forward
    cam2world[:, :3, 3] = position
    return torch.cat([cam2world.reshape(n, 16), intrinsics_label(n, focal, position.device, position.dtype)], dim=1)


def look_at_angles(cameras: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The inverse of :func:`look_at_cameras` for cameras made by it: ``(yaw, elevation,
    roll, radius)`` ``[N]`` each from labels ``[N, 25]`` (the pivot is not recovered; the
    roll is measured against the unrolled up vector of the camera's own viewing direction)."""
    n = cameras.shape[0]
    cam2world = cameras[:, :16].reshape(n, 4, 4)
    position = cam2world[:, :3, 3]
    radius = position.norm(dim=1)
    elevation = math.pi / 2 * position[:, 1] / radius
    yaw = torch.atan2(-position[:, 0], position[:, 2])
    forward = -cam2world[:, :3, 2]
    world_up = torch.zeros_like(forward)
    world_up[:, 1] = 1
    right0 = F.normalize(torch.linalg.cross(forward, world_up), dim=1)
    up0 = F.normalize(torch.linalg.cross(right0, forward), dim=1)
    up = cam2world[:, :3, 1]
    roll = torch.atan2((up * right0).sum(1), (up * up0).sum(1))
    return yaw, elevation, roll, radius


def _uniform(n: int, low, high, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """``[n, len(low)]`` (or ``[n]`` for number bounds) uniform in [low, high), drawn on the
    generator's device (or the global generator's CPU one) then moved to ``device``."""
    low_t = torch.as_tensor(low, dtype=torch.float32)
    high_t = torch.as_tensor(high, dtype=torch.float32)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((n,) + tuple(low_t.shape), generator=generator, device=gen_device)
    return (low_t.to(gen_device) + u * (high_t - low_t).to(gen_device)).to(device)


def sample_look_at_parameters(n: int, *, generator: Optional[torch.Generator] = None,
                              device=None) -> Dict[str, torch.Tensor]:
    """Portrait4D's look-at distribution (the ``*_RANGE`` constants, ``PIVOT_LOW`` and
    ``PIVOT_HIGH``), each quantity uniform and independent: ``{"yaw", "elevation", "roll",
    "radius"}`` ``[n]`` and ``"pivot"`` ``[n, 3]``, float32 on ``device``, the arguments of
    :func:`look_at_cameras`."""
    return {"yaw": _uniform(n, *YAW_RANGE, generator, device),
            "elevation": _uniform(n, *ELEVATION_RANGE, generator, device),
            "roll": _uniform(n, *ROLL_RANGE, generator, device),
            "pivot": _uniform(n, PIVOT_LOW, PIVOT_HIGH, generator, device),
            "radius": _uniform(n, *RADIUS_RANGE, generator, device)}


def sample_look_at_cameras(n: int, *, generator: Optional[torch.Generator] = None, device=None,
                           focal: float = FOCAL) -> torch.Tensor:
    """``[n, 25]`` float32 cameras: :func:`look_at_cameras` of :func:`sample_look_at_parameters`."""
    return look_at_cameras(**sample_look_at_parameters(n, generator=generator, device=device), focal=focal)


def frontal_condition_camera(n: int, focal: float = FOCAL, device=None) -> torch.Tensor:
    """``[n, 25]``: identity rotation at ``(0, 0, CONDITION_DISTANCE)`` with ``focal``, the
    mapping's condition camera when no dataset cameras are given."""
    cam2world = torch.eye(4, device=device).repeat(n, 1, 1)
    cam2world[:, 2, 3] = CONDITION_DISTANCE
    return torch.cat([cam2world.reshape(n, 16), intrinsics_label(n, focal, device)], dim=1)
