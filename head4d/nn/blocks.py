"""Mix-FFN and the transformer block of Portrait4D's reconstructor.

Block (``docs/design.md``, "The reconstructor's transformer"; the order of the released code)::

    x = x + scale * CrossAttention(LN_cross(x), motion)    # only with context_dim
    x = x + Attention(LN_attn(x), h, w)                     # self-attention, optional spatial reduction
    x = x + MixFFN(LN_mlp(x), h, w)

The canonicalization and re-enactment blocks: dim 1,024, 4 heads, context_dim 1,024
(64 motion tokens), mlp_ratio 2, sr_ratio 1. The triplane decoder's block: dim 1,024,
2 heads, no context, mlp_ratio 2, sr_ratio 2. There is no positional embedding: the
Mix-FFN's depthwise convolution gives position.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import FLOATING
from ._common import (ATTENTION_DTYPES, check_grid, check_head_dims, check_positive_float, check_positive_int,
                      check_tokens, grid_to_tokens, init_conv, init_layer_norm, init_linear, nvtx, op_name,
                      tokens_to_grid)
from .attention import Attention, CrossAttention

__all__ = ["MixFFN", "TransformerBlock"]


class MixFFN(nn.Module):
    """SegFormer's Mix-FFN: ``fc2(GELU(dwconv(fc1(x))))``.

    ``fc1 = Linear(dim, hidden)``; ``dwconv = Conv2d(hidden, hidden, 3, padding=1,
    groups=hidden)`` (depthwise, with bias, zero padding) over the ``h x w`` token grid;
    exact (erf) GELU; ``fc2 = Linear(hidden, dim)``. No dropout.

    Args:
        dim: token channels (in and out).
        hidden: hidden channels (Portrait4D: ``2 * dim``).

    Parameters: ``fc1.weight [hidden, dim]``, ``fc1.bias [hidden]``, ``dwconv.weight
    [hidden, 1, 3, 3]``, ``dwconv.bias [hidden]``, ``fc2.weight [dim, hidden]``,
    ``fc2.bias [dim]``.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        op = op_name(self)
        self.dim = check_positive_int(op, "dim", dim)
        self.hidden = check_positive_int(op, "hidden", hidden)
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear: truncated normal (std 0.02), zero bias; ``dwconv``: He normal over
        the fan-out (9 per channel), zero bias."""
        init_linear(self.fc1)
        init_linear(self.fc2)
        init_conv(self.dwconv)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Args:
            x: ``[B, h*w, dim]`` floating tokens (dtype of the parameters, or any under
                autocast), row-major grid order.
            h, w: the token grid.

        Returns:
            ``[B, h*w, dim]`` in the dtype of the layers' output.
        """
        op = op_name(self)
        h, w = check_grid(op, h, w)
        check_tokens(op, "x", x, self.dim, h, w, dtypes=FLOATING)
        with nvtx(self):
            y = self.fc1(x)
            y = grid_to_tokens(self.dwconv(tokens_to_grid(y, h, w)))
            return self.fc2(F.gelu(y))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}"


Scale = Union[float, torch.Tensor]


