"""Plain-PyTorch reference implementations of every op in :mod:`head4d.ops`.

They define the exact semantics the fast backends are tested against, and they
are the ``torch`` backend. They favour clarity over speed.
"""
from .triplanes import PLANE_AXES, sample_triplanes

__all__ = ["PLANE_AXES", "sample_triplanes"]
