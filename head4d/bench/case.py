"""What a benchmark case is, the settings cases are built for, and the registry of
each op's cases (:func:`register`, :func:`cases`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

REFERENCE = "torch"
#: An op's passes: ``fwd``, the forward under ``no_grad``; ``fwd+bwd``, the forward and the
#: gradients of the case's ``grad_of``.
PASSES = ("fwd", "fwd+bwd")
#: The pass of a whole training step (the training cases'): ``run`` computes its own
#: gradients and updates the weights (autograd on) and returns what the step reports.
STEP_PASS = "step"

#: Bound on the relative-norm error ``||out - ref|| / ||ref||`` per floating dtype
#: (of the op's data, e.g. the planes); gradients use the same bound.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
               torch.bfloat16: "bf16"}

Inputs = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One op on one shape.

    Attributes:
        op: the op's name (``"sample_triplanes"``).
        shape: a short label for the shape and dtype, unique within the op; part of
            the gate's keys, so keep it stable.
        make_inputs: ``(device, seed) -> dict of tensors``: fresh random inputs (never
            zeros), the same for the same seed. For ``fwd+bwd`` it must hold the
            cotangent under ``"grad_out"`` (shaped and typed like the output).
        run: ``(inputs, backend) -> output tensor``: the op on one backend.
        grad_of: names of the inputs differentiated in ``fwd+bwd``.
        nbytes: per pass, the bytes the op must move through memory.
        flops: per pass, the floating-point operations (approximate; for intensity).
        dtype: the data's dtype; picks the correctness bound in :data:`TOLERANCE`.
        backends: the fast backends to time on this case's device, fastest expected
            first (the reference is always timed too).
        passes: which of :data:`PASSES` (or :data:`STEP_PASS` alone) to time.
        tolerance: the correctness bound, when the dtype's default in :data:`TOLERANCE`
            does not fit (a whole pipeline sums its rounding over many ops).
        measure_memory: also measure, per backend, the bytes saved for the backward
            and (CUDA) the peak memory of one ``fwd+bwd`` call (:func:`measure_memory`).
    """

    op: str
    shape: str
    make_inputs: Callable[[torch.device, int], Inputs]
    run: Callable[[Inputs, str], torch.Tensor]
    grad_of: Tuple[str, ...]
    nbytes: Dict[str, int]
    flops: Dict[str, int]
    dtype: torch.dtype
    backends: Tuple[str, ...]
    passes: Tuple[str, ...] = PASSES
    measure_memory: bool = False
    tolerance: Optional[float] = None

    def tol(self) -> float:
        """The correctness bound: ``tolerance`` if set, else :data:`TOLERANCE` of the dtype."""
        return TOLERANCE[self.dtype] if self.tolerance is None else self.tolerance

    def key(self, pass_: str, backend: str) -> str:
        """``op/pass/shape/backend``, the key of a result and of a gate floor."""
        return f"{self.op}/{pass_}/{self.shape}/{backend}"


@dataclass
class Settings:
    """What to build cases for, in one of three modes.

    ``batches``: the batch sizes N to run (``None``: the mode's default for the device,
    :func:`default_batches`).
    ``quick``: fewer and smaller cases (their own shape labels, so their own gate floors).
    ``full``: every shape an op defines for the device (on CUDA: N = 1 and 4, the whole
    attention sweep); the gate's mode. Neither: the default mode, a few minutes on 2 CPU
    cores: on the CPU the quick shapes (:attr:`small`), on CUDA the full shapes at N = 1
    with part of the attention sweep. ``quick`` and ``full`` exclude each other.
    """

    device: torch.device
    batches: Optional[Tuple[int, ...]] = None
    quick: bool = False
    full: bool = False

    def __post_init__(self):
        if self.quick and self.full:
            raise ValueError("Settings: quick and full exclude each other; set at most one")
        if self.batches is not None and (not self.batches or any(int(n) < 1 for n in self.batches)):
            raise ValueError(f"Settings: batches must be positive batch sizes, got {self.batches}")

    @property
    def small(self) -> bool:
        """Whether ops build their small shapes: in the quick mode, and in the default mode
        on the CPU (where the references of the full shapes take minutes on 2 shared cores)."""
        return self.quick or (not self.full and self.device.type != "cuda")


def default_batches(settings: Settings) -> Tuple[int, ...]:
    """The batch sizes of an op's cases: ``settings.batches`` if given, else N = 1 and 4
    for the full mode on CUDA and N = 1 otherwise."""
    if settings.batches:
        return tuple(settings.batches)
    return (1, 4) if settings.full and settings.device.type == "cuda" else (1,)


_REGISTRY: Dict[str, Callable[[Settings], List[Case]]] = {}

#: Ops whose cases time a whole model (many ops under one forced backend, through
#: ``HEAD4D_BACKEND``), not one op: they set no op's backend order (:mod:`.order`).
WHOLE_MODELS: set = set()


def register(op: str, *, whole_model: bool = False):
    """Decorator: register ``fn(settings) -> list[Case]`` as the cases of ``op``.

    ``whole_model``: the cases time a composition of ops (the renderer, the whole
    deformation), so they do not decide any op's default backend."""
    def wrap(fn):
        _REGISTRY[op] = fn
        if whole_model:
            WHOLE_MODELS.add(op)
        return fn
    return wrap


def ops() -> Tuple[str, ...]:
    """The names of the ops that have cases."""
    return tuple(_REGISTRY)


def cases(settings: Settings, names: Optional[Iterable[str]] = None) -> List[Case]:
    """The cases of the ops ``names`` (default: all) for ``settings``."""
    names = list(names) if names else list(_REGISTRY)
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; benchmarked ops: {list(_REGISTRY)}")
    return [case for n in names for case in _REGISTRY[n](settings)]


def fast_backends(preferences: Dict[str, Sequence[str]], device: torch.device) -> Tuple[str, ...]:
    """An op's non-reference backends for ``device`` from its preference table."""
    return tuple(b for b in preferences.get(device.type, ()) if b != REFERENCE)


class process_backend:
    """Within the block, ``HEAD4D_BACKEND`` names ``backend`` (every op that has it runs
    it, the others their reference); the previous value is restored after. For the
    whole-model cases."""

    def __init__(self, backend: str):
        self.backend = backend

    def __enter__(self):
        self.previous = os.environ.get("HEAD4D_BACKEND")
        os.environ["HEAD4D_BACKEND"] = self.backend

    def __exit__(self, *exc):
        if self.previous is None:
            os.environ.pop("HEAD4D_BACKEND", None)
        else:
            os.environ["HEAD4D_BACKEND"] = self.previous
