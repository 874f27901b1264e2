"""``head4d reenact``: re-enact one source image with a sequence of motion vectors through
:class:`~head4d.models.Reconstructor`, streaming the frames to disk.

The source is encoded once (:meth:`~head4d.models.Reconstructor.encode`); the frames are
rendered in batches of ``batch`` (re-enacted triplanes, the ray marcher, the
super-resolution, each timed) and every batch is written before the next is rendered: one
PNG per frame (``frames/00000.png``, ...), with ``depth`` one depth map per frame
(``depth/00000.png``, near bright, on a fixed range around the camera distance so frames
compare), and the animation (``reenact.mp4``, or ``reenact.gif`` where no MP4 encoder is
importable) frame by frame. Nothing is kept per frame, so memory does not grow with the
length of the motion sequence. With ``mesh`` the canonical head is meshed
(``canonical.ply``): the raw density of the canonicalized triplane (re-enactment with
motion scale 0, so the driving motion is switched off) on a grid over the planes' cube,
at Portrait4D's level (25), by :func:`~head4d.reenact.isosurface.marching_tetrahedra`.

With ``neck`` (``[F, 3]`` axis-angle rotations) the head turns on its neck: the sample points
are warped by the reconstructor's neck surface field
(:meth:`~head4d.deform.PartwiseDeformation.warp_neck`), built on the head model posed with
that neck rotation and otherwise zero codes: Portrait4D builds it on the source's FLAME
shape and the driver's expression, which head4d does not estimate, so here the field follows
the head model's mean shape. Portrait4D drives the neck this way with the fixed camera.

The source's motion: Portrait4D computes it from the source image itself (PD-FGC, or the
FLAME fit). Here it is ``--source-motion`` when given, else the first row of the motion
sequence (a sequence extracted from a video whose first frame is the source).

``synthetic`` runs with no files of the user's: GenHead (a checkpoint, or the demo's
built-in procedural subject) renders the source image from a FLAME motion sequence
(expression, jaw and eyes moving; the source is its first frame), and that sequence is
the driving motion of a 109-number (FLAME motion) reconstructor. A 548-number model needs
PD-FGC motion vectors, which head4d cannot compute (no PD-FGC encoder here): the driving
motion is then random (seeded) and the command says so. Without a checkpoint the
reconstructor is built with untrained weights in a small configuration
(:func:`untrained_config`) and the command says that its frames mean nothing.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import media
from .._backend import backend_scope
from ..demo.run import checkpoint_avatar, procedural_avatar, render_sequence
from ..demo.subject import FitSettings
from ..models import Reconstructor, ReconstructorConfig
from ..models.reconstructor import FLAME_MOTION_DIM, PDFGC_MOTION_DIM
from ..ops import sample_triplanes
from .inputs import (ReenactError, load_cameras, load_motion, load_neck_poses, load_reconstructor, load_source_image,
                     motion_kind, portrait_cameras, source_motion_of)
from .isosurface import marching_tetrahedra, write_ply

#: Portrait4D's marching-cubes level on the decoder's raw density, and its grid side.
MESH_LEVEL = 25.0
MESH_RESOLUTION = 128
#: Points per density query of the mesh grid.
MESH_CHUNK = 1 << 18
#: The untrained default (``synthetic`` without a checkpoint): source side, neural rendering
#: resolution, samples per ray (coarse + fine), canonicalization and re-enactment blocks.
UNTRAINED_SOURCE_RESOLUTION = 64
UNTRAINED_RENDER_RESOLUTION = 32
UNTRAINED_SAMPLES = 24
UNTRAINED_BLOCKS = 1
#: The synthetic motion sequence: expression coefficients 1 and 2 (units of their standard
#: deviation), jaw opening and eye rotation (radians); random PD-FGC motion's scale.
EXPRESSION_AMPLITUDE = 2.0
JAW_OPENING = 0.3
EYE_ROTATION = 0.3
RANDOM_MOTION_SCALE = 0.5
#: Largest side of an animation frame tile after nearest-neighbour upscaling.
ANIMATION_TILE = 192


def untrained_config(source_resolution: int = UNTRAINED_SOURCE_RESOLUTION,
                     motion_dim: int = FLAME_MOTION_DIM) -> ReconstructorConfig:
    """The small configuration of the untrained reconstructor: the released widths, but a
    ``source_resolution`` source (64: 4 x 4 canonical tokens, a 32 x 32 triplane), one
    canonicalization and one re-enactment block, 24 + 24 samples per ray, a neural
    rendering resolution of 32 and no super-resolution (its 256- and 128-channel
    convolutions at 256^2 and 512^2 take seconds per frame on a CPU; the frames are the raw
    renders), so that a few frames take seconds on a CPU."""
    return ReconstructorConfig(motion_dim=motion_dim, source_resolution=source_resolution,
                               num_blocks_neutral=UNTRAINED_BLOCKS, num_blocks_motion=UNTRAINED_BLOCKS,
                               depth_resolution=UNTRAINED_SAMPLES, depth_resolution_importance=UNTRAINED_SAMPLES,
                               neural_rendering_resolution=UNTRAINED_RENDER_RESOLUTION, has_superresolution=False)


def synthetic_codes(base: Dict[str, torch.Tensor], frames: int) -> Dict[str, torch.Tensor]:
    """FLAME codes ``{key: [frames, *]}`` float32 of the synthetic sequence around ``base``
    (one row each): a smile and brow raise, the jaw opening and the eyes turning, each a
    different period; frame 0 is ``base`` itself (the source)."""
    t = torch.arange(frames, dtype=torch.float32) / max(frames, 1)
    codes = {k: v.to(torch.float32).expand(frames, -1).clone() for k, v in base.items()}
    codes["expression"][:, 1:3] += EXPRESSION_AMPLITUDE * torch.sin(2 * math.pi * t)[:, None]
    codes["jaw_pose"][:, 0] += JAW_OPENING * 0.5 * (1 - torch.cos(4 * math.pi * t))
    codes["eye_pose"][:, [1, 4]] += EYE_ROTATION * torch.sin(6 * math.pi * t)[:, None]
    return codes


def flame_motion(codes: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The 109-number FLAME motion ``[F, 109]``: expression 100, jaw 3, eyes 6."""
    return torch.cat([codes["expression"][:, :100], codes["jaw_pose"], codes["eye_pose"]], dim=1)


