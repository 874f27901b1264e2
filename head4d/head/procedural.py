"""A built-in, FLAME-like head generated deterministically in code (no download, no randomness).

``ProceduralHead()`` has FLAME's interface and topology conventions so that tests, demos and
benchmarks run on a fresh machine: 5,044 vertices and 10,076 faces (FLAME: 5,023 and 9,976),
five joints with FLAME's tree, 300 shape and 100 expression blendshapes, pose correctives,
skinning weights, eyeball / face / lips vertex sets, a one-ring table and a 728-vertex
companion mesh. Units are FLAME's (metres, +y up, +z the face's forward direction, +x the
head's left); the base class scales by 3 and recentres on the canonical neck joint as
Portrait4D does, after which the canonical head lies inside Portrait4D's 1.3 box.

Geometry (all closed, consistently outward-oriented surfaces):

* **Head**, vertices ``0 .. 3951``: one closed genus-0 surface. Vertices are the boundary
  points of a 25 x 27 x 25 lattice box, projected (equi-angular cube-sphere, tilted 0.2 rad
  down) to directions from the skull centre and placed at a radius given by a smooth
  function of direction: a skull ellipsoid narrowing into a jaw and chin, smoothly united with
  a neck cylinder (closed at the bottom), with nose, brow, cheekbones, ears and eye sockets.
  Being a radial graph, the surface cannot self-intersect. The **mouth** is a pocket: six
  lattice rows of the front face are squeezed into a 1.5 mm gap between the lips and pushed
  2.7 cm inwards, so the upper and lower lips are separate sheets that part when the jaw
  opens (jaw vertices follow the jaw joint by their skinning weights).
* **Eyeballs**, vertices ``3952 .. 4497`` (left, +x) and ``4498 .. 5043`` (right): spheres of
  radius 12.1 mm with exactly 546 vertices and 1,088 faces each, as FLAME's eyeballs (the
  boundary points of an 8 x 8 x 13 lattice box projected to the sphere, so no poles: every
  vertex has at most 8 neighbours). Their fronts stick 5 mm out of the eye sockets; they
  are skinned rigidly to the eye joints (the joint is the sphere centre).
* **Companion mesh**: the boundary of an 11 x 11 x 11 lattice mapped to the head's lattice
  coordinates (skipping the mouth pocket's rows): 728 vertices, 1,452 faces, closed; each
  vertex lies on a head triangle as a barycentric mix of its three vertices.

Blendshapes: shape directions are radial displacements by real spherical harmonics of degree
1..17 (the eyeballs translate rigidly with their socket); expression directions are five
hand-made fields (mouth open, smile, brow raise, pucker, eye closing) followed by face-masked
harmonics; both sets are orthonormalized (QR over all vertex coordinates) and scaled by
decreasing standard deviations, like PCA components. Pose correctives are small (a jaw
opening and a neck pitch corrective).
"""
from __future__ import annotations

import functools
import math
from typing import Dict

import numpy as np
import torch

from . import _mesh
from .base import NUM_EXPRESSION, NUM_POSE_FEATURES, NUM_SHAPE, PORTRAIT4D_SCALE, HeadModel

# ---------------------------------------------------------------------------- parameters
HEAD_LATTICE = (25, 27, 25)
EYE_LATTICE = (8, 8, 13)
COMPANION_LATTICE = (11, 11, 11)
TILT = 0.0  # rotation (about x) of the cube-sphere's front face below horizontal
STAR_CENTRE = (0.0, -0.035, 0.0)  # every head vertex is on a ray from here
BOX_ASPECT = (1.0, 1.0, 1.35)  # a deeper box: the front (face) gets more lattice cells per angle
SKULL_CENTRE = (0.0, 0.0, 0.0)

EYE_RADIUS = 0.0121
EYE_AZIMUTH = 0.32  # +-, radians from the front
EYE_ELEVATION = 0.48  # seen from STAR_CENTRE, as every angle here
EYE_PROTRUSION = 0.005

