"""Benchmarks: every op's fast backends timed beside its plain-PyTorch reference.

One library behind three front ends: ``head4d bench`` (:mod:`head4d.cli`), the CI gate
(``benchmarks/gate.py``) and the pytest-benchmark suites (``benchmarks/bench_*.py``).

The method (``/work/.library/device/METHOD.md``, ``shared/design/performance.md``):

1. **Correct first.** Before a backend is timed on a case, its forward output (and, for
   ``fwd+bwd``, its gradients) is compared with the reference backend ``torch`` on the
   same fresh random inputs by the relative-norm error ``||out - ref|| / ||ref||``
   (:data:`TOLERANCE`). A backend that fails is reported and not timed.
2. **Two numbers.** Each case states the bytes the op must move through memory (each
   input read once, each output written once) and its FLOPs, so a time turns into
   achieved GB/s and, where the device's copy bandwidth is known
   (:data:`COPY_BANDWIDTH`), into a floor time.
3. **Timing.** Warm-up, then the median of repeats, the reference and the fast
   backends taking turns call by call (so a slow spell of a shared machine hits all
   alike). CUDA: events around each call, rotating among several input sets when one
   set would sit in L2. CPU: ``time.perf_counter`` around each call. The number of
   repeats adapts so that each backend's pass takes about ``budget_s`` seconds.
4. **Ratios.** The speedup of a backend is the reference's median over its median,
   measured in the same process on the same inputs.

Adding an op: write a function ``(Settings) -> list[Case]`` and decorate it with
``@register("op_name")``; the CLI, the gate and the suites pick it up.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import _backend

REFERENCE = "torch"
PASSES = ("fwd", "fwd+bwd")

#: Bound on the relative-norm error ``||out - ref|| / ||ref||`` per floating dtype
#: (of the op's data, e.g. the planes); gradients use the same bound.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

#: Device-to-device copy bandwidth (bytes read + written per second) measured on this
#: workplace's machines, by a lower-case substring of the device name. Unknown devices
#: (and CPUs) get no floor time.
COPY_BANDWIDTH = (("h100", 3.0e12), ("h200", 4.3e12))

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
               torch.bfloat16: "bf16"}

Inputs = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One op on one shape.

    Attributes:
        op: the op's name (``"sample_triplanes"``).
        shape: a short label for the shape and dtype, unique within the op; part of
            the gate's keys, so keep it stable.
        make_inputs: ``(device, seed) -> dict of tensors``: fresh random inputs (never
            zeros), the same for the same seed. For ``fwd+bwd`` it must hold the
            cotangent under ``"grad_out"`` (shaped and typed like the output).
        run: ``(inputs, backend) -> output tensor``: the op on one backend.
        grad_of: names of the inputs differentiated in ``fwd+bwd``.
        nbytes: per pass, the bytes the op must move through memory.
        flops: per pass, the floating-point operations (approximate; for intensity).
        dtype: the data's dtype; picks the correctness bound in :data:`TOLERANCE`.
        backends: the fast backends to time on this case's device, fastest expected
            first (the reference is always timed too).
        passes: which of :data:`PASSES` to time.
        tolerance: the correctness bound, when the dtype's default in :data:`TOLERANCE`
            does not fit (a whole pipeline sums its rounding over many ops).
        measure_memory: also measure, per backend, the bytes saved for the backward
            and (CUDA) the peak memory of one ``fwd+bwd`` call (:func:`measure_memory`).
    """

    op: str
    shape: str
    make_inputs: Callable[[torch.device, int], Inputs]
    run: Callable[[Inputs, str], torch.Tensor]
    grad_of: Tuple[str, ...]
    nbytes: Dict[str, int]
    flops: Dict[str, int]
    dtype: torch.dtype
    backends: Tuple[str, ...]
    passes: Tuple[str, ...] = PASSES
    measure_memory: bool = False
    tolerance: Optional[float] = None

    def tol(self) -> float:
        """The correctness bound: ``tolerance`` if set, else :data:`TOLERANCE` of the dtype."""
        return TOLERANCE[self.dtype] if self.tolerance is None else self.tolerance

    def key(self, pass_: str, backend: str) -> str:
        """``op/pass/shape/backend``, the key of a result and of a gate floor."""
        return f"{self.op}/{pass_}/{self.shape}/{backend}"


@dataclass
class Settings:
    """What to build cases for.

    ``batches``: the batch sizes N to run (``None``: the op's default for the device).
    ``quick``: fewer and smaller cases and a shorter time budget.
    """

    device: torch.device
    batches: Optional[Tuple[int, ...]] = None
    quick: bool = False


_REGISTRY: Dict[str, Callable[[Settings], List[Case]]] = {}


def register(op: str):
    """Decorator: register ``fn(settings) -> list[Case]`` as the cases of ``op``."""
    def wrap(fn):
        _REGISTRY[op] = fn
        return fn
    return wrap


def ops() -> Tuple[str, ...]:
    """The names of the ops that have cases."""
    return tuple(_REGISTRY)


def cases(settings: Settings, names: Optional[Iterable[str]] = None) -> List[Case]:
    """The cases of the ops ``names`` (default: all) for ``settings``."""
    names = list(names) if names else list(_REGISTRY)
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; benchmarked ops: {list(_REGISTRY)}")
    return [case for n in names for case in _REGISTRY[n](settings)]


def fast_backends(preferences: Dict[str, Sequence[str]], device: torch.device) -> Tuple[str, ...]:
    """An op's non-reference backends for ``device`` from its preference table."""
    return tuple(b for b in preferences.get(device.type, ()) if b != REFERENCE)


# ----------------------------------------------------------------------------------
# sample_triplanes
# ----------------------------------------------------------------------------------

@register("sample_triplanes")
def _sample_triplanes_cases(settings: Settings) -> List[Case]:
    """Planes ``[N, 3, 32, 256, 256]`` (25 MB per image in fp32), reduce ``mean``.

    GPU: 128 x 128 rays x 96 samples = 1,572,864 points per image, N = 1 and 4, fp32
    planes plus bf16 planes. CPU: 64 x 64 x 24 = 98,304 points per image (quick:
    32 x 32 x 16 = 16,384), N = 1. Points are uniform in ``[-0.52, 0.52] * box_warp``
    per axis: about 89% inside the cube, the rest just outside. ``box_warp`` is 1.0
    (Portrait4D uses 1.3; it does not change the speed).
    """
    from .ops import triplanes

    device = settings.device
    cuda = device.type == "cuda"
    batches = settings.batches or ((1,) if settings.quick or not cuda else (1, 4))
    if cuda:
        per_image = 128 * 128 * 96
    else:
        per_image = 32 * 32 * 16 if settings.quick else 64 * 64 * 24
    dtypes = (torch.float32,) if settings.quick else (torch.float32, torch.bfloat16)
    backends = fast_backends(triplanes.PREFERENCES, device)
    return [_triplanes_case(n, 32, 256, 256, per_image, dtype, backends)
            for dtype in dtypes for n in batches]


