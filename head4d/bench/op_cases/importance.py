"""Benchmark cases of ``sample_importance``: the inverse-CDF fine-sample draw."""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from ..case import Case, Inputs, Settings, default_batches, fast_backends, register


@register("sample_importance")
def _sample_importance_cases(settings: Settings) -> List[Case]:
    """EG3D's fine-sample draw: 48 coarse depths (stratified in ``[2.25, 3.3]``) and
    their 47 compositing-like weights (``rand ** 4``) -> 48 fine depths per ray, random
    ``u`` from a generator seeded the same for every backend (so outputs compare).
    Forward only: the op has no gradient.

    GPU: 64^2 and 128^2 rays, N = 1 (full: 1 and 4). CPU: 64^2 and 128^2 rays (quick: 32^2), N = 1.
    """
    from ...ops import sampling

    device = settings.device
    cuda = device.type == "cuda"
    batches = default_batches(settings)
    resolutions = (32,) if settings.small and not cuda else (64,) if settings.small else (64, 128)
    backends = fast_backends(sampling.PREFERENCES, device)
    return [_importance_case(n, res * res, 48, 48, backends) for n in batches for res in resolutions]


def _importance_case(n: int, r: int, s: int, n_imp: int, backends: Tuple[str, ...]) -> Case:
    from ...ops import sample_importance

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

