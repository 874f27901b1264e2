"""head4d's public ops. Each has a plain-PyTorch reference in :mod:`head4d.reference`
and fast backends chosen per call (see :mod:`head4d._backend`)."""
from .triplanes import sample_triplanes

__all__ = ["sample_triplanes"]
