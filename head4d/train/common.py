"""Pieces shared by head4d's trainings (GenHead's GAN training and the reconstructor's).

- **Checkpoints** (:func:`save_checkpoint`, :func:`load_checkpoint`): one safetensors file
  (:data:`CHECKPOINT_NAME`) holding the networks' ``state_dict()`` (``G``, ``D``, the EMA
  generator ``G_ema``), the optimizers' ``state_dict()``, the step counters, the random
  states (torch CPU, every CUDA device, numpy, python) and the config as plain values.
  Every tensor is a safetensors entry named by its place in the state (``G/<parameter
  name>``: the networks' weights read with any safetensors reader, without head4d); the
  rest (numbers, text, the nesting of the optimizer and random states) is JSON in the
  file's metadata. Reading runs no code (no pickle). The EMA generator is also exported in
  the models' own format (``GenHead.save`` / ``Reconstructor.save``). The write is atomic:
  a temporary file in the same directory, fsync-ed, then ``os.replace`` onto the final name
  (and the directory fsync-ed), so a crash mid-write leaves the previous checkpoint whole.
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
  reducer handles badly. The mapping networks' running means of w (``w_avg``) are averaged
  over the ranks after each step, so the ranks' whole states stay identical
  (:meth:`Distributed.average_running_means`). Rank 0 alone writes checkpoints and logs.
- **Progress** (:class:`ProgressLog`): a line per report (step, images, images/s, losses,
  ETA) on stdout; the scalars appended to ``log.jsonl`` in the output folder, and written
  to TensorBoard event files there when ``torch.utils.tensorboard`` imports (it needs the
  ``tensorboard`` package; without it a warning, once, and the JSONL and PNG files still);
  image grids (:meth:`ProgressLog.images`) as PNG files under ``images/`` and to TensorBoard.
- **Mixed precision** (:class:`MixedPrecision`): ``"fp32"``, or ``"bf16"``: bfloat16
  autocast inside the StyleGAN2 convolution blocks only (on CUDA; refused elsewhere), every
  other layer in float32 (see the class).
- **Gradient accumulation** (:func:`split_microbatches`, :func:`accumulate_gradients`):
  a process's batch split into ``accumulate`` strided micro-batches, each loss scaled by
  ``1 / accumulate`` before its backward, one optimizer step after them.
- **Data** (:class:`InfiniteSampler`, :class:`BatchStream`): an endless, seeded, rank-aware
  order of the dataset read through a ``torch.utils.data.DataLoader`` with ``workers``
  processes (0: in the training process); its position (items consumed) goes in the
  checkpoint, so a resumed run reads the same next batches with any worker count.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "CHECKPOINT_VERSION", "EXPORT_NAME", "LEGACY_CHECKPOINT_NAME",
           "PRECISIONS", "BatchStream", "CheckpointedTrainer", "Distributed", "InfiniteSampler", "MixedPrecision", "ProgressLog",
           "accumulate_gradients", "check_microbatch", "check_training_config", "ema_beta", "get_rng_state",
           "image_grid", "lazy_adam_settings", "load_checkpoint", "rank_seed", "replace_directory", "save_checkpoint",
           "set_rng_state", "split_microbatches", "update_ema"]

CHECKPOINT_FORMAT = "head4d.train"
CHECKPOINT_VERSION = 2


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


def _join(path: str, key: str) -> str:
    return f"{path}/{key}" if path else key


def _encode(value: Any, path: str, tensors: Dict[str, torch.Tensor], storages: set) -> Any:
    """``value`` as JSON with each tensor replaced by ``{"__tensor__": key}`` and put in
    ``tensors`` under ``key`` (its path in the state); tuples and dicts whose keys are not
    all text are marked so that :func:`_decode` gives them back as they were."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        # safetensors refuses tensors that share memory, and writes a view's whole storage
        if storage.data_ptr() in storages or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[path] = tensor
        return {"__tensor__": path}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, _join(path, k), tensors, storages) for k, v in value.items()}
        return {"__dict__": [[_encode(k, _join(path, f"#{i}k"), tensors, storages),
                              _encode(v, _join(path, f"#{i}"), tensors, storages)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, _join(path, str(i)), tensors, storages) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, _join(path, str(i)), tensors, storages) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"save_checkpoint: {path or 'state'} is a {type(value).__name__}; a checkpoint holds tensors, "
                    f"numbers, text, None and dicts, lists and tuples of them")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_encode`."""
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if set(value) == {"__dict__"}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def unreadable_file_errors() -> Tuple[type, ...]:
    """What ``torch.load(weights_only=True)`` and safetensors raise for a file that is not
    theirs or is damaged (truncated, another format, refused pickle): callers re-raise them
    as a ``ValueError`` that names the file."""
    from safetensors import SafetensorError

    return (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, IndexError)


def save_checkpoint(path: Union[str, os.PathLike], state: Mapping[str, Any],
                    _before_replace: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``state`` (plain values, tensors, state dicts) to ``path`` atomically, as one
    safetensors file.

    Every tensor is a safetensors entry named by its path in ``state`` (``G/...`` for the
    generator's state dict, ``G_opt/state/#0/exp_avg``-like names for the optimizers'); the
    rest of ``state`` (numbers, text, the nesting) is JSON in the file's metadata under
    ``state``, beside ``format`` and ``version``. The file is written to a temporary file in
    ``path``'s directory (inside a private folder ``.<name>.*.tmp``), fsync-ed, then renamed
    onto ``path`` with ``os.replace`` (and the directory fsync-ed); on any error the
    temporary folder is removed and ``path`` is left as it was. A process killed mid-write
    leaves its folder; the next successful write to ``path`` removes such leftovers (one
    process writes a given path at a time).

    Args:
        path: the checkpoint file (:data:`CHECKPOINT_NAME` in a training's output folder).
        state: what to store (see :mod:`head4d.train.common`).
        _before_replace: for tests: called with the temporary file's path after it is
            written and before the rename (raise there to simulate a crash mid-write).

    Returns:
        ``path`` as a Path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if not isinstance(state, Mapping):
        raise TypeError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    tensors: Dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_encode(dict(state), "", tensors, set()))
    metadata = {"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION), "state": skeleton}
    path.parent.mkdir(parents=True, exist_ok=True)
    # a private folder beside path: safetensors' own temporary file lands in it too
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = scratch / path.name
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if _before_replace is not None:
            _before_replace(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _fsync_directory(path.parent)
    # the folders of writes that were killed before their rename (one writer a path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return path


def load_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (no code runs: safetensors and
    JSON; a version-1 file, written by ``torch.save`` before, is read with
    ``torch.load(weights_only=True)``), with ``format`` and ``version`` entries added.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a head4d training checkpoint, or of a newer version.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {path}")
    not_ours = ValueError(f"load_checkpoint: {path} is not a head4d training checkpoint "
                          f"(expected format {CHECKPOINT_FORMAT!r})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError:
        metadata = None
    if metadata is None:  # not safetensors: a version-1 checkpoint (torch.save), or not ours
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except unreadable_file_errors() as error:
            raise not_ours from error
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise not_ours
        version = int(state.get("version", 1))
    else:
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise not_ours
        version = int(metadata.get("version", 0))
    if version > CHECKPOINT_VERSION:
        raise ValueError(f"load_checkpoint: {path} has version {version}, this head4d reads up to "
                         f"{CHECKPOINT_VERSION}")
    if metadata is None:
        return state
    if str(map_location) != "cpu":
        tensors = {key: t.to(map_location) for key, t in tensors.items()}
    state = _decode(json.loads(metadata["state"]), tensors)
    state["format"], state["version"] = CHECKPOINT_FORMAT, version
    return state


def replace_directory(directory: Union[str, os.PathLike], write: Callable[[Path], None]) -> Path:
    """Write a model directory (``write(path)``, e.g. ``GenHead.save``) beside ``directory``,
    then swap it in: the old directory, if any, is renamed aside, the new one renamed onto
    ``directory``, the old one removed. A failed write leaves ``directory`` as it was."""
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

def check_training_config(op: str, config: Any, *, ints: Sequence[str], numbers: Sequence[str],
                          optional: Sequence[str] = ()) -> None:
    """The checks both trainings' configs share, raising ``ValueError`` that names the first
    bad setting: each of ``ints`` an int >= 1, each of ``numbers`` a finite number >= 0
    (either may be None where named in ``optional``); ``precision`` one of
    :data:`PRECISIONS`; ``accumulate`` divides ``batch``; ``betas`` two numbers in [0, 1);
    ``g_reg_interval`` and ``d_reg_interval`` None or ints >= 1."""
    for name in ints:
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{op}: {name} must be an int >= 1, got {value!r}")
    for name in numbers:
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{op}: {name} must be a finite number >= 0, got {value!r}")
    if config.precision not in PRECISIONS:
        raise ValueError(f"{op}: precision must be one of {PRECISIONS}, got {config.precision!r}")
    if config.batch % config.accumulate:
        raise ValueError(f"{op}: accumulate ({config.accumulate}) must divide batch ({config.batch})")
    if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
        raise ValueError(f"{op}: betas must be two numbers in [0, 1), got {config.betas!r}")
    for name in ("g_reg_interval", "d_reg_interval"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{op}: {name} must be None or an int >= 1, got {value!r}")


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed distinct per rank and per counter ``step`` (a step, or a data stream's
    position), for draws whose random state is not carried over: ranks other than 0 after a
    resume, a data stream restarted at a position."""
    return seed * 7919 + rank + 104729 * step


class CheckpointedTrainer:
    """The checkpoint of a GAN trainer with networks ``G``, ``D``, ``G_ema``, optimizers
    ``G_opt``, ``D_opt``, counters ``step_index`` and ``cur_nimg``, a ``config`` dataclass
    (with ``seed``), a :class:`Distributed` ``dist`` and a CPU or CUDA ``data_generator``:
    :meth:`state`, :meth:`save` (atomic, rank 0 only) and :meth:`load`. A subclass names its
    checkpoint's ``KIND`` and may add entries with :meth:`extra_state` /
    :meth:`load_extra_state` (its data stream's position, say).

    Rank 0's random states (torch, CUDA, numpy, python and ``data_generator``) are saved and
    restored; the other ranks reseed with :func:`rank_seed` on load, since theirs are not in
    the file. Checkpoints are read onto the CPU whatever the device: ``load_state_dict``
    copies every tensor to its parameter's device, and random states must be CPU tensors.
    """

    KIND: str = ""

    def extra_state(self) -> Dict[str, Any]:
        """Entries a subclass adds to the checkpoint (none here)."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_state` added (nothing here); called after the networks,
        optimizers and counters are restored, before the random states."""

    def state(self) -> Dict[str, Any]:
        """Everything a resume needs (see the module docstring)."""
        state = {"kind": self.KIND, "G": self.G.state_dict(), "D": self.D.state_dict(),
                 "G_ema": self.G_ema.state_dict(), "G_opt": self.G_opt.state_dict(), "D_opt": self.D_opt.state_dict(),
                 "step": self.step_index, "cur_nimg": self.cur_nimg, "rng": get_rng_state(),
                 "data_rng": self.data_generator.get_state(), "config": config_to_dict(self.config)}
        state.update(self.extra_state())
        return state

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the checkpoint atomically (rank 0 only; other ranks return the path)."""
        if not self.dist.is_main:
            return Path(path)
        return save_checkpoint(path, self.state())

    def load(self, path: Union[str, os.PathLike]) -> None:
        """Restore a checkpoint written by :meth:`save` (networks, optimizers, EMA, counters,
        random states); the next step continues exactly where the saved run would have.

        Raises:
            ValueError: the checkpoint is of another kind of training (or not a checkpoint).
            FileNotFoundError: no file at ``path``.
        """
        state = load_checkpoint(path, map_location="cpu")
        if state.get("kind") != self.KIND:
            raise ValueError(f"{type(self).__name__}.load: {path} is a {state.get('kind')!r} checkpoint, not a "
                             f"{self.KIND} one")
        for name in ("G", "D", "G_ema", "G_opt", "D_opt"):
            getattr(self, name).load_state_dict(state[name])
        self.step_index, self.cur_nimg = int(state["step"]), int(state["cur_nimg"])
        self.load_extra_state(state)
        if self.dist.is_main:
            set_rng_state(state["rng"])
            self.data_generator.set_state(state["data_rng"])
        else:
            seed = rank_seed(self.config.seed, self.dist.rank, self.step_index + 1)
            torch.manual_seed(seed)
            self.data_generator.manual_seed(seed + 1)


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

    def average_running_means(self, module: nn.Module) -> None:
        """Every ``w_avg`` buffer of ``module`` (a StyleGAN2 mapping network's running mean of
        w) replaced, in place, by its mean over the ranks.

        Each rank moves its ``w_avg`` towards the mean of its own batch. StyleGAN2's loop
        leaves the ranks' copies to drift apart and saves rank 0's; averaging them after each
        step instead keeps the ranks' states identical and equals the ``w_avg`` of one
        process that sees the whole batch, since the update ``lerp(mean(w), w_avg, beta)`` is
        linear in the batch mean (ranks hold equal batches)."""
        if not self.active:
            return
        buffers = [b for name, b in module.named_buffers() if name.rsplit(".", 1)[-1] == "w_avg"]
        if not buffers:
            return
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()

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


