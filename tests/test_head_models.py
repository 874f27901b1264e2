"""Head models (head4d.head): FLAME loading without chumpy, LBS, Portrait4D's scaling and
recentring, the label layout, and the built-in procedural head."""
import contextlib
import math
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from head4d.head import (FLAME, LABEL_LAYOUT, ProceduralHead, make_labels, parse_labels, rodrigues)
from head4d.head import _mesh
from head4d.head import procedural as procedural_mod

NV, NF = 12, 20  # the small test model: an icosahedron


# ----------------------------------------------------------------------------- a small FLAME file
class FakeCh:
    """Pickles like chumpy's ``Ch``: class ``chumpy.ch.Ch``, value in the state's ``'x'``."""

    def __init__(self, x):
        self.x = np.asarray(x, dtype=np.float64)

    def __getstate__(self):  # chumpy drops its weak-reference caches and keeps the rest
        return {"x": self.x, "_dirty_vars": set(), "_itr": None, "_depends_on_deps": {},
                "_make_dense": False, "_make_sparse": False}


class FakeCsc:
    """Pickles like an old ``scipy.sparse.csc.csc_matrix`` (used when scipy is not installed)."""

    def __init__(self, dense):
        dense = np.asarray(dense, dtype=np.float64)
        data, indices, indptr = [], [], [0]
        for c in range(dense.shape[1]):
            rows = np.nonzero(dense[:, c])[0]
            data.extend(dense[rows, c])
            indices.extend(rows)
            indptr.append(len(data))
        self._state = {"_shape": dense.shape, "maxprint": 50, "data": np.array(data),
                       "indices": np.array(indices, dtype=np.int32), "indptr": np.array(indptr, dtype=np.int32)}

    def __getstate__(self):
        return self._state


def _have_scipy():
    try:
        import scipy.sparse  # noqa: F401
        return True
    except Exception:
        return False


HAVE_SCIPY = _have_scipy()  # decided before any fake module is registered


@contextlib.contextmanager
def _fake_modules():
    """Register chumpy.ch.Ch (and, without scipy, scipy.sparse.csc.csc_matrix) only while pickling."""
    added = {}
    names = {"chumpy": None, "chumpy.ch": ("Ch", FakeCh)}
    if not HAVE_SCIPY:
        names.update({"scipy": None, "scipy.sparse": None, "scipy.sparse.csc": ("csc_matrix", FakeCsc)})
    saved = {(cls, attr): getattr(cls, attr) for cls in (FakeCh, FakeCsc) for attr in ("__module__", "__qualname__")}
    try:
        for mod, cls in names.items():
            if mod in sys.modules:
                continue
            m = types.ModuleType(mod)
            if cls is not None:
                name, obj = cls
                obj.__module__, obj.__qualname__ = mod, name
                setattr(m, name, obj)
            sys.modules[mod] = m
            added[mod] = m
        yield
    finally:
        for mod in added:
            del sys.modules[mod]
        for (cls, attr), value in saved.items():
            setattr(cls, attr, value)


def _icosahedron():
    t = (1 + 5 ** 0.5) / 2
    v = np.array([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t], [0, 1, -t],
                  [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], dtype=np.float64)
    f = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2],
                  [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5],
                  [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]], dtype=np.uint32)
    return v * 0.05, f


# joint of each test vertex: 0..5 neck, 6..7 jaw, 8..9 left eye, 10..11 right eye
VERTEX_JOINT = np.array([1, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 4])


def _small_model(seed=0):
    rng = np.random.default_rng(seed)
    v, f = _icosahedron()
    v = v + np.array([0.0, 0.02, 0.01])
    weights = np.zeros((NV, 5))
    weights[np.arange(NV), VERTEX_JOINT] = 1.0
    weights[0] = [0.3, 0.7, 0, 0, 0]  # a blended vertex (root + neck)
    jr = np.zeros((5, NV))
    jr[0] = 1.0 / NV
    for j in range(1, 5):
        sel = VERTEX_JOINT == j
        jr[j, sel] = 1.0 / sel.sum()
    shapedirs = rng.normal(scale=1e-3, size=(NV, 3, 400))
    posedirs = rng.normal(scale=1e-3, size=(NV, 3, 36))
    # correctives of joint j (block j - 1) only move vertices bound to j; none for the eyes
    for j in range(1, 5):
        posedirs[:, :, 9 * (j - 1):9 * j] *= (VERTEX_JOINT == j)[:, None, None] * (j <= 2)
    kintree = np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)
    return {"v_template": v, "f": f, "shapedirs": shapedirs, "posedirs": posedirs, "J_regressor": jr,
            "weights": weights, "kintree_table": kintree, "bs_style": "lbs", "bs_type": "lrotmin"}


