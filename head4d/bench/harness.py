"""Running a case: the correctness check against the reference, the interleaved
timing, the memory measurement, and the :class:`Result` rows they produce."""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import _backend
from .case import PASSES, REFERENCE, STEP_PASS, Case, Inputs, Settings, cases

#: Device-to-device copy bandwidth (bytes read + written per second) measured on this
#: workplace's machines, by a lower-case substring of the device name. Unknown devices
#: (and CPUs) get no floor time.
COPY_BANDWIDTH = (("h100", 3.0e12), ("h200", 4.3e12))


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
    ``torch.autograd.grad``, so nothing accumulates between runs), or a whole training step
    (``step``: ``case.run`` with autograd on). Returns the output and then the gradients."""
    if pass_ == "fwd":
        def fwd(inputs: Inputs):
            with torch.no_grad():
                return (case.run(inputs, backend),)
        return fwd
    if pass_ == STEP_PASS:
        def train_step(inputs: Inputs):
            with torch.enable_grad():
                return (case.run(inputs, backend),)
        return train_step
    if pass_ != "fwd+bwd":
        raise ValueError(f"unknown pass {pass_!r}; expected one of {PASSES + (STEP_PASS,)}")

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
    return all(e <= case.tol() for e in errors.values()), errors


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


@dataclass
class Result:
    """One (op, shape, pass, backend) row.

    ``status``: ``ok`` (checked and timed), ``fail`` (wrong output; not timed),
    ``error`` (raised), ``skip`` (backend not available here; ``message`` says why).
    Times in milliseconds; ``speedup`` is the reference's median over this median;
    ``floor_ms`` is ``bytes / copy bandwidth`` where the bandwidth is known.
    Memory (cases with ``measure_memory``, ``fwd+bwd`` only): ``saved_bytes``, the
    tensors autograd keeps for the backward; ``peak_bytes`` (CUDA), the peak allocated
    during the call above what was allocated before it; ``memory_ratio``, the
    reference's over this backend's (the peak on CUDA, the saved bytes on the CPU).
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
    saved_bytes: Optional[int] = None
    peak_bytes: Optional[int] = None
    memory_ratio: Optional[float] = None
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


def saved_during_forward() -> bool:
    """Whether a tensor that a ``saved_tensors_hooks`` pack hook sees now is saved by the
    forward (kept until the backward): False while the autograd engine runs a backward
    node, as when a recomputing layer (:func:`head4d.nn._recompute.recompute`) runs its forward again
    in the backward, whose tensors live only during that layer's gradient step."""
    return torch._C._current_autograd_node() is None


def measure_memory(case: Case, pass_: str, backend: str, inputs: Inputs,
                   device: torch.device) -> Tuple[int, Optional[int]]:
    """``(saved_bytes, peak_bytes)`` of one call of ``step(case, pass_, backend)``.

    ``saved_bytes``: the distinct storages autograd saves for the backward during the
    forward (counted with ``torch.autograd.graph.saved_tensors_hooks``), less the
    inputs' own storages (they exist whatever the backend keeps), so the number is the
    same on every device. Tensors saved while the backward runs (a layer that recomputes
    its forward there keeps them only for its own gradient step) are not counted:
    :func:`saved_during_forward`. ``peak_bytes``: on CUDA, ``max_memory_allocated`` during the call
    minus what was allocated before it (everything the call allocates: saved tensors,
    temporaries, outputs, gradients); ``None`` elsewhere.
    """
    seen: Dict[Tuple[int, int], int] = {}
    own = {(v.untyped_storage().data_ptr(), v.untyped_storage().nbytes()) for v in inputs.values()}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in own and saved_during_forward():
            seen[key] = storage.nbytes()
        return t

    fn = step(case, pass_, backend)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(inputs)
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return sum(seen.values()), peak


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
                    flops=case.flops[pass_], tolerance=case.tol())
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
        if case.measure_memory and pass_ != "fwd":
            for row in [ref] + [rows[b] for b in wanted]:
                if row.status == "ok":
                    row.saved_bytes, row.peak_bytes = measure_memory(case, pass_, row.backend, prepared[0],
                                                                     device)
            for row in [rows[b] for b in wanted]:
                if row.status == "ok":
                    mine, theirs = ((row.peak_bytes, ref.peak_bytes) if row.peak_bytes is not None
                                    else (row.saved_bytes, ref.saved_bytes))
                    row.memory_ratio = theirs / mine if mine else None
            ref.memory_ratio = 1.0
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


def default_budget(device: torch.device, quick: bool = False, full: bool = False) -> float:
    """Seconds of timed calls per (case, pass, backend): 2 on the CPU and 1 on CUDA in the
    full mode (the gate's), 0.5 and 0.25 in the default and the quick mode."""
    if device.type == "cuda":
        return 1.0 if full else 0.25
    return 2.0 if full else 0.5


def run(settings: Settings, names: Optional[Iterable[str]] = None,
        backends: Optional[Sequence[str]] = None, budget_s: Optional[float] = None,
        on_result: Callable[[Result], None] = lambda r: None) -> List[Result]:
    """Checks and times every case of the ops ``names`` (default: all)."""
    budget = default_budget(settings.device, settings.quick, settings.full) if budget_s is None else budget_s
    out: List[Result] = []
    for case in cases(settings, names):
        out += run_case(case, settings.device, budget, backends, on_result=on_result)
    return out
