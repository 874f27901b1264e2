"""Benchmark cases of the StyleGAN2 convolutions: one modulated 3 x 3 convolution with
2x upsampling (``modulated_conv2d``), and a discriminator-shaped stack's forward and
backward with an R1 penalty (``discriminator_r1``). Both are compositions of torch's
convolutions with head4d's ``upfirdn2d`` and ``bias_act``, so they are registered as
whole models: they time the composition and set no op's backend order."""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

from ..case import REFERENCE, Case, Inputs, Settings, fast_backends, register


@register("modulated_conv2d", whole_model=True)
def _modulated_conv2d_cases(settings: Settings) -> List[Case]:
    """GenHead's triplane backbone at its b256 block: the SynthesisLayer conv0 from 128^2
    to 256^2 (3 x 3, up 2, padding 1, the ``[1, 3, 3, 1]`` filter, flip_weight False,
    demodulated, fused, noise ``[N, 1, 256, 256]``), 256 -> 128 channels (b128 has 256,
    b256 128). The fast backends run :func:`head4d.ops.modulated_conv2d` (transposed
    conv + ``upfirdn2d`` on that backend); the reference is
    :func:`head4d.reference.conv2d_resample.modulated_conv2d` (one sample at a time,
    zero insertion, full-resolution convolution).

    GPU: N = 8, x ``[8, 256, 128, 128]`` fp32. Forward: 77.3 GFLOP (the transposed conv:
    2 x 8 x 128 x 256 x 9 x 128^2) plus 2.1 GFLOP of filtering; at least 402 MB moved
    (x 134 MB read, the output 268 MB written), 0.94 GB with the transposed conv's
    ``[8, 128, 257, 257]`` written and read once. H100 floor: compute-bound, 0.16 ms
    with TF32 tensor cores at their dense peak (cuDNN's default for fp32 convolutions
    in torch), 1.15 ms at the 67 TFLOP/s of plain fp32; bandwidth alone 0.12 ms.
    CPU: x ``[2, 64, 32, 32]`` -> 32 channels at 64^2 (quick and default alike).
    """
    from ...ops.upfirdn2d import PREFERENCES

    device = settings.device
    if device.type == "cuda":
        shape = (8, 256, 128, 128, 128)
    else:
        shape = (2, 64, 32, 32, 32)
    return [_modulated_case(shape, fast_backends(PREFERENCES, device))]


def _modulated_case(shape: Tuple[int, int, int, int, int], backends: Tuple[str, ...]) -> Case:
    from ...ops import modulated_conv2d, setup_filter
    from ...reference import conv2d_resample as reference

    n, c, h, w, o = shape
    oh, ow = 2 * h, 2 * w

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        return {"x": torch.randn(n, c, h, w, generator=gen, device=device),
                "weight": torch.randn(o, c, 3, 3, generator=gen, device=device),
                "styles": torch.randn(n, c, generator=gen, device=device) * 0.5 + 1,
                "noise": torch.randn(n, 1, oh, ow, generator=gen, device=device) * 0.1,
                "f": setup_filter([1, 3, 3, 1], device=device),
                "grad_out": torch.randn(n, o, oh, ow, generator=gen, device=device)}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        if backend == REFERENCE:
            return reference.modulated_conv2d(inputs["x"], inputs["weight"], inputs["styles"], inputs["noise"], up=2,
                                              padding=(1, 1, 1, 1), resample_filter=inputs["f"], flip_weight=False)
        return modulated_conv2d(inputs["x"], inputs["weight"], inputs["styles"], inputs["noise"], up=2, padding=1,
                                resample_filter=inputs["f"], flip_weight=False, fused_modconv=True, backend=backend)

    x_b, out_b = n * c * h * w * 4, n * o * oh * ow * 4
    conv_flops = 2 * n * o * c * 9 * h * w
    fir_flops = 2 * 16 * n * o * oh * ow
    return Case(
        op="modulated_conv2d",
        shape=f"up2_N{n}_C{c}to{o}_{h}x{w}_fp32",
        make_inputs=make_inputs,
        run=run,
        grad_of=("x", "weight", "styles"),
        # forward: x read, output written; backward: grad_out read, grad_x written
        nbytes={"fwd": x_b + out_b, "fwd+bwd": 2 * (x_b + out_b)},
        # the backward: the input gradient and the weight gradient, each a conv as large
        flops={"fwd": conv_flops + fir_flops, "fwd+bwd": 3 * (conv_flops + fir_flops)},
        dtype=torch.float32,
        backends=backends,
        # 256 x 9 products per output and the demodulation's sums: float32 summation order
        tolerance=1e-4,
    )


