"""Opening a checkpoint as a head4d model: Portrait4D network pickles by the class their
generator was pickled as (`load_network_pkl`), and either a pickle or a directory of
head4d's own format, of either model kind (`load`).

The pickled generator classes head4d loads, and what each becomes:

- ``PartTriPlaneGeneratorDeform`` (``genhead-ffhq512.pkl``): :class:`~head4d.models.GenHead`
  (:mod:`._genhead`);
- ``TriPlaneReconstructorNeutralize`` (``portrait4d-genhead512.pkl``,
  ``portrait4d-static-genhead512.pkl``, ``portrait4d-v2-vfhq512.pkl``):
  :class:`~head4d.models.Reconstructor` (:mod:`._reconstructor`).
"""
from __future__ import annotations

import os
from typing import Any, BinaryIO, Callable, Dict, Mapping, Optional, Union

import torch

from ._common import read_snapshot, record_class_name
from ._genhead import GENHEAD_CLASS, genhead_from_record
from ._reconstructor import RECONSTRUCTOR_CLASS, reconstructor_from_record

#: head4d's model kinds (the ``kind`` argument of `load`).
KINDS = ("GenHead", "Reconstructor")
#: Pickled generator class -> (head4d kind, reader).
_READERS: Dict[str, tuple] = {GENHEAD_CLASS: ("GenHead", genhead_from_record),
                              RECONSTRUCTOR_CLASS: ("Reconstructor", reconstructor_from_record)}
_LOADED_CLASSES = ", ".join(f"{cls} (as {kind})" for cls, (kind, _) in _READERS.items())


def load_network_pkl(path: Union[str, os.PathLike, BinaryIO], device: Union[str, torch.device] = "cpu",
                     config_overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Load a Portrait4D training snapshot as head4d modules, without running its code.

    Args:
        path: the pickle (``genhead-ffhq512.pkl``, ``portrait4d-genhead512.pkl``, ...), a path
            or a binary file object.
        device: where the generators go.
        config_overrides: fields of the model's config (:class:`~head4d.models.GenHeadConfig`
            or :class:`~head4d.models.ReconstructorConfig`) set after the recorded ones, for
            head4d's own settings (``backend``, ``fused``, ``source_resolution``, ...); an
            architecture field that no longer fits the weights gives the shape-mismatch error.

    Returns:
        The snapshot's dict with ``'G_ema'`` (and ``'G'`` when present) as a
        :class:`~head4d.models.GenHead` or :class:`~head4d.models.Reconstructor` (by the class
        each was pickled as) in eval mode on ``device``, FLAME as head model; the other
        entries as :func:`read_pickle` returns them (``'D'``: its record).

    Raises:
        ValueError: not a snapshot, a generator class head4d does not load (the message
            names the ones it does), an argument head4d cannot reproduce, missing or
            unexpected weights or shape mismatches (each listed), or FLAME arrays missing
            from the checkpoint (named).
        UnsafePickleError: the pickle calls something that is not allowed.
    """
    out = dict(read_snapshot(path))
    for name in ("G_ema", "G"):
        if out.get(name) is not None:
            out[name] = _reader(out[name], name)[1](out[name], name=name,
                                                     config_overrides=config_overrides).to(device)
    return out


def load(path_or_dir: Union[str, os.PathLike, BinaryIO], device: Union[str, torch.device] = "cpu", *,
         kind: Optional[str] = None) -> torch.nn.Module:
    """The model a checkpoint holds, in eval mode on ``device``.

    Args:
        path_or_dir: a Portrait4D network pickle (a path or a binary file object; its
            ``G_ema`` is built, see :func:`load_network_pkl`), or a directory written by
            :meth:`GenHead.save <head4d.models.GenHead.save>` or
            :meth:`Reconstructor.save <head4d.models.Reconstructor.save>`.
        device: where the model goes.
        kind: ``"GenHead"`` or ``"Reconstructor"``: the kind the caller needs; a checkpoint
            of the other kind is refused before any model is built. None: either.

    Returns:
        A :class:`~head4d.models.GenHead` or :class:`~head4d.models.Reconstructor`.

    Raises:
        FileNotFoundError: no such file or directory, or a directory without head4d's files.
        ValueError: a checkpoint of another kind than ``kind`` (both named), an unknown
            ``kind``, a file that is not a network pickle head4d loads, or the errors of
            :func:`load_network_pkl` and the models' ``load``.
    """
    op = "head4d.checkpoints.load"
    if kind is not None and kind not in KINDS:
        raise ValueError(f"{op}: kind must be None or one of {list(KINDS)}, got {kind!r}")
    if isinstance(path_or_dir, (str, os.PathLike)):
        if not os.path.exists(path_or_dir):
            raise FileNotFoundError(f"{op}: {os.fspath(path_or_dir)!r}: no such file or directory")
        if os.path.isdir(path_or_dir):
            return _load_directory(op, path_or_dir, device, kind)
    shown = os.fspath(path_or_dir) if isinstance(path_or_dir, (str, os.PathLike)) else "the pickle"
    record = read_snapshot(path_or_dir)["G_ema"]
    found, reader = _reader(record, "G_ema")
    _check_kind(op, shown, found, kind, f"a pickled {record.class_name}")
    return reader(record, name="G_ema").to(device)


def _reader(record: Any, name: str) -> tuple:
    """``(kind, reader)`` for a pickled generator record; ValueError naming the classes head4d loads."""
    class_name = record_class_name(record)
    if class_name not in _READERS:
        raise ValueError(f"load_network_pkl: {name} is a pickled {class_name}; head4d loads the generator "
                         f"classes {_LOADED_CLASSES}")
    return _READERS[class_name]


def _load_directory(op: str, directory: Union[str, os.PathLike], device: Union[str, torch.device],
                    kind: Optional[str]) -> torch.nn.Module:
    """A model from a directory in head4d's own format, by the format tag of its config.json."""
    from ..models import GenHead, Reconstructor
    from ..models import genhead as genhead_module
    from ..models import reconstructor as reconstructor_module
    from ..models._common import read_saved_config

    classes: Dict[str, Callable] = {genhead_module.SAVE_FORMAT: GenHead,
                                    reconstructor_module.SAVE_FORMAT: Reconstructor}
    fmt = read_saved_config(op, directory).get("format")
    if fmt not in classes:
        raise ValueError(f"{op}: {os.fspath(directory)!r} holds format {fmt!r}; head4d's model formats are "
                         f"{sorted(classes)}")
    cls = classes[fmt]
    _check_kind(op, os.fspath(directory), cls.__name__, kind, f"format {fmt!r}")
    return cls.load(directory, device=device)


def _check_kind(op: str, shown: str, found: str, wanted: Optional[str], what: str) -> None:
    """ValueError when a checkpoint of kind ``found`` is not the ``wanted`` one."""
    if wanted is not None and found != wanted:
        raise ValueError(f"{op}: {shown} is a {found} checkpoint ({what}), but a {wanted} is needed here "
                         f"(kind={wanted!r}); pass a {wanted} checkpoint")