# ---------------------------------------------------------------------- mixed precision
#: The ``precision`` settings of the trainings.
PRECISIONS = ("fp32", "bf16")


def _stylegan2_blocks() -> Tuple[type, ...]:
    """The module classes that :class:`MixedPrecision` runs under autocast."""
    from ..nn.discriminator import DiscriminatorBlock
    from ..nn.stylegan2 import SynthesisBlock
    return (SynthesisBlock, DiscriminatorBlock)


class MixedPrecision:
    """Where a training computes in bfloat16 (``precision="bf16"``) and where in float32.

    ``"fp32"`` changes nothing: the networks compute as built (upstream's ``use_fp16``
    blocks in float16 on CUDA, everything else float32). ``"bf16"``, on CUDA only, runs
    ``torch.autocast(device_type="cuda", dtype=torch.bfloat16)`` inside every StyleGAN2
    convolution block (:class:`~head4d.nn.SynthesisBlock`: the triplane backbone, the
    background generator, the super-resolution; :class:`~head4d.nn.DiscriminatorBlock`:
    the discriminator from its input down to 8^2), with the blocks' own float16 switched
    off (``force_fp32``, so that autocast alone picks the dtype: bfloat16 has float32's
    exponent range, so the float16 clamps are not needed against overflow). Everything
    else stays float32 because it runs outside any autocast region:

    - the layers upstream keeps in float32 for accuracy: the mapping networks (w and the
      truncation), the discriminator's camera mapping and its epilogue (minibatch std,
      the logits), the images between blocks (``torgb``'s output, which the blocks cast to
      float32), so the triplanes reach the decoder in float32;
    - the triplane decoder, the ray marcher and its compositing, the masks, the
      correspondence maps, the losses (the logits are float32), EMA and the optimizers.

    Upstream's triplane backbone is float32 (no float16 block, no clamp): float16 would
    overflow there without a clamp; bfloat16 does not, so it is autocast here. R1's
    gradient penalty (a double backward of small gradients) runs entirely in float32:
    :meth:`full_precision` turns the blocks' autocast off around it. No gradient scaling
    is needed with bfloat16.

    Args:
        precision: ``"fp32"`` or ``"bf16"``.
        device: the training's device; ``"bf16"`` needs CUDA (``ValueError`` otherwise,
            unless ``allow_cpu``).
        allow_cpu: let ``"bf16"`` autocast on the CPU too (for tests of the mechanism; the
            trainings refuse it: CPU bfloat16 is slow and not what a CPU run is for).
    """

    def __init__(self, precision: str, device: Union[str, torch.device], *, allow_cpu: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(f"MixedPrecision: precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.device = torch.device(device)
        if precision == "bf16" and self.device.type != "cuda" and not allow_cpu:
            raise ValueError(f"precision 'bf16' needs a CUDA device (bfloat16 autocast is used on the GPU only); "
                             f"this run is on {self.device.type}: use precision 'fp32'")
        self._suspended = 0
        self._contexts: List[Any] = []
        self._handles: List[Any] = []

    @property
    def enabled(self) -> bool:
        """Whether the blocks autocast to bfloat16 (``"bf16"``, not inside :meth:`full_precision`)."""
        return self.precision == "bf16" and self._suspended == 0

    def autocast_blocks(self, modules: Iterable[nn.Module]) -> int:
        """Register the autocast on every StyleGAN2 convolution block inside ``modules``
        (forward hooks: parameter names and state dicts are unchanged; copy a network
        before this to get one without them). Nothing is registered for ``"fp32"``.
        Returns the number of blocks registered."""
        if self.precision != "bf16":
            return 0
        kinds = _stylegan2_blocks()
        count = 0
        for module in modules:
            for block in module.modules():
                if isinstance(block, kinds):
                    self._handles.append(block.register_forward_pre_hook(self._enter, with_kwargs=True))
                    self._handles.append(block.register_forward_hook(self._exit, always_call=True))
                    count += 1
        return count

    def remove(self) -> None:
        """Remove the hooks :meth:`autocast_blocks` registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict):
        context = None
        if self.enabled:
            context = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
            context.__enter__()
        self._contexts.append(context)
        return args, dict(kwargs, force_fp32=True)  # float32 (under autocast: bfloat16), never float16

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        context = self._contexts.pop()
        if context is not None:
            context.__exit__(None, None, None)

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """Inside, the blocks registered by :meth:`autocast_blocks` compute in float32 (R1's
        penalty)."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1


# ---------------------------------------------------------------------- gradient accumulation
def check_microbatch(batch: int, accumulate: int, mbstd_group_size: Optional[int] = None,
                     op: str = "training") -> int:
    """The micro-batch size ``batch // accumulate``, checked.

    StyleGAN2's minibatch standard deviation couples the samples of a discriminator call:
    with ``n`` samples and group size ``G`` (``min(G, n)``), sample ``i`` is in group ``i
    mod (n / G)``. :func:`split_microbatches` takes micro-batch ``j`` as samples ``j, j + k,
    j + 2k, ...`` (``k = accumulate``); when ``G`` divides the micro-batch size, each group
    of the whole batch is then exactly a group of one micro-batch, so every sample's logit
    (and the gradients) are those of the whole batch. Otherwise the groups would change, so
    this raises; a group of the whole batch (``mbstd_group_size`` None with
    ``mbstd``) cannot be split at all: pass ``mbstd_group_size=0`` for a discriminator
    without minibatch std.

    Raises:
        ValueError: ``accumulate`` is not an int >= 1, does not divide ``batch``, or the
            micro-batch size is not a multiple of the group size.
    """
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"{op}: accumulate must be an int >= 1, got {accumulate!r}")
    if batch % accumulate:
        raise ValueError(f"{op}: accumulate ({accumulate}) must divide the batch per process ({batch})")
    micro = batch // accumulate
    if accumulate > 1 and mbstd_group_size != 0:
        if mbstd_group_size is None:
            raise ValueError(f"{op}: the discriminator's minibatch std groups the whole batch (group size None); "
                             f"micro-batches (accumulate {accumulate}) would change its groups")
        if micro % mbstd_group_size:
            raise ValueError(f"{op}: the micro-batch ({batch} / accumulate {accumulate} = {micro} samples) must be "
                             f"a multiple of the discriminator's minibatch-std group size ({mbstd_group_size}), "
                             f"so that its groups are those of the whole batch")
    return micro


def split_microbatches(batch: Mapping[str, torch.Tensor], accumulate: int) -> List[Dict[str, torch.Tensor]]:
    """``batch`` (tensors with the samples along dim 0, all the same count N) as
    ``accumulate`` micro-batches: micro-batch ``j`` holds samples ``j, j + accumulate, ...``
    (strided, so that minibatch-std groups survive, see :func:`check_microbatch`)."""
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"split_microbatches: accumulate must be an int >= 1, got {accumulate!r}")
    counts = {k: v.shape[0] for k, v in batch.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"split_microbatches: every entry must hold the same number of samples, got {counts}")
    n = next(iter(counts.values()), 0)
    if n % accumulate:
        raise ValueError(f"split_microbatches: accumulate ({accumulate}) must divide the batch ({n} samples)")
    if accumulate == 1:
        return [dict(batch)]
    return [{k: v[j::accumulate] for k, v in batch.items()} for j in range(accumulate)]