def _write_model(path, model, protocol=2):
    """Write ``model`` as the official file is written: chumpy arrays, sparse J_regressor."""
    with _fake_modules():
        out = dict(model)
        for key in ("v_template", "shapedirs", "posedirs", "weights"):
            if key in out:
                out[key] = FakeCh(out[key])
        if "J_regressor" in out:
            if HAVE_SCIPY:
                import scipy.sparse
                out["J_regressor"] = scipy.sparse.csc_matrix(out["J_regressor"])
            else:
                out["J_regressor"] = FakeCsc(out["J_regressor"])
        with open(path, "wb") as fh:
            pickle.dump(out, fh, protocol=protocol)
    assert "chumpy" not in sys.modules


def _write_masks(path):
    masks = {"left_eyeball": np.array([8, 9]), "right_eyeball": np.array([10, 11]),
             "lips": np.array([5, 6, 7]), "face": np.arange(8)}
    with open(path, "wb") as fh:
        pickle.dump(masks, fh, protocol=2)


@pytest.fixture(scope="module")
def flame_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("flame")
    _write_model(d / "generic_model.pkl", _small_model())
    _write_masks(d / "FLAME_masks.pkl")
    return d


@pytest.fixture(scope="module")
def flame64(flame_files):
    return FLAME.from_file(flame_files / "generic_model.pkl", flame_files / "FLAME_masks.pkl", dtype=torch.float64)


# ----------------------------------------------------------------------------- a NumPy LBS reference
def _rot(aa):
    th = np.linalg.norm(aa)
    if th < 1e-12:
        return np.eye(3)
    k = aa / th
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(th) * kx + (1 - math.cos(th)) * kx @ kx


def _reference_lbs(model, shape, expr, pose, scale=3.0):
    """Straight FLAME/SMPL LBS for one head, then Portrait4D's x3 and neck recentring."""
    v_t, sd, pd = model["v_template"], model["shapedirs"], model["posedirs"]
    jr, w = model["J_regressor"], model["weights"]
    parents = [-1, 0, 1, 1, 1]
    origin = scale * (jr @ v_t)[1]
    vs = v_t + sd[:, :, :300] @ shape + sd[:, :, 300:400] @ expr
    joints = jr @ vs
    rots = [_rot(p) for p in pose]
    feat = np.concatenate([(r - np.eye(3)).ravel() for r in rots[1:]])
    vp = vs + pd @ feat
    g = []
    for j in range(5):
        local = np.eye(4)
        local[:3, :3] = rots[j]
        local[:3, 3] = joints[j] - (joints[parents[j]] if j else 0)
        g.append(local if j == 0 else g[parents[j]] @ local)
    out = np.zeros_like(vp)
    for i in range(len(vp)):
        t = sum(w[i, j] * (g[j] @ np.append(vp[i] - joints[j], 1.0))[:3] for j in range(5))
        out[i] = t
    return scale * out - origin, scale * np.array([gj[:3, 3] for gj in g]) - origin


