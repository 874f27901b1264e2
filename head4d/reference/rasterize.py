"""Reference triangle rasterizer (the ``torch`` backend of ``rasterize_triangles``) and
attribute interpolation.

A plain z-buffer: the faces are set up all at once, then, a chunk of faces at a time,
every pixel centre inside each face's bounding box is tested and the depth test keeps,
per pixel, the smallest (depth rounded to float32, face index). Exactness matters here,
speed does not: every floating operation is the one the compiled kernels do
(csrc/rasterize/rasterize_math.h), in the same order, so all backends pick the same face
at every pixel and give the same barycentrics. The conventions are stated in
:mod:`head4d.ops.rasterize`.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

#: Candidate (face, pixel) pairs per chunk at most (bounds the memory of one step).
CHUNK_CANDIDATES = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type the rasterizer computes and returns in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def setup_faces(vertices_clip: torch.Tensor, faces: torch.Tensor, height: int, width: int,
                cull_backfaces: bool) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Screen-space setup of every face of every mesh.

    Args:
        vertices_clip: ``[N, V, 4]`` clip space, float32 or float64 (the computation type).
        faces: ``[F, 3]`` integer.

    Returns:
        ``(setup, live)``: ``setup`` maps ``sx, sy, z, inv_w`` to ``[N, F, 3]`` and
        ``x0, x1, y0, y1`` (the pixel bounding box, inclusive) to ``[N, F]`` int64;
        ``live`` ``[N, F]`` bool is False for a dropped face (an index outside
        ``[0, V)``, a vertex at ``w <= 0``, zero or non-finite area, culled, empty box).
    """
    n, v_count = vertices_clip.shape[:2]
    f_count = faces.shape[0]
    in_range = ((faces >= 0) & (faces < v_count)).all(dim=1)  # [F]
    idx = faces.long().clamp(0, max(v_count - 1, 0))
    if v_count == 0:
        corners = vertices_clip.new_ones((n, f_count, 3, 4))
    else:
        corners = vertices_clip[:, idx.reshape(-1)].reshape(n, f_count, 3, 4)
    x, y, z, w = corners.unbind(-1)
    half_w, half_h = 0.5 * width, 0.5 * height  # exact
    sx = (x / w + 1) * half_w
    sy = (1 - y / w) * half_h
    ndc_z = z / w
    inv_w = 1 / w
    area = (sx[..., 1] - sx[..., 0]) * (sy[..., 2] - sy[..., 0]) - (sx[..., 2] - sx[..., 0]) * (sy[..., 1] - sy[..., 0])
    front = area < 0
    live = in_range[None] & (w > 0).all(dim=-1) & (area != 0) & torch.isfinite(area)
    if cull_backfaces:
        live &= front
    x0 = torch.ceil(sx.amin(-1) - 0.5).nan_to_num(nan=width).clamp(0, width).long()
    x1 = torch.floor(sx.amax(-1) - 0.5).nan_to_num(nan=-1).clamp(-1, width - 1).long()
    y0 = torch.ceil(sy.amin(-1) - 0.5).nan_to_num(nan=height).clamp(0, height).long()
    y1 = torch.floor(sy.amax(-1) - 0.5).nan_to_num(nan=-1).clamp(-1, height - 1).long()
    live &= (x0 <= x1) & (y0 <= y1)
    setup = dict(sx=sx, sy=sy, z=ndc_z, inv_w=inv_w, front=front, x0=x0, x1=x1, y0=y0, y1=y1)
    return setup, live


