"""FLAME (Li et al. 2017) loaded from the official model file, without chumpy.

FLAME's licence forbids redistributing the model, so head4d does not ship it: register
at https://flame.is.tue.mpg.de, download FLAME 2020 (or 2023), and pass
``generic_model.pkl`` (FLAME 2023: ``flame2023.pkl``) to :meth:`FLAME.from_file`;
``FLAME_masks.pkl`` (the "FLAME Vertex Masks" download) gives the lips vertex set.

The official file is a Python 2 pickle whose arrays are partly chumpy objects
(``chumpy.ch.Ch``) and whose joint regressor is a ``scipy.sparse`` matrix. The loader
reads it with a restricted unpickler that maps chumpy classes to a stand-in that keeps the
pickled value (chumpy stores it in the object's state under ``'x'``), and, when scipy is not
installed, maps ``scipy.sparse`` matrices to a stand-in that rebuilds the dense array from
the pickled compressed-sparse data. Neither chumpy nor scipy is needed.
"""
from __future__ import annotations

import _compat_pickle
import importlib
import io
import os
import pickle
from typing import Dict, Optional, Union

import numpy as np
import torch

from . import _mesh
from .base import NUM_EXPRESSION, NUM_JOINTS, NUM_POSE_FEATURES, NUM_SHAPE, PORTRAIT4D_SCALE, HeadModel

FLAME_URL = "https://flame.is.tue.mpg.de"
#: Portrait4D's simplified FLAME mesh has 730 vertices; the built-in simplifier aims for this.
COMPANION_VERTICES = 730

_MISSING_HINT = (f"FLAME is not shipped with head4d (its licence forbids redistribution). Register at "
                 f"{FLAME_URL}, download FLAME 2020 and pass its generic_model.pkl "
                 f"(and FLAME_masks.pkl from the 'FLAME Vertex Masks' download for the lips set) to "
                 f"head4d.head.FLAME.from_file(path, masks_path=...); head4d.head.ProceduralHead() "
                 f"is a built-in stand-in that needs no download.")


class _PickledStandIn:
    """Base of the stand-ins: keeps the constructor arguments and the pickled state."""

    _module = "?"
    _name = "?"
    _args: tuple = ()
    _kwargs: dict = {}
    _state = None

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        obj.__dict__["_kwargs"] = kwargs
        obj.__dict__["_state"] = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    @classmethod
    def describe(cls) -> str:
        return f"{cls._module}.{cls._name}"


class _ChumpyStandIn(_PickledStandIn):
    """A chumpy object: its value is the state's ``'x'`` (plain ``Ch``) or, for wrappers, ``'a'``."""

    def to_array(self) -> np.ndarray:
        state = self._state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = {**state[0], **(state[1] or {})}
        if isinstance(state, dict):
            for key in ("x", "a"):
                if key in state and state[key] is not None:
                    return _to_array(state[key])
        if self._args:
            return _to_array(self._args[0])
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"cannot rebuild the chumpy object {self.describe()} without chumpy: "
                         f"its pickled state has no 'x' or 'a' (has {keys})")


class _SparseStandIn(_PickledStandIn):
    """A scipy.sparse matrix (csc, csr or coo), rebuilt as a dense array from its pickled state."""

    def toarray(self) -> np.ndarray:
        st = dict(self._state or {})
        shape = st.get("_shape", st.get("shape"))
        if shape is None:
            raise ValueError(f"cannot rebuild {self.describe()}: no shape in its pickled state")
        shape = tuple(int(s) for s in shape)
        data = np.asarray(st.get("data"), dtype=np.float64)
        out = np.zeros(shape, dtype=np.float64)
        name = self._name.lower()
        if "coo" in name:
            row = np.asarray(st.get("row", st.get("coords", [None, None])[0]), dtype=np.int64)
            col = np.asarray(st.get("col", st.get("coords", [None, None])[1]), dtype=np.int64)
            np.add.at(out, (row, col), data)
            return out
        indices = np.asarray(st["indices"], dtype=np.int64)
        indptr = np.asarray(st["indptr"], dtype=np.int64)
        major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        if "csc" in name:
            np.add.at(out, (indices, major), data)
        elif "csr" in name:
            np.add.at(out, (major, indices), data)
        else:
            raise ValueError(f"cannot rebuild the sparse matrix {self.describe()} without scipy "
                             f"(csc, csr and coo are understood)")
        return out


