"""head4d's public ops. Each has a plain-PyTorch reference in :mod:`head4d.reference`
and fast backends chosen per call (see :mod:`head4d._backend`)."""
from .attention import attention
from .compositing import composite_rays
from .decoding import decode_triplanes
from .deformation import (cell_centre_bound, closest_triangles, mesh_one_ring, one_ring_deform, sample_grid3d,
                          smooth_grid3d, surface_field_grid)
from .rays import auto_plane_limits, generate_rays, ray_box_limits
from .sampling import merge_samples, sample_importance, stratified_depths
from .triplanes import sample_triplanes

__all__ = ["attention", "cell_centre_bound", "closest_triangles", "mesh_one_ring", "one_ring_deform", "sample_grid3d",
           "smooth_grid3d", "surface_field_grid",
           "auto_plane_limits", "composite_rays", "decode_triplanes", "generate_rays", "merge_samples",
           "ray_box_limits",
           "sample_importance", "sample_triplanes", "stratified_depths"]

from .bias_act import bias_act  # noqa: E402

__all__ += ["bias_act"]
from .upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d  # noqa: E402

__all__ += ["downsample2d", "filter2d", "setup_filter", "upfirdn2d", "upsample2d"]
from .conv2d_resample import conv2d_resample, modulated_conv2d  # noqa: E402

__all__ += ["conv2d_resample", "modulated_conv2d"]
from .rasterize import interpolate, rasterize_triangles  # noqa: E402

__all__ += ["interpolate", "rasterize_triangles"]
