"""Triangle rasterization for masks and correspondence maps: ``rasterize_triangles``
(a z-buffer giving the visible face, perspective-correct barycentrics and depth at every
pixel) and ``interpolate`` (vertex attributes at the pixels, from those).

Conventions:

- Vertices come in clip space ``(x, y, z, w)``; NDC is ``(x, y, z) / w``, x to the
  right, y up. Image row 0 is at the top (NDC y = +1), column 0 at the left (x = -1);
  pixel centres are at half-integers: pixel (row i, column j) has its centre at
  NDC ``x = -1 + (2j + 1) / W``, ``y = 1 - (2i + 1) / H``.
- A face with any vertex at ``w <= 0`` (behind the camera, or on its plane) is dropped
  whole: no near-plane clipping, so such a face is neither clipped nor wrapped around.
  There is no other depth clipping: a face in front of the camera rasterizes whatever
  its NDC z (outside ``[-1, 1]`` too). A face with a vertex index outside ``[0, V)``
  is dropped as well (the public op raises ``ValueError`` on such faces in eager mode).
- The nearest surface is the smallest NDC z. The depth test compares the depth rounded
  to float32, then the face index: equal depths resolve to the lower face index, on
  every backend and whatever the order the faces are processed in.
- Edge rule: inclusive. A pixel centre exactly on an edge is covered by the face, so a
  centre on an edge shared by two faces belongs to both and the depth test (then the
  lower face index) picks one. Both faces evaluate a shared edge's function the same
  way (from its endpoint first in x, then y order; one of them negates it), so meshes
  are watertight: a centre near a shared edge is never missed by both faces. Zero-area
  faces cover nothing.
- Orientation: a face counter-clockwise in NDC (y up) is front-facing, as in OpenGL.
  ``cull_backfaces=True`` skips the clockwise ones; otherwise both rasterize.
- Barycentrics are perspective-correct: the screen-space weights divided by each
  vertex's ``w``, renormalised to sum to 1. Interpolating vertex attributes with them
  (:func:`interpolate`) is exact for attributes linear in 3-D (camera-space position).
  Depth is the NDC z interpolated with the screen-space weights (it is affine in screen
  space).
- No gradient: the outputs are piecewise constant in the vertices (masks and
  correspondence maps are inputs to the networks, not trained through). Vertices that
  require grad with grad mode on raise an error; pass ``vertices_clip.detach()``.

Backends: ``cpu`` and ``cuda`` (head4d._C, csrc/rasterize/), ``torch`` (the reference,
head4d/reference/rasterize.py). All share the per-pixel arithmetic, operation for
operation, so they pick the same face at every pixel and give the same barycentrics.

Where things live:
    reference   head4d/reference/rasterize.py
    C++ / CUDA  csrc/rasterize/                (rasterize_math.h: the shared math)
    custom op   head4d/ops/_library.py         (``rasterize_triangles``, no gradient)
    tests       tests/test_rasterize.py
    benchmark   head4d/bench/op_cases/rasterize.py
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple

import torch

from .. import _backend
from .._checks import FLOATING, check_bool, check_same_device, check_tensor
from .._nvtx import nvtx_range
from ..reference import rasterize as _reference
from . import _library
from ._common import resolve_implemented, values_off_host

#: Backend preference per device type, fastest first.
PREFERENCES = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "torch"),
}
IMPLEMENTED = ("cpu", "cuda", "torch")
_backend.declare("rasterize_triangles", IMPLEMENTED, PREFERENCES)  # every input on every backend

INTEGER = (torch.int32, torch.int64)


def _check_resolution(op: str, resolution) -> Tuple[int, int]:
    """``(H, W)``: two positive Python ints."""
    if not isinstance(resolution, (tuple, list)) or len(resolution) != 2:
        raise ValueError(f"{op}: resolution must be (H, W), two positive ints, got {resolution!r}")
    values = []
    for name, value in zip(("H", "W"), resolution):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
            raise ValueError(f"{op}: resolution must be (H, W), two positive ints; {name} is {value!r}")
        values.append(int(value))
    if max(values) > (1 << 30):
        raise ValueError(f"{op}: resolution must be at most 2^30 per side, got {tuple(values)}")
    return values[0], values[1]


def _check_faces(op: str, faces, num_vertices: int) -> torch.Tensor:
    """``[F, 3]`` int32 / int64 with every index in ``[0, V)`` (checked on the host in eager
    mode, as a device assert while traced or captured: :func:`values_off_host`)."""
    check_tensor(op, "faces", faces, "[F, 3]", 2, INTEGER)
    if faces.shape[1] != 3:
        raise ValueError(f"{op}: faces must have shape [F, 3], got {list(faces.shape)}")
    if faces.shape[0] >= (1 << 31) - 1:
        raise ValueError(f"{op}: faces must have fewer than 2^31 - 1 rows, got {faces.shape[0]}")
    if faces.numel() and values_off_host(faces):
        torch._assert_async(((faces >= 0) & (faces < num_vertices)).all(),
                            f"{op}: faces must index vertices in [0, {num_vertices}) (V of vertices_clip)")
    elif faces.numel():
        low, high = int(faces.min()), int(faces.max())
        if low < 0 or high >= num_vertices:
            raise ValueError(f"{op}: faces must index vertices in [0, {num_vertices}) (V of vertices_clip), "
                             f"got indices in [{low}, {high}]")
    return faces


def rasterize_triangles(vertices_clip: torch.Tensor, faces: torch.Tensor, resolution: Sequence[int], *,
                        cull_backfaces: bool = False,
                        backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rasterize ``N`` meshes that share ``faces`` into ``H x W`` images (conventions:
    the module docstring).

    Args:
        vertices_clip: ``[N, V, 4]`` clip-space vertices, float16 / bfloat16 / float32 /
            float64 (computed in float32, float64 for float64). Must not require grad
            while grad mode is on (the rasterizer has no gradient).
        faces: ``[F, 3]`` int32 / int64 vertex indices in ``[0, V)``, same device.
        resolution: ``(H, W)``, positive ints.
        cull_backfaces: skip faces that are clockwise in NDC (y up).
        backend: ``"cpu"``, ``"cuda"``, ``"torch"`` (the reference) or ``None``/``"auto"``.

    Returns:
        ``(face_index, barycentric, depth)``: ``[N, H, W]`` int64, the visible face (-1
        where no face covers the pixel centre); ``[N, H, W, 3]`` perspective-correct
        barycentrics of the face's three vertices; ``[N, H, W]`` NDC z. Both float32
        (float64 for float64 vertices), 0 where empty.
    """
    op = "rasterize_triangles"
    check_tensor(op, "vertices_clip", vertices_clip, "[N, V, 4]", 3, FLOATING)
    if vertices_clip.shape[2] != 4:
        raise ValueError(f"{op}: vertices_clip must have shape [N, V, 4] (clip-space x, y, z, w), "
                         f"got {list(vertices_clip.shape)}")
    if vertices_clip.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{op}: the rasterizer has no gradient (its outputs are piecewise constant in the "
                           f"vertices), but vertices_clip requires grad; pass vertices_clip.detach() (or call it "
                           f"under torch.no_grad())")
    if not isinstance(faces, torch.Tensor):
        raise TypeError(f"{op}: faces must be a torch.Tensor of shape [F, 3], got {type(faces).__name__}")
    check_same_device(op, [("vertices_clip", vertices_clip), ("faces", faces)])
    _check_faces(op, faces, vertices_clip.shape[1])
    height, width = _check_resolution(op, resolution)
    check_bool(op, "cull_backfaces", cull_backfaces)
    chosen = resolve_implemented(op, vertices_clip.device, backend, PREFERENCES, IMPLEMENTED)
    with nvtx_range("head4d.rasterize_triangles"):
        if chosen == "torch":
            return _reference.rasterize_triangles(vertices_clip, faces, (height, width), cull_backfaces)
        # head4d::rasterize_triangles: head4d._C's kernels as a custom operator (:mod:`head4d.ops._library`)
        face_index, barycentric, depth = _library.rasterize_triangles(vertices_clip, faces, height, width,
                                                                       cull_backfaces)
        return face_index, barycentric, depth


