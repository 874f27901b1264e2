"""Benchmarks: every op's fast backends timed beside its plain-PyTorch reference.

One library behind three front ends: ``head4d bench`` (:mod:`head4d.cli`), the CI gate
(``benchmarks/gate.py``) and the pytest-benchmark suites (``benchmarks/bench_*.py``).

The method (``/work/.library/device/METHOD.md``, ``shared/design/performance.md``):

1. **Correct first.** Before a backend is timed on a case, its forward output (and, for
   ``fwd+bwd``, its gradients) is compared with the reference backend ``torch`` on the
   same fresh random inputs by the relative-norm error ``||out - ref|| / ||ref||``
   (:data:`TOLERANCE`). A backend that fails is reported and not timed.
2. **Two numbers.** Each case states the bytes the op must move through memory (each
   input read once, each output written once) and its FLOPs, so a time turns into
   achieved GB/s and, where the device's copy bandwidth is known
   (:data:`COPY_BANDWIDTH`), into a floor time.
3. **Timing.** Warm-up, then the median of repeats, the reference and the fast
   backends taking turns call by call (so a slow spell of a shared machine hits all
   alike). CUDA: events around each call, rotating among several input sets when one
   set would sit in L2. CPU: ``time.perf_counter`` around each call. The number of
   repeats adapts so that each backend's pass takes about ``budget_s`` seconds.
4. **Ratios.** The speedup of a backend is the reference's median over its median,
   measured in the same process on the same inputs.

Adding an op: write a function ``(Settings) -> list[Case]`` and decorate it with
``@register("op_name")``; the CLI, the gate and the suites pick it up.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import _backend

REFERENCE = "torch"
PASSES = ("fwd", "fwd+bwd")

#: Bound on the relative-norm error ``||out - ref|| / ||ref||`` per floating dtype
#: (of the op's data, e.g. the planes); gradients use the same bound.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

#: Device-to-device copy bandwidth (bytes read + written per second) measured on this
#: workplace's machines, by a lower-case substring of the device name. Unknown devices
#: (and CPUs) get no floor time.
COPY_BANDWIDTH = (("h100", 3.0e12), ("h200", 4.3e12))

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
               torch.bfloat16: "bf16"}

Inputs = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------

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
        passes: which of :data:`PASSES` to time.
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

    def key(self, pass_: str, backend: str) -> str:
        """``op/pass/shape/backend``, the key of a result and of a gate floor."""
        return f"{self.op}/{pass_}/{self.shape}/{backend}"


@dataclass
class Settings:
    """What to build cases for.

    ``batches``: the batch sizes N to run (``None``: the op's default for the device).
    ``quick``: fewer and smaller cases and a shorter time budget.
    """

    device: torch.device
    batches: Optional[Tuple[int, ...]] = None
    quick: bool = False


_REGISTRY: Dict[str, Callable[[Settings], List[Case]]] = {}


def register(op: str):
    """Decorator: register ``fn(settings) -> list[Case]`` as the cases of ``op``."""
    def wrap(fn):
        _REGISTRY[op] = fn
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


# ----------------------------------------------------------------------------------
# sample_triplanes
# ----------------------------------------------------------------------------------

@register("sample_triplanes")
def _sample_triplanes_cases(settings: Settings) -> List[Case]:
    """Planes ``[N, 3, 32, 256, 256]`` (25 MB per image in fp32), reduce ``mean``.

    GPU: 128 x 128 rays x 96 samples = 1,572,864 points per image, N = 1 and 4, fp32
    planes plus bf16 planes. CPU: 64 x 64 x 24 = 98,304 points per image (quick:
    32 x 32 x 16 = 16,384), N = 1. Points are uniform in ``[-0.52, 0.52] * box_warp``
    per axis: about 89% inside the cube, the rest just outside. ``box_warp`` is 1.0
    (Portrait4D uses 1.3; it does not change the speed).
    """
    from .ops import triplanes

    device = settings.device
    cuda = device.type == "cuda"
    batches = settings.batches or ((1,) if settings.quick or not cuda else (1, 4))
    if cuda:
        per_image = 128 * 128 * 96
    else:
        per_image = 32 * 32 * 16 if settings.quick else 64 * 64 * 24
    dtypes = (torch.float32,) if settings.quick else (torch.float32, torch.bfloat16)
    backends = fast_backends(triplanes.PREFERENCES, device)
    return [_triplanes_case(n, 32, 256, 256, per_image, dtype, backends)
            for dtype in dtypes for n in batches]


def _triplanes_case(n: int, c: int, h: int, w: int, m: int, dtype: torch.dtype,
                    backends: Tuple[str, ...], box_warp: float = 1.0) -> Case:
    from .ops import sample_triplanes

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        planes = torch.randn(n, 3, c, h, w, generator=gen, device=device).to(dtype)
        points = (torch.rand(n, m, 3, generator=gen, device=device) * 1.04 - 0.52) * box_warp
        grad_out = torch.randn(n, m, c, generator=gen, device=device).to(dtype)
        return {"planes": planes, "points": points, "grad_out": grad_out}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        return sample_triplanes(inputs["planes"], inputs["points"], box_warp=box_warp,
                                plane_layout="portrait4d", reduce="mean", backend=backend)

    elt = torch.tensor([], dtype=dtype).element_size()
    planes_b, points_b, out_b = n * 3 * c * h * w * elt, n * m * 3 * 4, n * m * c * elt
    fwd_bytes = planes_b + points_b + out_b
    # Forward, per (point, channel): 3 planes x 4 taps x (mul + add), then the mean (3).
    # Backward adds, per (point, plane, channel): 4 taps x (mul + add) into the planes'
    # gradient and 4 taps x 2 coordinates x (mul + add) into the points' gradient.
    fwd_flops = n * m * c * (3 * 4 * 2 + 3)
    bwd_flops = n * m * c * 3 * (4 * 2 + 4 * 2 * 2)
    return Case(
        op="sample_triplanes",
        shape=f"N{n}_C{c}_{h}x{w}_M{m}_{DTYPE_NAMES[dtype]}",
        make_inputs=make_inputs,
        run=run,
        grad_of=("planes", "points"),
        nbytes={"fwd": fwd_bytes,
                # + grad_out read, grad planes and grad points written
                "fwd+bwd": fwd_bytes + out_b + planes_b + points_b},
        flops={"fwd": fwd_flops, "fwd+bwd": fwd_flops + bwd_flops},
        dtype=dtype,
        backends=backends,
    )


# ----------------------------------------------------------------------------------
# composite_rays
# ----------------------------------------------------------------------------------

@register("composite_rays")
def _composite_rays_cases(settings: Settings) -> List[Case]:
    """Colors ``[N, R, S, 32]``, stratified sorted depths in ``[2.25, 3.3]`` (EG3D's
    near / far), raw densities ``randn * 2``, no background.

    GPU: 128 x 128 rays x 96 samples per image, N = 1 and 4, fp32 plus bf16. CPU:
    64 x 64 rays x 48 samples (quick: 32 x 32 x 48), N = 1. The timed output is
    ``cat([rgb, depth], -1)`` so that ``fwd+bwd`` carries gradients through both.
    """
    from .ops import compositing

    device = settings.device
    cuda = device.type == "cuda"
    batches = settings.batches or ((1,) if settings.quick or not cuda else (1, 4))
    if cuda:
        rays, samples = 128 * 128, 96
    else:
        rays, samples = (32 * 32 if settings.quick else 64 * 64), 48
    dtypes = (torch.float32,) if settings.quick or not cuda else (torch.float32, torch.bfloat16)
    backends = fast_backends(compositing.PREFERENCES, device)
    return [_composite_case(n, rays, samples, 32, dtype, backends) for dtype in dtypes for n in batches]


def _composite_case(n: int, r: int, s: int, c: int, dtype: torch.dtype, backends: Tuple[str, ...]) -> Case:
    from .ops import composite_rays

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        colors = torch.randn(n, r, s, c, generator=gen, device=device).to(dtype)
        densities = (torch.randn(n, r, s, 1, generator=gen, device=device) * 2).to(dtype)
        step = (3.3 - 2.25) / s
        base = 2.25 + step * torch.arange(s, device=device, dtype=torch.float32).view(1, 1, s, 1)
        depths = (base + step * torch.rand(n, r, s, 1, generator=gen, device=device)).to(dtype)
        grad_out = torch.randn(n, r, c + 1, generator=gen, device=device).to(dtype)
        return {"colors": colors, "densities": densities, "depths": depths, "grad_out": grad_out}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        rgb, depth, _ = composite_rays(inputs["colors"], inputs["densities"], inputs["depths"], backend=backend)
        return torch.cat([rgb, depth], dim=-1)

    elt = torch.tensor([], dtype=dtype).element_size()
    colors_b = n * r * s * c * elt
    per_sample_b = 2 * n * r * s * elt                      # densities + depths
    out_b = n * r * (c + 1) * elt + n * r * (s - 1) * elt  # rgb + depth, weights
    fwd_bytes = colors_b + per_sample_b + out_b
    # Forward per interval: midpoints, exp, log1p and the transmittance (~20) plus
    # 3 per channel; backward about 40 plus 4 per channel.
    fwd_flops = n * r * (s - 1) * (20 + 3 * c)
    bwd_flops = n * r * (s - 1) * (40 + 4 * c)
    return Case(
        op="composite_rays",
        shape=f"N{n}_R{r}_S{s}_C{c}_{DTYPE_NAMES[dtype]}",
        make_inputs=make_inputs,
        run=run,
        grad_of=("colors", "densities", "depths"),
        nbytes={"fwd": fwd_bytes,
                # + grad_out read, grads of colors, densities and depths written
                "fwd+bwd": fwd_bytes + n * r * (c + 1) * elt + colors_b + per_sample_b},
        flops={"fwd": fwd_flops, "fwd+bwd": fwd_flops + bwd_flops},
        dtype=dtype,
        backends=backends,
    )


# ----------------------------------------------------------------------------------
# Checking and timing
# ----------------------------------------------------------------------------------

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; ``inf`` for a shape mismatch or a NaN/inf."""
    if out.shape != ref.shape:
        return math.inf
    out, ref = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def prepare(case: Case, inputs: Inputs, pass_: str) -> Inputs:
    """The inputs for one pass: for ``fwd+bwd``, the differentiated ones become leaves
    requiring grad (done here, outside any timed region)."""
    if pass_ == "fwd":
        return {k: v.detach() for k, v in inputs.items()}
    return {k: (v.detach().requires_grad_(True) if k in case.grad_of else v.detach())
            for k, v in inputs.items()}


def step(case: Case, pass_: str, backend: str) -> Callable[[Inputs], Tuple[torch.Tensor, ...]]:
    """The timed callable: the forward (``fwd``), or the forward and the gradients of
    ``case.grad_of`` for the cotangent ``inputs["grad_out"]`` (``fwd+bwd``; through
    ``torch.autograd.grad``, so nothing accumulates between runs). Returns the output
    and then the gradients."""
    if pass_ == "fwd":
        def fwd(inputs: Inputs):
            with torch.no_grad():
                return (case.run(inputs, backend),)
        return fwd
    if pass_ != "fwd+bwd":
        raise ValueError(f"unknown pass {pass_!r}; expected one of {PASSES}")

    def fwd_bwd(inputs: Inputs):
        out = case.run(inputs, backend)
        grads = torch.autograd.grad(out, [inputs[k] for k in case.grad_of], inputs["grad_out"])
        return (out, *grads)
    return fwd_bwd


def check(case: Case, pass_: str, backend: str, inputs: Inputs,
          expected: Sequence[torch.Tensor]) -> Tuple[bool, Dict[str, float]]:
    """Runs ``backend`` once on ``inputs`` (prepared for ``pass_``) and compares each
    output with ``expected`` (the reference's). Returns (passed, errors by name)."""
    got = step(case, pass_, backend)(inputs)
    names = ["out"] + [f"grad_{k}" for k in case.grad_of][: len(got) - 1]
    errors = {name: rel_err(g, e) for name, g, e in zip(names, got, expected)}
    return all(e <= TOLERANCE[case.dtype] for e in errors.values()), errors


def _input_bytes(inputs: Inputs) -> int:
    return sum(v.numel() * v.element_size() for k, v in inputs.items() if k != "grad_out")


def input_sets(case: Case, device: torch.device, seed: int = 0) -> List[Inputs]:
    """Fresh inputs for ``case``; on CUDA, enough sets that rotating among them spans
    three times the L2 cache (at most 8), so repeated runs do not time the cache."""
    first = case.make_inputs(device, seed)
    count = 1
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
        count = max(1, min(8, math.ceil(3 * l2 / max(1, _input_bytes(first)))))
        if _input_bytes(first) > 2 * l2:
            count = 1
    return [first] + [case.make_inputs(device, seed + i) for i in range(1, count)]


def time_calls(fns: Sequence[Callable[[Inputs], object]], sets: Sequence[Inputs],
               device: torch.device, budget_s: float, min_reps: int = 3,
               max_reps: int = 200) -> List[List[float]]:
    """Per-call times in milliseconds of each of ``fns``, interleaved, after warm-up.

    The functions take turns call by call (``f0, f1, ..., f0, f1, ...``), each call on
    the next of ``sets`` in rotation, so a slow spell of a shared machine hits them all
    alike and their ratio stays put. Warm-up: at least two calls each and up to a tenth
    of the budget. Then ``budget_s / (time of one round)`` rounds, clamped to
    ``[min_reps, max_reps]``. CUDA: an event pair around each call, read after one final
    synchronize. CPU: ``time.perf_counter`` around each call.
    """
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = len(sets)
    best = [math.inf] * len(fns)
    sync()
    start, rounds = time.perf_counter(), 0
    while rounds < 2 or (time.perf_counter() - start < 0.1 * budget_s and rounds < 20):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn(sets[rounds % n])
            sync()
            if rounds:  # the first call may compile or allocate
                best[j] = min(best[j], time.perf_counter() - t0)
        rounds += 1
    reps = int(max(min_reps, min(max_reps, budget_s / max(sum(best), 1e-6))))
    times: List[List[float]] = [[] for _ in fns]
    if cuda:
        events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                   for _ in fns] for _ in range(reps)]
        for i in range(reps):
            for fn, (begin, end) in zip(fns, events[i]):
                begin.record()
                fn(sets[i % n])
                end.record()
        torch.cuda.synchronize()
        for row in events:
            for j, (begin, end) in enumerate(row):
                times[j].append(begin.elapsed_time(end))
    else:
        for i in range(reps):
            for j, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn(sets[i % n])
                times[j].append((time.perf_counter() - t0) * 1e3)
    return times


