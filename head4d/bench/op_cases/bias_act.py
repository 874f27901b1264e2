"""Benchmark cases of ``bias_act``: StyleGAN2's fused bias + lrelu + gain + clamp."""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..case import DTYPE_NAMES, Case, Inputs, Settings, fast_backends, register


@register("bias_act")
def _bias_act_cases(settings: Settings) -> List[Case]:
    """GenHead's synthesis layers at 512^2: lrelu with gain sqrt 2 and clamp 256 on
    ``[8, 512, 64, 64]`` and ``[8, 128, 256, 256]``, float16 and float32, the bias
    along channels. CPU: ``[2, 128, 64, 64]`` float32 (quick and default), plus
    ``[8, 512, 64, 64]`` float32 in the full mode.
    """
    from ...ops.bias_act import PREFERENCES

    device = settings.device
    backends = fast_backends(PREFERENCES, device)
    if device.type == "cuda":
        shapes = [(8, 512, 64, 64), (8, 128, 256, 256)]
        dtypes = (torch.float16, torch.float32)
    else:
        shapes = [(2, 128, 64, 64)] if settings.small else [(2, 128, 64, 64), (8, 512, 64, 64)]
        dtypes = (torch.float32,)
    return [_bias_act_case(shape, dtype, backends) for dtype in dtypes for shape in shapes]


def _bias_act_case(shape: Tuple[int, int, int, int], dtype: torch.dtype, backends: Tuple[str, ...]) -> Case:
    from ...ops import bias_act

    n, c, h, w = shape

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        x = (torch.randn(shape, generator=gen, device=device) * 100).to(dtype)
        b = torch.randn(c, generator=gen, device=device).to(dtype)
        grad_out = torch.randn(shape, generator=gen, device=device).to(dtype)
        return {"x": x, "b": b, "grad_out": grad_out}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        return bias_act(inputs["x"], inputs["b"], 1, "lrelu", clamp=256.0, backend=backend)

    elt = torch.tensor([], dtype=dtype).element_size()
    x_bytes = n * c * h * w * elt
    # The floor of a fused elementwise op: forward reads x, writes y; the backward reads
    # grad_out and x (z is recomputed), writes grad_x; grad_b is a reduction of grad_x
    # (read once more). Bias bytes are negligible.
    fwd_bytes = 2 * x_bytes
    return Case(
        op="bias_act",
        shape=f"N{n}_C{c}_{h}x{w}_{DTYPE_NAMES[dtype]}",
        make_inputs=make_inputs,
        run=run,
        grad_of=("x", "b"),
        nbytes={"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + 4 * x_bytes},
        # per element: add, compare/select, multiply (gain), clamp (2 compares)
        flops={"fwd": 5 * n * c * h * w, "fwd+bwd": 12 * n * c * h * w},
        dtype=dtype,
        backends=backends,
    )