@dataclass
class Timings:
    """Seconds spent per stage (summed over batches) and frames rendered."""

    encode: float = 0.0
    stages: Dict[str, float] = field(default_factory=lambda: {"triplanes": 0.0, "render": 0.0,
                                                               "super-resolution": 0.0, "writing": 0.0})
    frames: int = 0

    def rendering(self) -> float:
        return sum(v for k, v in self.stages.items() if k != "writing")


class _Clock:
    """Wall time of a block, synchronizing CUDA before reading the clock."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def neck_codes(model: Reconstructor, neck_pose: torch.Tensor) -> Dict[str, torch.Tensor]:
    """FLAME codes ``{key: [N, *]}`` for the neck warp: ``neck_pose [N, 3]``, the rest zero,
    in the head model's dtype and on ``neck_pose``'s device."""
    codes = model.head_model.zero_codes(neck_pose.shape[0])
    codes = {k: v.to(neck_pose.device) for k, v in codes.items()}
    codes["neck_pose"] = neck_pose.to(codes["neck_pose"].dtype)
    return codes


def _synthetic_inputs(model: Reconstructor, frames: int, genhead: Optional[str], device: torch.device,
                      cache_dir: Optional[str], settings: FitSettings, seed: int,
                      log: Callable[[str], None]):
    """``(source image [1, 3, S, S] in [-1, 1], motion [F, motion_dim])`` rendered by GenHead."""
    avatar = (procedural_avatar(device, cache_dir, settings, log) if genhead is None
              else checkpoint_avatar(genhead, device, seed))
    log(f"synthetic source: {avatar.description}")
    base = {k: v.to(torch.float32).cpu() for k, v in avatar.model.head_model.zero_codes(1).items()}
    codes = synthetic_codes(base, frames)
    side = model.config.source_resolution
    resolution = min(side, 128) if avatar.image_key == "image_raw" else 64
    first = {k: v[:1] for k, v in codes.items()}
    image = render_sequence(avatar, portrait_cameras(torch.zeros(1)), first, resolution, seed)["image"]
    if image.shape[-1] != side:
        image = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False,
                              antialias=image.shape[-1] > side).clamp(0, 1)
    if model.motion_dim == FLAME_MOTION_DIM:
        motion = flame_motion(codes)
    else:
        generator = torch.Generator().manual_seed(seed)
        motion = RANDOM_MOTION_SCALE * torch.randn(frames, model.motion_dim, generator=generator)
        log(f"note: this reconstructor takes {model.motion_dim}-number motion vectors "
            f"({motion_kind(model.motion_dim)}); head4d has no PD-FGC motion encoder, so the synthetic driving "
            f"motion is random (seed {seed}), not the GenHead sequence")
    return image * 2 - 1, motion


def _depth_image(depth: torch.Tensor, opacity: torch.Tensor, camera: torch.Tensor, box_warp: float) -> torch.Tensor:
    """Depth maps ``[N, 1, r, r]`` to [0, 1] on the fixed range of the planes' cube seen from
    each camera (camera distance -+ half the cube's diagonal): near bright, times opacity."""
    distance = camera[:, :16].reshape(-1, 4, 4)[:, :3, 3].norm(dim=1).to(depth)[:, None, None, None]
    half = box_warp * math.sqrt(3) / 2
    return ((distance + half - depth) / (2 * half)).clamp(0, 1) * opacity.clamp(0, 1)


def _upscale(tile: torch.Tensor, size: int) -> torch.Tensor:
    """``[C, h, w]`` enlarged by an integer factor (nearest) to about ``size``."""
    factor = max(1, size // max(tile.shape[-2:]))
    return F.interpolate(tile[None], scale_factor=factor, mode="nearest")[0] if factor > 1 else tile


def canonical_density(model: Reconstructor, planes: torch.Tensor, resolution: int) -> np.ndarray:
    """The decoder's raw density ``[R, R, R]`` float32 of triplanes ``[1, 3, 32, H, W]`` at the
    points ``-b/2 + b * (i, j, k) / (R - 1)`` (b the config's ``box_warp``; i along x)."""
    box = model.config.box_warp
    axis = torch.linspace(-box / 2, box / 2, resolution, device=planes.device)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(1, -1, 3)
    density = torch.empty(grid.shape[1], device=planes.device)
    with torch.no_grad(), backend_scope(model.backend):
        for start in range(0, grid.shape[1], MESH_CHUNK):
            points = grid[:, start:start + MESH_CHUNK]
            features = sample_triplanes(planes, points, box_warp=box, plane_layout="portrait4d")
            density[start:start + MESH_CHUNK] = model.decoder(features)["sigma"][0, :, 0].float()
    return density.reshape(resolution, resolution, resolution).cpu().numpy()


def run_reenact(out_dir: str, *, checkpoint: Optional[str] = None, source: Optional[str] = None,
                motion: Optional[str] = None, source_motion: Optional[str] = None, camera: str = "fixed",
                neck: Optional[str] = None,
                batch: int = 4, device: str = "cpu", resolution: Optional[int] = None, depth: bool = False,
                mesh: bool = False, mesh_resolution: int = MESH_RESOLUTION, synthetic: bool = False,
                genhead: Optional[str] = None, frames: int = 16,
                source_resolution: int = UNTRAINED_SOURCE_RESOLUTION, motion_dim: int = FLAME_MOTION_DIM,
                cache_dir: Optional[str] = None, settings: FitSettings = FitSettings(), seed: int = 0,
                fps: float = 25.0, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Run the command (module docstring); arguments as the command line's.

    Returns a dict: ``frames`` (rendered), ``frame_files`` (the first and last PNG),
    ``animation`` (its path), ``mesh`` (the .ply or None), ``fps`` (frames per second of
    rendering: triplanes, render and super-resolution), ``timings`` (:class:`Timings`).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ReenactError("--device cuda but no CUDA device is available")
    for name, value, low in (("--batch", batch, 1), ("--frames", frames, 1), ("--mesh-resolution", mesh_resolution, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ReenactError(f"{name} must be an int >= {low}, got {value!r}")
    if synthetic and (source is not None or motion is not None):
        raise ReenactError("--synthetic makes its own source image and motion: leave out --source and --motion")
    if not synthetic and (source is None or motion is None):
        raise ReenactError("--source IMAGE and --motion MOTIONS.npy are needed (or --synthetic, with no files)")
    if not synthetic and checkpoint is None:
        raise ReenactError("--checkpoint is needed (a Portrait4D reconstructor pickle or a Reconstructor.save "
                           "directory); --synthetic runs untrained weights without one")
    if genhead is not None and not synthetic:
        raise ReenactError("--genhead renders the synthetic source: it needs --synthetic")
    torch_device = torch.device(device)
    clock = _Clock(torch_device)

    start = clock.now()
    if checkpoint is not None:
        model = load_reconstructor(checkpoint, torch_device)
        log(f"reconstructor: {checkpoint} (motion {model.motion_dim}: {motion_kind(model.motion_dim)}; source "
            f"{model.config.source_resolution}x{model.config.source_resolution})")
    else:
        if motion_dim not in (FLAME_MOTION_DIM, PDFGC_MOTION_DIM):
            raise ReenactError(f"--motion-dim must be {FLAME_MOTION_DIM} or {PDFGC_MOTION_DIM}, got {motion_dim!r}")
        try:
            config = untrained_config(source_resolution, motion_dim)
            torch.manual_seed(seed)
            model = Reconstructor(config).to(torch_device).eval()
        except ValueError as exc:
            raise ReenactError(f"--source-resolution: {exc}") from exc
        log(f"WARNING: no --checkpoint: the reconstructor has UNTRAINED random weights (seed {seed}), so the frames "
            f"are whatever untrained weights give, not a re-enactment of the source. Small configuration: source "
            f"{config.source_resolution}x{config.source_resolution}, {UNTRAINED_BLOCKS} + {UNTRAINED_BLOCKS} "
            f"transformer blocks, {UNTRAINED_SAMPLES} + {UNTRAINED_SAMPLES} samples, neural resolution "
            f"{UNTRAINED_RENDER_RESOLUTION}, no super-resolution (raw frames)")
    log(f"model ready in {clock.now() - start:.1f} s")

    side = model.config.source_resolution
    if synthetic:
        image, motions = _synthetic_inputs(model, frames, genhead, torch_device, cache_dir, settings, seed, log)
        source_motions = motions[:1]
    else:
        image = load_source_image(source, side)
        motions = load_motion(motion, model.motion_dim)
        source_motions = source_motion_of(motions, source_motion, model.motion_dim)
    count = motions.shape[0]
    cameras = load_cameras(camera, count)
    neck_poses = None if neck is None else load_neck_poses(neck, count)
    r = model.config.neural_rendering_resolution if resolution is None else resolution
    if isinstance(r, bool) or not isinstance(r, int) or not 8 <= r <= 128:
        raise ReenactError(f"--resolution must be an int in [8, 128] (the neural rendering resolution), got {r!r}")

    out = Path(out_dir)
    frame_dir = out / "frames"
    frame_dir.mkdir(parents=True, exist_ok=True)
    if depth:
        (out / "depth").mkdir(exist_ok=True)
    media.write_png(out / "source.png", media.to_uint8((image[0] + 1) / 2))

    timings = Timings(frames=count)
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    with torch.no_grad():
        start = clock.now()
        encoded = model.encode(image.to(torch_device), source_motions.to(torch_device))
        timings.encode = clock.now() - start
        log(f"encoded the source in {timings.encode:.2f} s; rendering {count} frames in batches of {batch} at "
            f"{r}x{r}" + (" with super-resolution" if model.superresolution is not None else ""))
        writer = media.AnimationWriter(out / "reenact", fps)
        try:
            for first in range(0, count, batch):
                rows = slice(first, first + batch)
                cam = cameras[rows].to(torch_device)
                t0 = clock.now()
                planes = model.triplanes(encoded, motions[rows].to(torch_device))
                t1 = clock.now()
                codes = None if neck_poses is None else neck_codes(model, neck_poses[rows].to(torch_device))
                result = model.render(planes, cam, background=encoded.background, codes=codes,
                                      neural_rendering_resolution=r, generator=generator, super_resolve=False)
                t2 = clock.now()
                pictures = (model.superresolve(result["image_raw"], result["image_feature"])
                            if model.superresolution is not None else result["image_raw"])
                t3 = clock.now()
                pictures = ((pictures.float() + 1) / 2).clamp(0, 1).cpu()
                depths = (_depth_image(result["image_depth"], result["opacity"], cam, model.config.box_warp).cpu()
                          if depth else None)
                for i in range(pictures.shape[0]):
                    index = first + i
                    tile = media.to_uint8(pictures[i])
                    media.write_png(frame_dir / f"{index:05d}.png", tile)
                    tiles = [_upscale(pictures[i], ANIMATION_TILE)]
                    if depths is not None:
                        media.write_png(out / "depth" / f"{index:05d}.png", media.to_uint8(depths[i]))
                        size = tiles[0].shape[-2:]
                        tiles.append(F.interpolate(depths[i][None], size=size, mode="nearest")[0])
                    writer.append(media.grid([[media.to_uint8(t) for t in tiles]]))
                t4 = clock.now()
                for name, seconds in (("triplanes", t1 - t0), ("render", t2 - t1), ("super-resolution", t3 - t2),
                                      ("writing", t4 - t3)):
                    timings.stages[name] += seconds
        finally:
            animation = writer.close()

        mesh_path = None
        if mesh:
            start = clock.now()
            canonical = model.triplanes(encoded, source_motions.to(torch_device), motion_scale=0.0)
            density = canonical_density(model, canonical, mesh_resolution)
            box = model.config.box_warp
            vertices, faces = marching_tetrahedra(density, MESH_LEVEL, origin=(-box / 2,) * 3,
                                                  spacing=box / (mesh_resolution - 1))
            mesh_path = out / "canonical.ply"
            write_ply(mesh_path, vertices, faces)
            log(f"meshed the canonical head ({mesh_resolution}^3 density samples, level {MESH_LEVEL:g}): "
                f"{len(vertices)} vertices, {len(faces)} triangles in {clock.now() - start:.1f} s -> {mesh_path}"
                + ("" if len(faces) else " (empty: the density never reaches the level)"))

    seconds = timings.rendering()
    rate = count / seconds if seconds > 0 else float("inf")
    where = (f"{torch.cuda.get_device_name(torch_device)}" if torch_device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    log(f"{count} frames in {seconds:.2f} s: {rate:.2f} frames per second on {device} ({where}), batch {batch}, "
        f"neural resolution {r}")
    stages = {k: v for k, v in timings.stages.items() if k != "super-resolution" or model.superresolution is not None}
    log(f"where the time went: encode {timings.encode:.2f} s once; per frame "
        + ", ".join(f"{name} {1000 * value / count:.1f} ms" for name, value in stages.items())
        + ("" if model.superresolution is not None else " (no super-resolution in this model)"))
    kind = "MP4" if animation.suffix == ".mp4" else "animated GIF (no MP4 encoder importable)"
    log(f"wrote {count} frames to {frame_dir}/" + (f", depth maps to {out / 'depth'}/" if depth else "")
        + f", the {kind} {animation}")
    return {"frames": count, "frame_files": [frame_dir / "00000.png", frame_dir / f"{count - 1:05d}.png"],
            "animation": animation, "mesh": mesh_path, "fps": rate, "timings": timings}
