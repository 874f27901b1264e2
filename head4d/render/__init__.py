"""Triplane volume rendering built from head4d's ops: EG3D's / Portrait4D's decoder
(:class:`TriplaneDecoder`) and importance renderer (:class:`TriplaneRenderer`)."""
from .decoder import (EG3D_KEY_MAP, FullyConnectedLayer, TriplaneDecoder,
                      map_upstream_decoder_state_dict)
from .renderer import TriplaneRenderer

__all__ = ["EG3D_KEY_MAP", "FullyConnectedLayer", "TriplaneDecoder", "TriplaneRenderer",
           "map_upstream_decoder_state_dict"]
