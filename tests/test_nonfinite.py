"""Non-finite input: every compiled backend of every op against its reference when a
floating input holds a few NaN, +inf or -inf entries.

A backend must give what the reference gives: the NaN positions of each output
exactly (``torch.isnan`` masks equal), the same infinities, and the finite values to
the usual tolerance. (An op that chose to reject non-finite input instead would raise
``ValueError`` on every backend, the reference included; none does so far.) Inputs are
small and fresh per case; the non-finite entries go to a few seeded positions, one of
them the first entry so that an edge (first sample, first vertex, first key) is hit.
"""
import importlib.util
import math
import pathlib
import sys

import pytest
import torch

import head4d
from head4d.ops import (attention, closest_triangles, composite_rays, decode_triplanes, mesh_one_ring,
                        one_ring_deform, sample_grid3d, sample_importance, sample_triplanes,
                        surface_field_grid)

from conftest import CUDA_EMULATED, require_backend



def _map_triton_kernels():
    """``head4d.kernels`` is ``kernels/`` of the repository once head4d is installed;
    when the tests run from a source tree that is not installed, map it here so that
    the ops' ``triton`` backend imports the kernels of this tree."""
    if importlib.util.find_spec("head4d.kernels") is None:
        root = pathlib.Path(__file__).resolve().parents[1] / "kernels"
        spec = importlib.util.spec_from_file_location("head4d.kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["head4d.kernels"] = module
        spec.loader.exec_module(module)
        setattr(head4d, "kernels", module)


_map_triton_kernels()

# NaN arithmetic in the Triton interpreter's NumPy is expected here
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

F32 = torch.float32
VALUES = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}
CPU_CUDA = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu), CUDA_EMULATED]
CPU_TRITON_CUDA = ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu), CUDA_EMULATED]


def _rand(shape, g, lo=-1.0, hi=1.0):
    return torch.rand(shape, generator=g, dtype=torch.float64).mul(hi - lo).add(lo).to(F32)


def _octahedron(g, n=1, scale=0.4):
    """A closed 6-vertex, 8-face mesh, jittered: ``(verts [n, 6, 3], faces [8, 3])``."""
    base = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=F32)
    faces = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    verts = base * scale + 0.05 * _rand((n, 6, 3), g)
    return verts, faces


# Each case: (make(g) -> dict of inputs, run(inputs, backend) -> tuple of outputs,
# names of the floating inputs to poison, backends).

def _triplanes_inputs(g):
    return {"planes": _rand((1, 3, 4, 6, 5), g), "points": _rand((1, 24, 3), g, -0.6, 0.6)}


def _decode_inputs(g):
    x = {"planes": _rand((1, 3, 16, 6, 5), g), "points": _rand((1, 24, 3), g, -0.6, 0.6)}
    x.update(weight1=_rand((16, 16), g), bias1=_rand((16,), g), weight2=_rand((5, 16), g), bias2=_rand((5,), g))
    return x


def _composite_inputs(g):
    depths = torch.sort(_rand((2, 5, 7, 1), g, 1.5, 3.5), dim=2)[0]
    return {"colors": _rand((2, 5, 7, 3), g), "densities": _rand((2, 5, 7, 1), g, -3, 3) * 3, "depths": depths,
            "background": _rand((2, 5, 3), g)}


def _importance_inputs(g):
    depths = torch.sort(_rand((2, 4, 9, 1), g, 1.5, 3.5), dim=2)[0]
    return {"depths": depths, "weights": _rand((2, 4, 8, 1), g, 0, 1)}


def _grid3d_inputs(g):
    return {"grid": _rand((1, 3, 4, 5, 6), g), "points": _rand((1, 24, 3), g, -1.2, 1.2)}


def _onering_inputs(g):
    verts_obs, faces = _octahedron(g)
    return {"points": _rand((1, 20, 3), g, -0.6, 0.6), "verts_obs": verts_obs,
            "verts_canon": verts_obs + 0.05 * _rand(verts_obs.shape, g), "faces": faces}


def _closest_inputs(g):
    verts, faces = _octahedron(g)
    return {"points": _rand((1, 20, 3), g, -0.7, 0.7), "verts": verts, "faces": faces}


def _surface_inputs(g):
    verts_obs, faces = _octahedron(g)
    return {"verts_obs": verts_obs, "verts_canon": verts_obs + 0.05 * _rand(verts_obs.shape, g), "faces": faces}


def _attention_inputs(g):
    return {"q": _rand((1, 2, 5, 32), g), "k": _rand((1, 2, 7, 32), g), "v": _rand((1, 2, 7, 32), g)}


