"""head4d's compiled kernels as PyTorch custom operators (namespace ``head4d``).

Each op's C++/CUDA kernels (``head4d._C``) and Triton kernels (``head4d.kernels``) are
registered here with :mod:`torch.library`: a schema, a fake implementation (shapes and
dtypes only, for ``torch.compile`` tracing and meta tensors), and, for differentiable
ops, an autograd formula whose backward is itself a custom op, so ``torch.compile
(fullgraph=True)`` traces forward and backward graphs without a break and CUDA graphs
capture the kernels. The public API (:mod:`head4d.ops`) validates arguments, picks
the backend in Python and calls one of these ops.

Ops, one section each below (``X`` runs ``head4d._C`` on CPU and CUDA tensors,
``X_triton`` the Triton kernels; ``X_backward`` is the backward of ``X``):

    sample_triplanes, sample_triplanes_triton          (+ _backward)
    decode_triplanes, decode_triplanes_triton          (+ _backward)
    composite_rays                                     (+ _backward)
    sample_importance                                  (no gradient)
    sample_grid3d                                      (+ _backward)
    one_ring_deform                                    (+ _backward)
    closest_triangles, closest_triangles_search        (no gradient: the public op
    surface_field_grid, surface_field_grid_search       recomputes values with autograd)
    attention_triton                                   (+ _backward)
    bias_act, bias_act_triton                          (+ _derivative, twice differentiable)
    upfirdn2d, upfirdn2d_triton                        (its backward is itself)
    rasterize_triangles                                (no gradient)

Backward ops take one ``need`` flag per differentiable input and return the list of
the gradients asked for, in input order (a custom op cannot return ``None``);
:func:`_spread` puts them back in place.

Importing this module registers the ops and compiles nothing: the kernels are looked
up when an op first runs, so a missing ``head4d._C`` (or Triton) fails only the op
that needs it, with the reason; the public ops never call those (they fall back to
the reference, see :mod:`head4d._backend`).

The ops are opaque to the compiler (the Triton ones too: they wrap the launchers of
``kernels/``, which pick block sizes and split batches in Python, rather than
``torch.library.triton_op``). They hold no data-dependent output sizes and no host
syncs; random numbers (``sample_importance``) come in as a tensor.
"""
import importlib
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import _backend

NAMESPACE = "head4d"

#: Device types of the ``head4d._C`` ops (the extension dispatches on the device itself).
EXTENSION_DEVICES = ("cpu", "cuda")
#: Device types of the Triton ops: CUDA, and CPU under ``TRITON_INTERPRET=1``.
TRITON_DEVICES = ("cpu", "cuda")


def _extension():
    """``head4d._C``, or a RuntimeError saying why it cannot be imported."""
    ext = _backend.extension()
    if ext is None:
        raise RuntimeError(f"head4d: the compiled extension head4d._C is not available "
                           f"({_backend.extension_error()}). {_backend.BUILD_HINT}")
    return ext


def _triton_kernels(name: str):
    """``head4d.kernels.<name>`` (imports Triton on first use)."""
    return importlib.import_module(f"head4d.kernels.{name}")


def _custom_op(name: str, devices: Sequence[str]):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(), device_types=tuple(devices))


def _needed(grads, needs: Sequence[bool]) -> List[Tensor]:
    """The gradients whose ``need`` flag is set, in order (dropping the others' ``None``)."""
    return [g for g, need in zip(grads, needs) if need]


def _own_storage(tensors: List[Tensor]) -> List[Tensor]:
    """``tensors`` with each one that shares memory with an earlier one replaced by a
    copy: a custom operator's outputs may not alias each other."""
    seen = set()
    result = []
    for t in tensors:
        storage = t.untyped_storage().data_ptr()
        if storage in seen:
            t = t.clone()
        else:
            seen.add(storage)
        result.append(t)
    return result


def _spread(grads: Sequence[Tensor], needs: Sequence[bool]) -> tuple:
    """Inverse of :func:`_needed`: one entry per input, ``None`` where not needed."""
    it = iter(grads)
    return tuple(next(it) if need else None for need in needs)


#: Memory order (outermost to innermost dimension) of the gradient of a ``[N, 3, C, H, W]``
#: triplane and of an ``[N, C, D, H, W]`` grid: channels innermost, as the kernels
#: accumulate them.
PLANES_GRAD_ORDER = (0, 1, 3, 4, 2)
GRID_GRAD_ORDER = (0, 2, 3, 4, 1)


def _grad_orders(inputs: Sequence[Tensor], needs: Sequence[bool],
                 first_order: Optional[Sequence[int]]) -> List[Sequence[int]]:
    """The memory order of each needed gradient: ``first_order`` for the first input's
    (when given), row-major for the others."""
    return [first_order if i == 0 and first_order is not None else tuple(range(t.dim()))
            for i, (t, need) in enumerate(zip(inputs, needs)) if need]


