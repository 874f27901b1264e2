"""Plain-PyTorch reference implementations of every op in :mod:`head4d.ops`.

They define the exact semantics the fast backends are tested against, and they
are the ``torch`` backend. They favour clarity over speed.
"""
from .bias_act import bias_act
from .compositing import composite_rays
from .decoding import decode_mlp, decode_triplanes
from .rays import auto_plane_limits, generate_rays, ray_box_intersections, ray_box_limits
from .sampling import merge_samples, sample_importance, sample_pdf, smooth_weights, stratified_depths
from .triplanes import PLANE_AXES, sample_triplanes

__all__ = ["PLANE_AXES", "auto_plane_limits", "bias_act", "composite_rays", "decode_mlp", "decode_triplanes", "generate_rays",
           "merge_samples",
           "ray_box_intersections", "ray_box_limits", "sample_importance", "sample_pdf", "sample_triplanes",
           "smooth_weights", "stratified_depths"]
