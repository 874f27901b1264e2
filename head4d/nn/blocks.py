"""Mix-FFN and the transformer blocks of Portrait4D's reconstructor.

Block (``docs/design.md``, "The reconstructor's transformer"; the order of the released code)::

    x = x + scale * CrossAttention(LN_cross(x), motion)    # only with context_dim
    x = x + Attention(LN_attn(x), h, w)                     # self-attention, optional spatial reduction
    x = x + MixFFN(LN_mlp(x), h, w)

The canonicalization and re-enactment blocks: dim 1,024, 4 heads, context_dim 1,024
(64 motion tokens), mlp_ratio 2, sr_ratio 1. The triplane decoder's block: dim 1,024,
2 heads, no context, mlp_ratio 2, sr_ratio 2. There is no positional embedding: the
Mix-FFN's depthwise convolution gives position.

Two spellings of that block: :class:`TransformerBlock` (head4d's names, one class for
both kinds) and the released code's :class:`BlockCross` / :class:`Block` (its module
names and call signatures, so a Portrait4D state dict loads as it is). They share the
motion-scale handling (:func:`check_scale`, :func:`scaled_residual`).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import FLOATING
from ._common import (ATTENTION_DTYPES, check_grid, check_head_dims, check_positive_float, check_positive_int,
                      check_tokens, grid_to_tokens, init_conv, init_layer_norm, init_linear, nvtx, op_name,
                      tokens_to_grid)
from ._recompute import recompute, recompute_wanted
from .attention import Attention, CrossAttention

__all__ = ["Block", "BlockCross", "DWConv", "MixFFN", "TransformerBlock", "check_scale", "cross_attention_residual",
           "scaled_residual"]


class DWConv(nn.Module):
    """The Mix-FFN's depthwise 3x3 convolution over the token grid, tokens in and out.

    ``dwconv = Conv2d(dim, dim, 3, padding=1, groups=dim)`` (with bias, zero padding),
    applied to the ``h x w`` grid of the tokens. A module of its own only for the
    released parameter names (``mlp.dwconv.dwconv.weight``).

    Args:
        dim: channels.

    Parameters: ``dwconv.weight [dim, 1, 3, 3]``, ``dwconv.bias [dim]``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = check_positive_int(op_name(self), "dim", dim)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Args:
            x: ``[B, h*w, dim]`` floating tokens (the conv's dtype), row-major grid order.
            h, w: the token grid.

        Returns:
            ``[B, h*w, dim]`` in the conv's output dtype.
        """
        return grid_to_tokens(self.dwconv(tokens_to_grid(x, h, w)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class MixFFN(nn.Module):
    """SegFormer's Mix-FFN: ``fc2(GELU(dwconv(fc1(x))))``.

    ``fc1 = Linear(dim, hidden)``; ``dwconv`` a :class:`DWConv` (``Conv2d(hidden, hidden,
    3, padding=1, groups=hidden)``, depthwise, with bias, zero padding) over the ``h x w``
    token grid; exact (erf) GELU; ``fc2 = Linear(hidden, dim)``. No dropout.

    Args:
        dim: token channels (in and out).
        hidden: hidden channels (Portrait4D: ``2 * dim``).

    Parameters: ``fc1.weight [hidden, dim]``, ``fc1.bias [hidden]``, ``dwconv.dwconv.weight
    [hidden, 1, 3, 3]``, ``dwconv.dwconv.bias [hidden]``, ``fc2.weight [dim, hidden]``,
    ``fc2.bias [dim]``.

    Memory: when autograd records and the ops do not run on the ``torch`` references (the
    backend scope), it keeps only its input for the backward and runs its forward again
    there (:func:`head4d.nn._recompute.recompute`) instead of keeping its three hidden
    maps; the values are the same.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        op = op_name(self)
        self.dim = check_positive_int(op, "dim", dim)
        self.hidden = check_positive_int(op, "hidden", hidden)
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear: truncated normal (std 0.02), zero bias; ``dwconv``: He normal over
        the fan-out (9 per channel), zero bias."""
        init_linear(self.fc1)
        init_linear(self.fc2)
        init_conv(self.dwconv.dwconv)

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
            inputs = (x, self.fc1.weight, self.fc1.bias, self.dwconv.dwconv.weight, self.dwconv.dwconv.bias,
                      self.fc2.weight, self.fc2.bias)
            if recompute_wanted(None, *inputs):
                # keeps x alone for the backward, not the three hidden maps (2 x dim channels each)
                return recompute(functools.partial(_mix_ffn, h=h, w=w), *inputs)
            return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}"


def _mix_ffn(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
             dwconv_weight: torch.Tensor, dwconv_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
             fc2_bias: Optional[torch.Tensor], *, h: int, w: int) -> torch.Tensor:
    """:class:`MixFFN`'s computation from its tensors alone (what its modules compute, for
    :func:`~head4d.nn._recompute.recompute`, whose backward runs it outside the module):
    ``x [B, h*w, dim]`` -> ``[B, h*w, dim]``."""
    hidden = F.linear(x, fc1_weight, fc1_bias)
    hidden = F.conv2d(tokens_to_grid(hidden, h, w), dwconv_weight, dwconv_bias, padding=1,
                      groups=dwconv_weight.shape[0])
    return F.linear(F.gelu(grid_to_tokens(hidden)), fc2_weight, fc2_bias)


Scale = Union[float, torch.Tensor]


def check_scale(op: str, scale, x: torch.Tensor) -> Scale:
    """The motion scale of a block's scaled branch, checked against the tokens ``x``
    ``[B, L, C]``: a finite real number (returned as a Python float), or a real tensor of
    shape ``[B]`` (on ``x``'s device; returned as ``[B, 1, 1]``) or ``[]`` (returned as
    is; it broadcasts from any device). Errors start with ``op``."""
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


def is_skipped(scale: Scale) -> bool:
    """Whether a checked scale is the **number** 0, which skips its branch."""
    return isinstance(scale, float) and scale == 0.0


def scaled_residual(x: torch.Tensor, scale: Scale, branch: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``x + scale * branch()`` for a scale checked by :func:`check_scale`.

    The number 0 returns ``x`` without calling ``branch`` (its parameters get no
    gradient); the number 1 adds the branch unscaled; a tensor multiplies it (cast to
    ``x.dtype``), so a zero tensor gives ``x`` bit for bit while the branch stays in the
    graph with exactly zero gradients, with no host-device sync.

    Args:
        x: ``[B, L, C]`` residual stream.
        scale: the checked scale (float, ``[B, 1, 1]`` or ``[]`` tensor).
        branch: computes the branch, ``[B, L, C]``.

    Returns:
        ``[B, L, C]``, ``x.dtype`` promoted with the branch's.
    """
    if is_skipped(scale):
        return x
    y = branch()
    if isinstance(scale, torch.Tensor):
        y = y * scale.to(x.dtype)
    elif scale != 1.0:
        y = y * scale
    return x + y


