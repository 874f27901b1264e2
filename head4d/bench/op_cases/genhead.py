"""Benchmark cases of the whole GenHead (:class:`head4d.models.GenHead`): the full forward
(``genhead``: mapping, backbone, background, deformation, masks, rendering,
super-resolution) and the render-only path (``genhead_render``: planes cached, a new
camera and new codes), head4d's kernels against ``backend="torch"`` (every op inside the
model on its plain-PyTorch reference) in one run.

Goals (issue "GenHead on head4d's kernels", not yet measured on a GPU):

- H100, ``genhead`` at the released config (512^2 output, 64^2 neural rendering,
  48 + 48 samples), batch 1: at least 4x the ``torch`` backend, and at least 200 frames
  per second (a forward under 5 ms).
- H100, ``genhead_render`` at 64^2: at least 500 frames per second (under 2 ms).
- H100, ``genhead`` forward + backward at batch 4 (full mode): peak memory at most half of
  the ``torch`` backend's, i.e. the row's memory ratio (``mem ratio``, the reference's peak
  over the backend's) at least 2. The configuration for it is ``GenHeadConfig.fused=True``
  (each triplane read and decoded by :func:`~head4d.ops.decode_triplanes`, which keeps
  only its inputs for the backward), the CUDA default, so the CUDA rows measure it.
- CPU: at least 1.5x on ``genhead`` (one torch thread, the reduced config below). The CPU
  default decodes unfused (faster there: 9.6 s against 16.3 s for a forward + backward at
  batch 4, 64^2, one thread), so on the CPU the memory goal's configuration is a case of
  its own, ``..._fused`` (``fused=True``, ``fwd+bwd`` only); its memory ratio (saved
  bytes on the CPU) was 2.30x at N = 1, 16^2 (the default's 1.33x). At that small shape
  the peak ratio is lower, 1.55x (the super-resolution's 512^2 activations dominate); at
  the goal's batch 4 and 64^2 it is 4.40x (below).

What the memory goes to (``benchmarks/genhead_memory.py``, CPU, float32, one
forward + backward; ``benchmarks/results/2026-12-05-cpu-genhead-memory``): at batch 4,
64^2, 48 + 48 samples with the reduced config, the peak is 3346 MB on the references,
3065 MB with the default (unfused) and 761 MB with ``fused=True`` (4.40x); the unfused
decode's MLP activations (2.4 GB) are the difference. At the released config (batch 1,
64^2, on the CPU, so the super-resolution's and background's FP16 blocks in float32),
``fused=True`` reached 1.59x the reference's peak (1.86x in saved bytes): the backbone
(497 MB against 561 MB saved), the super-resolution (782 MB against 1461 MB) and the
background (188 MB against 213 MB) were 92% of what it kept, every ``bias_act`` keeping
its input beside the output the next layer keeps. Since the compiled ``bias_act`` keeps
its output for linear, relu and lrelu without a clamp (float32 / float64), the backbone
keeps 380 MB and ``fused=True`` reaches 1.69x the peak (2.01x saved); the
super-resolution's and background's layers clamp and keep what they kept, so the goal
is not met at batch 1 on the CPU.

Both cases time ``fwd`` (inference, no gradient) and ``fwd+bwd`` (the forward, then the
gradients of every parameter the forward uses, as a training step computes them). The
renderer's random numbers (depth jitter, importance sampling) come from a generator
seeded afresh on every call, so every backend renders the same sample draws.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from ..case import PASSES, REFERENCE, Case, Inputs, Settings, default_batches, register

#: Portrait4D's camera: 4 units from the origin, field of view 12 degrees.
_CAMERA_DISTANCE, _FOV_DEGREES = 4.0, 12.0

#: The super-resolution's block widths on the CPU (upstream: 256 at 256^2, 128 at 512^2).
_CPU_SR_CHANNELS = (8, 4)


def _config(cuda: bool):
    """The released ``genhead-ffhq512`` config on CUDA; on the CPU a reduced one
    (see :func:`_genhead_cases`)."""
    from ...models import GenHeadConfig

    if cuda:
        return GenHeadConfig()
    return GenHeadConfig(channel_base=1024, channel_max=32, triplane_resolution=64, background_resolution=32,
                         background_channel_base=256, background_channel_max=32, background_mapping_layers=2,
                         neural_rendering_resolution=16, mask_resolution=64, fine_resolution=12,
                         coarse_resolution=4)


def build_model(config, seed: int, device: torch.device) -> torch.nn.Module:
    """A GenHead with random weights from ``seed``: StyleGAN2's initialization, then
    random non-zero biases, noise strengths and decoder density weights (the released
    initialization zeroes the density head, which would render nothing). On the CPU
    the super-resolution's blocks are narrowed to :data:`_CPU_SR_CHANNELS` at their
    upstream resolutions."""
    from ...models import GenHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GenHead(config, _head(device))
        randomize_for_bench(model, device, seed)
    return model.to(device).eval()


def randomize_for_bench(model: torch.nn.Module, device: torch.device, seed: int,
                        density_weight_std: float = 1.0) -> None:
    """In place, for a bench model (GenHead or the reconstructor) on ``device``: off CUDA the
    super-resolution's blocks narrowed to :data:`_CPU_SR_CHANNELS` at their upstream
    resolutions; noise strengths, biases and the affine biases random and non-zero, the
    decoder's density weights N(0, ``density_weight_std``^2), ``w_avg`` random when the
    model has one at the top."""
    from ... import nn as hnn

    if device.type != "cuda" and model.superresolution is not None:
        sr = model.superresolution
        wide, narrow = _CPU_SR_CHANNELS
        sr.block0 = hnn.SynthesisBlock(sr.channels, wide, w_dim=512, resolution=256, img_channels=3,
                                       is_last=False, use_fp16=True, conv_clamp=256,
                                       fused_modconv_default="inference_only")
        sr.block1 = hnn.SynthesisBlock(wide, narrow, w_dim=512, resolution=512, img_channels=3, is_last=True,
                                       use_fp16=True, conv_clamp=256, fused_modconv_default="inference_only")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("noise_strength"):
                p.copy_(0.05 + 0.1 * torch.rand(p.shape, generator=gen))
            elif name.endswith("affine.bias"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name == "decoder.out_sigma.weight":
                p.copy_(density_weight_std * torch.randn(p.shape, generator=gen))
        if isinstance(getattr(model, "w_avg", None), torch.Tensor):
            model.w_avg.copy_(torch.randn(model.w_avg.shape, generator=gen))


def _cameras(n: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """``[N, 25]`` Portrait4D camera labels (OpenGL cam2world 16 + normalized intrinsics 9):
    at :data:`_CAMERA_DISTANCE` looking at the origin, yaw and pitch within +-0.3 rad."""
    yaw = (torch.rand(n, generator=gen, device=device) - 0.5) * 0.6
    pitch = (torch.rand(n, generator=gen, device=device) - 0.5) * 0.6
    backward = torch.stack([torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch), torch.cos(yaw) * torch.cos(pitch)], -1)
    up = torch.tensor([0.0, 1.0, 0.0], device=device).expand(n, 3)
    right = torch.linalg.cross(up, backward)
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.linalg.cross(backward, right)
    cam2world = torch.eye(4, device=device).repeat(n, 1, 1)
    cam2world[:, :3, 0], cam2world[:, :3, 1], cam2world[:, :3, 2] = right, up, backward
    cam2world[:, :3, 3] = _CAMERA_DISTANCE * backward
    focal = 0.5 / math.tan(math.radians(_FOV_DEGREES) / 2)  # in image widths
    intrinsics = torch.tensor([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1]], device=device).expand(n, 3, 3)
    return torch.cat([cam2world.reshape(n, 16), intrinsics.reshape(n, 9)], dim=1)


def _codes(model, n: int, device: torch.device, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Codes near the canonical ones: random shape, expression, neck, jaw and eye changes."""
    codes = model.head_model.canonical_codes(n)
    scales = {"shape": 0.3, "expression": 0.3, "neck_pose": 0.1, "jaw_pose": 0.05, "eye_pose": 0.1}
    return {k: v.to(device) + scales[k] * torch.randn(v.shape, generator=gen, device=device) for k, v in codes.items()}


