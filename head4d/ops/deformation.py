"""Deformation ops (Portrait4D's deformation field, issue 4): ``closest_triangles``,
``surface_field_grid``, ``sample_grid3d``, ``smooth_grid3d``, ``mesh_one_ring``,
``one_ring_deform``, and ``cell_centre_bound`` for Portrait4D's grid bounds.

How Portrait4D composes them (``docs/design.md``, "The deformation of sample points"):
the neck field is ``surface_field_grid`` on the simplified mesh at resolution 24 with
``bound = PORTRAIT4D_FINE_BOUND`` (cell centres of the 1.3 box), plus a second grid at
resolution 8 (``bound = PORTRAIT4D_COARSE_BOUND``) passed through
``smooth_grid3d(passes=2)``; both are read with ``sample_grid3d(..., padding="zeros")``
at the same bounds. Face, eyes and mouth use ``one_ring_deform`` with the table of
``mesh_one_ring`` and a ``vertex_subset`` per part.

Where things live:
    reference   head4d/reference/deformation.py   (the ``torch`` backend)
    C++ / CUDA  csrc/grid3d/ (sample_grid3d), csrc/onering/ (one_ring_deform),
                csrc/closest_triangles/ (closest_triangles, surface_field_grid): ``cpu`` and ``cuda``
    tests       tests/test_deformation_ops.py, tests/test_deformation_kernels.py,
                tests/test_closest_triangles_kernels.py
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _backend
from .._checks import check_choice, check_dim, check_int, check_positive_finite, check_same_device, check_tensor
from .._nvtx import nvtx_range
from ..reference import deformation as _reference
from . import _library
from ._common import check_same_dtype, resolve_implemented, values_off_host

#: Backend preference per device type, fastest first. An op runs the first one it has
#: (IMPLEMENTED), so the ops without compiled kernels run their reference.
PREFERENCES = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "torch"),
}

#: The backends each op has.
IMPLEMENTED = {
    "closest_triangles": ("cpu", "cuda", "torch"),
    "surface_field_grid": ("cpu", "cuda", "torch"),
    "sample_grid3d": ("cpu", "cuda", "torch"),
    "smooth_grid3d": ("torch",),
    "mesh_one_ring": ("torch",),
    "one_ring_deform": ("cpu", "cuda", "torch"),
}
for _op, _implemented in IMPLEMENTED.items():  # every backend runs every input the op accepts
    _backend.declare(_op, _implemented, PREFERENCES)

INDEX_DTYPES = (torch.int32, torch.int64)
PADDINGS = ("zeros", "border")
#: ``padding`` as the compiled kernels number it.
PADDING_CODES = {"zeros": 0, "border": 1}

#: Portrait4D's deformation box: the renderer's ``box_warp``.
PORTRAIT4D_BOX_SIDE = 1.3


def cell_centre_bound(resolution: int, box_side: float = PORTRAIT4D_BOX_SIDE) -> float:
    """The ``bound`` that makes ``surface_field_grid`` / ``sample_grid3d`` grid points the
    cell centres of a ``resolution``^3 partition of the cube of side ``box_side``
    centred at the origin: ``box_side / 2 * (1 - 1 / resolution)``.

    Portrait4D's 24^3 neck grid: ``cell_centre_bound(24) = 0.65 * (1 - 1/24) = 0.6229...``
    (:data:`PORTRAIT4D_FINE_BOUND`); its 8^3 grid: ``cell_centre_bound(8)``
    (:data:`PORTRAIT4D_COARSE_BOUND`).
    """
    resolution = check_int("cell_centre_bound", "resolution", resolution, 1)
    box_side = check_positive_finite("cell_centre_bound", "box_side", box_side)
    return _reference.cell_centre_bound(resolution, box_side)


#: ``bound`` of Portrait4D's 24^3 surface-field grid: ``0.65 * (1 - 1/24)``.
PORTRAIT4D_FINE_BOUND = 0.65 * (1.0 - 1.0 / 24.0)
#: ``bound`` of Portrait4D's 8^3 (smoothed) grid: ``0.65 * (1 - 1/8)``.
PORTRAIT4D_COARSE_BOUND = 0.65 * (1.0 - 1.0 / 8.0)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_points(op: str, name: str, value, expected: str) -> torch.Tensor:
    check_tensor(op, name, value, expected, 3)
    check_dim(op, name, value, 2, 3, expected)
    return value


def _check_batch(op: str, first: Tuple[str, torch.Tensor], other: Tuple[str, torch.Tensor]) -> None:
    if other[1].shape[0] != first[1].shape[0]:
        raise ValueError(f"{op}: {other[0]} has batch size {other[1].shape[0]} but {first[0]} has "
                         f"{first[1].shape[0]}; they must match")


def _check_faces_shape(op: str, faces) -> None:
    check_tensor(op, "faces", faces, "[F, 3]", 2, INDEX_DTYPES)
    check_dim(op, "faces", faces, 1, 3, "[F, 3] (triangles)")
    if faces.shape[0] == 0:
        raise ValueError(f"{op}: faces must hold at least one triangle, got shape {_shape(faces)}")


def _check_faces_range(op: str, faces: torch.Tensor, num_verts: int, verts_name: Optional[str]) -> None:
    where = f"{verts_name} has {num_verts} vertices" if verts_name else f"num_verts is {num_verts}"
    if values_off_host(faces):
        torch._assert_async(((faces >= 0) & (faces < num_verts)).all(),
                            f"{op}: faces holds vertex indices outside [0, {num_verts - 1}] but {where}")
        return
    lo, hi = int(faces.min()), int(faces.max())
    if lo < 0 or hi >= num_verts:
        raise ValueError(f"{op}: faces holds vertex indices in [{lo}, {hi}] but {where}; "
                         f"indices must lie in [0, {num_verts - 1}]")


def _check_verts_nonempty(op: str, name: str, verts: torch.Tensor) -> None:
    if verts.shape[1] == 0:
        raise ValueError(f"{op}: {name} must hold at least one vertex, got shape {_shape(verts)}")


def _chosen_face_values(p: torch.Tensor, v: torch.Tensor, faces: torch.Tensor, index: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(barycentric, signed, squared) of the faces ``index`` [N, M] chosen by a compiled
    search, recomputed with autograd by the reference's own functions (as its
    ``closest_triangles`` does per chunk), so the compiled backends give its gradients.
    ``p`` [N, M, 3] and ``v`` [N, V, 3] in the compute dtype, ``faces`` int64."""
    n = p.shape[0]
    fi = faces[index]  # [N, M, 3]
    batch = torch.arange(n, device=p.device).view(n, 1)
    a, b, c = v[batch, fi[..., 0]], v[batch, fi[..., 1]], v[batch, fi[..., 2]]
    squared = _reference._sq_dist(p[..., 0], p[..., 1], p[..., 2],
                                 _reference._triangle_data(a, b, c, fi[..., 0], fi[..., 1], fi[..., 2]))
    bary = _reference._barycentric(p, a, b, c)
    proj = bary[..., 0:1] * a + bary[..., 1:2] * b + bary[..., 2:3] * c
    signed = ((p - proj) * _reference._unit_normal(a, b, c)).sum(-1)
    return bary, signed, squared


