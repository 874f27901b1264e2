"""The CUDA emulation itself (csrc/cuda_emulation/): that it runs correct kernels
correctly and that it catches what it promises to catch: a missing barrier gives a wrong
answer, a shuffle with an exited lane and a barrier that can never open fail the launch
with a message, and a launch over the shared-memory limit fails as on a GPU. Its test
kernels are in csrc/cuda_emulation/selftest_kernels.cu. Runs in the emulated process
(scripts/test.sh's second run); the ops' kernels are tested through the `cuda_emulated`
backend in each op's test file."""
import os

import pytest
import torch

from conftest import require_backend
from head4d import _backend

pytestmark = pytest.mark.emulated


@pytest.fixture
def selftest():
    require_backend("cuda_emulated")
    return _backend.extension().emulation_selftest


@pytest.fixture
def order(monkeypatch):
    """Sets the order in which a block's threads run between barriers (read per launch)."""
    def set_order(name, seed=0):
        monkeypatch.setenv("HEAD4D_EMULATION_ORDER", name)
        monkeypatch.setenv("HEAD4D_EMULATION_SEED", str(seed))
    return set_order


def values(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen, dtype=torch.float64).to(torch.float32)


@pytest.mark.parametrize("mode", ["forward", "reverse", "shuffle"])
def test_block_reduction_with_barrier_is_exact_in_every_order(selftest, order, mode):
    order(mode, seed=3)
    threads, blocks = 64, 8
    x = values(threads * blocks)
    got = torch.tensor(selftest("block_sum", x.tolist(), threads))
    # thread 0 adds the slots in index order: the same float32 sums as a sequential loop
    want = torch.zeros(blocks, dtype=torch.float32)
    for b in range(blocks):
        acc = torch.zeros((), dtype=torch.float32)
        for v in x[b * threads:(b + 1) * threads]:
            acc = acc + v
        want[b] = acc
    assert torch.equal(got, want)


def test_missing_barrier_gives_a_wrong_answer(selftest, order):
    # in index order thread 0 runs first and reads slots no one has written yet (the
    # emulation fills dynamic shared memory with NaN bytes before each block)
    order("forward")
    x = values(64 * 4)
    got = torch.tensor(selftest("block_sum_no_barrier", x.tolist(), 64))
    assert torch.isnan(got).all()
    # shuffled, thread 0 runs last in a block only by chance (1 in 64 per block)
    order("shuffle", seed=1)
    got = torch.tensor(selftest("block_sum_no_barrier", x.tolist(), 64))
    assert torch.isnan(got).sum() >= 3


def test_warp_shuffle_reduction(selftest, order):
    order("shuffle", seed=5)
    x = values(32 * 6, seed=2).to(torch.float64)
    got = torch.tensor(selftest("warp_sum", x.tolist(), 64), dtype=torch.float64)
    want = x.reshape(-1, 32).sum(1)
    torch.testing.assert_close(got, want, rtol=32 * 2 ** -24, atol=0)


def test_shuffle_naming_an_exited_lane_fails_the_launch(selftest):
    with pytest.raises(RuntimeError, match="has exited"):
        selftest("shuffle_after_exit", values(32).tolist(), 32)


def test_deadlock_fails_the_launch(selftest):
    with pytest.raises(RuntimeError, match="deadlock"):
        selftest("deadlock", values(64).tolist(), 64)


def test_launch_over_the_shared_memory_limit_fails(selftest):
    with pytest.raises(RuntimeError, match="dynamic shared memory"):
        selftest("too_much_shared", values(64).tolist(), 64)


def test_block_of_more_than_1024_threads_fails(selftest):
    with pytest.raises(RuntimeError, match="invalid configuration"):
        selftest("warp_sum", values(2048).tolist(), 2048)


def test_emulated_module_is_the_emulation():
    require_backend("cuda_emulated")
    ext = _backend.extension()
    assert ext.cuda_emulated() and ext.with_cuda()
    assert os.environ.get("HEAD4D_CUDA_EMULATION") == "1"
    assert _backend.unavailable_reason("cpu", torch.device("cpu")) is not None