def interpolate(attributes: torch.Tensor, faces: torch.Tensor, face_index: torch.Tensor,
                barycentric: torch.Tensor) -> torch.Tensor:
    """Vertex attributes at every pixel: ``b0 a[v0] + b1 a[v1] + b2 a[v2]`` with
    ``(v0, v1, v2)`` the pixel's face and ``b`` its barycentrics (from
    :func:`rasterize_triangles`); 0 where ``face_index`` is -1. A gather and a weighted
    sum in PyTorch (no kernel: it is memory-bound and already one pass), differentiable
    w.r.t. ``attributes`` and ``barycentric``.

    Args:
        attributes: ``[N, V, C]`` floating.
        faces: ``[F, 3]`` int32 / int64, the faces that were rasterized.
        face_index: ``[N, H, W]`` int64 in ``[-1, F)``.
        barycentric: ``[N, H, W, 3]`` floating.

    Returns:
        ``[N, H, W, C]`` in the promoted dtype of ``attributes`` and ``barycentric``.
    """
    op = "interpolate"
    check_tensor(op, "attributes", attributes, "[N, V, C]", 3, FLOATING)
    check_tensor(op, "faces", faces, "[F, 3]", 2, INTEGER)
    check_tensor(op, "face_index", face_index, "[N, H, W]", 3, (torch.int64,))
    check_tensor(op, "barycentric", barycentric, "[N, H, W, 3]", 4, FLOATING)
    check_same_device(op, [("attributes", attributes), ("faces", faces), ("face_index", face_index),
                           ("barycentric", barycentric)])
    if faces.shape[1] != 3:
        raise ValueError(f"{op}: faces must have shape [F, 3], got {list(faces.shape)}")
    n, height, width = face_index.shape
    if list(barycentric.shape) != [n, height, width, 3]:
        raise ValueError(f"{op}: barycentric must have shape [N, H, W, 3] = {[n, height, width, 3]} (from "
                         f"face_index), got {list(barycentric.shape)}")
    if attributes.shape[0] != n:
        raise ValueError(f"{op}: attributes must have shape [N, V, C] with N = {n} (from face_index), "
                         f"got {list(attributes.shape)}")
    if not torch.compiler.is_compiling():
        if face_index.numel() and (int(face_index.min()) < -1 or int(face_index.max()) >= faces.shape[0]):
            raise ValueError(f"{op}: face_index must be in [-1, {faces.shape[0]}) (F of faces), got values in "
                             f"[{int(face_index.min())}, {int(face_index.max())}]")
        if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= attributes.shape[1]):
            raise ValueError(f"{op}: faces must index vertices in [0, {attributes.shape[1]}) (V of attributes), "
                             f"got indices in [{int(faces.min())}, {int(faces.max())}]")
    with nvtx_range("head4d.interpolate"):
        return _reference.interpolate(attributes, faces, face_index, barycentric)


__all__: List[str] = ["interpolate", "rasterize_triangles"]