class _Models:
    """One template model per (device, config kind): its buffers serve every call (the
    parameters come with the inputs, through ``torch.func.functional_call``)."""

    def __init__(self, cuda: bool, render_only: bool):
        self.cuda, self.render_only = cuda, render_only
        self.templates: Dict[str, torch.nn.Module] = {}

    def config(self):
        import dataclasses

        config = _config(self.cuda)
        if self.render_only:  # the neural rendering alone, at 64^2 (CPU: 16^2)
            config = dataclasses.replace(config, has_superresolution=False, has_background=False)
        return config

    def template(self, device: torch.device) -> torch.nn.Module:
        key = str(device)
        if key not in self.templates:
            self.templates[key] = build_model(self.config(), 0, device)
        return self.templates[key]

    def parameters(self, device: torch.device, seed: int) -> Dict[str, torch.Tensor]:
        """Fresh random parameters (a model built from ``seed``), the ones a forward uses."""
        model = build_model(self.config(), seed, device)
        return {k: p.detach() for k, p in model.named_parameters() if used_parameter(k)}


def used_parameter(name: str) -> bool:
    """Whether GenHead's forward reads the parameter ``name``: all but the
    super-resolution's noise strengths (it runs with ``noise_mode='none'``, as upstream)."""
    return not (name.startswith("superresolution.") and name.endswith("noise_strength"))