def cross_attention_residual(op: str, x: torch.Tensor, context: Optional[torch.Tensor], scale,
                             norm: nn.LayerNorm, cross_attn: CrossAttention,
                             context_name: str = "motion") -> torch.Tensor:
    """The motion branch of a block with cross-attention: ``x + scale *
    cross_attn(norm(x), context)``, checked (``scale`` by :func:`check_scale`; ``context``
    ``[B, Lm, context_dim]`` by ``cross_attn``, even when skipped) and scaled by
    :func:`scaled_residual`. ``context`` may be ``None`` only when ``scale`` is the number
    0; ``context_name`` is its name in the errors.

    Returns:
        ``[B, L, dim]``.
    """
    scale = check_scale(op, scale, x)
    if context is None:
        if not is_skipped(scale):
            raise ValueError(f"{op}: this block has cross-attention (context_dim {cross_attn.context_dim}): "
                             f"{context_name} [B, Lm, {cross_attn.context_dim}] is required unless scale is "
                             f"the number 0")
    else:
        cross_attn.check_inputs(x, context)
    return scaled_residual(x, scale, lambda: cross_attn(norm(x), context))


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
        hidden = _mix_ffn_hidden(op, self.dim, mlp_ratio)
        self.mlp_ratio = float(mlp_ratio)
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
                x = cross_attention_residual(op, x, motion, scale, self.norm_cross, self.cross_attn)
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



def _mix_ffn_hidden(op: str, dim: int, mlp_ratio) -> int:
    """The Mix-FFN's hidden channels, ``int(dim * mlp_ratio)``, checked."""
    mlp_ratio = check_positive_float(op, "mlp_ratio", mlp_ratio)
    hidden = int(dim * mlp_ratio)
    if hidden < 1:
        raise ValueError(f"{op}: mlp_ratio {mlp_ratio} gives {hidden} hidden channels for dim {dim}")
    return hidden


