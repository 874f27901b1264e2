"""head4d's public ops. Each has a plain-PyTorch reference in :mod:`head4d.reference`
and fast backends chosen per call (see :mod:`head4d._backend`)."""
from .compositing import composite_rays
from .rays import auto_plane_limits, generate_rays, ray_box_limits
from .sampling import merge_samples, sample_importance, stratified_depths
from .triplanes import sample_triplanes

__all__ = ["auto_plane_limits", "composite_rays", "generate_rays", "merge_samples", "ray_box_limits",
           "sample_importance", "sample_triplanes", "stratified_depths"]