# ----------------------------------------------------------------------------------
# The discriminator-shaped stack
# ----------------------------------------------------------------------------------

#: Conv2dLayer's clamp in Portrait4D's dual discriminator.
_CONV_CLAMP = 256.0


def _channels(res: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // res, channel_max)


def discriminator_parameters(resolution: int, img_channels: int, channel_base: int, channel_max: int,
                             device: torch.device, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Random parameters of :func:`discriminator_r1` (unit-variance weights, as StyleGAN2
    stores them before its runtime gain ``1 / sqrt(fan_in)``; small random biases)."""
    params = {}

    def conv(name: str, out_c: int, in_c: int, k: int, bias: bool = True):
        params[f"{name}.weight"] = torch.randn(out_c, in_c, k, k, generator=gen, device=device)
        if bias:
            params[f"{name}.bias"] = torch.randn(out_c, generator=gen, device=device) * 0.1

    res = resolution
    conv("fromrgb", _channels(res, channel_base, channel_max), img_channels, 1)
    while res > 4:
        tmp, out = _channels(res, channel_base, channel_max), _channels(res // 2, channel_base, channel_max)
        conv(f"b{res}.skip", out, tmp, 1, bias=False)
        conv(f"b{res}.conv0", tmp, tmp, 3)
        conv(f"b{res}.conv1", out, tmp, 3)
        res //= 2
    return params


def discriminator_r1(img: torch.Tensor, params: Dict[str, torch.Tensor], f: torch.Tensor,
                     backend: str) -> torch.Tensor:
    """A stack shaped like the resnet blocks of Portrait4D's dual discriminator, built
    from head4d ops only, and its R1 penalty. Not the discriminator itself (that one
    comes with the GenHead models): it stops before the b4 epilogue (minibatch std, the
    fc layers and the camera conditioning) and sums its ``[N, C, 4, 4]`` output into the
    logit.

    Layers, as StyleGAN2's ``Conv2dLayer`` computes them (weight times ``1 / sqrt(fan_in)``,
    ``conv2d_resample`` with padding ``k // 2`` and the ``[1, 3, 3, 1]`` filter, then
    ``bias_act``): ``fromrgb`` 1 x 1 with lrelu, then per block ``skip`` (1 x 1 down 2, no
    bias, linear, gain sqrt 0.5), ``conv0`` (3 x 3, lrelu) and ``conv1`` (3 x 3 down 2,
    lrelu, gain sqrt 0.5), the block's output ``skip + conv1``; clamp 256 (times the gain).

    Args:
        img: ``[N, C_img, R, R]`` float32.
        params: from :func:`discriminator_parameters`.
        f: the 4 x 4 filter of ``[1, 3, 3, 1]`` (``setup_filter``).
        backend: every op's backend (``upfirdn2d`` inside ``conv2d_resample``, and
            ``bias_act``); ``"torch"`` runs them all on their references.

    Returns:
        ``[2 N]``: the N logits, then the N R1 penalties ``|d sum(logits) / d img|^2``
        (computed with ``create_graph``, so a backward of this output is R1's double backward).
    """
    from ...ops import bias_act, conv2d_resample

    def layer(x: torch.Tensor, name: str, down: int = 1, act: str = "lrelu", gain: float = 1.0) -> torch.Tensor:
        weight = params[f"{name}.weight"]
        weight = weight * (1 / math.sqrt(weight[0].numel()))
        x = conv2d_resample(x, weight, f, down=down, padding=weight.shape[-1] // 2, backend=backend)
        act_gain = (math.sqrt(2) if act == "lrelu" else 1.0) * gain
        return bias_act(x, params.get(f"{name}.bias"), act=act, gain=act_gain, clamp=_CONV_CLAMP * gain,
                        backend=backend)

    img = img.detach().requires_grad_(True)
    x = layer(img, "fromrgb")
    res = img.shape[-1]
    while res > 4:
        y = layer(x, f"b{res}.skip", down=2, act="linear", gain=math.sqrt(0.5))
        x = layer(x, f"b{res}.conv0")
        x = layer(x, f"b{res}.conv1", down=2, gain=math.sqrt(0.5))
        x = y + x
        res //= 2
    logits = x.sum(dim=[1, 2, 3])
    (grad_img,) = torch.autograd.grad(logits.sum(), img, create_graph=True)
    return torch.cat([logits, grad_img.square().sum(dim=[1, 2, 3])])


@register("discriminator_r1", whole_model=True)
def _discriminator_cases(settings: Settings) -> List[Case]:
    """:func:`discriminator_r1`'s forward and backward (the R1 penalty's double backward
    included), every op on a fast backend against every op on ``torch`` (their
    references; the convolutions are torch's in both). Only ``fwd+bwd``: the penalty
    needs the gradient of the forward.

    GPU: Portrait4D's dual discriminator's shape, 10 channels at 512^2, channel_base
    32768, channel_max 512 (64 -> 128 -> 256 -> 512 channels), batch 8 (quick: 2), fp32.
    Its forward is about 1.0 TFLOP at batch 8 (:func:`_stack_costs`), the step with R1
    about six times that (the forward, the input gradient, then the backward of both),
    6 TFLOP: an H100 floor near 12 ms at TF32's dense peak (495 TFLOP/s), 90 ms at
    plain fp32 (67 TFLOP/s); compute-bound (3.6 GB of forward activations).
    (Portrait4D runs b512-b64 in float16; this stack is float32 throughout.)
    CPU: batch 1 at 64^2, channel_base 2048, channel_max 128 (32 -> 64 -> 128 channels).
    """
    from ...ops.upfirdn2d import PREFERENCES

    device = settings.device
    if device.type == "cuda":
        n = 2 if settings.quick else 8
        config = (n, 512, 10, 32768, 512)
    else:
        config = (1, 64, 10, 2048, 128)
    return [_discriminator_case(config, fast_backends(PREFERENCES, device))]


def _stack_costs(n: int, resolution: int, img_channels: int, channel_base: int,
                 channel_max: int) -> Tuple[int, int]:
    """``(forward FLOPs, bytes of the activations written)`` of :func:`discriminator_r1`'s
    stack (convolutions as 2 multiply-adds per tap, the 4 x 4 filter's 16 taps)."""
    flops, act_bytes = 0, 0
    res = resolution
    ch = _channels(res, channel_base, channel_max)
    flops += 2 * n * ch * img_channels * res * res
    act_bytes += 4 * n * ch * res * res
    while res > 4:
        out = _channels(res // 2, channel_base, channel_max)
        half = res // 2
        flops += 2 * 16 * n * ch * half * half + 2 * n * out * ch * half * half  # skip: filter, then 1x1
        flops += 2 * n * ch * ch * 9 * res * res  # conv0
        flops += 2 * 16 * n * ch * (res + 1) ** 2 + 2 * n * out * ch * 9 * half * half  # conv1: filter, strided 3x3
        act_bytes += 4 * n * (ch * res * res + ch * (res + 1) ** 2 + 2 * out * half * half)
        ch, res = out, half
    return flops, act_bytes


def _discriminator_case(config: Tuple[int, int, int, int, int], backends: Tuple[str, ...]) -> Case:
    from ...ops import setup_filter

    n, resolution, img_channels, channel_base, channel_max = config
    names = tuple(discriminator_parameters(resolution, img_channels, channel_base, channel_max,
                                           torch.device("meta"), None))

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        inputs = discriminator_parameters(resolution, img_channels, channel_base, channel_max, device, gen)
        inputs["img"] = torch.rand(n, img_channels, resolution, resolution, generator=gen, device=device) * 2 - 1
        inputs["f"] = setup_filter([1, 3, 3, 1], device=device)
        inputs["grad_out"] = torch.randn(2 * n, generator=gen, device=device)
        return inputs

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        return discriminator_r1(inputs["img"], {k: inputs[k] for k in names}, inputs["f"], backend)

    fwd_flops, act_bytes = _stack_costs(n, resolution, img_channels, channel_base, channel_max)
    return Case(
        op="discriminator_r1",
        shape=f"N{n}_{img_channels}x{resolution}x{resolution}_base{channel_base}_max{channel_max}_fp32",
        make_inputs=make_inputs,
        run=run,
        grad_of=names,
        # activations written and read in the forward, three more passes over them after
        nbytes={"fwd+bwd": 4 * 2 * act_bytes},
        flops={"fwd+bwd": 6 * fwd_flops},
        dtype=torch.float32,
        backends=backends,
        passes=("fwd+bwd",),
        # a dozen layers, a gradient and its backward in float32: the sums' order differs
        tolerance=1e-4,
    )
