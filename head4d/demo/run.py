"""``head4d demo``: an avatar as a turntable and as expression, jaw, eye and neck sweeps.

The subject is either a checkpoint (a Portrait4D network pickle, read by
``head4d.checkpoints.load_network_pkl``, or a directory of head4d's own format, read by
``GenHead.load``): its planes come from the backbone for one random identity, and its
images are the super-resolved ones; or, by default, the built-in procedural head fitted
into a triplane (:mod:`head4d.demo.subject`), rendered raw (no super-resolution: the fitted
colours are already the image). Either way every frame goes through
:meth:`head4d.models.GenHead.render`: the part-wise deformation by the frame's codes, the
eye and mouth masks, the part/head blend and the ray marcher.

Files written to the output directory: one PNG grid per sequence (``turntable.png``,
``expression.png``, ``jaw.png``, ``eyes.png``, ``neck.png``: a row of images, then the
depth maps and the opacity maps beneath them), ``frame.png`` (one frame, image beside
its depth and opacity), and the whole animation (``demo.mp4`` or ``demo.gif``, each frame
the image beside its depth and opacity).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .. import media as images
from ..models._common import MAX_NEURAL_RESOLUTION
from .subject import FitSettings, load_or_fit_subject, subject_model

#: The sequences, in the order rendered and animated.
SEQUENCES = ("turntable", "expression", "jaw", "eyes", "neck")
#: Camera: distance from the origin and normalized focal length (FFHQ's), looking at the origin.
CAMERA_DISTANCE = 4.7
FOCAL = 4.2647
#: Camera yaw of the sweeps (radians, a three-quarter view shows depth).
SWEEP_YAW = 0.35
#: Sweep amplitudes: expression coefficients (units of their standard deviation), jaw opening,
#: eye and neck rotations (radians).
EXPRESSION_AMPLITUDE = 3.0
JAW_OPENING = 0.35
EYE_ROTATION = 0.35
NECK_YAW = 0.5
NECK_PITCH = 0.2
#: Frames rendered per call (each frame is one image of the batch).
FRAMES_PER_BATCH = 4
#: Largest side of an animation frame tile after nearest-neighbour upscaling.
ANIMATION_TILE = 192


class DemoError(RuntimeError):
    """A demo argument or checkpoint that cannot be used (the message says why)."""


def orbit_camera(yaw: torch.Tensor, pitch: float = 0.0, distance: float = CAMERA_DISTANCE,
                 focal: float = FOCAL) -> torch.Tensor:
    """Portrait4D camera labels ``[N, 25]`` float32 (OpenGL cam2world 16 + normalized
    intrinsics 9) on a sphere of ``distance`` about the origin, looking at it; ``yaw [N]``
    about +y from the front (+z), ``pitch`` up."""
    yaw = yaw.to(torch.float32)
    n = yaw.shape[0]
    cp, sp = math.cos(pitch), math.sin(pitch)
    position = distance * torch.stack([torch.sin(yaw) * cp, torch.full_like(yaw, sp), torch.cos(yaw) * cp], dim=1)
    backward = F.normalize(position, dim=1)  # OpenGL: the camera looks along -z
    right = F.normalize(torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0]).expand(n, 3), backward), dim=1)
    up = torch.linalg.cross(backward, right)
    cam2world = torch.eye(4).repeat(n, 1, 1)
    cam2world[:, :3, 0], cam2world[:, :3, 1], cam2world[:, :3, 2], cam2world[:, :3, 3] = right, up, backward, position
    intrinsics = torch.tensor([[focal, 0.0, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]]).repeat(n, 1, 1)
    return torch.cat([cam2world.reshape(n, 16), intrinsics.reshape(n, 9)], dim=1)


def sequence_codes(name: str, base: Dict[str, torch.Tensor], frames: int) -> tuple:
    """``(camera [F, 25], codes {key: [F, *]})`` of sequence ``name`` with ``frames`` frames
    around the ``base`` codes (one row each)."""
    t = torch.arange(frames, dtype=torch.float32) / frames  # one period, not repeating the first frame
    wave = torch.sin(2 * math.pi * t)
    codes = {k: v.expand(frames, -1).clone() for k, v in base.items()}
    camera = orbit_camera(torch.full((frames,), SWEEP_YAW))
    if name == "turntable":
        camera = orbit_camera(2 * math.pi * t)
    elif name == "expression":  # smile and brow raise, then the opposite
        codes["expression"][:, 1] += EXPRESSION_AMPLITUDE * wave
        codes["expression"][:, 2] += EXPRESSION_AMPLITUDE * wave
    elif name == "jaw":
        codes["jaw_pose"][:, 0] += JAW_OPENING * 0.5 * (1 - torch.cos(2 * math.pi * t))
    elif name == "eyes":  # both eyes look left and right
        codes["eye_pose"][:, 1] += EYE_ROTATION * wave
        codes["eye_pose"][:, 4] += EYE_ROTATION * wave
    elif name == "neck":
        codes["neck_pose"][:, 1] += NECK_YAW * wave
        codes["neck_pose"][:, 0] += NECK_PITCH * torch.sin(4 * math.pi * t)
    else:
        raise ValueError(f"sequence_codes: name must be one of {SEQUENCES}, got {name!r}")
    return camera, codes


@dataclass
class Avatar:
    """What the demo renders: a ``model`` (GenHead), its ``planes`` ``[1, 6, C, H, W]``,
    ``ws`` and ``background`` (None for the procedural subject), the ``image_key`` to show
    (``"image"`` with super-resolution, else ``"image_raw"``) and a ``description``."""

    model: torch.nn.Module
    planes: torch.Tensor
    ws: Optional[torch.Tensor]
    background: Optional[torch.Tensor]
    image_key: str
    description: str


def procedural_avatar(device: torch.device, cache_dir: Optional[str], settings: FitSettings,
                      log: Callable[[str], None]) -> Avatar:
    """The fitted procedural subject (fitted now, or read from the cache) on ``device``."""
    start = time.perf_counter()
    subject = load_or_fit_subject(settings, cache_dir, log=log)
    if subject.fit_seconds:
        log(f"fitted the procedural subject in {subject.fit_seconds:.1f} s (CPU, {torch.get_num_threads()} threads); "
            f"cached at {subject.cache_path}")
    else:
        log(f"procedural subject read from the cache {subject.cache_path} ({time.perf_counter() - start:.1f} s)")
    model = subject_model(subject).to(device)
    return Avatar(model, subject.planes.to(device), None, None, "image_raw",
                  "built-in procedural head (fitted triplane, raw renders, no super-resolution)")


def checkpoint_avatar(path: str, device: torch.device, seed: int) -> Avatar:
    """A GenHead from a Portrait4D pickle (file) or head4d's own format (directory), with
    the planes of the identity drawn from ``seed`` (frontal camera, mean shape, psi 0.7)."""
    source = Path(path)
    if not source.exists():
        raise DemoError(f"--checkpoint {path}: no such file or directory")
    try:
        if source.is_dir():
            from ..models import GenHead

            if not hasattr(GenHead, "load"):
                raise ImportError("GenHead.load")
            model = GenHead.load(source)
        else:
            from ..checkpoints import load_network_pkl

            model = load_network_pkl(source)["G_ema"]
    except ImportError as exc:
        kind = "GenHead.load (head4d's own format)" if source.is_dir() else "head4d.checkpoints.load_network_pkl"
        raise DemoError(f"--checkpoint {path}: loading needs {kind}, which this head4d does not have yet "
                        f"({exc}); run without --checkpoint for the built-in subject") from exc
    from ..models import GenHead

    if not isinstance(model, GenHead):
        raise DemoError(f"--checkpoint {path}: holds a {type(model).__name__}, but the demo renders a GenHead "
                        "(a genhead-*.pkl, or a directory written by GenHead.save)")
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(1, model.config.z_dim, generator=generator).to(device)
    camera = orbit_camera(torch.zeros(1)).to(device)
    shape = torch.zeros(1, 300, device=device)
    with torch.no_grad():
        ws = model.mapping(z, model.condition(camera, shape), truncation_psi=0.7, truncation_cutoff=14)
        planes = model.planes(ws)
        background = model.background_image(z)
    key = "image" if model.superresolution is not None else "image_raw"
    return Avatar(model, planes, ws, background, key, f"checkpoint {path} (seed {seed})")


def render_sequence(avatar: Avatar, camera: torch.Tensor, codes: Dict[str, torch.Tensor], resolution: int,
                    seed: int) -> Dict[str, torch.Tensor]:
    """Render the frames of one sequence: ``image`` ``[F, 3, H, W]`` in [0, 1] over white,
    ``depth`` ``[F, 1, r, r]`` and ``opacity`` ``[F, 1, r, r]``."""
    device = avatar.planes.device
    generator = torch.Generator(device=device).manual_seed(seed)
    parts: Dict[str, List[torch.Tensor]] = {"image": [], "depth": [], "opacity": []}
    with torch.no_grad():
        for start in range(0, camera.shape[0], FRAMES_PER_BATCH):
            rows = slice(start, start + FRAMES_PER_BATCH)
            cam = camera[rows].to(device)
            batch_codes = {k: v[rows].to(device) for k, v in codes.items()}
            n = cam.shape[0]
            out = avatar.model.render(avatar.planes, cam, batch_codes, ws=None if avatar.ws is None else
                                      avatar.ws.expand(n, -1, -1), background=avatar.background,
                                      neural_rendering_resolution=resolution, generator=generator)
            opacity = out["opacity"]
            image = (out[avatar.image_key] + 1) / 2
            if avatar.background is None:  # composited over black: put white behind instead
                alpha = F.interpolate(opacity, size=image.shape[-2:], mode="bilinear", align_corners=False)
                image = image + (1 - alpha)
            parts["image"].append(image.clamp(0, 1).cpu())
            parts["depth"].append(out["image_depth"].cpu())
            parts["opacity"].append(opacity.clamp(0, 1).cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def depth_for_display(depth: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """Depth maps ``[F, 1, r, r]`` to [0, 1]: near is bright, over the range of the pixels
    whose opacity exceeds 0.5 in the whole sequence; the background (times opacity) dark."""
    solid = opacity > 0.5
    if not solid.any():
        return torch.zeros_like(depth)
    near, far = depth[solid].min(), depth[solid].max()
    shown = 0.15 + 0.85 * (far - depth) / (far - near).clamp_min(1e-6)
    return (shown.clamp(0, 1) * opacity).clamp(0, 1)


def _upscale(tile: torch.Tensor, size: int) -> torch.Tensor:
    factor = max(1, size // max(tile.shape[-2:]))
    return F.interpolate(tile[None], scale_factor=factor, mode="nearest")[0] if factor > 1 else tile


def run_demo(out_dir: str, *, checkpoint: Optional[str] = None, device: str = "cpu", resolution: int = 64,
             frames: int = 8, cache_dir: Optional[str] = None, settings: FitSettings = FitSettings(),
             seed: int = 0, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Render every sequence and write the files (module docstring).

    Returns a dict: ``files`` (paths written), ``animation`` (its path), ``fps`` (frames
    rendered per second, all sequences together), ``frames`` (rendered), ``device``.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda but no CUDA device is available")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise DemoError(f"--frames must be an int >= 2 (frames per sequence), got {frames!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 8 <= resolution <= MAX_NEURAL_RESOLUTION:
        raise DemoError(f"--resolution must be an int in [8, {MAX_NEURAL_RESOLUTION}] (GenHead's neural rendering "
                        f"resolution, at most its super-resolution's input size), got {resolution!r}")
    torch_device = torch.device(device)
    if checkpoint is None:
        avatar = procedural_avatar(torch_device, cache_dir, settings, log)
    else:
        avatar = checkpoint_avatar(checkpoint, torch_device, seed)
    log(f"subject: {avatar.description}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = {k: v.to(torch.float32).cpu() for k, v in avatar.model.head_model.zero_codes(1).items()}

    written: List[Path] = []
    animation: List[torch.Tensor] = []
    rendered, render_seconds = 0, 0.0
    for index, name in enumerate(SEQUENCES):
        camera, codes = sequence_codes(name, base, frames)
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = render_sequence(avatar, camera, codes, resolution, seed + index)
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        render_seconds += time.perf_counter() - start
        rendered += frames
        depth = depth_for_display(result["depth"], result["opacity"])
        image_tiles = [images.to_uint8(F.interpolate(im[None], size=(resolution, resolution), mode="area")[0])
                       for im in result["image"]]
        depth_tiles = [images.to_uint8(d) for d in depth]
        opacity_tiles = [images.to_uint8(o) for o in result["opacity"]]
        path = out / f"{name}.png"
        images.write_png(path, images.grid([image_tiles, depth_tiles, opacity_tiles]))
        written.append(path)
        for f in range(frames):
            tiles = [_upscale(result["image"][f], ANIMATION_TILE)]
            size = tiles[0].shape[-1]
            tiles += [F.interpolate(t[None], size=(size, size), mode="nearest")[0]
                      for t in (depth[f], result["opacity"][f])]
            animation.append(images.grid([[images.to_uint8(t) for t in tiles]]))
        if name == "turntable":
            path = out / "frame.png"
            images.write_png(path, animation[0])
            written.append(path)
    fps = rendered / render_seconds
    animation_path = images.write_animation(out / "demo", animation, fps=min(12.0, max(4.0, frames / 2)))
    written.append(animation_path)
    device_name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "CPU"
    log(f"rendered {rendered} frames at {resolution}x{resolution} in {render_seconds:.1f} s: {fps:.2f} frames per "
        f"second on {device} ({device_name}, {torch.get_num_threads()} threads)" if torch_device.type == "cpu" else
        f"rendered {rendered} frames at {resolution}x{resolution} in {render_seconds:.1f} s: {fps:.2f} frames per "
        f"second on {device} ({device_name})")
    kind = "MP4" if animation_path.suffix == ".mp4" else "animated GIF (no MP4 encoder importable)"
    log(f"wrote {kind} {animation_path}")
    for path in written[:-1]:
        log(f"wrote {path}")
    return {"files": written, "animation": animation_path, "fps": fps, "frames": rendered, "device": device}
