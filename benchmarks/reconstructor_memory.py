"""Where the reconstructor's training-step memory goes, per stage, head4d against the
``torch`` backend.

One training-shaped step of :class:`head4d.models.Reconstructor` (the one-call forward
from the source image to the super-resolved image in training mode, the triplane decoded
fused on head4d's side, then the gradients of every parameter it reads), as the
``reconstructor_train`` bench case runs it, per variant (``torch``: every op on its
reference; ``head4d``: each op's default). It prints the bytes autograd keeps for the
backward (distinct storages saved during the forward, the weights left out; what the
backward saves itself, such as a recomputed layer's maps, is not counted), by stage: the
model's top-level modules, the encoders' and transformers' children one level down,
``model`` for the reconstructor's own code; with ``--detail K`` the K largest saved
tensors with the module that saved them.

Two configurations:

- ``--config cpu`` (default): the bench case's CPU sizes (64^2 source, 16^2 rendering with
  48 + 48 samples, the super-resolution narrowed), batch ``--batch`` (2, the bench's), run
  for real on the CPU.
- ``--config full``: the released sizes (512^2 source, 128^2 rendering with 48 + 48 samples,
  the super-resolution at its upstream widths) counted without running: the forward runs
  on fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``: shapes and dtypes
  only, no memory, no arithmetic), so the batch-4 training step of the issue's goal counts
  in seconds on any machine. The count is the CPU's path: float32 throughout (CUDA runs
  the super-resolution in float16 on both sides, halving its bytes) and attention on the
  CPU's default, the reference, which keeps the score and probability matrices (head4d's
  CUDA and Triton attention keep q, k, v, the output and the log-sum-exp). It counts bytes
  kept for the backward, not a peak: the weights' gradients and the backward's temporaries
  come on top on both sides. ``TRITON_INTERPRET=1 HEAD4D_BACKEND_ATTENTION=triton`` puts
  head4d's attention on its Triton op, as on CUDA (on fake tensors only the op's shape
  function runs).

Usage::

    python benchmarks/reconstructor_memory.py [--config cpu|full] [--batch N] [--variants torch head4d]
                                              [--detail K] [--no-recompute]

``--no-recompute`` switches off the recomputation in the backward of the StyleGAN2 layers
and the Mix-FFN (:mod:`head4d.nn._recompute`), to see what it saves.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # head4d from this checkout

VARIANTS = {"torch": "torch", "head4d": "cpu"}  # the bench's backend names
#: Module prefixes whose children are stages of their own.
SPLIT = ("encoder_global", "encoder_detail", "encoder_canonical", "generator_triplane", "superresolution")


def stage_of(module_name: str) -> str:
    """The stage of a module path: its top-level module, one level deeper for :data:`SPLIT`."""
    parts = module_name.split(".")
    return ".".join(parts[:2]) if parts[0] in SPLIT else parts[0]


@contextlib.contextmanager
def module_stack(model: torch.nn.Module, stack: List[str]):
    """Keeps ``stack[-1]`` the innermost module of ``model`` running (its path)."""
    handles = []
    for name, module in model.named_modules():
        if module is model:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: stack.append(name) and None))
        handles.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_saved(model: torch.nn.Module, params: Dict[str, torch.Tensor], step) -> List[Tuple[str, int, tuple]]:
    """``(module path, bytes, shape)`` of each storage saved for the backward during the
    forward of ``step()`` (each storage once; ``params``' own left out)."""
    from head4d.bench.harness import saved_during_forward

    own = {p.untyped_storage()._cdata for p in params.values()}
    stack = ["model"]
    seen: Dict[int, Tuple[str, int, tuple, object]] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in own and key not in seen and saved_during_forward():
            seen[key] = (stack[-1], storage.nbytes(), tuple(t.shape), storage)  # held: no key reuse
        return t

    with module_stack(model, stack), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return [(name, nbytes, shape) for name, nbytes, shape, _ in seen.values()]


def cpu_step(batch: int, variant: str):
    """The bench case's CPU step: (model, params, step function)."""
    from head4d.bench.harness import prepare, step
    from head4d.bench.op_cases import reconstructor as bench

    case = bench.train_case(batch, False)
    inputs = prepare(case, case.make_inputs(torch.device("cpu"), 0), "fwd+bwd")
    model = bench.template(torch.device("cpu"))
    params = {k: inputs[k] for k in case.grad_of}
    return model, params, lambda: step(case, "fwd+bwd", VARIANTS[variant])(inputs)


def full_step(batch: int, variant: str, cache={}):
    """The released config's step on fake tensors: (model, params, step function)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from head4d.bench.op_cases import reconstructor as bench
    from head4d.bench.op_cases.genhead import _cameras, _flat, _head, _run_model
    from head4d.models import Reconstructor, ReconstructorConfig

    if "model" not in cache:  # built for real once (its head model reads numpy), then faked
        cache["config"] = ReconstructorConfig()
        cache["model"] = Reconstructor(cache["config"], _head(torch.device("cpu"))).train()
    model, config = cache["model"], cache["config"]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        params = {k: mode.from_tensor(p.detach()).requires_grad_(True) for k, p in model.named_parameters()
                  if bench.used_parameter(k)}

    def run():
        with mode:
            gen = torch.Generator().manual_seed(0)
            side = config.source_resolution
            image = torch.rand(batch, 3, side, side) * 2 - 1
            source, driving = torch.randn(2, batch, config.motion_dim)
            out = _run_model(model, params, VARIANTS[variant], "forward", image, source, driving,
                             _cameras(batch, torch.device("cpu"), gen), fused=True)
            flat = _flat(out, bench._IMAGE_KEYS)
            torch.autograd.grad(flat, list(params.values()), torch.ones_like(flat))
    return model, params, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("cpu", "full"), default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 (cpu), 4 (full)")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--detail", type=int, default=0, help="list the K largest saved tensors")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-recompute", action="store_true",
                        help="head4d without its layers' recomputation in the backward (for comparison)")
    args = parser.parse_args(argv)
    if args.no_recompute:
        import head4d.nn.blocks
        import head4d.nn.stylegan2
        for module in (head4d.nn.blocks, head4d.nn.stylegan2):
            module.recompute_wanted = lambda *args: False
    torch.set_num_threads(args.threads)
    batch = args.batch or (2 if args.config == "cpu" else 4)
    make = cpu_step if args.config == "cpu" else full_step
    print(f"Reconstructor training step, config {args.config}, batch {batch}, torch {torch.__version__}"
          + (" (fake tensors: counted, not run)" if args.config == "full" else ""))
    mb = lambda b: f"{b / 2**20:10.1f}"  # noqa: E731
    totals = {}
    for variant in args.variants:
        model, params, run = make(batch, variant)
        saved = count_saved(model, params, run)
        by_stage: Dict[str, int] = defaultdict(int)
        for name, nbytes, _ in saved:
            by_stage[stage_of(name)] += nbytes
        totals[variant] = sum(by_stage.values())
        print(f"\n{variant}: saved {mb(totals[variant])} MB")
        for stage, nbytes in sorted(by_stage.items(), key=lambda kv: -kv[1]):
            print(f"  {stage:42s} {mb(nbytes)} MB")
        for name, nbytes, shape in sorted(saved, key=lambda s: -s[1])[: args.detail]:
            print(f"      {mb(nbytes)} MB  {str(list(shape)):24s} {name}")
    if "torch" in totals and "head4d" in totals:
        print(f"\nhead4d keeps {totals['head4d'] / totals['torch']:.1%} of the torch backend's bytes "
              f"(ratio torch / head4d {totals['torch'] / totals['head4d']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