MOUTH_ELEVATION = -0.14  # the mouth line
MOUTH_BAND_START = 8  # first lattice row of the pocket (the lower lip's edge)
MOUTH_BAND_ROWS = 6  # the pocket spans rows [start, start + rows]
MOUTH_GAP = 0.03  # gap between the lips in cube-face units (about 1.5 mm)
MOUTH_DEPTH = 0.028
MOUTH_HALF_WIDTH = 0.45  # cube-face units (the pocket is about 4 cm wide)

NECK_AXIS_Z = -0.022
NECK_RADIUS = 0.056
NECK_BOTTOM = -0.215
NECK_JOINT = (0.0, -0.07, NECK_AXIS_Z)
JAW_JOINT = (0.0, -0.025, 0.008)
ROOT_JOINT = (0.0, NECK_BOTTOM + 0.02, NECK_AXIS_Z)


def _smax(a, b, k):
    return 0.5 * (a + b + np.sqrt((a - b) ** 2 + k * k))


def _smin(a, b, k):
    return 0.5 * (a + b - np.sqrt((a - b) ** 2 + k * k))


def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(x, x0, s):
    return np.exp(-((x - x0) / s) ** 2)


def _angles(d):
    """Azimuth (0 at the front, +x positive) and elevation of unit directions ``[M, 3]``."""
    return np.arctan2(d[:, 0], d[:, 2]), np.arcsin(np.clip(d[:, 1], -1.0, 1.0))


def _rot_x(t):
    c, s = math.cos(t), math.sin(t)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


# ---------------------------------------------------------------------------- lattice boxes
def box_lattice(n):
    """Boundary points of the lattice box ``[0, nx] x [0, ny] x [0, nz]`` and its outward
    triangulation.

    Returns ``(points [P, 3] int64, faces [4 (nx ny + ny nz + nz nx), 3] int64, index [nx+1, ny+1, nz+1])``
    with ``P = 2 (nx ny + ny nz + nz nx) + 2``; every lattice quad is split along its
    (i, j) -> (i+1, j+1) diagonal in the face's two in-plane axes (in ascending axis order).
    """
    nx, ny, nz = n
    g = np.stack(np.meshgrid(np.arange(nx + 1), np.arange(ny + 1), np.arange(nz + 1), indexing="ij"), -1)
    on = ((g[..., 0] == 0) | (g[..., 0] == nx) | (g[..., 1] == 0) | (g[..., 1] == ny)
          | (g[..., 2] == 0) | (g[..., 2] == nz))
    index = np.full(on.shape, -1, dtype=np.int64)
    index[on] = np.arange(int(on.sum()))
    points = g[on].astype(np.int64)
    faces = []
    for axis in range(3):
        p, q = [a for a in range(3) if a != axis]
        for side in (0, n[axis]):
            i, j = np.meshgrid(np.arange(n[p]), np.arange(n[q]), indexing="ij")
            i, j = i.ravel(), j.ravel()

            def vid(a, b):
                c = [None, None, None]
                c[axis] = np.full_like(a, side)
                c[p], c[q] = a, b
                return index[c[0], c[1], c[2]]

            a00, a10, a11, a01 = vid(i, j), vid(i + 1, j), vid(i + 1, j + 1), vid(i, j + 1)
            tri = np.concatenate([np.stack([a00, a10, a11], 1), np.stack([a00, a11, a01], 1)], 0)
            # orient outward: the in-plane (p, q) basis is right-handed with +axis iff (p, q, axis) is cyclic
            cyclic = (p, q, axis) in ((0, 1, 2), (1, 2, 0), (2, 0, 1))
            outward_positive = side != 0
            if cyclic != outward_positive:
                tri = tri[:, [0, 2, 1]]
            faces.append(tri)
    return points, np.concatenate(faces, 0), index


