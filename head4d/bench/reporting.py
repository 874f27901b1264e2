"""Reporting a run: the device and versions it ran with, the printed table, the JSON record."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from typing import List, Optional, Sequence

import torch

from .. import _backend
from .case import REFERENCE
from .harness import Result, copy_bandwidth


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3``, or the CPU model with its core count and torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_key(device: torch.device) -> str:
    """The gate's name for a device: ``cpu``, or a slug of the GPU's name
    (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _git(*args: str) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Where and with what the numbers were taken."""
    from .. import __version__

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # reported as absent; a broken Triton install raises
        triton_version = None
    ext = _backend.extension()
    bandwidth = copy_bandwidth(device)
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    if commit is None:  # a copy without .git (a device machine): the caller may say which
        commit = os.environ.get("HEAD4D_GIT_COMMIT") or None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "device_key": device_key(device),
        "copy_bandwidth_gbps": None if bandwidth is None else bandwidth / 1e9,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "head4d": __version__,
        "extension": None if ext is None else {"cuda_kernels": bool(ext.with_cuda())},
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": None if dirty is None else bool(dirty),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# Columns of the printed table: (header, width, right-aligned).
_COLUMNS = (("op", 18, False), ("pass", 7, False), ("shape", 30, False), ("backend", 7, False),
            ("median ms", 10, True), ("IQR", 6, True), ("vs ref", 7, True), ("GB/s", 8, True),
            ("floor ms", 8, True), ("mem MB", 7, True), ("mem ratio", 9, True), ("check", 22, False))


def _cells(r: Result) -> List[str]:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)
    if r.status == "ok":
        iqr = f"{100 * (r.p75_ms - r.p25_ms) / r.median_ms:.0f}%"
        worst = max(r.errors.values()) if r.errors else None
        check_cell = "reference" if r.backend == REFERENCE else f"ok {worst:.1e}"
    else:
        first = (r.message.splitlines() or [""])[0]
        iqr, check_cell = "-", f"{r.status.upper()}: {first[:120]}"
    return [r.op, r.pass_, r.shape, r.backend, num(r.median_ms, ".3f"), iqr,
            num(r.speedup, ".2f") + ("x" if r.speedup is not None else ""),
            num(r.gbps, ".1f"), num(r.floor_ms, ".3f"), _memory_mb(r),
            num(r.memory_ratio, ".2f") + ("x" if r.memory_ratio is not None else ""), check_cell]


def _memory_mb(r: Result) -> str:
    """The peak (CUDA) or saved-for-backward (CPU) megabytes of a row, ``-`` if not measured."""
    value = r.peak_bytes if r.peak_bytes is not None else r.saved_bytes
    return "-" if value is None else f"{value / 2**20:.0f}"


def _line(cells: Sequence[str]) -> str:
    parts = []
    for cell, (_, width, right) in zip(cells, _COLUMNS):
        parts.append(cell.rjust(width) if right else cell.ljust(width))
    return "  ".join(parts).rstrip()


def table_header() -> str:
    """The table's header line and a rule under it."""
    head = _line([h for h, _, _ in _COLUMNS])
    return head + "\n" + "-" * len(head)


def table_row(result: Result) -> str:
    """One aligned line for ``result``."""
    return _line(_cells(result))


def format_table(results: Sequence[Result]) -> str:
    return "\n".join([table_header()] + [table_row(r) for r in results])


def report(results: Sequence[Result], device: torch.device, **extra) -> dict:
    """The JSON-able record of a run: environment, settings and every row."""
    return {"environment": environment(device), **extra,
            "results": [r.to_json() for r in results]}
