"""Benchmark cases of ``composite_rays``: EG3D's ray marcher."""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..case import DTYPE_NAMES, Case, Inputs, Settings, default_batches, fast_backends, register


@register("composite_rays")
def _composite_rays_cases(settings: Settings) -> List[Case]:
    """Colors ``[N, R, S, 32]``, stratified sorted depths in ``[2.25, 3.3]`` (EG3D's
    near / far), raw densities ``randn * 2``, no background.

    GPU: 128 x 128 rays x 96 samples per image, N = 1 (full: 1 and 4), fp32 plus bf16. CPU:
    64 x 64 rays x 48 samples (quick: 32 x 32 x 48), N = 1. The timed output is
    ``cat([rgb, depth], -1)`` so that ``fwd+bwd`` carries gradients through both.
    """
    from ...ops import compositing

    device = settings.device
    cuda = device.type == "cuda"
    batches = default_batches(settings)
    if cuda:
        rays, samples = 128 * 128, 96
    else:
        rays, samples = (32 * 32 if settings.small else 64 * 64), 48
    dtypes = (torch.float32,) if settings.small or not cuda else (torch.float32, torch.bfloat16)
    backends = fast_backends(compositing.PREFERENCES, device)
    return [_composite_case(n, rays, samples, 32, dtype, backends) for dtype in dtypes for n in batches]


def _composite_case(n: int, r: int, s: int, c: int, dtype: torch.dtype, backends: Tuple[str, ...]) -> Case:
    from ...ops import composite_rays

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