def edge_functions(sx: torch.Tensor, sy: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` edge functions of pixel centres ``(col + 0.5, row + 0.5)`` for faces
    with screen vertices ``sx, sy`` ``[..., 3]``: entry k is the one of the edge opposite
    vertex k, ``(b - a) x (p - a)`` for ``(a, b) = (k + 1, k + 2) mod 3``, computed as
    ``-((a - b) x (p - b))`` when ``b`` comes before ``a`` in (x, y) order."""
    px = (col.to(sx.dtype) + 0.5)[..., None]
    py = (row.to(sx.dtype) + 0.5)[..., None]
    a, b = [1, 2, 0], [2, 0, 1]
    ax, ay, bx, by = sx[..., a], sy[..., a], sx[..., b], sy[..., b]
    # evaluated from the endpoint first in (x, y) order, negated when that is b: faces
    # sharing an edge get the same value with opposite signs (watertight)
    swapped = (bx < ax) | ((bx == ax) & (by < ay))
    ax, bx = torch.where(swapped, bx, ax), torch.where(swapped, ax, bx)
    ay, by = torch.where(swapped, by, ay), torch.where(swapped, ay, by)
    e = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
    return torch.where(swapped, -e, e)


def coverage(front: torch.Tensor, z: torch.Tensor, e: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(covered, depth)`` of pixels with edge functions ``e`` ``[..., 3]`` of faces
    with orientation ``front`` and NDC depths ``z`` ``[..., 3]`` (inclusive edge rule)."""
    inside = torch.where(front, (e <= 0).all(-1), (e >= 0).all(-1))
    total = (e[..., 0] + e[..., 1]) + e[..., 2]
    depth = ((e[..., 0] * z[..., 0] + e[..., 1] * z[..., 1]) + e[..., 2] * z[..., 2]) / total
    return inside & (total != 0) & torch.isfinite(depth), depth


def perspective_barycentrics(inv_w: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` perspective-correct barycentrics from edge functions ``e``: ``e_k / w_k``, renormalised."""
    p = e * inv_w
    return p / ((p[..., 0] + p[..., 1]) + p[..., 2])[..., None]


def _depth_for_test(depth: torch.Tensor) -> torch.Tensor:
    """The depth the test compares: rounded to float32, -0 made +0."""
    return depth.to(torch.float32) + 0.0


def rasterize_triangles(vertices_clip: torch.Tensor, faces: torch.Tensor, resolution: Tuple[int, int],
                        cull_backfaces: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Z-buffer rasterization of ``N`` meshes sharing ``faces``.

    Args:
        vertices_clip: ``[N, V, 4]`` clip-space vertices, floating.
        faces: ``[F, 3]`` int32 / int64 vertex indices.
        resolution: ``(H, W)``.
        cull_backfaces: skip faces that are clockwise in NDC (y up).

    Returns:
        ``face_index`` ``[N, H, W]`` int64 (-1 where empty), ``barycentric`` ``[N, H, W, 3]``
        (perspective-correct) and ``depth`` ``[N, H, W]`` (NDC z), both float32 (float64
        for float64 vertices), 0 where empty.
    """
    height, width = int(resolution[0]), int(resolution[1])
    dtype = compute_dtype(vertices_clip.dtype)
    vertices = vertices_clip.detach().to(dtype)
    n, f_count = vertices.shape[0], faces.shape[0]
    device = vertices.device
    setup, live = setup_faces(vertices, faces, height, width, cull_backfaces)
    pixels = n * height * width
    best_depth = torch.full((pixels,), float("inf"), dtype=torch.float32, device=device)
    best_face = torch.full((pixels,), f_count, dtype=torch.int64, device=device)

    # candidates: every (mesh, live face) with its bounding-box pixels, a chunk at a time
    mesh_id, face_id = live.nonzero(as_tuple=True)
    box_w = setup["x1"][mesh_id, face_id] - setup["x0"][mesh_id, face_id] + 1
    box_h = setup["y1"][mesh_id, face_id] - setup["y0"][mesh_id, face_id] + 1
    counts = box_w * box_h
    ends = counts.cumsum(0)
    start = 0
    while start < mesh_id.numel():
        first = int(ends[start - 1]) if start > 0 else 0
        stop = int(torch.searchsorted(ends, first + CHUNK_CANDIDATES, right=True))
        stop = max(stop, start + 1)
        sel = torch.arange(start, stop, device=device)
        c = counts[sel]
        owner = torch.repeat_interleave(sel, c)
        offset = torch.arange(int(c.sum()), device=device) - torch.repeat_interleave(ends[sel] - c - first, c)
        m, f = mesh_id[owner], face_id[owner]
        row = setup["y0"][m, f] + offset // box_w[owner]
        col = setup["x0"][m, f] + offset % box_w[owner]
        e = edge_functions(setup["sx"][m, f], setup["sy"][m, f], row, col)
        covered, depth = coverage(setup["front"][m, f], setup["z"][m, f], e)
        pixel = ((m * height + row) * width + col)[covered]
        depth, f = _depth_for_test(depth[covered]), f[covered]
        # the smallest (depth, face) per pixel: the smallest depth, then the lowest face at it
        best_depth_new = best_depth.scatter_reduce(0, pixel, depth, "amin", include_self=True)
        keep_old = best_depth == best_depth_new
        best_face = torch.where(keep_old, best_face, torch.full_like(best_face, f_count))
        at_best = depth == best_depth_new[pixel]
        best_face = best_face.scatter_reduce(0, pixel[at_best], f[at_best], "amin", include_self=True)
        best_depth = best_depth_new
        start = stop

    # resolve: the winner's barycentrics and depth at every covered pixel
    face_index = torch.where(best_face < f_count, best_face, torch.full_like(best_face, -1))
    barycentric = torch.zeros(pixels, 3, dtype=dtype, device=device)
    depth_out = torch.zeros(pixels, dtype=dtype, device=device)
    hit = (face_index >= 0).nonzero(as_tuple=True)[0]
    if hit.numel():
        m, f = hit // (height * width), face_index[hit]
        row, col = (hit // width) % height, hit % width
        e = edge_functions(setup["sx"][m, f], setup["sy"][m, f], row, col)
        _, depth = coverage(setup["front"][m, f], setup["z"][m, f], e)
        barycentric[hit] = perspective_barycentrics(setup["inv_w"][m, f], e)
        depth_out[hit] = depth
    return (face_index.reshape(n, height, width), barycentric.reshape(n, height, width, 3),
            depth_out.reshape(n, height, width))


def interpolate(attributes: torch.Tensor, faces: torch.Tensor, face_index: torch.Tensor,
                barycentric: torch.Tensor) -> torch.Tensor:
    """Vertex attributes interpolated at each pixel with its barycentrics.

    Args:
        attributes: ``[N, V, C]`` floating.
        faces: ``[F, 3]`` integer.
        face_index: ``[N, H, W]`` int64, -1 where empty.
        barycentric: ``[N, H, W, 3]`` floating.

    Returns:
        ``[N, H, W, C]`` in the promoted dtype of ``attributes`` and ``barycentric``:
        ``b0 a[v0] + b1 a[v1] + b2 a[v2]`` with ``(v0, v1, v2)`` the pixel's face, 0
        where empty. Differentiable w.r.t. ``attributes`` and ``barycentric``.
    """
    n, height, width = face_index.shape
    channels = attributes.shape[-1]
    dtype = torch.promote_types(attributes.dtype, barycentric.dtype)
    covered = face_index >= 0
    if faces.shape[0] == 0:  # nothing can be covered
        return torch.zeros((n, height, width, channels), dtype=dtype, device=attributes.device)
    corner = faces.long()[face_index.clamp(min=0)]  # [N, H, W, 3]
    gathered = torch.gather(attributes.to(dtype), 1,
                            corner.reshape(n, -1, 1).expand(-1, -1, channels))  # [N, H*W*3, C]
    gathered = gathered.reshape(n, height, width, 3, channels)
    b = barycentric.to(dtype)
    out = (b[..., 0, None] * gathered[..., 0, :] + b[..., 1, None] * gathered[..., 1, :]) + \
        b[..., 2, None] * gathered[..., 2, :]
    return torch.where(covered[..., None], out, torch.zeros((), dtype=dtype, device=out.device))
