"""pytest plugin for the compute-sanitizer steps of ``benchmarks/run_gpu.sh``: of the tests
the ``-k`` expression selected, keep the first ``HEAD4D_SANITIZER_PER_TEST`` (default 1)
parametrizations of each test function, so every selected test function runs once under
the sanitizer (tens of times slower per launch) and the step stays within its time cap.

    PYTHONPATH=benchmarks python -m pytest -p sanitizer_subset -k "cuda and not triton" tests

Not a test file (no ``test_`` prefix); it selects, it asserts nothing.
"""
import os

import pytest


def per_test() -> int:
    """How many parametrizations of each test function to keep (at least 1)."""
    value = os.environ.get("HEAD4D_SANITIZER_PER_TEST", "1")
    try:
        count = int(value)
    except ValueError:
        raise pytest.UsageError(f"HEAD4D_SANITIZER_PER_TEST must be a positive integer, got {value!r}")
    if count < 1:
        raise pytest.UsageError(f"HEAD4D_SANITIZER_PER_TEST must be a positive integer, got {value!r}")
    return count


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(config, items):
    limit = per_test()
    seen = {}
    kept, dropped = [], []
    for item in items:
        function = item.nodeid.split("[", 1)[0]
        seen[function] = seen.get(function, 0) + 1
        (kept if seen[function] <= limit else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