def accumulate_gradients(micro_batches: Sequence[Mapping[str, torch.Tensor]],
                         loss_fn: Callable[[Mapping[str, torch.Tensor]],
                                           Tuple[torch.Tensor, Mapping[str, torch.Tensor]]]) -> Dict[str, torch.Tensor]:
    """Backward of each micro-batch's loss divided by the number of micro-batches (the
    gradients add up in ``.grad``; zero them before, step the optimizer after).

    Args:
        micro_batches: from :func:`split_microbatches`.
        loss_fn: ``micro_batch -> (loss, logged)``: ``loss`` a scalar tensor, the mean
            over the micro-batch's samples (times any weight), ``logged`` named scalar
            tensors to report.

    Returns:
        each logged value's mean over the micro-batches, detached. With losses that are
        per-sample means, the gradients equal those of the whole batch in one piece.
    """
    count = len(micro_batches)
    if count < 1:
        raise ValueError("accumulate_gradients: micro_batches is empty")
    totals: Dict[str, torch.Tensor] = {}
    for micro in micro_batches:
        loss, logged = loss_fn(micro)
        if loss.dim() != 0:
            raise ValueError(f"accumulate_gradients: loss_fn must return a scalar loss, got shape {list(loss.shape)}")
        (loss / count).backward()
        for name, value in logged.items():
            value = value.detach().float() / count
            totals[name] = totals[name] + value if name in totals else value
    return totals


