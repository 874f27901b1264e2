"""The Triton triplane kernels (kernels/triplanes.py) called directly, against the
reference, forward and gradients, on fresh random inputs. Without a GPU they run in
Triton's interpreter on CPU tensors (small sizes: the interpreter is slow)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import importlib.util  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

from conftest import require_triton_module  # noqa: E402

require_triton_module()

from head4d.reference.triplanes import sample_triplanes as reference  # noqa: E402


def _load_kernels():
    try:
        from head4d.kernels import triplanes
        return triplanes
    except ImportError:  # head4d not installed: head4d.kernels maps onto kernels/ only then
        path = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "triplanes.py"
        spec = importlib.util.spec_from_file_location("head4d_triton_triplanes", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


tk = _load_kernels()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYOUTS = {"portrait4d": 0, "eg3d": 1}
REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}
# Relative-norm error bounds ||out - ref|| / ||ref||.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape
    assert not torch.isnan(out).any()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def make_inputs(n, c, h, w, m, box_warp, dtype, seed, point_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randn(n, 3, c, h, w, generator=gen).to(dtype)
    pts = (torch.rand(n, m, 3, generator=gen, dtype=torch.float64) * 1.2 - 0.6) * box_warp
    if m >= 10:
        half = box_warp / 2
        pts[:, 0] = torch.tensor([half, half, half])  # on the border
        pts[:, 1] = torch.tensor([-half, -half, -half])
        pts[:, 2] = torch.tensor([half, -half, 0.0])
        pts[:, 3] = torch.tensor([5.0, -5.0, 5.0]) * box_warp  # far outside
        pts[:, 4] = torch.tensor([5.0, 0.1, -0.2]) * box_warp  # outside on some planes only
        pts[:, 5] = torch.tensor([1e6, -1e6, 0.1])
        # Texel centres, u = (2j + 1) / size - 1, where float32 holds them exactly
        # (power-of-two sizes and box_warp): elsewhere they only come near an integer
        # pixel position, where the gradient jumps and an FMA (torch's CPU grid_sample
        # uses one) may round to the other side.
        if all(x & (x - 1) == 0 for x in (w, h)) and box_warp == 2.0 ** round(math.log2(box_warp)):
            for k, j in enumerate((0, 2, w - 1)):
                pts[:, 6 + k] = torch.tensor([(2 * j + 1) / w - 1, (2 * (j % h) + 1) / h - 1,
                                              (2 * (j % h) + 1) / h - 1]) * half
    points = pts.to(point_dtype or (torch.float64 if dtype == torch.float64 else torch.float32))
    return planes.to(DEVICE), points.to(DEVICE)


def reference_with_grads(planes, points, box_warp, layout, reduce, grad_out=None):
    pl = planes.detach().clone().requires_grad_(True)
    pt = points.detach().clone().requires_grad_(True)
    out = reference(pl, pt, box_warp, layout, reduce)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(123)).to(out)
    g_planes, g_points = torch.autograd.grad(out, (pl, pt), grad_out)
    return out.detach(), grad_out, g_planes, g_points


def run_triton(planes, points, box_warp, layout, reduce, grad_out, need=(True, True)):
    scale = 2.0 / box_warp
    out = tk.forward(planes, points, scale, LAYOUTS[layout], REDUCTIONS[reduce])
    g_planes, g_points = tk.backward(grad_out.contiguous(), planes, points, scale, LAYOUTS[layout],
                                     REDUCTIONS[reduce], *need)
    return out, g_planes, g_points


def check_all(planes, points, box_warp, layout, reduce, tol):
    ref, grad_out, ref_gpl, ref_gpt = reference_with_grads(planes, points, box_warp, layout, reduce)
    out, gpl, gpt = run_triton(planes, points, box_warp, layout, reduce, grad_out)
    assert out.dtype == planes.dtype and out.is_contiguous()
    assert gpl.dtype == planes.dtype and gpl.shape == planes.shape
    assert gpt.dtype == points.dtype and gpt.shape == points.shape
    assert rel_err(out, ref) < tol, "forward"
    assert rel_err(gpl, ref_gpl) < tol, "grad planes"
    assert rel_err(gpt, ref_gpt) < tol, "grad points"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reduce", list(REDUCTIONS))
def test_float32_matches_reference(layout, reduce):
    planes, points = make_inputs(2, 8, 8, 16, 70, 1.0, torch.float32, seed=1)
    check_all(planes, points, 1.0, layout, reduce, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["mean", "none"])
def test_other_dtypes_match_reference(dtype, reduce):
    # box_warp 0.7: a scale that float32 cannot hold exactly (float64 must not round it)
    planes, points = make_inputs(2, 8, 6, 10, 50, 0.7, dtype, seed=2)
    check_all(planes, points, 0.7, "eg3d", reduce, TOLERANCE[dtype])


@pytest.mark.parametrize("channels", [1, 3, 33, 130])
def test_channel_counts(channels):
    # 130 > MAX_BLOCK_C: the channel tile loop runs more than once.
    planes, points = make_inputs(2, channels, 5, 6, 40, 1.0, torch.float32, seed=3 + channels)
    check_all(planes, points, 1.0, "portrait4d", "sum", TOLERANCE[torch.float32])


def test_block_boundaries_and_tiny_planes():
    # more points than one block, a 1 x 1 plane, H != W
    planes, points = make_inputs(2, 3, 1, 1, 150, 2.0, torch.float32, seed=5)
    check_all(planes, points, 2.0, "portrait4d", "mean", TOLERANCE[torch.float32])
    planes, points = make_inputs(1, 4, 2, 11, 150, 2.0, torch.float32, seed=6)
    check_all(planes, points, 2.0, "eg3d", "none", TOLERANCE[torch.float32])


def test_int64_indexing_path(monkeypatch):
    # The 64-bit offset variant (planes or rows of 2**31 elements) on a small input.
    monkeypatch.setattr(tk, "_needs_int64", lambda *args: True)
    planes, points = make_inputs(2, 5, 4, 8, 40, 1.0, torch.float32, seed=9)
    check_all(planes, points, 1.0, "eg3d", "none", TOLERANCE[torch.float32])
    check_all(planes, points, 1.0, "portrait4d", "mean", TOLERANCE[torch.float32])


def test_non_contiguous_and_mixed_dtype_inputs():
    planes, points = make_inputs(2, 5, 7, 8, 40, 1.0, torch.float32, seed=7)
    planes_nc = planes.permute(0, 1, 2, 4, 3).contiguous().transpose(3, 4)  # same values, odd strides
    points_nc = points.transpose(1, 2).contiguous().transpose(1, 2)
    assert not planes_nc.is_contiguous() and not points_nc.is_contiguous()
    ref, grad_out, ref_gpl, ref_gpt = reference_with_grads(planes, points, 1.0, "eg3d", "mean")
    out, gpl, gpt = run_triton(planes_nc, points_nc, 1.0, "eg3d", "mean", grad_out)
    assert rel_err(out, ref) < 1e-5 and rel_err(gpl, ref_gpl) < 1e-5 and rel_err(gpt, ref_gpt) < 1e-5
    # half-precision points with float32 planes: computed in float32, grad in float16
    points_h = points.clamp(-100, 100).to(torch.float16)  # 1e6 would be inf in float16
    ref, grad_out, ref_gpl, ref_gpt = reference_with_grads(planes, points_h, 1.0, "eg3d", "sum")
    out, gpl, gpt = run_triton(planes, points_h, 1.0, "eg3d", "sum", grad_out)
    assert gpt.dtype == torch.float16
    assert rel_err(out, ref) < 1e-5 and rel_err(gpl, ref_gpl) < 1e-5 and rel_err(gpt, ref_gpt) < 2e-3


def test_only_requested_gradients():
    planes, points = make_inputs(2, 3, 5, 5, 30, 1.0, torch.float32, seed=8)
    ref, grad_out, ref_gpl, ref_gpt = reference_with_grads(planes, points, 1.0, "portrait4d", "none")
    _, gpl, gpt = run_triton(planes, points, 1.0, "portrait4d", "none", grad_out, need=(True, False))
    assert gpt is None and rel_err(gpl, ref_gpl) < 1e-5
    _, gpl, gpt = run_triton(planes, points, 1.0, "portrait4d", "none", grad_out, need=(False, True))
    assert gpl is None and rel_err(gpt, ref_gpt) < 1e-5
    assert tk.backward(grad_out, planes, points, 2.0, 0, 2, False, False) == (None, None)


@pytest.mark.parametrize("n, m", [(2, 0), (0, 5)])
@pytest.mark.parametrize("reduce", ["mean", "none"])
def test_empty(n, m, reduce):
    planes = torch.randn(n, 3, 4, 5, 6, device=DEVICE)
    points = torch.rand(n, m, 3, device=DEVICE)
    out = tk.forward(planes, points, 2.0, 0, REDUCTIONS[reduce])
    assert out.shape == ((n, 3, m, 4) if reduce == "none" else (n, m, 4))
    gpl, gpt = tk.backward(torch.zeros_like(out), planes, points, 2.0, 0, REDUCTIONS[reduce], True, True)
    assert gpl.shape == planes.shape and gpt.shape == points.shape
    assert not gpl.any() and not gpt.any()


def test_non_finite_points_sample_nan():
    # Like csrc/triplanes/triplanes_math.h and the reference: a NaN or infinite plane
    # coordinate samples NaN on that plane; the backward sends nothing through it.
    planes = torch.randn(1, 3, 2, 4, 4, device=DEVICE)
    points = torch.tensor([[[float("nan"), 0.1, 0.2], [float("inf"), -float("inf"), float("nan")]]],
                          device=DEVICE)
    out = tk.forward(planes, points, 2.0, 0, 2)
    ref = reference(planes, points, box_warp=1.0, plane_layout="portrait4d", reduce="none")
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    # the second point is NaN on every plane; the first on planes 0 (x, y) and 2 (z, x), not on 1 (y, z)
    assert torch.isnan(out[:, :, 1]).all() and torch.isnan(out[:, 0, 0]).all() and torch.isnan(out[:, 2, 0]).all()
    torch.testing.assert_close(out[:, 1, 0], ref[:, 1, 0])
    gpl, gpt = tk.backward(torch.ones_like(out), planes, points, 2.0, 0, 2, True, True)
    assert torch.isfinite(gpl).all() and torch.isfinite(gpt).all()
    assert not gpt[:, 1].any() and gpt[0, 0, 0] == 0