# ----------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------

@dataclass
class Result:
    """One (op, shape, pass, backend) row.

    ``status``: ``ok`` (checked and timed), ``fail`` (wrong output; not timed),
    ``error`` (raised), ``skip`` (backend not available here; ``message`` says why).
    Times in milliseconds; ``speedup`` is the reference's median over this median;
    ``floor_ms`` is ``bytes / copy bandwidth`` where the bandwidth is known.
    """

    op: str
    shape: str
    pass_: str
    backend: str
    status: str
    bytes: int
    flops: int
    errors: Dict[str, float] = field(default_factory=dict)
    tolerance: Optional[float] = None
    median_ms: Optional[float] = None
    p25_ms: Optional[float] = None
    p75_ms: Optional[float] = None
    min_ms: Optional[float] = None
    reps: int = 0
    input_sets: int = 1
    speedup: Optional[float] = None
    gbps: Optional[float] = None
    gflops: Optional[float] = None
    floor_ms: Optional[float] = None
    message: str = ""

    @property
    def key(self) -> str:
        return f"{self.op}/{self.pass_}/{self.shape}/{self.backend}"

    @property
    def failed(self) -> bool:
        return self.status in ("fail", "error")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["pass"] = data.pop("pass_")
        data["key"] = self.key
        return data