# ---------------------------------------------------------------------- data
class InfiniteSampler(torch.utils.data.Sampler):
    """An endless order of ``range(size)`` for one rank, from a position.

    The global order is epoch after epoch, epoch ``e`` a permutation of ``range(size)``
    drawn from ``torch.Generator().manual_seed(seed + 1_000_003 * e)`` (every item once per
    epoch); rank ``r`` of ``world_size`` takes the global positions ``r, r + world_size,
    ...``. The ``p``-th index of a rank (:meth:`index`) depends only on ``(size, seed,
    rank, world_size, p)``, so an iterator started at ``start`` continues any earlier one.
    """

    def __init__(self, size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        for name, value, low in (("size", size, 1), ("world_size", world_size, 1), ("rank", rank, 0),
                                 ("start", start, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"InfiniteSampler: {name} must be an int >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"InfiniteSampler: rank must be < world_size ({world_size}), got {rank}")
        self.size, self.seed, self.rank, self.world_size, self.start = size, int(seed), rank, world_size, start
        self._epoch: Optional[int] = None
        self._order: Optional[torch.Tensor] = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch)
            self._order, self._epoch = torch.randperm(self.size, generator=generator), epoch
        return self._order

    def index(self, position: int) -> int:
        """This rank's ``position``-th dataset index."""
        g = position * self.world_size + self.rank
        return int(self._permutation(g // self.size)[g % self.size])

    def __iter__(self) -> Iterator[int]:
        position = self.start
        while True:
            yield self.index(position)
            position += 1

    def __len__(self) -> int:  # endless; DataLoader only reads it for warnings
        return 2 ** 62


class BatchStream:
    """Batches of ``(images, labels)`` (``(images, labels, masks)`` for items with masks) read
    from ``dataset`` in :class:`InfiniteSampler`'s order through a ``torch.utils.data.DataLoader``.

    Args:
        dataset: items ``(image tensor, label tensor)`` or ``(image, label, mask)`` (each field
            stacked by the default collate).
        batch: items per batch.
        seed, rank, world_size: the sampler's.
        workers: DataLoader worker processes; 0 reads in the calling process. Any count
            gives the same batches (the order is the sampler's; workers only prefetch).
        position: items of this rank already consumed (where to start).
        pin_memory: pinned host memory (for CUDA copies).

    ``position`` counts the items handed out by :meth:`next` (not those the workers have
    prefetched): store :meth:`state_dict` in a checkpoint and restore it with
    :meth:`load_state_dict` to continue with the same next batch.
    """

    def __init__(self, dataset, batch: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0,
                 position: int = 0, pin_memory: bool = False):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"BatchStream: batch must be an int >= 1, got {batch!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"BatchStream: workers must be an int >= 0, got {workers!r}")
        if len(dataset) < 1:
            raise ValueError("BatchStream: dataset is empty")
        self.dataset, self.batch, self.workers, self.pin_memory = dataset, batch, workers, bool(pin_memory)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.position = int(position)
        self._iterator: Optional[Iterator] = None

    def _start(self) -> Iterator:
        sampler = InfiniteSampler(len(self.dataset), seed=self.seed, rank=self.rank, world_size=self.world_size,
                                  start=self.position)
        # a generator of its own: the DataLoader draws its workers' base seed from it, not from
        # torch's global generator (whose draws a resumed run must repeat exactly)
        generator = torch.Generator().manual_seed(rank_seed(self.seed, self.rank, self.position))
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch, sampler=sampler,
                                             num_workers=self.workers, pin_memory=self.pin_memory,
                                             prefetch_factor=2 if self.workers > 0 else None, generator=generator)
        return iter(loader)

    def next(self) -> Tuple[torch.Tensor, ...]:
        """The next batch: each field of the items stacked, ``(images [B, ...], labels [B, ...])``
        for ``(image, label)`` items, ``(images, labels, masks)`` for ``(image, label, mask)``."""
        if self._iterator is None:
            self._iterator = self._start()
        fields = tuple(next(self._iterator))
        self.position += self.batch
        return fields

    def state_dict(self) -> Dict[str, int]:
        return {"position": self.position, "seed": self.seed, "batch": self.batch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a :meth:`state_dict` (the next batch is the one that followed it)."""
        self.close()
        self.position = int(state["position"])

    def close(self) -> None:
        """Stop the workers (a later :meth:`next` starts them again at ``position``)."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


# ---------------------------------------------------------------------- progress
def image_grid(images: torch.Tensor, columns: Optional[int] = None, gap: int = 2) -> torch.Tensor:
    """``images [N, 3, H, W]`` floating in [-1, 1] (clamped) tiled row by row into one
    ``[H', W', 3]`` uint8 image, ``columns`` per row (None: ``ceil(sqrt(N))``), ``gap``
    white pixels apart: ``H' = rows * (H + gap) - gap``."""
    from ..media import grid, to_uint8

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1 \
            or not images.is_floating_point():
        got = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"image_grid: images must be a floating tensor [N >= 1, 3, H, W] in [-1, 1], got {got}")
    n = images.shape[0]
    columns = columns or math.ceil(math.sqrt(n))
    tiles = [to_uint8((image.detach().float().cpu() + 1) / 2) for image in images]
    rows = [tiles[i:i + columns] for i in range(0, n, columns)]
    return grid(rows, gap=gap)


_TENSORBOARD_WARNED = False


def _summary_writer(out_dir: Path):
    """A TensorBoard ``SummaryWriter`` in ``out_dir``, or None with a warning (once per
    process) when ``torch.utils.tensorboard`` does not import."""
    global _TENSORBOARD_WARNED
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if not _TENSORBOARD_WARNED:
            warnings.warn(f"torch.utils.tensorboard does not import ({exc}; install the 'tensorboard' package): "
                          f"no TensorBoard logs; scalars still go to log.jsonl and image grids to PNG files",
                          RuntimeWarning, stacklevel=3)
            _TENSORBOARD_WARNED = True
        return None
    return SummaryWriter(str(out_dir))


class ProgressLog:
    """Progress lines, scalar logs and image grids of one training (rank 0 only; other
    ranks print and write nothing).

    Each :meth:`report` prints ``step S kimg K img/s R <name> <value> ... eta H:MM:SS`` and
    appends the scalars to ``out_dir/log.jsonl`` (one JSON object per report: ``step``,
    ``nimg``, ``images_per_second`` and the scalars); with TensorBoard, also writes them
    (and ``Progress/images_per_second``) as scalars at ``cur_nimg`` to event files in
    ``out_dir``. :meth:`images` writes an image grid.

    Args:
        out_dir: the output folder.
        total_images: the images the run will see (for the ETA), or None.
        enabled: False on ranks other than 0.
        stream: where the lines go (stdout).
        tensorboard: False to write no event files.
    """

    def __init__(self, out_dir: Union[str, os.PathLike], total_images: Optional[int], enabled: bool = True,
                 stream=None, tensorboard: bool = True):
        self.enabled = bool(enabled)
        self.total_images = total_images
        self.stream = stream if stream is not None else sys.stdout
        self.out_dir = Path(out_dir)
        self.jsonl = self.out_dir / "log.jsonl"
        self.image_dir = self.out_dir / "images"
        self._writer = None
        self._start = time.perf_counter()
        self._start_nimg: Optional[int] = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            self._writer = _summary_writer(self.out_dir)
        where = f"TensorBoard event files and {self.jsonl.name}" if self._writer is not None else self.jsonl.name
        self.print(f"logging scalars to {where} in {self.out_dir}")

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard event files are written."""
        return self._writer is not None

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
        record = {"step": step, "nimg": cur_nimg, "images_per_second": rate if math.isfinite(rate) else None}
        record.update({k: float(v) for k, v in scalars.items()})
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, cur_nimg)
            self._writer.add_scalar("Progress/images_per_second", rate if math.isfinite(rate) else 0.0, cur_nimg)
            self._writer.flush()

    def images(self, step: int, tag: str, images: torch.Tensor, cur_nimg: Optional[int] = None,
               columns: Optional[int] = None) -> Optional[Path]:
        """An image grid (:func:`image_grid` of ``images [N, 3, H, W]`` in [-1, 1]) written
        to ``out_dir/images/<tag>-<step:08d>.png`` (``tag`` with every character other than
        letters, digits, ``-`` and ``.`` made ``_``) and, with TensorBoard, as image ``tag``
        at ``cur_nimg`` (``step`` when None). Returns the PNG's path (None on other ranks)."""
        if not self.enabled:
            return None
        from ..media import write_png

        picture = image_grid(images, columns)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        path = self.image_dir / f"{re.sub(r'[^A-Za-z0-9.-]', '_', tag)}-{step:08d}.png"
        write_png(path, picture)
        if self._writer is not None:
            self._writer.add_image(tag, picture.permute(2, 0, 1), step if cur_nimg is None else cur_nimg,
                                   dataformats="CHW")
            self._writer.flush()
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ---------------------------------------------------------------------- the training loop
#: The checkpoint file in a training's output folder (rewritten atomically).
CHECKPOINT_NAME = "checkpoint.safetensors"
#: The checkpoint's name before version 2 (``torch.save``): ``--resume`` reads it when the
#: folder has no :data:`CHECKPOINT_NAME`.
LEGACY_CHECKPOINT_NAME = "checkpoint.pt"
#: The EMA network exported at the end of a run (the model's ``save`` format).
EXPORT_NAME = "G_ema"


def run_training(trainer, config, dist_: Distributed, *, name: str, banner: str, export_note: str,
                 write_snapshot: Callable[[ProgressLog], None],
                 write_start: Optional[Callable[[ProgressLog], None]] = None,
                 max_steps: Optional[int] = None):
    """The loop both trainings share, inside their process group: resume from
    ``out/checkpoint.safetensors`` with ``config.resume``; run ``trainer.step()`` until
    ``config.kimg`` thousand images (two steps with ``config.dry_run``, at most
    ``max_steps`` when given), stopping with ``FloatingPointError`` on a non-finite loss; log
    every ``config.log_every`` steps (and the first); image grids every
    ``config.image_every`` steps (None: only at the end) and at the end; the checkpoint
    every ``config.checkpoint_every`` steps and at the end; then the EMA network exported to
    ``out/G_ema`` (rank 0 writes; the others wait at a barrier).

    Args:
        trainer: a trainer with ``step()``, ``load(path)``, ``save(path)``, ``close()``,
            ``step_index``, ``cur_nimg`` and ``G_ema`` (whose ``save`` writes a folder).
        config: its training config (``out``, ``resume``, ``kimg``, ``dry_run``,
            ``log_every``, ``image_every``, ``checkpoint_every``).
        name: the training's function name, for messages.
        banner: the first line printed (the run's settings).
        export_note: what the export is and what reads it, for the last line printed.
        write_snapshot: ``(log) -> None``, writes the image grids (rank 0 only).
        write_start: ``(log) -> None``, grids written once before a fresh run's first step.
        max_steps: a cap on the steps of this call.

    Returns:
        the trainer after the last step.
    """
    out = Path(config.out)
    checkpoint = out / CHECKPOINT_NAME
    if config.resume:
        # an output folder of a head4d that wrote checkpoint.pt (version 1, torch.save) resumes from it
        source = checkpoint if checkpoint.is_file() or not (out / LEGACY_CHECKPOINT_NAME).is_file() \
            else out / LEGACY_CHECKPOINT_NAME
        if not source.is_file():
            raise FileNotFoundError(f"{name}: --resume given but there is no {checkpoint}")
        trainer.load(source)
    total = int(config.kimg * 1000)
    log = ProgressLog(out, total, enabled=dist_.is_main)
    steps = 0
    limit = 2 if config.dry_run else max_steps
    imaged_at = None

    def snapshot() -> None:
        nonlocal imaged_at
        if dist_.is_main:
            write_snapshot(log)
        imaged_at = trainer.step_index

    try:
        log.print(banner)
        if write_start is not None and dist_.is_main and trainer.step_index == 0:
            write_start(log)
        while trainer.cur_nimg < total and (limit is None or steps < limit):
            losses = trainer.step()
            steps += 1
            for loss_name, value in losses.items():
                if not math.isfinite(value):
                    raise FloatingPointError(f"{name}: {loss_name} is {value} at step {trainer.step_index}")
            if trainer.step_index % config.log_every == 0 or steps == 1 or config.dry_run:
                log.report(trainer.step_index, trainer.cur_nimg, losses)
            if config.image_every is not None and trainer.step_index % config.image_every == 0:
                snapshot()
            if trainer.step_index % config.checkpoint_every == 0:
                trainer.save(checkpoint)
        if imaged_at != trainer.step_index:
            snapshot()
        trainer.save(checkpoint)
        if dist_.is_main:
            replace_directory(out / EXPORT_NAME, trainer.G_ema.save)
        dist_.barrier()
        log.print(f"wrote {checkpoint} at step {trainer.step_index} ({trainer.cur_nimg} images) and the EMA "
                  f"{export_note}")
    finally:
        log.close()
        trainer.close()
    return trainer
