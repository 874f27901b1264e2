"""Pieces shared by head4d's trainings (GenHead's GAN training now, the reconstructor's later).

- **Checkpoints** (:func:`save_checkpoint`, :func:`load_checkpoint`): one file written by
  ``torch.save`` holding a dict of plain state: the networks' ``state_dict()`` (tensors),
  the optimizers' ``state_dict()``, the EMA network's state dict, the step counters, the
  random states (torch CPU, every CUDA device, numpy, python) and the config as a dict of
  plain values. ``torch.save`` of state dicts was picked over safetensors because the
  optimizer states and the random states are nested, non-tensor structures that
  safetensors cannot hold; every tensor is still a plain state-dict entry, so a network
  loads with ``load_state_dict`` and the EMA generator can be exported in the models'
  safetensors format with ``GenHead.save``. Files are read back with
  ``torch.load(weights_only=True)`` (no pickled code runs). The write is atomic: a temporary
  file in the same directory, flushed and ``fsync``-ed, then ``os.replace`` onto the final
  name (and the directory fsync-ed), so a crash mid-write leaves the previous checkpoint whole.
- **EMA** (:func:`ema_beta`, :func:`update_ema`): StyleGAN2's running average of the
  generator. With ``ema_nimg = ema_kimg * 1000``, shortened during ramp-up to
  ``min(ema_nimg, cur_nimg * ema_rampup)`` when ``ema_rampup`` is set, each step's decay
  is ``beta = 0.5 ** (batch / max(ema_nimg, 1e-8))`` (``ema_nimg`` images is the
  half-life); parameters move to ``p_ema = p + beta * (p_ema - p)``, buffers are copied.
- **Lazy regularization** (:func:`lazy_adam_settings`): a regularizer run every
  ``reg_interval`` steps (its loss times ``reg_interval``) shares the optimizer, whose
  learning rate is scaled by ``mb_ratio = reg_interval / (reg_interval + 1)`` and whose
  betas are raised to the power ``mb_ratio``.
- **Distributed** (:class:`Distributed`): ``torch.distributed`` initialised from
  torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` /
  ``MASTER_PORT``): gloo on the CPU, NCCL on GPUs; one process is world size 1 without a
  process group. Gradients are averaged as StyleGAN2 does it (not DistributedDataParallel):
  the parameters are broadcast from rank 0 once, then after each phase's backward every
  parameter's gradient is all-reduced (summed, divided by the world size) before the
  optimizer step, so the ranks keep identical weights. This works with R1's double backward
  and with phases that touch only part of a network, which DistributedDataParallel's
  reducer handles badly. Rank 0 alone writes checkpoints and logs.
- **Progress** (:class:`ProgressLog`): a line per report (step, images, images/s, losses,
  ETA) on stdout, and scalars to TensorBoard when ``torch.utils.tensorboard`` imports (it
  needs the ``tensorboard`` package), else to ``log.jsonl`` in the output folder (it says
  which at the start).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "Distributed", "ProgressLog", "ema_beta", "get_rng_state",
           "lazy_adam_settings", "load_checkpoint", "replace_directory", "save_checkpoint", "set_rng_state",
           "update_ema"]

CHECKPOINT_FORMAT = "head4d.train"
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------- random states
def get_rng_state() -> Dict[str, Any]:
    """Every random state a training draws from, as tensors and plain values:
    ``torch`` (CPU ``ByteTensor``), ``cuda`` (a list, one per device, empty without CUDA),
    ``numpy`` (the MT19937 key as an int64 tensor, position, Gaussian cache) and ``python``
    (``random.getstate()``, as lists)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": int(version), "internal": list(internal), "gauss": gauss}}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA states only where CUDA is present
    and the device counts match)."""
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda", []))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# ---------------------------------------------------------------------- checkpoints
def _fsync_directory(directory: Path) -> None:
    """fsync a directory so that a rename inside it survives a crash (no-op where the
    platform cannot open directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Union[str, os.PathLike], state: Mapping[str, Any],
                    _before_replace: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``state`` (plain values, tensors, state dicts) to ``path`` atomically.

    The dict is written by ``torch.save`` to a temporary file in ``path``'s directory,
    flushed and fsync-ed, then renamed onto ``path`` with ``os.replace``; on any error the
    temporary file is removed and ``path`` is left as it was. ``format`` and ``version``
    entries are added.

    Args:
        path: the checkpoint file.
        state: what to store (see :mod:`head4d.train.common`).
        _before_replace: for tests: called with the temporary file's path after it is
            written and before the rename (raise there to simulate a crash mid-write).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    if not isinstance(state, Mapping):
        raise TypeError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(state)
    payload["format"], payload["version"] = CHECKPOINT_FORMAT, CHECKPOINT_VERSION
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        if _before_replace is not None:
            _before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def load_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only``: no code runs).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a head4d training checkpoint, or of a newer version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"load_checkpoint: {path} is not a head4d training checkpoint "
                         f"(expected format {CHECKPOINT_FORMAT!r})")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"load_checkpoint: {path} has version {state['version']}, this head4d reads up to "
                         f"{CHECKPOINT_VERSION}")
    return state


