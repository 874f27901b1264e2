"""Reference softmax attention: the explicit formula, the ``torch`` backend of
:func:`head4d.ops.attention`.

``softmax(q @ k^T * scale) @ v`` over the last two dimensions, computed in float32
(float64 for float64 inputs) and cast back to the inputs' dtype. It materializes the
``[B, H, Lq, Lk]`` score matrix: it is the semantics, not a fast path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def default_scale(head_dim: int) -> float:
    """The conventional ``1 / sqrt(D)``."""
    return 1.0 / math.sqrt(head_dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scale: Optional[float] = None) -> torch.Tensor:
    """Exact softmax attention.

    Args:
        q: ``[B, H, Lq, D]`` floating point.
        k: ``[B, H, Lk, D]``, same dtype and device.
        v: ``[B, H, Lk, D]``, same dtype and device.
        scale: multiplies the logits ``q k^T``; ``None`` means ``1 / sqrt(D)``.

    Returns:
        ``[B, H, Lq, D]`` in ``q.dtype``: ``softmax(q k^T * scale, dim=-1) v`` evaluated
        in float32 (float64 for float64 inputs). Differentiable by autograd.
    """
    if scale is None:
        scale = default_scale(q.shape[-1])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    logits = torch.matmul(qc, kc.transpose(-1, -2)) * float(scale)  # [B, H, Lq, Lk]
    probs = torch.softmax(logits, dim=-1)
    return torch.matmul(probs, vc).to(q.dtype)