def _triplanes_case(n: int, c: int, h: int, w: int, m: int, dtype: torch.dtype,
                    backends: Tuple[str, ...], box_warp: float = 1.0) -> Case:
    from .ops import sample_triplanes

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        planes = torch.randn(n, 3, c, h, w, generator=gen, device=device).to(dtype)
        points = (torch.rand(n, m, 3, generator=gen, device=device) * 1.04 - 0.52) * box_warp
        grad_out = torch.randn(n, m, c, generator=gen, device=device).to(dtype)
        return {"planes": planes, "points": points, "grad_out": grad_out}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        return sample_triplanes(inputs["planes"], inputs["points"], box_warp=box_warp,
                                plane_layout="portrait4d", reduce="mean", backend=backend)

    elt = torch.tensor([], dtype=dtype).element_size()
    planes_b, points_b, out_b = n * 3 * c * h * w * elt, n * m * 3 * 4, n * m * c * elt
    fwd_bytes = planes_b + points_b + out_b
    # Forward, per (point, channel): 3 planes x 4 taps x (mul + add), then the mean (3).
    # Backward adds, per (point, plane, channel): 4 taps x (mul + add) into the planes'
    # gradient and 4 taps x 2 coordinates x (mul + add) into the points' gradient.
    fwd_flops = n * m * c * (3 * 4 * 2 + 3)
    bwd_flops = n * m * c * 3 * (4 * 2 + 4 * 2 * 2)
    return Case(
        op="sample_triplanes",
        shape=f"N{n}_C{c}_{h}x{w}_M{m}_{DTYPE_NAMES[dtype]}",
        make_inputs=make_inputs,
        run=run,
        grad_of=("planes", "points"),
        nbytes={"fwd": fwd_bytes,
                # + grad_out read, grad planes and grad points written
                "fwd+bwd": fwd_bytes + out_b + planes_b + points_b},
        flops={"fwd": fwd_flops, "fwd+bwd": fwd_flops + bwd_flops},
        dtype=dtype,
        backends=backends,
    )


# ----------------------------------------------------------------------------------
# composite_rays
# ----------------------------------------------------------------------------------

@register("composite_rays")
def _composite_rays_cases(settings: Settings) -> List[Case]:
    """Colors ``[N, R, S, 32]``, stratified sorted depths in ``[2.25, 3.3]`` (EG3D's
    near / far), raw densities ``randn * 2``, no background.

    GPU: 128 x 128 rays x 96 samples per image, N = 1 and 4, fp32 plus bf16. CPU:
    64 x 64 rays x 48 samples (quick: 32 x 32 x 48), N = 1. The timed output is
    ``cat([rgb, depth], -1)`` so that ``fwd+bwd`` carries gradients through both.
    """
    from .ops import compositing

    device = settings.device
    cuda = device.type == "cuda"
    batches = settings.batches or ((1,) if settings.quick or not cuda else (1, 4))
    if cuda:
        rays, samples = 128 * 128, 96
    else:
        rays, samples = (32 * 32 if settings.quick else 64 * 64), 48
    dtypes = (torch.float32,) if settings.quick or not cuda else (torch.float32, torch.bfloat16)
    backends = fast_backends(compositing.PREFERENCES, device)
    return [_composite_case(n, rays, samples, 32, dtype, backends) for dtype in dtypes for n in batches]


def _composite_case(n: int, r: int, s: int, c: int, dtype: torch.dtype, backends: Tuple[str, ...]) -> Case:
    from .ops import composite_rays

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        colors = torch.randn(n, r, s, c, generator=gen, device=device).to(dtype)
        densities = (torch.randn(n, r, s, 1, generator=gen, device=device) * 2).to(dtype)
        step = (3.3 - 2.25) / s
        base = 2.25 + step * torch.arange(s, device=device, dtype=torch.float32).view(1, 1, s, 1)
        depths = (base + step * torch.rand(n, r, s, 1, generator=gen, device=device)).to(dtype)
        grad_out = torch.randn(n, r, c + 1, generator=gen, device=device).to(dtype)
        return {"colors": colors, "densities": densities, "depths": depths, "grad_out": grad_out}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        rgb, depth, _ = composite_rays(inputs["colors"], inputs["densities"], inputs["depths"], backend=backend)
        return torch.cat([rgb, depth], dim=-1)

    elt = torch.tensor([], dtype=dtype).element_size()
    colors_b = n * r * s * c * elt
    per_sample_b = 2 * n * r * s * elt                      # densities + depths
    out_b = n * r * (c + 1) * elt + n * r * (s - 1) * elt  # rgb + depth, weights
    fwd_bytes = colors_b + per_sample_b + out_b
    # Forward per interval: midpoints, exp, log1p and the transmittance (~20) plus
    # 3 per channel; backward about 40 plus 4 per channel.
    fwd_flops = n * r * (s - 1) * (20 + 3 * c)
    bwd_flops = n * r * (s - 1) * (40 + 4 * c)
    return Case(
        op="composite_rays",
        shape=f"N{n}_R{r}_S{s}_C{c}_{DTYPE_NAMES[dtype]}",
        make_inputs=make_inputs,
        run=run,
        grad_of=("colors", "densities", "depths"),
        nbytes={"fwd": fwd_bytes,
                # + grad_out read, grads of colors, densities and depths written
                "fwd+bwd": fwd_bytes + n * r * (c + 1) * elt + colors_b + per_sample_b},
        flops={"fwd": fwd_flops, "fwd+bwd": fwd_flops + bwd_flops},
        dtype=dtype,
        backends=backends,
    )


# ----------------------------------------------------------------------------------
# sample_importance
# ----------------------------------------------------------------------------------

@register("sample_importance")
def _sample_importance_cases(settings: Settings) -> List[Case]:
    """EG3D's fine-sample draw: 48 coarse depths (stratified in ``[2.25, 3.3]``) and
    their 47 compositing-like weights (``rand ** 4``) -> 48 fine depths per ray, random
    ``u`` from a generator seeded the same for every backend (so outputs compare).
    Forward only: the op has no gradient.

    GPU: 64^2 and 128^2 rays, N = 1 and 4. CPU: 64^2 and 128^2 rays (quick: 32^2), N = 1.
    """
    from .ops import sampling

    device = settings.device
    cuda = device.type == "cuda"
    batches = settings.batches or ((1,) if settings.quick or not cuda else (1, 4))
    resolutions = (32,) if settings.quick and not cuda else (64,) if settings.quick else (64, 128)
    backends = fast_backends(sampling.PREFERENCES, device)
    return [_importance_case(n, res * res, 48, 48, backends) for n in batches for res in resolutions]


def _importance_case(n: int, r: int, s: int, n_imp: int, backends: Tuple[str, ...]) -> Case:
    from .ops import sample_importance

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        step = (3.3 - 2.25) / s
        base = 2.25 + step * torch.arange(s, device=device, dtype=torch.float32).view(1, 1, s, 1)
        depths = base + step * torch.rand(n, r, s, 1, generator=gen, device=device)
        weights = torch.rand(n, r, s - 1, 1, generator=gen, device=device) ** 4
        return {"depths": depths, "weights": weights}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        depths = inputs["depths"]
        gen = torch.Generator(device=depths.device).manual_seed(1234)
        return sample_importance(depths, inputs["weights"], n_imp, generator=gen, backend=backend)

    k = s - 3
    # depths and weights read, u written (torch.rand) and read back, the samples written
    nbytes = n * r * (s + (s - 1) + 2 * n_imp + n_imp) * 4
    # per ray: smoothing (2 max, 2 add, 1 div per bin) and the CDF (sum, div, cumsum) ~8 per
    # bin; per sample: a binary search (~log2(K + 1) compares) and the interpolation (~10)
    flops = n * r * (8 * k + n_imp * (10 + math.ceil(math.log2(k + 1))))
    return Case(
        op="sample_importance",
        shape=f"N{n}_R{r}_S{s}_n{n_imp}_fp32",
        make_inputs=make_inputs,
        run=run,
        grad_of=(),
        nbytes={"fwd": nbytes},
        flops={"fwd": flops},
        dtype=torch.float32,
        backends=backends,
        passes=("fwd",),
    )