def replace_directory(directory: Union[str, os.PathLike], write: Callable[[Path], None]) -> Path:
    """Write a model directory (``write(path)``, e.g. ``GenHead.save``) beside ``directory``,
    then swap it in: the old directory, if any, is renamed aside, the new one renamed onto
    ``directory``, the old one removed. A failed write leaves ``directory`` as it was."""
    import shutil

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        write(fresh)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
        old.rmdir()
        os.replace(directory, old)
    os.replace(fresh, directory)
    _fsync_directory(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def config_to_dict(config: Any) -> Dict[str, Any]:
    """A dataclass config as a dict of plain values (nested dataclasses too)."""
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config)


# ---------------------------------------------------------------------- EMA
def ema_beta(batch: int, cur_nimg: int, ema_kimg: float, ema_rampup: Optional[float]) -> float:
    """StyleGAN2's EMA decay for one step of ``batch`` images after ``cur_nimg`` images:
    ``ema_nimg = ema_kimg * 1000``, ``min(ema_nimg, cur_nimg * ema_rampup)`` with a ramp-up,
    ``beta = 0.5 ** (batch / max(ema_nimg, 1e-8))``."""
    if batch < 1 or cur_nimg < 0 or ema_kimg < 0 or (ema_rampup is not None and ema_rampup < 0):
        raise ValueError(f"ema_beta: expected batch >= 1, cur_nimg >= 0, ema_kimg >= 0, ema_rampup None or >= 0; "
                         f"got {batch}, {cur_nimg}, {ema_kimg}, {ema_rampup}")
    ema_nimg = ema_kimg * 1000
    if ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """``ema``'s parameters moved towards ``model``'s (``p_ema = p + beta * (p_ema - p)``)
    and its buffers copied from ``model``'s, in place; the two must have the same names."""
    model_params = dict(model.named_parameters())
    for name, p_ema in ema.named_parameters():
        p_ema.copy_(model_params[name].detach().lerp(p_ema, beta))
    model_buffers = dict(model.named_buffers())
    for name, b_ema in ema.named_buffers():
        b_ema.copy_(model_buffers[name])


# ---------------------------------------------------------------------- lazy regularization
def lazy_adam_settings(lr: float, betas: Tuple[float, float],
                       reg_interval: Optional[int]) -> Tuple[float, Tuple[float, float]]:
    """Adam's ``(lr, betas)`` for a network regularized every ``reg_interval`` steps:
    ``mb_ratio = reg_interval / (reg_interval + 1)``, ``lr * mb_ratio``,
    ``betas ** mb_ratio``; unchanged when ``reg_interval`` is None (no lazy regularization)."""
    if reg_interval is None:
        return lr, tuple(betas)
    if isinstance(reg_interval, bool) or not isinstance(reg_interval, int) or reg_interval < 1:
        raise ValueError(f"lazy_adam_settings: reg_interval must be an int >= 1 or None, got {reg_interval!r}")
    mb_ratio = reg_interval / (reg_interval + 1)
    return lr * mb_ratio, (betas[0] ** mb_ratio, betas[1] ** mb_ratio)