def copy_bandwidth(device: torch.device) -> Optional[float]:
    """The measured copy bandwidth (bytes/s) of ``device``, or ``None`` if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((bw for tag, bw in COPY_BANDWIDTH if tag in name), None)


def _timed_result(case: Case, pass_: str, backend: str, times: List[float], n_sets: int,
                  bandwidth: Optional[float]) -> Result:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    median = statistics.median(times)
    nbytes, flops = case.nbytes[pass_], case.flops[pass_]
    return Result(op=case.op, shape=case.shape, pass_=pass_, backend=backend, status="ok",
                  bytes=nbytes, flops=flops, median_ms=median, p25_ms=q[0], p75_ms=q[2],
                  min_ms=min(times), reps=len(times), input_sets=n_sets,
                  gbps=nbytes / (median * 1e-3) / 1e9, gflops=flops / (median * 1e-3) / 1e9,
                  floor_ms=None if bandwidth is None else nbytes / bandwidth * 1e3)


def run_case(case: Case, device: torch.device, budget_s: float,
             backends: Optional[Sequence[str]] = None, seed: int = 0,
             on_result: Callable[[Result], None] = lambda r: None) -> List[Result]:
    """Checks the fast backends of one case against the reference, then times them and
    the reference interleaved (:func:`time_calls`), pass by pass.

    ``backends`` restricts the fast backends (the reference always runs: it is what
    the others are checked and measured against). ``budget_s`` is per backend and pass.
    Calls ``on_result`` with each row once its pass is done; returns all rows.
    """
    wanted = [b for b in case.backends if backends is None or b in backends]
    sets = input_sets(case, device, seed)
    bandwidth = copy_bandwidth(device)
    min_reps = 10 if device.type == "cuda" else 3
    results: List[Result] = []

    for pass_ in case.passes:
        prepared = [prepare(case, s, pass_) for s in sets]
        base = dict(op=case.op, shape=case.shape, pass_=pass_, bytes=case.nbytes[pass_],
                    flops=case.flops[pass_], tolerance=TOLERANCE[case.dtype])
        expected = [t.detach() for t in step(case, pass_, REFERENCE)(prepared[0])]
        rows: Dict[str, Result] = {}
        errors: Dict[str, Dict[str, float]] = {}
        for backend in wanted:
            reason = _backend.unavailable_reason(backend, device)
            if reason is not None:
                rows[backend] = Result(backend=backend, status="skip", message=reason, **base)
                continue
            try:
                ok, errors[backend] = check(case, pass_, backend, prepared[0], expected)
            except Exception as exc:  # a crash is a result too: report it, carry on
                rows[backend] = Result(backend=backend, status="error", **base,
                                       message=f"{type(exc).__name__}: {exc}")
                continue
            if not ok:
                worst = max(errors[backend], key=errors[backend].get)
                rows[backend] = Result(backend=backend, status="fail", errors=errors[backend],
                                       **base, message=f"{worst}: rel. error "
                                       f"{errors[backend][worst]:.2e} > {base['tolerance']:.0e}")
        timed = [REFERENCE] + [b for b in wanted if b not in rows]
        try:
            all_times = time_calls([step(case, pass_, b) for b in timed], prepared, device,
                                   budget_s * len(timed), min_reps)
        except Exception:  # time them one by one, so one backend's crash spares the others
            all_times = []
            for b in timed:
                try:
                    all_times.append(time_calls([step(case, pass_, b)], prepared, device,
                                                budget_s, min_reps)[0])
                except Exception as exc:
                    if b == REFERENCE:
                        raise
                    all_times.append(None)
                    rows[b] = Result(backend=b, status="error", **base,
                                     message=f"{type(exc).__name__} while timing: {exc}")
        ref = _timed_result(case, pass_, REFERENCE, all_times[0], len(sets), bandwidth)
        ref.tolerance, ref.speedup = base["tolerance"], 1.0
        for backend, times in zip(timed[1:], all_times[1:]):
            if times is None:
                continue
            row = rows[backend] = _timed_result(case, pass_, backend, times, len(sets), bandwidth)
            row.errors, row.tolerance = errors[backend], base["tolerance"]
            row.speedup = ref.median_ms / row.median_ms
        for row in [ref] + [rows[b] for b in wanted]:
            results.append(row)
            on_result(row)
        del prepared, expected
    del sets
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def default_device() -> torch.device:
    """CUDA if present, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_budget(device: torch.device, quick: bool) -> float:
    """Seconds of timed calls per (case, pass, backend)."""
    if device.type == "cuda":
        return 0.25 if quick else 1.0
    return 0.5 if quick else 2.0


