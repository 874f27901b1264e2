"""``head4d.models``: whole generators composed from head4d's ops and modules.

- :class:`GenHead` (config :class:`GenHeadConfig`, codes :class:`FlameCodes`): Portrait4D's
  part-wise 4D generator (stage one), with the upstream module tree and parameter names;
  :class:`GraphedRender`: its render-only path captured in a CUDA graph (opt-in).
- :class:`Reconstructor` (config :class:`ReconstructorConfig`): Portrait4D's one-shot
  reconstructor (stage two), with the upstream module tree and parameter names;
  ``encode`` once per source image (:class:`EncodedSource`), ``reenact`` per frame.
"""
from .genhead import FlameCodes, GenHead, GenHeadConfig, GraphedRender, clip_vertices
from .reconstructor import EncodedSource, Reconstructor, ReconstructorConfig

__all__ = ["EncodedSource", "FlameCodes", "GenHead", "GenHeadConfig", "GraphedRender", "Reconstructor",
           "ReconstructorConfig", "clip_vertices"]
