"""Self-attention (with optional spatial reduction) and cross-attention to motion tokens,
both through :func:`head4d.ops.attention`.

Portrait4D (``docs/design.md``, "The reconstructor's transformer"): the canonicalization and
re-enactment blocks use 4 heads of 256 over 1,024-dim tokens (self-attention over the
32 x 32 grid, cross-attention to 64 motion tokens); the triplane decoder's block 2 heads
of 512 with spatial reduction 2 (16,384 queries over 4,096 keys).

Projection layouts (shared with the released code, so its weights map one to one; see
:mod:`head4d.nn.upstream`): ``q`` is ``Linear(dim, dim)`` with output channel
``head * head_dim + d``; ``kv`` is ``Linear(kv_in, 2 * dim)`` whose first ``dim``
outputs are the keys and the last ``dim`` the values, each split over heads like ``q``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops as _ops
from .._checks import check_same_device, check_tensor
from ._common import (ATTENTION_DTYPES, check_backend_choice, check_grid, check_head_dims, check_positive_int,
                      check_tokens, grid_to_tokens, init_conv, init_layer_norm, init_linear, nvtx, op_name,
                      tokens_to_grid)

__all__ = ["Attention", "CrossAttention", "set_attention_backend"]


def _check_backend(op: str, backend) -> Optional[str]:
    from ..ops.attention import IMPLEMENTED
    return check_backend_choice(op, backend, IMPLEMENTED)


class _AttentionBackend:
    """The ``backend`` attribute, checked when set."""

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        self._backend = _check_backend(op_name(self), value)


def _split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, L, H * D]`` -> ``[B, H, L, D]`` (a view)."""
    b, n, c = t.shape
    return t.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _split_kv(kv: torch.Tensor, num_heads: int):
    """``[B, L, 2 * H * D]`` -> two ``[B, H, L, D]`` views (keys, values)."""
    b, n, c2 = kv.shape
    kv = kv.view(b, n, 2, num_heads, c2 // (2 * num_heads)).permute(2, 0, 3, 1, 4)
    return kv[0], kv[1]


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B, L, H * D]``."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class Attention(_AttentionBackend, nn.Module):
    """Multi-head self-attention over a token grid, with optional spatial reduction
    (SegFormer's efficient self-attention, as in Portrait4D's triplane decoder).

    ``q = Linear(dim, dim)(x)``. Keys and values: with ``sr_ratio == 1``,
    ``kv = Linear(dim, 2 * dim)(x)``; with ``sr_ratio = r > 1`` the token grid is first
    reduced by ``sr = Conv2d(dim, dim, r, stride=r)`` (with bias) and ``norm =
    LayerNorm(dim)``, then ``kv`` is applied to the ``(h // r) * (w // r)`` reduced tokens.
    Attention is ``head4d.ops.attention`` with scale ``1 / sqrt(head_dim)``; the output
    projection is ``proj = Linear(dim, dim)`` (always with bias). No dropout.

    Args:
        dim: token channels; ``dim / num_heads`` must be one of the op's head dims
            (32, 64, 128, 256, 512).
        num_heads: number of heads.
        sr_ratio: spatial reduction factor (kernel and stride of ``sr``), 1 for none.
        qkv_bias: bias in ``q`` and ``kv``.
        backend: the attention backend (``"triton"``, ``"sdpa"``, ``"torch"``, or
            ``None`` for the op's default); stored as ``self.backend``, changeable later
            (:func:`set_attention_backend`).

    Parameters: ``q.weight [dim, dim]``, ``q.bias [dim]``, ``kv.weight [2*dim, dim]``,
    ``kv.bias [2*dim]``, ``proj.weight [dim, dim]``, ``proj.bias [dim]``; with
    ``sr_ratio > 1`` also ``sr.weight [dim, dim, r, r]``, ``sr.bias [dim]``,
    ``norm.weight [dim]``, ``norm.bias [dim]``.
    """

    def __init__(self, dim: int, num_heads: int, *, sr_ratio: int = 1, qkv_bias: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        op = op_name(self)
        self.dim = check_positive_int(op, "dim", dim)
        self.num_heads = check_positive_int(op, "num_heads", num_heads)
        self.head_dim = check_head_dims(op, self.dim, self.num_heads)
        self.sr_ratio = check_positive_int(op, "sr_ratio", sr_ratio)
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if self.sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=self.sr_ratio, stride=self.sr_ratio)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = None
            self.norm = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear: truncated normal (std 0.02), zero bias; ``sr``: He normal over the
        fan-out, zero bias; ``norm``: ones and zeros."""
        for layer in (self.q, self.kv, self.proj):
            init_linear(layer)
        if self.sr is not None:
            init_conv(self.sr)
            init_layer_norm(self.norm)

    def reduced_grid(self, h: int, w: int):
        """The key/value grid for a token grid ``(h, w)``: ``(h // r, w // r)``."""
        return h // self.sr_ratio, w // self.sr_ratio

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Self-attention over the tokens of an ``h x w`` grid.

        Args:
            x: ``[B, h*w, dim]`` float16, bfloat16 or float32 tokens, row-major grid order.
            h, w: the token grid (``h, w >= sr_ratio``).

        Returns:
            ``[B, h*w, dim]`` in the dtype of the projections' output (``x.dtype``, or
            the autocast dtype under autocast).
        """
        op = op_name(self)
        h, w = check_grid(op, h, w)
        check_tokens(op, "x", x, self.dim, h, w, dtypes=ATTENTION_DTYPES)
        if self.sr is not None and (h < self.sr_ratio or w < self.sr_ratio):
            raise ValueError(f"{op}: the token grid (h, w) = ({h}, {w}) is smaller than sr_ratio "
                             f"{self.sr_ratio} in a dimension; spatial reduction would leave no keys")
        with nvtx(self):
            q = _split_heads(self.q(x), self.num_heads)
            if self.sr is not None:
                reduced = grid_to_tokens(self.sr(tokens_to_grid(x, h, w)))
                k, v = _split_kv(self.kv(self.norm(reduced)), self.num_heads)
            else:
                k, v = _split_kv(self.kv(x), self.num_heads)
            out = _ops.attention(q, k, v, backend=self.backend)
            return self.proj(_merge_heads(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, sr_ratio={self.sr_ratio}, "
                f"backend={self.backend!r}")


class CrossAttention(_AttentionBackend, nn.Module):
    """Multi-head cross-attention from tokens (queries) to context tokens (keys and
    values): Portrait4D's attention from the image tokens to the motion tokens.

    ``q = Linear(dim, dim)(x)``, ``kv = Linear(context_dim, 2 * dim)(context)``,
    ``head4d.ops.attention`` with scale ``1 / sqrt(head_dim)``, then ``proj =
    Linear(dim, dim)``, **initialized to zero (weight and bias)** as the paper says, so
    the block's cross branch adds exactly nothing until ``proj`` has trained. (The
    released code re-initializes it afterwards by accident; see the design note.) The
    context is used as given (no normalization, no spatial reduction). No dropout.

    Args:
        dim: token channels; ``dim / num_heads`` one of 32, 64, 128, 256, 512.
        context_dim: channels of the context (motion) tokens.
        num_heads: number of heads.
        qkv_bias: bias in ``q`` and ``kv``.
        backend: the attention backend, as for :class:`Attention`.

    Parameters: ``q.weight [dim, dim]``, ``q.bias [dim]``, ``kv.weight [2*dim,
    context_dim]``, ``kv.bias [2*dim]``, ``proj.weight [dim, dim]``, ``proj.bias [dim]``.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, *, qkv_bias: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        op = op_name(self)
        self.dim = check_positive_int(op, "dim", dim)
        self.context_dim = check_positive_int(op, "context_dim", context_dim)
        self.num_heads = check_positive_int(op, "num_heads", num_heads)
        self.head_dim = check_head_dims(op, self.dim, self.num_heads)
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``q``, ``kv``: truncated normal (std 0.02), zero bias; ``proj``: all zeros."""
        init_linear(self.q)
        init_linear(self.kv)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def check_inputs(self, x: torch.Tensor, context: torch.Tensor) -> None:
        """The checks of :meth:`forward` (also run by :class:`TransformerBlock` when it
        skips the computation)."""
        op = op_name(self)
        check_tokens(op, "x", x, self.dim, dtypes=ATTENTION_DTYPES)
        check_tensor(op, "context", context, f"[B, Lm, {self.context_dim}]", 3, dtypes=ATTENTION_DTYPES)
        if context.shape[2] != self.context_dim:
            raise ValueError(f"{op}: context must have context_dim = {self.context_dim} channels in its last "
                             f"dimension, got shape {list(context.shape)}")
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"{op}: context has batch {context.shape[0]} (shape {list(context.shape)}) but x has "
                             f"{x.shape[0]} (shape {list(x.shape)}); they must match")
        if context.shape[1] == 0:
            raise ValueError(f"{op}: context must hold at least one token, got shape {list(context.shape)}")
        check_same_device(op, [("x", x), ("context", context)])

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Cross-attention from ``x`` to ``context``.

        Args:
            x: ``[B, L, dim]`` float16, bfloat16 or float32 query tokens (any ``L``).
            context: ``[B, Lm, context_dim]``, same device, float16, bfloat16 or
                float32 (the dtype of the parameters, as ``x``, outside autocast), ``Lm >= 1``.

        Returns:
            ``[B, L, dim]`` in the projections' output dtype (``x.dtype``, or the
            autocast dtype). Exactly zero while ``proj`` is zero.
        """
        self.check_inputs(x, context)
        with nvtx(self):
            q = _split_heads(self.q(x), self.num_heads)
            k, v = _split_kv(self.kv(context), self.num_heads)
            out = _ops.attention(q, k, v, backend=self.backend)
            return self.proj(_merge_heads(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, context_dim={self.context_dim}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, backend={self.backend!r}")


def set_attention_backend(module: nn.Module, backend: Optional[str]) -> int:
    """Sets ``backend`` on every :class:`Attention` and :class:`CrossAttention` inside
    ``module`` (itself included); returns how many were set. ``None`` restores the
    op's default choice (see :mod:`head4d._backend`)."""
    count = 0
    for m in module.modules():
        if isinstance(m, (Attention, CrossAttention)):
            m.backend = backend
            count += 1
    return count
