"""The head-model base class: FLAME-style linear blend skinning, used as Portrait4D uses it.

A head model holds a template mesh, shape / expression / pose-corrective blendshapes, a
joint regressor, skinning weights and FLAME's five-joint kinematic tree (global, neck,
jaw, left eye, right eye; parents -1, 0, 1, 1, 1). Evaluation (the FLAME paper, Li et al.
2017, which follows SMPL):

1. ``v_shaped = T + S @ shape + E @ expression`` (300 shape, 100 expression blendshapes);
2. joints ``J = J_regressor @ v_shaped`` (5 joints);
3. rotations ``R_k = rodrigues(pose_k)``; pose-corrective blendshapes driven by the
   non-global joints: ``v_posed = v_shaped + P @ vec(R_1 - I, ..., R_4 - I)`` (36 numbers,
   each 3 x 3 block flattened row-major);
4. forward kinematics along the tree and linear blend skinning with ``weights``.

Portrait4D's use (``docs/design.md``, "The head model"): the global
rotation is fixed at 0; the pose is the neck (3) and jaw (3) axis-angles plus the eye poses
(6: left then right); the template, shape, expression and pose blendshapes are multiplied
by 3 (EG3D's scale), and the template is moved so that the neck joint of the canonical mesh
(zero shape and expression, pose (0, 0, 0, jaw 0.3, 0, 0)) is at the origin. The canonical
mesh has the mouth open: the jaw rotated by 0.3 rad about +x. Every tensor this module
returns is in those units.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .._checks import FLOATING, check_dim, check_tensor
from .._nvtx import nvtx_range
from . import _mesh
from .labels import parse_labels

JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")
FLAME_PARENTS = (-1, 0, 1, 1, 1)
NUM_SHAPE = 300
NUM_EXPRESSION = 100
NUM_JOINTS = 5
NUM_POSE_FEATURES = 9 * (NUM_JOINTS - 1)
PORTRAIT4D_SCALE = 3.0
CANONICAL_JAW_POSE = (0.3, 0.0, 0.0)
ONE_RING_SIZE = _mesh.ONE_RING_SIZE


def rodrigues(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from axis-angle vectors (Rodrigues' formula), differentiable
    everywhere including the zero rotation.

    Args:
        axis_angle: ``[..., 3]`` floating; direction = axis, norm = angle in radians
            (right-handed: ``(t, 0, 0)`` maps +y towards +z).

    Returns:
        ``[..., 3, 3]`` in the input dtype.
    """
    r = axis_angle
    theta2 = (r * r).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    small = theta2 < 1e-8
    safe2 = torch.where(small, torch.ones_like(theta2), theta2)
    theta = safe2.sqrt()
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / safe2)
    x, y, z = r.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*r.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=r.dtype, device=r.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def _as_np(x, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class HeadModel(nn.Module):
    """Base class of :class:`~head4d.head.FLAME` and :class:`~head4d.head.ProceduralHead`.

    All arrays are non-persistent buffers (they move with ``.to(device)``, convert with
    ``.double()``, and stay out of ``state_dict``). Raw arrays are given in the model's
    own units; the constructor applies Portrait4D's scaling and recentring (``scale=1.0,
    recentre=False`` keeps arrays that are already in Portrait4D's units as they are).

    Buffers (V vertices, F faces, float buffers in the model dtype, float32 by default):
        ``v_template`` ``[V, 3]`` (scaled, recentred), ``faces`` ``[F, 3]`` int64,
        ``shapedirs`` ``[V, 3, 300]``, ``exprdirs`` ``[V, 3, 100]``, ``posedirs`` ``[V, 3, 36]``,
        ``j_regressor`` ``[5, V]``, ``lbs_weights`` ``[V, 5]``, ``parents`` ``[5]`` int64,
        ``left_eye_indices``, ``right_eye_indices``, ``eye_indices`` (both eyeballs),
        ``face_indices`` (every vertex that is not on an eyeball: Portrait4D's "face" set),
        ``lips_indices`` (where known) - all ``[*]`` int64; ``one_ring`` ``[V, 10]`` int64
        (column 0 the vertex itself, then its neighbours, padded with -1);
        ``companion_indices`` ``[K, 3]`` int64, ``companion_weights`` ``[K, 3]``,
        ``companion_faces`` ``[Fc, 3]`` int64 (the simplified companion mesh: companion
        vertex k = sum_i weights[k, i] * vertices[indices[k, i]]).
    """

    num_shape = NUM_SHAPE
    num_expression = NUM_EXPRESSION
    joint_names = JOINT_NAMES

    def __init__(self, *, v_template, faces, shapedirs, exprdirs, posedirs, j_regressor,
                 lbs_weights, parents: Sequence[int] = FLAME_PARENTS, left_eye, right_eye,
                 lips=None, companion_indices, companion_weights, companion_faces,
                 masks: Optional[Dict[str, np.ndarray]] = None, scale: float = PORTRAIT4D_SCALE,
                 one_ring=None, recentre: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{type(self).__name__}: dtype must be float32 or float64, got {dtype}")
        name = type(self).__name__
        parents = tuple(int(p) for p in parents)
        if len(parents) != NUM_JOINTS or parents[0] >= 0 or any(
                not (0 <= parents[j] < j) for j in range(1, NUM_JOINTS)):
            raise ValueError(f"{name}: parents must list {NUM_JOINTS} joints with the root first "
                             f"and every parent before its child, got {parents}")
        self._parents = parents

        tmpl = _as_np(v_template) * scale
        nv = tmpl.shape[0]
        faces = _mesh.check_faces("faces", _as_np(faces, np.int64), nv, name)
        sd = _as_np(shapedirs) * scale
        ed = _as_np(exprdirs) * scale
        pd = _as_np(posedirs) * scale
        jr = _as_np(j_regressor)
        w = _as_np(lbs_weights)

        # Portrait4D: recentre on the canonical mesh's neck joint (joint 1). With the global
        # rotation at 0, the posed neck joint equals the rest neck joint of the zero-shape,
        # zero-expression template, whatever the jaw and eyes do. recentre=False: the arrays
        # are already in Portrait4D's units (scale 1 then), kept as they are, origin 0.
        origin = (jr @ tmpl)[1] if recentre else np.zeros(3)
        tmpl = tmpl - origin[None] if recentre else tmpl

        self.scale = float(scale)
        self.register_buffer("origin", torch.as_tensor(origin, dtype=dtype), persistent=False)
        fl = lambda a: torch.from_numpy(np.array(a, dtype=np.float64)).to(dtype)  # noqa: E731
        lg = lambda a: torch.from_numpy(np.array(a, dtype=np.int64))  # noqa: E731
        self.register_buffer("v_template", fl(tmpl), persistent=False)
        self.register_buffer("faces", lg(faces), persistent=False)
        self.register_buffer("shapedirs", fl(sd), persistent=False)
        self.register_buffer("exprdirs", fl(ed), persistent=False)
        self.register_buffer("posedirs", fl(pd), persistent=False)
        self.register_buffer("j_regressor", fl(jr), persistent=False)
        self.register_buffer("lbs_weights", fl(w), persistent=False)
        self.register_buffer("parents", lg(np.array(parents)), persistent=False)
        # joints are linear in the codes: precompute the regressed template and blendshapes
        self.register_buffer("j_template", fl(jr @ tmpl), persistent=False)
        self.register_buffer("j_shapedirs", fl(np.einsum("jv,vck->jck", jr, sd)), persistent=False)
        self.register_buffer("j_exprdirs", fl(np.einsum("jv,vck->jck", jr, ed)), persistent=False)

        left = np.unique(_as_np(left_eye, np.int64))
        right = np.unique(_as_np(right_eye, np.int64))
        eyes = np.union1d(left, right)
        face_set = np.setdiff1d(np.arange(nv), eyes)
        self.register_buffer("left_eye_indices", lg(left), persistent=False)
        self.register_buffer("right_eye_indices", lg(right), persistent=False)
        self.register_buffer("eye_indices", lg(eyes), persistent=False)
        self.register_buffer("face_indices", lg(face_set), persistent=False)
        self._has_lips = lips is not None
        self.register_buffer("lips_indices",
                             lg(np.unique(_as_np(lips, np.int64)) if lips is not None else np.zeros(0)),
                             persistent=False)
        self.masks = {k: np.asarray(v, dtype=np.int64) for k, v in (masks or {}).items()}

        if one_ring is None:
            one_ring = _mesh.one_ring(faces, nv, ONE_RING_SIZE)
        self.register_buffer("one_ring", lg(one_ring), persistent=False)

        self.register_buffer("companion_indices", lg(_as_np(companion_indices, np.int64)), persistent=False)
        self.register_buffer("companion_weights", fl(_as_np(companion_weights)), persistent=False)
        self.register_buffer("companion_faces", lg(_as_np(companion_faces, np.int64)), persistent=False)

    # ------------------------------------------------------------------ sizes and sets
    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.v_template.dtype

    @property
    def device(self) -> torch.device:
        return self.v_template.device

    @property
    def lips(self) -> torch.Tensor:
        """``[L]`` int64 lips vertex indices (Portrait4D's mouth set)."""
        if not self._has_lips:
            raise ValueError(f"{type(self).__name__}: no lips vertex set; FLAME's comes from the "
                             f"official masks file: FLAME.from_file(path, masks_path='FLAME_masks.pkl')")
        return self.lips_indices

    @property
    def has_lips(self) -> bool:
        return self._has_lips

    # ------------------------------------------------------------------ evaluation
    def _check_codes(self, op: str, **codes) -> int:
        sizes = {"shape": NUM_SHAPE, "expression": NUM_EXPRESSION, "neck_pose": 3, "jaw_pose": 3,
                 "eye_pose": 6, "pose": None}
        n = None
        first = None
        for name, value in codes.items():
            size = sizes[name]
            if size is None:  # full pose [N, 5, 3]
                check_tensor(op, name, value, "[N, 5, 3]", 3, FLOATING)
                check_dim(op, name, value, 1, NUM_JOINTS, "[N, 5, 3]")
                check_dim(op, name, value, 2, 3, "[N, 5, 3]")
            else:
                expected = f"[N, {size}]"
                check_tensor(op, name, value, expected, 2, FLOATING)
                check_dim(op, name, value, 1, size, expected)
            if n is None:
                n, first = value.shape[0], name
            elif value.shape[0] != n:
                raise ValueError(f"{op}: {name} has batch size {value.shape[0]} but {first} has {n}")
            if value.device != self.device:
                raise ValueError(f"{op}: {name} is on {value.device} but the model is on {self.device}; "
                                 f"move the model with .to(device)")
        return n

    def lbs(self, shape: torch.Tensor, expression: torch.Tensor,
            pose: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Linear blend skinning with a full pose (the global rotation included).

        Args:
            shape: ``[N, 300]``; expression: ``[N, 100]``; pose: ``[N, 5, 3]`` axis-angles of
                (global, neck, jaw, left eye, right eye). Floating, on the model's device;
                computed in the model dtype.

        Returns:
            ``(vertices [N, V, 3], joints [N, 5, 3])`` in the model dtype, posed, in
            Portrait4D's units (scaled by 3, canonical neck joint at the origin).
        """
        op = f"{type(self).__name__}.lbs"
        self._check_codes(op, shape=shape, expression=expression, pose=pose)
        return self._lbs(shape, expression, pose)

    def _lbs(self, shape, expression, pose):
        dt = self.dtype
        shape, expression, pose = shape.to(dt), expression.to(dt), pose.to(dt)
        n = shape.shape[0]
        nv = self.num_vertices
        nj = NUM_JOINTS
        v_shaped = (self.v_template.reshape(1, nv * 3)
                    + shape @ self.shapedirs.reshape(nv * 3, NUM_SHAPE).t()
                    + expression @ self.exprdirs.reshape(nv * 3, NUM_EXPRESSION).t())
        joints = (self.j_template.reshape(1, nj * 3)
                  + shape @ self.j_shapedirs.reshape(nj * 3, NUM_SHAPE).t()
                  + expression @ self.j_exprdirs.reshape(nj * 3, NUM_EXPRESSION).t()).reshape(n, nj, 3)
        rot = rodrigues(pose)  # [N, 5, 3, 3]
        eye = torch.eye(3, dtype=dt, device=rot.device)
        pose_feature = (rot[:, 1:] - eye).reshape(n, NUM_POSE_FEATURES)
        v_posed = (v_shaped + pose_feature @ self.posedirs.reshape(nv * 3, NUM_POSE_FEATURES).t()).reshape(n, nv, 3)

        g_rot = [None] * nj
        g_trans = [None] * nj
        for j, p in enumerate(self._parents):
            if p < 0:
                g_rot[j] = rot[:, j]
                g_trans[j] = joints[:, j]
            else:
                g_rot[j] = g_rot[p] @ rot[:, j]
                g_trans[j] = g_trans[p] + (g_rot[p] @ (joints[:, j] - joints[:, p]).unsqueeze(-1)).squeeze(-1)
        g_rot = torch.stack(g_rot, dim=1)  # [N, 5, 3, 3]
        posed_joints = torch.stack(g_trans, dim=1)  # [N, 5, 3]
        # skinning transforms map rest-pose points: x -> G_R x + (G_t - G_R J)
        a_trans = posed_joints - (g_rot @ joints.unsqueeze(-1)).squeeze(-1)
        w = self.lbs_weights
        t_rot = torch.einsum("vj,njab->nvab", w, g_rot)
        t_trans = torch.einsum("vj,nja->nva", w, a_trans)
        verts = torch.einsum("nvab,nvb->nva", t_rot, v_posed) + t_trans
        return verts, posed_joints

    def full_pose(self, neck_pose: torch.Tensor, jaw_pose: torch.Tensor, eye_pose: torch.Tensor) -> torch.Tensor:
        """Portrait4D's full pose ``[N, 5, 3]``: global 0, neck, jaw, left eye, right eye."""
        n = neck_pose.shape[0]
        return torch.cat([torch.zeros_like(neck_pose), neck_pose, jaw_pose, eye_pose], dim=1).reshape(n, NUM_JOINTS, 3)

    def forward(self, shape: torch.Tensor, expression: torch.Tensor, neck_pose: torch.Tensor,
                jaw_pose: torch.Tensor, eye_pose: torch.Tensor, *, return_joints: bool = False):
        """Posed vertices for a batch of codes, as Portrait4D evaluates FLAME.

        Args:
            shape: ``[N, 300]`` shape coefficients.
            expression: ``[N, 100]`` expression coefficients.
            neck_pose: ``[N, 3]`` neck axis-angle (radians).
            jaw_pose: ``[N, 3]`` jaw axis-angle; ``(0.3, 0, 0)`` opens the mouth as in the canonical mesh.
            eye_pose: ``[N, 6]`` left eye then right eye axis-angles.
            All floating, on the model's device (any floating dtype; computed in the model dtype),
            differentiable.
            return_joints: also return the posed joints.

        Returns:
            ``vertices [N, V, 3]`` in the model dtype (scaled by 3, canonical neck joint at the
            origin), or ``(vertices, joints [N, 5, 3])``.
        """
        op = f"{type(self).__name__}.forward"
        self._check_codes(op, shape=shape, expression=expression, neck_pose=neck_pose,
                          jaw_pose=jaw_pose, eye_pose=eye_pose)
        with nvtx_range(f"head4d.head.{type(self).__name__}"):
            dt = self.dtype
            pose = self.full_pose(neck_pose.to(dt), jaw_pose.to(dt), eye_pose.to(dt))
            verts, joints = self._lbs(shape, expression, pose)
        return (verts, joints) if return_joints else verts

    def forward_labels(self, labels: torch.Tensor, *, return_joints: bool = False):
        """:meth:`forward` on the codes of Portrait4D's ``[N, 437]`` labels (see :func:`parse_labels`)."""
        codes = parse_labels(labels)
        return self.forward(codes["shape"], codes["expression"], codes["neck_pose"], codes["jaw_pose"],
                            codes["eye_pose"], return_joints=return_joints)

    def zero_codes(self, batch: int = 1) -> Dict[str, torch.Tensor]:
        """Zero codes for ``batch`` heads: a dict of ``shape [N, 300]``, ``expression [N, 100]``,
        ``neck_pose [N, 3]``, ``jaw_pose [N, 3]``, ``eye_pose [N, 6]`` in the model dtype and device."""
        kw = dict(dtype=self.dtype, device=self.device)
        return {"shape": torch.zeros(batch, NUM_SHAPE, **kw), "expression": torch.zeros(batch, NUM_EXPRESSION, **kw),
                "neck_pose": torch.zeros(batch, 3, **kw), "jaw_pose": torch.zeros(batch, 3, **kw),
                "eye_pose": torch.zeros(batch, 6, **kw)}

    def canonical_codes(self, batch: int = 1) -> Dict[str, torch.Tensor]:
        """Portrait4D's canonical codes: zero shape and expression, jaw ``(0.3, 0, 0)``, the rest zero."""
        codes = self.zero_codes(batch)
        codes["jaw_pose"] = codes["jaw_pose"] + torch.tensor(CANONICAL_JAW_POSE, dtype=self.dtype, device=self.device)
        return codes

    def canonical_vertices(self) -> torch.Tensor:
        """Portrait4D's canonical mesh (mouth open): ``[V, 3]`` in the model dtype and device."""
        with torch.no_grad():
            return self.forward(**self.canonical_codes(1))[0]

    def canonical_joints(self) -> torch.Tensor:
        """The canonical mesh's posed joints ``[5, 3]``; joint 1 (the neck) is at the origin."""
        with torch.no_grad():
            return self.forward(**self.canonical_codes(1), return_joints=True)[1][0]

    def companion_vertices(self, vertices: torch.Tensor) -> torch.Tensor:
        """The simplified companion mesh's vertices from full-mesh vertices.

        Args:
            vertices: ``[..., V, 3]`` floating (e.g. the output of :meth:`forward`).

        Returns:
            ``[..., K, 3]`` in ``vertices.dtype``; its faces are ``companion_faces``.
        """
        op = f"{type(self).__name__}.companion_vertices"
        if not isinstance(vertices, torch.Tensor) or vertices.dim() < 2:
            raise TypeError(f"{op}: vertices must be a tensor of shape [..., {self.num_vertices}, 3]")
        if vertices.shape[-2:] != (self.num_vertices, 3):
            raise ValueError(f"{op}: vertices must have shape [..., {self.num_vertices}, 3], "
                             f"got [{', '.join(str(s) for s in vertices.shape)}]")
        idx = self.companion_indices.to(vertices.device)
        w = self.companion_weights.to(device=vertices.device, dtype=vertices.dtype)
        gathered = vertices[..., idx.reshape(-1), :].reshape(*vertices.shape[:-2], idx.shape[0], 3, 3)
        return (gathered * w.unsqueeze(-1)).sum(-2)

    def extra_repr(self) -> str:
        return (f"vertices={self.num_vertices}, faces={self.num_faces}, "
                f"companion={self.companion_indices.shape[0]} vertices / {self.companion_faces.shape[0]} faces, "
                f"scale={self.scale}")
