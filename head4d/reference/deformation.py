"""Reference deformation ops: closest triangles, the surface field on a voxel grid,
trilinear grid sampling, box smoothing, one-ring tables and one-ring deformation,
as plain PyTorch (Portrait4D's deformation, ``docs/design.md``, "The deformation of
sample points").

Arguments are assumed valid; :mod:`head4d.ops.deformation` checks them.

Memory. The brute-force searches (every point against every triangle, every point
against every candidate vertex) run over chunks of points so that one chunk holds
about :data:`PAIRS_PER_CHUNK` ``[device type]`` (point, triangle) or (point, vertex)
pairs: 2^18 on CPU (each ``[P, F]`` temporary is 1 MB in float32, so a chunk stays in
cache and peaks at a few tens of MB) and 2^22 on CUDA (16 MB temporaries, a few
hundred MB at peak, few enough kernel launches). The footprint is the same whatever
the problem size: 24^3 grid points x 1,400 triangles, 128^3 x 10 k or 1.57 M points x
4 k vertices only take more chunks. The search runs without autograd; the values
returned for the chosen triangle / vertex ring are then recomputed with autograd on
the gathered ``[M]``-sized data, so gradients cost memory in proportion to the
outputs only. The one-ring sum is chunked the same way (``[P, K, 3]`` temporaries).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

#: (point, triangle) or (point, vertex) pairs per chunk of the brute-force searches, per
#: device type (others use the "default" entry). Edit the dict to trade memory for
#: fewer Python-level iterations.
PAIRS_PER_CHUNK = {"cpu": 1 << 18, "cuda": 1 << 22, "default": 1 << 20}

#: Lower clamp of the barycentric determinant ``d00 * d11 - d01^2`` (Portrait4D's value).
BARYCENTRIC_DET_MIN = 1e-12

#: The term added to squared distances in the one-ring weights (Portrait4D's value).
ONE_RING_EPS = 1e-10


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk(device: torch.device, width: int) -> int:
    """Points per chunk when each point meets ``width`` triangles / vertices."""
    pairs = PAIRS_PER_CHUNK.get(device.type, PAIRS_PER_CHUNK["default"])
    return max(1, pairs // max(width, 1))


def cell_centre_bound(resolution: int, box_side: float) -> float:
    """The ``bound`` whose inclusive grid ``linspace(-bound, bound, resolution)`` is the
    cell centres of a ``resolution``-cell partition of ``[-box_side/2, box_side/2]``:
    ``box_side / 2 * (1 - 1 / resolution)``."""
    return box_side / 2.0 * (1.0 - 1.0 / resolution)


# ----------------------------------------------------------------------------------
# point-triangle distance
# ----------------------------------------------------------------------------------

def _triangle_data(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                   ia: torch.Tensor, ib: torch.Tensor, ic: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-triangle quantities for :func:`_sq_dist`, from the corners ``a, b, c``
    ``[..., 3]`` and their vertex indices ``ia, ib, ic`` ``[...]``.

    Each edge is parameterized from its lower-indexed vertex to its higher-indexed
    one, so two faces sharing an edge compute bitwise-identical edge distances (and
    a tie between them goes to the lower face index).
    """
    eps = torch.finfo(a.dtype).eps
    n = torch.cross(b - a, c - a, dim=-1)
    nn = (n * n).sum(-1)
    e0, e1 = b - a, c - a
    scale = (e0 * e0).sum(-1) * (e1 * e1).sum(-1)
    # |n|^2 = |e0|^2 |e1|^2 sin^2(angle at a). With sin^2 > eps (sin > 3.5e-4 in float32,
    # 1.5e-8 in float64) the normal is well defined; below that (zero-area and sliver
    # triangles) only the corners and edges count, which is exact for zero area.
    interior_ok = nn > eps * scale
    nn_safe = torch.where(interior_ok, nn, torch.ones_like(nn))
    data = {"a": a, "b": b, "c": c, "n": n, "nn": nn_safe, "interior_ok": interior_ok,
            # inward edge normals in the triangle's plane
            "m0": torch.cross(n, b - a, dim=-1), "m1": torch.cross(n, c - b, dim=-1),
            "m2": torch.cross(n, a - c, dim=-1)}
    for k, (p, q, ip, iq) in enumerate(((a, b, ia, ib), (b, c, ib, ic), (c, a, ic, ia))):
        swap = (ip > iq).unsqueeze(-1)
        origin = torch.where(swap, q, p)
        end = torch.where(swap, p, q)
        e = end - origin
        ee = e[..., 0] * e[..., 0] + e[..., 1] * e[..., 1] + e[..., 2] * e[..., 2]
        data[f"o{k}"] = origin
        data[f"e{k}"] = e
        data[f"ee{k}"] = torch.where(ee > 0, ee, torch.ones_like(ee))
        data[f"edge_ok{k}"] = ee > 0
    return data


