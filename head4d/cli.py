"""The ``head4d`` command.

    head4d bench [--ops NAME ...] [--backends NAME ...] [--batch N ...] [--quick | --full]
                 [--budget SECONDS] [--json PATH] [--write-order FILE]
    head4d bench --from-json BENCH_JSON --write-order FILE
    head4d info
    head4d synthesize --genhead PKL_OR_DIR --out DIR --count N [--batch B] [--device cpu|cuda]
                      [--seed S] [--motions NPY] [--cameras NPY]
    head4d demo [--checkpoint PKL_OR_DIR] [--out DIR] [--device cpu|cuda] [--resolution R]
                [--frames N] [--cache DIR] [--fit-steps N]
    head4d reenact --checkpoint CKPT --source IMAGE --motion MOTIONS.npy [--source-motion FILE]
                   [--camera fixed|orbit|FILE] [--neck POSES.npy] [--out DIR] [--batch K] [--device cpu|cuda]
                   [--resolution R] [--depth] [--mesh] [--fps F]
    head4d reenact --synthetic [--checkpoint CKPT] [--genhead CKPT] [--frames N] ...
    head4d make-dataset --procedural N --out DIR [--resolution R] [--seed S] [--zip] [--device cpu|cuda]
    head4d train genhead --data DIR --out DIR [--batch B] [--kimg K] [--resume] [--dry-run] [--small]
                         [--precision fp32|bf16] [--accumulate K] [--workers N] [--image-every N]
    head4d train reconstructor --genhead CKPT --out DIR [--batch B] [--kimg K] [--resume] [--dry-run] [--small]
                               [--identity-weights FILE] [--lpips-backbone pretrained|random]
                               [--global-encoder-init imagenet|random] [--precision fp32|bf16] [--accumulate K]
                               [--image-every N]

``bench`` checks each op's fast backends against the reference and times them beside it
on whatever device is present (CUDA if available, else the CPU); one table row per
(op, pass, shape, backend). The default run takes a few minutes on 2 CPU cores (the small
shapes there); ``--full`` runs every shape with longer budgets, as the gate does.
``--write-order`` derives each op's default backend order from the run (or from a saved
JSON, ``--from-json``) into an order file (:mod:`head4d.bench.order`). Exit code 0 when
every check passed, 1 otherwise.

``demo`` renders an avatar as a turntable and as expression, jaw, eye and neck sweeps
(:mod:`head4d.demo.run`): PNG grids, an animation, depth and opacity maps, and the frames
per second. Without ``--checkpoint`` the subject is the built-in procedural head, fitted
into a triplane once and cached (:mod:`head4d.demo.subject`).

``reenact`` re-enacts an aligned source image with a sequence of motion vectors through the
reconstructor (:mod:`head4d.reenact.run`): frames (PNG), an MP4 or GIF, optional depth maps
and a mesh of the canonical head, streamed as they are rendered; it prints the frames per
second and where the time went. ``--synthetic`` needs no files.

``synthesize`` writes Portrait4D's reconstructor training triplets drawn from a GenHead
(:mod:`head4d.synthesis`) as PNG images and one ``labels.npz``, with a progress bar.

``train genhead`` runs GenHead's GAN training (:mod:`head4d.train.genhead`) on a labelled
image dataset; started by ``torchrun --nproc_per_node N`` it trains on N processes.
``train reconstructor`` trains the reconstructor on triplets a frozen GenHead synthesizes
online (:mod:`head4d.train.reconstructor`), under torchrun too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import torch


def _mode(args: argparse.Namespace) -> str:
    return "quick" if args.quick else "full" if args.full else "default"


def _write_order(path: str, rows, environment) -> None:
    from .bench import order

    data, notes = order.write_orders(path, rows, environment)
    print(f"\nbackend order ({environment['device_type']}) written to {path}:")
    print(order.format_orders(data["orders"], environment["device_type"]) or "(no op measured)")
    for line in notes:
        print(f"note: {line}")


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.from_json:
        if not args.write_order:
            print("head4d bench: --from-json needs --write-order FILE (it only derives an order)",
                  file=sys.stderr)
            return 2
        try:
            rows, environment = bench.order.read_bench_json(args.from_json)
            _write_order(args.write_order, rows, environment)
        except (OSError, ValueError) as exc:
            print(f"head4d bench: {exc}", file=sys.stderr)
            return 2
        return 0

    if args.write_order and args.backends:
        print("head4d bench: --write-order ranks every backend of an op, so it cannot be combined "
              "with --backends (a backend left out would lose its place)", file=sys.stderr)
        return 2
    device = torch.device(args.device) if args.device else bench.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        print("head4d bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        settings = bench.Settings(device=device, batches=tuple(args.batch) if args.batch else None,
                                  quick=args.quick, full=args.full)
        cases = bench.cases(settings, args.ops)
    except ValueError as exc:
        print(f"head4d bench: {exc}", file=sys.stderr)
        return 2

    env = bench.environment(device)
    offered = {b for c in cases for b in c.backends}
    for name in args.backends or ():
        if name not in offered:
            print(f"note: backend {name!r} is not benchmarked on {device.type} "
                  f"(offered here: {sorted(offered) or 'none'}; the reference 'torch' always runs)",
                  file=sys.stderr)
    print(f"device : {env['device']}")
    print(f"versions: torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
          f"head4d {env['head4d']}, extension "
          f"{'built' if env['extension'] else 'NOT built'}; commit {env['git_commit'] or '?'}"
          f"{' (dirty)' if env['git_dirty'] else ''}; {env['date']}")
    if env["copy_bandwidth_gbps"]:
        print(f"floor  : bytes / {env['copy_bandwidth_gbps']:.0f} GB/s (measured copy bandwidth)")
    print(f"cases  : {len(cases)} ({_mode(args)}); "
          f"speedup = reference ('torch') median / backend median, same process, same inputs\n")
    print(bench.table_header(), flush=True)

    start = time.perf_counter()
    results: List[bench.Result] = []
    budget = bench.default_budget(device, args.quick, args.full) if args.budget is None else args.budget
    case_seconds = []
    for case in cases:
        case_start = time.perf_counter()
        results += bench.run_case(case, device, budget, args.backends,
                                  on_result=lambda r: print(bench.table_row(r), flush=True))
        case_seconds.append((case, time.perf_counter() - case_start))
    elapsed = time.perf_counter() - start

    failed = [r for r in results if r.failed]
    print(f"\n{len(results)} rows in {elapsed:.1f} s; "
          + (f"{len(failed)} FAILED: " + ", ".join(r.key for r in failed) if failed
             else "all checks passed"))
    print("seconds per case (checks, warm-up and timing, all backends):")
    for case, seconds in case_seconds:
        print(f"  {seconds:7.1f}  {case.op}/{case.shape}")
    if args.json:
        data = bench.report(results, device, settings={
            "ops": [c.op for c in cases], "quick": args.quick, "full": args.full,
            "batches": args.batch, "backends": args.backends, "budget_s": budget,
            "elapsed_s": elapsed,
            "case_seconds": {f"{c.op}/{c.shape}": round(s, 2) for c, s in case_seconds}})
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {args.json}")
    if args.write_order:
        _write_order(args.write_order, [r.to_json() for r in results], env)
    return 1 if failed else 0


def _info(args: argparse.Namespace) -> int:
    from . import _backend, bench

    from . import ops  # noqa: F401  (declares every op's backends)

    for device in [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else []):
        env = bench.environment(device)
        print(f"{device.type:5s}: {env['device']}")
        for backend in _backend.BACKENDS + _backend.PEER_BACKENDS:
            reason = _backend.unavailable_reason(backend, device)
            print(f"  {backend:7s} {'available' if reason is None else 'unavailable: ' + reason}")
        print("  per op, its backends available here, the default first (a default that cannot run "
              "some input, such as decode_triplanes' triton for float64, passes it to the next):")
        width = max(len(op) for op in _backend.DECLARED)
        for op, entry in sorted(_backend.DECLARED.items()):
            available = _backend.available_for(op, device)
            preferred = [b for b in entry.preferences.get(device.type, ("torch",)) if b in available]
            listed = preferred[:1] + [b for b in available if b not in preferred[:1]]
            print(f"    {op:{width}s}  {', '.join(listed)}")
    print(f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, head4d {env['head4d']}, "
          f"commit {env['git_commit'] or '?'}")
    return 0


def _fit_settings(prog: str, args: argparse.Namespace):
    """The procedural subject's fit settings from ``--fit-steps`` (None after printing an
    error when it is below 1)."""
    from .demo.subject import FitSettings

    if args.fit_steps is not None and args.fit_steps < 1:
        print(f"{prog}: --fit-steps must be >= 1, got {args.fit_steps}", file=sys.stderr)
        return None
    return FitSettings() if args.fit_steps is None else FitSettings(steps=args.fit_steps)


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import DemoError, run_demo

    settings = _fit_settings("head4d demo", args)
    if settings is None:
        return 2
    try:
        run_demo(args.out, checkpoint=args.checkpoint, device=args.device, resolution=args.resolution,
                 frames=args.frames, cache_dir=args.cache, settings=settings, seed=args.seed)
    except DemoError as exc:
        print(f"head4d demo: {exc}", file=sys.stderr)
        return 2
    return 0


def _reenact(args: argparse.Namespace) -> int:
    from .reenact import ReenactError, run_reenact

    settings = _fit_settings("head4d reenact", args)
    if settings is None:
        return 2
    try:
        run_reenact(args.out, checkpoint=args.checkpoint, source=args.source, motion=args.motion,
                    source_motion=args.source_motion, camera=args.camera, neck=args.neck, batch=args.batch,
                    device=args.device,
                    resolution=args.resolution, depth=args.depth, mesh=args.mesh,
                    mesh_resolution=args.mesh_resolution, synthetic=args.synthetic, genhead=args.genhead,
                    frames=args.frames, source_resolution=args.source_resolution, motion_dim=args.motion_dim,
                    cache_dir=args.cache, settings=settings, seed=args.seed, fps=args.fps)
    except ReenactError as exc:
        print(f"head4d reenact: {exc}", file=sys.stderr)
        return 2
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    import pickle

    import numpy as np

    from .synthesis import TripletSampler, write_triplets

    prog = "head4d synthesize"
    if args.count < 1 or args.batch < 1:
        print(f"{prog}: --count and --batch must be >= 1, got {args.count} and {args.batch}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        from .checkpoints import load
        genhead = load(args.genhead, device=args.device, kind="GenHead")
        extra = {}
        for option, key in ((args.motions, "motions"), (args.cameras, "dataset_cameras")):
            if option is not None:
                extra[key] = torch.from_numpy(np.load(option)).float()
        generator = torch.Generator(args.device).manual_seed(args.seed)
        sampler = TripletSampler(genhead, generator=generator, **extra)
        write_triplets(sampler, args.out, args.count, batch=args.batch, log=print)
    except (OSError, ValueError, TypeError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0


def _make_dataset(args: argparse.Namespace) -> int:
    from .data import make_procedural_dataset

    prog = "head4d make-dataset"
    if args.procedural < 1:
        print(f"{prog}: --procedural must be >= 1, got {args.procedural}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        path = make_procedural_dataset(args.procedural, args.out, resolution=args.resolution, seed=args.seed,
                                       as_zip=args.zip, device=args.device, log=print)
    except (OSError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    print(f"{prog}: wrote {args.procedural} images, their masks and dataset.json to {path}")
    return 0



def _add_run_arguments(p: argparse.ArgumentParser, items: str, network: str) -> None:
    """The arguments both trainings take: resuming, the dry run, seed, device, precision,
    accumulation and image grids (``items``: what a batch holds; ``network``: what the EMA
    grids show)."""
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument("--dry-run", action="store_true", help="build everything and run two steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and every random draw (default 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="fp32 (default), or bf16: bfloat16 autocast in the StyleGAN2 convolution blocks (CUDA only)")
    p.add_argument("--accumulate", type=int, metavar="K",
                   help=f"micro-batches per optimizer step, each --batch / K {items} (default 1)")
    p.add_argument("--image-every", type=int, metavar="N",
                   help=f"steps between image grids of the EMA {network} (default 1000; also at the end)")

def _train_genhead(args: argparse.Namespace) -> int:
    from .train.genhead import GenHeadTrainingConfig, train_genhead

    prog = "head4d train genhead"
    kwargs = {"data": args.data, "out": args.out, "resume": args.resume, "dry_run": args.dry_run,
              "seed": args.seed, "xflip": args.xflip}
    for name in ("batch", "kimg", "device", "precision", "accumulate", "workers", "image_every"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    try:
        config = GenHeadTrainingConfig.small(**kwargs) if args.small else GenHeadTrainingConfig(**kwargs)
        train_genhead(config)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0


def _train_reconstructor(args: argparse.Namespace) -> int:
    from .train.reconstructor import ReconstructorTrainingConfig, train_reconstructor

    prog = "head4d train reconstructor"
    if args.genhead is None and not args.small:
        print(f"{prog}: --genhead CKPT is needed (a Portrait4D genhead-*.pkl or a GenHead.save directory); only "
              f"--small runs without one, on an untrained GenHead", file=sys.stderr)
        return 2
    kwargs = {"genhead": args.genhead, "out": args.out, "resume": args.resume, "dry_run": args.dry_run,
              "seed": args.seed, "identity_weights": args.identity_weights, "lpips_backbone": args.lpips_backbone}
    for name in ("batch", "kimg", "device", "precision", "accumulate", "image_every", "global_encoder_init"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    try:
        config = ReconstructorTrainingConfig.small(**kwargs) if args.small else ReconstructorTrainingConfig(**kwargs)
        train_reconstructor(config)
    except (OSError, ValueError, TypeError, RuntimeError, ImportError) as exc:  # a missing weights file is an OSError
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="head4d", description="head4d: fast triplane NeRF head kernels")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="check and time each op's backends against the reference",
                       description="Checks each op's fast backends against the reference "
                                   "('torch') on the same inputs, then times both (warm-up, "
                                   "median). Exit code 1 if a check failed.")
    p.add_argument("--ops", nargs="+", metavar="NAME", help="ops to run (default: all)")
    p.add_argument("--backends", nargs="+", metavar="NAME",
                   help="fast backends to time (default: all available; the reference always runs)")
    p.add_argument("--batch", nargs="+", type=int, metavar="N",
                   help="batch sizes (default: 1; --full on CUDA: 1 4)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer, smaller cases (their own shape labels)")
    mode.add_argument("--full", action="store_true",
                      help="every shape of every op on this device with longer budgets (the gate's mode)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="timed seconds per (case, pass, backend) (default and quick: 0.25 on CUDA, "
                        "0.5 on CPU; --full: 1 / 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--json", metavar="PATH", help="also write every row and the environment here")
    p.add_argument("--write-order", metavar="FILE",
                   help="derive each op's default backend order (fastest correct first) from the run "
                        "and write it into this order file (entries of other device types are kept); "
                        "the committed one is head4d/backend_order.json")
    p.add_argument("--from-json", metavar="BENCH_JSON",
                   help="with --write-order: derive the order from this saved bench (or gate) JSON "
                        "instead of running")
    p.set_defaults(func=_bench)

    p = sub.add_parser("demo", help="render an avatar turning, changing expression, opening the jaw, "
                                    "moving the eyes and the neck",
                       description="Renders a turntable and expression, jaw, eye and neck sweeps through "
                                   "GenHead.render and writes PNG grids (images, depth, opacity), one frame "
                                   "and an animation (MP4 when imageio-ffmpeg or torchvision is importable, "
                                   "else GIF); prints the frames per second. Without --checkpoint the "
                                   "subject is the built-in procedural head, fitted into a triplane once "
                                   "(under two minutes on 2 CPU cores) and cached.")
    p.add_argument("--checkpoint", metavar="PKL_OR_DIR",
                   help="a Portrait4D GenHead pickle or a directory saved by GenHead.save "
                        "(default: the built-in procedural subject)")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output directory (default: demo_out)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available, else cpu")
    p.add_argument("--resolution", type=int, default=64, metavar="R",
                   help="neural rendering resolution, 8 to 64 (default 64)")
    p.add_argument("--frames", type=int, default=8, metavar="N", help="frames per sequence (default 8)")
    p.add_argument("--cache", metavar="DIR",
                   help="where the fitted procedural subject is cached (default: ~/.cache/head4d)")
    p.add_argument("--fit-steps", type=int, metavar="N",
                   help="optimizer steps of the procedural subject's fit (default 300; tests use a few)")
    p.add_argument("--seed", type=int, default=0, help="identity of a checkpoint, renderer jitter (default 0)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("reenact", help="re-enact a source image with motion vectors through the reconstructor",
                       description="Encodes an aligned source image once, then renders one frame per motion "
                                   "vector in batches, writing each batch before the next: frames/*.png, "
                                   "reenact.mp4 (reenact.gif without an MP4 encoder), with --depth depth/*.png, "
                                   "with --mesh canonical.ply; prints the frames per second and where the time "
                                   "went. --synthetic needs no files: GenHead renders the source and its motion.")
    p.add_argument("--checkpoint", metavar="PKL_OR_DIR",
                   help="a Portrait4D reconstructor pickle or a directory saved by Reconstructor.save "
                        "(needed unless --synthetic, which then uses untrained weights)")
    p.add_argument("--source", metavar="IMAGE",
                   help="the source image: PNG / JPEG (needs Pillow) or .npy [3,S,S] / [S,S,3], RGB, S the model's "
                        "source resolution (512 for Portrait4D's), aligned as Portrait4D aligns faces")
    p.add_argument("--motion", metavar="MOTIONS.npy",
                   help="motion vectors [F, D], D the model's (548 PD-FGC or 109 FLAME); one frame each")
    p.add_argument("--source-motion", metavar="FILE",
                   help="the source image's own motion vector [D] (default: the first row of --motion)")
    p.add_argument("--camera", default="fixed", metavar="fixed|orbit|FILE",
                   help="'fixed' (Portrait4D's: at (0, 0.01, 4.2), identity rotation), 'orbit' (a yaw sweep) or "
                        "a .npy of [F, 25] camera labels (default fixed)")
    p.add_argument("--neck", metavar="POSES.npy",
                   help="neck rotations [F, 3] (axis-angle, radians): the head turns on its neck (the "
                        "reconstructor's neck warp), as Portrait4D drives it with the fixed camera")
    p.add_argument("--out", default="reenact_out", metavar="DIR", help="output directory (default: reenact_out)")
    p.add_argument("--batch", type=int, default=4, metavar="K", help="frames rendered per batch (default 4)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available, else cpu")
    p.add_argument("--resolution", type=int, metavar="R",
                   help="neural rendering resolution, 8 to 128 (default: the model's; 128 for Portrait4D's)")
    p.add_argument("--depth", action="store_true", help="also write depth maps (and show them in the animation)")
    p.add_argument("--mesh", action="store_true",
                   help="also write canonical.ply: marching tetrahedra on the canonical head's density, level 25")
    p.add_argument("--mesh-resolution", type=int, default=128, metavar="N", help="mesh grid side (default 128)")
    p.add_argument("--fps", type=float, default=25.0, help="frame rate of the animation (default 25)")
    p.add_argument("--synthetic", action="store_true",
                   help="no user files: GenHead renders the source and a FLAME motion sequence")
    p.add_argument("--genhead", metavar="PKL_OR_DIR",
                   help="with --synthetic: the GenHead that renders the source (default: the demo's procedural head)")
    p.add_argument("--frames", type=int, default=16, metavar="N", help="with --synthetic: frames (default 16)")
    p.add_argument("--source-resolution", type=int, default=64, metavar="S",
                   help="with --synthetic and no --checkpoint: the untrained model's source side (default 64)")
    p.add_argument("--motion-dim", type=int, default=109, choices=(109, 548),
                   help="with --synthetic and no --checkpoint: the untrained model's motion size (default 109)")
    p.add_argument("--cache", metavar="DIR", help="where the procedural subject is cached (default: ~/.cache/head4d)")
    p.add_argument("--fit-steps", type=int, metavar="N", help="optimizer steps of the procedural subject's fit")
    p.add_argument("--seed", type=int, default=0, help="untrained weights, GenHead identity, renderer jitter")
    p.set_defaults(func=_reenact)

    p = sub.add_parser("info", help="versions, which backends are available, and per op which it has")
    p.set_defaults(func=_info)

    p = sub.add_parser("synthesize", help="write Portrait4D's reconstructor training triplets drawn from a GenHead",
                       description="Draws (source, driver, target) triplets from a frozen GenHead as "
                                   "head4d.synthesis.TripletSampler does online, and writes each view's image "
                                   "and raw image as PNG plus one labels.npz (cameras, FLAME codes, motions, "
                                   "motion scale, depth, masks, triplane-feature targets; see "
                                   "head4d.synthesis.writer). The built-in procedural demo subject is one fitted "
                                   "triplane, not a generator, so a GenHead is required.")
    p.add_argument("--genhead", required=True, metavar="PKL_OR_DIR",
                   help="a Portrait4D GenHead pickle (its G_ema) or a directory saved by GenHead.save")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--count", type=int, required=True, metavar="N", help="number of triplets")
    p.add_argument("--batch", type=int, default=4, metavar="B", help="triplets per batch (default 4)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--motions", metavar="NPY", help="motion clips [C, T, 109] (.npy; default: head4d's random "
                                                     "motion model, head4d.synthesis.motions)")
    p.add_argument("--cameras", metavar="NPY", help="dataset camera labels [M, 25] (.npy) for half the views "
                                                     "(default: all look-at cameras)")
    p.set_defaults(func=_synthesize)

    p = sub.add_parser("make-dataset", help="write a small labelled dataset for GenHead's training from the "
                                            "built-in procedural head",
                       description="Renders the built-in procedural head with head4d's rasterizer under random "
                                   "Portrait4D-like cameras (FOV 12 degrees) and random FLAME-style codes, shaded "
                                   "simply, and writes the images as PNG, their foreground masks (the head's "
                                   "silhouette) under masks/ and dataset.json (the 437-number labels; format: "
                                   "head4d.data.dataset), readable by head4d.data.ImageLabelDataset.")
    p.add_argument("--procedural", type=int, required=True, metavar="N", help="number of images")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (with --zip: DIR.zip)")
    p.add_argument("--resolution", type=int, default=512, metavar="R", help="image side (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--zip", action="store_true", help="write one zip archive instead of a folder")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to rasterize (default cpu)")
    p.set_defaults(func=_make_dataset)

    p = sub.add_parser("train", help="train a model (GenHead's GAN training, the reconstructor's training); "
                       "runs under torchrun unchanged")
    train_sub = p.add_subparsers(dest="training", required=True)
    p = train_sub.add_parser("genhead", help="GenHead's GAN training on a labelled image dataset",
                             description="Portrait4D's GenHead GAN training (head4d.train.genhead): the dual "
                                         "discriminator, R1, lazy regularization, the blur fade, the pose "
                                         "conditioning swap, the density and part-region regularizers, EMA. "
                                         "Writes OUT/checkpoint.safetensors (atomically) and the logs. Under "
                                         "'torchrun --nproc_per_node N' each process trains on --batch images.")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder or zip with dataset.json")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (checkpoint, logs)")
    p.add_argument("--batch", type=int, metavar="B", help="images per process (default 8; --small: 2)")
    p.add_argument("--kimg", type=float, metavar="K", help="thousands of images to train on (default 25000)")
    p.add_argument("--small", action="store_true", help="a tiny GenHead and discriminator (CPU tests)")
    p.add_argument("--xflip", action="store_true", help="add mirrored copies of the dataset")
    p.add_argument("--workers", type=int, metavar="N",
                   help="DataLoader worker processes reading the images (default 0: in the training process)")
    _add_run_arguments(p, "images", "generator")
    p.set_defaults(func=_train_genhead)

    p = train_sub.add_parser("reconstructor", help="the reconstructor's training on triplets synthesized online "
                             "by a frozen GenHead",
                             description="Portrait4D's reconstructor training (head4d.train.reconstructor): L1, "
                                         "LPIPS, segmentation, depth, feature and triplane losses, the identity "
                                         "and adversarial terms after their starts, density regularization, the "
                                         "resolution fade, the static half of each batch. Writes "
                                         "OUT/checkpoint.safetensors (atomically), the logs and OUT/G_ema. Under "
                                         "'torchrun --nproc_per_node N' each process trains on --batch triplets.")
    p.add_argument("--genhead", metavar="CKPT", help="the frozen GenHead: a genhead-*.pkl or a GenHead.save "
                   "directory (needed unless --small, which then uses an untrained one)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (checkpoint, logs, G_ema)")
    p.add_argument("--batch", type=int, metavar="B", help="triplets per process (default 4; --small: 2)")
    p.add_argument("--kimg", type=float, metavar="K", help="thousands of images to train on (default 15000)")
    p.add_argument("--small", action="store_true", help="a tiny reconstructor and discriminator (CPU tests)")
    p.add_argument("--identity-weights", metavar="FILE", help="the identity network's weights (ArcFace "
                   "iresnet18); without them the identity loss is off")
    p.add_argument("--lpips-backbone", choices=("pretrained", "random"), default="pretrained",
                   help="LPIPS's VGG16: torchvision's cached ImageNet weights (default) or random weights (tests)")
    p.add_argument("--global-encoder-init", choices=("imagenet", "random"),
                   help="the global encoder's ResNet-34 trunk: torchvision's cached ImageNet weights (default; "
                        "--small: random) or random weights")
    _add_run_arguments(p, "triplets", "reconstructor")
    p.set_defaults(func=_train_reconstructor)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
