"""Small triangle-mesh utilities in NumPy used to build the head models.

Everything here runs once, when a head model is built or loaded, on CPU arrays:
vertex neighbourhoods (the one-ring table), signed volumes, connected components and
a quadric-error mesh simplifier for FLAME's companion mesh.
"""
from __future__ import annotations

import heapq
import math
from typing import List, Tuple

import numpy as np

ONE_RING_SIZE = 10


def unique_edges(faces: np.ndarray) -> np.ndarray:
    """Undirected edges of a triangle mesh: ``[E, 2]`` int64, each row sorted, rows sorted."""
    faces = np.asarray(faces, dtype=np.int64)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], axis=0)
    e.sort(axis=1)
    return np.unique(e, axis=0)


def one_ring_table(faces: np.ndarray, num_verts: int, size: int = ONE_RING_SIZE) -> np.ndarray:
    """Each vertex's one-ring: ``[V, size]`` int64.

    Column 0 is the vertex itself, then its edge neighbours in ascending index order,
    padded with -1; a vertex with more than ``size - 1`` neighbours keeps the
    ``size - 1`` lowest-indexed ones. An unused vertex has only itself.
    """
    edges = unique_edges(faces)
    both = np.concatenate([edges, edges[:, ::-1]], axis=0)
    order = np.lexsort((both[:, 1], both[:, 0]))
    both = both[order]
    table = np.full((num_verts, size), -1, dtype=np.int64)
    table[:, 0] = np.arange(num_verts)
    if len(both) == 0:
        return table
    src = both[:, 0]
    starts = np.searchsorted(src, np.arange(num_verts), side="left")
    rank = np.arange(len(src)) - starts[src]
    keep = rank < size - 1
    table[src[keep], 1 + rank[keep]] = both[keep, 1]
    return table


def one_ring(faces: np.ndarray, num_verts: int, size: int = ONE_RING_SIZE) -> np.ndarray:
    """The one-ring table ``[V, size]`` int64 through ``head4d.ops.mesh_one_ring`` (the op the
    deformation code uses; same layout as :func:`one_ring_table`), falling back to
    :func:`one_ring_table` when the op is unavailable or a vertex has more than ``size - 1``
    neighbours (the op refuses to truncate; this keeps the lowest-indexed ones, with a warning)."""
    import warnings

    import torch

    from ..ops.deformation import mesh_one_ring

    try:
        table = mesh_one_ring(torch.from_numpy(np.array(faces, dtype=np.int64)), int(num_verts), int(size))
    except ValueError as exc:
        warnings.warn(f"one-ring table truncated to {size - 1} neighbours per vertex: {exc}", stacklevel=3)
        return one_ring_table(faces, num_verts, size)
    return table.cpu().numpy().astype(np.int64)


def vertex_degrees(faces: np.ndarray, num_verts: int) -> np.ndarray:
    """Number of edge neighbours of each vertex: ``[V]`` int64."""
    edges = unique_edges(faces)
    return np.bincount(edges.ravel(), minlength=num_verts).astype(np.int64)


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Signed volume enclosed by a closed mesh; positive when faces are oriented outward
    (normal ``cross(v2 - v1, v3 - v1)`` pointing out)."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def connected_components(faces: np.ndarray, num_verts: int) -> List[np.ndarray]:
    """Vertex sets of the connected components of the mesh (unused vertices excluded),
    ordered by their smallest vertex index."""
    parent = np.arange(num_verts)

    def find(i):
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    for a, b in unique_edges(faces):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    used = np.zeros(num_verts, dtype=bool)
    used[np.asarray(faces).ravel()] = True
    roots = np.array([find(i) for i in range(num_verts)])
    comps = []
    for r in np.unique(roots[used]):
        comps.append(np.nonzero((roots == r) & used)[0])
    return comps


def boundary_edges(faces: np.ndarray) -> np.ndarray:
    """Edges used by exactly one face: ``[B, 2]`` int64 (sorted rows)."""
    faces = np.asarray(faces, dtype=np.int64)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], axis=0)
    e.sort(axis=1)
    uniq, counts = np.unique(e, axis=0, return_counts=True)
    return uniq[counts == 1]


def is_edge_manifold(faces: np.ndarray) -> bool:
    """True when every edge has one or two faces and the two faces of an interior edge
    traverse it in opposite directions (consistent orientation)."""
    faces = np.asarray(faces, dtype=np.int64)
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], axis=0)
    if len(np.unique(directed, axis=0)) != len(directed):
        return False  # a directed edge used twice: inconsistent orientation or non-manifold
    und = np.sort(directed, axis=1)
    _, counts = np.unique(und, axis=0, return_counts=True)
    return bool(np.all(counts <= 2))


