"""Portrait4D reconstructor pickles (``portrait4d-genhead512.pkl``,
``portrait4d-static-genhead512.pkl``, ``portrait4d-v2-vfhq512.pkl``) to
:class:`~head4d.models.Reconstructor`.

`load_network_pkl` (:mod:`._loading`) turns each record of class
``TriPlaneReconstructorNeutralize`` (``G_ema``, and ``G`` when present) into a Reconstructor
with `reconstructor_from_record`, without running the pickled code:

- **Config** from the record's ``init_kwargs``: ``mot_dims`` (548 for PD-FGC motion, 109
  for FLAME motion) as ``motion_dim``; ``num_blocks_neutral``, ``num_blocks_motion``,
  ``motion_map_layers``, ``has_background``, ``img_resolution`` and ``sr_num_fp16_res``
  under their own names; ``sr_kwargs`` (``channel_base``, ``channel_max``,
  ``fused_modconv_default``); the ``rendering_kwargs`` (``box_warp``, the depth resolutions,
  ``ray_start`` / ``ray_end``, ``density_noise``, ``sr_antialias``, ``decoder_lr_mul``) as
  GenHead's reader reads them, from the init arguments or the attribute; the
  ``neural_rendering_resolution`` attribute (the init argument when there is none). Values
  head4d's Reconstructor cannot reproduce are errors naming the argument: ``w_dim`` other
  than 512 (the size of ``w_avg``), ``flame_full`` False, ``has_superresolution`` False
  (upstream then decodes 3 channels instead of 32), ``sr_kwargs['use_ws_ones']`` True, a
  clamp mode other than softplus, super-resolution noise, a super-resolution module other
  than ``SuperresolutionHybrid8XDC``, a deformation box other than the renderer's. The
  training arguments the network does not use (``masked_sampling``, ``add_block``,
  ``num_fp16_res``, ``conv_clamp``, the generator-only ``channel_base`` / ``channel_max``,
  ``density_reg``, ``reg_type``, ...) are named in one warning.
- **Weights** by name: every key of the record's ``state_dict()`` except ``deformer.*``
  and ``dataset_label_std``, the buffer ``w_avg`` included (missing, unexpected and
  mis-shaped keys are listed in one error).
- **Head model**: FLAME from ``deformer.flame_deform`` (the reconstructor's neck-only
  deformer keeps the same arrays as GenHead's).

Portrait4D-v2 (``portrait4d-v2-vfhq512.pkl``) is loaded as well, as the same class: v2
trains the same ``TriPlaneReconstructorNeutralize`` (same modules, constructor arguments
and ``synthesis`` path; the released inference script builds that one class for v1 and v2
checkpoints). What v2 changes is how it is trained (pseudo multi-view data made by the
static v1 model, a learning-rate scale for the motion layers, another density
regularization), which is in the training loop and recorded only as ignored training
arguments (``rendering_kwargs['reg_type']`` and the like), not in the network.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from ._common import (apply_config_overrides, check_deformation_box, flame_from_record, load_network_weights,
                      read_rendering_kwargs, record_class_name, warn_ignored)
from ._records import PersistentRecord

RECONSTRUCTOR_CLASS = "TriPlaneReconstructorNeutralize"

#: init_kwargs read into ReconstructorConfig: upstream name -> field.
_INIT_FIELDS = {"mot_dims": "motion_dim", "num_blocks_neutral": "num_blocks_neutral",
                "num_blocks_motion": "num_blocks_motion", "motion_map_layers": "motion_map_layers",
                "has_background": "has_background", "img_resolution": "img_resolution",
                "sr_num_fp16_res": "sr_num_fp16_res"}
#: init_kwargs that must have one value (head4d builds only that variant): name -> value.
_REQUIRED_INIT = {"w_dim": 512, "flame_full": True, "has_superresolution": True}
#: sr_kwargs read into ReconstructorConfig fields of the same name.
_SR_FIELDS = ("channel_base", "channel_max", "fused_modconv_default")
#: sr_kwargs that must have one value.
_REQUIRED_SR = {"use_ws_ones": False}
#: rendering_kwargs read into ReconstructorConfig: upstream name -> field.
_RENDERING_FIELDS = {"sr_antialias": "sr_antialias", "decoder_lr_mul": "decoder_lr_mul",
                     "depth_resolution": "depth_resolution",
                     "depth_resolution_importance": "depth_resolution_importance", "ray_start": "ray_start",
                     "ray_end": "ray_end", "box_warp": "box_warp", "density_noise": "density_noise"}
#: rendering_kwargs that must have one value.
_SUPERRESOLUTION_MODULE = "models.stylegan.superresolution.SuperresolutionHybrid8XDC"
_REQUIRED_RENDERING = {"clamp_mode": "softplus", "superresolution_noise_mode": "none",
                       "superresolution_module": _SUPERRESOLUTION_MODULE}
#: The reconstructor renames the super-resolution's older module path before building it.
_RENDERING_NORMALIZE = {"superresolution_module": lambda name: None if name is None else
                        str(name).replace("training.superresolution", "models.stylegan.superresolution")}


def reconstructor_from_record(record: PersistentRecord, name: str = "G_ema",
                              config_overrides: Optional[Mapping[str, Any]] = None):
    """A :class:`~head4d.models.Reconstructor` (eval mode, CPU, no gradients) from the record
    of a pickled ``TriPlaneReconstructorNeutralize`` (see the module docstring), with
    ``config_overrides`` (:class:`~head4d.models.ReconstructorConfig` fields, for head4d's own
    settings such as ``source_resolution``, ``backend``, ``fused``) applied to the recorded
    config."""
    from ..models import Reconstructor

    if not isinstance(record, PersistentRecord) or record.class_name != RECONSTRUCTOR_CLASS:
        raise ValueError(f"load_network_pkl: {name} must be a pickled {RECONSTRUCTOR_CLASS}, got "
                         f"{record_class_name(record)}")
    config = apply_config_overrides(reconstructor_config(record, name), config_overrides)
    head_model = flame_from_record(record, name)
    model = Reconstructor(config, head_model=head_model)
    load_network_weights(model, record.state_dict(), name)
    return model.eval().requires_grad_(False)


def reconstructor_config(record: PersistentRecord, name: str = "G_ema"):
    """:class:`~head4d.models.ReconstructorConfig` from a reconstructor record's recorded
    arguments and attributes (module docstring); missing arguments take the config's
    defaults (the released v1 ones)."""
    from ..models import ReconstructorConfig

    where = f"load_network_pkl: {name}"
    if record.init_args:
        raise ValueError(f"{where}: expected no positional init_args, got {len(record.init_args)}")
    kwargs = dict(record.init_kwargs)
    rendering = dict(kwargs.pop("rendering_kwargs", None) or record.state.get("rendering_kwargs") or {})
    fields: Dict[str, Any] = {}
    ignored: List[str] = []

    for key, field_name in _INIT_FIELDS.items():
        if key in kwargs:
            fields[field_name] = kwargs.pop(key)
    _require(where, "init_kwargs", kwargs, _REQUIRED_INIT)
    sr = dict(kwargs.pop("sr_kwargs", None) or {})
    _require(where, "sr_kwargs", sr, _REQUIRED_SR)
    for key in _SR_FIELDS:
        if key in sr:
            fields[key] = sr.pop(key)
    ignored += [f"sr_kwargs.{k}" for k in sr]
    deformation = dict(kwargs.pop("deformation_kwargs", None) or {})
    deformation_box = deformation.pop("box_warp", None)
    ignored += [f"deformation_kwargs.{k}" for k in deformation]
    resolution = kwargs.pop("neural_rendering_resolution", None)
    ignored += [f"init_kwargs.{k}" for k in kwargs]

    read_rendering_kwargs(where, rendering, _RENDERING_FIELDS, _REQUIRED_RENDERING, fields, ignored,
                          normalize=_RENDERING_NORMALIZE)
    check_deformation_box(where, fields, deformation_box)
    resolution = record.state.get("neural_rendering_resolution", resolution)
    if resolution is not None:
        fields["neural_rendering_resolution"] = int(resolution)
    warn_ignored(where, ignored)
    return ReconstructorConfig(**fields)


def _require(where: str, group: str, recorded: Dict[str, Any], required: Mapping[str, Any]) -> None:
    """Pop each key of ``required`` from ``recorded``: it must hold the required value (or be
    absent), else ValueError naming ``group[key]``."""
    for key, value in required.items():
        if key in recorded:
            got = recorded.pop(key)
            if got != value:
                raise ValueError(f"{where}: {group}[{key!r}] must be {value!r} (the only variant head4d's "
                                 f"Reconstructor builds), got {got!r}")

