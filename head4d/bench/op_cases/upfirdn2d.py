"""Benchmark cases of ``upfirdn2d``: StyleGAN2's 2x up- and downsampling with the 4-tap
``[1, 3, 3, 1]`` filter (``upsample2d`` / ``downsample2d``), the calls around every
resolution change of GenHead's generators and discriminator."""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..case import DTYPE_NAMES, Case, Inputs, Settings, fast_backends, register


@register("upfirdn2d")
def _upfirdn2d_cases(settings: Settings) -> List[Case]:
    """``upsample2d`` and ``downsample2d`` (factor 2, the 4 x 4 filter of ``[1, 3, 3, 1]``).

    GPU: ``[8, 256, 128, 128]`` and ``[8, 3, 512, 512]`` fp32 (GenHead at 512^2; quick: the
    first). CPU: ``[1, 64, 64, 64]`` (quick: ``[1, 32, 32, 32]``), fp32."""
    from ...ops.upfirdn2d import PREFERENCES  # (head4d.ops.upfirdn2d the attribute is the function)

    device = settings.device
    if device.type == "cuda":
        shapes = [(8, 256, 128, 128)] if settings.small else [(8, 256, 128, 128), (8, 3, 512, 512)]
    else:
        shapes = [(1, 32, 32, 32)] if settings.small else [(1, 64, 64, 64)]
    backends = fast_backends(PREFERENCES, device)
    return [_resample_case(direction, shape, torch.float32, backends)
            for direction in ("up", "down") for shape in shapes]


def _resample_case(direction: str, shape: Tuple[int, int, int, int], dtype: torch.dtype,
                   backends: Tuple[str, ...]) -> Case:
    from ...ops import downsample2d, setup_filter, upsample2d

    n, c, h, w = shape
    up = direction == "up"
    oh, ow = (2 * h, 2 * w) if up else (h // 2, w // 2)

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        return {"x": torch.randn(shape, generator=gen, device=device).to(dtype),
                "f": setup_filter([1, 3, 3, 1], device=device),
                "grad_out": torch.randn(n, c, oh, ow, generator=gen, device=device).to(dtype)}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        resample = upsample2d if up else downsample2d
        return resample(inputs["x"], inputs["f"], backend=backend)

    elt = torch.tensor([], dtype=dtype).element_size()
    in_b, out_b = n * c * h * w * elt, n * c * oh * ow * elt
    # taps that meet input samples: 2 x 2 of 16 per output upsampling, all 16 downsampling;
    # the gradient is the opposite resampling, with the same multiply-adds
    fwd_flops = n * c * oh * ow * 2 * (4 if up else 16)
    return Case(
        op="upfirdn2d",
        shape=f"{direction}2_N{n}_C{c}_{h}x{w}_{DTYPE_NAMES[dtype]}",
        make_inputs=make_inputs,
        run=run,
        grad_of=("x",),
        # forward: x read, output written; backward: grad_out read, grad_x written
        nbytes={"fwd": in_b + out_b, "fwd+bwd": 2 * (in_b + out_b)},
        flops={"fwd": fwd_flops, "fwd+bwd": 2 * fwd_flops},
        dtype=dtype,
        backends=backends,
    )