def _fake_grads(inputs: Sequence[Tensor], needs: Sequence[bool],
                first_order: Optional[Sequence[int]] = None) -> List[Tensor]:
    """Fake gradients: the shape and dtype of each needed input, dense in the memory
    order of :func:`_grad_orders`."""
    needed = [t for t, need in zip(inputs, needs) if need]
    return [torch.empty_permuted(t.shape, order, dtype=t.dtype, device=t.device)
            for t, order in zip(needed, _grad_orders(inputs, needs, first_order))]


def _laid_out(grads: Sequence[Tensor], inputs: Sequence[Tensor], needs: Sequence[bool],
              first_order: Optional[Sequence[int]] = None) -> List[Tensor]:
    """The kernels' gradients, each dense in the memory order its fake declares (a copy
    only where it is not: the CUDA decoding kernels pad the planes gradient's channels)."""
    result = []
    for g, order in zip(grads, _grad_orders(inputs, needs, first_order)):
        step, dense = 1, True
        for dim in reversed(order):
            dense = dense and (g.shape[dim] == 1 or g.stride(dim) == step)
            step *= g.shape[dim]
        if not dense:
            g = torch.empty_permuted(g.shape, order, dtype=g.dtype, device=g.device).copy_(g)
        result.append(g)
    return result


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels compute in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------
# sample_triplanes: planes [N, 3, C, H, W], points [N, M, 3] -> [N, M, C] or [N, 3, M, C]
# ---------------------------------------------------------------------------------

def _define_sample_triplanes(name: str, kernels, devices: Sequence[str]):
    """``head4d::<name>`` and ``head4d::<name>_backward`` running ``kernels()``, an object
    with ``forward(planes, points, scale, layout, reduce)`` and ``backward(grad_out,
    planes, points, scale, layout, reduce, need_planes, need_points)``."""

    @_custom_op(name, devices)
    def forward(planes: Tensor, points: Tensor, scale: float, layout: int, reduce: int) -> Tensor:
        return kernels().forward(planes, points, scale, layout, reduce)

    @forward.register_fake
    def _(planes, points, scale, layout, reduce):
        n, _, c = planes.shape[:3]
        m = points.shape[1]
        return planes.new_empty((n, 3, m, c) if reduce == 2 else (n, m, c))

    @_custom_op(name + "_backward", devices)
    def backward(grad_out: Tensor, planes: Tensor, points: Tensor, scale: float, layout: int, reduce: int,
                 need_planes: bool, need_points: bool) -> List[Tensor]:
        needs = (need_planes, need_points)
        grads = _needed(kernels().backward(grad_out, planes, points, scale, layout, reduce, *needs), needs)
        return _laid_out(grads, (planes, points), needs, PLANES_GRAD_ORDER)

    @backward.register_fake
    def _(grad_out, planes, points, scale, layout, reduce, need_planes, need_points):
        return _fake_grads((planes, points), (need_planes, need_points), PLANES_GRAD_ORDER)

    def setup_context(ctx, inputs, output):
        planes, points, scale, layout, reduce = inputs
        ctx.save_for_backward(planes, points)
        ctx.args = (scale, layout, reduce)

    def gradient(ctx, grad_out):
        planes, points = ctx.saved_tensors
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:2])
        if not any(needs):
            return None, None, None, None, None
        grads = backward(grad_out.contiguous(), planes, points, *ctx.args, *needs)
        return _spread(grads, needs) + (None, None, None)

    forward.register_autograd(gradient, setup_context=setup_context)
    return forward


class _TriplanesExtension:
    @staticmethod
    def forward(planes, points, scale, layout, reduce):
        return _extension().sample_triplanes_forward(planes, points, scale, layout, reduce)

    @staticmethod
    def backward(grad_out, planes, points, scale, layout, reduce, need_planes, need_points):
        return _extension().sample_triplanes_backward(grad_out, planes, points, scale, layout, reduce,
                                                      need_planes, need_points)


sample_triplanes = _define_sample_triplanes("sample_triplanes", lambda: _TriplanesExtension, EXTENSION_DEVICES)
sample_triplanes_triton = _define_sample_triplanes("sample_triplanes_triton", lambda: _triton_kernels("triplanes"),
                                                   TRITON_DEVICES)


# ---------------------------------------------------------------------------------
# decode_triplanes: planes, points, w1 [Hd, C], b1 [Hd], w2 [1+Co, Hd], b2 [1+Co]
#                   -> (rgb [N, M, Co], sigma [N, M, 1])
# ---------------------------------------------------------------------------------

