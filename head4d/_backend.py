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

For tests there is ``cuda_emulated`` (:data:`TEST_BACKENDS`): the CUDA kernels, host
launchers included, compiled as host C++ against head4d's CPU emulation of CUDA's
execution model (``csrc/cuda_emulation/``) and run on CPU tensors. It lives in a second
module, ``head4d._C_emulated`` (``HEAD4D_EMULATION=1`` at build time), built with
AddressSanitizer; a process opts in with ``HEAD4D_CUDA_EMULATION=1`` (and the ASan
runtime preloaded, as ``scripts/test.sh`` does), and then the compiled ops run the
emulated CUDA kernels instead of the CPU ones: ``cuda_emulated`` takes the ``cpu`` code
path with the emulated module, and ``cpu`` is unavailable in such a process.

An op may have a peer too (:data:`PEER_BACKENDS`): ``attention`` has ``sdpa``,
PyTorch's ``scaled_dot_product_attention``, the implementation it is measured against.

How one is chosen, first match wins:

1. the op's ``backend=`` argument;
2. an enclosing :func:`backend_scope` (a model-wide choice, as ``HEAD4D_BACKEND``);
3. the environment variable ``HEAD4D_BACKEND_<OP>`` (``HEAD4D_BACKEND_SAMPLE_TRIPLANES=triton``);
4. the environment variable ``HEAD4D_BACKEND`` (all ops);
5. the op's preference list for the tensor's device type: the fastest measured
   backend that is available (see ``PREFERENCES`` in each op's module and the
   committed benchmark results under ``benchmarks/results/``).

A forced backend that cannot run (extension not built, Triton missing, Triton
on a CPU tensor without the interpreter) raises ``RuntimeError`` saying why;
``auto`` in the argument or the variable means "use the preference list".

What each op declares (:func:`declare`, once, in its module):

* ``implemented``: the backends the op has. A backend named for this op (``backend=``
  or ``HEAD4D_BACKEND_<OP>``) that it lacks raises ``RuntimeError``; the process-wide
  ``HEAD4D_BACKEND`` naming one it lacks leaves the op's default.
* ``support``: per backend, a predicate over the call's inputs that returns ``None``
  when the backend can run them, else the reason (a dtype, a channel count, a head
  dim it has no kernel for). The default choice skips a backend whose predicate
  gives a reason and takes the next in the preference list; a forced backend raises
  ``RuntimeError`` naming the backend and the reason. A backend without a predicate
  runs every input the op itself accepts.

Importing this module never compiles anything. If ``head4d._C`` is missing, the
first op that would have used it warns once and falls back to the reference.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import warnings
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("cuda", "triton", "cpu", "torch")

#: Backends for tests only, never chosen by default: ``cuda_emulated`` (see above).
TEST_BACKENDS: Tuple[str, ...] = ("cuda_emulated",)

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


@_constant_when_compiled
def emulating() -> bool:
    """Whether this process runs the CUDA emulation (``HEAD4D_CUDA_EMULATION=1``)."""
    return os.environ.get("HEAD4D_CUDA_EMULATION", "0") not in ("", "0")


def _asan_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return "libasan" in maps.read()
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def _load_extension():
    name = "head4d._C_emulated" if emulating() else "head4d._C"
    if emulating() and importlib.util.find_spec(name) is not None and not _asan_loaded():
        # importing an ASan-built module without the runtime would abort the process
        return None, ImportError(
            f"{name} is built with AddressSanitizer and the ASan runtime is not loaded: run with "
            "LD_PRELOAD=\"$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)\" "
            "ASAN_OPTIONS=detect_leaks=0 (scripts/test.sh does)")
    try:
        return importlib.import_module(name), None
    except ImportError as exc:  # not built, or built against another torch
        if emulating():
            exc = ImportError(f"{exc}; build it with HEAD4D_EMULATION=1 (scripts/setup.sh does)")
        return None, exc


def extension():
    """The compiled extension module ``head4d._C`` (``head4d._C_emulated`` in an emulating
    process), or ``None`` if it is not importable."""
    return _load_extension()[0]


def extension_error() -> Optional[BaseException]:
    """Why ``head4d._C`` could not be imported (``None`` if it was)."""
    return _load_extension()[1]


