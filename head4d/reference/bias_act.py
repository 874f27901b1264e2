"""Reference of StyleGAN2's fused bias + activation + gain + clamp (``bias_act``) as
plain PyTorch: the exact semantics the compiled backends are tested against.

``y = clamp(act(x + b) * gain, -clamp, clamp)``, the bias broadcast along ``dim``.
The gradient is zero where the output is clamped, the boundary ``|v| = clamp``
included (StyleGAN2's rule, which ``torch.clamp``'s own gradient does not follow at
the boundary); second derivatives come from autograd through the same expression.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F


class Activation(NamedTuple):
    """One activation of StyleGAN2's table: its kernel ``code`` (csrc/bias_act/bias_act_math.h),
    ``func(z, alpha)`` and the ``alpha`` and ``gain`` used when the caller passes None."""
    code: int
    func: Callable[[torch.Tensor, float], torch.Tensor]
    default_alpha: float
    default_gain: float


#: StyleGAN2's activations with their default alpha (only lrelu reads it: its negative
#: slope) and default gain (sqrt 2 for the rectifiers and swish, 1 for the others).
#: elu, selu and softplus are torch's with their own fixed constants (elu alpha 1,
#: softplus beta 1 and threshold 20).
ACTIVATIONS = {
    "linear": Activation(0, lambda z, alpha: z, 0.0, 1.0),
    "relu": Activation(1, lambda z, alpha: torch.relu(z), 0.0, math.sqrt(2)),
    "lrelu": Activation(2, lambda z, alpha: F.leaky_relu(z, alpha), 0.2, math.sqrt(2)),
    "tanh": Activation(3, lambda z, alpha: torch.tanh(z), 0.0, 1.0),
    "sigmoid": Activation(4, lambda z, alpha: torch.sigmoid(z), 0.0, 1.0),
    "elu": Activation(5, lambda z, alpha: F.elu(z), 0.0, 1.0),
    "selu": Activation(6, lambda z, alpha: F.selu(z), 0.0, 1.0),
    "softplus": Activation(7, lambda z, alpha: F.softplus(z), 0.0, 1.0),
    "swish": Activation(8, lambda z, alpha: torch.sigmoid(z) * z, 0.0, math.sqrt(2)),
}


def resolve_parameters(act: str, alpha: Optional[float], gain: Optional[float],
                       clamp: Optional[float]) -> tuple:
    """``(alpha, gain, clamp)`` as floats, the activation's defaults for None and
    ``-1.0`` for no clamp (the convention of the kernels)."""
    spec = ACTIVATIONS[act]
    return (spec.default_alpha if alpha is None else float(alpha),
            spec.default_gain if gain is None else float(gain),
            -1.0 if clamp is None else float(clamp))


def bias_act(x: torch.Tensor, b: Optional[torch.Tensor] = None, dim: int = 1, act: str = "linear",
             alpha: Optional[float] = None, gain: Optional[float] = None,
             clamp: Optional[float] = None) -> torch.Tensor:
    """Fused bias, activation, gain and clamp.

    Args:
        x: any shape, floating point; float16 / bfloat16 are computed in float32.
        b: ``[x.shape[dim]]`` of x's dtype, or None.
        dim: the dimension of x the bias runs along (negative counts from the end).
        act: a key of :data:`ACTIVATIONS`.
        alpha, gain: None for the activation's defaults.
        clamp: None (no clamp) or a number >= 0.

    Returns:
        x's shape and dtype; differentiable twice in x and b.
    """
    alpha, gain, clamp = resolve_parameters(act, alpha, gain, clamp)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(compute)
    if b is not None:
        dim = dim % x.dim()
        z = z + b.to(compute).reshape([-1 if i == dim else 1 for i in range(x.dim())])
    v = ACTIVATIONS[act].func(z, alpha)
    if gain != 1:
        v = v * gain
    if clamp >= 0:
        # The clamped value is a constant: no gradient where |v| >= clamp.
        v = torch.where(v.abs() < clamp, v, v.detach().clamp(-clamp, clamp))
    return v.to(x.dtype)