def _define_decode_triplanes(name: str, kernels, devices: Sequence[str]):
    """``head4d::<name>`` and ``head4d::<name>_backward`` running ``kernels()``, an object
    with ``forward(planes, points, w1, b1, w2, b2, scale, layout) -> (rgb, sigma)`` and
    ``backward(grad_rgb, grad_sigma, planes, points, w1, b1, w2, b2, scale, layout, needs)``
    (``grad_rgb`` / ``grad_sigma`` None for an output that got no gradient)."""

    @_custom_op(name, devices)
    def forward(planes: Tensor, points: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor,
                scale: float, layout: int) -> tuple[Tensor, Tensor]:
        rgb, sigma = kernels().forward(planes, points, weight1, bias1, weight2, bias2, scale, layout)
        return rgb, sigma

    @forward.register_fake
    def _(planes, points, weight1, bias1, weight2, bias2, scale, layout):
        n, m = planes.shape[0], points.shape[1]
        return planes.new_empty((n, m, weight2.shape[0] - 1)), planes.new_empty((n, m, 1))

    @_custom_op(name + "_backward", devices)
    def backward(grad_rgb: Optional[Tensor], grad_sigma: Optional[Tensor], planes: Tensor, points: Tensor,
                 weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor, scale: float, layout: int,
                 needs: List[bool]) -> List[Tensor]:
        needs = tuple(bool(x) for x in needs)
        grads = kernels().backward(grad_rgb, grad_sigma, planes, points, weight1, bias1, weight2, bias2, scale,
                                   layout, needs)
        grads = _own_storage(_needed(grads, needs))  # Triton's weight gradients share one buffer
        return _laid_out(grads, (planes, points, weight1, bias1, weight2, bias2), needs, PLANES_GRAD_ORDER)

    @backward.register_fake
    def _(grad_rgb, grad_sigma, planes, points, weight1, bias1, weight2, bias2, scale, layout, needs):
        return _fake_grads((planes, points, weight1, bias1, weight2, bias2), needs, PLANES_GRAD_ORDER)

    def setup_context(ctx, inputs, output):
        planes, points, weight1, bias1, weight2, bias2, scale, layout = inputs
        ctx.save_for_backward(planes, points, weight1, bias1, weight2, bias2)
        ctx.args = (scale, layout)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None

    def gradient(ctx, grad_rgb, grad_sigma):
        needs = [bool(x) for x in ctx.needs_input_grad[:6]]
        if (grad_rgb is None and grad_sigma is None) or not any(needs):
            return (None,) * 8
        grads = backward(grad_rgb, grad_sigma, *ctx.saved_tensors, *ctx.args, needs)
        return _spread(grads, needs) + (None, None)

    forward.register_autograd(gradient, setup_context=setup_context)
    return forward


class _DecodingExtension:
    @staticmethod
    def forward(planes, points, w1, b1, w2, b2, scale, layout):
        return _extension().decode_triplanes_forward(planes, points, w1, b1, w2, b2, scale, layout)

    @staticmethod
    def backward(grad_rgb, grad_sigma, planes, points, w1, b1, w2, b2, scale, layout, needs):
        return _extension().decode_triplanes_backward(grad_rgb, grad_sigma, planes, points, w1, b1, w2, b2, scale,
                                                      layout, *needs)


decode_triplanes = _define_decode_triplanes("decode_triplanes", lambda: _DecodingExtension, EXTENSION_DEVICES)
decode_triplanes_triton = _define_decode_triplanes("decode_triplanes_triton", lambda: _triton_kernels("decoding"),
                                                   TRITON_DEVICES)


# ---------------------------------------------------------------------------------
# composite_rays: colors [N, R, S, C], densities, depths [N, R, S, 1], background [N, R, C]?
#                 -> (rgb [N, R, C], depth [N, R, 1], weights [N, R, S-1, 1], aux [N, R, 4])
# aux (per ray: total weight, unclamped depth, final transmittance; accumulation dtype)
# is kept for the backward and marked non-differentiable.
# ---------------------------------------------------------------------------------

