"""``attention``: exact softmax attention, fused (FlashAttention-2 style) on the GPU.

The reconstructor's transformer blocks (Portrait4D; ``docs/design.md``, "The
reconstructor's transformer") attend with 4 heads of 256 (self-attention over 1,024 tokens, cross-attention
to 64 motion tokens) and the triplane decoder with 2 heads of 512 (16,384 queries over
4,096 spatially reduced keys), hence the large head dims.

Where things live:
    reference   head4d/reference/attention.py   (the ``torch`` backend)
    Triton      kernels/attention.py             (``triton`` backend, ``head4d.kernels.attention``)
    tests       tests/test_attention.py

Backends:
    ``triton``  forward and backward Triton kernels (online softmax over key blocks,
                backward recomputed from the saved log-sum-exp); CUDA tensors, or CPU
                tensors under ``TRITON_INTERPRET=1`` (a test tool, not a CPU backend).
    ``sdpa``    ``torch.nn.functional.scaled_dot_product_attention``, the peer.
    ``torch``   the explicit ``softmax(q k^T * scale) v`` in float32 (materializes
                ``[B, H, Lq, Lk]``).
Default: ``triton`` on CUDA, ``torch`` on CPU. ``HEAD4D_BACKEND_ATTENTION`` or
``HEAD4D_BACKEND`` override it (see :mod:`head4d._backend`); a process-wide
``HEAD4D_BACKEND`` naming a backend attention lacks (``cpu``, ``cuda``) leaves the default.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .. import _backend
from .._checks import check_same_device, check_tensor
from .._nvtx import nvtx_range
from ..reference import attention as _reference
from . import _library
from ._common import check_same_dtype

OP = "attention"

#: Head dims the op accepts (on every backend, so a model runs unchanged on each).
HEAD_DIMS = (32, 64, 128, 256, 512)
#: Input dtypes.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Backend preference per device type, first available wins. CUDA: the expected order
#: until a committed GPU run says otherwise.
PREFERENCES = {
    "cpu": ("torch",),
    "cuda": ("triton", "sdpa", "torch"),
}
#: The backends this op has; each runs every input the op accepts (all of HEAD_DIMS and
#: DTYPES), so none has a support predicate.
IMPLEMENTED = ("triton", "sdpa", "torch")
_backend.declare(OP, IMPLEMENTED, PREFERENCES)


def check_attention_inputs(q, k, v, scale) -> float:
    """Validates the arguments of :func:`attention`; returns the scale as a float."""
    for name, t, shape in (("q", q, "[B, H, Lq, D]"), ("k", k, "[B, H, Lk, D]"), ("v", v, "[B, H, Lk, D]")):
        check_tensor(OP, name, t, shape, 4, dtypes=DTYPES)
    check_same_dtype(OP, [("q", q), ("k", k), ("v", v)])
    check_same_device(OP, [("q", q), ("k", k), ("v", v)])
    for name, t in (("k", k), ("v", v)):
        if t.shape[:2] != q.shape[:2]:
            raise ValueError(f"{OP}: {name} has batch and heads {list(t.shape[:2])} (shape {list(t.shape)}) "
                             f"but q has {list(q.shape[:2])} (shape {list(q.shape)}); they must match")
        if t.shape[3] != q.shape[3]:
            raise ValueError(f"{OP}: {name} has head dim {t.shape[3]} (shape {list(t.shape)}) but q has "
                             f"{q.shape[3]} (shape {list(q.shape)}); they must match")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"{OP}: v has {v.shape[2]} keys (shape {list(v.shape)}) but k has {k.shape[2]} "
                         f"(shape {list(k.shape)}); they must match")
    d = q.shape[3]
    if d not in HEAD_DIMS:
        raise ValueError(f"{OP}: head dim {d} (q shape {list(q.shape)}) is not supported; "
                         f"supported head dims: {HEAD_DIMS}")
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise ValueError(f"{OP}: k and v must hold at least one key when there are queries, "
                         f"got k shape {list(k.shape)}")
    if scale is None:
        return _reference.default_scale(d)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise TypeError(f"{OP}: scale must be a number or None, got a tensor of shape {list(scale.shape)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{OP}: scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{OP}: scale must be finite, got {scale}")
    return scale


def _resolve(device: torch.device, backend: Optional[str], inputs=None) -> str:
    return _backend.resolve(OP, device, backend, PREFERENCES, inputs=inputs)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
              backend: Optional[str] = None) -> torch.Tensor:
    """Exact softmax attention, ``softmax(q k^T * scale) v``, without materializing
    the ``Lq x Lk`` matrix (``triton``, ``sdpa``).

    Args:
        q: ``[B, H, Lq, D]`` float16, bfloat16 or float32, any strides.
        k: ``[B, H, Lk, D]``, same dtype and device as ``q``.
        v: ``[B, H, Lk, D]``, same dtype and device.
            ``D`` is one of 32, 64, 128, 256, 512; any ``Lq`` and ``Lk >= 1``
            (``Lk`` may be far smaller or larger than ``Lq``). No mask, no dropout.
        scale: multiplies ``q k^T``; ``None`` means ``1 / sqrt(D)``. Any finite number.
        backend: ``"triton"``, ``"sdpa"``, ``"torch"`` or ``None``/``"auto"`` (``triton``
            on CUDA, ``torch`` on CPU; see :mod:`head4d._backend` for the overrides).

    Returns:
        ``[B, H, Lq, D]`` in ``q.dtype``, differentiable with respect to ``q``, ``k``
        and ``v``. Triton accumulates in float32 (float16/bfloat16 probabilities are
        rounded to the input dtype before multiplying ``v``, as in FlashAttention);
        float32 inputs run their matrix products in TF32 on the GPU
        (``head4d.kernels.attention.FP32_PRECISION = "ieee"`` for full float32).

    Raises:
        TypeError: a non-tensor, a dtype outside (float16, bfloat16, float32), mixed
            dtypes, or a non-numeric scale.
        ValueError: wrong ranks, mismatched batch, heads, head dims or key counts, an
            unsupported head dim, tensors on different devices, no keys, a non-finite scale.
    """
    scale = check_attention_inputs(q, k, v, scale)
    chosen = _resolve(q.device, backend, (q, k, v))
    with nvtx_range("head4d.attention"):
        if chosen == "triton":
            # head4d::attention_triton (:mod:`head4d.ops._library`) also returns the
            # log-sum-exp its backward recomputes the probabilities from
            return _library.attention_triton(q, k, v, scale)[0]
        if chosen == "sdpa":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        return _reference.attention(q, k, v, scale)