def _run_model(model: torch.nn.Module, params: Dict[str, torch.Tensor], backend: str, method: str,
               *args, fused: Optional[bool] = None, **kwargs):
    """``model.<method>(*args, **kwargs)`` with ``params`` in place of its parameters and
    every op inside on ``backend`` (``torch``: the references, decoded unfused; otherwise
    each op's default, head4d's kernels where built, with ``GenHeadConfig.fused = fused``)."""
    previous = model.backend, model.config.fused
    model.backend = "torch" if backend == REFERENCE else None
    model.config.fused = None if backend == REFERENCE else fused
    try:
        return torch.func.functional_call(_Method(model, method), {f"inner.{k}": v for k, v in params.items()},
                                          args, kwargs, tie_weights=False)
    finally:
        model.backend, model.config.fused = previous


class _Method(torch.nn.Module):
    """``forward`` calls ``inner.<method>`` (``functional_call`` calls ``forward``)."""

    def __init__(self, inner: torch.nn.Module, method: str):
        super().__init__()
        self.inner, self.method = inner, method

    def forward(self, *args, **kwargs):
        return getattr(self.inner, self.method)(*args, **kwargs)


def _fast_backends(device: torch.device) -> Tuple[str, ...]:
    """The name the fast side runs under: the device's compiled backend (the model runs
    every op on its default: head4d's kernels)."""
    return ("cuda",) if device.type == "cuda" else ("cpu",)


def _flat(out: Dict[str, torch.Tensor], keys: Tuple[str, ...]) -> torch.Tensor:
    return torch.cat([out[k].flatten(1) for k in keys], dim=1)


@register("genhead", whole_model=True)
def _genhead_cases(settings: Settings) -> List[Case]:
    """GenHead's forward from ``(z, c, codes)`` to the 512^2 image, every op on head4d's
    kernels (each op's default) against every op on its reference.

    CUDA: the released ``genhead-ffhq512`` config (triplanes 3 x 2 x 32 x 256^2, background
    at 64^2, 64^2 neural rendering with 48 + 48 samples, masks at 512^2, super-resolution
    to 512^2 with its FP16 blocks), N = 1 (full: 1 and 4). CPU (quick and default alike):
    a reduced config, N = 1: channel_base 1024, channel_max 32 (triplanes at 64^2, still
    192 channels), background at 32^2 (channels at most 32, a 2-layer mapping), 16^2
    neural rendering with 48 + 48 samples, masks at 64^2, neck grids 12^3 and 4^3, the
    super-resolution's blocks narrowed to 8 and 4 channels at 256^2 and 512^2.

    The output is ``image``, ``image_feature``, ``image_depth`` and ``opacity`` flattened
    and concatenated per sample; ``fwd+bwd`` differentiates every parameter the forward
    uses and measures memory (on CUDA the peak, so the batch-4 row shows the memory goal;
    on the CPU the bytes saved for the backward).

    Configurations: each op on its default (``GenHeadConfig.fused=None``: fused on CUDA,
    unfused on the CPU). On the CPU also ``..._fused``: ``fused=True``, ``fwd+bwd`` only,
    the configuration that meets the memory goal (module docstring).
    """
    device = settings.device
    cuda = device.type == "cuda"
    batches = default_batches(settings)
    cases = [_genhead_case(n, cuda) for n in batches]
    if not cuda:  # the CPU default decodes unfused: the configuration of the memory goal beside it
        cases += [_genhead_case(n, cuda, fused=True) for n in batches]
    return cases


