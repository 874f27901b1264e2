"""Backend selection (head4d/_backend.py): what each op declares (its backends, its
preference order, its per-backend support predicates) and how the default and a
forced backend use it, on a throwaway op and on every declared op; and `head4d info`."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import head4d  # noqa: F401  (declares every op)
from head4d import _backend

CPU = torch.device("cpu")
OP = "test_only_op"


def _no_odd_sizes(x):
    """The throwaway op's predicate for 'cpu': even sizes only."""
    return None if x.shape[-1] % 2 == 0 else f"last dim {x.shape[-1]} is odd"


@pytest.fixture
def throwaway_op(monkeypatch):
    """An op with backends cpu (even last dims only) and torch, preferring cpu on the CPU."""
    for name in ("HEAD4D_BACKEND", "HEAD4D_BACKEND_" + OP.upper()):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_backend, "DECLARED", dict(_backend.DECLARED))
    monkeypatch.setattr(_backend, "unavailable_reason",
                        lambda backend, device: None if backend in ("cpu", "torch", "sdpa") else "not here")
    return _backend.declare(OP, ("cpu", "torch"), {"cpu": ("cpu", "torch")}, {"cpu": _no_odd_sizes})


def test_default_skips_a_backend_whose_predicate_gives_a_reason(throwaway_op):
    assert _backend.resolve(OP, CPU, None, inputs=(torch.zeros(3, 4),)) == "cpu"
    assert _backend.resolve(OP, CPU, None, inputs=(torch.zeros(3, 5),)) == "torch"
    assert _backend.resolve(OP, CPU, "auto", inputs=(torch.zeros(3, 5),)) == "torch"
    assert _backend.resolve(OP, CPU, None) == "cpu"  # no inputs: no predicate asked


def test_forced_backend_raises_the_predicates_reason(throwaway_op, monkeypatch):
    odd = (torch.zeros(3, 5),)
    with pytest.raises(RuntimeError, match=r"test_only_op: backend 'cpu' \(from backend=\) does not support "
                                           r"these inputs: last dim 5 is odd"):
        _backend.resolve(OP, CPU, "cpu", inputs=odd)
    for variable in ("HEAD4D_BACKEND_" + OP.upper(), "HEAD4D_BACKEND"):
        monkeypatch.setenv(variable, "cpu")
        with pytest.raises(RuntimeError, match=f"from {variable}\\) does not support these inputs"):
            _backend.resolve(OP, CPU, None, inputs=odd)
        assert _backend.resolve(OP, CPU, "torch", inputs=odd) == "torch"  # the argument wins
        monkeypatch.delenv(variable)


def test_backends_the_op_lacks(throwaway_op, monkeypatch):
    with pytest.raises(RuntimeError, match="'triton' \\(from backend=\\) is not implemented for this op"):
        _backend.resolve(OP, CPU, "triton")
    with pytest.raises(ValueError, match="backend= must be one of"):
        _backend.resolve(OP, CPU, "opencl")
    monkeypatch.setenv("HEAD4D_BACKEND_" + OP.upper(), "sdpa")
    with pytest.raises(RuntimeError, match="not implemented for this op"):
        _backend.resolve(OP, CPU, None)
    monkeypatch.delenv("HEAD4D_BACKEND_" + OP.upper())
    for name in ("sdpa", "triton"):  # process-wide: an op without it keeps its default
        monkeypatch.setenv("HEAD4D_BACKEND", name)
        assert _backend.resolve(OP, CPU, None, inputs=(torch.zeros(2),)) == "cpu"


def test_backend_scope(throwaway_op, monkeypatch):
    """A scope forces its backend on every call without backend=, ahead of the variables;
    an op lacking it keeps its default; scopes nest and end."""
    monkeypatch.setenv("HEAD4D_BACKEND_" + OP.upper(), "cpu")
    with _backend.backend_scope("torch"):
        assert _backend.resolve(OP, CPU, None) == "torch"
        assert _backend.resolve(OP, CPU, "cpu") == "cpu"  # the argument wins
        with _backend.backend_scope("triton"):  # this op lacks it: its default
            assert _backend.resolve(OP, CPU, None) == "cpu"
        with _backend.backend_scope(None):  # None leaves the choice as it is (the outer scope)
            assert _backend.resolve(OP, CPU, None) == "torch"
        assert _backend.resolve(OP, CPU, None) == "torch"
    assert _backend.resolve(OP, CPU, None) == "cpu"
    with pytest.raises(ValueError, match="backend_scope: backend must be None, 'auto' or one of"):
        with _backend.backend_scope("opencl"):
            pass


