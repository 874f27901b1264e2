"""pytest-benchmark suite for ``sample_triplanes``: each available backend beside the
reference, forward and forward+backward, on the cases of :mod:`head4d.bench`.

    pytest benchmarks/bench_triplanes.py --benchmark-only [--benchmark-json PATH]

Not collected by the normal test run (``testpaths = tests``, and this file's name does
not match ``test_*.py``). CUDA if present (the issue's shapes, N = 1), else the CPU
(the quick cases: small, a few seconds per row). Each benchmarked call synchronizes
CUDA, so a round is the op's whole time. Every fast backend is checked against the
reference before it is timed; a wrong answer fails its row.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from head4d import _backend, bench  # noqa: E402

DEVICE = bench.default_device()
CASES = bench.cases(bench.Settings(device=DEVICE, batches=(1,), quick=DEVICE.type == "cpu"),
                    ["sample_triplanes"])
PARAMS = [pytest.param(case, pass_, backend, id=f"{case.shape}-{pass_}-{backend}")
          for case in CASES for pass_ in case.passes
          for backend in (bench.REFERENCE,) + case.backends]


@pytest.fixture(scope="module")
def inputs():
    """Per case and pass: the input sets (several on CUDA when one would sit in L2,
    rotated through by the benchmarked call) and the reference's outputs on the first."""
    cache = {}

    def get(case, pass_):
        if (case.shape, pass_) not in cache:
            cache.clear()  # one case's tensors at a time
            sets = [bench.prepare(case, s, pass_) for s in bench.input_sets(case, DEVICE)]
            expected = [t.detach() for t in bench.step(case, pass_, bench.REFERENCE)(sets[0])]
            cache[(case.shape, pass_)] = (sets, expected)
        return cache[(case.shape, pass_)]
    return get


@pytest.mark.parametrize("case,pass_,backend", PARAMS)
def test_sample_triplanes(benchmark, inputs, case, pass_, backend):
    reason = _backend.unavailable_reason(backend, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    sets, expected = inputs(case, pass_)
    if backend != bench.REFERENCE:
        ok, errors = bench.check(case, pass_, backend, sets[0], expected)
        assert ok, f"{case.key(pass_, backend)} differs from the reference: {errors}"
    step = bench.step(case, pass_, backend)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    turn = [0]

    def call():
        step(sets[turn[0] % len(sets)])
        turn[0] += 1
        sync()

    benchmark.group = f"{case.op}/{pass_}/{case.shape}"
    benchmark.extra_info.update(bytes=case.nbytes[pass_], flops=case.flops[pass_],
                                device=bench.device_name(DEVICE))
    benchmark.pedantic(call, warmup_rounds=2, rounds=5 if DEVICE.type == "cpu" else 50)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = round(case.nbytes[pass_] / median_s / 1e9, 2)
