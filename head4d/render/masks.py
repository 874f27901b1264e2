"""Portrait4D's part masks and correspondence map, rasterized from a head mesh with
:func:`head4d.ops.rasterize_triangles`.

- Eye mask: where the eyeballs are drawn and the rest of the head is not (the eye
  openings): ``cover(eyeballs) * (1 - cover(head without eyeballs))``, both with
  back-face culling, then blurred (sigma 1).
- Mouth mask: where the whole head is drawn without back-face culling but the head
  without its inner mouth, culled, is not (the open mouth, through which the inner mouth
  shows): ``cover(head, no culling) * (1 - cover(head without inner mouth))``, then
  blurred (sigma 2).
- Correspondence map: the face and eyeball region drawn with each vertex's colour set to
  its canonical position divided by 0.6, with the eyeball vertices' third channel set to
  -0.5.

``cover(faces)`` is 1 at a pixel whose centre a face of the set covers, else 0. A face
belongs to a vertex set when all three of its vertices do. The vertex sets (FLAME's
eyeballs, inner mouth, face region) are data: they are arguments here.

The blur is Portrait4D's: the 1-D kernel ``f_k = 2^(-(k / sigma)^2)`` for ``k`` from
``-floor(3 sigma)`` to ``floor(3 sigma)``, normalised to sum 1, applied along x then y
with :func:`head4d.ops.filter2d` (zero padding, same size).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .._checks import FLOATING, check_tensor
from ..ops._common import values_off_host
from ..ops import filter2d, interpolate, rasterize_triangles
from ..ops.rasterize import _check_faces

#: Blur sigma of the eye and the mouth mask (pixels).
EYE_SIGMA = 1.0
MOUTH_SIGMA = 2.0
#: Canonical vertex positions are divided by this to make the correspondence colours.
CORRESPONDENCE_SCALE = 0.6
#: The third channel of the eyeball vertices' correspondence colour.
EYEBALL_Z = -0.5


def blur_kernel(sigma: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """The 1-D blur ``[2 floor(3 sigma) + 1]`` float32: ``2^(-(k / sigma)^2)``, normalised."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"blur_kernel: sigma must be a finite positive number, got {sigma!r}")
    radius = math.floor(3 * sigma)
    # made on the device itself: a host-to-device copy would break a CUDA graph capture
    k = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    f = torch.exp2(-(k / sigma) ** 2)
    return (f / f.sum()).to(torch.float32)


