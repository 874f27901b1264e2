"""The demo's subject without a checkpoint: a triplane and a decoder fitted to the built-in
:class:`~head4d.head.ProceduralHead`'s canonical surface.

What is fitted, once (then cached on disk): the head triplane ``[1, 3, C, R, R]`` and a
:class:`~head4d.render.TriplaneDecoder` of GenHead's form (``variant="portrait4d"``), so
that at a canonical point x

* the raw density (before the ray marcher's ``softplus(sigma - 1)``) follows the signed
  distance d(x) of the canonical head (the closed head surface united with the two
  eyeball spheres): ``clamp(-DENSITY_SLOPE * d, DENSITY_MIN, DENSITY_MAX)``, so the
  surface is the density's rise over about a centimetre;
* the first three features (the decoder's sigmoid colours) are a procedural colouring of
  the closest surface point: skin, hair on the crown and the back, red lips, white
  eyeballs with a blue iris and a dark pupil, times a fixed Lambert shading baked into
  canonical space.

Training points (:func:`training_pool`): near the surface (mesh vertices plus Gaussian
offsets), around the head, and in and around the ``box_warp`` cube; their targets come
from :func:`head4d.ops.closest_triangles` (exact closest triangle; the sign from the vertex
normals at the closest point, the colour from the closest face's barycentric mix of
vertex colours). The loss is a squared error on the density (fitted divided by its range
``DENSITY_MAX - DENSITY_MIN``; the decoder's density layer is multiplied by it at the end,
so the small output layer need not grow large weights), overshoots outside weighed more,
plus an absolute error on the colours of near-surface points; Adam with a cosine decay, a
few hundred steps, seeded, so the fit is deterministic on one machine.

The part triplane (eyes and mouth share it in GenHead) gets the same planes: the eye and
mouth warps map to the same canonical space, so the part reads see the same head.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..head import ProceduralHead
from ..models import GenHead, GenHeadConfig
from ..ops import closest_triangles, sample_triplanes
from ..render import TriplaneDecoder

#: Bump when the fitting or the colouring changes: it keys the on-disk cache.
SUBJECT_VERSION = "procedural-subject-3"

#: Raw density target: ``clamp(-DENSITY_SLOPE * signed_distance, DENSITY_MIN, DENSITY_MAX)``
#: (world units: the canonical head is about 1 unit tall).
DENSITY_SLOPE = 1000.0
DENSITY_MIN = -10.0
DENSITY_MAX = 30.0
#: Weight of a density above the target where the target is :data:`DENSITY_MIN` (outside).
OUTSIDE_OVERSHOOT_WEIGHT = 4.0
#: Points closer than this to the surface carry a colour target.
COLOUR_BAND = 0.03
#: Standard deviation of the near-surface training points' offsets.
SURFACE_NOISE = 0.02
#: Side of the cube of the uniform training points, in units of the planes' cube.
OUTER_SCALE = 1.3
#: Margin around the head's bounding box of the second group of training points.
BOUNDS_MARGIN = 0.08

SKIN = (0.86, 0.66, 0.54)
HAIR = (0.23, 0.15, 0.10)
LIPS = (0.72, 0.30, 0.32)
SCLERA = (0.93, 0.93, 0.90)
IRIS = (0.25, 0.42, 0.65)
PUPIL = (0.05, 0.05, 0.06)
#: Baked light direction (canonical space: +x the head's left, +y up, +z forward).
LIGHT = (0.35, 0.55, 1.0)
AMBIENT = 0.4


@dataclass(frozen=True)
class FitSettings:
    """How the subject is fitted: ``plane_resolution`` R and ``plane_features`` C of the
    triplane, the decoder's ``hidden`` width, ``steps`` of Adam with ``batch`` points each
    from a pool of ``pool`` points, the learning rates and the ``seed``."""

    plane_resolution: int = 128
    plane_features: int = 16
    hidden: int = 64
    steps: int = 300
    batch: int = 8192
    pool: int = 200_000
    lr_planes: float = 0.1
    lr_decoder: float = 0.01
    seed: int = 0

    def key(self) -> str:
        """A short hash of the settings and :data:`SUBJECT_VERSION` (the cache key)."""
        text = json.dumps({"version": SUBJECT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Subject:
    """A fitted subject: ``planes`` ``[1, 6, C, R, R]`` float32 (part triplane then head
    triplane, GenHead's order), ``decoder_state`` (the state dict of the ``decoder`` of a
    GenHead with :func:`demo_config`), the ``settings``, ``fit_seconds`` (0 when read from the
    cache) and ``cache_path`` (None when not cached)."""

    planes: torch.Tensor
    decoder_state: Dict[str, torch.Tensor]
    settings: FitSettings
    fit_seconds: float
    cache_path: Optional[Path]


def demo_config(settings: FitSettings, **overrides) -> GenHeadConfig:
    """The GenHead config the procedural subject renders with: planes and decoder of the
    fitted sizes, no background, no super-resolution (the raw renders are the output), a
    small unused backbone (the planes are fitted, not generated), Portrait4D's rendering
    options otherwise; ``overrides`` replace fields (e.g. ``depth_resolution``)."""
    args = dict(z_dim=64, w_dim=64, channel_base=256, channel_max=16,
                triplane_resolution=settings.plane_resolution, triplane_channels=6 * settings.plane_features,
                has_background=False, has_superresolution=False, decoder_hidden=settings.hidden,
                mask_resolution=128)
    args.update(overrides)
    return GenHeadConfig(**args)


# ---------------------------------------------------------------------------- targets
def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals ``[V, 3]`` of ``vertices [V, 3]``, ``faces [F, 3]``."""
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    face_normals = torch.linalg.cross(v1 - v0, v2 - v0)
    normals = torch.zeros_like(vertices).index_add_(0, faces.reshape(-1), face_normals.repeat_interleave(3, 0))
    return F.normalize(normals, dim=1)