def _genhead_case(n: int, cuda: bool, fused: Optional[bool] = None) -> Case:
    """The ``genhead`` case at batch ``n``; ``fused`` is the fast side's
    ``GenHeadConfig.fused`` (None: the default; True: a case of its own, ``fwd+bwd``
    only, its label ending in ``_fused``)."""
    models = _Models(cuda, render_only=False)
    config = models.config()
    r = config.neural_rendering_resolution
    keys = ("image", "image_feature", "image_depth", "opacity")
    width = 3 * config.img_resolution ** 2 + (32 + 2) * r * r
    grad_of = tuple(k for k in parameter_names(config) if used_parameter(k))

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        template = models.template(device)
        inputs = models.parameters(device, seed)
        inputs["z"] = torch.randn(n, config.z_dim, generator=gen, device=device)
        inputs["c"] = _cameras(n, device, gen)
        inputs.update({f"codes.{k}": v for k, v in _codes(template, n, device, gen).items()})
        inputs["grad_out"] = torch.randn(n, width, generator=gen, device=device)
        return inputs

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        device = inputs["z"].device
        model = models.template(device)
        codes = {k[len("codes."):]: v for k, v in inputs.items() if k.startswith("codes.")}
        params = {k: inputs[k] for k in grad_of}
        out = _run_model(model, params, backend, "forward", inputs["z"], inputs["c"], codes, fused=fused,
                         generator=torch.Generator(device=device).manual_seed(1))
        return _flat(out, keys)

    points = n * r * r * (config.depth_resolution + config.depth_resolution_importance)
    return Case(
        op="genhead",
        shape=_label(n, config, cuda) + ("_fused" if fused else ""),
        passes=("fwd+bwd",) if fused else PASSES,
        make_inputs=make_inputs,
        run=run,
        grad_of=grad_of,
        # what must move at the least: the planes written and read twice per triplane
        # read, the image written (rough; the convolutions dominate the FLOPs)
        nbytes={"fwd": _planes_bytes(n, config) * 3 + n * width * 4,
                "fwd+bwd": _planes_bytes(n, config) * 6 + 2 * n * width * 4},
        flops={"fwd": _forward_flops(n, config, points), "fwd+bwd": 3 * _forward_flops(n, config, points)},
        dtype=torch.float32,
        backends=_fast_backends(torch.device("cuda" if cuda else "cpu")),
        measure_memory=True,
        tolerance=_tolerance(cuda),
    )


@register("genhead_render", whole_model=True)
def _render_cases(settings: Settings) -> List[Case]:
    """GenHead's render-only path: :meth:`GenHead.render` of cached planes with a new
    camera and new codes (deformation, masks, rays, the two triplanes decoded and
    blended, compositing with a cached background), no backbone and no
    super-resolution: the 64^2 neural rendering (CPU: 16^2). Configs as ``genhead``'s;
    planes ``[N, 6, 32, 256, 256]`` (CPU: 64^2) and a background ``[N, 32, 64, 64]``
    (CPU: 32^2) in (0, 1) are inputs. Output: ``image_feature``, ``image_depth`` and
    ``opacity`` flattened per sample; ``fwd+bwd`` differentiates the planes and the
    decoder's parameters."""
    device = settings.device
    cuda = device.type == "cuda"
    return [_render_case(n, cuda) for n in default_batches(settings)]