def _sq_dist(px: torch.Tensor, py: torch.Tensor, pz: torch.Tensor, t: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Exact squared point-triangle distance, broadcasting point components against
    the triangle data of :func:`_triangle_data` (indexed ``[..., component]``).

    The minimum over the three corners (``|p - v|^2``), the three open edges (where
    the projection parameter lies strictly inside the edge) and, when the
    projection onto the plane falls inside the triangle (all three inward edge
    tests >= 0) and the triangle is not degenerate, the plane distance
    ``((p - a) . n)^2 / |n|^2``. Zero-length edges and zero-area triangles reduce to
    their corners and edges, so nothing divides by zero.
    """
    def comp(name, i):
        return t[name][..., i]

    inf = torch.full((), float("inf"), dtype=px.dtype, device=px.device)

    def vec_sub(name):
        return px - comp(name, 0), py - comp(name, 1), pz - comp(name, 2)

    def dot(u, name):
        return u[0] * comp(name, 0) + u[1] * comp(name, 1) + u[2] * comp(name, 2)

    def sq(u):
        return u[0] * u[0] + u[1] * u[1] + u[2] * u[2]

    qa, qb, qc = vec_sub("a"), vec_sub("b"), vec_sub("c")
    best = torch.minimum(torch.minimum(sq(qa), sq(qb)), sq(qc))
    for k in range(3):
        q = vec_sub(f"o{k}")
        s = dot(q, f"e{k}") / t[f"ee{k}"]
        r = (q[0] - s * comp(f"e{k}", 0), q[1] - s * comp(f"e{k}", 1), q[2] - s * comp(f"e{k}", 2))
        inside = (s > 0) & (s < 1) & t[f"edge_ok{k}"]
        best = torch.minimum(best, torch.where(inside, sq(r), inf))
    inside = (dot(qa, "m0") >= 0) & (dot(qb, "m1") >= 0) & (dot(qc, "m2") >= 0) & t["interior_ok"]
    h = dot(qa, "n")
    best = torch.minimum(best, torch.where(inside, h * h / t["nn"], inf))
    return best


def _barycentric(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Barycentrics ``[..., 3]`` of the orthogonal projection of ``p`` onto the plane of
    ``(a, b, c)``: the standard dot-product formula with the determinant clamped
    to >= :data:`BARYCENTRIC_DET_MIN`."""
    v0, v1, v2 = b - a, c - a, p - a
    d00 = (v0 * v0).sum(-1)
    d01 = (v0 * v1).sum(-1)
    d11 = (v1 * v1).sum(-1)
    d20 = (v2 * v0).sum(-1)
    d21 = (v2 * v1).sum(-1)
    det = (d00 * d11 - d01 * d01).clamp(min=BARYCENTRIC_DET_MIN)
    v = (d11 * d20 - d01 * d21) / det
    w = (d00 * d21 - d01 * d20) / det
    return torch.stack([1.0 - v - w, v, w], dim=-1)


def _unit_normal(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``cross(b - a, c - a)`` normalized (``F.normalize``: zero for a zero-area triangle)."""
    return F.normalize(torch.cross(b - a, c - a, dim=-1), dim=-1)


def closest_triangles(points: torch.Tensor, verts: torch.Tensor, faces: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every point, the closest triangle of the mesh ``(verts, faces)``.

    The search is exact brute force (every point against every triangle, in chunks of
    :data:`PAIRS_PER_CHUNK` pairs) on the exact point-triangle distance
    (:func:`_sq_dist`); ties in the computed distance go to the lowest face index.
    For the chosen face ``(v1, v2, v3)``: ``barycentric`` of the orthogonal
    projection onto its plane (:func:`_barycentric`; may be negative when the
    closest feature is an edge or a corner), ``signed_distance = <x - sum_i b_i v_i, n>``
    with ``n`` the unit normal of ``cross(v2 - v1, v3 - v1)`` (0 for a zero-area
    triangle) and ``squared_distance`` the squared point-triangle distance.

    Args:
        points: ``[N, M, 3]`` floating point.
        verts: ``[N, V, 3]``, same dtype.
        faces: ``[F, 3]`` int32 / int64 vertex indices in ``[0, V)``.

    Returns:
        ``(face_index [N, M] int64, barycentric [N, M, 3], signed_distance [N, M],
        squared_distance [N, M])``, the floating outputs in ``points.dtype``, computed in
        float32 (float64 for float64). Differentiable w.r.t. ``points`` and ``verts``
        for the chosen faces (the choice itself is piecewise constant).
    """
    dtype = points.dtype
    compute = _compute(dtype)
    n_batch, m = points.shape[0], points.shape[1]
    faces = faces.long()
    n_faces = faces.shape[0]
    pts = points.to(compute)
    vts = verts.to(compute)
    ia, ib, ic = faces[:, 0], faces[:, 1], faces[:, 2]
    chunk = _chunk(points.device, n_faces)

    outs = []  # per batch element: (face_index [M], barycentric [M, 3], signed [M], squared [M])
    for i in range(n_batch):
        v = vts[i]
        with torch.no_grad():
            tri = _triangle_data(v[ia].detach(), v[ib].detach(), v[ic].detach(), ia, ib, ic)
            tri = {k: val.unsqueeze(0) for k, val in tri.items()}  # [1, F, ...]
        pieces = []
        for s in range(0, m, chunk):
            p = pts[i, s:s + chunk]  # [P, 3]
            with torch.no_grad():
                pd = p.detach()
                d2 = _sq_dist(pd[:, 0:1], pd[:, 1:2], pd[:, 2:3], tri)  # [P, F]
                index = torch.argmin(d2, dim=1)  # the first minimum: the lowest face index
                del d2
            # the chosen faces' values, recomputed with autograd on [P]-sized data
            fi = faces[index]  # [P, 3]
            a, b, c = v[fi[:, 0]], v[fi[:, 1]], v[fi[:, 2]]
            squared = _sq_dist(p[:, 0], p[:, 1], p[:, 2], _triangle_data(a, b, c, fi[:, 0], fi[:, 1], fi[:, 2]))
            bary = _barycentric(p, a, b, c)
            proj = bary[:, 0:1] * a + bary[:, 1:2] * b + bary[:, 2:3] * c
            signed = ((p - proj) * _unit_normal(a, b, c)).sum(-1)
            pieces.append((index, bary, signed, squared))
        if not pieces:  # M = 0
            e = pts[i, :0]
            pieces.append((torch.zeros(0, dtype=torch.int64, device=points.device), e, e[:, 0], e[:, 0]))
        outs.append([torch.cat(parts, 0) for parts in zip(*pieces)])
    if not outs:  # N = 0
        e = pts[:, :, 0]
        return e.long(), pts.to(dtype), e.to(dtype), e.to(dtype)
    face_index, bary, signed, squared = (torch.stack(parts, 0) for parts in zip(*outs))
    return face_index, bary.to(dtype), signed.to(dtype), squared.to(dtype)


# ----------------------------------------------------------------------------------
# the surface field on a grid, grid sampling and smoothing
# ----------------------------------------------------------------------------------

def grid_points(resolution: int, bound: float, dtype: torch.dtype = torch.float32,
                device=None) -> torch.Tensor:
    """The grid points ``[D*H*W, 3]`` (D = H = W = ``resolution``) in ``(d, h, w)``
    row-major order: point ``(d, h, w)`` is ``(g[w], g[h], g[d])`` with
    ``g = linspace(-bound, bound, resolution)``, so x runs along W, y along H and z
    along D, as ``grid_sample`` reads them with ``align_corners=True``."""
    g = torch.linspace(-bound, bound, resolution, dtype=dtype, device=device)
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    return torch.stack([x, y, z], dim=-1).reshape(-1, 3)


def surface_field_grid(verts_obs: torch.Tensor, verts_canon: torch.Tensor, faces: torch.Tensor,
                       resolution: int = 24, bound: float = 0.65
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The surface field (GNARF / Portrait4D) at the grid points of :func:`grid_points`.

    Per grid point x: the closest triangle of the observed mesh with its barycentrics
    b and signed distance d (:func:`closest_triangles`), then
    ``x_canon = sum_i b_i v_canon_i + d * n_canon`` with ``n_canon`` the unit normal of
    the same triangle on the canonical mesh; the stored value is ``x_canon - x``.

    Args:
        verts_obs, verts_canon: ``[N, V, 3]`` floating point (same dtype).
        faces: ``[F, 3]`` int32 / int64.
        resolution: R >= 2 grid points per axis; bound: the outermost grid coordinate.

    Returns:
        ``(displacement [N, 3, R, R, R], squared_distance [N, 1, R, R, R])`` in
        ``verts_obs.dtype`` (channels x, y, z; spatial D, H, W = z, y, x).
    """
    dtype = verts_obs.dtype
    compute = _compute(dtype)
    n_batch = verts_obs.shape[0]
    r = resolution
    x = grid_points(r, bound, compute, verts_obs.device)
    x = x.unsqueeze(0).expand(n_batch, -1, -1)
    face_index, bary, signed, squared = closest_triangles(x, verts_obs.to(compute), faces)
    fi = faces.long()[face_index]  # [N, M, 3]
    vc = verts_canon.to(compute)
    batch = torch.arange(n_batch, device=verts_obs.device).view(n_batch, 1)
    a, b, c = vc[batch, fi[..., 0]], vc[batch, fi[..., 1]], vc[batch, fi[..., 2]]
    x_canon = (bary[..., 0:1] * a + bary[..., 1:2] * b + bary[..., 2:3] * c
               + signed.unsqueeze(-1) * _unit_normal(a, b, c))
    disp = (x_canon - x).reshape(n_batch, r, r, r, 3).permute(0, 4, 1, 2, 3)
    return disp.to(dtype), squared.reshape(n_batch, 1, r, r, r).to(dtype)


def sample_grid3d(grid: torch.Tensor, points: torch.Tensor, bound: float, padding: str = "zeros"
                  ) -> torch.Tensor:
    """Trilinear samples ``[N, M, C]`` of ``grid`` ``[N, C, D, H, W]`` at ``points``
    ``[N, M, 3]``: ``grid_sample`` with ``align_corners=True`` at ``points / bound`` (x
    indexes W, y H, z D), ``padding_mode=padding`` (``"zeros"`` or ``"border"``).
    A point with a NaN or infinite coordinate samples NaN with either padding (stated
    here: grid_sample's answer there depends on the padding and the device).
    Computed in float32 (float64 for a float64 grid), returned in ``grid.dtype``."""
    compute = _compute(grid.dtype)
    n, c = grid.shape[0], grid.shape[1]
    m = points.shape[1]
    coords = (points.to(compute) / bound).reshape(n, m, 1, 1, 3)
    out = F.grid_sample(grid.to(compute), coords, mode="bilinear", padding_mode=padding,
                        align_corners=True)  # [N, C, M, 1, 1]
    out = out.reshape(n, c, m).transpose(1, 2)
    finite = torch.isfinite(coords).reshape(n, m, 3).all(dim=-1, keepdim=True)  # [N, M, 1]
    return torch.where(finite, out, torch.full_like(out, float("nan"))).to(grid.dtype)


def smooth_grid3d(grid: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """``passes`` rounds of a 3x3x3 box filter (mean of the 27 neighbours) with
    replicate padding on ``grid`` ``[N, C, D, H, W]``; same shape and dtype
    (computed in float32, float64 for float64)."""
    dtype = grid.dtype
    out = grid.to(_compute(dtype))
    for _ in range(passes):
        out = F.avg_pool3d(F.pad(out, (1, 1, 1, 1, 1, 1), mode="replicate"), kernel_size=3, stride=1)
    return out.to(dtype)


# ----------------------------------------------------------------------------------
# one-ring tables and one-ring deformation
# ----------------------------------------------------------------------------------

def mesh_one_ring(faces: torch.Tensor, num_verts: int, max_neighbours: int = 10) -> torch.Tensor:
    """The one-ring table ``[V, max_neighbours]`` int64: row v is v itself, then the
    vertices sharing an edge with v in ascending order, then -1 padding.

    Raises ``ValueError`` naming the first vertex with more than ``max_neighbours - 1``
    edge-neighbours (nothing is truncated). Repeated indices in a face (degenerate
    faces) add no self-edges.
    """
    device = faces.device
    f = faces.long()
    v = num_verts
    src = torch.cat([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
    dst = torch.cat([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
    keep = src != dst
    key = torch.unique(src[keep] * v + dst[keep])  # sorted: by src, then dst
    src, dst = key // v, key % v
    counts = torch.bincount(src, minlength=v)
    table = torch.full((v, max_neighbours), -1, dtype=torch.int64, device=device)
    table[:, 0] = torch.arange(v, device=device)
    if key.numel() == 0:
        return table
    over = counts > max_neighbours - 1
    if bool(over.any()):
        vertex = int(torch.nonzero(over)[0, 0])
        worst = int(counts.max())
        raise ValueError(
            f"mesh_one_ring: vertex {vertex} has {int(counts[vertex])} edge-neighbours, but max_neighbours="
            f"{max_neighbours} leaves room for {max_neighbours - 1} (the vertex itself takes one entry); "
            f"{int(over.sum())} vertices overflow, the largest one-ring has {worst} neighbours, so pass "
            f"max_neighbours >= {worst + 1}")
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(key.numel(), device=device) - starts[src]
    table[src, rank + 1] = dst
    return table


def one_ring_deform(points: torch.Tensor, verts_obs: torch.Tensor, verts_canon: torch.Tensor,
                    neighbours: torch.Tensor, vertex_subset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Portrait4D's one-ring deformation.

    Per point x: the nearest observed vertex by exact squared distance
    ``sum_k (x_k - v_k)^2`` among ``vertex_subset`` (all vertices if None; ties go to
    the lowest vertex index), then its one-ring row ``neighbours[nearest]`` (entries
    -1 skipped) and
    ``x + sum_i w_i (v_canon_i - v_obs_i)`` with ``w_i = 1 / (|x - v_obs_i|^2 + 1e-10)``
    normalized over the ring. The nearest-vertex search runs without autograd in
    chunks of :data:`PAIRS_PER_CHUNK` (point, vertex) pairs; the ring sum is computed
    with autograd per chunk.

    Args:
        points: ``[N, M, 3]``; verts_obs, verts_canon: ``[N, V, 3]`` (same dtype).
        neighbours: ``[V, K]`` int32 / int64 in ``[-1, V)``.
        vertex_subset: ``[S]`` int32 / int64 in ``[0, V)`` or None.

    Returns:
        ``[N, M, 3]`` in ``points.dtype`` (computed in float32, float64 for float64),
        differentiable w.r.t. points, verts_obs and verts_canon.
    """
    dtype = points.dtype
    compute = _compute(dtype)
    n_batch, m = points.shape[0], points.shape[1]
    device = points.device
    pts = points.to(compute)
    vo_all = verts_obs.to(compute)
    vc_all = verts_canon.to(compute)
    nb = neighbours.long()
    k = nb.shape[1]
    if vertex_subset is None:
        candidates = torch.arange(verts_obs.shape[1], device=device)
    else:
        candidates = torch.sort(vertex_subset.long()).values  # argmin's first hit = lowest index
    chunk = _chunk(device, max(candidates.numel(), k))

    outs = []
    for i in range(n_batch):
        cand = vo_all[i, candidates].detach()  # [S, 3]
        cx, cy, cz = cand[:, 0], cand[:, 1], cand[:, 2]
        pieces = []
        for s in range(0, m, chunk):
            p = pts[i, s:s + chunk]  # [P, 3]
            with torch.no_grad():
                pd = p.detach()
                dx = pd[:, 0:1] - cx
                dy = pd[:, 1:2] - cy
                dz = pd[:, 2:3] - cz
                d2 = dx * dx + dy * dy + dz * dz  # [P, S]
                nearest = candidates[torch.argmin(d2, dim=1)]
            ring = nb[nearest]  # [P, K]
            valid = ring >= 0
            ring = ring.clamp(min=0)
            vo = vo_all[i, ring]  # [P, K, 3]
            vc = vc_all[i, ring]
            diff = p.unsqueeze(1) - vo
            dist2 = (diff * diff).sum(-1)
            w = torch.where(valid, 1.0 / (dist2 + ONE_RING_EPS), torch.zeros_like(dist2))
            w = w / w.sum(-1, keepdim=True)
            # padding entries add nothing (not even 0 * the clamped vertex's non-finite offset)
            offsets = torch.where(valid.unsqueeze(-1), w.unsqueeze(-1) * (vc - vo), torch.zeros_like(vc))
            pieces.append(p + offsets.sum(1))
        outs.append(torch.cat(pieces, 0) if pieces else pts[i])
    return torch.stack(outs, 0).to(dtype) if outs else points.clone()