def eyeball_spheres(head: ProceduralHead, vertices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Centres ``[2, 3]`` and radii ``[2]`` of the two eyeballs of ``vertices [V, 3]``."""
    centres, radii = [], []
    for indices in (head.left_eye_indices, head.right_eye_indices):
        ball = vertices[indices]
        centre = ball.mean(0)
        centres.append(centre)
        radii.append((ball - centre).norm(dim=1).mean())
    return torch.stack(centres), torch.stack(radii)


def vertex_colours(head: ProceduralHead, vertices: torch.Tensor) -> torch.Tensor:
    """The procedural colouring ``[V, 3]`` in [0, 1] of the canonical ``vertices [V, 3]``:
    skin, hair above the brow and on the back of the head, lips, eyeballs (sclera, iris,
    pupil by the angle from the eyeball's forward axis), times the baked Lambert shading."""
    colours = torch.tensor(SKIN).expand_as(vertices).clone()
    centres, radii = eyeball_spheres(head, vertices)
    eye_height, eye_front = centres[:, 1].mean(), centres[:, 2].mean()
    x, y, z = vertices.unbind(1)
    # hair: the crown above the brow, and the back of the skull above the ears
    crown = y > eye_height + 0.12 + 0.25 * (z - eye_front).clamp_min(0)
    back = (z < eye_front - 0.3) & (y > eye_height - 0.1 - 0.4 * (eye_front - 0.3 - z))
    is_head = torch.zeros(len(vertices), dtype=torch.bool)
    is_head[head.head_indices] = True
    colours[(crown | back) & is_head] = torch.tensor(HAIR)
    colours[head.lips_indices] = torch.tensor(LIPS)
    for indices, centre, radius in zip((head.left_eye_indices, head.right_eye_indices), centres, radii):
        forward = (vertices[indices, 2] - centre[2]) / radius  # cosine of the angle from +z
        eye = torch.tensor(SCLERA).expand(len(indices), 3).clone()
        eye[forward > math.cos(0.55)] = torch.tensor(IRIS)
        eye[forward > math.cos(0.25)] = torch.tensor(PUPIL)
        colours[indices] = eye
    light = F.normalize(torch.tensor(LIGHT), dim=0)
    shade = AMBIENT + (1 - AMBIENT) * (vertex_normals(vertices, head.faces) @ light).clamp_min(0)
    return (colours * shade[:, None]).clamp(0, 1)


def signed_distance(points: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Signed distance ``[M]`` (negative inside) of ``points [M, 3]`` to the closed mesh
    ``(vertices [V, 3], faces [F, 3])``: the exact distance to the closest triangle, with
    the sign of ``<x - q, n>`` where q is the closest triangle's point at the clamped
    barycentrics and n the vertex normals mixed there. (The closest face's own normal
    gives the wrong sign beside some edges and corners, where the point is closest to a
    feature that the face shares with a neighbour facing another way.)"""
    face, barycentric, _, squared = closest_triangles(points[None], vertices[None], faces)
    corners = faces[face[0]]  # [M, 3]
    weights = barycentric[0].clamp_min(0)
    weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
    nearest = (vertices[corners] * weights[..., None]).sum(1)
    normal = (vertex_normals(vertices, faces)[corners] * weights[..., None]).sum(1)
    side = torch.where(((points - nearest) * normal).sum(1) < 0, -1.0, 1.0)
    return side * squared[0].clamp_min(0).sqrt()


def surface_targets(head: ProceduralHead, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Signed distance ``[M]`` (negative inside) and colour ``[M, 3]`` of canonical ``points [M, 3]``.

    The distance is the smaller of the closed head surface's (:func:`signed_distance`) and
    the two eyeball spheres'; the colour is the closest face's (of the whole
    mesh) barycentric mix of :func:`vertex_colours`, barycentrics clamped to the triangle.
    """
    vertices = head.canonical_vertices()
    faces = head.faces
    head_faces = faces[(faces < head.head_vertices).all(dim=1)]
    with torch.no_grad():
        head_distance = signed_distance(points, vertices, head_faces)
        centres, radii = eyeball_spheres(head, vertices)
        eye_distance = ((points[:, None] - centres[None]).norm(dim=-1) - radii).amin(dim=1)
        distance = torch.minimum(head_distance, eye_distance)
        face, barycentric, _, _ = closest_triangles(points[None], vertices[None], faces)
        weights = barycentric[0].clamp_min(0)
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
        colour = (vertex_colours(head, vertices)[faces[face[0]]] * weights[..., None]).sum(1)
    return distance, colour


def training_pool(head: ProceduralHead, size: int, box_side: float, generator: torch.Generator) -> torch.Tensor:
    """``[size, 3]`` canonical points: 40% near the surface, 30% uniform in the head's bounding
    box grown by :data:`BOUNDS_MARGIN` (where a triplane's ghosts appear: points whose three
    projections all fall on the head), 30% uniform in a cube :data:`OUTER_SCALE` times the
    planes' (rays sample beyond the planes, where some or all plane reads are zero: the
    decoder must give no density there either)."""
    vertices = head.canonical_vertices()
    near, bounded = int(0.4 * size), int(0.3 * size)
    picks = torch.randint(len(vertices), (near,), generator=generator)
    surface = vertices[picks] + SURFACE_NOISE * torch.randn(near, 3, generator=generator)
    low, high = vertices.amin(0) - BOUNDS_MARGIN, vertices.amax(0) + BOUNDS_MARGIN
    around = low + (high - low) * torch.rand(bounded, 3, generator=generator)
    inner = torch.cat([surface, around]).clamp(-box_side / 2, box_side / 2)
    uniform = (torch.rand(size - near - bounded, 3, generator=generator) - 0.5) * (OUTER_SCALE * box_side)
    return torch.cat([inner, uniform])


def density_target(distance: torch.Tensor) -> torch.Tensor:
    """The raw density target of signed distances (module docstring)."""
    return (-DENSITY_SLOPE * distance).clamp(DENSITY_MIN, DENSITY_MAX)


# ---------------------------------------------------------------------------- fitting
def fit_subject(settings: FitSettings = FitSettings(), head: Optional[ProceduralHead] = None,
                log: Optional[Callable[[str], None]] = None) -> Subject:
    """Fit the head triplane and the decoder to the canonical procedural head (module
    docstring), on the CPU; returns an uncached :class:`Subject`."""
    start = time.perf_counter()
    head = ProceduralHead() if head is None else head
    config = demo_config(settings)
    box_side = config.box_warp
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    pool = training_pool(head, settings.pool, box_side, generator)
    distance, colour = surface_targets(head, pool)
    density = density_target(distance)
    coloured = distance.abs() < COLOUR_BAND
    targets_seconds = time.perf_counter() - start

    res, c = settings.plane_resolution, settings.plane_features
    planes = (0.01 * torch.randn(1, 3, c, res, res, generator=generator)).requires_grad_(True)
    decoder = TriplaneDecoder(c, settings.hidden, c, variant="portrait4d")
    optimizer = torch.optim.Adam([{"params": [planes], "lr": settings.lr_planes},
                                  {"params": decoder.parameters(), "lr": settings.lr_decoder}])
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps, eta_min=0.0)
    scale = DENSITY_MAX - DENSITY_MIN
    for step in range(settings.steps):
        batch = torch.randint(len(pool), (settings.batch,), generator=generator)
        features = sample_triplanes(planes, pool[batch][None], box_warp=box_side, plane_layout="portrait4d")
        out = decoder(features)
        target = density[batch]
        error = out["sigma"][0, :, 0] - target / scale
        # density left outside the head shows as haze: weigh overshoots there more
        weight = 1 + (OUTSIDE_OVERSHOOT_WEIGHT - 1) * ((target <= DENSITY_MIN) & (error > 0)).float()
        sigma_loss = (weight * error.square()).mean()
        mask = coloured[batch]
        colour_loss = (out["rgb"][0, mask, :3] - colour[batch][mask]).abs().mean() if mask.any() else planes.new_zeros(())
        loss = sigma_loss + colour_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay.step()
        if log is not None and (step % 100 == 0 or step == settings.steps - 1):
            log(f"  fit step {step + 1:4d}/{settings.steps}: density {sigma_loss.item():.2e}, "
                f"colour {colour_loss.item():.3f}")
    seconds = time.perf_counter() - start
    if log is not None:
        log(f"  targets {targets_seconds:.1f} s, fit {seconds - targets_seconds:.1f} s")
    with torch.no_grad():  # the density was fitted in units of ``scale``: scale the output layer back
        decoder.out_sigma.weight.mul_(scale)
        decoder.out_sigma.bias.mul_(scale)
    head_planes = planes.detach()
    six = torch.cat([head_planes, head_planes], dim=1).contiguous()
    state = {k: v.detach().clone() for k, v in decoder.state_dict().items()}
    return Subject(planes=six, decoder_state=state, settings=settings, fit_seconds=seconds, cache_path=None)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/head4d`` (``~/.cache/head4d`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "head4d"


def load_or_fit_subject(settings: FitSettings = FitSettings(), cache_dir: Optional[os.PathLike] = None,
                        head: Optional[ProceduralHead] = None,
                        log: Optional[Callable[[str], None]] = None) -> Subject:
    """The fitted subject from ``cache_dir`` (default :func:`default_cache_dir`) when a fit
    with the same settings and :data:`SUBJECT_VERSION` is there, else fitted now and saved."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"demo-subject-{settings.key()}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("version") == SUBJECT_VERSION:
                return Subject(planes=saved["planes"], decoder_state=saved["decoder"], settings=settings,
                               fit_seconds=0.0, cache_path=path)
        except (OSError, RuntimeError, KeyError, AttributeError) as exc:
            if log is not None:
                log(f"  cached subject {path} unreadable ({exc}); fitting again")
    subject = fit_subject(settings, head, log)
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"version": SUBJECT_VERSION, "settings": dataclasses.asdict(settings), "planes": subject.planes,
                "decoder": subject.decoder_state}, partial)
    os.replace(partial, path)
    subject.cache_path = path
    return subject


def subject_model(subject: Subject, head: Optional[ProceduralHead] = None, **config_overrides) -> GenHead:
    """A :class:`~head4d.models.GenHead` (:func:`demo_config`) holding the subject's decoder, in eval mode."""
    model = GenHead(demo_config(subject.settings, **config_overrides), head_model=head)
    model.decoder.load_state_dict(subject.decoder_state)
    return model.eval()