def lattice_triangle(n, index, frac):
    """The lattice-box triangle containing each fractional boundary point and its barycentrics.

    Args:
        n: lattice size ``(nx, ny, nz)``; index: the ``index`` array of :func:`box_lattice`.
        frac: ``[M, 3]`` float points on the box boundary (one coordinate at 0 or its maximum).

    Returns:
        ``(vertex ids [M, 3] int64, weights [M, 3] float64)``.
    """
    frac = np.asarray(frac, dtype=np.float64)
    m = len(frac)
    n_arr = np.array(n, dtype=np.float64)
    on = np.isclose(frac, 0.0) | np.isclose(frac, n_arr)
    axis = np.argmax(on, axis=1)
    ids = np.zeros((m, 3), dtype=np.int64)
    wts = np.zeros((m, 3))
    for a in range(3):
        sel = np.nonzero(axis == a)[0]
        if len(sel) == 0:
            continue
        p, q = [b for b in range(3) if b != a]
        side = np.where(np.isclose(frac[sel, a], 0.0), 0, n[a])
        s, t = frac[sel, p], frac[sel, q]
        i0 = np.clip(np.floor(s), 0, n[p] - 1).astype(np.int64)
        j0 = np.clip(np.floor(t), 0, n[q] - 1).astype(np.int64)
        fs, ft = s - i0, t - j0

        def vid(ii, jj):
            c = [None, None, None]
            c[a] = side
            c[p], c[q] = ii, jj
            return index[c[0], c[1], c[2]]

        a00, a10, a11, a01 = vid(i0, j0), vid(i0 + 1, j0), vid(i0 + 1, j0 + 1), vid(i0, j0 + 1)
        lower = fs >= ft
        ids[sel] = np.where(lower[:, None], np.stack([a00, a10, a11], 1), np.stack([a00, a11, a01], 1))
        wts[sel] = np.where(lower[:, None], np.stack([1 - fs, fs - ft, ft], 1), np.stack([1 - ft, fs, ft - fs], 1))
    return ids, wts


# ---------------------------------------------------------------------------- head surface
def _mouth_profile(x_face):
    """Pocket depth weight, row-squeeze weight and lip gap along the front face's X."""
    ax = np.abs(x_face)
    pocket = 1.0 - _smoothstep(0.6 * MOUTH_HALF_WIDTH, MOUTH_HALF_WIDTH, ax)
    squeeze = 1.0 - _smoothstep(MOUTH_HALF_WIDTH + 0.1, 0.95, ax)
    gap = MOUTH_GAP + 0.25 * _smoothstep(MOUTH_HALF_WIDTH + 0.01, MOUTH_HALF_WIDTH + 0.25, ax)
    return pocket, squeeze, gap


def _mouth_rows(j, ny, ym, gap):
    """Squeezed front-face row coordinate: rows cluster at the lips, the pocket fills the gap."""
    jb, p = MOUTH_BAND_START, MOUTH_BAND_ROWS
    lo, hi = ym - gap / 2, ym + gap / 2
    below = -1.0 + (lo + 1.0) * (1.0 - ((jb - j) / jb).clip(0, 1) ** 1.4)
    band = lo + (hi - lo) * ((j - jb) / p)
    above = hi + (1.0 - hi) * ((j - jb - p) / (ny - jb - p)).clip(0, 1) ** 1.6
    return np.where(j <= jb, below, np.where(j >= jb + p, above, band))