_STANDINS: Dict[tuple, type] = {}


def _standin(base: type, module: str, name: str) -> type:
    key = (base, module, name)
    if key not in _STANDINS:
        _STANDINS[key] = type(f"StandIn_{name}", (base,), {"_module": module, "_name": name})
    return _STANDINS[key]


_NUMPY_OK = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}  # what arrays pickle as
_BUILTINS_OK = {"set", "frozenset", "object", "dict", "list", "tuple", "slice", "complex",
                "bytearray", "bytes", "str", "int", "float", "bool", "range"}


def _scipy_available() -> bool:
    try:
        importlib.import_module("scipy.sparse")
        return True
    except Exception:
        return False


class _RefusedClass(pickle.UnpicklingError):
    pass


class _FlameUnpickler(pickle.Unpickler):
    """Loads FLAME's pickles with stand-ins for chumpy (and scipy when absent); refuses any
    other class, so a model file cannot run arbitrary code."""

    def find_class(self, module: str, name: str):
        # Python 2 names (FLAME's files are Python 2 pickles), mapped as the default find_class
        # does; Python 3 module names are not in these tables
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        top = module.split(".")[0]
        if top == "chumpy":
            return _standin(_ChumpyStandIn, module, name)
        if module.startswith("scipy.sparse"):
            if _scipy_available():
                try:
                    return super().find_class(module, name)
                except Exception:
                    pass
            return _standin(_SparseStandIn, module, name)
        if top == "numpy" and (name in _NUMPY_OK or module == "numpy.dtypes"):
            if module.startswith("numpy.core") and hasattr(np, "_core"):
                module = "numpy._core" + module[len("numpy.core"):]
            return super().find_class(module, name)
        if module == "builtins" and name in _BUILTINS_OK:
            return super().find_class(module, name)
        if (module, name) in {("copyreg", "_reconstructor"), ("copyreg", "__newobj__"),
                              ("_codecs", "encode"), ("collections", "OrderedDict")}:
            return super().find_class(module, name)
        raise _RefusedClass(f"refusing to load {module}.{name}: not a class a FLAME model file uses")


def _to_array(value) -> np.ndarray:
    if isinstance(value, _ChumpyStandIn):
        return value.to_array()
    if hasattr(value, "toarray"):  # scipy.sparse or its stand-in
        return np.asarray(value.toarray())
    if hasattr(value, "todense"):
        return np.asarray(value.todense())
    if isinstance(value, _PickledStandIn):
        raise ValueError(f"cannot rebuild a {value.describe()} object")
    return np.asarray(value)


