"""sample_triplanes: the reference against EG3D's formulation, every backend against
the reference on fresh random inputs (forward and gradients), edge cases, errors."""
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import head4d
from head4d import _backend
from head4d.reference import sample_triplanes as reference_sample

from conftest import CUDA_EMULATED, require_backend

# Relative-norm error bounds ||out - ref|| / ||ref|| per dtype (METHOD.md).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), "NaN in output"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def make_points(n, m, box_warp, *, generator, device, special=True, dtype=torch.float32, W=16, H=16):
    """Points mostly in the cube, some just outside, some far outside, plus (when
    ``special``) points exactly on the cube's border and on texel centres."""
    pts = (torch.rand(n, m, 3, generator=generator) * 1.3 - 0.65) * box_warp
    if special and m >= 12:
        half = box_warp / 2
        pts[:, 0] = torch.tensor([half, half, half])
        pts[:, 1] = torch.tensor([-half, -half, -half])
        pts[:, 2] = torch.tensor([half, -half, 0.0])
        pts[:, 3] = torch.tensor([5.0, -7.0, 3.0]) * box_warp
        pts[:, 4] = torch.tensor([1e6, -1e6, 0.1])
        # texel centres: u = (2j + 1) / W - 1 on every axis
        for k, j in enumerate((0, 3, W - 1)):
            u = (2 * j + 1) / W - 1
            pts[:, 5 + k] = torch.tensor([u, (2 * (j % H) + 1) / H - 1, u]) * half
    return pts.to(device=device, dtype=dtype)


def make_planes(n, c, h, w, *, generator, device, dtype):
    return torch.randn(n, 3, c, h, w, generator=generator).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------
# The reference itself, against EG3D's own formulation (projection matrices).
# ----------------------------------------------------------------------------------

def _eg3d_style(planes, points, box_warp, matrices):
    """EG3D's sample_from_planes restated: project with inverse axis matrices, grid_sample, mean."""
    n, _, c, h, w = planes.shape
    m = points.shape[1]
    inv = torch.linalg.inv(matrices)  # [3, 3, 3]
    coords = (2 / box_warp) * points
    proj = torch.stack([(coords @ inv[k])[..., :2] for k in range(3)], dim=1)  # [N, 3, M, 2]
    out = F.grid_sample(planes.reshape(n * 3, c, h, w), proj.reshape(n * 3, 1, m, 2), mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.permute(0, 3, 2, 1).reshape(n, 3, m, c)


EG3D_MATRICES = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                              [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
                              [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], dtype=torch.float64)
# Portrait4D's fixed planes: (x, y), (y, z), (z, x).
PORTRAIT4D_MATRICES = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                                    [[0, 1, 0], [0, 0, 1], [1, 0, 0]],
                                    [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], dtype=torch.float64)


@pytest.mark.parametrize("layout,matrices", [("eg3d", EG3D_MATRICES), ("portrait4d", PORTRAIT4D_MATRICES)])
def test_reference_matches_projection_matrices(layout, matrices):
    g = torch.Generator().manual_seed(1)
    planes = make_planes(2, 4, 9, 7, generator=g, device="cpu", dtype=torch.float64)
    points = make_points(2, 64, 1.3, generator=g, device="cpu", dtype=torch.float64)
    expected = _eg3d_style(planes, points, 1.3, matrices)
    assert torch.allclose(reference_sample(planes, points, 1.3, layout, "none"), expected, atol=1e-12)
    assert torch.allclose(reference_sample(planes, points, 1.3, layout, "mean"), expected.mean(1), atol=1e-12)
    assert torch.allclose(reference_sample(planes, points, 1.3, layout, "sum"), expected.sum(1), atol=1e-12)