class TransformerBlock(nn.Module):
    """One block of Portrait4D's canonicalization / re-enactment module (with
    ``context_dim``) or of its triplane decoder (without).

    ``x += scale * cross_attn(norm_cross(x), motion)`` (only when ``context_dim`` is
    given), ``x += attn(norm_attn(x), h, w)``, ``x += mlp(norm_mlp(x), h, w)``, where
    ``cross_attn`` is :class:`CrossAttention` (output projection zero at init),
    ``attn`` is :class:`Attention` (``sr_ratio``), ``mlp`` is :class:`MixFFN` with
    ``int(dim * mlp_ratio)`` hidden channels and the norms are ``LayerNorm(dim)``
    (eps 1e-5, affine). The order of the three sub-blocks is the design note's and the
    released code's (cross-attention first).

    Args:
        dim: token channels; ``dim / num_heads`` one of 32, 64, 128, 256, 512.
        num_heads: heads of both attentions.
        context_dim: channels of the motion tokens; ``None`` for a block without
            cross-attention (the triplane decoder's).
        mlp_ratio: Mix-FFN hidden channels over ``dim`` (Portrait4D: 2).
        sr_ratio: spatial reduction of the self-attention (Portrait4D's decoder: 2).
        qkv_bias: bias in the query/key/value projections of both attentions.
        backend: the attention backend of both attentions (see :class:`Attention`).

    Submodules: ``norm_cross`` and ``cross_attn`` (with ``context_dim``), ``norm_attn``,
    ``attn``, ``norm_mlp``, ``mlp``. :func:`head4d.nn.upstream.map_upstream_block`
    renames a released ``BlockCross`` / ``Block`` state dict to these names.
    """

    def __init__(self, dim: int, num_heads: int, *, context_dim: Optional[int] = None, mlp_ratio: float = 2.0,
                 sr_ratio: int = 1, qkv_bias: bool = True, backend: Optional[str] = None):
        super().__init__()
        op = op_name(self)
        self.dim = check_positive_int(op, "dim", dim)
        self.num_heads = check_positive_int(op, "num_heads", num_heads)
        check_head_dims(op, self.dim, self.num_heads)
        self.mlp_ratio = check_positive_float(op, "mlp_ratio", mlp_ratio)
        hidden = int(dim * self.mlp_ratio)
        if hidden < 1:
            raise ValueError(f"{op}: mlp_ratio {mlp_ratio} gives {hidden} hidden channels for dim {dim}")
        if context_dim is not None:
            self.context_dim = check_positive_int(op, "context_dim", context_dim)
            self.norm_cross = nn.LayerNorm(dim)
            self.cross_attn = CrossAttention(dim, context_dim, num_heads, qkv_bias=qkv_bias, backend=backend)
        else:
            self.context_dim = None
            self.norm_cross = None
            self.cross_attn = None
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, sr_ratio=sr_ratio, qkv_bias=qkv_bias, backend=backend)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, hidden)
        self.reset_parameters()

    @property
    def has_cross_attention(self) -> bool:
        return self.cross_attn is not None

    def reset_parameters(self) -> None:
        """Norms: ones and zeros; the attentions and the Mix-FFN: their own
        ``reset_parameters`` (the cross-attention's output projection zero)."""
        for norm in (self.norm_cross, self.norm_attn, self.norm_mlp):
            if norm is not None:
                init_layer_norm(norm)
        for m in (self.cross_attn, self.attn, self.mlp):
            if m is not None:
                m.reset_parameters()

    def _check_scale(self, op: str, scale, x: torch.Tensor):
        """``scale`` as a Python float or a tensor broadcastable to ``[B, 1, 1]``."""
        if isinstance(scale, torch.Tensor):
            if scale.is_complex() or scale.dtype == torch.bool:
                raise TypeError(f"{op}: scale must be a real number or a real tensor of shape [B] or [], "
                                f"got a {str(scale.dtype).replace('torch.', '')} tensor")
            b = x.shape[0]
            if scale.dim() == 0:
                s = scale  # broadcasts as is (even a CPU scalar against CUDA tokens)
            elif scale.dim() == 1 and scale.shape[0] == b:
                s = scale.reshape(b, 1, 1)
            else:
                raise ValueError(f"{op}: scale must be a number or a tensor of shape [B] = [{b}] (one motion scale "
                                 f"per sample) or [], got shape {list(scale.shape)}")
            if scale.dim() > 0 and scale.device != x.device:  # a 0-dim CPU tensor broadcasts anywhere
                raise ValueError(f"{op}: scale is on {scale.device} but x is on {x.device}; "
                                 f"all tensors must be on one device")
            return s
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"{op}: scale must be a real number or a tensor of shape [B], "
                            f"got {type(scale).__name__}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"{op}: scale must be finite, got {scale}")
        return scale

    def forward(self, x: torch.Tensor, h: int, w: int, motion: Optional[torch.Tensor] = None,
                scale: Scale = 1.0) -> torch.Tensor:
        """Args:
            x: ``[B, h*w, dim]`` float16, bfloat16 or float32 tokens, row-major grid order.
            h, w: the token grid.
            motion: ``[B, Lm, context_dim]`` motion tokens, same device and dtype as the
                parameters (or any floating dtype under autocast). Required by a block
                with cross-attention unless ``scale`` is the number 0; must be ``None``
                for a block without.
            scale: the motion scale multiplying the cross-attention branch: a number,
                or a tensor of shape ``[B]`` (one per sample, on ``x``'s device) or
                ``[]``, any real dtype. 0 switches the cross-attention off
                (Portrait4D's disentangled learning). The **number** 0 skips the
                cross-attention entirely (its parameters get no gradient, ``None``);
                a zero **tensor** computes it and multiplies by 0, so the result is the
                same bit for bit, the cross-attention's parameters get exactly zero
                gradients and stay in the graph (what DistributedDataParallel without
                ``find_unused_parameters`` needs), with no host-device sync.
                Must be left at 1.0 by a block without cross-attention.

        Returns:
            ``[B, h*w, dim]``, in ``x.dtype`` (the residual stream's dtype, promoted
            with the branches' under autocast).
        """
        op = op_name(self)
        h, w = check_grid(op, h, w)
        check_tokens(op, "x", x, self.dim, h, w, dtypes=ATTENTION_DTYPES)
        with nvtx(self):
            if self.cross_attn is not None:
                scale = self._check_scale(op, scale, x)
                skip = isinstance(scale, float) and scale == 0.0
                if motion is None:
                    if not skip:
                        raise ValueError(f"{op}: this block has cross-attention (context_dim {self.context_dim}): "
                                         f"motion [B, Lm, {self.context_dim}] is required unless scale is "
                                         f"the number 0")
                else:
                    self.cross_attn.check_inputs(x, motion)
                if not skip:
                    y = self.cross_attn(self.norm_cross(x), motion)
                    if isinstance(scale, torch.Tensor):
                        y = y * scale.to(x.dtype)
                    elif scale != 1.0:
                        y = y * scale
                    x = x + y
            elif motion is not None:
                raise ValueError(f"{op}: motion was given but this block has no cross-attention "
                                 f"(constructed without context_dim)")
            elif isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, numbers.Real) or scale != 1.0:
                raise ValueError(f"{op}: scale multiplies the cross-attention, which this block does not have "
                                 f"(constructed without context_dim); leave it at its default 1.0, got {scale!r}")
            x = x + self.attn(self.norm_attn(x), h, w)
            x = x + self.mlp(self.norm_mlp(x), h, w)
            return x

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, context_dim={self.context_dim}, "
                f"mlp_ratio={self.mlp_ratio}")

