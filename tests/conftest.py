"""Test configuration shared by the suite.

- Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET=1 is set
  here, before anything imports Triton.
- `gpu`-marked tests need CUDA and are skipped without it; they run for real on a
  lent GPU machine (benchmarks/run_gpu.sh), which sets HEAD4D_REQUIRE_GPU=1: then a
  `gpu`-marked test fails when CUDA is unavailable, so a GPU run cannot pass by skipping.
- `emulated`-marked tests run the CUDA kernels on the CPU through head4d's emulation
  of CUDA (backend `cuda_emulated`, module head4d._C_emulated built with ASan). They
  need a process of their own (HEAD4D_CUDA_EMULATION=1, the ASan runtime preloaded):
  scripts/test.sh runs the suite with `-m "not emulated"`, then `-m emulated` so.
- HEAD4D_TEST_STRICT=1 (set by the README's test command and CI) turns a missing
  compiled extension or a missing Triton into a failure instead of a skip, so a
  broken build can never pass by skipping.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import head4d  # noqa: E402
from head4d import _backend  # noqa: E402


def strict() -> bool:
    """HEAD4D_TEST_STRICT=1: a backend that cannot run is a failure, not a skip."""
    return os.environ.get("HEAD4D_TEST_STRICT", "0") == "1"


def gpu_required() -> bool:
    """HEAD4D_REQUIRE_GPU=1 (benchmarks/run_gpu.sh): a test that needs CUDA fails without it."""
    return os.environ.get("HEAD4D_REQUIRE_GPU", "0") == "1"


def require_cuda() -> None:
    """Skip without a CUDA device, or fail under HEAD4D_REQUIRE_GPU=1."""
    if torch.cuda.is_available():
        return
    if gpu_required():
        pytest.fail("HEAD4D_REQUIRE_GPU=1 but no CUDA device is available to torch")
    pytest.skip("needs a CUDA device")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one; "
                                       "fails without one under HEAD4D_REQUIRE_GPU=1)")
    config.addinivalue_line("markers", "emulated: runs the CUDA kernels in the CPU emulation (backend cuda_emulated)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None:
        require_cuda()


def device_for(backend: str) -> torch.device:
    """The device a backend's tests run on here."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def require_backend(backend: str) -> torch.device:
    """Skip (or, in strict mode, fail) when ``backend`` cannot run in this process."""
    device = device_for(backend)
    if device.type == "cuda":
        require_cuda()
    reason = _backend.unavailable_reason(backend, device)
    if reason is not None:
        if strict():
            pytest.fail(f"backend {backend!r} unavailable in strict mode: {reason}")
        pytest.skip(reason)
    return device


def require_triton_module() -> None:
    """For a test module that calls Triton kernels directly: at import, skip the module
    when Triton does not import (fail in strict mode). Only Triton's own ImportError
    counts; an error in our kernel modules is raised by their import, not skipped."""
    error = _backend._import_triton()
    if error is None:
        return
    if strict():
        pytest.fail(f"Triton does not import in strict mode: {error}", pytrace=False)
    pytest.skip(f"Triton does not import: {error}", allow_module_level=True)


#: The CUDA kernels run on the CPU through the emulation, in the emulated process.
CUDA_EMULATED = pytest.param("cuda_emulated", marks=pytest.mark.emulated)

FAST_BACKENDS = [
    "cpu",
    "triton",
    pytest.param("cuda", marks=pytest.mark.gpu),
    CUDA_EMULATED,
]


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request):
    """(backend name, device) for every non-reference backend."""
    return request.param, require_backend(request.param)