def test_layouts_differ_only_in_plane_one():
    g = torch.Generator().manual_seed(2)
    planes = make_planes(1, 3, 8, 8, generator=g, device="cpu", dtype=torch.float64)
    points = make_points(1, 40, 1.0, generator=g, device="cpu", dtype=torch.float64, special=False)
    a = reference_sample(planes, points, 1.0, "eg3d", "none")
    b = reference_sample(planes, points, 1.0, "portrait4d", "none")
    assert torch.equal(a[:, 0], b[:, 0]) and torch.equal(a[:, 2], b[:, 2])
    assert not torch.allclose(a[:, 1], b[:, 1])


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu), CUDA_EMULATED])
def test_hand_computed_values(backend):
    """Texel centres give texel values; the cube's border (u = +-1) is half a texel
    from the edge texel centre, so zero padding halves it."""
    device = require_backend(backend) if backend != "torch" else torch.device("cpu")
    planes = torch.zeros(1, 3, 1, 4, 4, dtype=torch.float64)
    planes[0, 0, 0] = torch.arange(16, dtype=torch.float64).reshape(4, 4)  # plane XY: row = y, col = x
    planes = planes.to(device)
    # x at texel column 2 (u = (2*2+1)/4 - 1 = 0.25), y at row 1 (v = -0.25); box_warp 2 -> scale 1.
    pts = torch.tensor([[[0.25, -0.25, 0.0], [-1.0, -0.75, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64,
                       device=device)
    out = head4d.sample_triplanes(planes, pts, box_warp=2.0, reduce="none", backend=backend).cpu()
    assert out[0, 0, 0, 0].item() == pytest.approx(6.0)  # row 1, column 2
    # u = -1 -> ix = -0.5: half of column 0; v = -0.75 -> row 0 exactly: texel (0, 0) = 0
    assert out[0, 0, 1, 0].item() == pytest.approx(0.0)
    # centre of the plane: the mean of the four central texels 5, 6, 9, 10
    assert out[0, 0, 2, 0].item() == pytest.approx(7.5)
    planes2 = planes.clone()
    planes2[0, 0, 0] = 1.0
    out2 = head4d.sample_triplanes(planes2, pts[:, 1:2], box_warp=2.0, reduce="none", backend=backend).cpu()
    assert out2[0, 0, 0, 0].item() == pytest.approx(0.5)  # zero padding outside column 0


# ----------------------------------------------------------------------------------
# Fast backends against the reference.
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["portrait4d", "eg3d"])
@pytest.mark.parametrize("reduce", ["mean", "sum", "none"])
def test_forward_matches_reference(fast_backend, dtype, layout, reduce):
    backend, device = fast_backend
    g = torch.Generator().manual_seed(hash((str(dtype), layout, reduce)) % 2**31)
    planes = make_planes(2, 8, 16, 12, generator=g, device=device, dtype=dtype)
    points = make_points(2, 96, 1.3, generator=g, device=device, W=12, H=16)
    out = head4d.sample_triplanes(planes, points, box_warp=1.3, plane_layout=layout, reduce=reduce,
                                  backend=backend)
    ref = reference_sample(planes, points, 1.3, layout, reduce)
    assert out.shape == ref.shape and out.dtype == dtype and out.device == planes.device
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("channels", [1, 3, 5, 33])
def test_odd_channel_counts(fast_backend, channels):
    backend, device = fast_backend
    g = torch.Generator().manual_seed(channels)
    planes = make_planes(1, channels, 6, 10, generator=g, device=device, dtype=torch.float32)
    points = make_points(1, 40, 1.0, generator=g, device=device, W=10, H=6)
    for reduce in ("mean", "none"):
        out = head4d.sample_triplanes(planes, points, reduce=reduce, backend=backend)
        assert rel_err(out, reference_sample(planes, points, 1.0, "portrait4d", reduce)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["portrait4d", "eg3d"])
def test_gradients_match_reference(fast_backend, dtype, reduce, layout):
    backend, device = fast_backend
    g = torch.Generator().manual_seed(7 + len(reduce))
    planes = make_planes(2, 8, 10, 14, generator=g, device=device, dtype=dtype).requires_grad_(True)
    # generic points (no exact texel centres, where bilinear's point gradient jumps)
    points = make_points(2, 80, 1.3, generator=g, device=device, special=False).requires_grad_(True)
    out = head4d.sample_triplanes(planes, points, box_warp=1.3, plane_layout=layout, reduce=reduce,
                                  backend=backend)
    ref = reference_sample(planes, points, 1.3, layout, reduce)
    grad_out = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
    gp, gx = torch.autograd.grad(out, (planes, points), grad_out)
    rp, rx = torch.autograd.grad(ref, (planes, points), grad_out)
    assert gp.dtype == dtype and gx.dtype == points.dtype
    assert rel_err(gp, rp) < TOLERANCE[dtype]
    # point gradients sum products of half-precision texels: compare at float32's bound
    # for float32, and at the storage precision otherwise
    assert rel_err(gx, rx) < max(TOLERANCE[dtype], 1e-5)


def test_gradients_special_points(fast_backend):
    """Border, far-outside and texel-centre points: plane gradients agree exactly
    in float64, and far-outside points get zero gradient."""
    backend, device = fast_backend
    g = torch.Generator().manual_seed(11)
    planes = make_planes(1, 4, 12, 12, generator=g, device=device, dtype=torch.float64).requires_grad_(True)
    points = make_points(1, 16, 1.0, generator=g, device=device, dtype=torch.float64, W=12, H=12)
    points.requires_grad_(True)
    out = head4d.sample_triplanes(planes, points, backend=backend)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
    gp, gx = torch.autograd.grad(out, (planes, points), grad_out)
    rp, _ = torch.autograd.grad(reference_sample(planes, points, 1.0, "portrait4d", "mean"), (planes, points),
                                grad_out)
    assert rel_err(gp, rp) < 1e-12
    assert torch.all(gx[0, 3:5] == 0)  # far outside


def test_gradcheck_float64(fast_backend):
    backend, device = fast_backend
    g = torch.Generator().manual_seed(5)
    planes = make_planes(1, 3, 5, 6, generator=g, device=device, dtype=torch.float64).requires_grad_(True)
    points = make_points(1, 12, 1.0, generator=g, device=device, dtype=torch.float64, special=False)
    points.requires_grad_(True)
    for reduce in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda p, x: head4d.sample_triplanes(p, x, reduce=reduce, backend=backend), (planes, points),
            eps=1e-6, atol=1e-6)


def test_only_needed_gradients(fast_backend):
    backend, device = fast_backend
    g = torch.Generator().manual_seed(3)
    planes = make_planes(1, 4, 8, 8, generator=g, device=device, dtype=torch.float32)
    points = make_points(1, 20, 1.0, generator=g, device=device, special=False)
    p1 = planes.clone().requires_grad_(True)
    (gp,) = torch.autograd.grad(head4d.sample_triplanes(p1, points, backend=backend).sum(), p1)
    (rp,) = torch.autograd.grad(reference_sample(p1, points).sum(), p1)
    assert rel_err(gp, rp) < 1e-5
    x1 = points.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(head4d.sample_triplanes(planes, x1, backend=backend).sum(), x1)
    (rx,) = torch.autograd.grad(reference_sample(planes, x1).sum(), x1)
    assert rel_err(gx, rx) < 1e-5


def test_empty_and_batched(fast_backend):
    backend, device = fast_backend
    g = torch.Generator().manual_seed(9)
    planes = make_planes(3, 4, 8, 8, generator=g, device=device, dtype=torch.float32).requires_grad_(True)
    empty = torch.zeros(3, 0, 3, device=device, requires_grad=True)
    out = head4d.sample_triplanes(planes, empty, backend=backend)
    assert out.shape == (3, 0, 4)
    out.sum().backward()
    assert planes.grad is not None and torch.all(planes.grad == 0)
    assert head4d.sample_triplanes(planes, empty, reduce="none", backend=backend).shape == (3, 3, 0, 4)
    # N > 1: each batch element samples its own planes
    points = make_points(3, 30, 1.0, generator=g, device=device)
    out = head4d.sample_triplanes(planes, points, backend=backend)
    for b in range(3):
        single = head4d.sample_triplanes(planes[b:b + 1], points[b:b + 1], backend=backend)
        assert torch.allclose(out[b:b + 1], single, atol=1e-6)


def test_non_contiguous_inputs(fast_backend):
    backend, device = fast_backend
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 3, 10, 12, 6, generator=g).to(device)
    planes = base.permute(0, 1, 4, 2, 3)  # [2, 3, 6, 10, 12], channels innermost in memory
    wide = make_points(2, 50, 1.0, generator=g, device=device).repeat(1, 1, 2)
    points = wide[..., ::2]  # strided view
    planes_sliced = torch.randn(2, 3, 8, 10, 24, generator=g).to(device)[..., ::2]  # W stride 2
    for p in (planes, planes_sliced):
        assert not p.is_contiguous() and not points.is_contiguous()
        out = head4d.sample_triplanes(p, points, backend=backend)
        assert rel_err(out, reference_sample(p.contiguous(), points.contiguous())) < 1e-5


