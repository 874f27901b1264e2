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

from typing import Optional, Sequence, Tuple

import torch

from .. import _backend
from .._checks import check_choice, check_positive_finite, check_same_device, check_tensor
from .._nvtx import nvtx_range
from ..reference import decoding as _reference
from . import _library
from .triplanes import LAYOUTS

OP = "decode_triplanes"

#: Backend preference per device type, fastest first.
PREFERENCES = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}

#: The backends this op has.
IMPLEMENTED = ("cpu", "cuda", "triton", "torch")

#: Largest sizes the op (and its C++/CUDA kernels) takes: features C, hidden units, outputs 1 + Co.
MAX_FEATURES = 64
MAX_HIDDEN = 128
MAX_OUTPUTS = 64


def _triton_kernels():
    """``head4d.kernels.decoding`` (imports Triton: an error in that module propagates)."""
    from ..kernels import decoding as module
    return module


def _triton_supports(planes, points, weight1, bias1, weight2, bias2) -> Optional[str]:
    """Support predicate of the ``triton`` backend: its kernels run float16, bfloat16
    and float32 planes (``tl.dot`` has no float64 path to rely on) and sizes within
    their ``C_RANGE``, ``HIDDEN_RANGE`` and ``OUT_RANGE`` (blocks padded to >= 16)."""
    if planes.dtype == torch.float64:
        return "no float64 kernel (tl.dot); it runs float16, bfloat16 and float32 planes"
    kernels = _triton_kernels()
    for name, value, (lo, hi) in (("planes' C (channels)", planes.shape[2], kernels.C_RANGE),
                                  ("weight1's rows (hidden units)", weight1.shape[0], kernels.HIDDEN_RANGE),
                                  ("weight2's rows (1 + Co outputs)", weight2.shape[0], kernels.OUT_RANGE)):
        if not lo <= value <= hi:
            return f"{name} = {value}, its kernels take {lo} to {hi}"
    return None


#: Per-backend support predicates over (planes, points, weight1, bias1, weight2, bias2);
#: ``cpu`` and ``cuda`` run every input the op accepts.
SUPPORT = {"triton": _triton_supports}
_backend.declare(OP, IMPLEMENTED, PREFERENCES, SUPPORT)


def _kernels(backend: str):
    """The custom operator running a compiled backend (:mod:`head4d.ops._library`):
    ``head4d::decode_triplanes`` (``head4d._C``, CPU and CUDA) or
    ``head4d::decode_triplanes_triton``; called as ``op(planes, points, w1, b1, w2, b2, scale,
    layout) -> (rgb, sigma)``, differentiable with respect to the six tensors. Its backward
    recomputes the features and the MLP per point from the saved inputs."""
    return _library.decode_triplanes_triton if backend == "triton" else _library.decode_triplanes


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


def resolve_backend(device: torch.device, backend: Optional[str] = None,
                    inputs: Optional[Sequence[torch.Tensor]] = None) -> str:
    """The backend :func:`decode_triplanes` would use for tensors on ``device``; with
    ``inputs`` ``(planes, points, weight1, bias1, weight2, bias2)``, for those inputs."""
    return _backend.resolve(OP, device, backend, PREFERENCES, inputs=inputs)


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
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"`` or ``None``/``"auto"``
            (the fastest available backend that runs these inputs: ``triton`` runs
            neither float64 planes nor C < 16, so the default skips it for them, and
            forcing it on them raises ``RuntimeError`` with the reason).

    Returns:
        ``(rgb [N, M, Co], sigma [N, M, 1])`` in ``planes.dtype``, computed in float32
        (float64 for float64 planes) whatever the weights' dtype. Differentiable with
        respect to planes, points and the four weight tensors.

    Non-finite input, the same on every backend: as the unfused composition gives it
    (a point with a NaN or infinite coordinate decodes to NaN; see
    :func:`~head4d.ops.sample_triplanes`).
    """
    box_warp = check_decode_inputs(planes, points, weight1, bias1, weight2, bias2, box_warp, plane_layout)
    chosen = resolve_backend(planes.device, backend, (planes, points, weight1, bias1, weight2, bias2))
    with nvtx_range("head4d.decode_triplanes"):
        if chosen == "torch":
            return _reference.decode_triplanes(planes, points, weight1, bias1, weight2, bias2, box_warp,
                                               plane_layout)
        return _kernels(chosen)(planes, points, weight1, bias1, weight2, bias2, 2.0 / box_warp,
                                LAYOUTS[plane_layout])
