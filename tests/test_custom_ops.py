"""The compiled backends as PyTorch custom operators (head4d/ops/_library.py, issue 9).

For every op and every compiled backend that runs here (``cpu``; ``triton`` under
TRITON_INTERPRET=1), on small inputs:

- ``torch.library.opcheck`` of each ``head4d::`` operator the public op calls, forward
  and backward, with the arguments it really gets (recorded below the autograd layer):
  schema, fake implementation, autograd registration and the traced (AOT, dynamic
  shapes) forward and backward against eager;
- ``torch.compile(fn, fullgraph=True)`` of a function calling the public op gives the
  eager result and the eager gradients (``aot_eager``; the default inductor backend
  for a composition of ``sample_triplanes`` and ``composite_rays``).

Plus: data checks stay device-side in traced code; importing the registrations
imports no Triton; and (``gpu``) a CUDA graph of the renderer's forward replays the
eager result.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import head4d
from head4d.ops import _library  # noqa: F401  (registers the head4d:: operators)

from conftest import require_backend

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(shape, seed, dtype=F64, device="cpu", scale=1.0, shift=0.0):
    return ((torch.rand(shape, generator=_gen(seed), dtype=F64) - shift) * scale).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------
# One case per (op, backend): a function of tensors calling the public op, and its
# inputs (those that require a gradient are differentiated).
# ---------------------------------------------------------------------------------

def _triplanes_case(backend, device):
    planes = _rand((2, 3, 4, 5, 6), 1, device=device, shift=0.5, scale=2.0).requires_grad_()
    points = _rand((2, 9, 3), 2, device=device, shift=0.5, scale=1.4).requires_grad_()

    def fn(planes, points):
        mean = head4d.ops.sample_triplanes(planes, points, box_warp=1.0, plane_layout="eg3d", backend=backend)
        apart = head4d.ops.sample_triplanes(planes, points, reduce="none", backend=backend)
        return mean, apart

    return fn, (planes, points)


def _decode_case(backend, device):
    c, hidden, outputs = 16, 16, 5  # the Triton kernels' smallest C and hidden
    dtype = torch.float32 if backend == "triton" else F64  # Triton's tl.dot has no float64
    planes = _rand((2, 3, c, 5, 6), 3, dtype, device, shift=0.5, scale=2.0).requires_grad_()
    points = _rand((2, 9, 3), 4, dtype, device, shift=0.5, scale=1.4).requires_grad_()
    w1 = _rand((hidden, c), 5, dtype, device, shift=0.5).requires_grad_()
    b1 = _rand((hidden,), 6, dtype, device, shift=0.5).requires_grad_()
    w2 = _rand((outputs, hidden), 7, dtype, device, shift=0.5).requires_grad_()
    b2 = _rand((outputs,), 8, dtype, device, shift=0.5).requires_grad_()

    def fn(planes, points, w1, b1, w2, b2):
        return head4d.ops.decode_triplanes(planes, points, w1, b1, w2, b2, box_warp=1.0, backend=backend)

    return fn, (planes, points, w1, b1, w2, b2)


def _composite_case(backend, device, background):
    n, r, s, c = 2, 3, 6, 4
    colors = _rand((n, r, s, c), 9, device=device).requires_grad_()
    densities = _rand((n, r, s, 1), 10, device=device, shift=0.3, scale=4.0).requires_grad_()
    depths = (torch.linspace(2.0, 3.0, s, dtype=F64).view(1, 1, s, 1)
              + _rand((n, r, s, 1), 11, scale=0.05)).to(device).requires_grad_()
    inputs = (colors, densities, depths)
    if background:
        inputs += (_rand((n, r, c), 12, device=device).requires_grad_(),)

    def fn(colors, densities, depths, background=None):
        return head4d.ops.composite_rays(colors, densities, depths, background=background, backend=backend)

    return fn, inputs


def _importance_case(backend, device):
    n, r, s = 2, 3, 7
    depths = (torch.linspace(2.0, 3.0, s, dtype=F64).view(1, 1, s, 1).expand(n, r, s, 1)
              + _rand((n, r, s, 1), 13, scale=0.01)).to(device)
    weights = _rand((n, r, s - 1, 1), 14, device=device)

    def fn(depths, weights):
        return head4d.ops.sample_importance(depths, weights, 5, det=True, backend=backend)

    return fn, (depths, weights)


def _grid3d_case(backend, device):
    grid = _rand((2, 3, 4, 5, 6), 15, device=device, shift=0.5).requires_grad_()
    points = _rand((2, 11, 3), 16, device=device, shift=0.5, scale=1.6).requires_grad_()

    def fn(grid, points):
        return head4d.ops.sample_grid3d(grid, points, bound=0.6, padding="zeros", backend=backend)

    return fn, (grid, points)


def _mesh(seed, n=2, device="cpu"):
    """A small closed mesh (an octahedron, two copies moved apart) and a deformed copy."""
    base = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=F64) * 0.4
    verts = torch.cat([base, base * 0.5 + 0.1])
    tri = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    faces = torch.cat([tri, tri + 6])
    obs = (verts + _rand((n, 12, 3), seed, shift=0.5, scale=0.05)).to(device)
    canon = (verts + _rand((n, 12, 3), seed + 1, shift=0.5, scale=0.05)).to(device)
    return obs, canon, faces.to(device)


def _one_ring_case(backend, device):
    obs, canon, faces = _mesh(17, device=device)
    neighbours = head4d.ops.mesh_one_ring(faces, 12, 6)
    subset = torch.tensor([0, 2, 3, 5, 7, 8, 11], device=device)
    points = _rand((2, 10, 3), 19, device=device, shift=0.5).requires_grad_()

    def fn(points, obs, canon, neighbours, subset):
        return (head4d.ops.one_ring_deform(points, obs, canon, neighbours, backend=backend),
                head4d.ops.one_ring_deform(points, obs, canon, neighbours, vertex_subset=subset, backend=backend))

    return fn, (points, obs.requires_grad_(), canon.requires_grad_(), neighbours, subset)


def _closest_case(backend, device, grad):
    obs, _, faces = _mesh(20, device=device)
    points = _rand((2, 10, 3), 22, device=device, shift=0.5)

    def fn(points, verts, faces):
        return head4d.ops.closest_triangles(points, verts, faces, backend=backend)

    return fn, (points.requires_grad_(grad), obs.requires_grad_(grad), faces)


def _surface_case(backend, device, grad):
    obs, canon, faces = _mesh(23, device=device)

    def fn(obs, canon, faces):
        return head4d.ops.surface_field_grid(obs, canon, faces, resolution=3, bound=0.5, backend=backend)

    return fn, (obs.requires_grad_(grad), canon.requires_grad_(grad), faces)


def _attention_case(backend, device):
    dtype = torch.float32
    q = _rand((1, 2, 5, 32), 25, dtype=dtype, device=device, shift=0.5).requires_grad_()
    k = _rand((1, 2, 7, 32), 26, dtype=dtype, device=device, shift=0.5).requires_grad_()
    v = _rand((1, 2, 7, 32), 27, dtype=dtype, device=device, shift=0.5).requires_grad_()

    def fn(q, k, v):
        return head4d.ops.attention(q, k, v, backend=backend)

    return fn, (q, k, v)


CASES = {
    "sample_triplanes": (_triplanes_case, ("cpu", "triton")),
    "decode_triplanes": (_decode_case, ("cpu", "triton")),
    "composite_rays": (lambda b, d: _composite_case(b, d, background=False), ("cpu",)),
    "composite_rays_background": (lambda b, d: _composite_case(b, d, background=True), ("cpu",)),
    "sample_importance": (_importance_case, ("cpu",)),
    "sample_grid3d": (_grid3d_case, ("cpu",)),
    "one_ring_deform": (_one_ring_case, ("cpu",)),
    "closest_triangles": (lambda b, d: _closest_case(b, d, grad=False), ("cpu",)),
    "closest_triangles_grad": (lambda b, d: _closest_case(b, d, grad=True), ("cpu",)),
    "surface_field_grid": (lambda b, d: _surface_case(b, d, grad=False), ("cpu",)),
    "surface_field_grid_grad": (lambda b, d: _surface_case(b, d, grad=True), ("cpu",)),
    "attention": (_attention_case, ("triton",)),
}

#: Every case on the backends that run here, and the ``head4d._C`` ones on ``cuda`` too
#: (``gpu``; the Triton cases run on CUDA tensors when a GPU is present).
PARAMS = [pytest.param(name, backend, id=f"{name}-{backend}")
          for name, (_, backends) in CASES.items() for backend in backends]
PARAMS += [pytest.param(name, "cuda", id=f"{name}-cuda", marks=pytest.mark.gpu)
           for name, (_, backends) in CASES.items() if "cpu" in backends]


def _case(name, backend):
    device = require_backend(backend)
    make, _ = CASES[name]
    return make(backend, device)


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _run(fn, inputs):
    """Outputs of ``fn(*inputs)`` and the gradients of a fixed random weighting of its
    floating outputs with respect to the inputs that require a gradient."""
    outs = _flat(fn(*inputs))
    wrt = [t for t in inputs if t.requires_grad]
    grads = []
    if wrt:
        loss = sum((o * _rand(o.shape, 100 + i, dtype=o.dtype, device=o.device)).sum()
                   for i, o in enumerate(outs) if o.is_floating_point() and o.requires_grad)
        grads = list(torch.autograd.grad(loss, wrt, allow_unused=True))
    return [o.detach() for o in outs], grads


class _RecordHead4dOps(TorchDispatchMode):
    """Records every ``head4d::`` operator call with its arguments, below autograd."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "head4d":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _fresh(value, requires_grad):
    if isinstance(value, torch.Tensor):
        copy = value.detach().clone()
        return copy.requires_grad_(requires_grad and copy.is_floating_point())
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh(v, requires_grad) for v in value)
    return value


