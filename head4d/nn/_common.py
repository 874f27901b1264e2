"""Helpers shared by the :mod:`head4d.nn` blocks: argument checks with clear errors,
token <-> grid views, the NVTX range of a module and the weight initialization.

Token layout (every block): ``[B, L, C]`` with ``L = h * w`` tokens in row-major grid
order, token ``i * w + j`` at grid row ``i``, column ``j``; the same order as
``feature_map.flatten(2).transpose(1, 2)`` of a ``[B, C, h, w]`` map.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from einops import rearrange
from torch import nn

from .. import _nvtx
from .._checks import FLOATING, check_int, check_positive_finite, check_tensor

#: ``check_positive_int(op, name, value, minimum=1)``: an int (not a bool) >= ``minimum``.
check_positive_int = check_int
#: ``check_positive_float(op, name, value)``: a finite real number > 0.
check_positive_float = check_positive_finite

#: Input dtypes of the attention blocks (those of :func:`head4d.ops.attention`).
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def nvtx(module: nn.Module):
    """The NVTX range ``head4d.nn.<ClassName>`` of one module call."""
    return _nvtx.nvtx_range("head4d.nn." + type(module).__name__)


def op_name(module_or_name) -> str:
    """``head4d.nn.<ClassName>``: the prefix of every error a block raises."""
    name = module_or_name if isinstance(module_or_name, str) else type(module_or_name).__name__
    return "head4d.nn." + name


def check_head_dims(op: str, dim: int, num_heads: int) -> int:
    """``dim`` split over ``num_heads`` heads of a size :func:`head4d.ops.attention` supports."""
    from ..ops.attention import HEAD_DIMS  # the op's supported set, one source of truth
    if dim % num_heads != 0:
        raise ValueError(f"{op}: dim {dim} must be divisible by num_heads {num_heads}")
    head_dim = dim // num_heads
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"{op}: head dim {head_dim} (dim {dim} / num_heads {num_heads}) is not supported by "
                         f"head4d.ops.attention; supported head dims: {HEAD_DIMS}")
    return head_dim


def check_grid(op: str, h, w) -> Tuple[int, int]:
    return check_positive_int(op, "h", h), check_positive_int(op, "w", w)


def check_tokens(op: str, name: str, x, dim: int, h: Optional[int] = None, w: Optional[int] = None,
                 dtypes: Sequence[torch.dtype] = FLOATING) -> torch.Tensor:
    """``x`` is ``[B, L, dim]`` (``L = h * w`` when a grid is given) of one of ``dtypes``."""
    if h is None:
        check_tensor(op, name, x, f"[B, L, {dim}]", 3, dtypes=dtypes)
    else:
        check_tensor(op, name, x, f"[B, h*w, {dim}] = [B, {h * w}, {dim}] for the grid (h, w) = ({h}, {w})",
                     3, dtypes=dtypes)
    if x.shape[2] != dim:
        raise ValueError(f"{op}: {name} must have {dim} channels in its last dimension, got shape {list(x.shape)}")
    if h is not None and x.shape[1] != h * w:
        raise ValueError(f"{op}: {name} has {x.shape[1]} tokens (shape {list(x.shape)}) but the grid "
                         f"(h, w) = ({h}, {w}) holds h * w = {h * w}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{op}: {name} must hold at least one sample and one token, got shape {list(x.shape)}")
    return x


def tokens_to_grid(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[B, h*w, C]`` -> ``[B, C, h, w]`` as a channels-last view (no copy when ``x`` is contiguous)."""
    return rearrange(x, "b (h w) c -> b c h w", h=h, w=w)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, h*w, C]`` (no copy for a channels-last map)."""
    return rearrange(x, "b c h w -> b (h w) c")


def tokens_to_shuffled_grid(x: torch.Tensor, h: int, w: int, factor: int = 2) -> torch.Tensor:
    """Tokens to a pixel-shuffled map: ``[B, h*w, C * f^2]`` -> ``[B, C, f*h, f*w]``, what
    ``nn.PixelShuffle(f)`` gives for the ``[B, C * f^2, h, w]`` grid of the tokens: channel
    ``c * f^2 + i * f + j`` of token ``(y, x)`` lands at pixel ``(f*y + i, f*x + j)`` of channel ``c``."""
    return rearrange(x, "b (h w) (c i j) -> b c (h i) (w j)", h=h, w=w, i=factor, j=factor)


def init_linear(layer: nn.Linear, std: float = 0.02) -> None:
    """Truncated normal weights, zero bias: ``N(0, std^2)`` redrawn outside the absolute
    bounds [-2, 2], the released code's initializer (bounds in value, not in std, so at
    std 0.02 the weights are practically untruncated normal)."""
    nn.init.trunc_normal_(layer.weight, std=std, a=-2.0, b=2.0)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def init_conv(layer: nn.Conv2d) -> None:
    """He normal over the fan-out, ``N(0, 2 / (k_h * k_w * out / groups))``, zero bias."""
    fan_out = layer.kernel_size[0] * layer.kernel_size[1] * layer.out_channels // layer.groups
    nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / fan_out))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def init_layer_norm(layer: nn.LayerNorm) -> None:
    if layer.weight is not None:
        nn.init.ones_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def check_backend_choice(op: str, backend, choices) -> Optional[str]:
    """``backend``: None, ``"auto"`` or one of ``choices``; a clear error otherwise."""
    if backend is None or backend == "auto":
        return backend
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f"{op}: backend must be one of {tuple(choices)}, 'auto' or None, got {backend!r}")
    return backend
