"""``head4d.models``: whole generators composed from head4d's ops and modules.

- :class:`GenHead` (config :class:`GenHeadConfig`, codes :class:`FlameCodes`): Portrait4D's
  part-wise 4D generator (stage one), with the upstream module tree and parameter names;
  :class:`GraphedRender`: its render-only path captured in a CUDA graph (opt-in).
"""
from .genhead import FlameCodes, GenHead, GenHeadConfig, GraphedRender, clip_vertices

__all__ = ["FlameCodes", "GenHead", "GenHeadConfig", "GraphedRender", "clip_vertices"]