def _skull_radius(d):
    """Distance from STAR_CENTRE to the skull-and-neck surface along unit directions
    ``d [M, 3]``, and the head-versus-neck blend weight (1 on the skull, 0 on the neck)."""
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    low = _smoothstep(0.0, 0.9, -dy)
    axes = np.stack([0.078 * (1.0 - 0.22 * low), 0.105 + 0.025 * low, 0.103 - 0.005 * np.tanh(4.0 * dz)], 1)
    # skull: a direction-dependent ellipsoid around SKULL_CENTRE, hit from STAR_CENTRE (inside it)
    o = (np.array(STAR_CENTRE) - np.array(SKULL_CENTRE))[None] / axes
    q = d / axes
    oq, qq, oo = (o * q).sum(1), (q * q).sum(1), (o * o).sum(1)
    r_head = (-oq + np.sqrt(oq * oq - qq * (oo - 1.0))) / qq
    # neck: a vertical cylinder (axis x = 0, z = NECK_AXIS_Z) from NECK_BOTTOM up into the skull
    sy, sz = STAR_CENTRE[1], STAR_CENTRE[2]
    h2 = np.maximum(dx * dx + dz * dz, 1e-12)
    zn, a = NECK_AXIS_Z - sz, NECK_RADIUS
    t_side = (dz * zn + np.sqrt((dz * zn) ** 2 - h2 * (zn * zn - a * a))) / h2
    t_bottom = np.where(dy < -1e-9, (NECK_BOTTOM - sy) / np.minimum(dy, -1e-9), 1e3)
    t_top = np.where(dy > 1e-9, (0.02 - sy) / np.maximum(dy, 1e-9), 1e3)
    r_neck = np.minimum(_smin(t_side, t_bottom, 0.03), t_top)
    r = _smax(r_head, r_neck, 0.012)
    diff = r_head - r_neck
    head_weight = 0.5 * (1.0 + diff / np.sqrt(diff * diff + 0.03 ** 2))
    return r, head_weight


def _features(d):
    """Radial relief of the face: nose, brow, cheekbones, chin, ears, eye sockets."""
    az, el = _angles(d)
    ramp = np.clip((0.42 - el) / 0.37, 0.0, 1.0) ** 1.5
    tip_falloff = np.exp(-(np.maximum(0.0, 0.05 - el) / 0.05) ** 2)
    nose = 0.022 * ramp * tip_falloff * _gauss(az, 0.0, 0.06 + 0.05 * ramp)
    brow = 0.005 * _gauss(az, 0.0, 0.55) * _gauss(el, 0.62, 0.09)
    cheeks = 0.005 * (_gauss(az, 0.62, 0.2) + _gauss(az, -0.62, 0.2)) * _gauss(el, 0.28, 0.15)
    chin = 0.010 * _gauss(az, 0.0, 0.28) * _gauss(el, -0.62, 0.16)
    ears = 0.014 * (_gauss(az, math.pi / 2, 0.09) + _gauss(az, -math.pi / 2, 0.09)) * _gauss(el, 0.4, 0.2)
    sockets = -0.011 * (_gauss(az, EYE_AZIMUTH, 0.17) + _gauss(az, -EYE_AZIMUTH, 0.17)) \
        * _gauss(el, EYE_ELEVATION, 0.14)
    return nose + brow + cheeks + chin + ears + sockets


def _bottom_warp(z):
    """Spread the cube's bottom face along z so the throat (rays grazing the front of the neck)
    gets as many lattice rows as its length needs; monotone, fixes -1 and 1."""
    grid = np.linspace(-1.0, 1.0, 2001)
    density = 1.0 + 2.0 * np.exp(-((grid - 0.45) / 0.25) ** 2)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(grid))])
    u_of_grid = -1.0 + 2.0 * cum / cum[-1]
    return np.interp(z, u_of_grid, grid)


def _direction(az, el):
    return np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])


def _real_sh(d, lmax):
    """Real spherical harmonics of degrees 1..lmax at unit directions (pole +y): ``[M, (lmax+1)^2 - 1]``."""
    x = np.clip(d[:, 1], -1.0, 1.0)
    phi = np.arctan2(d[:, 0], d[:, 2])
    sx = np.sqrt(np.maximum(0.0, 1.0 - x * x))
    cols = []
    pmm = np.ones_like(x)
    leg = {}
    for m in range(lmax + 1):
        if m > 0:
            pmm = -pmm * (2 * m - 1) * sx
        leg[(m, m)] = pmm
        if m + 1 <= lmax:
            leg[(m + 1, m)] = x * (2 * m + 1) * pmm
        for ll in range(m + 2, lmax + 1):
            leg[(ll, m)] = ((2 * ll - 1) * x * leg[(ll - 1, m)] - (ll + m - 1) * leg[(ll - 2, m)]) / (ll - m)
    for ll in range(1, lmax + 1):
        for m in range(-ll, ll + 1):
            am = abs(m)
            k = math.sqrt((2 * ll + 1) / (4 * math.pi) * math.factorial(ll - am) / math.factorial(ll + am))
            if m == 0:
                cols.append(k * leg[(ll, 0)])
            elif m > 0:
                cols.append(math.sqrt(2) * k * np.cos(m * phi) * leg[(ll, m)])
            else:
                cols.append(math.sqrt(2) * k * np.sin(am * phi) * leg[(ll, am)])
    return np.stack(cols, 1)