@pytest.mark.parametrize("name,backend", PARAMS)
def test_opcheck(name, backend):
    fn, inputs = _case(name, backend)
    recorder = _RecordHead4dOps()
    with recorder:
        _run(fn, inputs)
    ops = {func.name() for func, _, _ in recorder.calls}
    assert ops, f"{name} ({backend}) called no head4d:: operator"
    differentiable = any(t.requires_grad for t in inputs)
    for func, args, kwargs in recorder.calls:
        # a forward op is checked with the gradient its inputs had (so autograd and the
        # traced backward are checked too); a backward op without
        is_backward = func.name().endswith("_backward")
        args = _fresh(args, differentiable and not is_backward)
        torch.library.opcheck(func, args, kwargs)
    if differentiable and name not in ("closest_triangles_grad", "surface_field_grid_grad"):
        assert any(op.endswith("_backward") for op in ops), ops


def _assert_same(actual, expected, what):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, f"{what} {i}"
            continue
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what} {i}: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        # the same kernels on the same inputs: only the order of PyTorch glue may differ
        eps = torch.finfo(e.dtype).eps if e.is_floating_point() else 0
        torch.testing.assert_close(a, e, rtol=16 * eps, atol=16 * eps, msg=f"{what} {i}")


@pytest.mark.parametrize("name,backend", PARAMS)
def test_compile_fullgraph_matches_eager(name, backend):
    fn, inputs = _case(name, backend)
    eager_out, eager_grads = _run(fn, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, grads = _run(compiled, inputs)
    _assert_same(out, eager_out, "output")
    _assert_same(grads, eager_grads, "gradient")


def test_compile_sample_importance_draws_like_eager():
    """Random importance samples: the uniforms are drawn outside the operator, in the
    graph, from the global generator, so a compiled call seeded alike draws alike."""
    require_backend("cpu")
    _, (depths, weights) = _importance_case("cpu", torch.device("cpu"))

    def draw(depths, weights):
        return head4d.ops.sample_importance(depths, weights, 5, backend="cpu")

    torch.manual_seed(60)
    eager = draw(depths, weights)
    torch._dynamo.reset()
    compiled = torch.compile(draw, fullgraph=True, backend="aot_eager")
    torch.manual_seed(60)
    again = compiled(depths, weights)
    assert torch.equal(again, eager)
    assert not torch.equal(compiled(depths, weights), eager)  # the stream moves on


def test_compile_inductor_cpu_kernels():
    """The default (inductor) backend around the cpu kernels: sample, weight, composite."""
    require_backend("cpu")
    planes = _rand((1, 3, 4, 6, 6), 30, shift=0.5, scale=2.0).requires_grad_()
    n, r, s = 1, 4, 5
    t = torch.linspace(2.0, 3.0, s, dtype=F64).view(1, 1, s, 1).expand(n, r, s, 1).contiguous()
    directions = torch.nn.functional.normalize(_rand((n, r, 1, 3), 31, shift=0.5), dim=-1)
    origins = torch.tensor([0.0, 0.0, -2.5], dtype=F64).expand(n, r, 1, 3)

    def render(planes, origins, directions, depths):
        points = (origins + depths * directions).reshape(n, r * s, 3)
        feats = head4d.ops.sample_triplanes(planes, points, backend="cpu").reshape(n, r, s, 4)
        colors, density = torch.sigmoid(feats[..., 1:]), feats[..., :1] * 3.0
        rgb, depth, weights = head4d.ops.composite_rays(colors, density, depths, backend="cpu")
        return rgb, depth, weights.sum(2)

    inputs = (planes, origins, directions, t)
    eager_out, eager_grads = _run(render, inputs)
    torch._dynamo.reset()
    out, grads = _run(torch.compile(render, fullgraph=True), inputs)
    eps = torch.finfo(F64).eps  # inductor may reorder the elementwise glue: a few ulps
    for a, e in zip(out + grads, eager_out + eager_grads):
        torch.testing.assert_close(a, e, rtol=1e3 * eps, atol=1e3 * eps)


def test_traced_data_checks_stay_on_device():
    """Under torch.compile, checks of index values run as device asserts (no host sync,
    no graph break) and still fail, naming the argument."""
    require_backend("cpu")
    obs, canon, faces = _mesh(40)
    neighbours = head4d.ops.mesh_one_ring(faces, 12, 6)
    points = _rand((2, 4, 3), 41, shift=0.5)

    def deform(points, neighbours):
        return head4d.ops.one_ring_deform(points, obs, canon, neighbours, backend="cpu")

    def closest(points, faces):
        return head4d.ops.closest_triangles(points, obs, faces, backend="cpu")[0]

    torch._dynamo.reset()
    compiled_deform = torch.compile(deform, fullgraph=True, backend="aot_eager")
    compiled_closest = torch.compile(closest, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled_deform(points, neighbours), deform(points, neighbours))
    assert torch.equal(compiled_closest(points, faces), closest(points, faces))
    bad = neighbours.clone()
    bad[3, 0] = 12
    with pytest.raises(RuntimeError, match="neighbours"):
        compiled_deform(points, bad)
    with pytest.raises(ValueError, match="neighbours"):  # eager: the host check
        deform(points, bad)
    bad_faces = faces.clone()
    bad_faces[1, 2] = -1
    with pytest.raises(RuntimeError, match="faces"):
        compiled_closest(points, bad_faces)


def test_fake_tensors_give_shapes_without_kernels():
    """The fake implementations alone (meta tensors) give each op's output shapes and dtypes."""
    meta = torch.device("meta")
    planes = torch.empty(2, 3, 4, 5, 6, device=meta)
    points = torch.empty(2, 9, 3, device=meta)
    assert _library.sample_triplanes(planes, points, 2.0, 0, 2).shape == (2, 3, 9, 4)
    assert _library.sample_triplanes_triton(planes, points, 2.0, 0, 0).shape == (2, 9, 4)
    colors = torch.empty(2, 3, 6, 4, device=meta, dtype=torch.float16)
    rgb, depth, weights, aux = _library.composite_rays(colors, colors[..., :1], colors[..., :1], None, False)
    assert (rgb.shape, depth.shape, weights.shape, aux.dtype) == ((2, 3, 4), (2, 3, 1), (2, 3, 5, 1), torch.float32)
    assert rgb.dtype == torch.float16
    u = torch.empty(6, 11, device=meta)
    assert _library.sample_importance(colors[..., :1], colors[:, :, 1:, :1], u).shape == (2, 3, 11, 1)
    verts = torch.empty(2, 12, 3, device=meta)
    faces = torch.empty(16, 3, dtype=torch.int64, device=meta)
    assert _library.surface_field_grid_search(verts, faces, 4, 0.5).shape == (2, 64)
    assert _library.closest_triangles_search(points, verts, faces).dtype == torch.int64


def test_gradients_take_the_layout_their_fakes_declare():
    """A backward op's gradients are dense in the memory order of its fake (what a
    compiled graph assumes): a channels-padded planes gradient, as the CUDA decoding
    kernels make it, is copied into that layout; one already in it is not copied."""
    padded = torch.randn(2, 3, 5, 6, 8, dtype=F64)  # [N, 3, H, W, C + 3], channels padded
    grad = padded[..., :5].permute(0, 1, 4, 2, 3)  # [N, 3, C, H, W], not dense
    points = torch.randn(2, 7, 3, dtype=F64)
    planes = torch.empty(2, 3, 5, 5, 6, dtype=F64)
    laid = _library._laid_out([grad, points], (planes, points), (True, True), _library.PLANES_GRAD_ORDER)
    fake = _library._fake_grads((planes, points), (True, True), _library.PLANES_GRAD_ORDER)
    assert torch.equal(laid[0], grad) and laid[0].stride() == fake[0].stride() != grad.stride()
    assert laid[1] is points
    dense = torch.empty_permuted(planes.shape, _library.PLANES_GRAD_ORDER)
    assert _library._laid_out([dense], (planes,), (True,), _library.PLANES_GRAD_ORDER)[0] is dense


def test_registration_imports_no_triton_and_tolerates_a_missing_extension():
    """Importing head4d registers the ops without importing the Triton kernels; with
    head4d._C unavailable the ops still warn and fall back to the reference, eager and
    compiled."""
    code = (
        "import sys, warnings\n"
        "sys.modules['head4d._C'] = None\n"  # makes `import head4d._C` fail
        "import torch, head4d\n"
        "assert not any(m.startswith('head4d.kernels') for m in sys.modules), 'Triton kernels imported'\n"
        "assert hasattr(torch.ops.head4d, 'sample_triplanes')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    p = torch.rand(1, 3, 2, 4, 4); x = torch.rand(1, 5, 3) - 0.5\n"
        "    out = head4d.ops.sample_triplanes(p, x)\n"
        "ref = head4d.reference.triplanes.sample_triplanes(p, x, 1.0, 'portrait4d', 'mean')\n"
        "assert torch.equal(out, ref)\n"
        "assert any('head4d._C' in str(w.message) for w in caught), [str(w.message) for w in caught]\n"
        "head4d._backend._warned.clear()\n"  # compiled: the same fallback, warned while tracing
        "compiled = torch.compile(lambda p, x: head4d.ops.sample_triplanes(p, x), fullgraph=True,\n"
        "                         backend='aot_eager')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert torch.equal(compiled(p, x), ref)\n"
        "assert any('head4d._C' in str(w.message) for w in caught), [str(w.message) for w in caught]\n"
    )
    env = dict(os.environ, HEAD4D_BACKEND="")
    result = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)),
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _renderer_scene(device, fused=True):
    """A TriplaneRenderer call without random numbers (deterministic coarse depths and
    importance samples): ``(render, planes)`` with ``render(planes) -> (rgb, depth, opacity)``."""
    from head4d.ops.rays import generate_rays
    from head4d.render import TriplaneDecoder, TriplaneRenderer

    gen = torch.Generator().manual_seed(50)
    planes = torch.randn(1, 3, 32, 16, 16, generator=gen).to(device)
    decoder = TriplaneDecoder().to(device)
    cam2world = torch.eye(4).unsqueeze(0)
    cam2world[0, 2, 3] = -2.7  # OpenCV camera on the -z axis, looking along +z at the origin
    focal = torch.tensor([[[4.26, 0.0, 0.5], [0.0, 4.26, 0.5], [0.0, 0.0, 1.0]]])
    origins, directions = generate_rays(cam2world.to(device), focal.to(device), 8)
    opts = dict(ray_start=2.25, ray_end=3.3, box_warp=1.0, depth_resolution=12, depth_resolution_importance=12,
                jitter="none", det_importance=True)
    renderer = TriplaneRenderer(fused=fused)
    assert renderer.uses_fused(decoder, device) == fused  # fused: decode_triplanes on a compiled backend

    def render(planes):
        return renderer(planes, decoder, origins, directions, opts)

    return render, planes


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_compile_fullgraph_renderer(fused):
    """The whole renderer (coarse pass, importance sampling, fine pass, composite) in one
    graph on the cpu kernels, fused decode or not, with the eager result and gradients."""
    require_backend("cpu")
    render, planes = _renderer_scene(torch.device("cpu"), fused=fused)
    planes.requires_grad_()
    eager_out, eager_grads = _run(render, (planes,))
    assert eager_out[2].max() > 0.1  # the rays see something
    torch._dynamo.reset()
    out, grads = _run(torch.compile(render, fullgraph=True, backend="aot_eager"), (planes,))
    _assert_same(out, eager_out, "output")
    _assert_same(grads, eager_grads, "gradient")


@pytest.mark.gpu
def test_cuda_graph_replays_renderer_forward():
    """A CUDA graph of TriplaneRenderer's forward (deterministic depths, fused decode on
    the cuda kernels) replays the eager result, also after the inputs change."""
    require_backend("cuda")
    render, planes = _renderer_scene(torch.device("cuda"))

    def forward():
        with torch.no_grad():
            return render(planes)

    eager = forward()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture (allocations, lazy init)
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = forward()
    # the same kernels on the same inputs: equal up to a few float32 ulps (none of the
    # forward kernels reduces in a varying order, so in practice bit for bit)
    tol = 16 * torch.finfo(torch.float32).eps
    graph.replay()
    torch.cuda.synchronize()
    for a, e in zip(captured, eager):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    planes.mul_(0.5)  # the replay reads the new inputs
    graph.replay()
    torch.cuda.synchronize()
    again = forward()
    assert not torch.allclose(again[0], eager[0])
    for a, e in zip(captured, again):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)
