"""Triplane volume rendering built from head4d's ops: EG3D's / Portrait4D's decoder
(:class:`TriplaneDecoder`) and importance renderer (:class:`TriplaneRenderer`); the part
masks and correspondence map rasterized from the head mesh (:mod:`.masks`); the distortion
loss of the ray weights (:func:`distortion_loss`)."""
from .decoder import (EG3D_KEY_MAP, FullyConnectedLayer, TriplaneDecoder,
                      map_upstream_decoder_state_dict)
from .losses import distortion_loss
from .masks import correspondence_map, rasterize_masks
from .renderer import TriplaneRenderer

__all__ = ["EG3D_KEY_MAP", "FullyConnectedLayer", "TriplaneDecoder", "TriplaneRenderer",
           "correspondence_map", "distortion_loss", "map_upstream_decoder_state_dict", "rasterize_masks"]