def _orthonormalize(mat):
    """Orthonormal columns spanning ``mat [M, K]`` (float64), each keeping its direction
    relative to the previous ones (Gram-Schmidt order): Cholesky QR, twice, in torch
    (NumPy's QR is several times slower on small machines); Householder QR if ill-conditioned."""
    t = torch.from_numpy(np.ascontiguousarray(mat, dtype=np.float64))
    try:
        for _ in range(2):
            chol = torch.linalg.cholesky(t.T @ t)
            t = torch.linalg.solve_triangular(chol, t.T, upper=False).T
    except RuntimeError:  # pragma: no cover - the built-in fields are well conditioned
        q, r = torch.linalg.qr(torch.from_numpy(np.asarray(mat, dtype=np.float64)))
        t = q * torch.sign(torch.where(torch.diagonal(r) == 0, torch.ones(()), torch.diagonal(r)))
    return t.numpy()


def _orthonormal_dirs(fields, sigmas):
    """Orthonormalize displacement fields ``[V, 3, K]`` over all 3V coordinates, then scale."""
    v, _, k = fields.shape
    return (_orthonormalize(fields.reshape(v * 3, k)) * sigmas[None]).reshape(v, 3, k)


def _orthonormal_radial_dirs(scalars, directions, sigmas):
    """Radial fields ``scalars [V, K] * directions [V, 3]`` (unit directions): orthonormalizing
    the scalars orthonormalizes the fields over all 3V coordinates."""
    q = _orthonormalize(scalars) * sigmas[None]
    return q[:, None, :] * directions[:, :, None]


def _affine_weights(points, target):
    """Least-norm weights w (sum 1) with ``sum w_i points_i = target``."""
    a = np.concatenate([np.ones((1, len(points))), points.T], 0)  # [4, n]
    b = np.append(1.0, target)
    return a.T @ np.linalg.solve(a @ a.T, b)