# --------------------------------------------------------------------------------------
# Quadric-error simplification (half-edge collapses), for FLAME's companion mesh.


def _face_quadrics(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    n = np.cross(b - a, c - a)
    area2 = np.linalg.norm(n, axis=1)
    n = n / np.maximum(area2, 1e-30)[:, None]
    d = -np.einsum("ij,ij->i", n, a)
    p = np.concatenate([n, d[:, None]], axis=1)
    return 0.5 * area2[:, None, None] * p[:, :, None] * p[:, None, :]


def simplify_mesh(vertices: np.ndarray, faces: np.ndarray, target_vertices: int,
                  boundary_weight: float = 10.0) -> Tuple[np.ndarray, np.ndarray]:
    """Simplify a triangle mesh by quadric-error half-edge collapses (Garland-Heckbert
    quadrics; every kept vertex is an original vertex, so it is exactly on the mesh).

    Collapses keep the mesh edge-manifold and oriented: the link condition is enforced,
    boundary vertices only slide along their boundary, and a collapse that would flip or
    degenerate a triangle is refused. Deterministic (ties broken by vertex index).

    Args:
        vertices: ``[V, 3]`` float array.
        faces: ``[F, 3]`` integer array (only the vertices it uses take part).
        target_vertices: stop when this many used vertices remain (or no collapse is valid).

    Returns:
        ``(kept, new_faces)``: ``kept`` ``[K]`` int64 original indices of the remaining
        vertices in ascending order, ``new_faces`` ``[F', 3]`` int64 indexing ``kept``,
        oriented as the input.
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64).copy()
    nv = len(v)
    used = np.zeros(nv, dtype=bool)
    used[f.ravel()] = True
    alive_v = used.copy()
    alive_f = np.ones(len(f), dtype=bool)

    q = np.zeros((nv, 4, 4))
    np.add.at(q, f[:, 0], _face_quadrics(v, f))
    np.add.at(q, f[:, 1], _face_quadrics(v, f))
    np.add.at(q, f[:, 2], _face_quadrics(v, f))

    # boundary: a penalty plane through each boundary edge, perpendicular to its face
    faces_of: List[set] = [set() for _ in range(nv)]
    for fi, (a, b, c) in enumerate(f):
        faces_of[a].add(fi)
        faces_of[b].add(fi)
        faces_of[c].add(fi)
    nbrs: List[set] = [set() for _ in range(nv)]
    for a, b in unique_edges(f):
        nbrs[a].add(int(b))
        nbrs[b].add(int(a))
    bnd = boundary_edges(f)
    on_boundary = np.zeros(nv, dtype=bool)
    on_boundary[bnd.ravel()] = True
    scale = float(np.mean(np.linalg.norm(v[bnd[:, 0]] - v[bnd[:, 1]], axis=1))) if len(bnd) else 1.0
    for a, b in bnd:
        (fi,) = tuple(faces_of[a] & faces_of[b])
        tri = v[f[fi]]
        fn = np.cross(tri[1] - tri[0], tri[2] - tri[0])
        e = v[b] - v[a]
        pn = np.cross(e, fn)
        norm = np.linalg.norm(pn)
        if norm < 1e-30:
            continue
        pn = pn / norm
        p = np.append(pn, -pn @ v[a])
        kq = boundary_weight * scale * scale * np.outer(p, p)
        q[a] += kq
        q[b] += kq

    version = np.zeros(nv, dtype=np.int64)
    heap: list = []

    vh = np.concatenate([v, np.ones((nv, 1))], axis=1)
    vt = [tuple(p) for p in v.tolist()]

    def cost(u, w):
        h = vh[w]
        return float(h @ (q[u] + q[w]) @ h)

    def push_edge(a, b):
        for u, w in ((a, b), (b, a)):
            if on_boundary[u] and not on_boundary[w]:
                continue
            heapq.heappush(heap, (cost(u, w), u, w, version[u], version[w]))

    for a, b in unique_edges(f):
        push_edge(int(a), int(b))

    def normal(a, b, c):
        ux, uy, uz = b[0] - a[0], b[1] - a[1], b[2] - a[2]
        wx, wy, wz = c[0] - a[0], c[1] - a[1], c[2] - a[2]
        return (uy * wz - uz * wy, uz * wx - ux * wz, ux * wy - uy * wx)

    remaining = int(used.sum())
    while remaining > target_vertices and heap:
        c, u, w, vu, vw = heapq.heappop(heap)
        if not (alive_v[u] and alive_v[w]) or version[u] != vu or version[w] != vw:
            continue
        if w not in nbrs[u]:
            continue
        shared = faces_of[u] & faces_of[w]
        is_bnd_edge = len(shared) == 1
        if on_boundary[u] and not (is_bnd_edge and on_boundary[w]):
            continue
        if len(shared) not in (1, 2):
            continue
        opposite = set()
        for fi in shared:
            opposite.update(int(x) for x in f[fi] if x != u and x != w)
        if nbrs[u] & nbrs[w] != opposite:
            continue  # link condition
        if len(nbrs[u]) <= 2 or (len(nbrs[w]) <= 3 and not on_boundary[w]):
            continue  # would collapse a tiny closed piece
        ok = True
        for fi in faces_of[u] - shared:
            ids = [int(x) for x in f[fi]]
            n_old = normal(*(vt[x] for x in ids))
            n_new = normal(*(vt[w] if x == u else vt[x] for x in ids))
            no = math.sqrt(n_old[0] ** 2 + n_old[1] ** 2 + n_old[2] ** 2)
            nn = math.sqrt(n_new[0] ** 2 + n_new[1] ** 2 + n_new[2] ** 2)
            dot = n_old[0] * n_new[0] + n_old[1] * n_new[1] + n_old[2] * n_new[2]
            if nn < 1e-12 * max(no, 1e-30) or dot < 0.2 * no * nn:
                ok = False
                break
        if not ok:
            continue
        # collapse u -> w
        for fi in shared:
            alive_f[fi] = False
            for x in f[fi]:
                faces_of[x].discard(fi)
        for fi in faces_of[u]:
            f[fi][f[fi] == u] = w
            faces_of[w].add(fi)
        faces_of[u] = set()
        for x in nbrs[u]:
            nbrs[x].discard(u)
            if x != w:
                nbrs[x].add(w)
                nbrs[w].add(x)
        nbrs[w].discard(u)
        nbrs[u] = set()
        q[w] += q[u]
        alive_v[u] = False
        remaining -= 1
        # only w's quadric changed: re-cost its edges (other entries keep their cost; their
        # validity is re-checked when popped)
        version[w] += 1
        for x in nbrs[w]:
            push_edge(w, x)

    kept = np.nonzero(alive_v)[0]
    remap = np.full(nv, -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    new_faces = remap[f[alive_f]]
    return kept.astype(np.int64), new_faces


def companion_from_simplified(faces: np.ndarray, kept: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Barycentric description of kept original vertices: for each, one full-mesh face that
    contains it (rotated so the vertex comes first) with weights ``(1, 0, 0)``.

    Returns ``(indices [K, 3] int64, weights [K, 3] float64)``.
    """
    faces = np.asarray(faces, dtype=np.int64)
    owner = np.full(int(faces.max()) + 1, -1, dtype=np.int64)
    corner = np.zeros_like(owner)
    for k in range(3):
        sel = owner[faces[:, k]] < 0
        owner[faces[sel, k]] = np.nonzero(sel)[0]
        corner[faces[sel, k]] = k
    fi = owner[kept]
    ck = corner[kept]
    idx = np.stack([faces[fi, ck], faces[fi, (ck + 1) % 3], faces[fi, (ck + 2) % 3]], axis=1)
    w = np.zeros((len(kept), 3))
    w[:, 0] = 1.0
    return idx, w


def check_faces(name: str, faces: np.ndarray, num_verts: int, where: str) -> np.ndarray:
    """``faces`` as ``[F, 3]`` int64 with indices in range, else ValueError naming it."""
    faces = np.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"{where}: '{name}' must have shape [F, 3] (triangles), got {list(faces.shape)}")
    if not np.issubdtype(faces.dtype, np.integer):
        if not np.all(np.equal(np.mod(faces, 1), 0)):
            raise ValueError(f"{where}: '{name}' must hold integer vertex indices")
    faces = faces.astype(np.int64)
    if faces.size and (faces.min() < 0 or faces.max() >= num_verts):
        raise ValueError(f"{where}: '{name}' indexes vertices outside [0, {num_verts}) "
                         f"(min {faces.min()}, max {faces.max()})")
    return faces
