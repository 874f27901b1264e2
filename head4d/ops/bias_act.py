"""StyleGAN2's fused bias + activation + gain + clamp: ``bias_act``.

Where things live:
    reference   head4d/reference/bias_act.py   (the ``torch`` backend, the activation table)
    C++ / CUDA  csrc/bias_act/                 (``cpu`` and ``cuda`` backends)
    Triton      kernels/bias_act.py            (``triton`` backend, ``head4d.kernels.bias_act``)
    custom ops  head4d/ops/_library.py         (``bias_act``, ``bias_act_derivative``, their ``_triton`` twins)
    tests       tests/test_bias_act.py
    benchmark   head4d/bench/op_cases/bias_act.py
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .. import _backend
from .._checks import FLOATING, check_choice, check_same_device
from .._nvtx import nvtx_range
from ..reference.bias_act import ACTIVATIONS as _ACTIVATIONS
from ..reference.bias_act import bias_act as _reference_bias_act
from ..reference.bias_act import resolve_parameters
from . import _library
from ._common import resolve_implemented

#: Backend preference per device type, fastest first. CUDA: the expected order (the
#: CUDA kernels before the Triton ones) until a committed GPU run says otherwise.
PREFERENCES = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}
IMPLEMENTED = ("cpu", "cuda", "triton", "torch")
_backend.declare("bias_act", IMPLEMENTED, PREFERENCES)  # every input on every backend

#: The activation names, as StyleGAN2 spells them.
ACTIVATIONS = tuple(_ACTIVATIONS)


def _check_number(name: str, value, *, minimum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"bias_act: {name} must be a real number or None, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = "finite" if minimum is None else f"finite and >= {minimum:g}"
        raise ValueError(f"bias_act: {name} must be {bound}, got {value}")
    return value


def bias_act(x: torch.Tensor, b: Optional[torch.Tensor] = None, dim: int = 1, act: str = "linear",
             alpha: Optional[float] = None, gain: Optional[float] = None, clamp: Optional[float] = None, *,
             backend: Optional[str] = None) -> torch.Tensor:
    """``clamp(act(x + b) * gain, -clamp, clamp)``, StyleGAN2's ``bias_act`` (same
    signature and defaults; a drop-in for ``torch_utils.ops.bias_act.bias_act``).

    Activations and their defaults (alpha is read by lrelu only):

    ========  ==========================  =============  ============
    act       f(z)                        default alpha  default gain
    ========  ==========================  =============  ============
    linear    z                           0              1
    relu      max(z, 0)                   0              sqrt(2)
    lrelu     z if z > 0 else alpha * z   0.2            sqrt(2)
    tanh      tanh(z)                     0              1
    sigmoid   1 / (1 + exp(-z))           0              1
    elu       z if z > 0 else exp(z) - 1  0              1
    selu      torch's selu                0              1
    softplus  log(1 + exp(z)) (z if > 20) 0              1
    swish     z * sigmoid(z)              0              sqrt(2)
    ========  ==========================  =============  ============

    The gradient is zero where the output is clamped, ``|act(z) * gain| >= clamp``
    (the boundary included, as StyleGAN2). Differentiable twice in x and b on every
    backend (``torch.autograd.grad(..., create_graph=True)``, as R1 regularization
    needs); the compiled backends compute the first and second derivatives from z, so
    they are exact for every activation, clamped or not.

    Args:
        x: any shape with at least one dimension; float16 / bfloat16 (computed in
            float32), float32 or float64.
        b: ``[x.shape[dim]]``, x's dtype and device, or None.
        dim: the dimension of x the bias runs along (negative counts from the end);
            not read without a bias.
        act: one of :data:`ACTIVATIONS`.
        alpha, gain: real numbers, or None for the activation's defaults.
        clamp: None (no clamp) or a real number >= 0.
        backend: ``"cpu"`` (CPU tensors), ``"cuda"`` (CUDA tensors), ``"triton"`` (CUDA
            tensors; CPU ones under ``TRITON_INTERPRET=1``), ``"torch"`` (the reference)
            or ``None``/``"auto"``.

    Returns:
        x's shape and dtype (contiguous).
    """
    op = "bias_act"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATING:
        raise TypeError(f"{op}: x must be float16, bfloat16, float32 or float64, got "
                        f"{str(x.dtype).replace('torch.', '')}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension, got a 0-dimensional tensor")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{op}: dim must be an int, got {type(dim).__name__}")
    if b is not None and not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: dim must be in [{-x.dim()}, {x.dim()}) for x of shape {list(x.shape)}, got {dim}")
    dim = int(dim) % x.dim() if b is not None else 0  # without a bias, dim is not read (as StyleGAN2)
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        check_choice(op, "act", act, ACTIVATIONS)
    if b is not None:
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{op}: b must be a torch.Tensor of shape [{x.shape[dim]}] or None, "
                            f"got {type(b).__name__}")
        if b.dim() != 1 or b.shape[0] != x.shape[dim]:
            raise ValueError(f"{op}: b must have shape [{x.shape[dim]}] (x.shape[{dim}] of x of shape "
                             f"{list(x.shape)}), got {list(b.shape)}")
        if b.dtype != x.dtype:
            raise TypeError(f"{op}: b must have x's dtype {str(x.dtype).replace('torch.', '')}, "
                            f"got {str(b.dtype).replace('torch.', '')}")
        check_same_device(op, [("x", x), ("b", b)])
    alpha = None if alpha is None else _check_number("alpha", alpha)
    gain = None if gain is None else _check_number("gain", gain)
    clamp = None if clamp is None else _check_number("clamp", clamp, minimum=0.0)
    chosen = resolve_implemented(op, x.device, backend, PREFERENCES, IMPLEMENTED)
    with nvtx_range("head4d.bias_act"):
        if chosen == "torch":
            return _reference_bias_act(x, b, dim, act, alpha, gain, clamp)
        alpha_f, gain_f, clamp_f = resolve_parameters(act, alpha, gain, clamp)
        # head4d::bias_act (head4d._C) or head4d::bias_act_triton, custom operators (_library)
        op_fn = _library.bias_act_triton if chosen == "triton" else _library.bias_act
        return op_fn(x, b, dim, _ACTIVATIONS[act].code, alpha_f, gain_f, clamp_f)
