"""Benchmark cases of ``rasterize_triangles``: the mesh rasterizer behind Portrait4D's
eye and mouth masks and correspondence maps, on a posed head mesh.

The mesh is the built-in :class:`~head4d.head.ProceduralHead` (5,044 vertices, 10,076
faces: FLAME's 5,023 and 9,976 give the same work within 1%), posed with random codes
and turned by a random yaw of up to 0.3 rad per image, seen by Portrait4D's camera
(normalised focal length 4.2647, 2.7 units away, looking at the origin) through an
OpenGL projection.

Work per image of H x W pixels (F faces, about 2 faces cover each pixel of the head):
bytes: vertices read (16 B each), the 64-bit key buffer filled, updated and read
(24 B per pixel), the outputs written (int64 face index, 3 float32 barycentrics and a
float32 depth: 24 B per pixel), so about 48 H W B; at 8 x 512^2 that is 101 MB, 30 us
at an H100's 3.35 TB/s, the floor. FLOPs: about 40 per face set-up, 30 per pixel
tested (each face's bounding box: about 2 H W per image) and 40 per pixel resolved.
"""
from __future__ import annotations

from typing import List

import torch

from ..case import Case, Inputs, Settings, fast_backends, register

FOCAL = 4.2647          # Portrait4D's normalised focal length: NDC scale 2 * FOCAL
CAMERA_DISTANCE = 2.7   # Portrait4D's camera radius
NEAR, FAR = 2.0, 3.5


def _clip_vertices(verts: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """Clip-space ``[N, V, 4]`` of world ``verts`` ``[N, V, 3]`` turned by ``yaw`` ``[N]``
    about y and seen from ``CAMERA_DISTANCE`` along +z (OpenGL projection)."""
    c, s = torch.cos(yaw)[:, None], torch.sin(yaw)[:, None]
    x, y, z = verts.unbind(-1)
    x, z = c * x + s * z, -s * x + c * z
    z = z - CAMERA_DISTANCE  # camera space: the camera looks down -z
    scale = 2 * FOCAL
    a, b = -(FAR + NEAR) / (FAR - NEAR), -2 * FAR * NEAR / (FAR - NEAR)
    return torch.stack([scale * x, scale * y, a * z + b, -z], -1)


@register("rasterize_triangles")
def _rasterize_cases(settings: Settings) -> List[Case]:
    """``rasterize_triangles`` of the posed head, fp32, without culling (the mouth mask's
    render; the others cull and do less).

    GPU: N = 8 at 512^2 (quick: N = 1). CPU: N = 1 at 256^2 (quick: 128^2)."""
    from ...ops.rasterize import PREFERENCES

    device = settings.device
    if device.type == "cuda":
        n, size = (1 if settings.quick else 8), 512
    else:
        n, size = 1, (128 if settings.small else 256)
    return [_head_case(n, size, fast_backends(PREFERENCES, device))]


def _head_case(n: int, size: int, backends) -> Case:
    from ...ops import rasterize_triangles
    from .deformation import _procedural_meshes

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        head, verts, _ = _procedural_meshes(n, device, gen)
        yaw = (torch.rand(n, generator=gen, device=device) * 2 - 1) * 0.3
        return {"vertices_clip": _clip_vertices(verts, yaw), "faces": head.faces}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        face_index, barycentric, depth = rasterize_triangles(inputs["vertices_clip"], inputs["faces"],
                                                             (size, size), backend=backend)
        # one tensor to compare: face indices are exact in float32 below 2^24
        return torch.cat([face_index[..., None].to(barycentric.dtype), barycentric, depth[..., None]], -1)

    faces, verts = 10_076, 5_044
    pixels = n * size * size
    nbytes = n * verts * 16 + faces * 24 + pixels * 48
    flops = n * faces * 40 + pixels * (2 * 30 + 40)
    return Case(
        op="rasterize_triangles",
        shape=f"head_N{n}_{size}x{size}_fp32",
        make_inputs=make_inputs,
        run=run,
        grad_of=(),
        nbytes={"fwd": nbytes},
        flops={"fwd": flops},
        dtype=torch.float32,
        backends=backends,
        passes=("fwd",),
    )


