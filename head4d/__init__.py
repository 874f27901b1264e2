"""head4d: fast kernels for one-shot 4D head avatars (triplane NeRF heads, as in Portrait4D).

``import head4d`` never compiles anything; a missing compiled extension makes the
ops fall back to their plain-PyTorch references with a one-time warning.
"""
from . import deform, head, models, nn, ops, reference
from ._backend import BACKENDS, available_backends, backend_scope, extension_has_cuda
from .ops import sample_triplanes

__version__ = "0.1.0"

__all__ = ["BACKENDS", "available_backends", "backend_scope", "deform", "extension_has_cuda", "head", "models", "nn",
           "ops", "reference", "sample_triplanes", "__version__"]
