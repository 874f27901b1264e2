"""The benchmark gate: each op's fast backends must keep their speedup over the reference.

    python benchmarks/gate.py [--device-key KEY] [--baselines benchmarks/baselines]
                              [--report PATH] [--quick]

Runs every op's cases through :mod:`head4d.bench` (correctness checks first, then the
reference and the fast backends timed in this one process) and compares each speedup
(reference median / backend median) with its floor in ``<baselines>/<device key>.json``:

    {"device": "...", "note": "how the floors were set",
     "floors": {"sample_triplanes/fwd/<shape>/<backend>": 1.0, ...},
     "memory_floors": {"render/fwd+bwd/<shape>/<backend>": 5.0, ...}}

A memory floor bounds the row's memory ratio (the reference's peak memory over the
backend's on CUDA, the bytes saved for the backward on the CPU) from below.

Exit code 1 when a speedup is below its floor, a correctness check failed or a backend
raised; and on the CPU when the floors name the ``cpu`` backend but the compiled
extension is not importable (CI must build it). A floor for a backend that cannot run
here (``cuda`` on a CPU machine) or for a shape this run did not measure is skipped.
With no baseline file for the device the gate fails (exit code 1): it still runs the
cases, checks correctness and prints a baseline built from this run to start one from,
but an ungated run must not read as a pass.

The gate runs the benchmarks' full mode (``head4d bench --full``: every shape, the long
budget), which its floors were measured in; ``--quick`` the quick mode. The default
``head4d bench`` runs smaller shapes on the CPU, with labels of their own.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # gate the checkout this script lives in
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from head4d import _backend, bench  # noqa: E402

#: Suggested floors keep this fraction of the measured speedup, capped at 1.0
#: ("at least as fast as the reference"); see benchmarks/baselines/README.md.
MARGIN = 0.7


def suggest_floors(results) -> dict:
    """Floors from this run's speedups: ``min(1.0, MARGIN * speedup)``, two decimals."""
    return {r.key: round(min(1.0, MARGIN * r.speedup), 2) for r in results
            if r.status == "ok" and r.backend != bench.REFERENCE}


def evaluate_memory(memory_floors: dict, results):
    """One verdict per memory floor: the row's ``memory_ratio`` (the reference's peak, or
    on the CPU its saved-for-backward bytes, over the backend's) must reach the floor.
    Keys as for speedups; rows not measured here are skipped."""
    by_key = {r.key: r for r in results}
    checks = []
    for key, floor in memory_floors.items():
        r = by_key.get(key)
        if r is None or r.status == "skip" or (r.status == "ok" and r.memory_ratio is None):
            checks.append(dict(key=key + " [memory]", floor=floor, speedup=None, status="skip",
                               why="not measured in this run"))
        elif r.failed:
            checks.append(dict(key=key + " [memory]", floor=floor, speedup=None, status="FAIL",
                               why=f"{r.status}: {r.message}"))
        else:
            ok = r.memory_ratio >= floor
            checks.append(dict(key=key + " [memory]", floor=floor, speedup=r.memory_ratio,
                               status="pass" if ok else "FAIL",
                               why="" if ok else f"memory ratio {r.memory_ratio:.2f} < floor {floor}"))
    return checks


def evaluate(floors: dict, results, device: torch.device):
    """One verdict per floor, plus one per failed result no floor covers.

    Returns a list of dicts ``{key, floor, speedup, status, why}`` with status
    ``pass``, ``FAIL``, ``skip`` or ``none`` (measured, but the baseline has no floor).
    """
    by_key = {r.key: r for r in results}
    checks = []
    for key, floor in floors.items():
        parts = key.split("/")
        if len(parts) != 4:
            checks.append(dict(key=key, floor=floor, speedup=None, status="FAIL",
                               why="malformed key: expected op/pass/shape/backend"))
            continue
        backend = parts[3]
        r = by_key.get(key)
        reason = _backend.unavailable_reason(backend, device)
        if device.type == "cpu" and backend == "cpu" and reason is not None:
            checks.append(dict(key=key, floor=floor, speedup=None, status="FAIL",
                               why=f"the cpu backend must be built for the gate: {reason}"))
        elif r is None:
            why = (f"backend unavailable here: {reason}" if reason is not None
                   else "not measured in this run (other shape, op or mode)")
            checks.append(dict(key=key, floor=floor, speedup=None, status="skip", why=why))
        elif r.status == "skip":
            checks.append(dict(key=key, floor=floor, speedup=None, status="skip",
                               why=f"backend unavailable here: {r.message}"))
        elif r.failed:
            checks.append(dict(key=key, floor=floor, speedup=None, status="FAIL",
                               why=f"{r.status}: {r.message}"))
        else:
            ok = r.speedup >= floor
            checks.append(dict(key=key, floor=floor, speedup=r.speedup,
                               status="pass" if ok else "FAIL",
                               why="" if ok else f"speedup {r.speedup:.2f} < floor {floor}"))
    for r in results:
        if r.key in floors or r.backend == bench.REFERENCE:
            continue
        if r.failed:
            checks.append(dict(key=r.key, floor=None, speedup=None, status="FAIL",
                               why=f"{r.status}: {r.message}"))
        elif r.status == "ok" and floors:
            checks.append(dict(key=r.key, floor=None, speedup=r.speedup, status="none",
                               why="no floor in the baseline"))
    return checks


