"""Portrait4D's part-wise deformation field, composed from head4d's deformation ops.

:class:`PartwiseDeformation` warps observation-space sample points into the canonical
spaces of Portrait4D's two triplanes (``docs/design.md``, "The deformation of sample
points"; the paper's appendix B.1):

>>> from head4d.head import ProceduralHead
>>> deformation = PartwiseDeformation(ProceduralHead())
>>> codes = deformation.head_model.canonical_codes(batch=1)
>>> fields = deformation.build(**codes)          # once per image: meshes and grids
>>> warped = deformation.warp(points, fields)    # per sample point  # doctest: +SKIP
>>> warped.head, warped.part_points(), warped.inside_eye_box      # doctest: +SKIP

:class:`DeformationFields` holds the per-image tensors (built once, queried by the coarse
and the fine pass), :class:`WarpedPoints` the per-point results.
"""
from .partwise import (BLEND_SHARPNESS, BLEND_THRESHOLD, COARSE_RESOLUTION, EYE_BOX_SCALE, FINE_RESOLUTION,
                       SMOOTH_PASSES, DeformationFields, PartwiseDeformation, WarpedPoints)

__all__ = ["BLEND_SHARPNESS", "BLEND_THRESHOLD", "COARSE_RESOLUTION", "EYE_BOX_SCALE", "FINE_RESOLUTION",
           "SMOOTH_PASSES", "DeformationFields", "PartwiseDeformation", "WarpedPoints"]
