"""head4d: fast kernels for one-shot 4D head avatars (triplane NeRF heads, as in Portrait4D).

``import head4d`` never compiles anything; a missing compiled extension makes the
ops fall back to their plain-PyTorch references with a one-time warning.
"""
from . import deform, head, nn, ops, reference
from ._backend import BACKENDS, available_backends, extension_has_cuda
from .ops import sample_triplanes

__version__ = "0.1.0"

__all__ = ["BACKENDS", "available_backends", "deform", "extension_has_cuda", "head", "nn", "ops", "reference",
           "sample_triplanes", "__version__"]