def _closest_triangles_compiled(points, verts, faces):
    """``cpu`` / ``cuda``: ``head4d._C.closest_triangles_forward`` (csrc/closest_triangles/), as the
    custom operators ``head4d::closest_triangles`` and ``head4d::closest_triangles_search``
    (:mod:`head4d.ops._library`), searches; without a gradient to track it computes the
    values too, otherwise they are recomputed for the chosen faces with autograd
    (:func:`_chosen_face_values`)."""
    if not (torch.is_grad_enabled() and (points.requires_grad or verts.requires_grad)):
        return _library.closest_triangles(points, verts, faces)
    face = _library.closest_triangles_search(points.detach(), verts.detach(), faces)
    dtype = points.dtype
    compute = _reference._compute(dtype)
    bary, signed, squared = _chosen_face_values(points.to(compute), verts.to(compute), faces.long(), face)
    return face, bary.to(dtype), signed.to(dtype), squared.to(dtype)


def _surface_field_grid_compiled(verts_obs, verts_canon, faces, resolution, bound):
    """``cpu`` / ``cuda``: ``head4d._C.surface_field_grid_forward`` (csrc/closest_triangles/), as the
    custom operators ``head4d::surface_field_grid`` and ``head4d::surface_field_grid_search``
    (:mod:`head4d.ops._library`), searches and, without a gradient to track, evaluates
    the field too; otherwise the field of the chosen faces is recomputed with autograd
    as the reference computes it."""
    if not (torch.is_grad_enabled() and (verts_obs.requires_grad or verts_canon.requires_grad)):
        return _library.surface_field_grid(verts_obs, verts_canon, faces, resolution, bound)
    dtype = verts_obs.dtype
    compute = _reference._compute(dtype)
    n, r = verts_obs.shape[0], resolution
    face = _library.surface_field_grid_search(verts_obs.detach(), faces, r, bound)  # [N, R^3]
    x = _reference.grid_points(r, bound, compute, verts_obs.device).unsqueeze(0).expand(n, -1, -1)
    fl = faces.long()
    bary, signed, squared = _chosen_face_values(x, verts_obs.to(compute), fl, face)
    fi = fl[face]
    vc = verts_canon.to(compute)
    batch = torch.arange(n, device=verts_obs.device).view(n, 1)
    a, b, c = vc[batch, fi[..., 0]], vc[batch, fi[..., 1]], vc[batch, fi[..., 2]]
    x_canon = (bary[..., 0:1] * a + bary[..., 1:2] * b + bary[..., 2:3] * c
               + signed.unsqueeze(-1) * _reference._unit_normal(a, b, c))
    disp = (x_canon - x).reshape(n, r, r, r, 3).permute(0, 4, 1, 2, 3)
    return disp.to(dtype), squared.reshape(n, 1, r, r, r).to(dtype)


