"""Portrait4D GenHead pickles (``genhead-ffhq512.pkl`` and the like) to :class:`~head4d.models.GenHead`.

`load_network_pkl` (:mod:`._loading`) reads the snapshot with :func:`read_pickle` (no upstream
code runs) and turns each GenHead record (``G_ema``, and ``G`` when present) into a GenHead
with `genhead_from_record`:

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
  ``dataset_label_std`` are read elsewhere or not needed; the copy is
  :func:`._common.load_network_weights`).
- **Head model**: FLAME from the arrays the checkpoint stores under
  ``deformer.flame_deform`` (Portrait4D keeps them already multiplied by 3 and recentred
  on the canonical neck joint): ``flame_model.{v_template, faces_tensor, shapedirs,
  posedirs, J_regressor, parents, lbs_weights}`` and the deformation's vertex sets and
  simplified mesh ``{eye_idxs, lips_idxs, simplify_idxs, simplify_baris,
  simplify_faces}`` (``face_idxs`` is checked when present), through
  :meth:`~head4d.head.FLAME.from_arrays` (:func:`._common.flame_from_record`). No
  ``generic_model.pkl`` is needed.

Every other entry of the snapshot (``D``, ``training_set_kwargs``, ``augment_pipe``, ...)
comes back as :func:`read_pickle` returns it: the discriminator ``D`` as its
:class:`PersistentRecord`, which a later change turns into a module.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional

import torch

from ._common import (apply_config_overrides, check_deformation_box, flame_from_record, load_network_weights,
                      read_rendering_kwargs, record_class_name, warn_ignored)
from ._records import PersistentRecord

GENHEAD_CLASS = "PartTriPlaneGeneratorDeform"
#: The state-dict prefixes of GenHead's networks (upstream names).
NETWORK_PREFIXES = ("backbone.", "background.", "superresolution.", "decoder.")

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


def genhead_from_record(record: PersistentRecord, name: str = "G_ema",
                        config_overrides: Optional[Mapping[str, Any]] = None):
    """A :class:`~head4d.models.GenHead` (eval mode, CPU) from the record of a pickled
    ``PartTriPlaneGeneratorDeform`` (see the module docstring), with ``config_overrides``
    (GenHeadConfig fields) applied to the recorded config."""
    from ..models import GenHead

    if not isinstance(record, PersistentRecord) or record.class_name != GENHEAD_CLASS:
        raise ValueError(f"load_network_pkl: {name} must be a pickled {GENHEAD_CLASS}, got "
                         f"{record_class_name(record)}")
    state = record.state_dict()
    config = apply_config_overrides(genhead_config(record, state, name), config_overrides)
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

    output_dim = rendering.pop("decoder_output_dim", None)
    read_rendering_kwargs(where, rendering, _RENDERING_FIELDS, _REQUIRED_RENDERING, fields, ignored)
    plane_features = int(fields.get("triplane_channels", GenHeadConfig.triplane_channels)) // 6
    if output_dim is not None and output_dim != plane_features:
        raise ValueError(f"{where}: rendering_kwargs['decoder_output_dim'] must equal the features per plane "
                         f"(triplane_channels / 6 = {plane_features}), got {output_dim!r}")
    check_deformation_box(where, fields, deformation_box)

    resolution = record.state.get("neural_rendering_resolution")
    if resolution is not None:
        fields["neural_rendering_resolution"] = int(resolution)
    if fields.get("has_background", True):
        fields.update(_background_fields(state))
    warn_ignored(where, ignored)
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
