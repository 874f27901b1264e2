"""Reading StyleGAN / EG3D / Portrait4D network pickles safely.

Those projects save a training snapshot as ``pickle.dump(dict(G=..., D=..., G_ema=...,
training_set_kwargs=..., augment_pipe=...))``. Their networks are
``persistence.persistent_class`` objects: each pickles as a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` where ``meta`` holds
``type`` ('class'), ``version`` (6), ``module_src`` (the full source text of the file
that defined the class), ``class_name`` and ``state`` (the module's ``__dict__``:
``_parameters``, ``_buffers``, ``_modules``, ``_non_persistent_buffers_set``,
``_init_args``, ``_init_kwargs``, user attributes). Loading such a file the usual way
executes that embedded source and imports every class it names (torch.nn layers, the
projects' own helpers, pytorch3d settings). `read_pickle` does neither.

API::

    from head4d.checkpoints import read_pickle
    data = read_pickle("genhead-ffhq512.pkl")      # path or binary file object
    G = data["G_ema"]                              # a PersistentRecord
    G.class_name                                   # 'PartTriPlaneGeneratorDeform'
    G.init_args, G.init_kwargs                     # what it was constructed with
    weights = G.state_dict()                       # OrderedDict: 'backbone.synthesis.b4.const' -> tensor, ...
    G.backbone.synthesis.b4                        # submodules (records) by attribute, as on a Module
    G.rendering_kwargs                             # other attributes: G.state holds them all

`read_pickle(path_or_file)` returns the pickled object with

- each persistent object replaced by a `PersistentRecord` (``class_name``,
  ``module_src`` kept as text and never executed, ``version``, ``state``,
  ``init_args``, ``init_kwargs``, ``state_dict()``);
- each object of any other class that is not allow-listed (torch.nn layers such as
  Softplus, Sequential, ModuleList; upstream helpers) replaced by an inert
  `ObjectRecord` of its pickled state (``module_name``, ``class_name``, ``state``):
  the class is never imported, and module-like records still contribute their
  parameters and buffers to the enclosing ``state_dict()``;
- ``dnnlib`` EasyDicts as `EasyDict` (a dict with attribute access); tensors as CPU
  tensors (parameters as ``torch.nn.Parameter``), bit-exact, whatever device they were
  saved from; numpy arrays, dtypes and scalars as numpy's; OrderedDicts, sets, torch
  dtypes, ``torch.Size`` and ``torch.device`` as themselves.

``state_dict()`` follows ``torch.nn.Module.state_dict()``: per module its parameters,
then its buffers except those named in ``_non_persistent_buffers_set``, then its
submodules' entries under ``name.``, skipping ``None`` entries, tensors detached.

Safety: the unpickler resolves globals from a fixed table (see `_pickle`): a short
allow-list of tensor, storage, container and numpy functions is real; modules that can
run code or reach the system (builtins such as eval, exec, getattr, __import__, open;
os, posix, subprocess, sys, importlib, shutil, socket, pickle, marshal, types,
functools, operator, runpy, code, pty, ctypes, ...) are refused with an
`UnsafePickleError` naming ``module.name``; every other name is a placeholder that
becomes a record when the pickle creates an object of it and is refused when the pickle
calls it (an unknown name may be a function). Setting an object's state (BUILD) is
allowed only on records, numpy arrays and dtypes and dicts, never on tensors or globals.

Network snapshots: ``load_network_pkl(path, device="cpu", config_overrides=None)`` returns
the snapshot with ``G_ema`` (and ``G``) as head4d models, by the class each was pickled as:
``PartTriPlaneGeneratorDeform`` (GenHead, ``genhead-ffhq512.pkl``) as
:class:`head4d.models.GenHead` (see `_genhead`), ``TriPlaneReconstructorNeutralize``
(``portrait4d-genhead512.pkl``, ``portrait4d-static-genhead512.pkl``,
``portrait4d-v2-vfhq512.pkl``) as :class:`head4d.models.Reconstructor` (see
`_reconstructor`); configured from the recorded arguments, weights loaded by name, FLAME
built from the arrays the checkpoint stores; ``D`` and the rest as `read_pickle` returns
them. Any other class is refused with an error naming the ones head4d loads.

One model, whatever the file: ``load(path_or_dir, device="cpu", kind=None)`` opens a
network pickle (its ``G_ema``) or a directory of head4d's own format (``GenHead.save`` /
``Reconstructor.save``) and returns the model; ``kind="GenHead"`` or ``"Reconstructor"``
refuses a checkpoint of the other kind with an error naming both::

    from head4d.checkpoints import load
    R = load("portrait4d-v2-vfhq512.pkl", device="cuda", kind="Reconstructor")

Storage blobs (torch's legacy ``torch.save`` of one storage, see `_tensors`) are parsed
as data, and each tensor view is bounds-checked against its storage.
"""
from ._loading import KINDS, load, load_network_pkl
from ._pickle import DENIED_MODULES, EasyDict, UnsafePickleError, read_pickle
from ._records import ObjectRecord, PersistentRecord

__all__ = ["DENIED_MODULES", "EasyDict", "KINDS", "ObjectRecord", "PersistentRecord", "UnsafePickleError", "load",
           "load_network_pkl", "read_pickle"]
