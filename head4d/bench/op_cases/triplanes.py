"""Benchmark cases of ``sample_triplanes``: bilinear triplane sampling."""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..case import DTYPE_NAMES, Case, Inputs, Settings, default_batches, fast_backends, register


@register("sample_triplanes")
def _sample_triplanes_cases(settings: Settings) -> List[Case]:
    """Planes ``[N, 3, 32, 256, 256]`` (25 MB per image in fp32), reduce ``mean``.

    GPU: 128 x 128 rays x 96 samples = 1,572,864 points per image, N = 1 (full: 1 and 4), fp32
    planes plus bf16 planes. CPU: 64 x 64 x 24 = 98,304 points per image (quick:
    32 x 32 x 16 = 16,384), N = 1. Points are uniform in ``[-0.52, 0.52] * box_warp``
    per axis: about 89% inside the cube, the rest just outside. ``box_warp`` is 1.0
    (Portrait4D uses 1.3; it does not change the speed).
    """
    from ...ops import triplanes

    device = settings.device
    cuda = device.type == "cuda"
    batches = default_batches(settings)
    if cuda:
        per_image = 128 * 128 * 96
    else:
        per_image = 32 * 32 * 16 if settings.small else 64 * 64 * 24
    dtypes = (torch.float32,) if settings.small else (torch.float32, torch.bfloat16)
    backends = fast_backends(triplanes.PREFERENCES, device)
    return [_triplanes_case(n, 32, 256, 256, per_image, dtype, backends)
            for dtype in dtypes for n in batches]


def _triplanes_case(n: int, c: int, h: int, w: int, m: int, dtype: torch.dtype,
                    backends: Tuple[str, ...], box_warp: float = 1.0) -> Case:
    from ...ops import sample_triplanes

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

