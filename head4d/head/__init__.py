"""Head models for the deformation field: FLAME and a built-in procedural head.

Both evaluate FLAME-style linear blend skinning as Portrait4D uses it (300 shape and 100
expression coefficients, neck + jaw + eye poses, global rotation 0, vertices scaled by 3 and
recentred on the canonical neck joint; canonical mesh = zero codes with the jaw open by
0.3 rad), and share one interface (:class:`HeadModel`):

>>> head = ProceduralHead()                       # no download needed
>>> codes = head.canonical_codes(batch=2)
>>> verts = head(**codes)                         # [2, V, 3]
>>> flame = FLAME.from_file("generic_model.pkl", masks_path="FLAME_masks.pkl")  # doctest: +SKIP

:func:`parse_labels` splits Portrait4D's 437-number labels into camera and codes.
"""
from .base import (CANONICAL_JAW_POSE, FLAME_PARENTS, JOINT_NAMES, NUM_EXPRESSION, NUM_SHAPE,
                   PORTRAIT4D_SCALE, HeadModel, rodrigues)
from .flame import FLAME, FLAME_URL
from .labels import LABEL_LAYOUT, LABEL_SIZE, make_labels, parse_labels
from .procedural import ProceduralHead

__all__ = ["CANONICAL_JAW_POSE", "FLAME", "FLAME_PARENTS", "FLAME_URL", "HeadModel", "JOINT_NAMES",
           "LABEL_LAYOUT", "LABEL_SIZE", "NUM_EXPRESSION", "NUM_SHAPE", "PORTRAIT4D_SCALE",
           "ProceduralHead", "make_labels", "parse_labels", "rodrigues"]