def _random_codes(n, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return {"shape": r(n, 300) * scale, "expression": r(n, 100) * scale, "neck_pose": r(n, 3) * 0.3,
            "jaw_pose": r(n, 3) * 0.2, "eye_pose": r(n, 6) * 0.3}


# ----------------------------------------------------------------------------- rotation
def test_rodrigues_matches_closed_form_and_is_smooth_at_zero():
    aa = torch.tensor([[0.3, 0.0, 0.0], [0.0, 0.0, 0.0], [0.1, -0.4, 0.25], [1e-6, 0, 0]], dtype=torch.float64)
    r = rodrigues(aa)
    for a, m in zip(aa.numpy(), r.numpy()):
        np.testing.assert_allclose(m, _rot(a), atol=1e-12)
    c, s = math.cos(0.3), math.sin(0.3)
    np.testing.assert_allclose(r[0].numpy(), [[1, 0, 0], [0, c, -s], [0, s, c]], atol=1e-15)
    # smooth at zero: the gradient there is the closed form's, d/da of I + [a]_x (+ O(a^2)):
    # each generator of [a]_x sums to 0 over the matrix, so d sum(R) / da = 0 exactly, and
    # finite differences across zero agree with autograd
    z = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    rodrigues(z).sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    weights = torch.randn(1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (grad_at_zero,) = torch.autograd.grad((rodrigues(z) * weights).sum(), z)
    skew = weights[0] - weights[0].T  # d <W, [a]_x> / da: the axial vector of W - W^T
    torch.testing.assert_close(grad_at_zero[0], torch.stack([skew[2, 1], skew[0, 2], skew[1, 0]]),
                               rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(rodrigues, (z.detach().clone().requires_grad_(True),))
    aa = torch.tensor([[0.2, -0.1, 0.3]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rodrigues, (aa,))


# ----------------------------------------------------------------------------- FLAME loading
def test_flame_loads_chumpy_pickle_without_chumpy(flame_files, flame64):
    assert "chumpy" not in sys.modules
    m = flame64
    assert m.num_vertices == NV and m.num_faces == NF
    assert m.faces.dtype == torch.int64 and m.faces.shape == (NF, 3)
    src = _small_model()
    np.testing.assert_array_equal(m.faces.numpy(), src["f"].astype(np.int64))
    np.testing.assert_allclose(m.shapedirs.numpy(), 3 * src["shapedirs"][:, :, :300])
    np.testing.assert_allclose(m.exprdirs.numpy(), 3 * src["shapedirs"][:, :, 300:])
    np.testing.assert_allclose(m.j_regressor.numpy(), src["J_regressor"])
    assert m.parents.tolist() == [-1, 0, 1, 1, 1]
    assert m.left_eye_indices.tolist() == [8, 9] and m.right_eye_indices.tolist() == [10, 11]
    assert m.lips.tolist() == [5, 6, 7]
    assert m.face_indices.tolist() == list(range(8))
    assert set(m.masks) == {"left_eyeball", "right_eyeball", "lips", "face"}


@pytest.mark.parametrize("protocol", [0, 4])
def test_flame_loads_other_pickle_protocols(tmp_path, protocol):
    _write_model(tmp_path / "m.pkl", _small_model(), protocol=protocol)
    m = FLAME.from_file(tmp_path / "m.pkl", dtype=torch.float64)
    np.testing.assert_allclose(m.j_regressor.numpy(), _small_model()["J_regressor"])


def test_flame_lbs_matches_reference(flame64):
    src = _small_model()
    codes = _random_codes(3, seed=1, scale=2.0)
    verts, joints = flame64(**codes, return_joints=True)
    assert verts.shape == (3, NV, 3) and verts.dtype == torch.float64 and joints.shape == (3, 5, 3)
    for i in range(3):
        pose = np.stack([np.zeros(3), codes["neck_pose"][i].numpy(), codes["jaw_pose"][i].numpy(),
                         codes["eye_pose"][i, :3].numpy(), codes["eye_pose"][i, 3:].numpy()])
        ref_v, ref_j = _reference_lbs(src, codes["shape"][i].numpy(), codes["expression"][i].numpy(), pose)
        np.testing.assert_allclose(verts[i].numpy(), ref_v, atol=1e-12)
        np.testing.assert_allclose(joints[i].numpy(), ref_j, atol=1e-12)


def test_zero_pose_is_template_plus_blendshapes(flame64):
    src = _small_model()
    codes = _random_codes(2, seed=2)
    for k in ("neck_pose", "jaw_pose", "eye_pose"):
        codes[k].zero_()
    verts = flame64(**codes)
    origin = 3 * (src["J_regressor"] @ src["v_template"])[1]
    for i in range(2):
        expect = 3 * (src["v_template"] + src["shapedirs"][:, :, :300] @ codes["shape"][i].numpy()
                      + src["shapedirs"][:, :, 300:] @ codes["expression"][i].numpy()) - origin
        np.testing.assert_allclose(verts[i].numpy(), expect, atol=1e-12)


def test_portrait4d_scaling_and_recentring(flame64):
    src = _small_model()
    canon = flame64.canonical_vertices()
    assert canon.shape == (NV, 3)
    np.testing.assert_allclose(flame64.canonical_joints()[1].numpy(), 0.0, atol=1e-14)
    # = 3 x (FLAME with jaw 0.3 about x) - 3 x (its neck joint)
    pose = np.zeros((5, 3))
    pose[2, 0] = 0.3
    ref_v, _ = _reference_lbs(src, np.zeros(300), np.zeros(100), pose)
    np.testing.assert_allclose(canon.numpy(), ref_v, atol=1e-12)
    ref_unit, _ = _reference_lbs(src, np.zeros(300), np.zeros(100), pose, scale=1.0)
    np.testing.assert_allclose(canon.numpy(), 3.0 * ref_unit, atol=1e-12)
    codes = flame64.canonical_codes(1)
    assert codes["jaw_pose"].tolist() == [[0.3, 0.0, 0.0]]


def test_jaw_moves_only_jaw_vertices_and_eyes_rotate_rigidly(flame64):
    base = flame64.zero_codes(1)
    rest = flame64(**base)[0]
    jaw = dict(base, jaw_pose=torch.tensor([[0.3, 0.05, 0.0]], dtype=torch.float64))
    moved = (flame64(**jaw)[0] - rest).norm(dim=-1)
    jaw_w = flame64.lbs_weights[:, 2]
    assert torch.all(moved[jaw_w == 0] < 1e-14)
    assert torch.all(moved[jaw_w > 0] > 1e-3)
    eyes = dict(base, eye_pose=torch.tensor([[0.2, -0.3, 0.1, -0.1, 0.4, 0.0]], dtype=torch.float64))
    _, joints = flame64(**base, return_joints=True)
    posed = flame64(**eyes)[0]
    for idx, joint in ((flame64.left_eye_indices, 3), (flame64.right_eye_indices, 4)):
        a, b = rest[idx], posed[idx]
        assert (a - b).norm() > 1e-3
        np.testing.assert_allclose(torch.cdist(a, a).numpy(), torch.cdist(b, b).numpy(), atol=1e-12)
        c = joints[0, joint]
        np.testing.assert_allclose((a - c).norm(dim=-1).numpy(), (b - c).norm(dim=-1).numpy(), atol=1e-12)
    others = torch.ones(NV, dtype=torch.bool)
    others[flame64.eye_indices] = False
    assert torch.all((posed - rest)[others].abs() < 1e-14)


def test_flame_gradients_and_dtype_device(flame_files, flame64):
    codes = {k: v[:1].clone().requires_grad_(True) for k, v in _random_codes(1, seed=3, scale=0.5).items()}
    assert torch.autograd.gradcheck(lambda *a: flame64(*a), tuple(codes.values()))
    m32 = FLAME.from_file(flame_files / "generic_model.pkl")
    assert m32.v_template.dtype == torch.float32
    out = m32(**{k: v.float() for k, v in _random_codes(2, seed=4).items()})
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), flame64(**_random_codes(2, seed=4)).numpy(), atol=1e-5)
    assert m32.double().v_template.dtype == torch.float64
    if torch.cuda.is_available():
        mc = FLAME.from_file(flame_files / "generic_model.pkl").cuda()
        oc = mc(**{k: v.float().cuda() for k, v in _random_codes(2, seed=4).items()})
        np.testing.assert_allclose(oc.double().cpu().numpy(), out.double().numpy(), atol=1e-5)


def test_flame_without_masks_and_companion(flame_files, tmp_path):
    m = FLAME.from_file(flame_files / "generic_model.pkl", dtype=torch.float64)
    assert m.left_eye_indices.tolist() == [8, 9] and m.right_eye_indices.tolist() == [10, 11]  # from weights
    assert not m.has_lips
    with pytest.raises(ValueError, match="FLAME_masks.pkl"):
        m.lips
    # built-in companion: target above the size keeps every non-eyeball vertex, weights (1, 0, 0)
    idx, w = m.companion_indices, m.companion_weights
    assert torch.all(w[:, 0] == 1) and torch.all(w[:, 1:] == 0)
    non_eye_faces = m.faces[~torch.isin(m.faces, m.eye_indices).any(1)]
    assert sorted(idx[:, 0].tolist()) == sorted(set(non_eye_faces.flatten().tolist()))
    faces = {frozenset(f) for f in m.faces.tolist()}
    assert all(frozenset(r) in faces for r in idx.tolist())
    verts = m(**_random_codes(2, seed=5))
    np.testing.assert_allclose(m.companion_vertices(verts).numpy(), verts[:, idx[:, 0]].numpy())
    # a companion file in the layout of Portrait4D's simplify_baricentric.npy
    comp = {"idxs": np.array([[0, 11, 5], [1, 5, 9]]), "baris": np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]),
            "faces": np.array([[0, 1, 1]])}
    np.save(tmp_path / "simplify.npy", comp, allow_pickle=True)
    mc = FLAME.from_file(flame_files / "generic_model.pkl", companion_path=tmp_path / "simplify.npy",
                         dtype=torch.float64)
    cv = mc.companion_vertices(verts)
    np.testing.assert_allclose(cv[:, 0].numpy(), (0.2 * verts[:, 0] + 0.3 * verts[:, 11] + 0.5 * verts[:, 5]).numpy())


