"""``decode_triplanes``: triplane sampling and the decoder MLP fused into one op, so that
the per-sample features and activations are never written to memory (forward) or
kept for the backward (which recomputes them from the inputs).

Where things live:
    reference   head4d/reference/decoding.py   (the ``torch`` backend: the unfused composition)
    C++ / CUDA  csrc/decoding/                  (``cpu`` and ``cuda`` backends)
    Triton      kernels/decoding.py             (``triton`` backend, ``head4d.kernels.decoding``)
    tests       tests/test_decoding.py
    benchmark   head4d/bench.py (``decode_triplanes`` cases)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _backend
from .._checks import check_choice, check_positive_finite, check_same_device, check_tensor
from .._nvtx import nvtx_range
from ..reference import decoding as _reference
from ._common import resolve_implemented
from .triplanes import LAYOUTS

OP = "decode_triplanes"

#: Backend preference per device type, fastest first.
PREFERENCES = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}

#: The backends this op always has; ``triton`` is added at call time when
#: ``head4d.kernels.decoding`` imports (see :func:`implemented`).
IMPLEMENTED = ("cpu", "cuda", "torch")

#: Largest sizes the compiled kernels take: features C, hidden units, outputs 1 + Co.
MAX_FEATURES = 64
MAX_HIDDEN = 128
MAX_OUTPUTS = 64

_triton_module = None
_triton_error: Optional[BaseException] = None


def _triton_kernels():
    """``head4d.kernels.decoding``, imported once on first use; None when it cannot be."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            from ..kernels import decoding as module
            _triton_module = module
        except Exception as exc:  # Triton missing, or the module not written yet
            _triton_error = exc
    return _triton_module


def implemented() -> Tuple[str, ...]:
    """The backends this op has in this process: :data:`IMPLEMENTED`, plus ``triton``
    when its kernels import."""
    if _backend.triton_available() and _triton_kernels() is not None:
        return IMPLEMENTED + ("triton",)
    return IMPLEMENTED


class _ExtensionKernels:
    """``head4d._C``'s kernels behind the calling contract of ``kernels/decoding.py``."""

    @staticmethod
    def forward(planes, points, w1, b1, w2, b2, scale, layout):
        rgb, sigma = _backend.extension().decode_triplanes_forward(planes, points, w1, b1, w2, b2, scale, layout)
        return rgb, sigma

    @staticmethod
    def backward(grad_rgb, grad_sigma, planes, points, w1, b1, w2, b2, scale, layout, needs):
        return tuple(_backend.extension().decode_triplanes_backward(
            grad_rgb, grad_sigma, planes, points, w1, b1, w2, b2, scale, layout, *needs))


def _kernels(backend: str):
    """The module implementing ``forward``/``backward`` for a compiled backend."""
    if backend == "triton":
        return _triton_kernels()
    return _ExtensionKernels


class _DecodeTriplanes(torch.autograd.Function):
    """Autograd glue for the compiled backends. Saves only the inputs: the backward
    recomputes the features and the MLP per point.

    ``forward(planes, points, w1, b1, w2, b2, scale, layout) -> (rgb, sigma)`` and
    ``backward(grad_rgb, grad_sigma, planes, points, w1, b1, w2, b2, scale, layout, needs)
    -> 6 gradients or None``, with ``needs`` six bools for (planes, points, w1, b1, w2, b2)
    and ``grad_rgb`` / ``grad_sigma`` None when that output got no gradient.
    """

    @staticmethod
    def forward(ctx, planes, points, w1, b1, w2, b2, scale, layout, impl):
        ctx.save_for_backward(planes, points, w1, b1, w2, b2)
        ctx.args = (scale, layout, impl)
        ctx.set_materialize_grads(False)
        return impl.forward(planes, points, w1, b1, w2, b2, scale, layout)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rgb, grad_sigma):
        planes, points, w1, b1, w2, b2 = ctx.saved_tensors
        scale, layout, impl = ctx.args
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:6])
        if (grad_rgb is None and grad_sigma is None) or not any(needs):
            return (None,) * 9
        grads = impl.backward(grad_rgb, grad_sigma, planes, points, w1, b1, w2, b2, scale, layout, needs)
        grads = tuple(g if need else None for g, need in zip(grads, needs))
        return grads + (None, None, None)


