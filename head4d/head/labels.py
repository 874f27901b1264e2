"""Portrait4D's 437-number per-image label layout, parsed into camera and FLAME codes.

Layout (``docs/design.md``, "The per-image label"; the same order in Portrait4D's
datasets and its generator conditioning)::

    [0:16]    cam2world      4 x 4, row-major (``labels[:, :16].view(-1, 4, 4)``)
    [16:25]   intrinsics     3 x 3 normalized intrinsics, row-major
    [25:325]  shape          300 FLAME shape coefficients
    [325:425] expression     100 FLAME expression coefficients
    [425:428] neck_pose      neck axis-angle
    [428:431] jaw_pose       jaw axis-angle
    [431:437] eye_pose       left eye axis-angle (3), then right eye (3)

The first 25 numbers are EG3D's camera label (``camera``); Portrait4D's mapping network is
conditioned on ``camera`` + ``shape`` (325 numbers). Training zeroes the neck and lets the
camera carry the total head rotation.
"""
from __future__ import annotations

from typing import Dict

import torch

from .._checks import FLOATING, check_dim, check_same_device, check_tensor

LABEL_SIZE = 437

#: field name -> (start, stop) in the 437-number label, in order.
LABEL_LAYOUT: Dict[str, tuple] = {
    "cam2world": (0, 16),
    "intrinsics": (16, 25),
    "shape": (25, 325),
    "expression": (325, 425),
    "neck_pose": (425, 428),
    "jaw_pose": (428, 431),
    "eye_pose": (431, 437),
}

_FIELD_SHAPES = {
    "cam2world": "[N, 4, 4]",
    "intrinsics": "[N, 3, 3]",
    "shape": "[N, 300]",
    "expression": "[N, 100]",
    "neck_pose": "[N, 3]",
    "jaw_pose": "[N, 3]",
    "eye_pose": "[N, 6]",
}


def parse_labels(labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Split Portrait4D labels into camera and FLAME codes.

    Args:
        labels: ``[N, 437]`` floating tensor (any floating dtype, any device).

    Returns:
        A dict of views into ``labels`` (same dtype and device):
        ``camera`` ``[N, 25]`` (EG3D's camera label: cam2world then intrinsics, flattened),
        ``cam2world`` ``[N, 4, 4]``, ``intrinsics`` ``[N, 3, 3]``, ``shape`` ``[N, 300]``,
        ``expression`` ``[N, 100]``, ``neck_pose`` ``[N, 3]``, ``jaw_pose`` ``[N, 3]``,
        ``eye_pose`` ``[N, 6]`` (left eye then right eye). Matrices are row-major, as
        Portrait4D reads them (``c[:, :16].view(-1, 4, 4)``).
    """
    op = "parse_labels"
    check_tensor(op, "labels", labels, "[N, 437]", 2, FLOATING)
    check_dim(op, "labels", labels, 1, LABEL_SIZE, "[N, 437]")
    n = labels.shape[0]
    out = {"camera": labels[:, 0:25]}
    for name, (start, stop) in LABEL_LAYOUT.items():
        field = labels[:, start:stop]
        if name == "cam2world":
            field = field.reshape(n, 4, 4)
        elif name == "intrinsics":
            field = field.reshape(n, 3, 3)
        out[name] = field
    return out


def make_labels(cam2world: torch.Tensor, intrinsics: torch.Tensor, shape: torch.Tensor,
                expression: torch.Tensor, neck_pose: torch.Tensor, jaw_pose: torch.Tensor,
                eye_pose: torch.Tensor) -> torch.Tensor:
    """Pack camera and FLAME codes into Portrait4D's ``[N, 437]`` labels (inverse of :func:`parse_labels`).

    Args:
        cam2world: ``[N, 4, 4]``; intrinsics: ``[N, 3, 3]``; shape: ``[N, 300]``;
        expression: ``[N, 100]``; neck_pose, jaw_pose: ``[N, 3]``; eye_pose: ``[N, 6]``.
        All floating, on one device.

    Returns:
        ``[N, 437]`` in the promoted dtype of the inputs.
    """
    op = "make_labels"
    fields = {"cam2world": cam2world, "intrinsics": intrinsics, "shape": shape,
              "expression": expression, "neck_pose": neck_pose, "jaw_pose": jaw_pose,
              "eye_pose": eye_pose}
    n = None
    flat = []
    for name, value in fields.items():
        expected = _FIELD_SHAPES[name]
        rank = 3 if name in ("cam2world", "intrinsics") else 2
        check_tensor(op, name, value, expected, rank, FLOATING)
        if n is None:
            n = value.shape[0]
        if value.shape[0] != n:
            raise ValueError(f"{op}: {name} must have shape {expected} with N = {n} (from cam2world), "
                             f"got [{', '.join(str(s) for s in value.shape)}]")
        start, stop = LABEL_LAYOUT[name]
        width = stop - start
        if rank == 3:
            side = 4 if name == "cam2world" else 3
            check_dim(op, name, value, 1, side, expected)
            check_dim(op, name, value, 2, side, expected)
        else:
            check_dim(op, name, value, 1, width, expected)
        flat.append(value.reshape(n, width))
    check_same_device(op, list(fields.items()))
    dtype = flat[0].dtype
    for t in flat[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.cat([t.to(dtype) for t in flat], dim=1)