# ----------------------------------------------------------------------------------
# decode_triplanes: triplane sampling + the decoder MLP, fused
# ----------------------------------------------------------------------------------

@register("decode_triplanes")
def _decode_triplanes_cases(settings: Settings) -> List[Case]:
    """Planes ``[N, 3, 32, 256, 256]``, EG3D's decoder sizes (32 -> 64 -> 1 + 32), random
    effective weights, points uniform in ``[-0.52, 0.52]^3`` (about 89% inside the cube).

    GPU: 64^2 and 128^2 rays x 96 points per image (393,216 and 1,572,864 points),
    N = 1 and 4, fp32 planes plus bf16 planes. CPU: 64 x 64 x 24 = 98,304 points
    (quick: 16,384), N = 1, fp32. The timed output is ``cat([rgb, sigma], -1)``;
    ``fwd+bwd`` differentiates all six inputs.
    """
    from .ops import decoding

    device = settings.device
    cuda = device.type == "cuda"
    batches = settings.batches or ((1,) if settings.quick or not cuda else (1, 4))
    if cuda:
        points = (64 * 64 * 96,) if settings.quick else (64 * 64 * 96, 128 * 128 * 96)
    else:
        points = (32 * 32 * 16,) if settings.quick else (64 * 64 * 24,)
    dtypes = (torch.float32,) if settings.quick or not cuda else (torch.float32, torch.bfloat16)
    backends = fast_backends(decoding.PREFERENCES, device)
    return [_decode_case(n, 32, 256, 256, m, 64, 33, dtype, backends)
            for dtype in dtypes for n in batches for m in points]


