"""Benchmarks: every op's fast backends checked and timed beside its plain-PyTorch reference.

One library behind three front ends: ``head4d bench`` (:mod:`head4d.cli`), the CI gate
(``benchmarks/gate.py``) and the pytest-benchmark suites (``benchmarks/bench_*.py``).

Layout:

- :mod:`.case`: :class:`Case` (one op on one shape), :class:`Settings` (device, batch
  sizes, mode), the registry (:func:`register`, :func:`cases`);
- :mod:`.op_cases`: one module per op family with its cases;
- :mod:`.harness`: the correctness check, the timing, the memory measurement, :func:`run`;
- :mod:`.reporting`: the environment, the printed table and the JSON record;
- :mod:`.order`: each op's default backend order derived from a run.

How a number is taken:

1. **Checked before timed.** On fresh random inputs, each fast backend's output (and
   for ``fwd+bwd`` its gradients) is compared with the reference backend ``torch`` by
   the relative error of the norms, ``||out - ref|| / ||ref||``, against a bound set by
   the data's dtype (:data:`TOLERANCE`) or by the case. A backend over the bound is
   reported as failed and not timed; one that raises is reported as an error.
2. **Interleaved repeats.** After a warm-up, the reference and the fast backends are
   called in turn, one call each per round, so that a busy spell of a shared machine
   slows them all alike; the number of rounds is set so that each backend gets about
   ``budget_s`` seconds. The row keeps the median and the quartiles. On CUDA each call
   is bracketed by events and the inputs rotate among several sets when one would fit
   in L2; on the CPU each call is bracketed by ``time.perf_counter``.
3. **Ratios within a process.** A backend's speedup is the reference's median over its
   own, both from the same rounds on the same inputs: the number the gate holds floors
   for, and the one that means something on a shared machine.
4. **What the time is worth.** Each case states the bytes it must at least move and
   its floating-point operations, so a median becomes GB/s and, where the device's copy
   bandwidth is known (:data:`COPY_BANDWIDTH`), the time a pure copy of those bytes
   would take.

Modes (:class:`Settings`): ``full``, the gate's, runs every shape an op defines for the
device with the long budget; ``quick`` small shapes (labels of their own) with a short
budget; the default, a few minutes on 2 CPU cores, the quick shapes on the CPU and the
full shapes at N = 1 (part of the attention sweep) on CUDA, with the short budget.

Adding an op: a module in :mod:`.op_cases` with a function ``(Settings) -> list[Case]``
decorated with ``@register("op_name")``; the CLI, the gate and the suites pick it up.
"""
from __future__ import annotations

from .case import (DTYPE_NAMES, PASSES, REFERENCE, STEP_PASS, TOLERANCE, WHOLE_MODELS, Case, Inputs, Settings,
                   cases, default_batches, fast_backends, ops, process_backend, register)
from .harness import (COPY_BANDWIDTH, Result, check, copy_bandwidth, default_budget, default_device,
                      input_sets, measure_memory, prepare, rel_err, run, run_case, step, time_calls)
from .reporting import (device_key, device_name, environment, format_table, report, table_header,
                     table_row)
from . import op_cases, order  # noqa: F401, E402  (op_cases registers every op's cases)

__all__ = [
    "COPY_BANDWIDTH", "DTYPE_NAMES", "PASSES", "REFERENCE", "STEP_PASS", "TOLERANCE", "WHOLE_MODELS",
    "Case", "Inputs", "Result", "Settings",
    "cases", "check", "copy_bandwidth", "default_batches", "default_budget", "default_device",
    "device_key", "device_name", "environment", "fast_backends", "format_table", "input_sets",
    "measure_memory", "ops", "prepare", "process_backend", "register", "rel_err", "report", "run",
    "run_case", "step", "table_header", "table_row", "time_calls",
]