def check_decode_inputs(planes, points, weight1, bias1, weight2, bias2, box_warp, plane_layout) -> float:
    """Validates the arguments of :func:`decode_triplanes`; returns ``box_warp`` as a float."""
    check_tensor(OP, "planes", planes, "[N, 3, C, H, W]", 5)
    check_tensor(OP, "points", points, "[N, M, 3]", 3)
    check_tensor(OP, "weight1", weight1, "[hidden, C]", 2)
    check_tensor(OP, "bias1", bias1, "[hidden]", 1)
    check_tensor(OP, "weight2", weight2, "[1 + Co, hidden]", 2)
    check_tensor(OP, "bias2", bias2, "[1 + Co]", 1)
    n, three, c, h, w = planes.shape
    if three != 3:
        raise ValueError(f"{OP}: planes must have shape [N, 3, C, H, W] with 3 planes, got {list(planes.shape)}")
    if min(c, h, w) < 1:
        raise ValueError(f"{OP}: planes must have C, H, W >= 1, got shape {list(planes.shape)}")
    if points.shape[2] != 3:
        raise ValueError(f"{OP}: points must have shape [N, M, 3], got {list(points.shape)}")
    if points.shape[0] != n:
        raise ValueError(f"{OP}: points has batch size {points.shape[0]} (shape {list(points.shape)}) but planes "
                         f"has {n} (shape {list(planes.shape)}); they must match")
    hidden = weight1.shape[0]
    if weight1.shape[1] != c:
        raise ValueError(f"{OP}: weight1 must have shape [hidden, C] = [hidden, {c}] (C from planes "
                         f"{list(planes.shape)}), got {list(weight1.shape)}")
    if tuple(bias1.shape) != (hidden,):
        raise ValueError(f"{OP}: bias1 must have shape [hidden] = [{hidden}] (hidden from weight1), "
                         f"got {list(bias1.shape)}")
    if weight2.shape[1] != hidden or weight2.shape[0] < 1:
        raise ValueError(f"{OP}: weight2 must have shape [1 + Co, hidden] = [1 + Co, {hidden}] (hidden from "
                         f"weight1), got {list(weight2.shape)}")
    outputs = weight2.shape[0]
    if tuple(bias2.shape) != (outputs,):
        raise ValueError(f"{OP}: bias2 must have shape [1 + Co] = [{outputs}] (from weight2), "
                         f"got {list(bias2.shape)}")
    if c > MAX_FEATURES:
        raise ValueError(f"{OP}: planes may have at most {MAX_FEATURES} channels, got C = {c}")
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"{OP}: weight1 must have 1 to {MAX_HIDDEN} rows (hidden units), got {hidden}")
    if outputs > MAX_OUTPUTS:
        raise ValueError(f"{OP}: weight2 may have at most {MAX_OUTPUTS} rows (1 + Co outputs), got {outputs}")
    check_same_device(OP, [("planes", planes), ("points", points), ("weight1", weight1), ("bias1", bias1),
                           ("weight2", weight2), ("bias2", bias2)])
    check_choice(OP, "plane_layout", plane_layout, tuple(LAYOUTS))
    return check_positive_finite(OP, "box_warp", box_warp)


def resolve_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """The backend :func:`decode_triplanes` would use for tensors on ``device``."""
    return resolve_implemented(OP, device, backend, PREFERENCES, implemented())


def decode_triplanes(planes: torch.Tensor, points: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor,
                     weight2: torch.Tensor, bias2: torch.Tensor, *, box_warp: float = 1.0,
                     plane_layout: str = "portrait4d",
                     backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample three feature planes at points and decode them with EG3D's decoder MLP, fused.

    Exactly the unfused composition (:mod:`head4d.reference.decoding`):
    ``f = sample_triplanes(planes, points, box_warp=box_warp, plane_layout=plane_layout,
    reduce="mean")``; ``h = softplus(f @ weight1.T + bias1)`` (torch's Softplus: beta 1,
    threshold 20); ``o = h @ weight2.T + bias2``; ``sigma = o[..., :1]`` (raw density);
    ``rgb = sigmoid(o[..., 1:]) * (1 + 2 * 0.001) - 0.001``.

    The compiled backends write only ``rgb`` and ``sigma`` and save only the inputs for
    the backward, which recomputes the features and activations per point.

    Args:
        planes: ``[N, 3, C, H, W]`` float16, bfloat16, float32 or float64, any strides; C <= 64.
        points: ``[N, M, 3]`` floating point, same device.
        weight1, bias1: ``[hidden, C]``, ``[hidden]`` (hidden <= 128): the first layer's
            *effective* weights (StyleGAN2's gains applied; see
            :meth:`head4d.render.TriplaneDecoder.effective_weights`).
        weight2, bias2: ``[1 + Co, hidden]``, ``[1 + Co]`` (1 + Co <= 64): the output
            layer, density first.
        box_warp: side of the cube, centred at the origin, that the planes span.
        plane_layout: ``"portrait4d"`` or ``"eg3d"`` (see :func:`~head4d.ops.sample_triplanes`).
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"`` or ``None``/``"auto"``.

    Returns:
        ``(rgb [N, M, Co], sigma [N, M, 1])`` in ``planes.dtype``, computed in float32
        (float64 for float64 planes) whatever the weights' dtype. Differentiable with
        respect to planes, points and the four weight tensors.

    Non-finite input, the same on every backend: as the unfused composition gives it
    (a point with a NaN or infinite coordinate decodes to NaN; see
    :func:`~head4d.ops.sample_triplanes`).
    """
    box_warp = check_decode_inputs(planes, points, weight1, bias1, weight2, bias2, box_warp, plane_layout)
    chosen = resolve_backend(planes.device, backend)
    with nvtx_range("head4d.decode_triplanes"):
        if chosen == "torch":
            return _reference.decode_triplanes(planes, points, weight1, bias1, weight2, bias2, box_warp,
                                               plane_layout)
        return _DecodeTriplanes.apply(planes, points, weight1, bias1, weight2, bias2, 2.0 / box_warp,
                                      LAYOUTS[plane_layout], _kernels(chosen))
