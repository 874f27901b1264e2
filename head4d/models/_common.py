"""What head4d's models share: batch checks, head4d's own save format (safetensors weights
plus a JSON config, head model included), camera rays, the triplane point decoder and the
ray-to-image reshape. One helper per job, used by :class:`~head4d.models.GenHead` and
:class:`~head4d.models.Reconstructor`."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple, Type, Union

import numpy as np
import torch
from torch import nn

from .._checks import FLOATING, check_tensor
from ..head.base import HeadModel
from ..ops import decode_triplanes, generate_rays, sample_triplanes

#: Camera label size: cam2world (16) then normalized intrinsics (9).
CAMERA_SIZE = 25
#: head4d's own format: file names, the prefix of the head model's arrays among the
#: tensors, and the head model kinds it rebuilds.
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
HEAD_PREFIX = "head_model."
HEAD_MODEL_KINDS = ("FLAME", "ProceduralHead")


#: The largest neural rendering resolution implemented (the super-resolution's input size;
#: above it Portrait4D bypasses the super-resolution).
MAX_NEURAL_RESOLUTION = 128


@dataclass
class RenderingSettings:
    """The settings GenHead's and the reconstructor's configs share (a base dataclass).

    Decoder: ``decoder_hidden``, ``decoder_lr_mul``. Rendering (EG3D's
    ``rendering_kwargs``): ``box_warp``, ``ray_start``, ``ray_end``, ``depth_resolution``,
    ``depth_resolution_importance``, ``density_noise``, ``neural_rendering_resolution``
    (the model's default). Neck grids of the deformation: ``fine_resolution``,
    ``coarse_resolution``. ``fused``: how a triplane is decoded: None (the renderer's rule
    per device, :meth:`~head4d.render.TriplaneRenderer.uses_fused`: fused on CUDA, unfused
    on the CPU), True (:func:`~head4d.ops.decode_triplanes`, which keeps only the planes and
    the points for the backward) or False (:func:`~head4d.ops.sample_triplanes` then the
    decoder, which keeps the features and the MLP's activations of every sample). On the
    CPU ``True`` trades speed for memory: GenHead at batch 4, 64^2, 48 + 48 samples, a
    forward + backward peaked at 761 MB against 3065 MB unfused but took 16.3 s against
    9.6 s (one thread; ``benchmarks/results/2026-12-05-cpu-genhead-memory``).
    ``backend``: None (each op's default) or an op backend for every op in the model
    (``"torch"``: the references).
    """

    decoder_hidden: int = 64
    decoder_lr_mul: float = 1.0
    box_warp: float = 1.3
    ray_start: Union[float, str] = "auto-plane"
    ray_end: Union[float, str] = "auto-plane"
    depth_resolution: int = 48
    depth_resolution_importance: int = 48
    density_noise: float = 0.0
    neural_rendering_resolution: int = 64
    fine_resolution: int = 24
    coarse_resolution: int = 8
    fused: Optional[bool] = None
    backend: Optional[str] = None

    def rendering_options(self) -> Dict[str, object]:
        """The renderer's options (EG3D's ``rendering_kwargs`` that the renderer reads)."""
        return {"box_warp": self.box_warp, "ray_start": self.ray_start, "ray_end": self.ray_end,
                "depth_resolution": self.depth_resolution,
                "depth_resolution_importance": self.depth_resolution_importance,
                "density_noise": self.density_noise, "clamp_mode": "softplus", "plane_layout": "portrait4d"}

    def neural_resolution(self, op: str, resolution: Optional[int]) -> int:
        """``resolution`` (None: the config's), checked: a positive int at most
        :data:`MAX_NEURAL_RESOLUTION`."""
        r = self.neural_rendering_resolution if resolution is None else resolution
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{op}: neural_rendering_resolution must be a positive int, got {r!r}")
        if r > MAX_NEURAL_RESOLUTION:
            raise ValueError(f"{op}: neural_rendering_resolution must be at most {MAX_NEURAL_RESOLUTION} (above it "
                             f"Portrait4D bypasses the super-resolution, which is not implemented here), got {r}")
        return r


# ---------------------------------------------------------------------- batches
def check_rows(op: str, name: str, value: torch.Tensor, size: int, batch: Optional[int] = None) -> torch.Tensor:
    """``value`` must be a floating ``[N, size]`` tensor (with ``batch`` rows when given)."""
    check_tensor(op, name, value, f"[N, {size}]", 2, FLOATING)
    if value.shape[1] != size:
        raise ValueError(f"{op}: {name} must have shape [N, {size}], got {list(value.shape)}")
    if batch is not None and value.shape[0] != batch:
        raise ValueError(f"{op}: {name} has {value.shape[0]} rows but {batch} were expected")
    return value


def repeat_rows(op: str, name: str, value: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    """``value`` with ``batch`` rows: as it is, or each of its B rows repeated batch / B times
    (row ``b * K + k`` is then row b's k-th copy)."""
    if value is None or value.shape[0] == batch:
        return value
    if value.shape[0] == 0 or batch % value.shape[0] != 0:
        raise ValueError(f"{op}: {name} has {value.shape[0]} rows; the cameras ({batch}) must be a multiple of it")
    return value.repeat_interleave(batch // value.shape[0], dim=0)


# ---------------------------------------------------------------------- rendering
def camera_rays(camera: torch.Tensor, resolution: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cam2world [N, 4, 4], origins [N, r*r, 3], directions [N, r*r, 3])`` float32 for
    camera labels ``[N, 25]`` at ``resolution`` r (OpenGL-style cameras, EG3D's rays)."""
    n = camera.shape[0]
    cam2world = camera[:, :16].reshape(n, 4, 4).to(torch.float32)
    intrinsics = camera[:, 16:25].reshape(n, 3, 3).to(torch.float32)
    origins, directions = generate_rays(cam2world, intrinsics, resolution, convention="opengl")
    return cam2world, origins, directions


def triplane_point_decoder(decoder: nn.Module, renderer: nn.Module, device: torch.device, fused: Optional[bool],
                           box_warp: float, backend: Optional[str]) -> Callable[[torch.Tensor, torch.Tensor],
                                                                               Dict[str, torch.Tensor]]:
    """``decode(planes [N, 3, C, H, W], points [N, M, 3]) -> {"rgb": [N, M, C_out], "sigma":
    [N, M, 1]}``: read a Portrait4D-layout triplane at the points and run ``decoder`` on the
    features, either fused (:func:`~head4d.ops.decode_triplanes`, which keeps far less for
    the backward) or as :func:`~head4d.ops.sample_triplanes` then ``decoder``, by the
    renderer's rule for ``device`` (:meth:`~head4d.render.TriplaneRenderer.uses_fused`;
    ``fused`` True/False forces one)."""
    fused_weights = decoder.effective_weights() if renderer.uses_fused(decoder, device, fused) else None

    def decode(planes: torch.Tensor, points: torch.Tensor) -> Dict[str, torch.Tensor]:
        if fused_weights is not None:
            rgb, sigma = decode_triplanes(planes, points, *fused_weights, box_warp=box_warp,
                                          plane_layout="portrait4d", backend=backend)
            return {"rgb": rgb, "sigma": sigma}
        return decoder(sample_triplanes(planes, points, box_warp=box_warp, plane_layout="portrait4d",
                                        backend=backend))

    return decode


def rays_to_image(values: torch.Tensor, resolution: int) -> torch.Tensor:
    """Per-ray values ``[N, r*r, C]`` (row-major pixels) as an image ``[N, C, r, r]``."""
    n, _, c = values.shape
    return values.permute(0, 2, 1).reshape(n, c, resolution, resolution)


# ---------------------------------------------------------------------- head4d's own format
def _safetensors(op: str, name: str):
    """``safetensors.torch.<name>``, or an ImportError that says how to install it."""
    try:
        import safetensors.torch
    except ImportError as exc:
        raise ImportError(f"{op} needs the safetensors package: pip install safetensors") from exc
    return getattr(safetensors.torch, name)


def save_model(op: str, model: nn.Module, head: HeadModel, directory: Union[str, "os.PathLike"], fmt: str,
               version: int) -> None:
    """Write ``model`` to ``directory`` (created if needed) in head4d's format.

    ``model.safetensors``: every parameter and buffer of the state dict under its (upstream)
    name, and the head model's arrays (its buffers, non-persistent in the module) under
    ``head_model.`` and its vertex masks under ``head_model.masks.``. ``config.json``:
    ``{"format": fmt, "version": version, "config": the model's config dataclass fields,
    "head_model": {"kind": "FLAME" or "ProceduralHead", "scale", "dtype", "has_lips"}}``.
    :func:`load_model` reads it back bit-exactly.
    """
    save_file = _safetensors(op, "save_file")
    kind = type(head).__name__
    if kind not in HEAD_MODEL_KINDS:
        raise TypeError(f"{op}: the head model must be one of {sorted(HEAD_MODEL_KINDS)}, got {kind}")
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}
    for key, value in head.named_buffers(recurse=False):
        tensors[f"{HEAD_PREFIX}{key}"] = value.detach().cpu().contiguous().clone()
    for key, value in head.masks.items():
        tensors[f"{HEAD_PREFIX}masks.{key}"] = torch.from_numpy(np.array(value, dtype=np.int64))
    description = {"format": fmt, "version": version, "config": dataclasses.asdict(model.config),
                   "head_model": {"kind": kind, "scale": head.scale, "dtype": str(head.dtype).replace("torch.", ""),
                                  "has_lips": bool(head.has_lips)}}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": fmt})
    with open(os.path.join(directory, CONFIG_FILE), "w") as fh:
        json.dump(description, fh, indent=2, sort_keys=True)
        fh.write("\n")


def read_saved_config(op: str, directory: Union[str, "os.PathLike"]) -> Dict[str, object]:
    """The parsed ``config.json`` of a directory in head4d's format (FileNotFoundError when
    a file is missing)."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{op}: {path!r} does not exist (write the directory with the model's save())")
    with open(os.path.join(directory, CONFIG_FILE)) as fh:
        description = json.load(fh)
    if not isinstance(description, dict):
        raise ValueError(f"{op}: {os.path.join(directory, CONFIG_FILE)!r} is not a head4d model config")
    return description


def load_model(op: str, cls: Type[nn.Module], config_cls: type, directory: Union[str, "os.PathLike"], fmt: str,
               version: int, device: Union[str, torch.device]) -> nn.Module:
    """A ``cls(config, head_model=...)`` from a directory written by :func:`save_model`, in
    eval mode on ``device``.

    Raises:
        FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
        ValueError: the files are not this model's format (another model's included), or
            the weights do not fit the config (missing, unexpected or mis-shaped keys, listed).
    """
    description = read_saved_config(op, directory)
    if description.get("format") != fmt:
        raise ValueError(f"{op}: {os.path.join(directory, CONFIG_FILE)!r} holds format "
                         f"{description.get('format')!r}, not {fmt!r}")
    if description.get("version") != version:
        raise ValueError(f"{op}: unsupported format version {description.get('version')!r} "
                         f"(this head4d reads {version})")
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(description["config"]) - known)
    if unknown:
        raise ValueError(f"{op}: config.json has fields this {config_cls.__name__} lacks: {unknown}")
    config = config_cls(**description["config"])
    tensors = _safetensors(op, "load_file")(os.path.join(directory, WEIGHTS_FILE))
    head_tensors = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
    head = head_model_from_saved(op, description["head_model"], head_tensors)
    model = cls(config, head_model=head)
    load_weights(op, model, weights)
    return model.eval().to(device)


def load_weights(op: str, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(weights, strict=True)`` after listing every missing,
    unexpected and mis-shaped key in one ValueError."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = [f"{k}: file {list(weights[k].shape)}, model {list(v.shape)}" for k, v in expected.items()
                  if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{op}: the weights do not fit the config: missing {missing}, unexpected {unexpected}, "
                         f"shape mismatches {mismatched}")
    model.load_state_dict(dict(weights), strict=True)


def head_model_from_saved(op: str, description: Mapping[str, object], tensors: Dict[str, torch.Tensor]) -> HeadModel:
    """The head model :func:`save_model` described: rebuilt from its arrays (FLAME) or its
    constructor (ProceduralHead), then every saved buffer copied in bit for bit."""
    from ..head import FLAME, ProceduralHead

    kind = description.get("kind")
    dtype = getattr(torch, str(description.get("dtype")), None)
    if kind not in HEAD_MODEL_KINDS or dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: head_model must name a kind in {list(HEAD_MODEL_KINDS)} and a dtype float32 or "
                         f"float64, got {dict(description)}")
    masks = {k[len("masks."):]: v.numpy() for k, v in tensors.items() if k.startswith("masks.")}
    buffers = {k: v for k, v in tensors.items() if not k.startswith("masks.")}
    if kind == "ProceduralHead":
        head = ProceduralHead(scale=float(description["scale"]), dtype=dtype)
    else:
        needed = ("v_template", "faces", "shapedirs", "exprdirs", "posedirs", "j_regressor", "lbs_weights",
                  "parents", "left_eye_indices", "right_eye_indices", "lips_indices", "companion_indices",
                  "companion_weights", "companion_faces", "one_ring")
        missing = [name for name in needed if name not in buffers]
        if missing:
            raise ValueError(f"{op}: the file lacks the head model's arrays {[HEAD_PREFIX + m for m in missing]}")
        model = {"v_template": buffers["v_template"].numpy(), "f": buffers["faces"].numpy(),
                 "shapedirs": buffers["shapedirs"].numpy(), "exprdirs": buffers["exprdirs"].numpy(),
                 "posedirs": buffers["posedirs"].numpy(), "J_regressor": buffers["j_regressor"].numpy(),
                 "weights": buffers["lbs_weights"].numpy(), "parents": buffers["parents"].tolist()}
        masks.setdefault("left_eyeball", buffers["left_eye_indices"].numpy())
        masks.setdefault("right_eyeball", buffers["right_eye_indices"].numpy())
        if description.get("has_lips"):
            masks.setdefault("lips", buffers["lips_indices"].numpy())
        companion = (buffers["companion_indices"].numpy(), buffers["companion_weights"].numpy(),
                     buffers["companion_faces"].numpy())
        head = FLAME(model, masks=masks, companion=companion, scale=1.0, recentre=False, dtype=dtype)
        head.scale = float(description["scale"])
    head.masks = {k: np.asarray(v, dtype=np.int64) for k, v in masks.items()}
    own = dict(head.named_buffers(recurse=False))
    if set(own) != set(buffers):
        raise ValueError(f"{op}: the head model's saved arrays {sorted(buffers)} differ from a {kind}'s "
                         f"{sorted(own)}")
    with torch.no_grad():
        for name, value in buffers.items():
            if own[name].shape != value.shape or own[name].dtype != value.dtype:
                raise ValueError(f"{op}: {HEAD_PREFIX}{name} has shape {list(value.shape)} and dtype {value.dtype}, "
                                 f"the rebuilt {kind} {list(own[name].shape)} and {own[name].dtype}")
            own[name].copy_(value)
    return head


# ---------------------------------------------------------------------- backends
def set_model_backend(op: str, model: nn.Module, value: Optional[str]) -> Optional[str]:
    """Check ``value`` (None, or a backend name :func:`head4d._backend.backend_scope`
    takes) and give it to the StyleGAN2 layers inside ``model``, which name their backend
    themselves; a backend they do not take (a test backend) reaches their ops through the
    model's scope instead. Returns ``value``; the model keeps it and opens
    ``backend_scope(value)`` around its work, so every other op follows it."""
    from .. import _backend
    from ..nn import set_stylegan2_backend
    from ..nn.stylegan2 import STYLEGAN2_BACKENDS

    if value is not None and not isinstance(value, str):
        raise TypeError(f"{op}: backend must be None or a backend name, got {type(value).__name__}")
    with _backend.backend_scope(value):  # validates the name
        pass
    set_stylegan2_backend(model, value if value in STYLEGAN2_BACKENDS else None)
    return value


# ---------------------------------------------------------------------- the models' base
class TriplaneHeadModel(nn.Module):
    """What :class:`~head4d.models.GenHead` and :class:`~head4d.models.Reconstructor`
    share: the head model (held by the ``deformation`` module), the ops' ``backend``
    (:func:`set_model_backend`, applied through ``backend_scope`` by ``_scope()``), and
    head4d's own format (:meth:`save` / :meth:`load`). A subclass sets ``NAME``,
    ``SAVE_FORMAT``, ``SAVE_VERSION``, ``CONFIG_CLASS``, a ``config`` dataclass with a
    ``backend`` field, and a ``deformation`` module with a ``head_model``."""

    NAME = "model"
    SAVE_FORMAT = ""
    SAVE_VERSION = 1
    CONFIG_CLASS: type = object

    @classmethod
    def _own_config(cls, config):
        """A copy of ``config`` (None: the defaults of ``CONFIG_CLASS``), which must be a
        ``CONFIG_CLASS``; the model keeps the copy, so the caller's object never changes."""
        if config is None:
            return cls.CONFIG_CLASS()
        if not isinstance(config, cls.CONFIG_CLASS):
            raise TypeError(f"{cls.NAME}: config must be a {cls.CONFIG_CLASS.__name__}, got {type(config).__name__}")
        return dataclasses.replace(config)

    @property
    def head_model(self) -> HeadModel:
        return self.deformation.head_model

    @property
    def backend(self) -> Optional[str]:
        """The ops' backend inside the model (None: each op's default)."""
        return self._ops_backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        self._ops_backend = set_model_backend(self.NAME, self, value)
        self.config.backend = value

    def _scope(self):
        from .. import _backend
        return _backend.backend_scope(self._ops_backend)

    def save(self, directory: Union[str, "os.PathLike"]) -> None:
        """Write the model to ``directory`` (created if needed) in head4d's format:
        ``model.safetensors`` (the state dict under the upstream names, plus the head
        model's arrays under ``head_model.``) and ``config.json`` (``{"format": the
        model's tag, e.g. "head4d.GenHead", "version": 1, "config": the config's fields,
        "head_model": ...}``). :meth:`load` reads it back bit-exactly."""
        save_model(f"{self.NAME}.save", self, self.head_model, directory, self.SAVE_FORMAT, self.SAVE_VERSION)

    @classmethod
    def load(cls, directory: Union[str, "os.PathLike"], device: Union[str, torch.device] = "cpu"):
        """The model from a directory written by :meth:`save`, in eval mode on ``device``.

        Raises:
            FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
            ValueError: the files are not this model's format (another model's directory
                is refused by its format tag), or the weights do not fit the config
                (missing, unexpected or mis-shaped keys, listed).
        """
        return load_model(f"{cls.NAME}.load", cls, cls.CONFIG_CLASS, directory, cls.SAVE_FORMAT, cls.SAVE_VERSION,
                          device)