def closest_triangles(points: torch.Tensor, verts: torch.Tensor, faces: torch.Tensor, *,
                      backend: Optional[str] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The closest triangle of a mesh to every point, exactly.

    The distance is the exact point-triangle distance (closest among the face
    interior, the three edges and the three corners); zero-area triangles count as
    their edges and corners, without NaN. Ties go to the lowest face index: a point on
    a vertex shared by several faces gets the lowest of them, and so does a point
    whose closest feature is a shared edge or vertex (their distances are computed
    identically for every face that has them). A point exactly on a shared edge may
    get either face: the in-plane distances of the two faces differ by rounding.

    For the chosen face ``(v1, v2, v3)`` (rows of ``faces``, in that order):

    * ``barycentric``: of the orthogonal projection of x onto the triangle's plane,
      by the standard dot-product formula (``v0 = v2 - v1, v1' = v3 - v1, v2' = x - v1``,
      ``d00, d01, d11, d20, d21`` their dot products, determinant
      ``d00 d11 - d01^2`` clamped to >= 1e-12, as Portrait4D). They sum to 1 and are
      negative where the projection falls outside the triangle (a point closest to an
      edge or corner);
    * ``signed_distance``: ``<x - sum_i b_i v_i, n>`` with ``n`` the unit normal of
      ``cross(v2 - v1, v3 - v1)`` (0 for a zero-area triangle);
    * ``squared_distance``: the squared point-triangle distance (what is minimized).
      It equals ``signed_distance^2`` when the projection falls inside the triangle.

    Args:
        points: ``[N, M, 3]`` float16 / bfloat16 / float32 / float64.
        verts: ``[N, V, 3]``, same dtype and device, V >= 1.
        faces: ``[F, 3]`` int32 or int64 vertex indices in ``[0, V)``, F >= 1, shared by the batch.
        backend: ``"cpu"`` (CPU tensors), ``"cuda"`` (CUDA tensors), ``"torch"`` (the
            reference) or ``None``/``"auto"`` (the fastest available).

    Returns:
        ``(face_index [N, M] int64, barycentric [N, M, 3], signed_distance [N, M],
        squared_distance [N, M])``, the floating ones in ``points.dtype`` (computed in
        float32, float64 for float64). Differentiable w.r.t. ``points`` and ``verts``
        for the chosen faces; the choice is piecewise constant.

    Cost: the reference is brute force, ``N * M * F`` point-triangle tests, chunked
    over points to 2^18 pairs at a time on CPU, 2^22 on CUDA
    (:data:`head4d.reference.deformation.PAIRS_PER_CHUNK`), so memory stays bounded.
    The ``cpu`` / ``cuda`` kernels (csrc/closest_triangles/) search spatially sorted tiles of faces
    in order of a lower bound, skipping tiles and faces that provably cannot win, with
    the same answers (the same distances on the CPU, bit for bit); with a gradient to
    track, the chosen faces' values are recomputed with autograd as the reference does.
    """
    op = "closest_triangles"
    _check_points(op, "points", points, "[N, M, 3]")
    _check_points(op, "verts", verts, "[N, V, 3]")
    _check_batch(op, ("points", points), ("verts", verts))
    check_same_dtype(op, [("points", points), ("verts", verts)])
    _check_faces_shape(op, faces)
    device = check_same_device(op, [("points", points), ("verts", verts), ("faces", faces)])
    _check_verts_nonempty(op, "verts", verts)
    _check_faces_range(op, faces, verts.shape[1], "verts")
    chosen = resolve_implemented(op, device, backend, PREFERENCES, IMPLEMENTED[op])
    with nvtx_range("head4d.closest_triangles"):
        if chosen == "torch":
            return _reference.closest_triangles(points, verts, faces)
        return _closest_triangles_compiled(points, verts, faces)


def surface_field_grid(verts_obs: torch.Tensor, verts_canon: torch.Tensor, faces: torch.Tensor, *,
                       resolution: int = 24, bound: float = 0.65, backend: Optional[str] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The surface field (GNARF, Portrait4D's neck deformation) on a voxel grid.

    The grid points run from ``-bound`` to ``+bound`` inclusive on each axis
    (``linspace(-bound, bound, resolution)``), with x along W, y along H and z along D:
    ``displacement[n, :, d, h, w]`` belongs to the point ``(g[w], g[h], g[d])``, which is
    where ``sample_grid3d(grid, points, bound=bound)`` (``align_corners=True``) reads
    it back exactly. Per grid point x, with the closest triangle of the observed mesh,
    its barycentrics b and signed distance d (:func:`closest_triangles`):
    ``x_canon = sum_i b_i v_canon_i + d * n_canon`` (``n_canon`` the unit normal of the
    same triangle on the canonical mesh), stored as ``x_canon - x``.

    A zero-area closest triangle (no such triangle in a clean mesh) has a zero normal,
    so d = 0, and barycentrics from the clamped determinant: the value is finite but
    not meaningful, as with Portrait4D's formula.

    Portrait4D's 24^3 grid of cell centres over its 1.3 box is
    ``bound=PORTRAIT4D_FINE_BOUND`` (``= cell_centre_bound(24) = 0.65 * (1 - 1/24)``);
    the default ``bound=0.65`` puts the outermost points on the box's faces instead.

    Args:
        verts_obs: ``[N, V, 3]`` the observed (target) mesh, float16 / bfloat16 / float32 / float64.
        verts_canon: ``[N, V, 3]`` the canonical mesh, same dtype and device.
        faces: ``[F, 3]`` int32 or int64 in ``[0, V)``.
        resolution: grid points per axis R >= 2 (D = H = W = R).
        bound: the outermost grid coordinate, > 0.
        backend: ``"cpu"`` (CPU tensors), ``"cuda"`` (CUDA tensors), ``"torch"`` (the
            reference) or ``None``/``"auto"`` (the fastest available).

    Returns:
        ``(displacement [N, 3, R, R, R], squared_distance [N, 1, R, R, R])`` in
        ``verts_obs.dtype``: displacement channels (x, y, z); squared_distance is the
        squared distance to the observed mesh. Differentiable w.r.t. both vertex sets
        (piecewise, the triangle choice being constant).

    Cost: the reference is brute force, ``N * R^3 * F`` point-triangle tests, chunked
    (see :func:`closest_triangles`); the ``cpu`` / ``cuda`` kernels search culled tiles
    (csrc/closest_triangles/) and, without a gradient to track, evaluate the field in the kernel.
    """
    op = "surface_field_grid"
    _check_points(op, "verts_obs", verts_obs, "[N, V, 3]")
    _check_points(op, "verts_canon", verts_canon, "[N, V, 3]")
    if verts_canon.shape != verts_obs.shape:
        raise ValueError(f"{op}: verts_canon has shape {_shape(verts_canon)} but verts_obs has "
                         f"{_shape(verts_obs)}; they must match")
    check_same_dtype(op, [("verts_obs", verts_obs), ("verts_canon", verts_canon)])
    _check_faces_shape(op, faces)
    device = check_same_device(op, [("verts_obs", verts_obs), ("verts_canon", verts_canon), ("faces", faces)])
    _check_verts_nonempty(op, "verts_obs", verts_obs)
    _check_faces_range(op, faces, verts_obs.shape[1], "verts_obs")
    resolution = check_int(op, "resolution", resolution, 2)
    bound = check_positive_finite(op, "bound", bound)
    chosen = resolve_implemented(op, device, backend, PREFERENCES, IMPLEMENTED[op])
    with nvtx_range("head4d.surface_field_grid"):
        if chosen == "torch":
            return _reference.surface_field_grid(verts_obs, verts_canon, faces, resolution, bound)
        return _surface_field_grid_compiled(verts_obs, verts_canon, faces, resolution, bound)


def sample_grid3d(grid: torch.Tensor, points: torch.Tensor, *, bound: float, padding: str = "zeros",
                  backend: Optional[str] = None) -> torch.Tensor:
    """Trilinear interpolation of a voxel grid at points (``grid_sample``, 3-D,
    ``align_corners=True``).

    A point's coordinates divided by ``bound`` map onto ``[-1, 1]``: -1 and +1 are the
    centres of the first and last grid points (x along W, y along H, z along D), so
    the grid of :func:`surface_field_grid` with the same ``bound`` is read back
    exactly at its grid points. Outside, ``padding="zeros"`` reads zeros beyond the
    outermost points (fading linearly to zero over the last cell, as ``grid_sample``
    does); ``"border"`` clamps the coordinates to the grid.

    Args:
        grid: ``[N, C, D, H, W]`` float16 / bfloat16 / float32 / float64.
        points: ``[N, M, 3]`` any floating dtype, same device.
        bound: > 0, the coordinate of the outermost grid points.
        padding: ``"zeros"`` (Portrait4D) or ``"border"``.
        backend: ``"cpu"`` (CPU tensors), ``"cuda"`` (CUDA tensors), ``"torch"`` (the
            reference) or ``None``/``"auto"`` (the fastest available).

    Returns:
        ``[N, M, C]`` in ``grid.dtype`` (computed in float32, float64 for a float64
        grid). Differentiable w.r.t. ``grid`` and ``points``.

    Non-finite input, the same on every backend: a point with a NaN or infinite
    coordinate samples NaN with either padding; NaN and infinities in ``grid``
    propagate through the trilinear sum.
    """
    op = "sample_grid3d"
    check_tensor(op, "grid", grid, "[N, C, D, H, W]", 5)
    _check_points(op, "points", points, "[N, M, 3]")
    _check_batch(op, ("grid", grid), ("points", points))
    if min(grid.shape[2:]) < 1:
        raise ValueError(f"{op}: grid must have D, H, W >= 1, got shape {_shape(grid)}")
    device = check_same_device(op, [("grid", grid), ("points", points)])
    bound = check_positive_finite(op, "bound", bound)
    check_choice(op, "padding", padding, PADDINGS)
    chosen = resolve_implemented(op, device, backend, PREFERENCES, IMPLEMENTED[op])
    with nvtx_range("head4d.sample_grid3d"):
        if chosen == "torch":
            return _reference.sample_grid3d(grid, points, bound, padding)
        # head4d::sample_grid3d: head4d._C's kernels as a custom operator (:mod:`head4d.ops._library`)
        return _library.sample_grid3d(grid, points, bound, PADDING_CODES[padding])


def smooth_grid3d(grid: torch.Tensor, passes: int = 2, *, backend: Optional[str] = None) -> torch.Tensor:
    """``passes`` rounds of a 3x3x3 box filter (the mean of each voxel's 27-voxel
    neighbourhood) with replicate padding, as Portrait4D smooths its 8^3 offset grid
    (two passes).

    Args:
        grid: ``[N, C, D, H, W]`` float16 / bfloat16 / float32 / float64.
        passes: >= 0 (0 returns a copy).
        backend: ``None``/``"auto"`` or ``"torch"``.

    Returns:
        ``[N, C, D, H, W]`` in ``grid.dtype`` (computed in float32, float64 for
        float64), differentiable w.r.t. ``grid``.
    """
    op = "smooth_grid3d"
    check_tensor(op, "grid", grid, "[N, C, D, H, W]", 5)
    if min(grid.shape[2:]) < 1:
        raise ValueError(f"{op}: grid must have D, H, W >= 1, got shape {_shape(grid)}")
    passes = check_int(op, "passes", passes, 0)
    resolve_implemented(op, grid.device, backend, PREFERENCES, IMPLEMENTED[op])
    with nvtx_range("head4d.smooth_grid3d"):
        out = _reference.smooth_grid3d(grid, passes)
        return out.clone() if out is grid else out


def mesh_one_ring(faces: torch.Tensor, num_verts: int, max_neighbours: int = 10, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """The one-ring table of a triangle mesh, as Portrait4D's (5023 x 10 for FLAME).

    Row v holds v itself, then every vertex that shares an edge with v in ascending
    index order, then -1 up to ``max_neighbours`` entries. A vertex used by no face
    gets just itself. Nothing is truncated: a vertex with more than
    ``max_neighbours - 1`` edge-neighbours raises ``ValueError`` naming it, its count
    and the ``max_neighbours`` needed.

    (Portrait4D pads its table with the index of an extra far-away point at 1e3; here
    padding is -1, which :func:`one_ring_deform` skips.)

    Args:
        faces: ``[F, 3]`` int32 or int64 in ``[0, num_verts)``, F >= 1.
        num_verts: V >= 1.
        max_neighbours: K >= 1, the table's width (the vertex itself included).
        backend: ``None``/``"auto"`` or ``"torch"``.

    Returns:
        ``[V, K]`` int64 on ``faces.device``.
    """
    op = "mesh_one_ring"
    num_verts = check_int(op, "num_verts", num_verts, 1)
    max_neighbours = check_int(op, "max_neighbours", max_neighbours, 1)
    _check_faces_shape(op, faces)
    _check_faces_range(op, faces, num_verts, None)
    resolve_implemented(op, faces.device, backend, PREFERENCES, IMPLEMENTED[op])
    with nvtx_range("head4d.mesh_one_ring"):
        return _reference.mesh_one_ring(faces, num_verts, max_neighbours)


def _check_one_ring_tables(op: str, neighbours: torch.Tensor, vertex_subset: Optional[torch.Tensor],
                           num_verts: int) -> None:
    """``one_ring_deform``'s checks of the values of ``neighbours`` and ``vertex_subset``
    (on the host: a ``ValueError`` naming the offending entry)."""
    device = neighbours.device
    lo, hi = int(neighbours.min()), int(neighbours.max())
    if lo < -1 or hi >= num_verts:
        raise ValueError(f"{op}: neighbours holds entries in [{lo}, {hi}] but must lie in [-1, {num_verts - 1}] "
                         f"(vertex indices of verts_obs, -1 for padding)")
    rows = torch.arange(num_verts, device=device)
    if vertex_subset is not None:
        lo, hi = int(vertex_subset.min()), int(vertex_subset.max())
        if lo < 0 or hi >= num_verts:
            raise ValueError(f"{op}: vertex_subset holds indices in [{lo}, {hi}] but verts_obs has {num_verts} "
                             f"vertices; indices must lie in [0, {num_verts - 1}]")
        rows = vertex_subset.long()
    empty = ~(neighbours[rows] >= 0).any(dim=1)
    if bool(empty.any()):
        vertex = int(rows[torch.nonzero(empty)[0, 0]])
        raise ValueError(f"{op}: neighbours row {vertex} holds only -1, but vertex {vertex} can be the nearest "
                         f"vertex; every candidate row needs at least one vertex")


def _assert_one_ring_tables(op: str, neighbours: torch.Tensor, vertex_subset: Optional[torch.Tensor],
                            num_verts: int) -> None:
    """:func:`_check_one_ring_tables` on the device (``torch._assert_async``), for traced
    and captured calls (see :func:`values_off_host`)."""
    torch._assert_async(((neighbours >= -1) & (neighbours < num_verts)).all(),
                        f"{op}: neighbours holds entries outside [-1, {num_verts - 1}] (vertex indices of "
                        f"verts_obs, -1 for padding)")
    rows = torch.arange(num_verts, device=neighbours.device)
    if vertex_subset is not None:
        torch._assert_async(((vertex_subset >= 0) & (vertex_subset < num_verts)).all(),
                            f"{op}: vertex_subset holds indices outside [0, {num_verts - 1}] (verts_obs has "
                            f"{num_verts} vertices)")
        rows = vertex_subset.long().clamp(0, num_verts - 1)
    torch._assert_async((neighbours[rows] >= 0).any(dim=1).all(),
                        f"{op}: a neighbours row that can be chosen holds only -1; every candidate row needs "
                        f"at least one vertex")


def one_ring_deform(points: torch.Tensor, verts_obs: torch.Tensor, verts_canon: torch.Tensor,
                    neighbours: torch.Tensor, *, vertex_subset: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Portrait4D's one-ring deformation (face, eyes, mouth).

    Per point x: the exact nearest observed vertex (smallest ``sum_k (x_k - v_k)^2``)
    among ``vertex_subset`` (all vertices if None); ties go to the lowest vertex index.
    Then, over that vertex's row of ``neighbours`` (entries -1 skipped),
    ``x + sum_i w_i (v_canon_i - v_obs_i)`` with ``w_i = 1 / (|x - v_obs_i|^2 + 1e-10)``
    normalized to sum to 1.

    Args:
        points: ``[N, M, 3]`` float16 / bfloat16 / float32 / float64 (observation space).
        verts_obs: ``[N, V, 3]`` the observed (target) mesh, same dtype and device.
        verts_canon: ``[N, V, 3]`` the canonical mesh, same dtype and device.
        neighbours: ``[V, K]`` int32 or int64 in ``[-1, V)`` (from :func:`mesh_one_ring`);
            every row that can be chosen must hold at least one vertex.
        vertex_subset: ``[S]`` int32 or int64 vertex indices in ``[0, V)`` (S >= 1), or None.
        backend: ``"cpu"`` (CPU tensors), ``"cuda"`` (CUDA tensors), ``"torch"`` (the
            reference) or ``None``/``"auto"`` (the fastest available).

    Returns:
        ``[N, M, 3]`` in ``points.dtype`` (computed in float32, float64 for float64).
        Differentiable w.r.t. ``points``, ``verts_obs`` and ``verts_canon`` (the
        nearest-vertex choice is piecewise constant).

    Non-finite input, the same on every backend: a NaN distance counts as the nearest
    (as ``argmin`` does: the lowest such vertex); NaN and infinities then propagate
    through the weights of the chosen one-ring only (padding entries add nothing).

    Cost: brute-force nearest vertex, ``N * M * S`` distances, chunked over points to
    2^18 pairs at a time on CPU, 2^22 on CUDA
    (:data:`head4d.reference.deformation.PAIRS_PER_CHUNK`), so memory stays bounded.
    """
    op = "one_ring_deform"
    _check_points(op, "points", points, "[N, M, 3]")
    _check_points(op, "verts_obs", verts_obs, "[N, V, 3]")
    _check_points(op, "verts_canon", verts_canon, "[N, V, 3]")
    _check_batch(op, ("points", points), ("verts_obs", verts_obs))
    if verts_canon.shape != verts_obs.shape:
        raise ValueError(f"{op}: verts_canon has shape {_shape(verts_canon)} but verts_obs has "
                         f"{_shape(verts_obs)}; they must match")
    check_same_dtype(op, [("points", points), ("verts_obs", verts_obs), ("verts_canon", verts_canon)])
    _check_verts_nonempty(op, "verts_obs", verts_obs)
    num_verts = verts_obs.shape[1]
    check_tensor(op, "neighbours", neighbours, "[V, K]", 2, INDEX_DTYPES)
    if neighbours.shape[0] != num_verts or neighbours.shape[1] < 1:
        raise ValueError(f"{op}: neighbours must have shape [V, K] with V = {num_verts} (the vertices of "
                         f"verts_obs) and K >= 1, got {_shape(neighbours)}")
    tensors = [("points", points), ("verts_obs", verts_obs), ("verts_canon", verts_canon),
               ("neighbours", neighbours)]
    if vertex_subset is not None:
        check_tensor(op, "vertex_subset", vertex_subset, "[S]", 1, INDEX_DTYPES)
        if vertex_subset.shape[0] == 0:
            raise ValueError(f"{op}: vertex_subset must hold at least one vertex index, got shape [0]")
        tensors.append(("vertex_subset", vertex_subset))
    device = check_same_device(op, tensors)
    if values_off_host(neighbours):
        _assert_one_ring_tables(op, neighbours, vertex_subset, num_verts)
    else:
        _check_one_ring_tables(op, neighbours, vertex_subset, num_verts)
    chosen = resolve_implemented(op, device, backend, PREFERENCES, IMPLEMENTED[op])
    with nvtx_range("head4d.one_ring_deform"):
        if chosen == "torch":
            return _reference.one_ring_deform(points, verts_obs, verts_canon, neighbours, vertex_subset)
        # head4d::one_ring_deform (:mod:`head4d.ops._library`) also returns the chosen vertex per
        # point, which its backward reuses instead of searching again
        return _library.one_ring_deform(points, verts_obs, verts_canon, neighbours, vertex_subset)[0]


__all__ = ["PORTRAIT4D_BOX_SIDE", "PORTRAIT4D_COARSE_BOUND", "PORTRAIT4D_FINE_BOUND", "cell_centre_bound",
           "closest_triangles", "mesh_one_ring", "one_ring_deform", "sample_grid3d", "smooth_grid3d",
           "surface_field_grid"]