def build_arrays() -> Dict[str, np.ndarray]:
    """Generate the procedural head's arrays (deterministic; float64 / int64 NumPy).

    Returns a dict with ``v_template [V, 3]``, ``faces [F, 3]``, ``shapedirs [V, 3, 300]``,
    ``exprdirs [V, 3, 100]``, ``posedirs [V, 3, 36]``, ``j_regressor [5, V]``,
    ``lbs_weights [V, 5]``, ``left_eye``, ``right_eye``, ``lips`` (vertex index arrays),
    ``companion_indices [K, 3]``, ``companion_weights [K, 3]``, ``companion_faces [Fc, 3]``,
    ``head_vertices`` (the number of skull/face/neck vertices) and ``one_ring [V, 10]``,
    in FLAME-like units (metres, before Portrait4D's scaling).
    """
    n = HEAD_LATTICE
    nx, ny, nz = n
    pts, head_faces, head_index = box_lattice(n)
    nh = len(pts)
    u = 2.0 * pts / np.array(n, dtype=np.float64) - 1.0  # [-1, 1]^3
    front = pts[:, 2] == nz
    x_face = u[:, 0]
    pocket_w, squeeze, gap = _mouth_profile(x_face)
    ym = math.atan(math.tan(MOUTH_ELEVATION + TILT) * BOX_ASPECT[2] / BOX_ASPECT[1]) / (math.pi / 4)
    y_mouth = _mouth_rows(pts[:, 1].astype(np.float64), ny, ym, gap)
    y_warp = np.where(front, (1.0 - squeeze) * u[:, 1] + squeeze * y_mouth, u[:, 1])
    uw = u.copy()
    uw[:, 1] = y_warp
    bottom = pts[:, 1] == 0
    uw[:, 2] = np.where(bottom, _bottom_warp(u[:, 2]), u[:, 2])
    cube = np.tan(math.pi / 4 * uw) * np.array(BOX_ASPECT)[None]
    d = cube @ _rot_x(TILT).T
    d /= np.linalg.norm(d, axis=1, keepdims=True)

    r_skull, head_weight = _skull_radius(d)
    r = r_skull + _features(d)
    # mouth pocket (front-face rows of the band) and lips
    jrow = pts[:, 1].astype(np.float64)
    t_band = (jrow - MOUTH_BAND_START) / MOUTH_BAND_ROWS
    in_band = front & (t_band >= 0) & (t_band <= 1)
    r = r - np.where(in_band, MOUTH_DEPTH * pocket_w * np.sin(math.pi * np.clip(t_band, 0, 1)), 0.0)
    lip_w = np.exp(-(np.abs(x_face) / (0.9 * MOUTH_HALF_WIDTH)) ** 4)
    upper = _gauss(y_warp, ym + gap / 2 + 0.05, 0.045)
    lower = _gauss(y_warp, ym - gap / 2 - 0.05, 0.045)
    r = r + np.where(front & ~in_band, 0.006 * lip_w * (upper + lower), 0.0)
    head_v = np.array(STAR_CENTRE)[None] + d * r[:, None]

    # eyeballs
    e_pts, e_faces, _ = box_lattice(EYE_LATTICE)
    e_dir = e_pts - np.array(EYE_LATTICE, dtype=np.float64) / 2.0
    e_dir /= np.linalg.norm(e_dir, axis=1, keepdims=True)
    centres, eye_dirs = [], []
    for sign in (1.0, -1.0):  # left eye at +x, then right
        de = _direction(sign * EYE_AZIMUTH, EYE_ELEVATION)
        rs = _skull_radius(de[None])[0][0] + _features(de[None])[0]
        centres.append(np.array(STAR_CENTRE) + de * (rs - EYE_RADIUS + EYE_PROTRUSION))
        eye_dirs.append(de)
    ne = len(e_pts)
    verts = np.concatenate([head_v, centres[0] + EYE_RADIUS * e_dir, centres[1] + EYE_RADIUS * e_dir], 0)
    faces = np.concatenate([head_faces, e_faces + nh, e_faces + nh + ne], 0)
    nv = len(verts)
    left = np.arange(nh, nh + ne)
    right = np.arange(nh + ne, nh + 2 * ne)
    # per-vertex direction used by the blendshapes (eyeballs: their socket's direction)
    dir_all = np.concatenate([d, np.repeat(eye_dirs[0][None], ne, 0), np.repeat(eye_dirs[1][None], ne, 0)], 0)
    is_head = np.zeros(nv, dtype=bool)
    is_head[:nh] = True

    # ------------------------------------------------------------------ skinning weights
    az, el = _angles(d)
    jm = MOUTH_BAND_START + MOUTH_BAND_ROWS / 2 - 0.5  # the deepest pocket row goes with the upper lip
    tau = np.where(front, 0.15 + 2.35 * (1.0 - pocket_w), 2.5)
    below = 1.0 / (1.0 + np.exp(-(jm - jrow) / tau))
    below = np.where(pts[:, 1] == 0, 1.0, below)
    forward = 1.0 - _smoothstep(1.0, 1.6, np.abs(az))
    w_jaw = below * forward * head_weight ** 2
    low_neck = _smoothstep(NECK_JOINT[1] - 0.015, NECK_JOINT[1] - 0.095, head_v[:, 1])
    w_root = (1.0 - w_jaw) * low_neck
    w_neck = 1.0 - w_jaw - w_root
    weights = np.zeros((nv, 5))
    weights[:nh, 0] = w_root
    weights[:nh, 1] = w_neck
    weights[:nh, 2] = w_jaw
    weights[left, 3] = 1.0
    weights[right, 4] = 1.0

    # ------------------------------------------------------------------ joint regressor
    jr = np.zeros((5, nv))
    for j, target, sel in (
            (0, ROOT_JOINT, is_head & (verts[:, 1] < NECK_BOTTOM + 0.03)),
            (1, NECK_JOINT, is_head & (np.abs(verts[:, 1] - NECK_JOINT[1]) < 0.012)),
            (2, JAW_JOINT, is_head & (np.abs(verts[:, 1] - JAW_JOINT[1]) < 0.015)
             & (np.abs(verts[:, 2] - JAW_JOINT[2]) < 0.03))):
        idx = np.nonzero(sel)[0]
        jr[j, idx] = _affine_weights(verts[idx], np.array(target))
    jr[3, left] = 1.0 / ne
    jr[4, right] = 1.0 / ne

    # ------------------------------------------------------------------ shape blendshapes
    sh = _real_sh(dir_all, 17)[:, :NUM_SHAPE]  # [V, 300]
    shape_sigmas = 0.3 * (1.0 + np.arange(NUM_SHAPE)) ** -1.2
    shapedirs = _orthonormal_radial_dirs(sh, dir_all, shape_sigmas)

    # ------------------------------------------------------------------ expression blendshapes
    face_mask = np.zeros(nv)
    face_mask[:nh] = _smoothstep(-0.1, 0.55, d[:, 2]) * head_weight
    lower_face = np.zeros(nv)
    lower_face[:nh] = w_jaw
    hv = np.zeros((nv, 3))
    hv[:nh] = d
    az_all = np.zeros(nv)
    el_all = np.zeros(nv)
    az_all[:nh], el_all[:nh] = az, el
    g = lambda a0, sa, e0, se: _gauss(az_all, a0, sa) * _gauss(el_all, e0, se) * face_mask  # noqa: E731
    semantic = np.zeros((nv, 3, 5))
    semantic[:, :, 0] = lower_face[:, None] * np.array([0.0, -1.0, -0.3])  # mouth open
    corners = g(0.28, 0.15, MOUTH_ELEVATION, 0.12) + g(-0.28, 0.15, MOUTH_ELEVATION, 0.12)
    semantic[:, 0, 1] = 0.4 * np.sign(az_all) * corners  # smile: corners out, up and back
    semantic[:, 1, 1] = 0.6 * corners
    semantic[:, 2, 1] = -0.3 * corners
    semantic[:, 1, 2] = g(0.0, 0.6, 0.62, 0.12)  # brows up
    semantic[:, :, 3] = (g(0.0, 0.25, MOUTH_ELEVATION, 0.12))[:, None] * np.array([0.0, 0.0, 1.0])  # pucker
    lids = g(EYE_AZIMUTH, 0.12, EYE_ELEVATION + 0.07, 0.07) + g(-EYE_AZIMUTH, 0.12, EYE_ELEVATION + 0.07, 0.07)
    semantic[:, :, 4] = lids[:, None] * np.array([0.0, -1.0, 0.2])  # eyes closing
    sh_face = _real_sh(np.where(is_head[:, None], dir_all, np.array([0.0, 0.0, 1.0])), 10)
    masked = (sh_face[:, 3:3 + NUM_EXPRESSION - 5] * face_mask[:, None])[:, None, :] * hv[:, :, None]
    expr_fields = np.concatenate([semantic, masked], 2)
    expr_sigmas = 0.2 * (1.0 + np.arange(NUM_EXPRESSION)) ** -1.1
    exprdirs = _orthonormal_dirs(expr_fields, expr_sigmas)

    # ------------------------------------------------------------------ pose correctives
    posedirs = np.zeros((nv, 3, NUM_POSE_FEATURES))
    cheeks = g(0.45, 0.2, MOUTH_ELEVATION, 0.15) + g(-0.45, 0.2, MOUTH_ELEVATION, 0.15)
    posedirs[:, :, 9 + 7] = -0.006 * cheeks[:, None] * hv  # jaw (R - I)[2, 1] = sin(jaw pitch)
    throat = np.zeros(nv)
    throat[:nh] = (1.0 - head_weight) * _smoothstep(0.0, 0.6, d[:, 2]) * (1.0 - low_neck)
    posedirs[:, :, 7] = 0.004 * throat[:, None] * hv  # neck (R - I)[2, 1]

    # ------------------------------------------------------------------ vertex sets
    lips = np.nonzero(front & (np.abs(x_face) < MOUTH_HALF_WIDTH + 0.1) & (jrow >= MOUTH_BAND_START - 3)
                      & (jrow <= MOUTH_BAND_START + MOUTH_BAND_ROWS + 3))[0]

    # ------------------------------------------------------------------ companion mesh
    c_pts, c_faces, _ = box_lattice(COMPANION_LATTICE)
    frac = c_pts / np.array(COMPANION_LATTICE, dtype=np.float64)
    fine = frac * np.array(n, dtype=np.float64)
    s = frac[:, 1] * (ny - MOUTH_BAND_ROWS)  # skip the pocket's rows
    fine[:, 1] = np.where(s <= MOUTH_BAND_START, s, s + MOUTH_BAND_ROWS)
    c_idx, c_w = lattice_triangle(n, head_index, fine)

    return {"v_template": verts, "faces": faces, "shapedirs": shapedirs, "exprdirs": exprdirs,
            "posedirs": posedirs, "j_regressor": jr, "lbs_weights": weights, "left_eye": left,
            "right_eye": right, "lips": lips, "companion_indices": c_idx, "companion_weights": c_w,
            "companion_faces": c_faces, "head_vertices": nh,
            "one_ring": _mesh.one_ring(faces, nv, _mesh.ONE_RING_SIZE)}