@_constant_when_compiled
def extension_available() -> bool:
    """Whether the compiled extension imports."""
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
def _import_triton() -> Optional[ImportError]:
    """Imports Triton once; the ImportError if it is not installed (any other error,
    a broken installation, propagates)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as exc:
        return exc
    return None


@_constant_when_compiled
def triton_available() -> bool:
    """Whether Triton imports."""
    return _import_triton() is None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """``None`` if ``backend`` can run on tensors of ``device``, else why not."""
    if backend == "torch":
        return None
    if backend == "cuda_emulated":
        if not emulating():
            return ("backend 'cuda_emulated' runs in a process started with HEAD4D_CUDA_EMULATION=1 and the ASan "
                    "runtime preloaded (scripts/test.sh runs the emulated tests so)")
        if device.type != "cpu":
            return f"backend 'cuda_emulated' runs on CPU tensors, got tensors on {device}"
        if not extension_available():
            return f"the emulated extension head4d._C_emulated is not loadable ({extension_error_text()})"
        return None
    if backend == "cpu":
        if emulating():
            return ("this process runs the CUDA emulation (HEAD4D_CUDA_EMULATION=1): its compiled extension is "
                    "head4d._C_emulated, which has no CPU kernels; use backend 'cuda_emulated'")
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
            return f"Triton does not import ({_import_triton()}); pip install triton"
        if device.type == "cpu" and not triton_interpreting():
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device}"
        return None
    if backend == "sdpa":
        if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            return "this torch has no torch.nn.functional.scaled_dot_product_attention (torch >= 2.1 needed)"
        return None
    return f"unknown backend {backend!r}; expected one of {BACKENDS + PEER_BACKENDS + TEST_BACKENDS}"


#: A support predicate: called with an op's inputs (in the order the op documents at
#: its :func:`declare`), returns ``None`` when a backend can run them, else the reason.
Predicate = Callable[..., Optional[str]]


class OpBackends(NamedTuple):
    """What one op declares about its backends (see :func:`declare`)."""
    implemented: Tuple[str, ...]
    preferences: Mapping[str, Sequence[str]]
    support: Mapping[str, Predicate]


#: The committed measured backend order of each declared op: device type -> backends.
MEASURED_ORDERS: Dict[str, Mapping[str, Sequence[str]]] = {}

#: Every declared op, by name: filled as the op modules are imported.
DECLARED: Dict[str, OpBackends] = {}


def declare(op: str, implemented: Sequence[str], preferences: Mapping[str, Sequence[str]],
            support: Optional[Mapping[str, Predicate]] = None) -> OpBackends:
    """Records the backends ``op`` has, its preference list per device type (fastest
    first) and its per-backend support predicates; :func:`resolve` uses them."""
    implemented = tuple(implemented)
    unknown = [b for b in implemented if b not in BACKENDS + PEER_BACKENDS]
    if unknown or "torch" not in implemented:
        raise ValueError(f"declare({op!r}): implemented must hold 'torch' and only backends of "
                         f"{BACKENDS + PEER_BACKENDS}, got {implemented}")
    support = dict(support or {})
    stray = [b for b in support if b not in implemented]
    if stray:
        raise ValueError(f"declare({op!r}): support predicates for backends the op lacks: {stray}")
    # the measured order committed in head4d/backend_order.json, read now (never while
    # torch.compile traces a call): resolve puts it before the op's built-in order
    from ._preferences import ORDER_FILE, load_orders
    MEASURED_ORDERS[op] = load_orders(ORDER_FILE).get(op, {})
    entry = OpBackends(implemented, preferences, support)
    DECLARED[op] = entry
    return entry


def unsupported_reason(op: str, backend: str, inputs: Optional[Sequence] = None) -> Optional[str]:
    """``None`` if ``op``'s ``backend`` can run ``inputs`` (as far as its support predicate
    says; ``inputs=None`` asks about no inputs in particular), else why not."""
    entry = DECLARED.get(op)
    if entry is None or inputs is None:
        return None
    predicate = entry.support.get(backend)
    return None if predicate is None else predicate(*inputs)


#: The backend of :func:`backend_scope` (None outside one).
_SCOPED_BACKEND: contextvars.ContextVar = contextvars.ContextVar("head4d_backend_scope", default=None)


@contextlib.contextmanager
def backend_scope(backend: Optional[str]):
    """Within the ``with`` block, every op call without a ``backend=`` argument uses
    ``backend`` as if ``HEAD4D_BACKEND`` were set to it (an op that lacks it keeps its
    default), ahead of the environment variables. ``None`` or ``"auto"`` changes nothing
    (an enclosing scope, if any, still applies). Scopes nest (the innermost wins) and are per thread / task (a context
    variable). Models use it to run every op inside them on one backend (for example
    ``"torch"``, the references)."""
    if backend is not None and backend != "auto" and backend not in BACKENDS + TEST_BACKENDS + PEER_BACKENDS:
        raise ValueError(f"backend_scope: backend must be None, 'auto' or one of "
                         f"{BACKENDS + TEST_BACKENDS + PEER_BACKENDS}, got {backend!r}")
    if backend is None or backend == "auto":
        yield
        return
    token = _SCOPED_BACKEND.set(backend)
    try:
        yield
    finally:
        _SCOPED_BACKEND.reset(token)


def _requested(op: str, requested: Optional[str], known: Sequence[str]) -> Tuple[Optional[str], str]:
    """The backend asked for (None: the default) and where it was asked for."""
    if requested is not None and requested != "auto":
        return requested, "backend="
    scoped = _SCOPED_BACKEND.get()
    if scoped is not None:
        if scoped in BACKENDS + PEER_BACKENDS and scoped not in known:
            return None, "default"
        if scoped == "cuda_emulated" and "cpu" not in known:
            return None, "default"
        return scoped, "backend_scope"
    env_key = "HEAD4D_BACKEND_" + op.upper()
    choice = os.environ.get(env_key) or None
    if choice is not None and choice != "auto":
        return choice, env_key
    choice = os.environ.get("HEAD4D_BACKEND") or None
    if choice is None or choice == "auto":
        return None, "default"
    if choice in BACKENDS + PEER_BACKENDS and choice not in known:
        return None, "default"  # a backend this op lacks (another op's peer, say): keep the default
    if choice == "cuda_emulated" and "cpu" not in known:
        return None, "default"  # an op without compiled kernels
    return choice, "HEAD4D_BACKEND"


def resolve(op: str, device: torch.device, requested: Optional[str],
            preferences: Optional[Mapping[str, Sequence[str]]] = None, extra: Sequence[str] = (),
            inputs: Optional[Sequence] = None) -> str:
    """Pick the backend for one call of ``op`` on tensors living on ``device``.

    ``preferences`` defaults to the op's declared list; ``extra`` names peers from
    :data:`PEER_BACKENDS` for an op that was not declared; ``inputs`` (the op's
    inputs, in its declared order) are checked with its support predicates: the
    default skips a backend that cannot run them, a forced one raises ``RuntimeError``
    with the reason. Without ``inputs`` no predicate is asked.
    """
    entry = DECLARED.get(op)
    if entry is not None:
        known = entry.implemented
        if preferences is None:
            preferences = entry.preferences
        measured = MEASURED_ORDERS.get(op)
        if measured:
            from ._preferences import merge_order
            preferences = merge_order(preferences, measured)
    else:
        known = BACKENDS + tuple(extra)
    choice, source = _requested(op, requested, known)
    if choice == "cuda_emulated":
        # a test backend: the CUDA kernels through the cpu code path, whose extension is
        # head4d._C_emulated in an emulating process
        reason = unavailable_reason(choice, device)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {choice!r} (from {source}) cannot run: {reason}")
        if "cpu" not in known:
            raise RuntimeError(f"{op}: backend {choice!r} (from {source}) needs compiled kernels; this op has {known}")
        reason = unsupported_reason(op, "cpu", inputs)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {choice!r} (from {source}) does not support these inputs: {reason}")
        return "cpu"
    if choice is not None:
        if choice not in BACKENDS + PEER_BACKENDS or (entry is None and choice not in known):
            raise ValueError(f"{op}: {source} must be one of {known} or 'auto', got {choice!r}")
        if choice not in known:
            raise RuntimeError(f"{op}: backend {choice!r} (from {source}) is not implemented for this op; "
                               f"it has {known}")
        reason = unavailable_reason(choice, device)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {choice!r} (from {source}) cannot run: {reason}")
        reason = unsupported_reason(op, choice, inputs)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {choice!r} (from {source}) does not support these inputs: "
                               f"{reason}")
        return choice

    for candidate in (preferences or {}).get(device.type, ("torch",)):
        if candidate not in known or unavailable_reason(candidate, device) is not None:
            continue
        if unsupported_reason(op, candidate, inputs) is not None:
            continue
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


def available_for(op: str, device: torch.device) -> Tuple[str, ...]:
    """The backends of the declared ``op`` (peers included) that can run on ``device``
    in this process, in the order of :data:`BACKENDS` then :data:`PEER_BACKENDS`."""
    implemented = DECLARED[op].implemented
    return tuple(b for b in BACKENDS + PEER_BACKENDS
                 if b in implemented and unavailable_reason(b, device) is None)
