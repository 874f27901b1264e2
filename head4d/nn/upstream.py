"""Renaming the released Portrait4D reconstructor's parameters to :mod:`head4d.nn`'s.

:class:`~head4d.nn.BlockCross`, :class:`~head4d.nn.Block`,
:class:`~head4d.nn.EncoderCanonical` and :class:`~head4d.nn.DecoderTriplane` carry the
released names and load a released state dict as it is; this module serves
:class:`~head4d.nn.TransformerBlock` and :class:`~head4d.nn.MotionTokens`, head4d's own
spellings. The released Portrait4D code names the parts of its transformer as follows;
:class:`~head4d.nn.PatchEmbed`, the attentions and the Mix-FFN keep the upstream names
(``proj``, ``norm``; ``q``, ``kv``, ``proj``, ``sr``, ``norm``; ``fc1``,
``dwconv.dwconv``, ``fc2``), the rest is renamed:

=====================================  ==============================  =========================
upstream (in a block)                  head4d (in a TransformerBlock)  meaning
=====================================  ==============================  =========================
``norm2``, ``attn2`` (``BlockCross``)  ``norm_cross``, ``cross_attn``  cross-attention
``norm1``, ``attn1`` (``BlockCross``)  ``norm_attn``, ``attn``         self-attention
``norm1``, ``attn`` (``Block``)        ``norm_attn``, ``attn``         self-attention
``norm3`` / ``norm2`` (``Block``)      ``norm_mlp``                    Mix-FFN norm
=====================================  ==============================  =========================

Motion MLPs: ``maps_neutral.{0,2}`` + ``proj_y_neutral`` (the source's, for
canonicalization) and ``maps.{0,2}`` + ``proj_y`` (the driver's) become a
:class:`~head4d.nn.MotionTokens`' ``mlp.{0,2}`` + ``proj``. Blocks live under
``trans_blocks_neutral.<i>.``, ``trans_blocks_motion.<i>.`` (``EncoderCanonical``) and
``trans_blocks.<i>.`` (``DecoderTriplane``), patch embeddings under ``patch_embed.``.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

__all__ = ["map_upstream_block", "map_upstream_motion_mlp", "map_upstream_prefix"]

_CROSS_BLOCK = (("norm2.", "norm_cross."), ("attn2.", "cross_attn."), ("norm1.", "norm_attn."),
                ("attn1.", "attn."), ("norm3.", "norm_mlp."), ("mlp.", "mlp."))
_SELF_BLOCK = (("norm1.", "norm_attn."), ("attn.", "attn."), ("norm2.", "norm_mlp."), ("mlp.", "mlp."))


def map_upstream_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries under ``prefix`` with the prefix removed (``patch_embed.`` for a
    :class:`~head4d.nn.PatchEmbed`, whose names are the upstream ones)."""
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no upstream parameters under prefix {prefix!r}")
    return out


def map_upstream_block(state_dict: Mapping[str, torch.Tensor], prefix: str = "",
                       cross: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """A released ``BlockCross`` (``cross=True``) or ``Block`` (``cross=False``) state
    dict, under ``prefix`` (e.g. ``"trans_blocks_motion.0."``), renamed for a
    :class:`~head4d.nn.TransformerBlock` with (or without) ``context_dim``. ``cross=None``
    detects it (``attn2.q.weight`` present). Raises ``KeyError`` for an entry it cannot
    place (the unused upstream options ``normalize_y`` and a spatially reduced cross-attention)."""
    own = map_upstream_prefix(state_dict, prefix)
    if cross is None:
        cross = "attn2.q.weight" in own
    rules = _CROSS_BLOCK if cross else _SELF_BLOCK
    out = {}
    for key, value in own.items():
        for old, new in rules:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            raise KeyError(f"upstream {'BlockCross' if cross else 'Block'} entry {prefix + key!r} has no "
                           f"head4d.nn.TransformerBlock counterpart")
        if cross and key.startswith("attn2.") and key.split(".")[1] not in ("q", "kv", "proj"):
            raise KeyError(f"upstream cross-attention entry {prefix + key!r} (normalize_y or sr_ratio > 1) is not "
                           f"supported by head4d.nn.CrossAttention")
    return out


def map_upstream_motion_mlp(state_dict: Mapping[str, torch.Tensor], which: str = "driver",
                            prefix: str = "") -> Dict[str, torch.Tensor]:
    """A released ``EncoderCanonical``'s motion MLP, renamed for a
    :class:`~head4d.nn.MotionTokens`: ``which="source"`` takes ``maps_neutral`` +
    ``proj_y_neutral``, ``which="driver"`` takes ``maps`` + ``proj_y``; ``prefix`` is the
    encoder's own prefix in ``state_dict``."""
    if which not in ("source", "driver"):
        raise ValueError(f"which must be 'source' or 'driver', got {which!r}")
    maps, proj = ("maps_neutral.", "proj_y_neutral.") if which == "source" else ("maps.", "proj_y.")
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key.startswith(maps):
            out["mlp." + key[len(maps):]] = value
        elif key.startswith(proj):
            out["proj." + key[len(proj):]] = value
    if "proj.weight" not in out:
        raise KeyError(f"no upstream {prefix + proj}weight in the state dict")
    return out