@functools.lru_cache(maxsize=1)
def _cached_arrays():
    arrays = build_arrays()
    for a in arrays.values():
        if isinstance(a, np.ndarray):
            a.setflags(write=False)
    return arrays


class ProceduralHead(HeadModel):
    """The built-in FLAME-like head (see the module docstring for its construction).

    ``forward(shape [N, 300], expression [N, 100], neck_pose [N, 3], jaw_pose [N, 3],
    eye_pose [N, 6]) -> [N, 5044, 3]``; every buffer and the units are described in
    :class:`~head4d.head.base.HeadModel`. Sizes: 5,044 vertices, 10,076 faces; eyeballs
    546 vertices each (``left_eye_indices``, ``right_eye_indices``); companion mesh 728
    vertices and 1,452 faces. The arrays are generated once per process (about a second)
    and shared by every instance.

    Args:
        scale: vertex scale (Portrait4D: 3).
        dtype: float32 (default) or float64 buffers.
    """

    def __init__(self, *, scale: float = PORTRAIT4D_SCALE, dtype: torch.dtype = torch.float32):
        a = _cached_arrays()
        self.head_vertices = int(a["head_vertices"])
        super().__init__(v_template=a["v_template"], faces=a["faces"], shapedirs=a["shapedirs"],
                         exprdirs=a["exprdirs"], posedirs=a["posedirs"], j_regressor=a["j_regressor"],
                         lbs_weights=a["lbs_weights"], left_eye=a["left_eye"], right_eye=a["right_eye"],
                         lips=a["lips"], companion_indices=a["companion_indices"],
                         companion_weights=a["companion_weights"], companion_faces=a["companion_faces"],
                         one_ring=a["one_ring"], scale=scale, dtype=dtype)

    @property
    def head_indices(self) -> torch.Tensor:
        """``[3952]`` int64: the skull / face / neck surface's vertices (the closed head part)."""
        return torch.arange(self.head_vertices, device=self.device)
