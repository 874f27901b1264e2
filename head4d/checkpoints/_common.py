"""What the Portrait4D network readers share (:mod:`._genhead`, :mod:`._reconstructor`).

- `read_snapshot`: a training snapshot (a dict with ``'G_ema'``) through :func:`read_pickle`.
- `apply_config_overrides`: head4d's own settings set on a config read from a record.
- `read_rendering_kwargs`: the recorded ``rendering_kwargs`` into config fields, with the
  values head4d cannot reproduce refused and the rest named as ignored.
- `check_deformation_box`: the deformation's ``box_warp`` must be the renderer's.
- `warn_ignored`: one warning naming every recorded argument head4d does not use.
- `load_network_weights`: the weight copy by name, listing every missing, unexpected and
  mis-shaped key in one error.
- `flame_from_record`: :class:`~head4d.head.FLAME` from the arrays a record keeps under
  ``deformer.flame_deform`` (GenHead's and the reconstructor's deformers store the same).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Union

import torch

from ._pickle import read_pickle
from ._records import ObjectRecord, PersistentRecord

#: Entries of an upstream generator's state dict that are not network weights (the FLAME
#: model, read by `flame_from_record`, and the training set's label spread).
NON_NETWORK_PREFIXES = ("deformer.", "dataset_label_std")
#: Where the checkpoint keeps the head model.
FLAME_DEFORM = "deformer.flame_deform"
#: head4d argument -> the path under ``deformer.flame_deform``.
FLAME_ARRAYS = {
    "v_template": "flame_model.v_template", "faces": "flame_model.faces_tensor",
    "shapedirs": "flame_model.shapedirs", "posedirs": "flame_model.posedirs",
    "j_regressor": "flame_model.J_regressor", "parents": "flame_model.parents",
    "lbs_weights": "flame_model.lbs_weights", "eye_indices": "eye_idxs", "lips_indices": "lips_idxs",
    "companion_indices": "simplify_idxs", "companion_weights": "simplify_baris",
    "companion_faces": "simplify_faces",
}
#: Arrays read when present.
OPTIONAL_FLAME_ARRAYS = {"face_indices": "face_idxs"}


def read_snapshot(path: Union[str, os.PathLike, BinaryIO]) -> Dict[str, Any]:
    """The snapshot dict of a network pickle (:func:`read_pickle`); ValueError when it is not a
    dict with ``'G_ema'``."""
    data = read_pickle(path)
    if not isinstance(data, dict) or "G_ema" not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"load_network_pkl: expected a training snapshot dict with 'G_ema', got {found}")
    return data


def record_class_name(record: Any) -> str:
    """The class name a record was pickled as (the Python type's name for anything else)."""
    return record.class_name if isinstance(record, ObjectRecord) else type(record).__name__


def apply_config_overrides(config: Any, overrides: Optional[Mapping[str, Any]]) -> Any:
    """``config`` (a dataclass) with the fields in ``overrides`` replaced; ValueError naming
    the names that are not fields."""
    if not overrides:
        return config
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"load_network_pkl: config_overrides has names that are not {type(config).__name__} "
                         f"fields: {unknown}")
    return dataclasses.replace(config, **overrides)


def read_rendering_kwargs(where: str, rendering: Mapping[str, Any], field_names: Mapping[str, str],
                          required: Mapping[str, Any], fields: Dict[str, Any], ignored: List[str],
                          normalize: Optional[Mapping[str, Callable[[Any], Any]]] = None) -> None:
    """Read a recorded ``rendering_kwargs``: each key of ``required`` must hold its value (after
    ``normalize[key]`` when given) or be absent, else ValueError naming it; each key of
    ``field_names`` is copied to ``fields[field_names[key]]``; the other keys are appended to
    ``ignored`` as ``rendering_kwargs.<key>``."""
    rest = dict(rendering)
    normalize = normalize or {}
    for key, value in required.items():
        if key not in rest:
            continue
        recorded = rest.pop(key)
        if normalize.get(key, lambda v: v)(recorded) != value:
            raise ValueError(f"{where}: rendering_kwargs[{key!r}] must be {value!r} (the only variant head4d "
                             f"builds), got {recorded!r}")
    for key, field_name in field_names.items():
        if key in rest:
            fields[field_name] = rest.pop(key)
    ignored += [f"rendering_kwargs.{k}" for k in rest]


def check_deformation_box(where: str, fields: Dict[str, Any], deformation_box: Any) -> None:
    """The recorded ``deformation_kwargs['box_warp']`` must equal the renderer's ``box_warp``
    (taken from it when the rendering arguments have none)."""
    if deformation_box is None:
        return
    box = fields.setdefault("box_warp", deformation_box)
    if float(box) != float(deformation_box):
        raise ValueError(f"{where}: rendering_kwargs['box_warp'] ({box}) and deformation_kwargs['box_warp'] "
                         f"({deformation_box}) differ; head4d's renderer and deformation share one box_warp")


def warn_ignored(where: str, ignored: List[str]) -> None:
    """One UserWarning naming every recorded argument head4d does not use (none: no warning)."""
    if ignored:
        warnings.warn(f"{where}: arguments head4d does not use were ignored: {', '.join(ignored)}", stacklevel=5)


def load_network_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str = "G_ema") -> None:
    """Copy the network weights of an upstream state dict into ``model`` by name (every key
    except ``deformer.*`` and ``dataset_label_std``).

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
        raise ValueError(f"load_network_pkl: {name}'s weights do not fit the {type(model).__name__} built from its "
                         "arguments; " + "; ".join(problems))
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(given[key])


def flame_from_record(record: PersistentRecord, name: str = "G_ema"):
    """:class:`~head4d.head.FLAME` from the arrays a record stores under ``deformer.flame_deform``
    (Portrait4D keeps them already multiplied by 3 and recentred on the canonical neck joint).

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
