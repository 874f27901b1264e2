"""Benchmark cases of ``attention``: Portrait4D's transformer shapes and the standard sweep."""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..case import DTYPE_NAMES, Case, Inputs, Settings, register


@register("attention")
def _attention_cases(settings: Settings) -> List[Case]:
    """Portrait4D's transformer shapes, batch 4, bf16: cross-attention to the motion
    tokens (H 4, Lq 1,024, Lk 64, D 256), self-attention (H 4, L 1,024, D 256), the
    triplane decoder's spatial-reduction attention (H 2, Lq 16,384, Lk 4,096, D 512),
    and the standard sweep (H 16, D 64 and 128, L 1,024 and 4,096; full: L 512 to 8,192;
    quick: L 4,096, D 64 only).

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
                _attention_case("self", 1, 4, 1024, 1024, 256, torch.float32, ("sdpa",))][: 1 if settings.small else 2]
    backends = ("triton", "sdpa")
    b = (settings.batches or (4,))[0]
    shapes = [("cross", b, 4, 1024, 64, 256), ("self", b, 4, 1024, 1024, 256)]
    if settings.small:
        shapes.append(("sweep", b, 16, 4096, 4096, 64))
    else:
        shapes.append(("decoder", b, 2, 16384, 4096, 512))
        # 16k: the reference's scores would need 68 GB
        lengths = (512, 1024, 2048, 4096, 8192) if settings.full else (1024, 4096)
        for d in (64, 128):
            for length in lengths:
                shapes.append(("sweep", b, 16, length, length, d))
    return [_attention_case(*shape, torch.bfloat16, backends) for shape in shapes]


def _attention_case(kind: str, b: int, h: int, lq: int, lk: int, d: int, dtype: torch.dtype,
                    backends: Tuple[str, ...]) -> Case:
    from ...ops import attention

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

