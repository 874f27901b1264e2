"""``head4d.models``: whole generators composed from head4d's ops and modules.

- :class:`GenHead` (config :class:`GenHeadConfig`, codes :class:`FlameCodes`): Portrait4D's
  part-wise 4D generator (stage one), with the upstream module tree and parameter names.
"""
from .genhead import FlameCodes, GenHead, GenHeadConfig, clip_vertices

__all__ = ["FlameCodes", "GenHead", "GenHeadConfig", "clip_vertices"]
