"""The ``head4d`` command.

    head4d bench [--ops NAME ...] [--backends NAME ...] [--batch N ...] [--quick]
                 [--budget SECONDS] [--json PATH]
    head4d info

``bench`` checks each op's fast backends against the reference and times them beside it
on whatever device is present (CUDA if available, else the CPU); one table row per
(op, pass, shape, backend). Exit code 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import torch


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    device = torch.device(args.device) if args.device else bench.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        print("head4d bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    settings = bench.Settings(device=device, batches=tuple(args.batch) if args.batch else None,
                              quick=args.quick)
    try:
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
    print(f"cases  : {len(cases)} ({'quick' if args.quick else 'full'}); "
          f"speedup = reference ('torch') median / backend median, same process, same inputs\n")
    print(bench.table_header(), flush=True)

    start = time.perf_counter()
    results: List[bench.Result] = []
    budget = bench.default_budget(device, args.quick) if args.budget is None else args.budget
    for case in cases:
        results += bench.run_case(case, device, budget, args.backends,
                                  on_result=lambda r: print(bench.table_row(r), flush=True))
    elapsed = time.perf_counter() - start

    failed = [r for r in results if r.failed]
    print(f"\n{len(results)} rows in {elapsed:.1f} s; "
          + (f"{len(failed)} FAILED: " + ", ".join(r.key for r in failed) if failed
             else "all checks passed"))
    if args.json:
        data = bench.report(results, device, settings={
            "ops": [c.op for c in cases], "quick": args.quick, "batches": args.batch,
            "backends": args.backends, "budget_s": budget, "elapsed_s": elapsed})
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {args.json}")
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
                   help="batch sizes (default: 1 4 on CUDA, 1 on CPU)")
    p.add_argument("--quick", action="store_true", help="fewer, smaller cases and a shorter budget")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="timed seconds per (case, pass, backend) (default: 1 on CUDA, 2 on CPU; "
                        "quick: 0.25 / 0.5)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--json", metavar="PATH", help="also write every row and the environment here")
    p.set_defaults(func=_bench)

    p = sub.add_parser("info", help="versions, which backends are available, and per op which it has")
    p.set_defaults(func=_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
