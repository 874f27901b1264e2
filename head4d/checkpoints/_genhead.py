"""Portrait4D GenHead pickles (``genhead-ffhq512.pkl`` and the like) to :class:`~head4d.models.GenHead`.

`load_network_pkl` reads the snapshot with :func:`read_pickle` (no upstream code runs) and
turns each GenHead record (``G_ema``, and ``G`` when present) into a GenHead:

- **Config** from the record: its ``init_kwargs`` (the constructor arguments upstream
  records) and its ``rendering_kwargs`` and ``neural_rendering_resolution`` attributes.
  The background generator is built upstream with fixed arguments that are not recorded
  (a 64 x 64, 32-channel StyleGAN2 generator, channel base 16384, 8 mapping layers), so
  its resolution, channels, channel base and maximum and mapping depth are read from the
  shapes of its weights. Arguments head4d does not use (training settings such as
  ``density_reg``) are ignored and named in one warning; missing ones take
  :class:`~head4d.models.GenHeadConfig`'s defaults; values head4d cannot reproduce (a
  condition other than camera + FLAME shape, another clamp mode, ...) are errors.
- **Weights** by name from the record's ``state_dict()``: every key under ``backbone.``,
  ``background.``, ``superresolution.`` and ``decoder.``. Missing keys, unexpected keys
  and shape mismatches are errors that list them (``deformer.*`` and
  ``dataset_label_std`` are read elsewhere or not needed).
- **Head model**: FLAME from the arrays the checkpoint stores under
  ``deformer.flame_deform`` (Portrait4D keeps them already multiplied by 3 and recentred
  on the canonical neck joint): ``flame_model.{v_template, faces_tensor, shapedirs,
  posedirs, J_regressor, parents, lbs_weights}`` and the deformation's vertex sets and
  simplified mesh ``{eye_idxs, lips_idxs, simplify_idxs, simplify_baris,
  simplify_faces}`` (``face_idxs`` is checked when present), through
  :meth:`~head4d.head.FLAME.from_arrays`. No ``generic_model.pkl`` is needed.

Every other entry of the snapshot (``D``, ``training_set_kwargs``, ``augment_pipe``, ...)
comes back as :func:`read_pickle` returns it: the discriminator ``D`` as its
:class:`PersistentRecord`, which a later change turns into a module.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Any, BinaryIO, Dict, List, Mapping, Optional, Union

import torch

from ._pickle import read_pickle
from ._records import ObjectRecord, PersistentRecord

GENHEAD_CLASS = "PartTriPlaneGeneratorDeform"
#: The state-dict prefixes of GenHead's networks (upstream names).
NETWORK_PREFIXES = ("backbone.", "background.", "superresolution.", "decoder.")
#: Entries of a GenHead state dict that are not network weights.
NON_NETWORK_PREFIXES = ("deformer.", "dataset_label_std")
#: Where the checkpoint keeps the head model.
FLAME_DEFORM = "deformer.flame_deform"
#: head4d argument -> the path under ``deformer.flame_deform`` (``None``: optional).
FLAME_ARRAYS = {
    "v_template": "flame_model.v_template", "faces": "flame_model.faces_tensor",
    "shapedirs": "flame_model.shapedirs", "posedirs": "flame_model.posedirs",
    "j_regressor": "flame_model.J_regressor", "parents": "flame_model.parents",
    "lbs_weights": "flame_model.lbs_weights", "eye_indices": "eye_idxs", "lips_indices": "lips_idxs",
    "companion_indices": "simplify_idxs", "companion_weights": "simplify_baris",
    "companion_faces": "simplify_faces",
}
OPTIONAL_FLAME_ARRAYS = {"face_indices": "face_idxs"}

#: init_kwargs copied into GenHeadConfig fields of the same name.
_SAME_NAME = ("z_dim", "w_dim", "img_resolution", "channel_base", "channel_max", "triplane_resolution",
              "triplane_channels", "num_fp16_res", "conv_clamp", "fused_modconv_default", "has_background",
              "has_superresolution", "sr_num_fp16_res")
#: init_kwargs that must have one value (head4d builds only that variant): name -> value.
_REQUIRED_INIT = {"c_dim": 325, "img_channels": 3, "flame_condition": True, "flame_full": True,
                  "random_combine": False, "dynamic_texture": False, "add_block": False}
#: rendering_kwargs copied into GenHeadConfig: upstream name -> field.
_RENDERING_FIELDS = {"c_scale": "c_scale", "sr_antialias": "sr_antialias", "decoder_lr_mul": "decoder_lr_mul",
                     "depth_resolution": "depth_resolution",
                     "depth_resolution_importance": "depth_resolution_importance", "ray_start": "ray_start",
                     "ray_end": "ray_end", "box_warp": "box_warp", "density_noise": "density_noise"}
#: rendering_kwargs that must have one value.
_REQUIRED_RENDERING = {"clamp_mode": "softplus", "superresolution_noise_mode": "none",
                       "c_gen_conditioning_zero": False,
                       "superresolution_module": "models.stylegan.superresolution.SuperresolutionHybrid8XDC"}
#: sr_kwargs head4d accepts: use_ws_ones is read; the others change nothing here (upstream's
#: SuperresolutionHybrid8XDC ignores channel_base and channel_max; fused and unfused
#: modulated convolutions give the same values).
_SR_ACCEPTED = ("channel_base", "channel_max", "fused_modconv_default")


def load_network_pkl(path: Union[str, os.PathLike, BinaryIO], device: Union[str, torch.device] = "cpu",
                     config_overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Load a Portrait4D GenHead snapshot as head4d modules, without running its code.

    Args:
        path: the pickle (``genhead-ffhq512.pkl``, ...), a path or a binary file object.
        device: where the generators go.
        config_overrides: :class:`~head4d.models.GenHeadConfig` fields set after the
            recorded ones, for head4d's own settings (``backend``, ``fused``,
            ``mask_resolution``, ...); an architecture field that no longer fits the
            weights gives the shape-mismatch error.

    Returns:
        The snapshot's dict with ``'G_ema'`` (and ``'G'`` when present) as
        :class:`~head4d.models.GenHead` in eval mode on ``device``, FLAME as head model;
        the other entries as :func:`read_pickle` returns them (``'D'``: its record).

    Raises:
        ValueError: not a GenHead snapshot, an argument head4d cannot reproduce, missing
            or unexpected weights or shape mismatches (each listed), or FLAME arrays
            missing from the checkpoint (named).
        UnsafePickleError: the pickle calls something that is not allowed.
    """
    data = read_pickle(path)
    if not isinstance(data, dict) or "G_ema" not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"load_network_pkl: expected a training snapshot dict with 'G_ema', got {found}")
    out = dict(data)
    for name in ("G_ema", "G"):
        if out.get(name) is not None:
            out[name] = genhead_from_record(out[name], name=name, config_overrides=config_overrides).to(device)
    return out


