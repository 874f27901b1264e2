"""Test configuration shared by the suite.

- Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET=1 is set
  here, before anything imports Triton.
- `gpu`-marked tests need CUDA and are skipped without it; they run for real on a
  lent GPU machine (benchmarks/run_gpu.sh).
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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "emulated: runs the CUDA kernels in the CPU emulation (backend cuda_emulated)")


def device_for(backend: str) -> torch.device:
    """The device a backend's tests run on here."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def require_backend(backend: str) -> torch.device:
    """Skip (or, in strict mode, fail) when ``backend`` cannot run in this process."""
    device = device_for(backend)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = _backend.unavailable_reason(backend, device)
    if reason is not None:
        if os.environ.get("HEAD4D_TEST_STRICT", "0") == "1":
            pytest.fail(f"backend {backend!r} unavailable in strict mode: {reason}")
        pytest.skip(reason)
    return device


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