def load_pickle(path: Union[str, os.PathLike], what: str = "FLAME model") -> object:
    """Unpickle a FLAME file (Python 2 or 3 pickle) without chumpy or scipy.

    Raises FileNotFoundError (saying where FLAME comes from) when ``path`` does not exist and
    ValueError when it is not a readable pickle.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist. {_MISSING_HINT}")
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return _FlameUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _RefusedClass as exc:
        raise ValueError(f"{what} file {path!r} is not a FLAME pickle: {exc}") from exc
    except Exception as exc:  # truncated or foreign files
        raise ValueError(f"{what} file {path!r} could not be read as a pickle: "
                         f"{type(exc).__name__}: {exc}") from exc


def _get(model: dict, key: str, expected: str, path: str) -> np.ndarray:
    if key not in model:
        raise ValueError(f"FLAME model file {path!r} has no '{key}' (expected {expected}); "
                         f"keys present: {sorted(model)}")
    try:
        arr = _to_array(model[key])
    except ValueError as exc:
        raise ValueError(f"FLAME model file {path!r}: '{key}' (expected {expected}): {exc}") from exc
    if arr.dtype == object:
        raise ValueError(f"FLAME model file {path!r}: '{key}' must be a numeric array {expected}, "
                         f"got an object array")
    return arr


def _bad_shape(path: str, key: str, expected: str, arr: np.ndarray) -> ValueError:
    return ValueError(f"FLAME model file {path!r}: '{key}' must have shape {expected}, got {list(arr.shape)}")


def parse_flame_model(model: dict, path: str = "<memory>") -> Dict[str, np.ndarray]:
    """Validate an unpickled FLAME model dict and return plain arrays.

    Returns a dict with ``v_template [V, 3]``, ``f [F, 3]`` int64, ``shapedirs [V, 3, 300]``,
    ``exprdirs [V, 3, 100]``, ``posedirs [V, 3, 36]``, ``J_regressor [5, V]``,
    ``weights [V, 5]`` (float64) and ``parents`` (5 ints). Raises ValueError naming the key
    and the expected shape.
    """
    if not isinstance(model, dict):
        raise ValueError(f"FLAME model file {path!r} must hold a dict of arrays, got {type(model).__name__}")
    v = _get(model, "v_template", "[V, 3]", path).astype(np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or v.shape[0] < 1:
        raise _bad_shape(path, "v_template", "[V, 3]", v)
    nv = v.shape[0]
    f = _get(model, "f", "[F, 3]", path)
    if f.ndim != 2 or f.shape[1] != 3:
        raise _bad_shape(path, "f", "[F, 3]", f)
    f = _mesh.check_faces("f", f, nv, f"FLAME model file {path!r}")
    need = NUM_SHAPE + NUM_EXPRESSION
    sd = _get(model, "shapedirs", f"[{nv}, 3, {need}]", path).astype(np.float64)
    if sd.ndim != 3 or sd.shape[0] != nv or sd.shape[1] != 3 or sd.shape[2] < need:
        raise _bad_shape(path, "shapedirs", f"[{nv}, 3, {need}] (300 shape + 100 expression)", sd)
    pd = _get(model, "posedirs", f"[{nv}, 3, {NUM_POSE_FEATURES}]", path).astype(np.float64)
    if pd.ndim == 2 and pd.shape == (nv * 3, NUM_POSE_FEATURES):
        pd = pd.reshape(nv, 3, NUM_POSE_FEATURES)
    if pd.shape != (nv, 3, NUM_POSE_FEATURES):
        raise _bad_shape(path, "posedirs", f"[{nv}, 3, {NUM_POSE_FEATURES}]", pd)
    jr = _get(model, "J_regressor", f"[{NUM_JOINTS}, {nv}]", path).astype(np.float64)
    if jr.shape != (NUM_JOINTS, nv):
        raise _bad_shape(path, "J_regressor", f"[{NUM_JOINTS}, {nv}]", jr)
    w = _get(model, "weights", f"[{nv}, {NUM_JOINTS}]", path).astype(np.float64)
    if w.shape != (nv, NUM_JOINTS):
        raise _bad_shape(path, "weights", f"[{nv}, {NUM_JOINTS}]", w)
    kt = _get(model, "kintree_table", f"[2, {NUM_JOINTS}]", path)
    if kt.shape != (2, NUM_JOINTS):
        raise _bad_shape(path, "kintree_table", f"[2, {NUM_JOINTS}]", kt)
    kt = kt.astype(np.int64)
    ids = [int(i) for i in kt[1]]
    id_to_joint = {jid: j for j, jid in enumerate(ids)}
    parents = []
    for j in range(NUM_JOINTS):
        p = int(kt[0, j])
        parents.append(-1 if j == 0 else id_to_joint.get(p, -2))
    if parents[0] != -1 or any(not (0 <= parents[j] < j) for j in range(1, NUM_JOINTS)):
        raise ValueError(f"FLAME model file {path!r}: 'kintree_table' [2, {NUM_JOINTS}] must describe a tree "
                         f"with the root first and parents before children, got {kt.tolist()}")
    for key, arr in (("v_template", v), ("shapedirs", sd), ("posedirs", pd), ("J_regressor", jr), ("weights", w)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"FLAME model file {path!r}: '{key}' has non-finite values")
    return {"v_template": v, "f": f, "shapedirs": sd[:, :, :NUM_SHAPE],
            "exprdirs": sd[:, :, NUM_SHAPE:need], "posedirs": pd, "J_regressor": jr,
            "weights": w, "parents": parents}


def load_masks(path: Union[str, os.PathLike], num_verts: int) -> Dict[str, np.ndarray]:
    """Read ``FLAME_masks.pkl``: a dict of region name -> vertex indices (``[*]`` int64)."""
    path = os.fspath(path)
    masks = load_pickle(path, what="FLAME masks")
    if not isinstance(masks, dict):
        raise ValueError(f"FLAME masks file {path!r} must hold a dict of region name -> vertex indices, "
                         f"got {type(masks).__name__}")
    out = {}
    for name, idx in masks.items():
        arr = _to_array(idx)
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise ValueError(f"FLAME masks file {path!r}: '{name}' must be a 1-D array of vertex indices, "
                             f"got shape {list(arr.shape)} dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= num_verts):
            raise ValueError(f"FLAME masks file {path!r}: '{name}' indexes vertices outside [0, {num_verts})")
        out[str(name)] = arr
    return out


def load_companion(path: Union[str, os.PathLike], num_verts: int):
    """Read a companion mesh file: ``.npy``/``.npz`` holding ``idxs [K, 3]``, ``baris [K, 3]``,
    ``faces [Fc, 3]`` (the layout of Portrait4D's ``simplify_baricentric.npy``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"companion mesh file {path!r} does not exist")
    data = np.load(path, allow_pickle=True)
    if isinstance(data, np.ndarray) and data.dtype == object:
        data = data.item()
    try:
        idx = np.asarray(data["idxs"], dtype=np.int64)
        w = np.asarray(data["baris"], dtype=np.float64)
        faces = np.asarray(data["faces"], dtype=np.int64)
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"companion mesh file {path!r} must hold 'idxs' [K, 3], 'baris' [K, 3] and "
                         f"'faces' [Fc, 3]: {exc}") from exc
    if idx.ndim != 2 or idx.shape[1] != 3 or w.shape != idx.shape:
        raise ValueError(f"companion mesh file {path!r}: 'idxs' and 'baris' must both have shape [K, 3], "
                         f"got {list(idx.shape)} and {list(w.shape)}")
    if idx.size and (idx.min() < 0 or idx.max() >= num_verts):
        raise ValueError(f"companion mesh file {path!r}: 'idxs' indexes vertices outside [0, {num_verts})")
    faces = _mesh.check_faces("faces", faces, idx.shape[0], f"companion mesh file {path!r}")
    return idx, w, faces