def genhead_from_record(record: PersistentRecord, name: str = "G_ema",
                        config_overrides: Optional[Mapping[str, Any]] = None):
    """A :class:`~head4d.models.GenHead` (eval mode, CPU) from the record of a pickled
    ``PartTriPlaneGeneratorDeform`` (see the module docstring), with ``config_overrides``
    (GenHeadConfig fields) applied to the recorded config."""
    import dataclasses

    from ..models import GenHead

    if not isinstance(record, PersistentRecord) or record.class_name != GENHEAD_CLASS:
        got = record.class_name if isinstance(record, ObjectRecord) else type(record).__name__
        raise ValueError(f"load_network_pkl: {name} must be a pickled {GENHEAD_CLASS}, got {got}")
    state = record.state_dict()
    config = genhead_config(record, state, name)
    if config_overrides:
        known = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(config_overrides) - known)
        if unknown:
            raise ValueError(f"load_network_pkl: config_overrides has names that are not GenHeadConfig fields: "
                             f"{unknown}")
        config = dataclasses.replace(config, **config_overrides)
    head_model = flame_from_record(record, name)
    model = GenHead(config, head_model=head_model)
    load_network_weights(model, state, name)
    return model.eval().requires_grad_(False)


def genhead_config(record: PersistentRecord, state: Dict[str, torch.Tensor], name: str = "G_ema"):
    """:class:`~head4d.models.GenHeadConfig` from a GenHead record's recorded arguments and
    its background's weight shapes (module docstring)."""
    from ..models import GenHeadConfig

    where = f"load_network_pkl: {name}"
    if record.init_args:
        raise ValueError(f"{where}: expected no positional init_args, got {len(record.init_args)}")
    kwargs = dict(record.init_kwargs)
    rendering = dict(kwargs.pop("rendering_kwargs", None) or record.state.get("rendering_kwargs") or {})
    recorded_rendering = dict(rendering)
    fields: Dict[str, Any] = {}
    ignored: List[str] = []

    for key in _SAME_NAME:
        if key in kwargs:
            fields[key] = kwargs.pop(key)
    for key, value in _REQUIRED_INIT.items():
        if key in kwargs and kwargs.pop(key) != value:
            raise ValueError(f"{where}: init_kwargs[{key!r}] must be {value!r} (the only variant head4d builds), "
                             f"got {record.init_kwargs[key]!r}")
    mapping = dict(kwargs.pop("mapping_kwargs", None) or {})
    if "num_layers" in mapping:
        fields["mapping_layers"] = mapping.pop("num_layers")
    ignored += [f"mapping_kwargs.{k}" for k in mapping]
    sr = dict(kwargs.pop("sr_kwargs", None) or {})
    if "use_ws_ones" in sr:
        fields["use_ws_ones"] = bool(sr.pop("use_ws_ones"))
    ignored += [f"sr_kwargs.{k}" for k in sr if k not in _SR_ACCEPTED]
    deformation = dict(kwargs.pop("deformation_kwargs", None) or {})
    deformation_box = deformation.pop("box_warp", None)
    ignored += [f"deformation_kwargs.{k}" for k in deformation]
    ignored += [f"init_kwargs.{k}" for k in kwargs]

    for key, value in _REQUIRED_RENDERING.items():
        if key in rendering and rendering.pop(key) != value:
            raise ValueError(f"{where}: rendering_kwargs[{key!r}] must be {value!r} (the only variant head4d "
                             f"builds), got {recorded_rendering[key]!r}")
    for key, field_name in _RENDERING_FIELDS.items():
        if key in rendering:
            fields[field_name] = rendering.pop(key)
    output_dim = rendering.pop("decoder_output_dim", None)
    plane_features = int(fields.get("triplane_channels", GenHeadConfig.triplane_channels)) // 6
    if output_dim is not None and output_dim != plane_features:
        raise ValueError(f"{where}: rendering_kwargs['decoder_output_dim'] must equal the features per plane "
                         f"(triplane_channels / 6 = {plane_features}), got {output_dim!r}")
    ignored += [f"rendering_kwargs.{k}" for k in rendering]
    if deformation_box is not None:
        box = fields.setdefault("box_warp", deformation_box)
        if float(box) != float(deformation_box):
            raise ValueError(f"{where}: rendering_kwargs['box_warp'] ({box}) and deformation_kwargs['box_warp'] "
                             f"({deformation_box}) differ; head4d's renderer and deformation share one box_warp")

    resolution = record.state.get("neural_rendering_resolution")
    if resolution is not None:
        fields["neural_rendering_resolution"] = int(resolution)
    if fields.get("has_background", True):
        fields.update(_background_fields(state))
    if ignored:
        warnings.warn(f"{where}: arguments head4d does not use were ignored: {', '.join(ignored)}", stacklevel=3)
    return GenHeadConfig(**fields)


