"""What ``head4d reenact`` reads: the source image, the motion vectors, the cameras, and the
reconstructor checkpoint; each with a clear error (:class:`ReenactError`) naming the
argument and what was expected.

Cameras are Portrait4D's 25-number labels: an OpenGL-style cam2world matrix (16, row-major)
and the normalized intrinsics (9). Portrait4D's re-enactment camera (``fixed``) has the
identity rotation and sits at (0, 0.01, 4.2), looking down -z at the head, with FFHQ's
intrinsics (focal 4.2647 in units of the image side, principal point at the centre).
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..models import Reconstructor

#: Portrait4D's re-enactment camera: position (identity rotation) and normalized focal length.
FIXED_CAMERA_POSITION = (0.0, 0.01, 4.2)
FOCAL = 4.2647
#: The ``orbit`` cameras: a yaw sweep of this amplitude (radians) about the vertical axis.
ORBIT_YAW = 0.6
#: Image files read through Pillow.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ReenactError(RuntimeError):
    """An argument, input file or checkpoint ``head4d reenact`` cannot use (the message says why)."""


def portrait_cameras(yaw: torch.Tensor) -> torch.Tensor:
    """Camera labels ``[N, 25]`` float32: Portrait4D's fixed re-enactment camera rotated by
    ``yaw [N]`` (radians) about the vertical axis through the origin (yaw 0 is the fixed
    camera itself)."""
    yaw = yaw.to(torch.float32)
    n = yaw.shape[0]
    c, s = torch.cos(yaw), torch.sin(yaw)
    rotation = torch.zeros(n, 3, 3)
    rotation[:, 0, 0], rotation[:, 0, 2], rotation[:, 1, 1], rotation[:, 2, 0], rotation[:, 2, 2] = c, s, 1.0, -s, c
    cam2world = torch.eye(4).repeat(n, 1, 1)
    cam2world[:, :3, :3] = rotation
    cam2world[:, :3, 3] = rotation @ torch.tensor(FIXED_CAMERA_POSITION)
    intrinsics = torch.tensor([[FOCAL, 0.0, 0.5], [0.0, FOCAL, 0.5], [0.0, 0.0, 1.0]]).repeat(n, 1, 1)
    return torch.cat([cam2world.reshape(n, 16), intrinsics.reshape(n, 9)], dim=1)


def load_cameras(spec: str, frames: int) -> torch.Tensor:
    """``[frames, 25]`` float32 cameras from ``--camera``: ``fixed``, ``orbit`` (a yaw sweep of
    +-:data:`ORBIT_YAW`, one period over the frames) or a ``.npy`` file ``[frames, 25]``
    (one row is used for every frame)."""
    if spec == "fixed":
        return portrait_cameras(torch.zeros(frames))
    if spec == "orbit":
        t = torch.arange(frames, dtype=torch.float32) / max(frames, 1)
        return portrait_cameras(ORBIT_YAW * torch.sin(2 * math.pi * t))
    path = Path(spec)
    if path.suffix != ".npy":
        raise ReenactError(f"--camera must be 'fixed', 'orbit' or a .npy file of [F, 25] camera labels, got {spec!r}")
    cameras = _load_npy("--camera", path)
    if cameras.ndim == 1:
        cameras = cameras[None]
    if cameras.ndim != 2 or cameras.shape[1] != 25 or cameras.shape[0] not in (1, frames):
        raise ReenactError(f"--camera {spec}: expected camera labels [{frames}, 25] (cam2world 16 + intrinsics 9, "
                           f"one per motion frame) or [25], got shape {list(cameras.shape)}")
    cameras = _real("--camera", spec, cameras)
    return torch.from_numpy(cameras).to(torch.float32).expand(frames, 25).clone()


def load_neck_poses(path: str, frames: int) -> torch.Tensor:
    """``[frames, 3]`` float32 neck rotations (axis-angle, radians) from a ``.npy`` file
    ``[frames, 3]`` (or ``[3]``: one pose for every frame)."""
    source = Path(path)
    if source.suffix != ".npy":
        raise ReenactError(f"--neck {path}: expected a .npy file of neck poses [F, 3] (axis-angle)")
    poses = _load_npy("--neck", source)
    if poses.ndim == 1:
        poses = poses[None]
    if poses.ndim != 2 or poses.shape[1] != 3 or poses.shape[0] not in (1, frames):
        raise ReenactError(f"--neck {path}: expected neck poses [{frames}, 3] (axis-angle, one per motion frame) or "
                           f"[3], got shape {list(poses.shape)}")
    return torch.from_numpy(_real("--neck", path, poses)).to(torch.float32).expand(frames, 3).clone()


def _load_npy(argument: str, path: Path) -> np.ndarray:
    if not path.is_file():
        raise ReenactError(f"{argument} {path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ReenactError(f"{argument} {path}: not a readable .npy array ({exc})") from exc


def _real(argument: str, path, array: np.ndarray) -> np.ndarray:
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ReenactError(f"{argument} {path}: expected real numbers, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ReenactError(f"{argument} {path}: holds NaN or infinite values")
    return array.astype(np.float64)


def load_source_image(path: str, resolution: int) -> torch.Tensor:
    """The source image ``[1, 3, S, S]`` float32 in [-1, 1] (S = ``resolution``, the model's
    ``source_resolution``) from a PNG / JPEG file (through Pillow) or a ``.npy`` array
    ``[3, S, S]`` or ``[S, S, 3]``: uint8 in 0..255, or floating in [0, 1]. The image must be
    RGB and already aligned and cropped as Portrait4D aligns faces; head4d does not align
    (nor resize: a wrong size is an error)."""
    source = Path(path)
    if not source.is_file():
        raise ReenactError(f"--source {path}: no such file")
    suffix = source.suffix.lower()
    if suffix == ".npy":
        array = _load_npy("--source", source)
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = np.moveaxis(array, 0, -1)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ReenactError(f"--source {path}: must be an RGB image [3, {resolution}, {resolution}] or "
                               f"[{resolution}, {resolution}, 3], got shape {list(array.shape)}")
        if array.dtype == np.uint8:
            image = array.astype(np.float64) / 255.0
        elif np.issubdtype(array.dtype, np.floating):
            image = _real("--source", path, array)
            if image.min() < 0 or image.max() > 1:
                raise ReenactError(f"--source {path}: a floating image must be in [0, 1], got values in "
                                   f"[{image.min():.3g}, {image.max():.3g}]")
        else:
            raise ReenactError(f"--source {path}: expected uint8 or floating pixels, got dtype {array.dtype}")
    elif suffix in IMAGE_SUFFIXES:
        try:
            from PIL import Image
        except ImportError as exc:
            raise ReenactError(f"--source {path}: reading {suffix} files needs Pillow (pip install pillow); "
                               f"or pass the image as a .npy array [{resolution}, {resolution}, 3] uint8") from exc
        with Image.open(source) as picture:
            if picture.mode != "RGB":
                raise ReenactError(f"--source {path}: must be an RGB image, got Pillow mode {picture.mode!r} "
                                   f"(convert it to RGB first)")
            image = np.asarray(picture, dtype=np.float64) / 255.0
    else:
        raise ReenactError(f"--source {path}: expected a .png, .jpg / .jpeg or .npy file, got {suffix or 'no suffix'}")
    if image.shape[:2] != (resolution, resolution):
        raise ReenactError(f"--source {path}: the image must be {resolution}x{resolution} (the model's source "
                           f"resolution), aligned and cropped as Portrait4D does (see the README); got "
                           f"{image.shape[1]}x{image.shape[0]}")
    return torch.from_numpy(image * 2 - 1).to(torch.float32).permute(2, 0, 1)[None].contiguous()


def load_motion(path: str, motion_dim: int, argument: str = "--motion") -> torch.Tensor:
    """Motion vectors ``[F, motion_dim]`` float32 from a ``.npy`` file (``[motion_dim]`` is
    one frame). ``motion_dim`` is the model's: 548 (PD-FGC) or 109 (FLAME expression 100,
    jaw 3, eyes 6)."""
    source = Path(path)
    if source.suffix != ".npy":
        raise ReenactError(f"{argument} {path}: expected a .npy file of motion vectors [F, {motion_dim}]")
    motion = _load_npy(argument, source)
    if motion.ndim == 1:
        motion = motion[None]
    if motion.ndim != 2 or motion.shape[1] != motion_dim or motion.shape[0] == 0:
        raise ReenactError(f"{argument} {path}: expected motion vectors [F, {motion_dim}] ({motion_kind(motion_dim)}, "
                           f"the checkpoint's motion size), got shape {list(motion.shape)}")
    return torch.from_numpy(_real(argument, path, motion)).to(torch.float32)


def motion_kind(motion_dim: int) -> str:
    """What a motion vector of ``motion_dim`` numbers is, in words."""
    return {548: "PD-FGC motion: eyes 6 + emotion 30 + mouth 512",
            109: "FLAME motion: expression 100 + jaw 3 + eyes 6"}.get(motion_dim, f"{motion_dim} numbers")


def load_reconstructor(path: str, device: torch.device) -> Reconstructor:
    """A :class:`~head4d.models.Reconstructor` in eval mode on ``device`` from a Portrait4D
    reconstructor pickle (its ``G_ema``) or a directory written by :meth:`Reconstructor.save`,
    through :func:`head4d.checkpoints.load`."""
    source = Path(path)
    if not source.exists():
        raise ReenactError(f"--checkpoint {path}: no such file or directory")
    from ..checkpoints import load

    try:
        model = load(source, kind="Reconstructor")
    except (ValueError, TypeError, KeyError, OSError, EOFError, pickle.UnpicklingError) as exc:
        # the unsafe-pickle refusal is an UnpicklingError too; a GenHead checkpoint is a
        # ValueError that names both kinds
        raise ReenactError(f"--checkpoint {path}: not a reconstructor checkpoint head4d can read ({exc}); a "
                           f"GenHead checkpoint goes to --genhead with --synthetic") from exc
    return model.to(device).eval()


def source_motion_of(motion: torch.Tensor, path: Optional[str], motion_dim: int) -> torch.Tensor:
    """The source's motion ``[1, motion_dim]``: from ``--source-motion`` when given, else the
    first row of the motion sequence."""
    if path is None:
        return motion[:1]
    source = load_motion(path, motion_dim, "--source-motion")
    if source.shape[0] != 1:
        raise ReenactError(f"--source-motion {path}: expected one motion vector [{motion_dim}] or [1, {motion_dim}], "
                           f"got {source.shape[0]} rows")
    return source
