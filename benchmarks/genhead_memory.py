"""Where GenHead's forward + backward memory goes, on the CPU or on CUDA.

For one ``fwd+bwd`` call of the ``genhead`` bench case's computation (the forward, then
the gradients of every parameter it uses for a cotangent of ones) this prints, per
configuration (``torch``: every op on its reference; ``head4d``: each op's default;
``head4d-fused``: ``GenHeadConfig.fused=True``, each triplane read and decoded by
:func:`~head4d.ops.decode_triplanes`; ``head4d-unfused``: ``fused=False``; pick them with
``--variants``):

- the peak memory of the call above what was allocated before it: on CUDA
  ``max_memory_allocated``; on the CPU the running sum of the CPU allocator's
  allocations and frees as ``torch.profiler`` (``profile_memory=True``) records them;
- the bytes autograd saves for the backward (distinct storages, the inputs' own and
  what the backward itself saves left out, as :func:`head4d.bench.measure_memory`
  counts them), split by the stage that
  saved them (mapping, backbone, background, deformation build and masks, warp, decode,
  blend, raymarch (sampling, merging and compositing), super-resolution, other).

Usage::

    python benchmarks/genhead_memory.py [--batch 4] [--resolution 64] [--config cpu|full]
                                        [--variants torch head4d head4d-fused] [--threads N]

``--config cpu`` is the reduced configuration of the bench case on the CPU
(:func:`head4d.bench.op_cases.genhead._config`, the super-resolution narrowed off CUDA), with the
neural rendering resolution set by ``--resolution`` and the masks rasterized at twice it;
``--config full`` is the released one (on the CPU too, in float32 where CUDA runs the
FP16 blocks in float16).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # head4d from this checkout

#: Stage of a range name opened by GenHead, the renderer or the deformation (innermost wins).
STAGE_OF_RANGE = (
    ("head4d.genhead.mapping", "mapping"),
    ("head4d.genhead.backbone", "backbone"),
    ("head4d.genhead.background", "background"),
    ("head4d.genhead.deformation", "deformation"),
    ("head4d.genhead.masks", "deformation"),
    ("head4d.genhead.rays", "deformation"),
    ("head4d.genhead.decode", "decode"),
    ("head4d.genhead.blend", "blend"),
    ("head4d.genhead.field", "warp"),
    ("head4d.genhead.raymarch", "raymarch"),
    ("head4d.genhead.superresolution", "superresolution"),
)
STAGES = ("mapping", "backbone", "background", "deformation", "warp", "decode", "blend", "raymarch",
          "superresolution", "other")
RANGE_MODULES = ("head4d.models.genhead", "head4d.render.renderer", "head4d.deform.partwise")
#: The super-resolution's block widths upstream (256 channels at 256^2, 128 at 512^2).
FULL_SR_CHANNELS = (256, 128)
VARIANTS = ("torch", "head4d", "head4d-fused", "head4d-unfused")


class StageTracker:
    """The current stage, from the ranges GenHead and its parts open (their ``nvtx_range``
    replaced by one that also pushes the name on a stack)."""

    def __init__(self):
        self.stack: List[str] = []
        self._originals = {}

    @property
    def stage(self) -> str:
        for name in reversed(self.stack):
            for prefix, stage in STAGE_OF_RANGE:
                if name == prefix:
                    return stage
        return "other"

    def __enter__(self):
        for module_name in RANGE_MODULES:
            module = sys.modules[module_name]
            original = module.nvtx_range
            self._originals[module_name] = original

            def tracked(name, original=original):
                @contextlib.contextmanager
                def scope():
                    self.stack.append(name)
                    try:
                        with original(name):
                            yield
                    finally:
                        self.stack.pop()
                return scope()
            module.nvtx_range = tracked
        return self

    def __exit__(self, *exc):
        for module_name, original in self._originals.items():
            sys.modules[module_name].nvtx_range = original


def _case_pieces(config_kind: str, n: int, resolution: int, device: torch.device):
    import head4d.models  # noqa: F401  (the modules whose ranges are tracked)
    import head4d.render.renderer  # noqa: F401
    from head4d.bench.op_cases import genhead as bench

    full = config_kind == "full"
    config = bench._config(full)
    config = dataclasses.replace(config, neural_rendering_resolution=resolution,
                                 mask_resolution=config.mask_resolution if full else 2 * resolution)
    narrow = bench._CPU_SR_CHANNELS
    if full:  # the super-resolution at its upstream widths on the CPU too
        bench._CPU_SR_CHANNELS = FULL_SR_CHANNELS
    try:
        model = bench.build_model(config, 0, device)
    finally:
        bench._CPU_SR_CHANNELS = narrow
    gen = torch.Generator(device=device).manual_seed(1)
    z = torch.randn(n, config.z_dim, generator=gen, device=device)
    c = bench._cameras(n, device, gen)
    codes = bench._codes(model, n, device, gen)
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()
              if bench.used_parameter(k)}
    return bench, config, model, z, c, codes, params


def _run(bench, model, params, variant: str, z, c, codes, keys=("image", "image_feature", "image_depth", "opacity")):
    fused = {"head4d-fused": True, "head4d-unfused": False}.get(variant)
    backend = bench.REFERENCE if variant == "torch" else "head4d"
    out = bench._run_model(model, params, backend, "forward", z, c, codes, fused=fused,
                           generator=torch.Generator(device=z.device).manual_seed(1))
    return bench._flat(out, keys)


def measure(bench, model, params, variant: str, z, c, codes) -> Dict[str, object]:
    """One fwd+bwd of ``variant``: peak bytes, saved bytes by stage, seconds."""
    from head4d.bench.harness import saved_during_forward

    device = z.device
    own = {(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in params.values()}
    seen: Dict[Tuple[int, int], Tuple[str, int, Tuple[int, ...]]] = {}
    tracker = StageTracker()

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in own and key not in seen and saved_during_forward():
            seen[key] = (tracker.stage, storage.nbytes(), tuple(t.shape))
        return t

    grad_out = None
    cuda = device.type == "cuda"
    profiler = None
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        profiler.__enter__()
    t0 = time.perf_counter()
    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _run(bench, model, params, variant, z, c, codes)
    forward_s = time.perf_counter() - t0
    grad_out = torch.ones_like(out)
    grads = torch.autograd.grad(out, list(params.values()), grad_out)
    total_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        profiler.__exit__(None, None, None)
        peak = _cpu_peak(profiler)
    del grads, out, grad_out
    by_stage = defaultdict(int)
    largest = defaultdict(list)
    for stage, nbytes, shape in seen.values():
        by_stage[stage] += nbytes
        largest[stage].append((nbytes, shape))
    return {"peak": peak, "saved": sum(by_stage.values()), "by_stage": dict(by_stage),
            "largest": {k: sorted(v, reverse=True)[:6] for k, v in largest.items()},
            "forward_s": forward_s, "total_s": total_s}


def _cpu_peak(profiler) -> int:
    """The highest running total of the CPU allocations the profiler saw, from zero at the
    start of the profile."""
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--config", choices=("cpu", "full"), default="cpu")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["torch", "head4d", "head4d-fused"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--detail", action="store_true", help="also list the largest saved tensors per stage")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench, config, model, z, c, codes, params = _case_pieces(args.config, args.batch, args.resolution, device)
    print(f"GenHead fwd+bwd on {device}, N={args.batch}, r={args.resolution}, "
          f"{config.depth_resolution}+{config.depth_resolution_importance} samples, config {args.config}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    mb = lambda b: f"{b / 2**20:9.1f}"  # noqa: E731
    rows = {}
    for variant in args.variants:
        rows[variant] = measure(bench, model, params, variant, z, c, codes)
        r = rows[variant]
        print(f"\n{variant}: peak {mb(r['peak'])} MB, saved {mb(r['saved'])} MB, "
              f"fwd {r['forward_s']:.1f} s, fwd+bwd {r['total_s']:.1f} s")
        for stage in STAGES:
            if stage in r["by_stage"]:
                print(f"  saved {stage:16s} {mb(r['by_stage'][stage])} MB")
                if args.detail:
                    for nbytes, shape in r["largest"][stage]:
                        print(f"      {mb(nbytes)} MB  {list(shape)}")
    if "torch" in rows:
        print()
        for variant, r in rows.items():
            if variant != "torch":
                print(f"ratio torch / {variant}: peak {rows['torch']['peak'] / r['peak']:.2f}x, "
                      f"saved {rows['torch']['saved'] / r['saved']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