def _background_fields(state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """The background generator's settings from its weight shapes (none when it has no weights)."""
    channels = {}
    for key, value in state.items():
        match = re.fullmatch(r"background\.synthesis\.b(\d+)\.conv1\.weight", key)
        if match:
            channels[int(match.group(1))] = int(value.shape[0])
    if not channels:
        return {}
    top = max(channels)
    channel_max = max(channels.values())
    fields = {"background_resolution": top, "background_channel_max": channel_max,
              "background_channel_base": channels[top] * top,
              "background_mapping_layers": sum(1 for key in state
                                               if re.fullmatch(r"background\.mapping\.fc\d+\.weight", key))}
    torgb = state.get(f"background.synthesis.b{top}.torgb.weight")
    if torgb is not None:
        fields["background_channels"] = int(torgb.shape[0])
    return fields


def load_network_weights(model: torch.nn.Module, state: Dict[str, torch.Tensor], name: str = "G_ema") -> None:
    """Copy the network weights of an upstream GenHead state dict into ``model`` by name.

    Raises ValueError listing every missing key, unexpected key and shape mismatch.
    """
    expected = model.state_dict()
    given = {k: v for k, v in state.items() if not k.startswith(NON_NETWORK_PREFIXES)}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [f"{k}: checkpoint {list(given[k].shape)}, model {list(v.shape)}"
                  for k, v in expected.items() if k in given and given[k].shape != v.shape]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            problems.append(f"{len(items)} {title}: " + ", ".join(items))
    if problems:
        raise ValueError(f"load_network_pkl: {name}'s weights do not fit the GenHead built from its arguments; "
                         + "; ".join(problems))
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(given[key])


def flame_from_record(record: PersistentRecord, name: str = "G_ema"):
    """:class:`~head4d.head.FLAME` from the arrays a GenHead record stores under ``deformer.flame_deform``.

    Raises ValueError naming every array that is missing.
    """
    from ..head import FLAME

    arrays, missing = {}, []
    for argument, path in {**FLAME_ARRAYS, **OPTIONAL_FLAME_ARRAYS}.items():
        value = _lookup(record, f"{FLAME_DEFORM}.{path}")
        if value is None:
            if argument not in OPTIONAL_FLAME_ARRAYS:
                missing.append(f"{FLAME_DEFORM}.{path}")
        else:
            arrays[argument] = value
    if missing:
        raise ValueError(f"load_network_pkl: {name} lacks the head model's arrays {', '.join(missing)}; "
                         "FLAME cannot be built from this checkpoint (build it with "
                         "head4d.head.FLAME.from_file and load the weights with load_state_dict)")
    return FLAME.from_arrays(**arrays)


def _lookup(record: Any, dotted: str) -> Any:
    """The value at ``a.b.c`` under a record (parameters, buffers, submodules or attributes), or None."""
    value = record
    for part in dotted.split("."):
        if not isinstance(value, ObjectRecord):
            return None
        try:
            value = getattr(value, part)
        except AttributeError:
            return None
    return value