def test_declare_rejects_inconsistent_declarations(throwaway_op):
    with pytest.raises(ValueError, match="implemented must hold 'torch'"):
        _backend.declare("x", ("cpu",), {})
    with pytest.raises(ValueError, match="implemented must hold 'torch'"):
        _backend.declare("x", ("opencl", "torch"), {})
    with pytest.raises(ValueError, match="support predicates for backends the op lacks"):
        _backend.declare("x", ("torch",), {}, {"cpu": _no_odd_sizes})


def test_every_op_is_declared_consistently():
    expected = {"sample_triplanes", "decode_triplanes", "composite_rays", "sample_importance",
                "stratified_depths", "merge_samples", "generate_rays", "ray_box_limits",
                "auto_plane_limits", "sample_grid3d", "one_ring_deform", "closest_triangles",
                "surface_field_grid", "smooth_grid3d", "mesh_one_ring", "attention"}
    assert expected <= set(_backend.DECLARED)
    for op, entry in _backend.DECLARED.items():
        for device_type, order in entry.preferences.items():
            assert order[-1] == "torch", (op, device_type, order)  # the default always ends somewhere
    assert "sdpa" in _backend.DECLARED["attention"].implemented
    assert set(_backend.DECLARED["decode_triplanes"].support) == {"triton"}


def test_info_lists_every_op_with_its_backends_peers_included():
    out = subprocess.run([sys.executable, "-m", "head4d.cli", "info"], capture_output=True, text=True,
                         check=True).stdout
    lines = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()
             if line.startswith("    ") and line.split()}
    for op in _backend.DECLARED:
        if op == OP:
            continue
        assert op in lines, (op, out)
        listed = [b.strip() for b in lines[op].split(",")]
        assert set(listed) == set(_backend.available_for(op, CPU)), (op, listed)
    assert "sdpa" in lines["attention"]
    assert "  sdpa    available" in out


def test_gpu_tests_fail_without_cuda_under_require_gpu():
    """HEAD4D_REQUIRE_GPU=1 (benchmarks/run_gpu.sh): a `gpu`-marked test fails when torch
    sees no CUDA device, instead of skipping; without it, it skips."""
    root = pathlib.Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
               "tests/test_importance_kernels.py::test_cuda_bit_exact_with_cpu[False-4-dtype0]"]
    env = dict(os.environ, HEAD4D_REQUIRE_GPU="1")
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    if torch.cuda.is_available():
        assert run.returncode == 0, run.stdout[-2000:]
        return
    assert run.returncode == 1 and "HEAD4D_REQUIRE_GPU=1 but no CUDA device" in run.stdout, run.stdout[-2000:]
    env.pop("HEAD4D_REQUIRE_GPU")
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "needs a CUDA device" in run.stdout, run.stdout[-2000:]


def test_committed_measured_order_goes_first(monkeypatch):
    """An order measured by a benchmark run (head4d/backend_order.json, read when the op
    is declared) comes before the op's built-in order; backends it does not name follow."""
    import head4d.ops.decoding as decoding_op
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_DECODE_TRIPLANES", raising=False)
    cpu = torch.device("cpu")
    builtin = _backend.resolve(decoding_op.OP, cpu, None)
    monkeypatch.setitem(_backend.MEASURED_ORDERS, decoding_op.OP, {"cpu": ("torch",)})
    assert _backend.resolve(decoding_op.OP, cpu, None) == "torch"
    monkeypatch.setitem(_backend.MEASURED_ORDERS, decoding_op.OP, {"cuda": ("triton",)})
    assert _backend.resolve(decoding_op.OP, cpu, None) == builtin