class BlockCross(nn.Module):
    """The released code's block with cross-attention (Portrait4D's canonicalization and
    re-enactment blocks), with its module names and call signature.

    Applied in the released order::

        x = x + scale * attn2(norm2(x), y)      # cross-attention to the motion tokens y
        x = x + attn1(norm1(x), H, W)           # self-attention
        x = x + mlp(norm3(x), H, W)             # Mix-FFN

    ``attn1`` is :class:`Attention` (no spatial reduction), ``attn2`` a
    :class:`CrossAttention` whose keys and values come from ``y`` (``context_dim``
    channels), ``mlp`` a :class:`MixFFN` with ``int(dim * mlp_ratio)`` hidden channels,
    the norms ``LayerNorm(dim)``. The same computation as :class:`TransformerBlock` with
    ``context_dim`` (one shared implementation of the scaled motion branch,
    :func:`cross_attention_residual`).

    Weights as the released code leaves them: every Linear truncated normal (std 0.02)
    with zero bias, **the cross-attention's output projection included** (the paper
    zero-initializes it, but the released block re-initializes every Linear after
    building its cross-attention, so its final state is random; this class matches that
    state), the norms ones and zeros, the depthwise conv He normal over the fan-out.

    Constructor: the released one takes ``(dim, dim_y, H_y, W_y, num_heads, mlp_ratio,
    qkv_bias, qk_scale, drop, attn_drop, drop_path, act_layer, norm_layer, sr_ratio)``;
    ``dim_y`` is unused there and the cross-attention reads ``dim``-channel motion tokens
    (here ``context_dim``, default ``dim``); ``H_y``, ``W_y`` only serve a spatially reduced
    cross-attention (``sr_ratio > 1``), which the released model does not use and this
    class does not implement; dropout and stochastic depth (all 0 there) are left out.

    Args:
        dim: token channels; ``dim / num_heads`` one of 32, 64, 128, 256, 512.
        num_heads: heads of both attentions (Portrait4D: 4).
        mlp_ratio: Mix-FFN hidden channels over ``dim`` (the released default 4;
            Portrait4D's blocks: 2).
        qkv_bias: bias in the query/key/value projections (the released default False;
            Portrait4D's blocks: True).
        context_dim: channels of the motion tokens ``y`` (default ``dim``).
        backend: the attention backend of both attentions (see :class:`Attention`).

    Submodules: ``norm1``, ``attn1``, ``norm2``, ``attn2``, ``norm3``, ``mlp`` (registered
    in that order, the released state dict's order).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, *,
                 context_dim: Optional[int] = None, backend: Optional[str] = None):
        super().__init__()
        op = op_name(self)
        self.dim = check_positive_int(op, "dim", dim)
        self.num_heads = check_positive_int(op, "num_heads", num_heads)
        check_head_dims(op, self.dim, self.num_heads)
        self.context_dim = self.dim if context_dim is None else check_positive_int(op, "context_dim", context_dim)
        hidden = _mix_ffn_hidden(op, self.dim, mlp_ratio)
        self.mlp_ratio = float(mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, self.context_dim, num_heads, qkv_bias=qkv_bias, backend=backend)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released final state (see the class docstring): the cross-attention's
        output projection truncated normal like every other Linear, not zero."""
        for norm in (self.norm1, self.norm2, self.norm3):
            init_layer_norm(norm)
        for m in (self.attn1, self.attn2, self.mlp):
            m.reset_parameters()
        init_linear(self.attn2.proj)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor], H: int, W: int,  # noqa: N803 (upstream names)
                scale: Scale = 1.0) -> torch.Tensor:
        """Args:
            x: ``[B, H*W, dim]`` float16, bfloat16 or float32 tokens, row-major grid order.
            y: ``[B, Lm, context_dim]`` motion tokens, same device and dtype as the
                parameters (or any floating dtype under autocast); may be ``None`` only
                when ``scale`` is the number 0.
            H, W: the token grid.
            scale: the motion scale of the cross-attention branch: a number, or a tensor
                of shape ``[B]`` (on ``x``'s device) or ``[]``, any real dtype. The
                **number** 0 skips the cross-attention (its parameters get no gradient);
                a zero **tensor** computes it and multiplies by 0 (same result bit for
                bit, exactly zero gradients, no host-device sync). See
                :class:`TransformerBlock`.

        Returns:
            ``[B, H*W, dim]`` in ``x.dtype`` (promoted with the branches' under autocast).
        """
        op = op_name(self)
        H, W = check_grid(op, H, W)
        check_tokens(op, "x", x, self.dim, H, W, dtypes=ATTENTION_DTYPES)
        with nvtx(self):
            x = cross_attention_residual(op, x, y, scale, self.norm2, self.attn2, context_name="y")
            x = x + self.attn1(self.norm1(x), H, W)
            return x + self.mlp(self.norm3(x), H, W)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, context_dim={self.context_dim}, "
                f"mlp_ratio={self.mlp_ratio}")


