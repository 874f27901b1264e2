"""Backend selection and the compiled extension.

Every op in :mod:`head4d.ops` runs on one of four backends:

``torch``
    The reference: plain PyTorch, exact semantics, any device.
``cpu``
    C++ kernels in the compiled extension ``head4d._C`` (CPU tensors).
``cuda``
    CUDA kernels in the compiled extension (CUDA tensors; needs a build with CUDA).
``triton``
    Triton kernels in :mod:`head4d.kernels` (CUDA tensors, or CPU tensors when
    ``TRITON_INTERPRET=1`` is set, which is how the tests exercise them).

An op may have a peer too (:data:`PEER_BACKENDS`): ``attention`` has ``sdpa``,
PyTorch's ``scaled_dot_product_attention``, the implementation it is measured against.

How one is chosen, first match wins:

1. the op's ``backend=`` argument;
2. the environment variable ``HEAD4D_BACKEND_<OP>`` (``HEAD4D_BACKEND_SAMPLE_TRIPLANES=triton``);
3. the environment variable ``HEAD4D_BACKEND`` (all ops);
4. the op's preference list for the tensor's device type: the fastest measured
   backend that is available (see ``PREFERENCES`` in each op's module and the
   committed benchmark results under ``benchmarks/results/``).

A forced backend that cannot run (extension not built, Triton missing, Triton
on a CPU tensor without the interpreter) raises ``RuntimeError`` saying why;
``auto`` in the argument or the variable means "use the preference list".

Importing this module never compiles anything. If ``head4d._C`` is missing, the
first op that would have used it warns once and falls back to the reference.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Dict, Optional, Sequence, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("cuda", "triton", "cpu", "torch")

#: Backends that only some ops have, each op naming its own in ``resolve(extra=...)``:
#: ``sdpa`` is PyTorch's ``scaled_dot_product_attention`` (``attention``'s peer).
#: ``HEAD4D_BACKEND`` set to one of them applies to the ops that have it; the others
#: ignore it (their default applies).
PEER_BACKENDS: Tuple[str, ...] = ("sdpa",)

BUILD_HINT = (
    "Build it from a source checkout with `pip install --no-build-isolation -e .` "
    "(CUDA kernels are compiled too when torch has CUDA and nvcc is found; see README.md)."
)

_warned: set = set()


def _constant_when_compiled(fn):
    """Marks ``fn``, a function without arguments whose result is fixed for the process,
    so that ``torch.compile`` calls it while tracing and takes the result as a constant
    instead of tracing into it (it imports modules and calls the extension, which
    Dynamo cannot trace). It is what ``torch.compiler.assume_constant_result`` does,
    done here without importing ``torch._dynamo`` (seconds) on ``import head4d``."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_when_compiled  # under torch.compile: warns while the graph is traced
def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=None)
def _load_extension():
    try:
        return importlib.import_module("head4d._C"), None
    except ImportError as exc:  # not built, or built against another torch
        return None, exc


def extension():
    """The compiled extension module ``head4d._C``, or ``None`` if it is not importable."""
    return _load_extension()[0]


def extension_error() -> Optional[BaseException]:
    """Why ``head4d._C`` could not be imported (``None`` if it was)."""
    return _load_extension()[1]


@_constant_when_compiled
def extension_available() -> bool:
    """Whether ``head4d._C`` imports."""
    return extension() is not None


@_constant_when_compiled
def extension_error_text() -> str:
    """:func:`extension_error` as text (empty if the extension imports)."""
    error = extension_error()
    return "" if error is None else str(error)


@_constant_when_compiled
def extension_has_cuda() -> bool:
    ext = extension()
    return bool(ext is not None and ext.with_cuda())


@functools.lru_cache(maxsize=None)
def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


@_constant_when_compiled
def triton_available() -> bool:
    """Whether Triton imports."""
    return _import_triton()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """``None`` if ``backend`` can run on tensors of ``device``, else why not."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got tensors on {device}"
        if not extension_available():
            return f"the extension head4d._C is not built ({extension_error_text()}). {BUILD_HINT}"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
        if not extension_available():
            return f"the extension head4d._C is not built ({extension_error_text()}). {BUILD_HINT}"
        if not extension_has_cuda():
            return f"head4d._C was built without CUDA kernels. {BUILD_HINT}"
        return None
    if backend == "triton":
        if not triton_available():
            return "Triton is not installed (pip install triton)"
        if device.type == "cpu" and not triton_interpreting():
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device}"
        return None
    if backend == "sdpa":
        if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            return "this torch has no torch.nn.functional.scaled_dot_product_attention (torch >= 2.1 needed)"
        return None
    return f"unknown backend {backend!r}; expected one of {BACKENDS + PEER_BACKENDS}"


def resolve(op: str, device: torch.device, requested: Optional[str],
            preferences: Dict[str, Sequence[str]], extra: Sequence[str] = ()) -> str:
    """Pick the backend for one call of ``op`` on tensors living on ``device``;
    ``extra`` names the op's backends beyond :data:`BACKENDS` (from :data:`PEER_BACKENDS`)."""
    known = BACKENDS + tuple(extra)
    choice = requested
    source = "backend="
    if choice is None or choice == "auto":
        env_key = "HEAD4D_BACKEND_" + op.upper()
        choice = os.environ.get(env_key) or None
        source = env_key
        if choice is None or choice == "auto":
            choice = os.environ.get("HEAD4D_BACKEND") or None
            source = "HEAD4D_BACKEND"
            if choice in PEER_BACKENDS and choice not in known:
                choice = None  # another op's peer: this op keeps its default
    if choice is not None and choice != "auto":
        if choice not in known:
            raise ValueError(f"{op}: {source} must be one of {known} or 'auto', got {choice!r}")
        reason = unavailable_reason(choice, device)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {choice!r} (from {source}) cannot run: {reason}")
        return choice

    prefs = preferences.get(device.type, ("torch",))
    for candidate in prefs:
        if unavailable_reason(candidate, device) is None:
            if candidate == "torch" and device.type in ("cpu", "cuda") and not extension_available():
                _warn_once(
                    "extension",
                    f"head4d: the compiled extension head4d._C is not available "
                    f"({extension_error_text()}); ops fall back to the plain-PyTorch reference, "
                    f"which is correct but slow. {BUILD_HINT}",
                )
            return candidate
    return "torch"


def available_backends(device: torch.device) -> Tuple[str, ...]:
    """The backends that can run on ``device`` in this process."""
    return tuple(b for b in BACKENDS if unavailable_reason(b, device) is None)