def _decode_case(n: int, c: int, h: int, w: int, m: int, hidden: int, outputs: int, dtype: torch.dtype,
                 backends: Tuple[str, ...]) -> Case:
    from .ops import decode_triplanes

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        planes = torch.randn(n, 3, c, h, w, generator=gen, device=device).to(dtype)
        points = torch.rand(n, m, 3, generator=gen, device=device) * 1.04 - 0.52
        w1 = torch.randn(hidden, c, generator=gen, device=device) / math.sqrt(c)
        b1 = torch.randn(hidden, generator=gen, device=device) * 0.5
        w2 = torch.randn(outputs, hidden, generator=gen, device=device) / math.sqrt(hidden)
        b2 = torch.randn(outputs, generator=gen, device=device) * 0.5
        grad_out = torch.randn(n, m, outputs, generator=gen, device=device).to(dtype)
        return {"planes": planes, "points": points, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "grad_out": grad_out}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        rgb, sigma = decode_triplanes(inputs["planes"], inputs["points"], inputs["w1"], inputs["b1"],
                                      inputs["w2"], inputs["b2"], box_warp=1.0, plane_layout="portrait4d",
                                      backend=backend)
        return torch.cat([sigma, rgb], dim=-1)

    elt = torch.tensor([], dtype=dtype).element_size()
    planes_b, points_b, out_b = n * 3 * c * h * w * elt, n * m * 3 * 4, n * m * outputs * elt
    weights_b = (hidden * c + hidden + outputs * hidden + outputs) * 4
    fwd_bytes = planes_b + points_b + weights_b + out_b
    # Forward per point: 12 taps x C x (mul + add) and the mean, the MLP 2 x (C Hd + Hd O),
    # the activations (~20 per hidden unit and per output). Backward per point: the forward
    # again, dL/dh and dL/df (2 x (Hd O + C Hd)), the weight gradients (2 x (C Hd + Hd O)),
    # and per tap 2 x C for the planes' gradient plus 2 x 2 x C for the points'.
    mlp = 2 * (c * hidden + hidden * outputs)
    fwd_flops = n * m * (12 * c * 2 + 3 * c + mlp + 20 * (hidden + outputs))
    bwd_flops = fwd_flops + n * m * (2 * mlp + 12 * c * 6 + 10 * hidden)
    return Case(
        op="decode_triplanes",
        shape=f"N{n}_C{c}_{h}x{w}_M{m}_H{hidden}_O{outputs}_{DTYPE_NAMES[dtype]}",
        make_inputs=make_inputs,
        run=run,
        grad_of=("planes", "points", "w1", "b1", "w2", "b2"),
        # fwd+bwd: + grad_out read, the gradients of planes, points and weights written (the
        # least it must move; the CUDA backward also writes and reads back f, h, dL/dz and
        # dL/do per point, ~0.8 KB per point, for the weight gradients' matrix products)
        nbytes={"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + out_b + planes_b + points_b + weights_b},
        flops={"fwd": fwd_flops, "fwd+bwd": fwd_flops + bwd_flops},
        dtype=dtype,
        backends=backends,
    )


# ----------------------------------------------------------------------------------
# deformation: sample_grid3d, one_ring_deform, surface_field_grid, the whole deform
# ----------------------------------------------------------------------------------

def _procedural_meshes(n: int, device: torch.device, gen: torch.Generator):
    """A :class:`~head4d.head.ProceduralHead` on ``device`` and, for ``n`` random code
    sets (shape and expression ``randn * 0.5``, neck and eyes ``randn * 0.2``, jaw in
    [0, 0.3] about x), its posed vertices ``[n, V, 3]`` and the codes."""
    from .head import ProceduralHead

    head = ProceduralHead().to(device)
    codes = {"shape": torch.randn(n, 300, generator=gen, device=device) * 0.5,
             "expression": torch.randn(n, 100, generator=gen, device=device) * 0.5,
             "neck_pose": torch.randn(n, 3, generator=gen, device=device) * 0.2,
             "jaw_pose": torch.zeros(n, 3, device=device),
             "eye_pose": torch.randn(n, 6, generator=gen, device=device) * 0.2}
    codes["jaw_pose"][:, 0] = torch.rand(n, generator=gen, device=device) * 0.3
    with torch.no_grad():
        verts = head(codes["shape"], codes["expression"], codes["neck_pose"], codes["jaw_pose"],
                     codes["eye_pose"])
    return head, verts, codes


def _near_surface_points(verts: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """``[N, m, 3]`` points within a few cm of random vertices of ``verts`` ``[N, V, 3]``
    (where ray samples that matter lie), plus a quarter uniform in the 1.3 box."""
    n, v, _ = verts.shape
    idx = torch.randint(0, v, (n, m), generator=gen, device=verts.device)
    near = verts.gather(1, idx.unsqueeze(-1).expand(n, m, 3))
    near = near + torch.randn(n, m, 3, generator=gen, device=verts.device) * 0.03
    uniform = (torch.rand(n, m, 3, generator=gen, device=verts.device) - 0.5) * 1.3
    pick = torch.rand(n, m, 1, generator=gen, device=verts.device) < 0.25
    return torch.where(pick, uniform, near)


@register("sample_grid3d")
def _sample_grid3d_cases(settings: Settings) -> List[Case]:
    """Portrait4D's fine neck field: a ``[N, 3, 24, 24, 24]`` fp32 displacement grid over
    the 24^3 cell centres of the 1.3 box, read at points uniform in the box (zeros padding).
    GPU: 64^2 and 128^2 rays x 96 samples (393,216 and 1,572,864 points), N = 1 and 4.
    CPU: 393,216 points, N = 1 (quick: 65,536)."""
    from .ops import deformation

    device = settings.device
    cuda = device.type == "cuda"
    batches = settings.batches or ((1,) if settings.quick or not cuda else (1, 4))
    if cuda:
        counts = (64 * 64 * 96,) if settings.quick else (64 * 64 * 96, 128 * 128 * 96)
    else:
        counts = (65536,) if settings.quick else (64 * 64 * 96,)
    backends = fast_backends(deformation.PREFERENCES, device)
    return [_grid3d_case(n, 3, 24, m, backends) for n in batches for m in counts]


def _grid3d_case(n: int, c: int, res: int, m: int, backends: Tuple[str, ...]) -> Case:
    from .ops import sample_grid3d
    from .ops.deformation import cell_centre_bound

    bound = cell_centre_bound(res)

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        return {"grid": torch.randn(n, c, res, res, res, generator=gen, device=device) * 0.05,
                "points": (torch.rand(n, m, 3, generator=gen, device=device) - 0.5) * 1.3,
                "grad_out": torch.randn(n, m, c, generator=gen, device=device)}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        return sample_grid3d(inputs["grid"], inputs["points"], bound=bound, backend=backend)

    grid_b, pts_b, out_b = n * c * res ** 3 * 4, n * m * 12, n * m * c * 4
    fwd_flops = n * m * (8 * 2 * c + 30)
    return Case(op="sample_grid3d", shape=f"N{n}_C{c}_{res}^3_M{m}_fp32", make_inputs=make_inputs, run=run,
                grad_of=("grid", "points"),
                nbytes={"fwd": grid_b + pts_b + out_b, "fwd+bwd": 2 * (grid_b + pts_b + out_b)},
                flops={"fwd": fwd_flops, "fwd+bwd": 3 * fwd_flops}, dtype=torch.float32, backends=backends)


@register("one_ring_deform")
def _one_ring_cases(settings: Settings) -> List[Case]:
    """The face part of Portrait4D's deformation on the built-in ProceduralHead (5,044
    vertices; the 3,952-vertex face subset; one-ring table [V, 10]): posed (observed)
    and canonical vertices, points near the surface. GPU: 393,216 and 1,572,864 points,
    N = 1 and 4. CPU: 65,536 points, N = 1 (quick: 8,192)."""
    from .ops import deformation

    device = settings.device
    cuda = device.type == "cuda"
    batches = settings.batches or ((1,) if settings.quick or not cuda else (1, 4))
    if cuda:
        counts = (64 * 64 * 96,) if settings.quick else (64 * 64 * 96, 128 * 128 * 96)
    else:
        counts = (8192,) if settings.quick else (65536,)
    backends = fast_backends(deformation.PREFERENCES, device)
    return [_one_ring_case(n, m, backends) for n in batches for m in counts]


def _one_ring_case(n: int, m: int, backends: Tuple[str, ...]) -> Case:
    from .ops import one_ring_deform

    state = {}

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        head, verts, _ = _procedural_meshes(n, device, gen)
        state["neighbours"], state["subset"] = head.one_ring, head.face_indices
        canon = head.canonical_vertices().unsqueeze(0).expand(n, -1, -1).contiguous()
        return {"points": _near_surface_points(verts, m, gen), "verts_obs": verts, "verts_canon": canon,
                "grad_out": torch.randn(n, m, 3, generator=gen, device=device)}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        return one_ring_deform(inputs["points"], inputs["verts_obs"], inputs["verts_canon"],
                               state["neighbours"], vertex_subset=state["subset"], backend=backend)

    subset, v = 3952, 5044
    fwd_flops = n * m * (9 * subset + 10 * 12)
    nbytes = n * m * 24 + 2 * n * v * 12
    return Case(op="one_ring_deform", shape=f"N{n}_V{v}_S{subset}_K10_M{m}_fp32", make_inputs=make_inputs, run=run,
                grad_of=("points", "verts_obs", "verts_canon"),
                nbytes={"fwd": nbytes, "fwd+bwd": 2 * nbytes + n * m * 12},
                flops={"fwd": fwd_flops, "fwd+bwd": fwd_flops + n * m * 10 * 40}, dtype=torch.float32,
                backends=backends)


@register("surface_field_grid")
def _surface_field_cases(settings: Settings) -> List[Case]:
    """The neck surface field per image (forward only): the ProceduralHead's companion
    mesh (728 vertices, 1,452 faces) at 24^3 (Portrait4D's grid) and, on the GPU, the
    full mesh (5,044 vertices, 10,076 faces) at 64^3. N = 1."""
    from .ops import deformation

    device = settings.device
    backends = fast_backends(deformation.PREFERENCES, device)
    out = [_surface_case("companion", 24, backends)]
    if device.type == "cuda" and not settings.quick:
        out.append(_surface_case("full", 64, backends))
    return out


def _surface_case(mesh: str, res: int, backends: Tuple[str, ...]) -> Case:
    from .ops import surface_field_grid
    from .ops.deformation import cell_centre_bound

    state = {}

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        head, verts, _ = _procedural_meshes(1, device, gen)
        canon = head.canonical_vertices().unsqueeze(0)
        if mesh == "companion":
            verts, canon = head.companion_vertices(verts), head.companion_vertices(canon)
            state["faces"] = head.companion_faces
        else:
            state["faces"] = head.faces
        return {"verts_obs": verts.contiguous(), "verts_canon": canon.contiguous()}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        disp, sq = surface_field_grid(inputs["verts_obs"], inputs["verts_canon"], state["faces"],
                                      resolution=res, bound=cell_centre_bound(res), backend=backend)
        return torch.cat([disp, sq], dim=1)

    faces = 1452 if mesh == "companion" else 10076
    return Case(op="surface_field_grid", shape=f"{mesh}_F{faces}_{res}^3_fp32", make_inputs=make_inputs, run=run,
                grad_of=(), nbytes={"fwd": res ** 3 * 16}, flops={"fwd": res ** 3 * faces * 60},
                dtype=torch.float32, backends=backends, passes=("fwd",))


@register("deform")
def _deform_cases(settings: Settings) -> List[Case]:
    """The whole :class:`~head4d.deform.PartwiseDeformation` (build the grids and meshes
    of an image, then warp its ray samples) on the ProceduralHead with random codes;
    ``backend`` = every op on that backend (``HEAD4D_BACKEND``) against all references.
    GPU: 64^2 and 128^2 rays x 96 samples, N = 1 and 4, fwd and fwd+bwd (points).
    CPU: 16,384 points, N = 1, fwd (quick: 4,096)."""
    from .ops import deformation

    device = settings.device
    cuda = device.type == "cuda"
    batches = settings.batches or ((1,) if settings.quick or not cuda else (1, 4))
    if cuda:
        counts = (64 * 64 * 96,) if settings.quick else (64 * 64 * 96, 128 * 128 * 96)
        passes = PASSES
    else:
        counts, passes = ((4096,) if settings.quick else (16384,)), ("fwd",)
    backends = fast_backends(deformation.PREFERENCES, device)
    return [_deform_case(n, m, backends, passes) for n in batches for m in counts]


def _deform_case(n: int, m: int, backends: Tuple[str, ...], passes: Tuple[str, ...]) -> Case:
    from .deform import PartwiseDeformation

    state = {}

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        head, verts, codes = _procedural_meshes(n, device, gen)
        state["model"] = PartwiseDeformation(head)
        inputs = {"points": _near_surface_points(verts, m, gen), **codes}
        inputs["grad_out"] = torch.randn(n, m, 13, generator=gen, device=device)
        return inputs

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        with _process_backend(backend):
            out = state["model"](inputs["points"], inputs["shape"], inputs["expression"], inputs["neck_pose"],
                                 inputs["jaw_pose"], inputs["eye_pose"])
        return torch.cat([out.neck, out.head, out.eyes, out.mouth, out.inside_eye_box.unsqueeze(-1).to(out.head.dtype)],
                         dim=-1)

    fwd_flops = n * m * (9 * 5226 + 650) + n * 60 * (24 ** 3 + 8 ** 3) * 1452
    return Case(op="deform", shape=f"N{n}_M{m}_procedural_fp32", make_inputs=make_inputs, run=run,
                grad_of=("points",), nbytes={"fwd": n * m * 61, "fwd+bwd": n * m * 133},
                flops={"fwd": fwd_flops, "fwd+bwd": int(1.1 * fwd_flops)}, dtype=torch.float32,
                backends=backends, passes=passes)


# ----------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------

@register("attention")
def _attention_cases(settings: Settings) -> List[Case]:
    """Portrait4D's transformer shapes, batch 4, bf16: cross-attention to the motion
    tokens (H 4, Lq 1,024, Lk 64, D 256), self-attention (H 4, L 1,024, D 256), the
    triplane decoder's spatial-reduction attention (H 2, Lq 16,384, Lk 4,096, D 512),
    and the standard sweep (H 16, L 512 to 16k, D 64 and 128; quick: L 4,096, D 64).

    GPU: ``triton`` and ``sdpa`` (the peer; its ratio to the reference next to
    ``triton``'s reads as triton against sdpa). The reference materializes the
    scores in float32 (2.1 GB per score tensor at the decoder shape), so the largest
    sweep lengths are skipped where it would not fit. CPU: ``sdpa`` against the
    reference at the two small model shapes with batch 1 (Triton runs on the CPU only
    under the interpreter, a test tool).
    """
    device = settings.device
    if device.type != "cuda":
        return [_attention_case("cross", 1, 4, 1024, 64, 256, torch.float32, ("sdpa",)),
                _attention_case("self", 1, 4, 1024, 1024, 256, torch.float32, ("sdpa",))][: 1 if settings.quick else 2]
    backends = ("triton", "sdpa")
    b = (settings.batches or (4,))[0]
    shapes = [("cross", b, 4, 1024, 64, 256), ("self", b, 4, 1024, 1024, 256)]
    if settings.quick:
        shapes.append(("sweep", b, 16, 4096, 4096, 64))
    else:
        shapes.append(("decoder", b, 2, 16384, 4096, 512))
        for d in (64, 128):
            for length in (512, 1024, 2048, 4096, 8192):  # 16k: the reference's scores need 68 GB
                shapes.append(("sweep", b, 16, length, length, d))
    return [_attention_case(*shape, torch.bfloat16, backends) for shape in shapes]


def _attention_case(kind: str, b: int, h: int, lq: int, lk: int, d: int, dtype: torch.dtype,
                    backends: Tuple[str, ...]) -> Case:
    from .ops import attention

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        q = torch.randn(b, h, lq, d, generator=gen, device=device).to(dtype)
        k = torch.randn(b, h, lk, d, generator=gen, device=device).to(dtype)
        v = torch.randn(b, h, lk, d, generator=gen, device=device).to(dtype)
        grad_out = torch.randn(b, h, lq, d, generator=gen, device=device).to(dtype)
        return {"q": q, "k": k, "v": v, "grad_out": grad_out}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        return attention(inputs["q"], inputs["k"], inputs["v"], backend=backend)

    elt = torch.tensor([], dtype=dtype).element_size()
    q_b, kv_b = b * h * lq * d * elt, 2 * b * h * lk * d * elt
    fwd_bytes = 2 * q_b + kv_b                  # q, k, v read, out written
    fwd_flops = 4 * b * h * lq * lk * d
    return Case(
        op="attention",
        shape=f"{kind}_B{b}_H{h}_Lq{lq}_Lk{lk}_D{d}_{DTYPE_NAMES[dtype]}",
        make_inputs=make_inputs,
        run=run,
        grad_of=("q", "k", "v"),
        # + dO read, dq, dk, dv written (and q, k, v, out re-read)
        nbytes={"fwd": fwd_bytes, "fwd+bwd": 2 * fwd_bytes + 2 * q_b + kv_b},
        flops={"fwd": fwd_flops, "fwd+bwd": fwd_flops + int(2.5 * fwd_flops)},
        dtype=dtype,
        backends=backends,
    )


# ----------------------------------------------------------------------------------
# render: the whole TriplaneRenderer (coarse + importance + fine + composite)
# ----------------------------------------------------------------------------------

#: EG3D's FFHQ camera: radius 2.7 around the origin, normalized focal 4.2647,
#: near / far 2.25 / 3.3.
_FFHQ_FOCAL, _FFHQ_RADIUS, _FFHQ_NEAR, _FFHQ_FAR = 4.2647, 2.7, 2.25, 3.3


@register("render")
def _render_cases(settings: Settings) -> List[Case]:
    """The whole renderer, fused (``backend`` = every op on that backend, the fused
    decode path on) against the unfused composition of references (``torch``).

    Planes ``[N, 3, 32, 256, 256]`` fp32, a Portrait4D decoder (32 -> 64 -> 1 + 32, its
    density head randomized), EG3D's FFHQ cameras (OpenCV, radius 2.7, near / far
    2.25 / 3.3, box 1.0, EG3D plane layout), 48 coarse + 48 importance samples,
    deterministic (no jitter, ``det_importance``, no density noise) so that backends
    can be compared. GPU: N = 1 and 4, 64^2 and 128^2 rays. CPU: N = 1, 32^2 rays
    (quick: 16^2). The output is ``cat([features, depth, opacity], -1)``; ``fwd+bwd``
    differentiates the planes and the four decoder tensors, and measures memory.
    """
    from .ops import decoding

    device = settings.device
    cuda = device.type == "cuda"
    batches = settings.batches or ((1,) if settings.quick or not cuda else (1, 4))
    if cuda:
        resolutions = (64,) if settings.quick else (64, 128)
    else:
        resolutions = (16,) if settings.quick else (32,)
    backends = fast_backends(decoding.PREFERENCES, device)
    return [_render_case(n, res, 48, 48, backends) for n in batches for res in resolutions]


def _look_at_origin(n: int, radius: float, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """``[N, 4, 4]`` OpenCV cam2world matrices on a sphere of ``radius`` (yaw and
    pitch within +-0.3 rad of the front), looking at the origin, y down."""
    yaw = (torch.rand(n, generator=gen, device=device) - 0.5) * 0.6
    pitch = (torch.rand(n, generator=gen, device=device) - 0.5) * 0.6
    position = radius * torch.stack([torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch),
                                     torch.cos(yaw) * torch.cos(pitch)], dim=-1)
    forward = -position / position.norm(dim=-1, keepdim=True)
    down = torch.tensor([0.0, -1.0, 0.0], device=device).expand(n, 3)
    right = torch.linalg.cross(down, forward)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(forward, right)
    cam2world = torch.eye(4, device=device).repeat(n, 1, 1)
    cam2world[:, :3, 0], cam2world[:, :3, 1], cam2world[:, :3, 2] = right, down, forward
    cam2world[:, :3, 3] = position
    return cam2world


def _render_case(n: int, res: int, n_coarse: int, n_fine: int, backends: Tuple[str, ...]) -> Case:
    from .ops import generate_rays
    from .render import TriplaneDecoder, TriplaneRenderer

    c, h, w = 32, 256, 256
    r = res * res
    decoder_keys = ("decoder.net.0.weight", "decoder.net.0.bias", "decoder.out_sigma.weight",
                    "decoder.out_sigma.bias", "decoder.out_rgb.weight", "decoder.out_rgb.bias")
    options = {"ray_start": _FFHQ_NEAR, "ray_end": _FFHQ_FAR, "box_warp": 1.0, "depth_resolution": n_coarse,
               "depth_resolution_importance": n_fine, "jitter": "none", "det_importance": True,
               "density_noise": 0.0, "plane_layout": "eg3d"}

    class _Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = TriplaneDecoder(c, 64, 32, variant="portrait4d")
            self.renderer = TriplaneRenderer(plane_layout="eg3d")

        def forward(self, planes, origins, directions, fused):
            features, depth, opacity = self.renderer(planes, self.decoder, origins, directions,
                                                     dict(options, fused=fused))
            return torch.cat([features, depth, opacity], dim=-1)

    model = _Model()

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        planes = torch.randn(n, 3, c, h, w, generator=gen, device=device)
        intrinsics = torch.tensor([[_FFHQ_FOCAL, 0, 0.5], [0, _FFHQ_FOCAL, 0.5], [0, 0, 1]],
                                  device=device).expand(n, 3, 3)
        origins, directions = generate_rays(_look_at_origin(n, _FFHQ_RADIUS, device, gen), intrinsics, res)
        inputs = {"planes": planes, "origins": origins, "directions": directions}
        for key in decoder_keys:
            shape = dict(model.named_parameters())[key].shape
            scale = 0.5 if key.endswith("bias") else 1.0
            inputs[key] = torch.randn(shape, generator=gen, device=device) * scale
        inputs["grad_out"] = torch.randn(n, r, 32 + 2, generator=gen, device=device)
        return inputs

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        params = {k: inputs[k] for k in decoder_keys}
        with _process_backend(backend):
            return torch.func.functional_call(model, params, (inputs["planes"], inputs["origins"],
                                                              inputs["directions"], backend != REFERENCE))

    m = n * r * (n_coarse + n_fine)
    planes_b = n * 3 * c * h * w * 4
    out_b = n * r * (32 + 2) * 4
    # Forward per decoded point: 12 taps x 32 channels x 2 + the MLP 2 x (32 x 64 + 64 x 33);
    # compositing about 20 + 3 x 32 per interval, twice for the coarse samples.
    mlp = 2 * (c * 64 + 64 * 33)
    fwd_flops = m * (12 * c * 2 + mlp) + n * r * (2 * n_coarse + n_fine) * (20 + 3 * 32)
    return Case(
        op="render",
        shape=f"N{n}_R{res}x{res}_S{n_coarse}+{n_fine}_C{c}_{h}x{w}_fp32",
        make_inputs=make_inputs,
        run=run,
        grad_of=("planes",) + decoder_keys,
        # what must move at the least: the planes and the image (plus their gradients)
        nbytes={"fwd": planes_b + out_b, "fwd+bwd": 2 * planes_b + 2 * out_b},
        flops={"fwd": fwd_flops, "fwd+bwd": 3 * fwd_flops},
        dtype=torch.float32,
        backends=backends,
        measure_memory=True,
        # dozens of ops in a row, two passes summing into the planes' gradient in
        # another order: 1e-5 relative is too tight for float32 (measured 1.7e-5)
        tolerance=1e-4,
    )


class _process_backend:
    """Within the block, ``HEAD4D_BACKEND`` names ``backend`` (every op that has it runs
    it, the others their reference); the previous value is restored after."""

    def __init__(self, backend: str):
        self.backend = backend

    def __enter__(self):
        self.previous = os.environ.get("HEAD4D_BACKEND")
        os.environ["HEAD4D_BACKEND"] = self.backend

    def __exit__(self, *exc):
        if self.previous is None:
            os.environ.pop("HEAD4D_BACKEND", None)
        else:
            os.environ["HEAD4D_BACKEND"] = self.previous


# ----------------------------------------------------------------------------------
# Checking and timing
# ----------------------------------------------------------------------------------

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; ``inf`` for a shape mismatch or a NaN/inf."""
    if out.shape != ref.shape:
        return math.inf
    out, ref = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def prepare(case: Case, inputs: Inputs, pass_: str) -> Inputs:
    """The inputs for one pass: for ``fwd+bwd``, the differentiated ones become leaves
    requiring grad (done here, outside any timed region)."""
    if pass_ == "fwd":
        return {k: v.detach() for k, v in inputs.items()}
    return {k: (v.detach().requires_grad_(True) if k in case.grad_of else v.detach())
            for k, v in inputs.items()}


def step(case: Case, pass_: str, backend: str) -> Callable[[Inputs], Tuple[torch.Tensor, ...]]:
    """The timed callable: the forward (``fwd``), or the forward and the gradients of
    ``case.grad_of`` for the cotangent ``inputs["grad_out"]`` (``fwd+bwd``; through
    ``torch.autograd.grad``, so nothing accumulates between runs). Returns the output
    and then the gradients."""
    if pass_ == "fwd":
        def fwd(inputs: Inputs):
            with torch.no_grad():
                return (case.run(inputs, backend),)
        return fwd
    if pass_ != "fwd+bwd":
        raise ValueError(f"unknown pass {pass_!r}; expected one of {PASSES}")

    def fwd_bwd(inputs: Inputs):
        out = case.run(inputs, backend)
        grads = torch.autograd.grad(out, [inputs[k] for k in case.grad_of], inputs["grad_out"])
        return (out, *grads)
    return fwd_bwd


def check(case: Case, pass_: str, backend: str, inputs: Inputs,
          expected: Sequence[torch.Tensor]) -> Tuple[bool, Dict[str, float]]:
    """Runs ``backend`` once on ``inputs`` (prepared for ``pass_``) and compares each
    output with ``expected`` (the reference's). Returns (passed, errors by name)."""
    got = step(case, pass_, backend)(inputs)
    names = ["out"] + [f"grad_{k}" for k in case.grad_of][: len(got) - 1]
    errors = {name: rel_err(g, e) for name, g, e in zip(names, got, expected)}
    return all(e <= case.tol() for e in errors.values()), errors


def _input_bytes(inputs: Inputs) -> int:
    return sum(v.numel() * v.element_size() for k, v in inputs.items() if k != "grad_out")


def input_sets(case: Case, device: torch.device, seed: int = 0) -> List[Inputs]:
    """Fresh inputs for ``case``; on CUDA, enough sets that rotating among them spans
    three times the L2 cache (at most 8), so repeated runs do not time the cache."""
    first = case.make_inputs(device, seed)
    count = 1
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
        count = max(1, min(8, math.ceil(3 * l2 / max(1, _input_bytes(first)))))
        if _input_bytes(first) > 2 * l2:
            count = 1
    return [first] + [case.make_inputs(device, seed + i) for i in range(1, count)]


def time_calls(fns: Sequence[Callable[[Inputs], object]], sets: Sequence[Inputs],
               device: torch.device, budget_s: float, min_reps: int = 3,
               max_reps: int = 200) -> List[List[float]]:
    """Per-call times in milliseconds of each of ``fns``, interleaved, after warm-up.

    The functions take turns call by call (``f0, f1, ..., f0, f1, ...``), each call on
    the next of ``sets`` in rotation, so a slow spell of a shared machine hits them all
    alike and their ratio stays put. Warm-up: at least two calls each and up to a tenth
    of the budget. Then ``budget_s / (time of one round)`` rounds, clamped to
    ``[min_reps, max_reps]``. CUDA: an event pair around each call, read after one final
    synchronize. CPU: ``time.perf_counter`` around each call.
    """
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = len(sets)
    best = [math.inf] * len(fns)
    sync()
    start, rounds = time.perf_counter(), 0
    while rounds < 2 or (time.perf_counter() - start < 0.1 * budget_s and rounds < 20):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn(sets[rounds % n])
            sync()
            if rounds:  # the first call may compile or allocate
                best[j] = min(best[j], time.perf_counter() - t0)
        rounds += 1
    reps = int(max(min_reps, min(max_reps, budget_s / max(sum(best), 1e-6))))
    times: List[List[float]] = [[] for _ in fns]
    if cuda:
        events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                   for _ in fns] for _ in range(reps)]
        for i in range(reps):
            for fn, (begin, end) in zip(fns, events[i]):
                begin.record()
                fn(sets[i % n])
                end.record()
        torch.cuda.synchronize()
        for row in events:
            for j, (begin, end) in enumerate(row):
                times[j].append(begin.elapsed_time(end))
    else:
        for i in range(reps):
            for j, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn(sets[i % n])
                times[j].append((time.perf_counter() - t0) * 1e3)
    return times


# ----------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------

@dataclass
class Result:
    """One (op, shape, pass, backend) row.

    ``status``: ``ok`` (checked and timed), ``fail`` (wrong output; not timed),
    ``error`` (raised), ``skip`` (backend not available here; ``message`` says why).
    Times in milliseconds; ``speedup`` is the reference's median over this median;
    ``floor_ms`` is ``bytes / copy bandwidth`` where the bandwidth is known.
    Memory (cases with ``measure_memory``, ``fwd+bwd`` only): ``saved_bytes``, the
    tensors autograd keeps for the backward; ``peak_bytes`` (CUDA), the peak allocated
    during the call above what was allocated before it; ``memory_ratio``, the
    reference's over this backend's (the peak on CUDA, the saved bytes on the CPU).
    """

    op: str
    shape: str
    pass_: str
    backend: str
    status: str
    bytes: int
    flops: int
    errors: Dict[str, float] = field(default_factory=dict)
    tolerance: Optional[float] = None
    median_ms: Optional[float] = None
    p25_ms: Optional[float] = None
    p75_ms: Optional[float] = None
    min_ms: Optional[float] = None
    reps: int = 0
    input_sets: int = 1
    speedup: Optional[float] = None
    gbps: Optional[float] = None
    gflops: Optional[float] = None
    floor_ms: Optional[float] = None
    saved_bytes: Optional[int] = None
    peak_bytes: Optional[int] = None
    memory_ratio: Optional[float] = None
    message: str = ""

    @property
    def key(self) -> str:
        return f"{self.op}/{self.pass_}/{self.shape}/{self.backend}"

    @property
    def failed(self) -> bool:
        return self.status in ("fail", "error")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["pass"] = data.pop("pass_")
        data["key"] = self.key
        return data


def copy_bandwidth(device: torch.device) -> Optional[float]:
    """The measured copy bandwidth (bytes/s) of ``device``, or ``None`` if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((bw for tag, bw in COPY_BANDWIDTH if tag in name), None)


def _timed_result(case: Case, pass_: str, backend: str, times: List[float], n_sets: int,
                  bandwidth: Optional[float]) -> Result:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    median = statistics.median(times)
    nbytes, flops = case.nbytes[pass_], case.flops[pass_]
    return Result(op=case.op, shape=case.shape, pass_=pass_, backend=backend, status="ok",
                  bytes=nbytes, flops=flops, median_ms=median, p25_ms=q[0], p75_ms=q[2],
                  min_ms=min(times), reps=len(times), input_sets=n_sets,
                  gbps=nbytes / (median * 1e-3) / 1e9, gflops=flops / (median * 1e-3) / 1e9,
                  floor_ms=None if bandwidth is None else nbytes / bandwidth * 1e3)


def measure_memory(case: Case, pass_: str, backend: str, inputs: Inputs,
                   device: torch.device) -> Tuple[int, Optional[int]]:
    """``(saved_bytes, peak_bytes)`` of one call of ``step(case, pass_, backend)``.

    ``saved_bytes``: the distinct storages autograd saves for the backward during the
    forward (counted with ``torch.autograd.graph.saved_tensors_hooks``), less the
    inputs' own storages (they exist whatever the backend keeps), so the number is the
    same on every device. ``peak_bytes``: on CUDA, ``max_memory_allocated`` during the call
    minus what was allocated before it (everything the call allocates: saved tensors,
    temporaries, outputs, gradients); ``None`` elsewhere.
    """
    seen: Dict[Tuple[int, int], int] = {}
    own = {(v.untyped_storage().data_ptr(), v.untyped_storage().nbytes()) for v in inputs.values()}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in own:
            seen[key] = storage.nbytes()
        return t

    fn = step(case, pass_, backend)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(inputs)
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return sum(seen.values()), peak


def run_case(case: Case, device: torch.device, budget_s: float,
             backends: Optional[Sequence[str]] = None, seed: int = 0,
             on_result: Callable[[Result], None] = lambda r: None) -> List[Result]:
    """Checks the fast backends of one case against the reference, then times them and
    the reference interleaved (:func:`time_calls`), pass by pass.

    ``backends`` restricts the fast backends (the reference always runs: it is what
    the others are checked and measured against). ``budget_s`` is per backend and pass.
    Calls ``on_result`` with each row once its pass is done; returns all rows.
    """
    wanted = [b for b in case.backends if backends is None or b in backends]
    sets = input_sets(case, device, seed)
    bandwidth = copy_bandwidth(device)
    min_reps = 10 if device.type == "cuda" else 3
    results: List[Result] = []

    for pass_ in case.passes:
        prepared = [prepare(case, s, pass_) for s in sets]
        base = dict(op=case.op, shape=case.shape, pass_=pass_, bytes=case.nbytes[pass_],
                    flops=case.flops[pass_], tolerance=case.tol())
        expected = [t.detach() for t in step(case, pass_, REFERENCE)(prepared[0])]
        rows: Dict[str, Result] = {}
        errors: Dict[str, Dict[str, float]] = {}
        for backend in wanted:
            reason = _backend.unavailable_reason(backend, device)
            if reason is not None:
                rows[backend] = Result(backend=backend, status="skip", message=reason, **base)
                continue
            try:
                ok, errors[backend] = check(case, pass_, backend, prepared[0], expected)
            except Exception as exc:  # a crash is a result too: report it, carry on
                rows[backend] = Result(backend=backend, status="error", **base,
                                       message=f"{type(exc).__name__}: {exc}")
                continue
            if not ok:
                worst = max(errors[backend], key=errors[backend].get)
                rows[backend] = Result(backend=backend, status="fail", errors=errors[backend],
                                       **base, message=f"{worst}: rel. error "
                                       f"{errors[backend][worst]:.2e} > {base['tolerance']:.0e}")
        timed = [REFERENCE] + [b for b in wanted if b not in rows]
        try:
            all_times = time_calls([step(case, pass_, b) for b in timed], prepared, device,
                                   budget_s * len(timed), min_reps)
        except Exception:  # time them one by one, so one backend's crash spares the others
            all_times = []
            for b in timed:
                try:
                    all_times.append(time_calls([step(case, pass_, b)], prepared, device,
                                                budget_s, min_reps)[0])
                except Exception as exc:
                    if b == REFERENCE:
                        raise
                    all_times.append(None)
                    rows[b] = Result(backend=b, status="error", **base,
                                     message=f"{type(exc).__name__} while timing: {exc}")
        ref = _timed_result(case, pass_, REFERENCE, all_times[0], len(sets), bandwidth)
        ref.tolerance, ref.speedup = base["tolerance"], 1.0
        for backend, times in zip(timed[1:], all_times[1:]):
            if times is None:
                continue
            row = rows[backend] = _timed_result(case, pass_, backend, times, len(sets), bandwidth)
            row.errors, row.tolerance = errors[backend], base["tolerance"]
            row.speedup = ref.median_ms / row.median_ms
        if case.measure_memory and pass_ != "fwd":
            for row in [ref] + [rows[b] for b in wanted]:
                if row.status == "ok":
                    row.saved_bytes, row.peak_bytes = measure_memory(case, pass_, row.backend, prepared[0],
                                                                     device)
            for row in [rows[b] for b in wanted]:
                if row.status == "ok":
                    mine, theirs = ((row.peak_bytes, ref.peak_bytes) if row.peak_bytes is not None
                                    else (row.saved_bytes, ref.saved_bytes))
                    row.memory_ratio = theirs / mine if mine else None
            ref.memory_ratio = 1.0
        for row in [ref] + [rows[b] for b in wanted]:
            results.append(row)
            on_result(row)
        del prepared, expected
    del sets
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def default_device() -> torch.device:
    """CUDA if present, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_budget(device: torch.device, quick: bool) -> float:
    """Seconds of timed calls per (case, pass, backend)."""
    if device.type == "cuda":
        return 0.25 if quick else 1.0
    return 0.5 if quick else 2.0


def run(settings: Settings, names: Optional[Iterable[str]] = None,
        backends: Optional[Sequence[str]] = None, budget_s: Optional[float] = None,
        on_result: Callable[[Result], None] = lambda r: None) -> List[Result]:
    """Checks and times every case of the ops ``names`` (default: all)."""
    budget = default_budget(settings.device, settings.quick) if budget_s is None else budget_s
    out: List[Result] = []
    for case in cases(settings, names):
        out += run_case(case, settings.device, budget, backends, on_result=on_result)
    return out


# ----------------------------------------------------------------------------------
# Environment and reporting
# ----------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3``, or the CPU model with its core count and torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_key(device: torch.device) -> str:
    """The gate's name for a device: ``cpu``, or a slug of the GPU's name
    (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _git(*args: str) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Where and with what the numbers were taken."""
    from . import __version__

    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    ext = _backend.extension()
    bandwidth = copy_bandwidth(device)
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    if commit is None:  # a copy without .git (a device machine): the caller may say which
        commit = os.environ.get("HEAD4D_GIT_COMMIT") or None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "device_key": device_key(device),
        "copy_bandwidth_gbps": None if bandwidth is None else bandwidth / 1e9,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "head4d": __version__,
        "extension": None if ext is None else {"cuda_kernels": bool(ext.with_cuda())},
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": None if dirty is None else bool(dirty),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# Columns of the printed table: (header, width, right-aligned).
_COLUMNS = (("op", 18, False), ("pass", 7, False), ("shape", 30, False), ("backend", 7, False),
            ("median ms", 10, True), ("IQR", 6, True), ("vs ref", 7, True), ("GB/s", 8, True),
            ("floor ms", 8, True), ("mem MB", 7, True), ("mem ratio", 9, True), ("check", 22, False))


def _cells(r: Result) -> List[str]:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)
    if r.status == "ok":
        iqr = f"{100 * (r.p75_ms - r.p25_ms) / r.median_ms:.0f}%"
        worst = max(r.errors.values()) if r.errors else None
        check_cell = "reference" if r.backend == REFERENCE else f"ok {worst:.1e}"
    else:
        first = (r.message.splitlines() or [""])[0]
        iqr, check_cell = "-", f"{r.status.upper()}: {first[:120]}"
    return [r.op, r.pass_, r.shape, r.backend, num(r.median_ms, ".3f"), iqr,
            num(r.speedup, ".2f") + ("x" if r.speedup is not None else ""),
            num(r.gbps, ".1f"), num(r.floor_ms, ".3f"), _memory_mb(r),
            num(r.memory_ratio, ".2f") + ("x" if r.memory_ratio is not None else ""), check_cell]


def _memory_mb(r: Result) -> str:
    """The peak (CUDA) or saved-for-backward (CPU) megabytes of a row, ``-`` if not measured."""
    value = r.peak_bytes if r.peak_bytes is not None else r.saved_bytes
    return "-" if value is None else f"{value / 2**20:.0f}"


def _line(cells: Sequence[str]) -> str:
    parts = []
    for cell, (_, width, right) in zip(cells, _COLUMNS):
        parts.append(cell.rjust(width) if right else cell.ljust(width))
    return "  ".join(parts).rstrip()


def table_header() -> str:
    """The table's header line and a rule under it."""
    head = _line([h for h, _, _ in _COLUMNS])
    return head + "\n" + "-" * len(head)


def table_row(result: Result) -> str:
    """One aligned line for ``result``."""
    return _line(_cells(result))


def format_table(results: Sequence[Result]) -> str:
    return "\n".join([table_header()] + [table_row(r) for r in results])


def report(results: Sequence[Result], device: torch.device, **extra) -> dict:
    """The JSON-able record of a run: environment, settings and every row."""
    return {"environment": environment(device), **extra,
            "results": [r.to_json() for r in results]}