CASES = {
    "sample_triplanes": (
        _triplanes_inputs,
        lambda x, b: (sample_triplanes(x["planes"], x["points"], box_warp=1.0, reduce="none", backend=b),),
        ("planes", "points"), CPU_TRITON_CUDA),
    "decode_triplanes": (
        _decode_inputs,
        lambda x, b: decode_triplanes(x["planes"], x["points"], x["weight1"], x["bias1"], x["weight2"],
                                      x["bias2"], box_warp=1.0, backend=b),
        ("planes", "points", "weight1", "bias1", "weight2", "bias2"), CPU_TRITON_CUDA),
    "composite_rays": (
        _composite_inputs,
        lambda x, b: composite_rays(x["colors"], x["densities"], x["depths"], background=x["background"],
                                    backend=b),
        ("colors", "densities", "depths", "background"), CPU_CUDA),
    "sample_importance": (
        _importance_inputs,
        lambda x, b: (sample_importance(x["depths"], x["weights"], 6, det=True, backend=b),
                      sample_importance(x["depths"], x["weights"], 6, generator=torch.Generator().manual_seed(3),
                                        backend=b)),
        ("depths", "weights"), CPU_CUDA),
    "sample_grid3d": (
        _grid3d_inputs,
        lambda x, b: (sample_grid3d(x["grid"], x["points"], bound=1.0, backend=b),
                      sample_grid3d(x["grid"], x["points"], bound=1.0, padding="border", backend=b)),
        ("grid", "points"), CPU_CUDA),
    "one_ring_deform": (
        _onering_inputs,
        lambda x, b: (one_ring_deform(x["points"], x["verts_obs"], x["verts_canon"],
                                      mesh_one_ring(x["faces"], x["verts_obs"].shape[1]), backend=b),),
        ("points", "verts_obs", "verts_canon"), CPU_CUDA),
    "closest_triangles": (
        _closest_inputs,
        lambda x, b: closest_triangles(x["points"], x["verts"], x["faces"], backend=b),
        ("points", "verts"), CPU_CUDA),
    "surface_field_grid": (
        _surface_inputs,
        lambda x, b: surface_field_grid(x["verts_obs"], x["verts_canon"], x["faces"], resolution=4, backend=b),
        ("verts_obs", "verts_canon"), CPU_CUDA),
    "attention": (
        _attention_inputs,
        lambda x, b: (attention(x["q"], x["k"], x["v"], backend=b),),
        ("q", "k", "v"), ["triton"]),
}


def _params():
    for op, (_, _, inputs, backends) in CASES.items():
        for backend in backends:
            marks = ()
            if not isinstance(backend, str):
                backend, marks = backend.values[0], backend.marks
            # float64 runs other template instances of the C++ / CUDA kernels (Triton's
            # float64 paths are covered by their own tests; attention has none)
            dtypes = (torch.float32,) if backend == "triton" else (torch.float32, torch.float64)
            for dtype in dtypes:
                for name in inputs:
                    for value in VALUES:
                        yield pytest.param(op, backend, dtype, name, value, marks=marks,
                                           id=f"{op}-{backend}-{str(dtype)[6:]}-{name}-{value}")


def _poison(t: torch.Tensor, value: float, g: torch.Generator) -> torch.Tensor:
    """``t`` with ``value`` at its first entry and at two more seeded entries."""
    flat = t.clone().reshape(-1)
    idx = torch.randperm(flat.numel(), generator=g)[:2]
    flat[0] = value
    flat[idx] = value
    return flat.reshape(t.shape)


TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-12, rtol=1e-10)}


def _compare(got, ref, what):
    if ref.is_floating_point():
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), \
            f"{what}: NaN at {torch.isnan(got).sum()} entries, the reference at {torch.isnan(ref).sum()}"
        torch.testing.assert_close(got, ref, **TOL[ref.dtype], equal_nan=True, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(got, ref), what


@pytest.mark.parametrize("op, backend, dtype, name, value", list(_params()))
def test_nonfinite_input_matches_reference(op, backend, dtype, name, value):
    device = require_backend(backend)
    make, run, _, _ = CASES[op]
    g = torch.Generator().manual_seed(sum(map(ord, f"{op}{name}{value}")))
    inputs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in make(g).items()}
    inputs[name] = _poison(inputs[name], VALUES[value], g)
    ref_error = got_error = None
    try:
        ref = run(inputs, "torch")
    except ValueError as exc:
        ref_error = exc
    try:
        got = run(inputs, backend)
    except ValueError as exc:
        got_error = exc
    assert (ref_error is None) == (got_error is None), \
        f"reference raised {ref_error!r}, {backend} raised {got_error!r}"
    if ref_error is not None:
        return
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"output {i}"
        _compare(a.cpu(), b.cpu(), f"output {i}")
