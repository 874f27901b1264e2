"""Input validation shared by the ops and the modules: clear errors that name the argument."""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(op: str, name: str, value, expected: str, rank: int,
                 dtypes: Sequence[torch.dtype] = FLOATING) -> torch.Tensor:
    """A tensor of the given rank and one of ``dtypes``; ``expected`` spells the shape."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of shape {expected}, got {type(value).__name__}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have a dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if value.dim() != rank:
        raise ValueError(f"{op}: {name} must have shape {expected} ({rank} dimensions), got {_shape(value)}")
    return value


def check_dim(op: str, name: str, value: torch.Tensor, dim: int, size: int, expected: str) -> None:
    if value.shape[dim] != size:
        raise ValueError(f"{op}: {name} must have shape {expected} with size {size} in dimension {dim}, "
                         f"got {_shape(value)}")


def check_same_device(op: str, tensors: Iterable[tuple]) -> torch.device:
    tensors = list(tensors)
    device = tensors[0][1].device
    for name, t in tensors[1:]:
        if t.device != device:
            first = tensors[0][0]
            raise ValueError(f"{op}: {name} is on {t.device} but {first} is on {device}; "
                             f"all tensors must be on one device")
    return device


def check_choice(op: str, name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_positive_finite(op: str, name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{op}: {name} must be a number, got a tensor of shape {_shape(value)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{op}: {name} must be finite and positive, got {value}")
    return value


def check_int(op: str, name: str, value, minimum: int = 1) -> int:
    """A Python integer (not a bool) of at least ``minimum``; a one-element integer tensor is accepted."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return value


def check_bool(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value