def print_checks(checks) -> None:
    width = max([len(c["key"]) for c in checks] + [10])
    print(f"{'key':<{width}}  {'floor':>5}  {'speedup':>7}  status  why")
    print("-" * (width + 30))
    for c in checks:
        floor = "-" if c["floor"] is None else f"{c['floor']:.2f}"
        speedup = "-" if c["speedup"] is None else f"{c['speedup']:.2f}x"
        print(f"{c['key']:<{width}}  {floor:>5}  {speedup:>7}  {c['status']:<6}  {c['why']}".rstrip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device-key", help="baseline to use (default: 'cpu', or a slug of the GPU's name)")
    parser.add_argument("--baselines", default=os.path.join(ROOT, "benchmarks", "baselines"),
                        help="folder of <device key>.json baselines")
    parser.add_argument("--report", help="JSON report path (default: benchmarks/reports/gate-<key>.json)")
    parser.add_argument("--quick", action="store_true", help="the benchmarks' quick mode (default: full)")
    args = parser.parse_args(argv)

    device = bench.default_device()
    key = args.device_key or bench.device_key(device)
    baseline_path = os.path.join(args.baselines, f"{key}.json")
    shown_path = baseline_path  # printed and recorded: relative to the checkout when inside it
    if os.path.abspath(baseline_path).startswith(ROOT + os.sep):
        shown_path = os.path.relpath(os.path.abspath(baseline_path), ROOT)
    report_path = args.report or os.path.join(ROOT, "benchmarks", "reports", f"gate-{key}.json")
    baseline = None
    if os.path.exists(baseline_path):
        with open(baseline_path) as f:
            baseline = json.load(f)

    print(f"gate   : {bench.device_name(device)}; baseline {shown_path}"
          f"{'' if baseline else ' (MISSING)'}; {'quick' if args.quick else 'full'} mode")
    print(bench.table_header(), flush=True)
    start = time.perf_counter()
    settings = bench.Settings(device=device, quick=args.quick, full=not args.quick)
    results = bench.run(settings, on_result=lambda r: print(bench.table_row(r), flush=True))
    elapsed = time.perf_counter() - start
    print(f"({len(results)} rows in {elapsed:.1f} s)\n")

    suggested = suggest_floors(results)
    floors = baseline.get("floors", {}) if baseline else {}
    checks = evaluate(floors, results, device)
    checks += evaluate_memory(baseline.get("memory_floors", {}) if baseline else {}, results)
    if checks:
        print_checks(checks)
    failed = [c for c in checks if c["status"] == "FAIL"]

    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    data = bench.report(results, device, gate={
        "device_key": key, "baseline": shown_path if baseline else None,
        "quick": args.quick, "elapsed_s": elapsed,
        "verdict": "fail: no baseline" if baseline is None else ("fail" if failed else "pass"),
        "checks": checks, "suggested_floors": suggested, "suggested_margin": MARGIN})
    with open(report_path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"\nreport : {report_path}")

    if baseline is None:
        example = {"device": bench.device_name(device),
                   "note": f"floors = min(1.0, {MARGIN} x speedup measured on <date>, commit <sha>)",
                   "floors": suggested}
        print(f"\nA baseline from this run would be:\n{json.dumps(example, indent=1)}")
        print(f"\nGATE FAILED: no baseline for device key '{key}' ({shown_path} does not exist), so no "
              f"speedup was gated; commit one (see benchmarks/baselines/README.md) or pass --device-key"
              + (f"; and {len(failed)} of {len(checks)} checks failed" if failed else ""))
        return 1
    if failed:
        print(f"\nGATE FAILED: {len(failed)} of {len(checks)} checks")
        return 1
    passed = sum(c["status"] == "pass" for c in checks)
    skipped = sum(c["status"] == "skip" for c in checks)
    print(f"\ngate passed: {passed} passed, {skipped} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