# ----------------------------------------------------------------------------- bad files and inputs
def test_missing_file_says_where_flame_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        FLAME.from_file(tmp_path / "generic_model.pkl")
    msg = str(err.value)
    assert "flame.is.tue.mpg.de" in msg and "generic_model.pkl" in msg and "ProceduralHead" in msg


def test_missing_masks_file(flame_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="flame.is.tue.mpg.de"):
        FLAME.from_file(flame_files / "generic_model.pkl", tmp_path / "FLAME_masks.pkl")


@pytest.mark.parametrize("key,value,pattern", [
    ("shapedirs", None, r"no 'shapedirs'"),
    ("J_regressor", None, r"no 'J_regressor'"),
    ("posedirs", np.zeros((NV, 3, 30)), r"'posedirs' must have shape \[12, 3, 36\]"),
    ("shapedirs", np.zeros((NV, 3, 100)), r"'shapedirs' must have shape \[12, 3, 400\]"),
    ("weights", np.zeros((NV, 4)), r"'weights' must have shape \[12, 5\]"),
    ("J_regressor", np.zeros((4, NV)), r"'J_regressor' must have shape \[5, 12\]"),
    ("v_template", np.zeros((NV, 2)), r"'v_template' must have shape \[V, 3\]"),
    ("f", np.array([[0, 1, 99]]), r"'f' indexes vertices outside"),
    ("kintree_table", np.array([[4294967295, 0, 1, 1, 7], [0, 1, 2, 3, 4]]), r"'kintree_table'"),
])
def test_malformed_file_names_the_key(tmp_path, key, value, pattern):
    model = _small_model()
    if value is None:
        del model[key]
    else:
        model[key] = value
    _write_model(tmp_path / "bad.pkl", model)
    with pytest.raises(ValueError, match=pattern):
        FLAME.from_file(tmp_path / "bad.pkl")