class Block(nn.Module):
    """The released code's self-attention block (Portrait4D's triplane decoder block),
    with its module names and call signature::

        x = x + scale * attn(norm1(x), H, W)    # self-attention, spatial reduction sr_ratio
        x = x + mlp(norm2(x), H, W)             # Mix-FFN

    ``attn`` is :class:`Attention` (``sr_ratio``), ``mlp`` a :class:`MixFFN` with
    ``int(dim * mlp_ratio)`` hidden channels, the norms ``LayerNorm(dim)``. As in the
    released code, ``scale`` (default 1, which the decoder keeps) multiplies the
    **self-attention** branch; it is handled as the motion scale of :class:`BlockCross`
    (:func:`scaled_residual`). Weights: Linear truncated normal (std 0.02) with zero
    bias, norms ones and zeros, convs (``attn.sr``, the depthwise conv) He normal over
    the fan-out with zero bias, the released initialization.

    Args:
        dim: token channels; ``dim / num_heads`` one of 32, 64, 128, 256, 512.
        num_heads: heads (Portrait4D's decoder: 2, head dim 512).
        mlp_ratio: Mix-FFN hidden channels over ``dim`` (the released default 4;
            Portrait4D's decoder: 2).
        qkv_bias: bias in the query/key/value projections (the released default False;
            Portrait4D's decoder: True).
        sr_ratio: spatial reduction of the keys and values (Portrait4D's decoder: 2).
        backend: the attention backend (see :class:`Attention`).

    The released constructor's ``qk_scale``, dropout and stochastic-depth options (None
    and 0 in Portrait4D) are left out. Submodules: ``norm1``, ``attn``, ``norm2``, ``mlp``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 sr_ratio: int = 1, *, backend: Optional[str] = None):
        super().__init__()
        op = op_name(self)
        self.dim = check_positive_int(op, "dim", dim)
        self.num_heads = check_positive_int(op, "num_heads", num_heads)
        check_head_dims(op, self.dim, self.num_heads)
        hidden = _mix_ffn_hidden(op, self.dim, mlp_ratio)
        self.mlp_ratio = float(mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, sr_ratio=sr_ratio, qkv_bias=qkv_bias, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Norms ones and zeros; the attention and the Mix-FFN their own
        ``reset_parameters`` (the released initialization)."""
        init_layer_norm(self.norm1)
        init_layer_norm(self.norm2)
        self.attn.reset_parameters()
        self.mlp.reset_parameters()

    def forward(self, x: torch.Tensor, H: int, W: int, scale: Scale = 1.0) -> torch.Tensor:  # noqa: N803
        """Args:
            x: ``[B, H*W, dim]`` float16, bfloat16 or float32 tokens, row-major grid order.
            H, W: the token grid (each at least ``sr_ratio``).
            scale: multiplies the self-attention branch, as released: a number or a
                tensor of shape ``[B]`` or ``[]`` (the number 0 skips the attention).

        Returns:
            ``[B, H*W, dim]`` in ``x.dtype`` (promoted with the branches' under autocast).
        """
        op = op_name(self)
        H, W = check_grid(op, H, W)
        check_tokens(op, "x", x, self.dim, H, W, dtypes=ATTENTION_DTYPES)
        with nvtx(self):
            x = scaled_residual(x, check_scale(op, scale, x), lambda: self.attn(self.norm1(x), H, W))
            return x + self.mlp(self.norm2(x), H, W)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, mlp_ratio={self.mlp_ratio}"
