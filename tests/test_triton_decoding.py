"""The Triton fused triplane-decode kernels (kernels/decoding.py) called directly, against
the reference (head4d.reference.decoding: sample_triplanes, then EG3D's decoder MLP in
float32), forward and the gradients of all six inputs, on fresh random inputs. Without a
GPU they run in Triton's interpreter on CPU tensors (small sizes: the interpreter is slow)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

from conftest import require_triton_module  # noqa: E402

require_triton_module()

from head4d.reference.decoding import decode_triplanes as reference  # noqa: E402


def _load_kernels():
    try:
        from head4d.kernels import decoding
        return decoding
    except ImportError:  # head4d not installed: head4d.kernels maps onto kernels/ only then
        path = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "decoding.py"
        spec = importlib.util.spec_from_file_location("head4d_triton_decoding", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


dk = _load_kernels()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYOUTS = {"portrait4d": 0, "eg3d": 1}
NAMES = ("planes", "points", "w1", "b1", "w2", "b2")
# Relative-norm error bounds ||out - ref|| / ||ref|| (those of tests/test_decoding.py).
# Half precision: the reference computes in float32 and rounds the outputs (and the
# gradients) once; the kernels' half-precision products split their operands (HALF_SPLIT)
# to match. Triton's interpreter truncates float32 to bfloat16 instead of rounding it,
# which about doubles bfloat16's output error here (the GPU rounds to nearest).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def make_inputs(n, c, h, w, m, box_warp, hidden, out, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randn(n, 3, c, h, w, generator=gen).to(dtype)
    pts = (torch.rand(n, m, 3, generator=gen, dtype=torch.float64) * 1.2 - 0.6) * box_warp
    half = box_warp / 2
    special = [[half, half, half], [-half, -half, -half], [half, -half, 0.0],  # on the border
               [5.0 * box_warp, -5.0 * box_warp, 5.0 * box_warp],  # far outside
               [5.0 * box_warp, 0.1, -0.2],  # outside on some planes only
               [1e6, -1e6, 0.1]]
    k = min(m, len(special))
    pts[:, :k] = torch.tensor(special[:k], dtype=torch.float64)
    w1 = torch.randn(hidden, c, generator=gen) * (2.0 / c ** 0.5)
    b1 = torch.randn(hidden, generator=gen) * 0.5
    # Hidden units on both sides of softplus' threshold (20), and deep in its flat tail.
    b1[0], b1[1] = 30.0, -30.0
    w2 = torch.randn(out, hidden, generator=gen) / hidden ** 0.5
    b2 = torch.randn(out, generator=gen) * 0.5
    params = [x.to(DEVICE, dtype) for x in (w1, b1, w2, b2)]
    return planes.to(DEVICE), pts.to(torch.float32).to(DEVICE), params


def reference_grads(inputs, box_warp, layout, grad_rgb, grad_sigma, needs=(True,) * 6):
    leaves = [x.detach().clone().requires_grad_(need) for x, need in zip(inputs, needs)]
    rgb, sigma = reference(*leaves, box_warp, layout)
    outs, grads_in = [], []
    for o, g in ((rgb, grad_rgb), (sigma, grad_sigma)):
        if g is not None:
            outs.append(o)
            grads_in.append(g)
    wanted = [x for x, need in zip(leaves, needs) if need]
    grads = iter(torch.autograd.grad(outs, wanted, grads_in, allow_unused=True))
    result = []
    for x, need in zip(leaves, needs):
        if not need:
            result.append(None)
            continue
        g = next(grads)
        result.append(torch.zeros_like(x) if g is None else g)
    return rgb.detach(), sigma.detach(), result


def random_grads(n, m, out, dtype, seed=123):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, m, out - 1, generator=gen).to(DEVICE, dtype),
            torch.randn(n, m, 1, generator=gen).to(DEVICE, dtype))


def check(planes, points, params, box_warp, layout, tol, needs=(True,) * 6, drop=None, planes_in=None,
          grad_tol=None):
    """Forward and backward against the reference; ``drop`` = "rgb" or "sigma" passes None
    for that output's gradient; ``planes_in`` replaces planes (same values, other strides)."""
    n, m = points.shape[:2]
    out = params[2].shape[0]
    inputs = [planes, points, *params]
    grad_rgb, grad_sigma = random_grads(n, m, out, planes.dtype)
    if drop == "rgb":
        grad_rgb = None
    elif drop == "sigma":
        grad_sigma = None
    ref_rgb, ref_sigma, ref_grads = reference_grads(inputs, box_warp, layout, grad_rgb, grad_sigma, needs)
    pl = planes if planes_in is None else planes_in
    scale, lay = 2.0 / box_warp, LAYOUTS[layout]
    rgb, sigma = dk.forward(pl, points, *params, scale, lay)
    assert rgb.dtype == planes.dtype and sigma.dtype == planes.dtype
    assert rgb.shape == (n, m, out - 1) and sigma.shape == (n, m, 1)
    assert rel_err(rgb, ref_rgb) < tol, f"rgb {rel_err(rgb, ref_rgb):.3g}"
    assert rel_err(sigma, ref_sigma) < tol, f"sigma {rel_err(sigma, ref_sigma):.3g}"
    grads = dk.backward(grad_rgb, grad_sigma, pl, points, *params, scale, lay, needs)
    assert len(grads) == 6
    for name, x, g, ref_g, need in zip(NAMES, inputs, grads, ref_grads, needs):
        if not need:
            assert g is None, name
            continue
        assert g.dtype == x.dtype and g.shape == x.shape, name
        err = rel_err(g, ref_g)
        assert err < (grad_tol or tol), f"grad {name}: rel err {err:.3g}"
    return grads


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_float32_hot_case(layout):
    # The decoder of every EG3D-family checkpoint: C 32 -> Hd 64 -> O 1 + 32.
    planes, points, params = make_inputs(2, 32, 16, 16, 50, 1.0, 64, 33, torch.float32, seed=1)
    check(planes, points, params, 1.0, layout, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    planes, points, params = make_inputs(2, 32, 16, 16, 50, 1.0, 64, 33, dtype, seed=2)
    check(planes, points, params, 1.0, "eg3d", TOLERANCE[dtype], grad_tol=GRAD_TOLERANCE[dtype])


def test_half_precision_variants(monkeypatch):
    # float32 weights with bfloat16 planes (the weights' products split too), then
    # products rounded once to bfloat16 (HALF_SPLIT off: about twice the error).
    planes, points, params = make_inputs(2, 32, 8, 8, 40, 1.0, 64, 33, torch.bfloat16, seed=12)
    params32 = [p.float() for p in params]
    check(planes, points, params32, 1.0, "portrait4d", TOLERANCE[torch.bfloat16],
          grad_tol=GRAD_TOLERANCE[torch.bfloat16])
    monkeypatch.setattr(dk, "HALF_SPLIT", False)
    check(planes, points, params, 1.0, "portrait4d", 2 * TOLERANCE[torch.bfloat16],
          grad_tol=2 * GRAD_TOLERANCE[torch.bfloat16])


def test_small_decoder_and_many_blocks(monkeypatch):
    # C 16, Hd 32, O 4 (three colour channels, padded to 16); M not a multiple of the
    # block and more point blocks than backward programs (the persistent loop strides);
    # box_warp 0.7 (a scale float32 does not hold exactly), odd plane sizes.
    monkeypatch.setattr(dk, "INTERPRETER_PROGRAMS", 3)
    planes, points, params = make_inputs(2, 16, 9, 13, 150, 0.7, 32, 4, torch.float32, seed=3)
    check(planes, points, params, 0.7, "eg3d", TOLERANCE[torch.float32])
    check(planes, points, params, 0.7, "portrait4d", TOLERANCE[torch.float32])


def test_padded_sizes_and_strided_planes():
    # C 48, Hd 96, O 64: every dimension padded, the largest output; planes with
    # channels-last strides (the kernels' own layout) and permuted ones.
    planes, points, params = make_inputs(1, 48, 8, 8, 40, 1.0, 96, 64, torch.float32, seed=4)
    planes_cl = planes.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    assert not planes_cl.is_contiguous()
    check(planes, points, params, 1.0, "portrait4d", TOLERANCE[torch.float32], planes_in=planes_cl)


def test_largest_and_smallest_sizes():
    # C 64, Hd 128 (the largest tiles); then C 16, Hd 16, O 1 (density only, no colour).
    planes, points, params = make_inputs(1, 64, 6, 6, 20, 1.0, 128, 2, torch.float32, seed=5)
    check(planes, points, params, 1.0, "eg3d", TOLERANCE[torch.float32])
    planes, points, params = make_inputs(1, 16, 6, 6, 20, 1.0, 16, 1, torch.float32, seed=6)
    check(planes, points, params, 1.0, "eg3d", TOLERANCE[torch.float32], drop="rgb")


@pytest.mark.parametrize("needs, drop", [
    ((True, False, False, True, False, True), None),  # planes and biases only
    ((False, True, True, False, True, False), "rgb"),  # grad_rgb None: sigma's gradient only
    ((True, True, False, False, False, False), "sigma"),
    ((False, False, True, True, True, True), None),  # weights only (no gather backward)
])
def test_requested_gradients(needs, drop):
    planes, points, params = make_inputs(2, 16, 8, 8, 30, 1.0, 32, 9, torch.float32, seed=7)
    check(planes, points, params, 1.0, "portrait4d", TOLERANCE[torch.float32], needs=needs, drop=drop)


def test_no_output_gradient_and_nothing_needed():
    planes, points, params = make_inputs(1, 16, 4, 4, 10, 1.0, 16, 4, torch.float32, seed=8)
    grads = dk.backward(None, None, planes, points, *params, 2.0, 0, (True,) * 6)
    for x, g in zip([planes, points, *params], grads):
        assert g.shape == x.shape and not g.any()
    g_rgb, g_sigma = random_grads(1, 10, 4, torch.float32)
    assert dk.backward(g_rgb, g_sigma, planes, points, *params, 2.0, 0, (False,) * 6) == (None,) * 6


def test_int64_indexing_path(monkeypatch):
    monkeypatch.setattr(dk, "_needs_int64", lambda *args: True)
    planes, points, params = make_inputs(1, 16, 8, 8, 30, 1.0, 32, 5, torch.float32, seed=9)
    check(planes, points, params, 1.0, "eg3d", TOLERANCE[torch.float32])


@pytest.mark.parametrize("n, m", [(2, 0), (0, 5)])
def test_empty(n, m):
    planes = torch.randn(n, 3, 16, 4, 5, device=DEVICE)
    points = torch.rand(n, m, 3, device=DEVICE)
    params = [torch.randn(16, 16, device=DEVICE), torch.randn(16, device=DEVICE),
              torch.randn(5, 16, device=DEVICE), torch.randn(5, device=DEVICE)]
    rgb, sigma = dk.forward(planes, points, *params, 2.0, 0)
    assert rgb.shape == (n, m, 4) and sigma.shape == (n, m, 1)
    grads = dk.backward(torch.zeros_like(rgb), torch.zeros_like(sigma), planes, points, *params, 2.0, 0,
                        (True,) * 6)
    for x, g in zip([planes, points, *params], grads):
        assert g.shape == x.shape and not g.any()


def test_rejects_unsupported_sizes_and_dtypes():
    def args(c, hidden, out, dtype=torch.float32):
        planes = torch.zeros(1, 3, c, 4, 4, device=DEVICE, dtype=dtype)
        points = torch.zeros(1, 3, 3, device=DEVICE)
        params = [torch.zeros(hidden, c, device=DEVICE, dtype=dtype), torch.zeros(hidden, device=DEVICE, dtype=dtype),
                  torch.zeros(out, hidden, device=DEVICE, dtype=dtype), torch.zeros(out, device=DEVICE, dtype=dtype)]
        return planes, points, *params, 2.0, 0

    for c, hidden, out in ((8, 32, 4), (65, 32, 4), (16, 8, 4), (16, 256, 4), (16, 32, 65), (16, 32, 0)):
        with pytest.raises(ValueError):
            dk.forward(*args(c, hidden, out))
        with pytest.raises(ValueError):
            dk.backward(None, None, *args(c, hidden, out), (True,) * 6)
    with pytest.raises(NotImplementedError):
        dk.forward(*args(16, 16, 4, torch.float64))
    planes, points, w1, b1, w2, b2, scale, layout = args(16, 32, 4)
    with pytest.raises(ValueError):  # w1's channels do not match the planes'
        dk.forward(planes, points, w1[:, :8], b1, w2, b2, scale, layout)