def blur_mask(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """``mask`` ``[N, C, H, W]`` blurred with :func:`blur_kernel` (separable, zero padding, same size)."""
    return filter2d(mask, blur_kernel(sigma, mask.device))


def faces_within(faces: torch.Tensor, vertices: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """``[F]`` bool: whether all three vertices of each face are in the index set ``vertices``."""
    member = torch.zeros(num_vertices, dtype=torch.bool, device=faces.device)
    member[vertices.to(faces.device).long()] = True
    return member[faces.long()].all(dim=1)


def coverage(vertices_clip: torch.Tensor, faces: torch.Tensor, resolution: Sequence[int], *,
             cull_backfaces: bool, backend: Optional[str] = None) -> torch.Tensor:
    """``[N, 1, H, W]`` float: 1 where a face of ``faces`` covers the pixel centre."""
    face_index, _, _ = rasterize_triangles(vertices_clip, faces, resolution, cull_backfaces=cull_backfaces,
                                           backend=backend)
    return (face_index >= 0).unsqueeze(1).to(torch.float32)


def _index_set(op: str, name: str, value, num_vertices: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name} must be a 1-D int32 / int64 tensor of vertex indices")
    if value.numel() and values_off_host(value):  # traced or captured: no host sync
        torch._assert_async(((value >= 0) & (value < num_vertices)).all(),
                            f"{op}: {name} must hold vertex indices in [0, {num_vertices})")
    elif value.numel() and (int(value.min()) < 0 or int(value.max()) >= num_vertices):
        raise ValueError(f"{op}: {name} must hold vertex indices in [0, {num_vertices}), got "
                         f"[{int(value.min())}, {int(value.max())}]")
    return value


def rasterize_masks(vertices_clip: torch.Tensor, faces: torch.Tensor, resolution: Sequence[int],
                    eyeball_vertices: torch.Tensor, inner_mouth_vertices: torch.Tensor, *,
                    eye_sigma: float = EYE_SIGMA, mouth_sigma: float = MOUTH_SIGMA,
                    backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Portrait4D's eye and mouth masks (module docstring).

    Args:
        vertices_clip: ``[N, V, 4]`` clip-space head vertices (no gradient).
        faces: ``[F, 3]`` the head's faces.
        resolution: ``(H, W)``.
        eyeball_vertices: ``[E]`` indices of the eyeball vertices.
        inner_mouth_vertices: ``[M]`` indices of the inner mouth's vertices.
        eye_sigma, mouth_sigma: blur sigmas in pixels.
        backend: the rasterizer's backend (``None``: the default).

    Returns:
        ``(eye_mask, mouth_mask)``, each ``[N, 1, H, W]`` float32 in ``[0, 1]``.
    """
    op = "rasterize_masks"
    check_tensor(op, "vertices_clip", vertices_clip, "[N, V, 4]", 3, FLOATING)
    v_count = vertices_clip.shape[1]
    _check_faces(op, faces, v_count)
    eyeball_vertices = _index_set(op, "eyeball_vertices", eyeball_vertices, v_count)
    inner_mouth_vertices = _index_set(op, "inner_mouth_vertices", inner_mouth_vertices, v_count)
    eyeball = faces_within(faces, eyeball_vertices, v_count)
    inner_mouth = faces_within(faces, inner_mouth_vertices, v_count)
    cover = lambda subset, cull: coverage(vertices_clip, faces[subset], resolution, cull_backfaces=cull,  # noqa: E731
                                          backend=backend)
    eye = cover(eyeball, True) * (1 - cover(~eyeball, True))
    mouth = cover(torch.ones_like(eyeball), False) * (1 - cover(~inner_mouth, True))
    return blur_mask(eye, eye_sigma), blur_mask(mouth, mouth_sigma)


def correspondence_colours(canonical_vertices: torch.Tensor, eyeball_vertices: torch.Tensor) -> torch.Tensor:
    """``[N, V, 3]`` vertex colours of the correspondence map: canonical positions
    ``[N, V, 3]`` divided by 0.6, the eyeball vertices' third channel -0.5."""
    colours = canonical_vertices / CORRESPONDENCE_SCALE
    colours = colours.clone()
    colours[:, eyeball_vertices.long(), 2] = EYEBALL_Z
    return colours


def correspondence_map(vertices_clip: torch.Tensor, faces: torch.Tensor, resolution: Sequence[int],
                       canonical_vertices: torch.Tensor, face_vertices: torch.Tensor,
                       eyeball_vertices: torch.Tensor, *, background: float = 0.0, cull_backfaces: bool = True,
                       backend: Optional[str] = None) -> torch.Tensor:
    """Portrait4D's correspondence map: the faces within ``face_vertices`` or within
    ``eyeball_vertices`` drawn with :func:`correspondence_colours`, interpolated with
    perspective-correct barycentrics.

    Args:
        vertices_clip: ``[N, V, 4]`` clip-space vertices of the posed head (no gradient).
        faces: ``[F, 3]``.
        resolution: ``(H, W)``.
        canonical_vertices: ``[N, V, 3]`` (or ``[V, 3]``, shared) canonical positions.
        face_vertices, eyeball_vertices: index sets of the face region and the eyeballs.
        background: the value of the pixels no face covers.
        cull_backfaces: skip faces clockwise in NDC.

    Returns:
        ``[N, 3, H, W]`` in the promoted dtype of the canonical vertices and float32.
    """
    op = "correspondence_map"
    check_tensor(op, "vertices_clip", vertices_clip, "[N, V, 4]", 3, FLOATING)
    n, v_count = vertices_clip.shape[0], vertices_clip.shape[1]
    _check_faces(op, faces, v_count)
    face_vertices = _index_set(op, "face_vertices", face_vertices, v_count)
    eyeball_vertices = _index_set(op, "eyeball_vertices", eyeball_vertices, v_count)
    if canonical_vertices.dim() == 2:
        canonical_vertices = canonical_vertices.expand(n, -1, -1)
    if tuple(canonical_vertices.shape) != (n, v_count, 3):
        raise ValueError(f"{op}: canonical_vertices must have shape [N, V, 3] = {[n, v_count, 3]} or [V, 3], "
                         f"got {list(canonical_vertices.shape)}")
    region = faces[faces_within(faces, face_vertices, v_count) | faces_within(faces, eyeball_vertices, v_count)]
    face_index, barycentric, _ = rasterize_triangles(vertices_clip, region, resolution,
                                                     cull_backfaces=cull_backfaces, backend=backend)
    colours = correspondence_colours(canonical_vertices, eyeball_vertices)
    image = interpolate(colours, region, face_index, barycentric)
    image = torch.where((face_index >= 0)[..., None], image, torch.full_like(image, background))
    return image.permute(0, 3, 1, 2)