@_custom_op("composite_rays", EXTENSION_DEVICES)
def composite_rays(colors: Tensor, densities: Tensor, depths: Tensor, background: Optional[Tensor],
                   white_back: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rgb, depth, weights, aux = _extension().composite_rays_forward(colors, densities, depths, background,
                                                                   white_back)
    return rgb, depth, weights, aux


@composite_rays.register_fake
def _(colors, densities, depths, background, white_back):
    n, r, s, c = colors.shape
    return (colors.new_empty((n, r, c)), colors.new_empty((n, r, 1)), colors.new_empty((n, r, s - 1, 1)),
            colors.new_empty((n, r, 4), dtype=_accumulation_dtype(colors.dtype)))


@_custom_op("composite_rays_backward", EXTENSION_DEVICES)
def composite_rays_backward(grad_rgb: Tensor, grad_depth: Optional[Tensor], grad_weights: Optional[Tensor],
                            colors: Tensor, densities: Tensor, depths: Tensor, background: Optional[Tensor],
                            white_back: bool, aux: Tensor) -> List[Tensor]:
    """``[grad_colors, grad_densities, grad_depths]`` and ``grad_background`` when a
    background is given."""
    grads = _extension().composite_rays_backward(grad_rgb, grad_depth, grad_weights, colors, densities, depths,
                                                 background, white_back, aux)
    inputs = (colors, densities, depths) + ((background,) if background is not None else ())
    return _laid_out(grads[:len(inputs)], inputs, (True,) * len(inputs))


@composite_rays_backward.register_fake
def _(grad_rgb, grad_depth, grad_weights, colors, densities, depths, background, white_back, aux):
    inputs = (colors, densities, depths) + ((background,) if background is not None else ())
    return _fake_grads(inputs, (True,) * len(inputs))


def _composite_rays_setup_context(ctx, inputs, output):
    colors, densities, depths, background, white_back = inputs
    ctx.save_for_backward(colors, densities, depths, background, output[3])
    ctx.white_back = white_back
    ctx.mark_non_differentiable(output[3])
    ctx.set_materialize_grads(False)


def _composite_rays_gradient(ctx, grad_rgb, grad_depth, grad_weights, grad_aux):
    colors, densities, depths, background, aux = ctx.saved_tensors
    if grad_rgb is None and grad_depth is None and grad_weights is None:
        return None, None, None, None, None
    rgb_used = grad_rgb is not None
    if not rgb_used:
        grad_rgb = colors.new_zeros(colors.shape[:2] + colors.shape[3:])
    grads = composite_rays_backward(grad_rgb, grad_depth, grad_weights, colors, densities, depths, background,
                                    ctx.white_back, aux)
    grad_colors, grad_densities, grad_depths = grads[:3]
    grad_background = grads[3] if background is not None else None
    if not rgb_used:  # as autograd through the reference: colors and background unused
        grad_colors = grad_background = None
    return grad_colors, grad_densities, grad_depths, grad_background, None


composite_rays.register_autograd(_composite_rays_gradient, setup_context=_composite_rays_setup_context)


# ---------------------------------------------------------------------------------
# sample_importance: depths [N, R, S, 1], weights [N, R, S-1, 1], u [N*R, n] or [n]
#                    -> [N, R, n, 1]; no gradient (the public op detaches its inputs)
# ---------------------------------------------------------------------------------

@_custom_op("sample_importance", EXTENSION_DEVICES)
def sample_importance(depths: Tensor, weights: Tensor, u: Tensor) -> Tensor:
    return _extension().sample_importance(depths, weights, u)


@sample_importance.register_fake
def _(depths, weights, u):
    n, r = depths.shape[:2]
    return depths.new_empty((n, r, u.shape[-1], 1))


# ---------------------------------------------------------------------------------
# sample_grid3d: grid [N, C, D, H, W], points [N, M, 3] -> [N, M, C]
# ---------------------------------------------------------------------------------

@_custom_op("sample_grid3d", EXTENSION_DEVICES)
def sample_grid3d(grid: Tensor, points: Tensor, bound: float, padding: int) -> Tensor:
    return _extension().sample_grid3d_forward(grid, points, bound, padding)


@sample_grid3d.register_fake
def _(grid, points, bound, padding):
    return grid.new_empty((grid.shape[0], points.shape[1], grid.shape[1]))


@_custom_op("sample_grid3d_backward", EXTENSION_DEVICES)
def sample_grid3d_backward(grad_out: Tensor, grid: Tensor, points: Tensor, bound: float, padding: int,
                           need_grid: bool, need_points: bool) -> List[Tensor]:
    needs = (need_grid, need_points)
    grads = _needed(_extension().sample_grid3d_backward(grad_out, grid, points, bound, padding, *needs), needs)
    return _laid_out(grads, (grid, points), needs, GRID_GRAD_ORDER)


@sample_grid3d_backward.register_fake
def _(grad_out, grid, points, bound, padding, need_grid, need_points):
    return _fake_grads((grid, points), (need_grid, need_points), GRID_GRAD_ORDER)


def _sample_grid3d_setup_context(ctx, inputs, output):
    grid, points, bound, padding = inputs
    ctx.save_for_backward(grid, points)
    ctx.args = (bound, padding)


def _sample_grid3d_gradient(ctx, grad_out):
    grid, points = ctx.saved_tensors
    needs = tuple(bool(x) for x in ctx.needs_input_grad[:2])
    if not any(needs):
        return None, None, None, None
    grads = sample_grid3d_backward(grad_out.contiguous(), grid, points, *ctx.args, *needs)
    return _spread(grads, needs) + (None, None)


sample_grid3d.register_autograd(_sample_grid3d_gradient, setup_context=_sample_grid3d_setup_context)


# ---------------------------------------------------------------------------------
# one_ring_deform: points [N, M, 3], verts_obs / verts_canon [N, V, 3], neighbours [V, K],
#                  vertex_subset [S]? -> (out [N, M, 3], nearest [N, M] int32)
# nearest (the chosen vertex per point) is kept so the backward does not search again.
# ---------------------------------------------------------------------------------

@_custom_op("one_ring_deform", EXTENSION_DEVICES)
def one_ring_deform(points: Tensor, verts_obs: Tensor, verts_canon: Tensor, neighbours: Tensor,
                    vertex_subset: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    out, nearest = _extension().one_ring_deform_forward(points, verts_obs, verts_canon, neighbours, vertex_subset)
    return out, nearest


@one_ring_deform.register_fake
def _(points, verts_obs, verts_canon, neighbours, vertex_subset):
    n, m = points.shape[:2]
    return points.new_empty((n, m, 3)), points.new_empty((n, m), dtype=torch.int32)


@_custom_op("one_ring_deform_backward", EXTENSION_DEVICES)
def one_ring_deform_backward(grad_out: Tensor, points: Tensor, verts_obs: Tensor, verts_canon: Tensor,
                             neighbours: Tensor, nearest: Tensor, need_points: bool, need_verts_obs: bool,
                             need_verts_canon: bool) -> List[Tensor]:
    needs = (need_points, need_verts_obs, need_verts_canon)
    grads = _extension().one_ring_deform_backward(grad_out, points, verts_obs, verts_canon, neighbours, nearest,
                                                  *needs)
    return _laid_out(_needed(grads, needs), (points, verts_obs, verts_canon), needs)


@one_ring_deform_backward.register_fake
def _(grad_out, points, verts_obs, verts_canon, neighbours, nearest, need_points, need_verts_obs,
      need_verts_canon):
    return _fake_grads((points, verts_obs, verts_canon), (need_points, need_verts_obs, need_verts_canon))


def _one_ring_deform_setup_context(ctx, inputs, output):
    points, verts_obs, verts_canon, neighbours, vertex_subset = inputs
    ctx.save_for_backward(points, verts_obs, verts_canon, neighbours, output[1])
    ctx.mark_non_differentiable(output[1])


def _one_ring_deform_gradient(ctx, grad_out, grad_nearest):
    needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
    if not any(needs):
        return None, None, None, None, None
    grads = one_ring_deform_backward(grad_out.contiguous(), *ctx.saved_tensors, *needs)
    return _spread(grads, needs) + (None, None)


one_ring_deform.register_autograd(_one_ring_deform_gradient, setup_context=_one_ring_deform_setup_context)


# ---------------------------------------------------------------------------------
# closest_triangles: points [N, M, 3], verts [N, V, 3], faces [F, 3]
#   closest_triangles        -> (face_index [N, M] int64, barycentric [N, M, 3],
#                                signed_distance [N, M], squared_distance [N, M])
#   closest_triangles_search -> face_index [N, M] int64 (the search alone)
# No gradient: with one to track, the public op recomputes the chosen faces' values
# with autograd from the search's face indices.
# ---------------------------------------------------------------------------------

@_custom_op("closest_triangles", EXTENSION_DEVICES)
def closest_triangles(points: Tensor, verts: Tensor, faces: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    face, bary, signed, squared = _extension().closest_triangles_forward(points, verts, faces, True)
    return face, bary, signed, squared


@closest_triangles.register_fake
def _(points, verts, faces):
    n, m = points.shape[:2]
    return (points.new_empty((n, m), dtype=torch.int64), points.new_empty((n, m, 3)), points.new_empty((n, m)),
            points.new_empty((n, m)))


@_custom_op("closest_triangles_search", EXTENSION_DEVICES)
def closest_triangles_search(points: Tensor, verts: Tensor, faces: Tensor) -> Tensor:
    return _extension().closest_triangles_forward(points, verts, faces, False)[0]


@closest_triangles_search.register_fake
def _(points, verts, faces):
    return points.new_empty(points.shape[:2], dtype=torch.int64)


# ---------------------------------------------------------------------------------
# surface_field_grid: verts_obs / verts_canon [N, V, 3], faces [F, 3], R, bound
#   surface_field_grid        -> (displacement [N, 3, R, R, R], squared_distance [N, 1, R, R, R])
#   surface_field_grid_search -> face_index [N, R^3] int64 (the search alone)
# No gradient, as closest_triangles.
# ---------------------------------------------------------------------------------

@_custom_op("surface_field_grid", EXTENSION_DEVICES)
def surface_field_grid(verts_obs: Tensor, verts_canon: Tensor, faces: Tensor, resolution: int,
                       bound: float) -> tuple[Tensor, Tensor]:
    _, displacement, squared = _extension().surface_field_grid_forward(verts_obs, verts_canon, faces, resolution,
                                                                       bound)
    return displacement, squared


@surface_field_grid.register_fake
def _(verts_obs, verts_canon, faces, resolution, bound):
    n, r = verts_obs.shape[0], resolution
    return verts_obs.new_empty((n, 3, r, r, r)), verts_obs.new_empty((n, 1, r, r, r))


@_custom_op("surface_field_grid_search", EXTENSION_DEVICES)
def surface_field_grid_search(verts_obs: Tensor, faces: Tensor, resolution: int, bound: float) -> Tensor:
    return _extension().surface_field_grid_forward(verts_obs, None, faces, resolution, bound)[0]


@surface_field_grid_search.register_fake
def _(verts_obs, faces, resolution, bound):
    return verts_obs.new_empty((verts_obs.shape[0], resolution ** 3), dtype=torch.int64)


# ---------------------------------------------------------------------------------
# attention (Triton): q [B, H, Lq, D], k, v [B, H, Lk, D] -> (out [B, H, Lq, D],
#                     lse [B, H, Lq] float32, base 2); lse is kept for the backward.
# ---------------------------------------------------------------------------------

@_custom_op("attention_triton", TRITON_DEVICES)
def attention_triton(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, lse = _triton_kernels("attention").forward(q, k, v, scale)
    return out, lse


@attention_triton.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@_custom_op("attention_triton_backward", TRITON_DEVICES)
def attention_triton_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              scale: float, need_q: bool, need_k: bool, need_v: bool) -> List[Tensor]:
    needs = (need_q, need_k, need_v)
    grads = _needed(_triton_kernels("attention").backward(grad_out, q, k, v, out, lse, scale, *needs), needs)
    return _laid_out(grads, (q, k, v), needs)


@attention_triton_backward.register_fake
def _(grad_out, q, k, v, out, lse, scale, need_q, need_k, need_v):
    return _fake_grads((q, k, v), (need_q, need_k, need_v))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale = scale
    ctx.mark_non_differentiable(output[1])


def _attention_gradient(ctx, grad_out, grad_lse):
    needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
    if not any(needs):
        return None, None, None, None
    grads = attention_triton_backward(grad_out, *ctx.saved_tensors, ctx.scale, *needs)
    return _spread(grads, needs) + (None,)


attention_triton.register_autograd(_attention_gradient, setup_context=_attention_setup_context)


# ---------------------------------------------------------------------------------
# bias_act: x (any shape), b [x.shape[dim]] or None -> like x
# bias_act_derivative: grad * d^order/dx^order of it (order 1 or 2), like x. The first
# derivative's own gradient is the same op at order 1 (in grad) and order 2 (in x and
# b), so R1 and path-length regularization (create_graph=True) get exact second
# derivatives; a third derivative through x raises.
# ---------------------------------------------------------------------------------

#: Activation codes (:data:`head4d.reference.bias_act.ACTIVATIONS`) whose first derivative
#: is a function of the output ``y = act(z) * gain``: linear, relu, lrelu. With ``gain > 0``
#: (and ``alpha > 0`` for lrelu) ``y`` has the sign of ``z``, so the derivative at ``z`` is
#: the derivative taken at ``y`` (no bias); such calls keep ``y`` for the backward instead
#: of ``x`` (StyleGAN2's op does the same), and ``y`` is the tensor the next layer keeps
#: anyway. Not with a clamp: zeroing the clamped elements from ``y`` took extra passes
#: (1.7x the time of a forward + backward at [8, 512, 64, 64] on the CPU), so clamped calls
#: keep ``x`` as before.
_LINEAR, _RELU, _LRELU = 0, 1, 2


def _bias_act_keeps_output(x: Tensor, act: int, alpha: float, gain: float, clamp: float) -> bool:
    """Whether a bias_act call keeps its output rather than its input for the backward:
    an activation of :data:`_LINEAR`, :data:`_RELU`, :data:`_LRELU` with the signs above,
    no clamp (``clamp < 0``), float32 / float64 data (half precision computes in float32
    and rounds, so it keeps its input as before)."""
    return (act in (_LINEAR, _RELU, _LRELU) and gain > 0 and (act != _LRELU or alpha > 0) and clamp < 0
            and x.dtype in (torch.float32, torch.float64))


def _bias_act_bias_grad(grad_x: Tensor, b: Tensor, dim: int) -> Tensor:
    """The bias gradient: ``grad_x`` summed over every dimension but ``dim``, in float32
    (float64 for float64), returned in b's dtype."""
    compute = torch.float64 if grad_x.dtype == torch.float64 else torch.float32
    dims = [d for d in range(grad_x.dim()) if d != dim]
    return grad_x.to(compute).sum(dim=dims).to(b.dtype)


def _define_bias_act(name: str, derivative_name: str, kernels, devices: Sequence[str]):
    """``head4d::<name>`` (the activation) and ``head4d::<derivative_name>`` (its first or
    second derivative times a gradient) running ``kernels()``, an object with
    ``run(x, b, grad, dim, act, order, alpha, gain, clamp)`` (``grad`` None for order 0),
    each differentiable through the other as described above. Returns both ops."""

    @_custom_op(name, devices)
    def forward(x: Tensor, b: Optional[Tensor], dim: int, act: int, alpha: float, gain: float,
                clamp: float) -> Tensor:
        return kernels().run(x, b, None, dim, act, 0, alpha, gain, clamp)

    @forward.register_fake
    def _(x, b, dim, act, alpha, gain, clamp):
        return x.new_empty(x.shape)

    @_custom_op(derivative_name, devices)
    def derivative(grad: Tensor, x: Tensor, b: Optional[Tensor], dim: int, act: int, order: int,
                   alpha: float, gain: float, clamp: float) -> Tensor:
        return kernels().run(x, b, grad, dim, act, order, alpha, gain, clamp)

    @derivative.register_fake
    def _(grad, x, b, dim, act, order, alpha, gain, clamp):
        return x.new_empty(x.shape)

    def forward_setup_context(ctx, inputs, output):
        x, b, dim, act, alpha, gain, clamp = inputs
        ctx.keeps_output = _bias_act_keeps_output(x, act, alpha, gain, clamp)
        ctx.save_for_backward(output if ctx.keeps_output else x, b)
        ctx.args = (dim, act, alpha, gain, clamp)

    def forward_gradient(ctx, grad_out):
        kept, b = ctx.saved_tensors
        dim, act, alpha, gain, clamp = ctx.args
        grad_x = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            if ctx.keeps_output:  # kept = y: the derivative taken at y
                grad_x = derivative(grad_out, kept, None, dim, act, 1, alpha, gain, clamp)
            else:
                grad_x = derivative(grad_out, kept, b, dim, act, 1, alpha, gain, clamp)
            if b is not None and ctx.needs_input_grad[1]:
                grad_b = _bias_act_bias_grad(grad_x, b, dim)
        return grad_x, grad_b, None, None, None, None, None

    forward.register_autograd(forward_gradient, setup_context=forward_setup_context)

    def derivative_setup_context(ctx, inputs, output):
        grad, x, b, dim, act, order, alpha, gain, clamp = inputs
        ctx.save_for_backward(grad, x, b)
        ctx.args = (dim, act, order, alpha, gain, clamp)

    def derivative_gradient(ctx, grad_grad):
        grad, x, b = ctx.saved_tensors
        dim, act, order, alpha, gain, clamp = ctx.args
        need_grad, need_x, need_b = ctx.needs_input_grad[:3]
        grad_grad_out = grad_x = grad_b = None
        if need_grad:  # linear in grad: the same derivative applied to grad_grad
            grad_grad_out = derivative(grad_grad, x, b, dim, act, order, alpha, gain, clamp)
        if need_x or need_b:
            if order != 1:
                raise RuntimeError("bias_act: derivatives of third order with respect to x or b are not implemented")
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            product = grad.to(compute) * grad_grad.to(compute)
            grad_x = derivative(product.to(x.dtype), x, b, dim, act, 2, alpha, gain, clamp)
            if b is not None and need_b:
                grad_b = _bias_act_bias_grad(grad_x, b, dim)
            if not need_x:
                grad_x = None
        return grad_grad_out, grad_x, grad_b, None, None, None, None, None, None

    derivative.register_autograd(derivative_gradient, setup_context=derivative_setup_context)
    return forward, derivative


class _BiasActExtension:
    @staticmethod
    def run(x, b, grad, dim, act, order, alpha, gain, clamp):
        return _extension().bias_act_run(x, b, grad, dim, act, order, alpha, gain, clamp)


bias_act, bias_act_derivative = _define_bias_act("bias_act", "bias_act_derivative", lambda: _BiasActExtension,
                                                 EXTENSION_DEVICES)
bias_act_triton, bias_act_triton_derivative = _define_bias_act(
    "bias_act_triton", "bias_act_triton_derivative", lambda: _triton_kernels("bias_act"), TRITON_DEVICES)


# ---------------------------------------------------------------------------------
# upfirdn2d: x [N, C, H, W], f [fh, fw] or [fw] -> [N, C, OH, OW]
#
# The gradient w.r.t. x is this same op on the output gradient, with up and down
# swapped, the filter flipped and the padding transformed (_upfirdn2d_gradient_args);
# being the op itself, it is differentiable again, so double backward (R1) works to
# any order. The filter is a constant: no gradient (the public op sends a filter that
# requires grad to the reference).
# ---------------------------------------------------------------------------------

def _upfirdn2d_output_size(size: int, up: int, down: int, pad0: int, pad1: int, taps: int) -> int:
    return (size * up + pad0 + pad1 - taps) // down + 1


def _upfirdn2d_gradient_args(in_h: int, in_w: int, out_h: int, out_w: int, f_h: int, f_w: int,
                             up: List[int], down: List[int], padding: List[int]):
    """(up, down, padding) of the upfirdn2d that maps the output gradient ``[.., out_h,
    out_w]`` onto the input gradient ``[.., in_h, in_w]``: up and down swap; the
    leading padding becomes ``taps - 1 - pad0`` (the flipped filter's reach), the
    trailing one whatever makes the result ``in_h x in_w`` exactly."""
    (upx, upy), (downx, downy) = up, down
    padx0, _, pady0, _ = padding
    grad_padding = [f_w - padx0 - 1, in_w * upx - out_w * downx + padx0 - upx + 1,
                    f_h - pady0 - 1, in_h * upy - out_h * downy + pady0 - upy + 1]
    return [downx, downy], [upx, upy], grad_padding


def _define_upfirdn2d(name: str, kernels, devices: Sequence[str]):
    """``head4d::<name>`` running ``kernels()``, an object with ``forward(x, f, upx, upy,
    downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain)``; its gradient is the
    op itself (above)."""

    @_custom_op(name, devices)
    def forward(x: Tensor, f: Tensor, up: List[int], down: List[int], padding: List[int], flip_filter: bool,
                gain: float) -> Tensor:
        return kernels().forward(x, f, up[0], up[1], down[0], down[1], padding[0], padding[1], padding[2],
                                 padding[3], flip_filter, gain)

    @forward.register_fake
    def _(x, f, up, down, padding, flip_filter, gain):
        out_h = _upfirdn2d_output_size(x.shape[2], up[1], down[1], padding[2], padding[3], f.shape[0])
        out_w = _upfirdn2d_output_size(x.shape[3], up[0], down[0], padding[0], padding[1], f.shape[-1])
        return x.new_empty((x.shape[0], x.shape[1], out_h, out_w))

    def setup_context(ctx, inputs, output):
        x, f, up, down, padding, flip_filter, gain = inputs
        ctx.save_for_backward(f)
        ctx.args = _upfirdn2d_gradient_args(x.shape[2], x.shape[3], output.shape[2], output.shape[3], f.shape[0],
                                            f.shape[-1], up, down, padding) + (not flip_filter, gain)

    def gradient(ctx, grad_out):
        (f,) = ctx.saved_tensors
        grad_x = forward(grad_out.contiguous(), f, *ctx.args) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None, None

    forward.register_autograd(gradient, setup_context=setup_context)
    return forward


class _Upfirdn2dExtension:
    @staticmethod
    def forward(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain):
        return _extension().upfirdn2d_forward(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1,
                                              flip_filter, gain)


upfirdn2d = _define_upfirdn2d("upfirdn2d", lambda: _Upfirdn2dExtension, EXTENSION_DEVICES)
upfirdn2d_triton = _define_upfirdn2d("upfirdn2d_triton", lambda: _triton_kernels("upfirdn2d"), TRITON_DEVICES)


# ---------------------------------------------------------------------------------
# rasterize_triangles: vertices_clip [N, V, 4], faces [F, 3]
#   -> (face_index [N, H, W] int64, barycentric [N, H, W, 3], depth [N, H, W])
#
# No gradient (the outputs are piecewise constant in the vertices; the public op
# refuses vertices that require grad). Outputs in float32, float64 for float64 vertices.
# ---------------------------------------------------------------------------------

@_custom_op("rasterize_triangles", EXTENSION_DEVICES)
def rasterize_triangles(vertices_clip: Tensor, faces: Tensor, height: int, width: int,
                        cull_backfaces: bool) -> List[Tensor]:
    return list(_extension().rasterize_triangles_forward(vertices_clip, faces, height, width, cull_backfaces))


@rasterize_triangles.register_fake
def _(vertices_clip, faces, height, width, cull_backfaces):
    n = vertices_clip.shape[0]
    dtype = torch.float64 if vertices_clip.dtype == torch.float64 else torch.float32
    return [vertices_clip.new_empty((n, height, width), dtype=torch.int64),
            vertices_clip.new_empty((n, height, width, 3), dtype=dtype),
            vertices_clip.new_empty((n, height, width), dtype=dtype)]