def _plain_array(op: str, name: str, value, dtype) -> np.ndarray:
    """``value`` (numpy array, tensor or nested list) as a numpy array of ``dtype``; ValueError naming it otherwise."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
        if arr.dtype == object:
            raise TypeError("an object array")
        return arr.astype(dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{op}: {name} must be a numeric array, got {type(value).__name__} ({exc})") from exc


class FLAME(HeadModel):
    """FLAME with 300 shape and 100 expression coefficients, as Portrait4D uses it.

    Build it with :meth:`from_file` (the official model file) or :meth:`from_arrays`
    (arrays already in Portrait4D's units, as a Portrait4D checkpoint stores them).
    ``forward(shape [N, 300], expression [N, 100], neck_pose [N, 3], jaw_pose [N, 3],
    eye_pose [N, 6]) -> [N, 5023, 3]`` (see
    :class:`~head4d.head.base.HeadModel` for every buffer and the units).

    Vertex sets: the eyeballs come from the masks file's ``left_eyeball`` / ``right_eyeball``
    when given, else from the skinning weights (vertices bound to the eye joints; for the
    official model these are vertices 3931..5022, Portrait4D's eye set); ``face_indices`` is
    every other vertex; ``lips_indices`` needs the masks file. All masks are in ``masks``.

    Companion mesh: loaded from ``companion_path`` (Portrait4D's ``simplify_baricentric.npy``
    layout) when given, else built here by quadric-error simplification of the non-eyeball
    mesh to about 730 vertices (each an original vertex: barycentric weights (1, 0, 0)).
    """

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], masks_path: Optional[Union[str, os.PathLike]] = None, *,
                  companion_path: Optional[Union[str, os.PathLike]] = None,
                  companion_vertices: int = COMPANION_VERTICES, scale: float = PORTRAIT4D_SCALE,
                  dtype: torch.dtype = torch.float32) -> "FLAME":
        """Load the official FLAME model.

        Args:
            path: ``generic_model.pkl`` from https://flame.is.tue.mpg.de (registration required).
            masks_path: optional ``FLAME_masks.pkl`` (eyeballs, lips, face, ... vertex sets).
            companion_path: optional companion mesh file (``idxs``, ``baris``, ``faces``).
            companion_vertices: vertex count of the built-in simplified companion mesh.
            scale: vertex scale (Portrait4D: 3).
            dtype: float32 (default) or float64 buffers.

        Raises:
            FileNotFoundError: a file does not exist (the message says where FLAME comes from).
            ValueError: the file is not a FLAME model (names the key and the expected shape).
        """
        path = os.fspath(path)
        model = parse_flame_model(load_pickle(path), path)
        nv = model["v_template"].shape[0]
        masks = load_masks(masks_path, nv) if masks_path is not None else {}
        return cls(model, masks=masks, companion=(load_companion(companion_path, nv)
                                                  if companion_path is not None else None),
                   companion_vertices=companion_vertices, scale=scale, dtype=dtype)

    @classmethod
    def from_arrays(cls, *, v_template, faces, shapedirs, posedirs, j_regressor, lbs_weights, parents,
                    eye_indices, companion_indices, companion_weights, companion_faces, lips_indices=None,
                    face_indices=None, dtype: torch.dtype = torch.float32) -> "FLAME":
        """FLAME from arrays already in Portrait4D's units, kept as they are (no scaling, no recentring).

        This is the form a Portrait4D checkpoint stores FLAME in (its deformer's
        ``flame_model`` buffers: multiplied by 3, the canonical neck joint at the origin),
        so a checkpoint gives a FLAME without ``generic_model.pkl``. Arrays are numpy
        arrays or tensors; V vertices, F faces, K companion vertices.

        Args:
            v_template: ``[V, 3]`` template, scaled and recentred.
            faces: ``[F, 3]`` integer vertex indices.
            shapedirs: ``[V, 3, 400]`` (300 shape then 100 expression blendshapes; more
                columns are ignored), scaled.
            posedirs: ``[V, 3, 36]``, or ``[36, 3 V]`` (the transposed layout some FLAME
                ports keep: row k holds pose feature k's offsets, vertex-major), scaled.
            j_regressor: ``[5, V]``; lbs_weights: ``[V, 5]``.
            parents: ``[5]`` integers, -1 for the root (FLAME's tree: -1, 0, 1, 1, 1).
            eye_indices: ``[E]`` the vertices of both eyeballs; each is assigned to the left
                or right eye by its dominant skinning joint (3 left, 4 right).
            companion_indices, companion_weights: ``[K, 3]`` the simplified companion mesh's
                vertices as barycentric mixes of FLAME vertices; companion_faces ``[Fc, 3]``.
            lips_indices: ``[L]`` the lips vertex set (None: no mouth part).
            face_indices: optional ``[*]``, checked to be every vertex not on an eyeball
                (the face set head4d's deformation uses).
            dtype: float32 (default) or float64 buffers (float32 arrays are kept bit for bit).

        Raises:
            ValueError: an array has the wrong shape or values (naming it and what was expected).
        """
        op = "FLAME.from_arrays"
        v = _plain_array(op, "v_template", v_template, np.float64)
        if v.ndim != 2 or v.shape[1] != 3 or v.shape[0] < 1:
            raise ValueError(f"{op}: v_template must have shape [V, 3], got {list(v.shape)}")
        nv = v.shape[0]
        f = _mesh.check_faces("faces", _plain_array(op, "faces", faces, np.int64), nv, op)
        need = NUM_SHAPE + NUM_EXPRESSION
        sd = _plain_array(op, "shapedirs", shapedirs, np.float64)
        if sd.ndim != 3 or sd.shape[:2] != (nv, 3) or sd.shape[2] < need:
            raise ValueError(f"{op}: shapedirs must have shape [{nv}, 3, {need}] (300 shape + 100 expression), "
                             f"got {list(sd.shape)}")
        pd = _plain_array(op, "posedirs", posedirs, np.float64)
        if pd.shape == (NUM_POSE_FEATURES, nv * 3):
            pd = np.ascontiguousarray(pd.T).reshape(nv, 3, NUM_POSE_FEATURES)
        if pd.shape != (nv, 3, NUM_POSE_FEATURES):
            raise ValueError(f"{op}: posedirs must have shape [{nv}, 3, {NUM_POSE_FEATURES}] or "
                             f"[{NUM_POSE_FEATURES}, {nv * 3}], got {list(pd.shape)}")
        jr = _plain_array(op, "j_regressor", j_regressor, np.float64)
        if jr.shape != (NUM_JOINTS, nv):
            raise ValueError(f"{op}: j_regressor must have shape [{NUM_JOINTS}, {nv}], got {list(jr.shape)}")
        w = _plain_array(op, "lbs_weights", lbs_weights, np.float64)
        if w.shape != (nv, NUM_JOINTS):
            raise ValueError(f"{op}: lbs_weights must have shape [{nv}, {NUM_JOINTS}], got {list(w.shape)}")
        par = _plain_array(op, "parents", parents, np.int64).reshape(-1)
        eyes = np.unique(_plain_array(op, "eye_indices", eye_indices, np.int64).reshape(-1))
        if eyes.size == 0 or eyes.min() < 0 or eyes.max() >= nv:
            raise ValueError(f"{op}: eye_indices must be a non-empty set of vertex indices in [0, {nv})")
        dominant = np.argmax(w[eyes], axis=1)
        left, right = eyes[dominant == 3], eyes[dominant == 4]
        stray = eyes[(dominant != 3) & (dominant != 4)]
        if stray.size or left.size == 0 or right.size == 0:
            raise ValueError(f"{op}: every eye vertex must be skinned mostly to joint 3 (left eye) or 4 (right "
                             f"eye), with both eyes present; got {left.size} left, {right.size} right and "
                             f"{stray.size} others (first: {stray[:5].tolist()})")
        if face_indices is not None:
            face = np.unique(_plain_array(op, "face_indices", face_indices, np.int64).reshape(-1))
            if not np.array_equal(face, np.setdiff1d(np.arange(nv), eyes)):
                raise ValueError(f"{op}: face_indices must be every vertex not in eye_indices ({nv - eyes.size} "
                                 f"vertices), got {face.size} vertices that differ from that set")
        masks = {"left_eyeball": left, "right_eyeball": right}
        if lips_indices is not None:
            masks["lips"] = np.unique(_plain_array(op, "lips_indices", lips_indices, np.int64).reshape(-1))
            if masks["lips"].size and (masks["lips"].min() < 0 or masks["lips"].max() >= nv):
                raise ValueError(f"{op}: lips_indices must index vertices in [0, {nv})")
        cidx = _plain_array(op, "companion_indices", companion_indices, np.int64)
        cw = _plain_array(op, "companion_weights", companion_weights, np.float64)
        if cidx.ndim != 2 or cidx.shape[1] != 3 or cw.shape != cidx.shape:
            raise ValueError(f"{op}: companion_indices and companion_weights must both have shape [K, 3], "
                             f"got {list(cidx.shape)} and {list(cw.shape)}")
        if cidx.size and (cidx.min() < 0 or cidx.max() >= nv):
            raise ValueError(f"{op}: companion_indices must index vertices in [0, {nv})")
        cfaces = _mesh.check_faces("companion_faces", _plain_array(op, "companion_faces", companion_faces, np.int64),
                                   cidx.shape[0], op)
        model = {"v_template": v, "f": f, "shapedirs": sd[:, :, :NUM_SHAPE], "exprdirs": sd[:, :, NUM_SHAPE:need],
                 "posedirs": pd, "J_regressor": jr, "weights": w, "parents": [int(p) for p in par]}
        return cls(model, masks=masks, companion=(cidx, cw, cfaces), scale=1.0, recentre=False, dtype=dtype)

    def __init__(self, model: Dict[str, np.ndarray], *, masks: Optional[Dict[str, np.ndarray]] = None,
                 companion=None, companion_vertices: int = COMPANION_VERTICES,
                 scale: float = PORTRAIT4D_SCALE, recentre: bool = True, dtype: torch.dtype = torch.float32):
        masks = dict(masks or {})
        v, f, w = model["v_template"], model["f"], model["weights"]
        if "left_eyeball" in masks and "right_eyeball" in masks:
            left, right = masks["left_eyeball"], masks["right_eyeball"]
        else:
            dominant = np.argmax(w, axis=1)
            left, right = np.nonzero(dominant == 3)[0], np.nonzero(dominant == 4)[0]
        lips = masks.get("lips")
        if companion is None:
            eyes = np.union1d(left, right)
            keep_face = ~np.isin(f, eyes).any(axis=1)
            sub = f[keep_face]
            if len(sub) == 0:
                sub = f
            kept, cfaces = _mesh.simplify_mesh(v, sub, companion_vertices)
            cidx, cw = _mesh.companion_from_simplified(sub, kept)
        else:
            cidx, cw, cfaces = companion
        super().__init__(v_template=v, faces=f, shapedirs=model["shapedirs"], exprdirs=model["exprdirs"],
                         posedirs=model["posedirs"], j_regressor=model["J_regressor"], lbs_weights=w,
                         parents=model["parents"], left_eye=left, right_eye=right, lips=lips,
                         companion_indices=cidx, companion_weights=cw, companion_faces=cfaces,
                         masks=masks, scale=scale, recentre=recentre, dtype=dtype)