def run(settings: Settings, names: Optional[Iterable[str]] = None,
        backends: Optional[Sequence[str]] = None, budget_s: Optional[float] = None,
        on_result: Callable[[Result], None] = lambda r: None) -> List[Result]:
    """Checks and times every case of the ops ``names`` (default: all)."""
    budget = default_budget(settings.device, settings.quick) if budget_s is None else budget_s
    out: List[Result] = []
    for case in cases(settings, names):
        out += run_case(case, settings.device, budget, backends, on_result=on_result)
    return out


# ----------------------------------------------------------------------------------
# Environment and reporting
# ----------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3``, or the CPU model with its core count and torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_key(device: torch.device) -> str:
    """The gate's name for a device: ``cpu``, or a slug of the GPU's name
    (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _git(*args: str) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Where and with what the numbers were taken."""
    from . import __version__

    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    ext = _backend.extension()
    bandwidth = copy_bandwidth(device)
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    if commit is None:  # a copy without .git (a device machine): the caller may say which
        commit = os.environ.get("HEAD4D_GIT_COMMIT") or None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "device_key": device_key(device),
        "copy_bandwidth_gbps": None if bandwidth is None else bandwidth / 1e9,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "head4d": __version__,
        "extension": None if ext is None else {"cuda_kernels": bool(ext.with_cuda())},
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": None if dirty is None else bool(dirty),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# Columns of the printed table: (header, width, right-aligned).
_COLUMNS = (("op", 16, False), ("pass", 7, False), ("shape", 30, False), ("backend", 7, False),
            ("median ms", 10, True), ("IQR", 6, True), ("vs ref", 7, True), ("GB/s", 8, True),
            ("floor ms", 8, True), ("check", 22, False))


