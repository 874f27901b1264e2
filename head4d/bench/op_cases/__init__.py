"""Each op family's benchmark cases, one module per family; importing this package
registers them all (:func:`head4d.bench.register`).

"quick" in the case docstrings means the small shapes (:attr:`Settings.small
<head4d.bench.case.Settings.small>`): built in the quick mode and, on the CPU, in the
default mode.

A new op's cases go in a new module here: a function ``(Settings) -> list[Case]``
decorated with ``@register("op_name")``, and one import line below.
"""
# The import order is the order ops run and print in (cheap single ops first, whole
# models last); keep it when adding a module.
from . import triplanes  # noqa: F401  (sample_triplanes)
from . import compositing  # noqa: F401  (composite_rays)
from . import importance  # noqa: F401  (sample_importance)
from . import bias_act  # noqa: F401  (StyleGAN2's bias_act)
from . import decoding  # noqa: F401  (decode_triplanes)
from . import deformation  # noqa: F401  (sample_grid3d, one_ring_deform, surface_field_grid, deform)
from . import attention  # noqa: F401
from . import upfirdn2d  # noqa: F401
from . import conv2d_resample  # noqa: F401  (modulated_conv2d, discriminator_r1)
from . import rasterize  # noqa: F401  (rasterize_triangles)
from . import render  # noqa: F401
from . import genhead  # noqa: F401  (genhead, genhead_render)
from . import reconstructor  # noqa: F401  (reconstructor_encode, reconstructor_reenact, reconstructor_train, decoder_attention)
from . import training  # noqa: F401  (train_genhead, train_reconstructor: whole training steps)
