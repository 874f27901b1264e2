"""Benchmark cases of the reconstructor (:class:`head4d.models.Reconstructor`), head4d's
kernels (every op on its default) against the same model with ``backend="torch"`` (every
op inside it on its plain-PyTorch reference) in one run, and of the triplane decoder's
attention against PyTorch's ``scaled_dot_product_attention``:

- ``reconstructor_encode``: :meth:`Reconstructor.encode` (the two encoders, the
  canonicalization blocks, the background U-Net), once per source image; ``fwd``.
- ``reconstructor_reenact``: :meth:`Reconstructor.reenact` of an encoded source (the
  re-enactment blocks, the triplane decoder, the render with 48 + 48 samples, the
  super-resolution), per frame batch; ``fwd``.
- ``reconstructor_train``: the training-shaped step, the one-call forward from the source
  image to the super-resolved image, then the gradients of every parameter it reads;
  ``fwd+bwd`` with memory measured (the peak on CUDA, the bytes saved for the backward on
  the CPU). The model runs in training mode and decodes the triplane fused
  (``fused=True``, :func:`~head4d.ops.decode_triplanes`) on both sides, as a training run
  configures it for memory.
- ``decoder_attention``: the triplane decoder's attention shape through
  :func:`head4d.ops.attention` (``triton`` on CUDA), with ``sdpa`` (the peer) beside it.

Goals (issue "The reconstructor", not yet measured on a GPU):

- H100, ``reconstructor_reenact`` at the released sizes (source 512^2, 128^2 neural
  rendering, 48 + 48 samples, super-resolution to 512^2), batch 1: at least 4x the
  ``torch`` backend and at least 120 frames per second (a call under 8.3 ms); batch 8
  is timed too.
- H100, ``decoder_attention``: ``triton`` at least as fast as ``sdpa`` (its ratio over the
  reference at least ``sdpa``'s).
- H100, ``reconstructor_train`` at batch 4: peak memory at most 60% of the ``torch``
  backend's, i.e. the row's ``mem ratio`` (the reference's peak over head4d's) at least
  1 / 0.6 = 1.67.
- CPU: at least 1.5x (one torch thread, the reduced sizes below).

Sizes. CUDA: the released v1 configuration (source 512^2, canonical tokens 32 x 32 of
1,024 channels, triplane 3 x 32 x 256^2, 128^2 neural rendering, super-resolution to
512^2 with its widths); ``reconstructor_encode`` N = 1, ``reconstructor_reenact`` N = 1
and 8, ``reconstructor_train`` N = 1 and 4 in the full mode (the gate's, which
``benchmarks/run_gpu.sh`` runs after the bench), N = 1 for both in the default mode
(``--batch`` overrides each). CPU (every mode): the full widths at a 64^2 source (4 x 4 canonical tokens, a 32 x 32 triplane, the decoder's
attention over 16 x 16 queries and 8 x 8 keys), 16^2 neural rendering with 48 + 48
samples, the neck grids 12^3 and 4^3, the super-resolution's blocks narrowed to 8 and 4
channels at their upstream 256^2 and 512^2; N = 1, and N = 2 for the training step.

FLOPs at the released sizes, per source or frame (a FLOP is a multiply or an add). How they
were estimated: the convolutions, linear layers and matmuls counted by
:class:`torch.utils.flop_counter.FlopCounterMode` over each sub-network at full size on
the meta device with every op on its reference (so attention counts as its two matmuls,
``4 x Lq x Lk x D`` per head), cross-checked by hand (``2 x C_in x C_out x k^2 x H x W``
per conv); the render from its per-point work, which no counter sees inside the kernels:

=======================  ======  ====================================================
stage                    GFLOP   where it goes
=======================  ======  ====================================================
``encoder_global``       219     dilated ResNet-34 (182: layers 3 and 4 run at 64^2,
                                 56 + 107) and the ASPP head at 64^2 (38)
``encoder_detail``       42      four 3x3 convs at 256^2 (96 channels)
``background``           95      the U-Net, 29 of it in the last up-block at 512^2
canonicalization         110     4 blocks on 1,024 tokens x 1,024 channels:
                                 projections ~60, Mix-FFN 35, self-attention 4 heads x
                                 1,024^2 x 256 (4.3), the 64-token cross-attention (1)
re-enactment             149     the same 4 blocks on the driving motion (105) and the
                                 pixel-shuffle upsampling convs to 96 x 256^2 (43)
``generator_triplane``   847     convs at 256^2 (``convs1`` 97, ``convs2`` 164,
                                 ``conv_last`` 15), ``patch_embed`` 39, the block at
                                 128^2 (533): attention 2 heads x 16,384 queries x
                                 4,096 keys x 512 = 4 x 16,384 x 4,096 x 1,024 = 275,
                                 Mix-FFN 137, the q / reduction / kv / out projections
                                 34 + 34 + 17 + 34
render                   14      128^2 rays x 96 samples = 1.57 M points: per point 3
                                 planes x 4 taps x 32 channels x 2 (768) and the MLP
                                 2 x (32 x 64 + 64 x 33) (8,320)
``superresolution``      198     two StyleGAN2 blocks: 80 at 256^2 (256 channels),
                                 117 at 512^2 (128 channels)
=======================  ======  ====================================================

So ``encode`` is ~0.47 TFLOP per source and ``reenact`` ~1.2 TFLOP per frame, 70% of it
the triplane decoder (its attention alone 0.28 TFLOP). The H100 floor: 120 frames per
second is ~145 TFLOP/s sustained. Strict float32 (~60 TFLOP/s without tensor cores) caps a
frame at ~20 ms, ~50 frames per second, whatever the kernels; the goal needs tensor cores:
TF32 (~400 dense TFLOP/s: cuDNN's convolutions use it by default, torch's float32 matmuls
only with ``torch.backends.cuda.matmul.allow_tf32``, Triton's float32 ``tl.dot`` by
default) gives a ~3 ms floor, BF16 / FP16 (~800) ~1.5 ms. Bytes: per frame the triplane
decoder's activations (256^2 maps of 96-352 channels, ~150 MB in float32 written and read)
and the super-resolution's (~200 MB) dominate, ~0.1 ms at 3 TB/s, so a frame is
compute-bound; the reference's attention also writes and reads its float32 scores and
softmax (2 x 16,384 x 4,096 x 4 bytes = 0.5 GB each), which the fused kernel never
materializes. ``nbytes`` counts what must move at the least (the inputs, the planes, the
output images), ``flops`` the table's totals (at the CPU sizes scaled by the source's
pixel count, which every stage scales with but the token-count-bound attention).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Dict, List, Optional, Tuple

import torch

from ..case import DTYPE_NAMES, Case, Inputs, Settings, register
from .genhead import _cameras, _fast_backends, _flat, _head, _run_model, randomize_for_bench

#: The source image side on the CPU (every network is convolutional, so a smaller source
#: runs the same layers at a smaller size).
_CPU_SOURCE = 64
#: The neural rendering resolution on the CPU.
_CPU_NEURAL_RESOLUTION = 16

#: The std of the decoder's density weights in the benchmark's random model (see
#: :func:`build_model`).
_DENSITY_WEIGHT_STD = 0.1

#: Unit roundoff of TF32 (10 mantissa bits), the precision of float32 products on CUDA
#: here: cuDNN's convolutions by default (both backends), Triton's float32 ``tl.dot`` in
#: head4d's attention.
_TF32_ROUNDOFF = 2.0 ** -11
#: How many units of TF32 roundoff a relative-norm error may reach on CUDA: the bound
#: ``tests/test_attention.py`` holds the attention kernel to at the model's shapes (32 u);
#: the whole model chains ~100 such products on both sides, so the same factor is the
#: least a comparison of two TF32 runs can be held to.
_TF32_UNITS = 32


def _tolerance(cuda: bool) -> float:
    """The bound on the relative error of the outputs and gradients: on the CPU 1e-4
    (float32, hundreds of ops, gradients summed in other orders; measured ~4e-6), on CUDA
    :data:`_TF32_UNITS` units of TF32 roundoff (1.6e-2; the FP16 super-resolution's
    rounding, 2e-3, is below it)."""
    return _TF32_UNITS * _TF32_ROUNDOFF if cuda else 1e-4


#: The output keys compared and differentiated, flattened per sample.
_IMAGE_KEYS = ("image", "image_feature", "image_depth", "opacity")

#: Estimated GFLOP per source (``encode``) and per frame (``reenact``) at the released
#: sizes (the module docstring's table); the CPU sizes scale them by their pixel counts.
_ENCODE_GFLOP = 219 + 42 + 95 + 110
_REENACT_GFLOP = 149 + 847 + 14 + 198


def _config(cuda: bool, **changes):
    """The released v1 config on CUDA, the reduced one on the CPU (module docstring)."""
    from ...models import ReconstructorConfig

    if cuda:
        config = ReconstructorConfig()
    else:
        config = ReconstructorConfig(source_resolution=_CPU_SOURCE, neural_rendering_resolution=_CPU_NEURAL_RESOLUTION,
                                     fine_resolution=12, coarse_resolution=4)
    return dataclasses.replace(config, **changes)


def build_model(config, seed: int, device: torch.device) -> torch.nn.Module:
    """A Reconstructor with random weights from ``seed``: the released initialization, then
    random non-zero biases, noise strengths, decoder density weights and ``w_avg`` (the
    released initialization zeroes several of them, which would hide work from the
    comparison). The density weights are drawn with std :data:`_DENSITY_WEIGHT_STD`: the
    random triplane decoder's planes are large (std ~13 at the CPU sizes), and unit
    weights made every ray opaque to float32 rounding, where ``1 - opacity`` (the
    background's weight) is rounding noise and the background's gradients compare noise
    (two backends' float32 sums 25% apart); std 0.1 gives opacities of 0.6 to 0.8.
    Off CUDA the super-resolution's blocks are narrowed as in GenHead's bench model
    (:func:`~head4d.bench.op_cases.genhead.randomize_for_bench`)."""
    from ...models import Reconstructor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Reconstructor(config, _head(device))
        randomize_for_bench(model, device, seed, _DENSITY_WEIGHT_STD)
    return model.to(device).eval()


def used_parameter(name: str) -> bool:
    """Whether the reconstructor's forward reads parameter ``name``: all but the
    super-resolution's noise strengths (it runs with ``noise_mode='none'``)."""
    return not (name.startswith("superresolution.") and name.endswith("noise_strength"))


#: The template models of this process by (device, config): one serves every case of a
#: device (its weights, buffers and head model; ~8 s to build the 223 M parameters on the
#: CPU). ``fused`` is not part of the key: the training case sets it per call.
_TEMPLATES: Dict[Tuple[str, str], torch.nn.Module] = {}


def template(device: torch.device, config=None) -> torch.nn.Module:
    """The template model for ``device`` and ``config`` (None: the device's, the released
    config on CUDA and the reduced one on the CPU), built on first use."""
    if config is None:
        config = _config(device.type == "cuda")
    key = (str(device), repr(dataclasses.replace(config, fused=None)))
    if key not in _TEMPLATES:
        _TEMPLATES[key] = build_model(config, 0, device)
    return _TEMPLATES[key]


class _ParameterNames(Sequence):
    """The reconstructor's parameters that its forward reads (:func:`used_parameter`), in
    ``named_parameters`` order, resolved on first use from a template already built (the
    names are the same for every source size and device; narrowing the super-resolution
    keeps them), else from the CPU template of ``config``: so building the cases builds no
    model, and a run builds only the one it uses."""

    def __init__(self, config):
        self.config = config
        self._names: Optional[Tuple[str, ...]] = None

    def _resolve(self) -> Tuple[str, ...]:
        if self._names is None:
            model = next(iter(_TEMPLATES.values()), None)
            if model is None:
                model = template(torch.device("cpu"), self.config)
            self._names = tuple(k for k, _ in model.named_parameters() if used_parameter(k))
        return self._names

    def __getitem__(self, index):
        return self._resolve()[index]

    def __len__(self) -> int:
        return len(self._resolve())

    def __contains__(self, name) -> bool:
        return name in self._resolve()

    def __iter__(self):
        return iter(self._resolve())

    def __repr__(self) -> str:
        return f"_ParameterNames({'unresolved' if self._names is None else len(self._names)})"


def _source(n: int, config, motion_dim: int, device: torch.device, gen: torch.Generator) -> Inputs:
    """Fresh source images ``[n, 3, S, S]`` in [-1, 1] and source motions ``[n, motion_dim]``."""
    side = config.source_resolution
    return {"source_image": torch.rand(n, 3, side, side, generator=gen, device=device) * 2 - 1,
            "source_motion": torch.randn(n, motion_dim, generator=gen, device=device)}


def _render_gen(device: torch.device) -> torch.Generator:
    """The renderer's generator, seeded afresh per call so every backend draws the same."""
    return torch.Generator(device=device).manual_seed(1)


def _label(kind: str, n: int, config, cuda: bool) -> str:
    sr = "" if cuda else "_srnarrow"
    base = f"{kind}_N{n}_src{config.source_resolution}"
    if kind == "encode":
        return f"{base}_fp32"
    return (f"{base}_R{config.neural_rendering_resolution}_S{config.depth_resolution}+"
            f"{config.depth_resolution_importance}_img{config.img_resolution}{sr}_fp32")


def _scale(config) -> float:
    """The CPU sizes' share of the released sizes' work (pixel counts: source and
    triplane scale together)."""
    return (config.source_resolution / 512) ** 2


def _batches(settings: Settings, default: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(settings.batches) if settings.batches else default


@register("reconstructor_encode", whole_model=True)
def _encode_cases(settings: Settings) -> List[Case]:
    """:meth:`Reconstructor.encode` of N source images (N = 1; sizes in the module
    docstring). Output: the canonical tokens, the detail features and the background
    features, flattened and concatenated per source."""
    cuda = settings.device.type == "cuda"
    return [encode_case(n, cuda) for n in _batches(settings, (1,))]


def encode_case(n: int, cuda: bool, config=None) -> Case:
    """The ``reconstructor_encode`` case of N sources (``config``: None for the device's;
    tests pass a smaller one)."""
    config = _config(cuda) if config is None else config
    side = config.source_resolution

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        return _source(n, config, config.motion_dim, device, gen)

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        model = template(inputs["source_image"].device, config)
        encoded = _run_model(model, {}, backend, "encode", inputs["source_image"], inputs["source_motion"])
        return torch.cat([encoded.tokens.flatten(1), encoded.detail.flatten(1), encoded.background.flatten(1)], 1)

    out_values = (side // 16) ** 2 * 1024 + 96 * (side // 2) ** 2 + 32 * side ** 2
    return Case(
        op="reconstructor_encode",
        shape=_label("encode", n, config, cuda),
        make_inputs=make_inputs,
        run=run,
        grad_of=(),
        nbytes={"fwd": n * (3 * side * side + out_values) * 4},
        flops={"fwd": int(n * _ENCODE_GFLOP * 1e9 * _scale(config))},
        dtype=torch.float32,
        backends=_fast_backends(torch.device("cuda" if cuda else "cpu")),
        passes=("fwd",),
        tolerance=_tolerance(cuda),
    )


@register("reconstructor_reenact", whole_model=True)
def _reenact_cases(settings: Settings) -> List[Case]:
    """:meth:`Reconstructor.reenact` of one encoded source with N driving motions and
    cameras (the per-frame part, batched over frames; N = 1 and 8 on CUDA in the full
    mode, the gate's, else 1; sizes in the module docstring). The encoded source (tokens, detail and background
    features) is an input, computed once per input set outside the timed calls. Output:
    ``image``, ``image_feature``, ``image_depth`` and ``opacity`` flattened per frame."""
    cuda = settings.device.type == "cuda"
    return [reenact_case(n, cuda) for n in _batches(settings, (1, 8) if cuda and settings.full else (1,))]


def reenact_case(n: int, cuda: bool, config=None) -> Case:
    """The ``reconstructor_reenact`` case of N frames (``config`` as :func:`encode_case`)."""
    from ...models.reconstructor import EncodedSource

    config = _config(cuda) if config is None else config
    r, side = config.neural_rendering_resolution, config.source_resolution
    width = 3 * config.img_resolution ** 2 + (32 + 2) * r * r

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        model = template(device, config)
        source = _source(1, config, config.motion_dim, device, gen)
        with torch.no_grad():
            encoded = model.encode(source["source_image"], source["source_motion"])
        return {"tokens": encoded.tokens, "detail": encoded.detail, "background": encoded.background,
                "driving_motion": torch.randn(n, config.motion_dim, generator=gen, device=device),
                "camera": _cameras(n, device, gen)}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        device = inputs["tokens"].device
        model = template(device, config)
        encoded = EncodedSource(tokens=inputs["tokens"], grid=(side // 16, side // 16), detail=inputs["detail"],
                                background=inputs["background"], motion_scale=torch.ones(1, device=device))
        out = _run_model(model, {}, backend, "reenact", encoded, inputs["driving_motion"], inputs["camera"],
                         generator=_render_gen(device))
        return _flat(out, _IMAGE_KEYS)

    planes_bytes = 3 * 32 * (side // 2) ** 2 * 4
    return Case(
        op="reconstructor_reenact",
        shape=_label("reenact", n, config, cuda),
        make_inputs=make_inputs,
        run=run,
        grad_of=(),
        # the planes written and read, the detail features read, the images written
        nbytes={"fwd": n * (2 * planes_bytes + 96 * (side // 2) ** 2 * 4 + width * 4)},
        flops={"fwd": int(n * _REENACT_GFLOP * 1e9 * _scale(config))},
        dtype=torch.float32,
        backends=_fast_backends(torch.device("cuda" if cuda else "cpu")),
        passes=("fwd",),
        tolerance=_tolerance(cuda),
    )


@register("reconstructor_train", whole_model=True)
def _train_cases(settings: Settings) -> List[Case]:
    """The training-shaped step: the one-call forward (N sources, one frame each) from the
    source image to the 512^2 image, then the gradients of every parameter it reads
    (:func:`used_parameter`; the weights are the template's, the data fresh per seed);
    N = 1 and 4 on CUDA in the full mode (the gate's; 1 in the others), 2 on the CPU (sizes
    in the module docstring), the triplane decoded
    fused on both sides, the model in training mode. Measures memory: the gate's memory
    ratio is the ``torch`` backend's peak (CPU: saved bytes) over head4d's. Output as
    ``reconstructor_reenact``'s."""
    cuda = settings.device.type == "cuda"
    return [train_case(n, cuda) for n in _batches(settings, ((1, 4) if settings.full else (1,)) if cuda else (2,))]


def train_case(n: int, cuda: bool, config=None) -> Case:
    """The ``reconstructor_train`` case at batch N (``config`` as :func:`encode_case`)."""
    config = _config(cuda) if config is None else config
    r, side = config.neural_rendering_resolution, config.source_resolution
    width = 3 * config.img_resolution ** 2 + (32 + 2) * r * r
    grad_of = _ParameterNames(config)

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        model = template(device, config)
        inputs = {k: p.detach() for k, p in model.named_parameters() if k in grad_of}
        inputs.update(_source(n, config, config.motion_dim, device, gen))
        inputs["driving_motion"] = torch.randn(n, config.motion_dim, generator=gen, device=device)
        inputs["camera"] = _cameras(n, device, gen)
        inputs["grad_out"] = torch.randn(n, width, generator=gen, device=device)
        return inputs

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        device = inputs["source_image"].device
        model = template(device, config)
        model.train()  # as a training step runs it (the super-resolution's unfused modconv)
        try:
            # head4d's side decodes fused (the training configuration); the reference unfused
            out = _run_model(model, {k: inputs[k] for k in grad_of}, backend, "forward", inputs["source_image"],
                             inputs["source_motion"], inputs["driving_motion"], inputs["camera"], fused=True,
                             generator=_render_gen(device))
        finally:
            model.eval()
        return _flat(out, _IMAGE_KEYS)

    planes_bytes = 3 * 32 * (side // 2) ** 2 * 4
    fwd = int(n * (_ENCODE_GFLOP + _REENACT_GFLOP) * 1e9 * _scale(config))
    return Case(
        op="reconstructor_train",
        shape=_label("train", n, config, cuda),
        make_inputs=make_inputs,
        run=run,
        grad_of=grad_of,
        # the source read, the planes written and read, the images written; and twice
        # that for the backward (the weights and their gradients, 0.9 GB each, come on top)
        nbytes={"fwd+bwd": 2 * n * (3 * side * side * 4 + 2 * planes_bytes + width * 4)},
        flops={"fwd+bwd": 3 * fwd},
        dtype=torch.float32,
        backends=_fast_backends(torch.device("cuda" if cuda else "cpu")),
        passes=("fwd+bwd",),
        measure_memory=True,
        tolerance=_tolerance(cuda),
    )


@register("decoder_attention", whole_model=True)
def _decoder_attention_cases(settings: Settings) -> List[Case]:
    """The triplane decoder's attention shape through :func:`head4d.ops.attention`: B x 2
    heads, 16,384 queries (the 128^2 token grid) over 4,096 keys (spatially reduced to
    64^2), head dim 512, in float32 (the model's dtype) and bfloat16 (under autocast);
    B = 1 (``--batch`` overrides). CUDA backends: ``triton`` (head4d's) and ``sdpa``
    (``torch.nn.functional.scaled_dot_product_attention``, the peer); the goal is
    ``triton``'s speedup over the reference at least ``sdpa``'s. The reference
    materializes the float32 scores (0.5 GB per batch row). CPU: the shape at the CPU
    reconstructor's 64^2 source scaled up to 1,024 queries over 256 keys, float32, ``sdpa``
    against the reference (the CPU's default attention is the reference itself; Triton runs
    on the CPU only under the interpreter, a test tool).

    Registered as a whole-model case so it sets no backend order: ``attention``'s own cases
    do that."""
    cuda = settings.device.type == "cuda"
    batches = _batches(settings, (1,))
    if not cuda:
        return [_attention_case(b, 1024, 256, torch.float32, ("sdpa",), None) for b in batches]
    # float32 runs its products in TF32 on the GPU (Triton's default; SDPA's math follows
    # torch's matmul setting): the attention tests' bound, 32 units of TF32 roundoff
    return [_attention_case(b, 16384, 4096, dtype, ("triton", "sdpa"),
                            _tolerance(True) if dtype == torch.float32 else None)
            for b in batches for dtype in (torch.float32, torch.bfloat16)]


def _attention_case(b: int, lq: int, lk: int, dtype: torch.dtype, backends: Tuple[str, ...],
                    tolerance: Optional[float]) -> Case:
    from ...ops import attention

    heads, dim = 2, 512

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        shapes = {"q": (b, heads, lq, dim), "k": (b, heads, lk, dim), "v": (b, heads, lk, dim),
                  "grad_out": (b, heads, lq, dim)}
        return {k: torch.randn(s, generator=gen, device=device).to(dtype) for k, s in shapes.items()}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        return attention(inputs["q"], inputs["k"], inputs["v"], backend=backend)

    elt = torch.tensor([], dtype=dtype).element_size()
    q_bytes, kv_bytes = b * heads * lq * dim * elt, 2 * b * heads * lk * dim * elt
    fwd_bytes = 2 * q_bytes + kv_bytes
    fwd_flops = 4 * b * heads * lq * lk * dim
    return Case(
        op="decoder_attention",
        shape=f"B{b}_H{heads}_Lq{lq}_Lk{lk}_D{dim}_{DTYPE_NAMES[dtype]}",
        make_inputs=make_inputs,
        run=run,
        grad_of=("q", "k", "v"),
        nbytes={"fwd": fwd_bytes, "fwd+bwd": 2 * fwd_bytes + 2 * q_bytes + kv_bytes},
        flops={"fwd": fwd_flops, "fwd+bwd": fwd_flops + int(2.5 * fwd_flops)},
        dtype=dtype,
        backends=backends,
        tolerance=tolerance,
    )


def saved_bytes_by_stage(case: Case, backend: str, inputs: Inputs, config=None) -> Dict[str, int]:
    """Where a ``reconstructor_train`` step's memory goes: the bytes autograd saves for the
    backward during one ``fwd+bwd`` call of ``case`` (built with ``config``, None for the
    device's) on ``backend``, by the module that was running when each tensor was saved:
    the model's top-level modules, ``encoder_canonical`` split by its children (the
    canonicalization blocks ``trans_blocks_neutral``, the re-enactment blocks
    ``trans_blocks_motion``, the motion maps, the convolutions); ``renderer`` includes the
    point decoding, fused or not; ``model`` is the reconstructor's own code (the background
    compositing). Each storage counts once, at its first save, and the inputs' own storages
    (the weights, the data) and what the backward saves (recomputed layers) not at all,
    as :func:`~head4d.bench.harness.measure_memory` counts, so the stages sum to its
    ``saved_bytes``. ``inputs`` as prepared for
    ``fwd+bwd``."""
    from ..harness import saved_during_forward, step

    model = template(inputs["source_image"].device, config)
    watched = [(name, module) for name, module in model.named_children()
               if name not in ("deformation", "encoder_canonical")]
    for name, module in model.encoder_canonical.named_children():
        members = list(module) if isinstance(module, torch.nn.ModuleList) else [module]
        watched += [(f"encoder_canonical.{name}", member) for member in members]
    stages = ["model"]

    def enter(name: str):
        def hook(module, args) -> None:
            stages.append(name)
        return hook

    def leave(module, args, output) -> None:  # returns None: the output is kept
        stages.pop()

    handles = []
    for name, module in watched:
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    own = {(v.untyped_storage().data_ptr(), v.untyped_storage().nbytes()) for v in inputs.values()}
    seen: set = set()
    by_stage: Dict[str, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in own and key not in seen and saved_during_forward():
            seen.add(key)
            by_stage[stages[-1]] = by_stage.get(stages[-1], 0) + storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step(case, "fwd+bwd", backend)(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return by_stage