def _render_case(n: int, cuda: bool) -> Case:
    models = _Models(cuda, render_only=True)
    config = models.config()
    r = config.neural_rendering_resolution
    res, bg_res = config.triplane_resolution, config.background_resolution
    keys = ("image_feature", "image_depth", "opacity")
    width = (32 + 2) * r * r
    decoder_keys = tuple(k for k in parameter_names(config) if k.startswith("decoder."))

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        template = models.template(device)
        inputs = _decoder_parameters(template, seed)
        inputs["planes"] = torch.randn(n, 6, config.plane_features, res, res, generator=gen, device=device)
        inputs["background"] = torch.rand(n, 32, bg_res, bg_res, generator=gen, device=device)
        inputs["camera"] = _cameras(n, device, gen)
        inputs.update({f"codes.{k}": v for k, v in _codes(template, n, device, gen).items()})
        inputs["grad_out"] = torch.randn(n, width, generator=gen, device=device)
        return inputs

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        device = inputs["planes"].device
        model = models.template(device)
        codes = {k[len("codes."):]: v for k, v in inputs.items() if k.startswith("codes.")}
        params = {k: inputs[k] for k in decoder_keys}
        out = _run_model(model, params, backend, "render", inputs["planes"], inputs["camera"], codes,
                         background=inputs["background"], generator=torch.Generator(device=device).manual_seed(1))
        return _flat(out, keys)

    points = n * r * r * (config.depth_resolution + config.depth_resolution_importance)
    planes_b = _planes_bytes(n, config)
    return Case(
        op="genhead_render",
        shape=f"N{n}_R{r}x{r}_S{config.depth_resolution}+{config.depth_resolution_importance}_planes{res}_fp32",
        make_inputs=make_inputs,
        run=run,
        grad_of=("planes",) + decoder_keys,
        nbytes={"fwd": planes_b + n * width * 4, "fwd+bwd": 2 * planes_b + 2 * n * width * 4},
        flops={"fwd": _render_flops(points), "fwd+bwd": 3 * _render_flops(points)},
        dtype=torch.float32,
        backends=_fast_backends(torch.device("cuda" if cuda else "cpu")),
        measure_memory=True,
        tolerance=_tolerance(cuda),
    )


def _decoder_parameters(model: torch.nn.Module, seed: int) -> Dict[str, torch.Tensor]:
    """Fresh random decoder parameters from ``seed`` (``decoder.*``, on the model's device):
    unit-variance weights, as StyleGAN2 stores them, and biases of scale 0.1."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, p in model.named_parameters():
        if name.startswith("decoder."):
            scale = 0.1 if name.endswith("bias") else 1.0
            params[name] = (scale * torch.randn(p.shape, generator=gen)).to(p.device)
    return params


def parameter_names(config) -> Tuple[str, ...]:
    """GenHead's parameter names for ``config`` (a model built once on the CPU and kept;
    narrowing the super-resolution keeps the names)."""
    key = repr(config)
    if key not in _PARAMETER_NAMES:
        from ...models import GenHead

        _PARAMETER_NAMES[key] = tuple(k for k, _ in GenHead(config, _head(torch.device("cpu"))).named_parameters())
    return _PARAMETER_NAMES[key]


_PARAMETER_NAMES: Dict[str, Tuple[str, ...]] = {}
_HEADS: Dict[str, torch.nn.Module] = {}


def _head(device: torch.device):
    """A copy of the built-in ProceduralHead (built once per process; 0.75 s on the CPU)."""
    import copy

    from ...head import ProceduralHead

    if "cpu" not in _HEADS:
        _HEADS["cpu"] = ProceduralHead()
    return copy.deepcopy(_HEADS["cpu"])


def _label(n: int, config, cuda: bool) -> str:
    sr = "" if cuda else "_srnarrow"
    return (f"N{n}_img{config.img_resolution}_R{config.neural_rendering_resolution}_S{config.depth_resolution}+"
            f"{config.depth_resolution_importance}_planes{config.triplane_resolution}_base{config.channel_base}"
            f"{sr}_fp32")


def _planes_bytes(n: int, config) -> int:
    return n * config.triplane_channels * config.triplane_resolution ** 2 * 4


def _render_flops(points: int) -> int:
    """Per decoded point, twice (part and head): 12 taps x 32 channels x 2 and the MLP
    2 x (32 x 64 + 64 x 33); the warp and the blend ignored."""
    return 2 * points * (12 * 32 * 2 + 2 * (32 * 64 + 64 * 33))


def _forward_flops(n: int, config, points: int) -> int:
    """The rendering's FLOPs plus the backbone's 3 x 3 convolutions (two per block, at the
    block's resolution and width; the background and super-resolution left out)."""
    flops = _render_flops(points)
    res = 8
    while res <= config.triplane_resolution:
        ch = min(config.channel_base // res, config.channel_max)
        flops += 2 * 2 * n * ch * ch * 9 * res * res
        res *= 2
    return flops


def _tolerance(cuda: bool) -> float:
    """The bound on the relative error of the output and each gradient.

    CPU: float32 throughout, but dozens of ops in a row and gradients summed in another
    order (as the ``render`` case: 1e-4). CUDA: the background generator and the
    super-resolution run FP16 blocks, whose values round to float16 (eps 9.8e-4) where
    the two backends' float32 results differ by rounding: the float16 bound of
    :data:`~head4d.bench.case.TOLERANCE` (2e-3)."""
    return 2e-3 if cuda else 1e-4