def test_not_a_flame_pickle(tmp_path):
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="could not be read"):
        FLAME.from_file(tmp_path / "junk.pkl")
    with open(tmp_path / "list.pkl", "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    with pytest.raises(ValueError, match="dict"):
        FLAME.from_file(tmp_path / "list.pkl")
    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump({"v_template": types.SimpleNamespace(a=1)}, fh)
    with pytest.raises(ValueError, match="refusing to load types.SimpleNamespace"):
        FLAME.from_file(tmp_path / "evil.pkl")


def test_bad_codes_name_the_argument(flame64):
    codes = _random_codes(2, seed=6)
    for name, bad, exc, pattern in (
            ("expression", torch.zeros(2, 50, dtype=torch.float64), ValueError,
             r"expression must have shape \[N, 100\]"),
            ("shape", torch.zeros(2, 300, dtype=torch.int64), TypeError, "shape must have a dtype"),
            ("eye_pose", torch.zeros(2, 6, 1, dtype=torch.float64), ValueError, r"eye_pose must have shape \[N, 6\]"),
            ("jaw_pose", torch.zeros(3, 3, dtype=torch.float64), ValueError, "jaw_pose has batch size 3"),
            ("neck_pose", [0.0, 0.0, 0.0], TypeError, "neck_pose must be a torch.Tensor")):
        with pytest.raises(exc, match=pattern):
            flame64(**dict(codes, **{name: bad}))
    with pytest.raises(ValueError, match=r"vertices must have shape \[\.\.\., 12, 3\]"):
        flame64.companion_vertices(torch.zeros(2, 11, 3))


# ----------------------------------------------------------------------------- labels
def test_label_layout_round_trip():
    g = torch.Generator().manual_seed(7)
    labels = torch.randn(4, 437, generator=g)
    p = parse_labels(labels)
    assert p["cam2world"].shape == (4, 4, 4) and p["intrinsics"].shape == (4, 3, 3)
    assert p["camera"].shape == (4, 25)
    assert torch.equal(p["cam2world"][1, 2, 3], labels[1, 2 * 4 + 3])  # row-major
    assert torch.equal(p["intrinsics"][2, 1, 0], labels[2, 16 + 3])
    for name, (a, b) in LABEL_LAYOUT.items():
        assert torch.equal(p[name].reshape(4, -1), labels[:, a:b])
    assert [LABEL_LAYOUT[k] for k in ("shape", "expression", "neck_pose", "jaw_pose", "eye_pose")] == \
        [(25, 325), (325, 425), (425, 428), (428, 431), (431, 437)]
    again = make_labels(p["cam2world"], p["intrinsics"], p["shape"], p["expression"], p["neck_pose"],
                        p["jaw_pose"], p["eye_pose"])
    assert torch.equal(again, labels)
    with pytest.raises(ValueError, match=r"labels must have shape \[N, 437\]"):
        parse_labels(torch.zeros(2, 436))
    with pytest.raises(ValueError, match="jaw_pose"):
        make_labels(p["cam2world"], p["intrinsics"], p["shape"], p["expression"], p["neck_pose"],
                    p["jaw_pose"][:, :2], p["eye_pose"])


def test_forward_labels(flame64):
    codes = _random_codes(2, seed=8)
    eye4 = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    eye3 = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    labels = make_labels(eye4, eye3, codes["shape"], codes["expression"], codes["neck_pose"], codes["jaw_pose"],
                         codes["eye_pose"])
    torch.testing.assert_close(flame64.forward_labels(labels), flame64(**codes), atol=1e-14, rtol=0)


# ----------------------------------------------------------------------------- the procedural head
@pytest.fixture(scope="module")
def head():
    return ProceduralHead()


def test_procedural_sizes(head):
    assert head.num_vertices == 5044 and head.num_faces == 10076  # FLAME: 5023, 9976
    assert head.left_eye_indices.numel() == 546 and head.right_eye_indices.numel() == 546
    assert head.eye_indices.tolist() == list(range(3952, 5044))
    assert head.face_indices.tolist() == list(range(3952))
    assert head.companion_indices.shape == (728, 3) and head.companion_faces.shape == (1452, 3)
    assert head.shapedirs.shape == (5044, 3, 300) and head.exprdirs.shape == (5044, 3, 100)
    assert head.posedirs.shape == (5044, 3, 36) and head.one_ring.shape == (5044, 10)
    assert head.faces.dtype == torch.int64 and head.v_template.dtype == torch.float32
    assert 50 < head.lips.numel() < 400


def test_procedural_is_deterministic(head):
    """Two builds at one thread count give the same bits. The cached arrays may have been
    built at another (test modules that set one thread build heads too): torch's float64
    reductions then sum in another order, so the orthonormalized blendshapes agree to
    float64 rounding of sums over the 3 x 5,044 coordinates, not bit for bit."""
    a = procedural_mod.build_arrays()
    again = procedural_mod.build_arrays()
    b = procedural_mod._cached_arrays()
    assert a.keys() == b.keys() == again.keys()
    for k in a:
        x, y, z = np.asarray(a[k]), np.asarray(again[k]), np.asarray(b[k])
        assert np.array_equal(x, y), k
        if x.dtype.kind == "f":
            bound = 3 * 5044 * np.finfo(np.float64).eps / 2 * np.abs(x).max()
            np.testing.assert_allclose(z, x, rtol=0, atol=bound, err_msg=k)
        else:
            assert np.array_equal(x, z), k
    assert torch.equal(ProceduralHead().v_template, head.v_template)


def test_procedural_parts_are_closed_and_outward(head):
    v = head.v_template.double().numpy()
    f = head.faces.numpy()
    comps = _mesh.connected_components(f, len(v))
    assert [len(c) for c in comps] == [3952, 546, 546]
    for c in comps:
        part = f[np.isin(f, c).all(1)]
        assert _mesh.is_edge_manifold(part) and len(_mesh.boundary_edges(part)) == 0
        assert _mesh.signed_volume(v, part) > 0
    # the eyeballs are spheres of radius 3 x 12.1 mm around the eye joints
    joints = head.canonical_joints().double()
    for idx, j in ((head.left_eye_indices, 3), (head.right_eye_indices, 4)):
        r = (head.v_template[idx].double() - joints[j]).norm(dim=-1)
        np.testing.assert_allclose(r.numpy(), 3 * procedural_mod.EYE_RADIUS, rtol=1e-5)
    # still closed and outward after posing with random codes
    codes = _random_codes(1, seed=9, dtype=torch.float32)
    posed = head(**codes)[0].double().numpy()
    for c in comps:
        assert _mesh.signed_volume(posed, f[np.isin(f, c).all(1)]) > 0


def test_procedural_canonical_fits_portrait4d_box(head):
    canon = head.canonical_vertices()
    np.testing.assert_allclose(head.canonical_joints()[1].numpy(), 0.0, atol=1e-6)
    assert canon.abs().max() < 0.65  # box_warp 1.3
    ext = canon.max(0).values - canon.min(0).values
    assert 0.4 < ext[0] < 0.7 and 0.7 < ext[1] < 1.2 and 0.5 < ext[2] < 0.8  # FLAME-like size x 3


def test_procedural_jaw_opens_the_mouth(head):
    w_jaw = head.lbs_weights[:, 2]
    lips = head.lips
    upper, lower = lips[w_jaw[lips] < 0.5], lips[w_jaw[lips] >= 0.5]
    assert upper.numel() > 20 and lower.numel() > 20

    def gap(v):  # mean distance from a lower-lip vertex to the nearest upper-lip vertex
        return torch.cdist(v[lower], v[upper]).min(1).values.mean().item()

    rest = head(**head.zero_codes(1))[0]
    canon = head.canonical_vertices()
    assert gap(canon) > 2.5 * gap(rest) and gap(canon) - gap(rest) > 0.03
    moved = (canon - rest).norm(dim=-1)
    back = head.v_template[:, 2] < head.v_template[:, 2].min() + 0.1  # the back of the skull
    assert moved[back].max() < 1e-6
    assert moved[lower].min() > 0.01 and moved.max() < 0.2


def test_procedural_eyes_rotate_rigidly(head):
    codes = head.zero_codes(1)
    rest = head(**codes)[0].double()
    codes["eye_pose"] = torch.tensor([[0.3, 0.2, 0.0, -0.2, 0.1, 0.0]])
    posed = head(**codes)[0].double()
    for idx in (head.left_eye_indices, head.right_eye_indices):
        a, b = rest[idx], posed[idx]
        assert (a - b).norm(dim=-1).max() > 0.005
        np.testing.assert_allclose(torch.cdist(a, a).numpy(), torch.cdist(b, b).numpy(), atol=1e-5)
    others = torch.ones(head.num_vertices, dtype=torch.bool)
    others[head.eye_indices] = False
    assert (posed - rest)[others].abs().max() < 1e-6


def test_procedural_blendshapes(head):
    for dirs, n in ((head.shapedirs, 300), (head.exprdirs, 100)):
        m = dirs.double().reshape(-1, n)
        g = m.T @ m
        s = g.diagonal().sqrt()
        np.testing.assert_allclose((g / s[:, None] / s[None]).numpy(), np.eye(n), atol=1e-6)  # orthogonal
        assert torch.all(s[1:] <= s[:-1] + 1e-9)  # decreasing standard deviations
    assert head.exprdirs[head.eye_indices].abs().max() == 0  # expressions do not move the eyeballs
    # shape moves each eyeball rigidly (a translation)
    for idx in (head.left_eye_indices, head.right_eye_indices):
        d = head.shapedirs[idx]
        assert (d - d[:1]).abs().max() < 1e-7
    codes = _random_codes(2, seed=10, dtype=torch.float32)
    disp = (head(**dict(codes, neck_pose=torch.zeros(2, 3), jaw_pose=torch.zeros(2, 3), eye_pose=torch.zeros(2, 6)))
            - head(**head.zero_codes(2))).norm(dim=-1)
    assert 0.005 < disp.mean() < 0.1  # a few millimetres to centimetres, x 3


def test_procedural_companion_lies_on_the_mesh(head):
    idx, w = head.companion_indices, head.companion_weights.double()
    assert torch.all(w >= -1e-12) and torch.allclose(w.sum(1), torch.ones(len(w), dtype=torch.float64))
    faces = {frozenset(f) for f in head.faces.tolist()}
    assert all(frozenset(r) in faces for r in idx.tolist())  # three vertices of one full-mesh triangle
    assert idx.max() < 3952  # on the head, not the eyeballs
    cf = head.companion_faces.numpy()
    cv = head.companion_vertices(head.canonical_vertices()).double().numpy()
    assert _mesh.is_edge_manifold(cf) and len(_mesh.boundary_edges(cf)) == 0
    assert _mesh.signed_volume(cv, cf) > 0
    verts = head(**_random_codes(2, seed=11, dtype=torch.float32))
    cvs = head.companion_vertices(verts)
    assert cvs.shape == (2, 728, 3)
    manual = (verts[:, idx] * head.companion_weights[None, :, :, None]).sum(2)
    torch.testing.assert_close(cvs, manual)


def test_procedural_one_ring(head):
    ring = head.one_ring
    assert torch.equal(ring[:, 0], torch.arange(head.num_vertices))
    valid = (ring >= 0).sum(1)
    assert valid.min() >= 4 and valid.max() <= 10
    edges = {tuple(e) for e in _mesh.unique_edges(head.faces.numpy()).tolist()}
    for v in range(0, head.num_vertices, 97):
        nb = [int(x) for x in ring[v, 1:] if x >= 0]
        assert nb == sorted(nb) and all((min(v, x), max(v, x)) in edges for x in nb)
        assert len(nb) == sum(1 for e in edges if v in e)
    np.testing.assert_array_equal(ring.numpy(), _mesh.one_ring_table(head.faces.numpy(), head.num_vertices))


def test_procedural_batch_grad_and_dtype(head):
    codes = {k: v.float() for k, v in _random_codes(3, seed=12).items()}
    out = head(**codes)
    assert out.shape == (3, 5044, 3) and out.dtype == torch.float32
    for i in range(3):
        torch.testing.assert_close(head(**{k: v[i:i + 1] for k, v in codes.items()})[0], out[i])
    h64 = ProceduralHead(dtype=torch.float64)
    torch.testing.assert_close(h64(**{k: v.double() for k, v in codes.items()}).float(), out, atol=1e-5, rtol=0)
    # gradients of every code against the float64 model's on the same values
    g = {k: v.clone().requires_grad_(True) for k, v in codes.items()}
    g64 = {k: v.detach().double().requires_grad_(True) for k, v in codes.items()}
    # random weights: sum(v^2) would give the eye poses a gradient of zero (an eyeball
    # turns about its centre), leaving only rounding to compare
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    (head(**g) * weights.float()).sum().backward()
    (h64(**g64) * weights).sum().backward()
    for k in g:
        got, want = g[k].grad.double(), g64[k].grad
        # float32 sums over the 5,044 x 3 vertex coordinates (and the blendshapes' few hundred
        # terms before them): about sqrt(15,132) u32 relative, with a factor 8 of margin
        bound = 8 * math.sqrt(3 * 5044) * torch.finfo(torch.float32).eps / 2
        assert ((got - want).norm() / want.norm()).item() <= bound, k


def test_simplifier_for_flame_companion(head):
    """The quadric simplifier that builds FLAME's companion mesh, on a FLAME-sized surface:
    manifold, outward, close to the original, and open boundaries are kept."""
    v = head.v_template.double().numpy()
    f = head.faces.numpy()
    part = f[(f < head.head_vertices).all(1)]
    kept, faces = _mesh.simplify_mesh(v, part, 730)
    assert len(kept) == 730 and np.all(np.diff(kept) > 0)
    assert _mesh.is_edge_manifold(faces) and len(_mesh.boundary_edges(faces)) == 0
    vol, vol0 = _mesh.signed_volume(v[kept], faces), _mesh.signed_volume(v, part)
    assert abs(vol / vol0 - 1) < 0.03
    # an open surface (the mouth region cut out): the hole's rim stays a rim
    c = v[part].mean(1)
    cut = part[~((np.abs(c[:, 0]) < 0.05) & (c[:, 2] > 0.15) & (np.abs(c[:, 1] - c[:, 1].max() + 0.6) < 0.06))]
    assert len(_mesh.boundary_edges(cut)) > 0
    kept2, faces2 = _mesh.simplify_mesh(v, cut, 730)
    assert len(kept2) == 730 and _mesh.is_edge_manifold(faces2)
    assert len(_mesh.boundary_edges(faces2)) > 0
    idx, w = _mesh.companion_from_simplified(cut, kept2)
    assert np.array_equal(idx[:, 0], kept2) and np.all(w[:, 0] == 1)