# ---------------------------------------------------------------------- distributed
class Distributed:
    """The process group of a torchrun launch, or a single process.

    ``Distributed.from_env()`` reads torchrun's variables; with ``WORLD_SIZE`` > 1 it
    initialises ``torch.distributed`` (NCCL when ``device`` is CUDA, else gloo) unless a
    group already exists. Attributes: ``rank``, ``world_size``, ``local_rank``, ``device``.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: Union[str, torch.device] = "cpu"):
        self.rank, self.world_size, self.local_rank = int(rank), int(world_size), int(local_rank)
        self.device = torch.device(device)
        self.owns_group = False

    @classmethod
    def from_env(cls, device: Optional[Union[str, torch.device]] = None) -> "Distributed":
        """From torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (absent: one process).
        ``device`` None picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        owns_group = False
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            owns_group = True
        if dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        out = cls(rank, world_size, local_rank, device)
        out.owns_group = owns_group
        return out

    def close(self) -> None:
        """Destroy the process group if :meth:`from_env` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def broadcast_parameters(self, modules: Iterable[nn.Module]) -> None:
        """Every parameter and buffer of ``modules`` set to rank 0's."""
        if not self.active:
            return
        for module in modules:
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)

    def average_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Each parameter's gradient replaced by its mean over the ranks. A parameter that
        has a gradient on some rank counts as zero where it has none; one without a gradient
        on every rank keeps none (so Adam skips it, as in a single process)."""
        if not self.active:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        device = params[0].device
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        dist.all_reduce(present)
        params = [p for p, count in zip(params, present.tolist()) if count > 0]
        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in params:
            count = p.numel()
            p.grad = flat[offset:offset + count].view_as(p).clone()
            offset += count

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor averaged over the ranks (for logging)."""
        if not self.active:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


# ---------------------------------------------------------------------- progress
class ProgressLog:
    """Progress lines and scalar logs of one training (rank 0 only; other ranks print and
    write nothing).

    Args:
        out_dir: the output folder (TensorBoard events or ``log.jsonl`` go there).
        total_images: the images the run will see (for the ETA), or None.
        enabled: False on ranks other than 0.
        stream: where the lines go (stdout).
    """

    def __init__(self, out_dir: Union[str, os.PathLike], total_images: Optional[int], enabled: bool = True,
                 stream=None):
        self.enabled = bool(enabled)
        self.total_images = total_images
        self.stream = stream if stream is not None else sys.stdout
        self.out_dir = Path(out_dir)
        self._writer = None
        self._jsonl = None
        self._start = time.perf_counter()
        self._start_nimg: Optional[int] = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.out_dir))
            self.print(f"logging scalars to TensorBoard in {self.out_dir}")
        except ImportError:
            self._jsonl = self.out_dir / "log.jsonl"
            self.print(f"torch.utils.tensorboard does not import (no tensorboard package): "
                       f"logging scalars to {self._jsonl}")

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.stream, flush=True)

    def report(self, step: int, cur_nimg: int, scalars: Mapping[str, float]) -> None:
        """One progress line (step, kimg, images/s since the first report, the scalars,
        ETA) and the scalars logged at ``cur_nimg``."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._start_nimg is None:
            self._start_nimg, self._start = cur_nimg, now
        elapsed = now - self._start
        rate = (cur_nimg - self._start_nimg) / elapsed if elapsed > 0 else float("nan")
        eta = ""
        if self.total_images is not None and rate == rate and rate > 0:
            left = max(self.total_images - cur_nimg, 0) / rate
            eta = f" eta {int(left // 3600):d}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        values = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        rate_text = f"{rate:.2f}" if math.isfinite(rate) else "-"  # the first report has no interval yet
        self.print(f"step {step} kimg {cur_nimg / 1000:.3f} img/s {rate_text} {values}{eta}")
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, cur_nimg)
            self._writer.add_scalar("Progress/images_per_second", rate if rate == rate else 0.0, cur_nimg)
            self._writer.flush()
        elif self._jsonl is not None:
            record = {"step": step, "nimg": cur_nimg, "images_per_second": rate if math.isfinite(rate) else None}
            record.update({k: float(v) for k, v in scalars.items()})
            with open(self._jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