def test_mixed_point_dtype(fast_backend):
    """bfloat16 planes with float32 points (coordinates keep their precision)."""
    backend, device = fast_backend
    g = torch.Generator().manual_seed(6)
    planes = make_planes(1, 8, 8, 8, generator=g, device=device, dtype=torch.bfloat16)
    points = make_points(1, 30, 1.0, generator=g, device=device, dtype=torch.float64).requires_grad_(True)
    out = head4d.sample_triplanes(planes, points, backend=backend)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference_sample(planes, points)) < 1e-2
    (gx,) = torch.autograd.grad(out.float().sum(), points)
    assert gx.dtype == torch.float64


# ----------------------------------------------------------------------------------
# Errors, backend selection, import behaviour.
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("planes_shape,points_shape,match", [
    ((3, 4, 8, 8), (1, 5, 3), "planes must have shape \\[N, 3, C, H, W\\]"),
    ((1, 2, 4, 8, 8), (1, 5, 3), "size 3 in dimension 1"),
    ((1, 3, 4, 8, 8), (1, 5), "points must have shape \\[N, M, 3\\]"),
    ((1, 3, 4, 8, 8), (1, 5, 2), "size 3 in dimension 2"),
    ((2, 3, 4, 8, 8), (3, 5, 3), "batch size 3"),
    ((1, 3, 4, 0, 8), (1, 5, 3), "C, H, W >= 1"),
])
def test_shape_errors(planes_shape, points_shape, match):
    with pytest.raises(ValueError, match=match):
        head4d.sample_triplanes(torch.zeros(planes_shape), torch.zeros(points_shape))


