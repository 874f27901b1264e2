"""Benchmark cases of ``decode_triplanes``: triplane sampling and the decoder MLP, fused."""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from ..case import DTYPE_NAMES, Case, Inputs, Settings, default_batches, fast_backends, register


@register("decode_triplanes")
def _decode_triplanes_cases(settings: Settings) -> List[Case]:
    """Planes ``[N, 3, 32, 256, 256]``, EG3D's decoder sizes (32 -> 64 -> 1 + 32), random
    effective weights, points uniform in ``[-0.52, 0.52]^3`` (about 89% inside the cube).

    GPU: 64^2 and 128^2 rays x 96 points per image (393,216 and 1,572,864 points),
    N = 1 (full: 1 and 4), fp32 planes plus bf16 planes. CPU: 64 x 64 x 24 = 98,304 points
    (quick: 16,384), N = 1, fp32. The timed output is ``cat([rgb, sigma], -1)``;
    ``fwd+bwd`` differentiates all six inputs.
    """
    from ...ops import decoding

    device = settings.device
    cuda = device.type == "cuda"
    batches = default_batches(settings)
    if cuda:
        points = (64 * 64 * 96,) if settings.small else (64 * 64 * 96, 128 * 128 * 96)
    else:
        points = (32 * 32 * 16,) if settings.small else (64 * 64 * 24,)
    dtypes = (torch.float32,) if settings.small or not cuda else (torch.float32, torch.bfloat16)
    backends = fast_backends(decoding.PREFERENCES, device)
    return [_decode_case(n, 32, 256, 256, m, 64, 33, dtype, backends)
            for dtype in dtypes for n in batches for m in points]


def _decode_case(n: int, c: int, h: int, w: int, m: int, hidden: int, outputs: int, dtype: torch.dtype,
                 backends: Tuple[str, ...]) -> Case:
    from ...ops import decode_triplanes

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