def _cells(r: Result) -> List[str]:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)
    if r.status == "ok":
        iqr = f"{100 * (r.p75_ms - r.p25_ms) / r.median_ms:.0f}%"
        worst = max(r.errors.values()) if r.errors else None
        check_cell = "reference" if r.backend == REFERENCE else f"ok {worst:.1e}"
    else:
        first = (r.message.splitlines() or [""])[0]
        iqr, check_cell = "-", f"{r.status.upper()}: {first[:120]}"
    return [r.op, r.pass_, r.shape, r.backend, num(r.median_ms, ".3f"), iqr,
            num(r.speedup, ".2f") + ("x" if r.speedup is not None else ""),
            num(r.gbps, ".1f"), num(r.floor_ms, ".3f"), check_cell]


def _line(cells: Sequence[str]) -> str:
    parts = []
    for cell, (_, width, right) in zip(cells, _COLUMNS):
        parts.append(cell.rjust(width) if right else cell.ljust(width))
    return "  ".join(parts).rstrip()


def table_header() -> str:
    """The table's header line and a rule under it."""
    head = _line([h for h, _, _ in _COLUMNS])
    return head + "\n" + "-" * len(head)


def table_row(result: Result) -> str:
    """One aligned line for ``result``."""
    return _line(_cells(result))


def format_table(results: Sequence[Result]) -> str:
    return "\n".join([table_header()] + [table_row(r) for r in results])


def report(results: Sequence[Result], device: torch.device, **extra) -> dict:
    """The JSON-able record of a run: environment, settings and every row."""
    return {"environment": environment(device), **extra,
            "results": [r.to_json() for r in results]}