def test_type_and_value_errors():
    planes, points = torch.zeros(1, 3, 4, 8, 8), torch.zeros(1, 5, 3)
    with pytest.raises(TypeError, match="planes must have a dtype in"):
        head4d.sample_triplanes(planes.long(), points)
    with pytest.raises(TypeError, match="points must have a dtype in"):
        head4d.sample_triplanes(planes, points.int())
    with pytest.raises(TypeError, match="planes must be a torch.Tensor"):
        head4d.sample_triplanes(planes.numpy(), points)
    with pytest.raises(ValueError, match="points is on meta but planes is on cpu"):
        head4d.sample_triplanes(planes, points.to("meta"))
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="box_warp must be finite and positive"):
            head4d.sample_triplanes(planes, points, box_warp=bad)
    with pytest.raises(TypeError, match="box_warp must be a real number"):
        head4d.sample_triplanes(planes, points, box_warp="1.0")
    with pytest.raises(ValueError, match="plane_layout must be one of"):
        head4d.sample_triplanes(planes, points, plane_layout="xy")
    with pytest.raises(ValueError, match="reduce must be one of"):
        head4d.sample_triplanes(planes, points, reduce="max")
    with pytest.raises(ValueError, match="backend= must be one of"):
        head4d.sample_triplanes(planes, points, backend="opencl")
    with pytest.raises(RuntimeError, match="backend 'cuda' .* cannot run"):
        head4d.sample_triplanes(planes, points, backend="cuda")


def test_backend_environment_overrides(monkeypatch):
    cpu = torch.device("cpu")
    prefs = head4d.ops.triplanes.PREFERENCES
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_SAMPLE_TRIPLANES", raising=False)
    expected_default = "cpu" if _backend.extension() is not None else "torch"
    assert _backend.resolve("sample_triplanes", cpu, None, prefs) == expected_default
    monkeypatch.setenv("HEAD4D_BACKEND", "torch")
    assert _backend.resolve("sample_triplanes", cpu, None, prefs) == "torch"
    monkeypatch.setenv("HEAD4D_BACKEND_SAMPLE_TRIPLANES", "auto")
    assert _backend.resolve("sample_triplanes", cpu, None, prefs) == "torch"
    monkeypatch.setenv("HEAD4D_BACKEND_SAMPLE_TRIPLANES", "bogus")
    with pytest.raises(ValueError, match="HEAD4D_BACKEND_SAMPLE_TRIPLANES must be one of"):
        _backend.resolve("sample_triplanes", cpu, None, prefs)
    # the argument wins over the environment
    assert _backend.resolve("sample_triplanes", cpu, "torch", prefs) == "torch"


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_SAMPLE_TRIPLANES", raising=False)
    monkeypatch.setattr(_backend, "_load_extension", lambda: (None, ImportError("no _C here")))
    monkeypatch.setattr(_backend, "_warned", set())
    planes, points = torch.randn(1, 3, 4, 8, 8), torch.rand(1, 10, 3) - 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = head4d.sample_triplanes(planes, points)
        out2 = head4d.sample_triplanes(planes, points)
    messages = [str(w.message) for w in caught if "head4d._C" in str(w.message)]
    assert len(messages) == 1 and "pip install --no-build-isolation -e ." in messages[0]
    assert torch.equal(out1, reference_sample(planes, points)) and torch.equal(out1, out2)
    with pytest.raises(RuntimeError, match="not built"):
        head4d.sample_triplanes(planes, points, backend="cpu")


def test_import_compiles_nothing():
    code = ("import sys, head4d; "
            "bad = [m for m in ('torch.utils.cpp_extension', 'triton', 'head4d._C') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_default_backend_on_cpu_is_compiled(monkeypatch):
    """With the extension built, CPU tensors default to the C++ kernels."""
    require_backend("cpu")
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    monkeypatch.delenv("HEAD4D_BACKEND_SAMPLE_TRIPLANES", raising=False)
    assert _backend.resolve("sample_triplanes", torch.device("cpu"), None,
                            head4d.ops.triplanes.PREFERENCES) == "cpu"
    planes, points = torch.randn(1, 3, 2, 4, 4, dtype=torch.float64), torch.rand(1, 7, 3, dtype=torch.float64) - 0.5
    out = head4d.sample_triplanes(planes, points)
    torch.testing.assert_close(out, reference_sample(planes, points), rtol=0, atol=1e-12)
