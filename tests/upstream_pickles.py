"""Writing network pickles in the upstream (StyleGAN2-ADA / EG3D / Portrait4D) formats, for the tests.

No upstream package is needed: `upstream_modules_installed` puts stand-ins for the
modules a snapshot names (``torch_utils.persistence``, ``dnnlib.util``, a renderer class
under ``training.``) in ``sys.modules`` only while a pickle is written.

- `Persistent` (a mixin) and `PersistentTree` pickle as upstream's
  ``persistence.persistent_class`` objects do: a call of
  ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with the meta dict (type,
  version, module_src, class_name, state) and no BUILD step. The stand-in reconstruct
  function does what upstream's does (runs module_src), so a plain ``pickle.loads`` of
  such a pickle runs the embedded source: the positive control for "never runs it".
- `UpstreamPickler` writes tensors as torch 1.11 did (``_rebuild_tensor_v2`` /
  ``_rebuild_parameter`` around ``_load_from_bytes`` of a legacy storage blob built here
  byte by byte from the format's description) and numpy arrays and scalars under numpy
  1.x's ``numpy.core`` names; `Global` and `Call` write any global or call by name.
- `flame_tree`: the ``deformer`` holding a head model's arrays as Portrait4D's checkpoints
  keep them under ``deformer.flame_deform`` (GenHead's and the reconstructor's alike).
- `reconstructor_init_kwargs` and `reconstructor_tree`: a head4d Reconstructor as the
  ``TriPlaneReconstructorNeutralize`` record of a Portrait4D reconstructor snapshot.
"""
from __future__ import annotations

import copy
import io
import pickle
import struct
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch

UPSTREAM_ROOTS = ("torch_utils", "dnnlib", "training", "models", "pytorch3d", "some_upstream")
MARK_ENV = "HEAD4D_TEST_MODULE_SRC_RAN"


# ----------------------------------------------------------------------------------------
# Stand-ins for the upstream modules, present only while a pickle is written
# ----------------------------------------------------------------------------------------

def _reconstruct_persistent_obj(meta):
    """What upstream's reconstruct function does: run the embedded source, rebuild the object."""
    module = types.ModuleType("_imported_module_for_test")
    exec(compile(meta["module_src"], "<module_src>", "exec"), module.__dict__)
    cls = module.__dict__[meta["class_name"]]
    obj = cls.__new__(cls)
    obj.__dict__.update(meta["state"])
    return obj


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class UpstreamEasyDict(dict):
    """dnnlib.util.EasyDict: a dict with attribute access."""

    __module__ = "dnnlib.util"
    __qualname__ = "EasyDict"

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class PartDeformImportanceRenderer(torch.nn.Module):
    """A non-persistent upstream module (pickled by reference: NEWOBJ + BUILD)."""

    __module__ = "training.volumetric_rendering.renderer"

    def __init__(self):
        super().__init__()
        self.plane_axes = torch.randn(3, 3, 3, dtype=torch.float32)  # a plain tensor attribute, not a buffer
        self.ray_start = "auto"


def fake_module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


@contextmanager
def upstream_modules_installed():
    """Put the stand-in upstream modules in sys.modules; remove them (and anything under them) after."""
    modules = {
        "torch_utils": fake_module("torch_utils"),
        "torch_utils.persistence": fake_module("torch_utils.persistence",
                                                _reconstruct_persistent_obj=_reconstruct_persistent_obj),
        "dnnlib": fake_module("dnnlib", EasyDict=UpstreamEasyDict),
        "dnnlib.util": fake_module("dnnlib.util", EasyDict=UpstreamEasyDict),
        "training": fake_module("training"),
        "training.volumetric_rendering": fake_module("training.volumetric_rendering"),
        "training.volumetric_rendering.renderer": fake_module(
            "training.volumetric_rendering.renderer", PartDeformImportanceRenderer=PartDeformImportanceRenderer),
    }
    assert not any(name in sys.modules for name in modules)
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in modules:
            sys.modules.pop(name, None)


def upstream_modules_loaded() -> list:
    return [name for name in sys.modules if name.split(".")[0] in UPSTREAM_ROOTS]



def marking_source(mark_path: Path) -> str:
    """A module source that, if it ever ran, would set an environment variable and create a file."""
    return (f"import os\nos.environ[{MARK_ENV!r}] = 'ran'\nopen({str(mark_path)!r}, 'w').close()\n"
            "class Marked:\n    pass\n")


class Persistent:
    """Mixin: pickles as persistence.persistent_class objects do, and records the constructor arguments."""

    module_src = "raise SystemExit('module_src must never run')\n"

    def __init__(self, *args, **kwargs):
        super().__init__()
        self._init_args = copy.deepcopy(args)
        self._init_kwargs = copy.deepcopy(kwargs)

    def __reduce__(self):
        fields = list(super().__reduce__())
        fields += [None] * max(3 - len(fields), 0)
        meta = dict(type="class", version=6, module_src=type(self).module_src, class_name=type(self).__name__,
                    state=fields[2])
        return _reconstruct_persistent_obj, (meta,), None


# ----------------------------------------------------------------------------------------
# Writers: torch 1.11's tensor format, numpy 1.x's globals, any global by name
# ----------------------------------------------------------------------------------------

LEGACY_STORAGE_CLASSES = {
    torch.float64: "DoubleStorage", torch.float32: "FloatStorage", torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage", torch.complex128: "ComplexDoubleStorage",
    torch.complex64: "ComplexFloatStorage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage",
}


def storage_bytes(tensor: torch.Tensor) -> bytes:
    """All bytes of the tensor's storage."""
    return bytes(torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage()).numpy().tobytes())


def legacy_storage_blob(tensor: torch.Tensor) -> bytes:
    """The tensor's whole storage as torch 1.11's legacy torch.save of one storage writes it."""
    storage_class = getattr(torch, LEGACY_STORAGE_CLASSES[tensor.dtype])
    numel = tensor.untyped_storage().nbytes() // tensor.element_size()
    key = str(140000000000000 + tensor.untyped_storage().data_ptr() % 100000)  # torch 1.11: the storage's address
    out = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001,
                   dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))):
        pickle.dump(header, out, protocol=2)
    root = object()

    class RootPickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", storage_class, key, "cpu", numel, None) if obj is root else None

    RootPickler(out, protocol=2).dump(root)
    pickle.dump([key], out, protocol=2)
    out.write(struct.pack("<q", numel))
    out.write(storage_bytes(tensor))
    return out.getvalue()


class Global:
    """A global written by name (module, name), whether or not it exists here."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires a reduce function to be callable
        raise AssertionError("never called")


class Call:
    """Pickles as a call ``func(*args)`` (REDUCE); func may itself be a Global or a Call."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __call__(self, *args):  # pickle requires a reduce function to be callable
        raise AssertionError("never called")


class _StorageBlob:
    def __init__(self, tensor):
        self.tensor = tensor


class UpstreamPickler(pickle._Pickler):
    """Pure-Python pickler that writes `Global` and `Call`; with ``legacy=True`` also tensors as torch 1.11
    wrote them and numpy arrays and scalars under numpy 1.x's global names."""

    def __init__(self, file, protocol=4, legacy=True):
        super().__init__(file, protocol=protocol)
        self.legacy = legacy

    def reducer_override(self, obj):
        if isinstance(obj, Global):
            return obj.name
        if isinstance(obj, Call):
            return obj.func, obj.args
        if not self.legacy:
            return NotImplemented
        if isinstance(obj, torch.nn.Parameter):
            return torch._utils._rebuild_parameter, (obj.data, obj.requires_grad, OrderedDict())
        if isinstance(obj, torch.Tensor):
            return torch._utils._rebuild_tensor_v2, (_StorageBlob(obj), obj.storage_offset(), tuple(obj.size()),
                                                     obj.stride(), obj.requires_grad, OrderedDict())
        if isinstance(obj, _StorageBlob):
            return torch.storage._load_from_bytes, (legacy_storage_blob(obj.tensor),)
        if isinstance(obj, np.ndarray) and type(obj) is np.ndarray:
            _, args, state = obj.__reduce__()
            return (Global("numpy.core.multiarray", "_reconstruct"), args, state)
        if isinstance(obj, np.generic):
            _, args = obj.__reduce__()
            return (Global("numpy.core.multiarray", "scalar"), args)
        return NotImplemented

    def save_global(self, obj, name=None):
        if not isinstance(obj, Global):
            return super().save_global(obj, name)
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)


def dump_upstream(obj, *, legacy: bool = True, protocol: int = 4) -> bytes:
    """Pickle `obj` with the stand-in upstream modules installed (legacy: torch 1.11 / numpy 1.x format)."""
    out = io.BytesIO()
    with upstream_modules_installed():
        if legacy:
            UpstreamPickler(out, protocol=protocol).dump(obj)
        else:
            pickle.dump(obj, out, protocol=protocol)
    return out.getvalue()


def dump_calls(obj, protocol: int = 4) -> bytes:
    out = io.BytesIO()
    UpstreamPickler(out, protocol=protocol, legacy=False).dump(obj)
    return out.getvalue()


def assert_bit_exact(actual, expected, name=""):
    assert isinstance(actual, torch.Tensor), name
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    assert actual.stride() == expected.stride() and actual.storage_offset() == expected.storage_offset(), name
    assert actual.device.type == "cpu", name
    actual_bytes = actual.contiguous().reshape(-1).view(torch.uint8)
    expected_bytes = expected.contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(actual_bytes, expected_bytes), name




class PersistentTree:
    """A torch.nn.Module tree pickled as upstream persistent objects of the given class names.

    Each node holds a Module-like ``__dict__`` (``_parameters``, ``_buffers``,
    ``_non_persistent_buffers_set``, ``_modules``, ``training``, ``_init_args``,
    ``_init_kwargs``) plus any user attributes, and pickles as
    ``_reconstruct_persistent_obj(meta)``. `of_module` mirrors a real module's tensors.
    """

    def __init__(self, class_name: str, *, parameters=None, buffers=None, modules=None, non_persistent=(),
                 init_args=(), init_kwargs=None, attributes=None, module_src: Optional[str] = None):
        self.class_name = class_name
        self.module_src = Persistent.module_src if module_src is None else module_src
        self.state = dict(training=False, _parameters=dict(parameters or {}), _buffers=dict(buffers or {}),
                          _non_persistent_buffers_set=set(non_persistent), _modules=dict(modules or {}),
                          _init_args=tuple(init_args), _init_kwargs=copy.deepcopy(dict(init_kwargs or {})))
        self.state.update(attributes or {})

    @classmethod
    def of_module(cls, module: torch.nn.Module) -> "PersistentTree":
        """The module's tree under its class names, with its parameters, buffers and submodules as they are."""
        return cls(type(module).__name__, parameters=module._parameters, buffers=module._buffers,
                   non_persistent=module._non_persistent_buffers_set,
                   modules={name: None if child is None else cls.of_module(child)
                            for name, child in module._modules.items()})

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name,
                    state=self.state)
        return _reconstruct_persistent_obj, (meta,), None


# ----------------------------------------------------------------------------------------
# Portrait4D generators: the FLAME deformer, the reconstructor
# ----------------------------------------------------------------------------------------

def flame_tree(head, drop=()):
    """``deformer`` with ``flame_deform`` holding FLAME's arrays as Portrait4D's checkpoint stores them
    (shapedirs with the expression directions appended, posedirs in the ``[36, 3V]`` layout); the
    entries named in ``drop`` are left out."""
    nv = head.num_vertices
    flame = dict(faces_tensor=head.faces, v_template=head.v_template,
                 shapedirs=torch.cat([head.shapedirs, head.exprdirs], dim=2),
                 posedirs=head.posedirs.reshape(nv * 3, 36).t().contiguous(), J_regressor=head.j_regressor,
                 parents=head.parents, lbs_weights=head.lbs_weights)
    deform = dict(eye_idxs=head.eye_indices, face_idxs=head.face_indices, lips_idxs=head.lips_indices,
                  simplify_idxs=head.companion_indices, simplify_baris=head.companion_weights.double(),
                  simplify_faces=head.companion_faces)
    flame = {k: v.clone() for k, v in flame.items() if k not in drop}
    deform = {k: v.clone() for k, v in deform.items() if k not in drop}
    model = PersistentTree("FLAME", buffers=flame,
                           parameters={"eye_pose": torch.nn.Parameter(torch.zeros(1, 6), requires_grad=False),
                                       "neck_pose": torch.nn.Parameter(torch.zeros(1, 3), requires_grad=False)})
    return PersistentTree("PartDeformer", modules={
        "flame_deform": PersistentTree("FlameDeform", buffers=deform, modules={"flame_model": model})})


def reconstructor_init_kwargs(config, **changes):
    """The constructor arguments Portrait4D's reconstructor training scripts record for a
    head4d ``ReconstructorConfig`` (training settings included, as the released snapshots hold
    them; the rendering arguments are the released ones: 48 + 48 samples), updated by ``changes``."""
    kwargs = dict(
        mot_dims=config.motion_dim,
        deformation_kwargs=UpstreamEasyDict(flame_cfg_path="models/FLAME/cfg.yaml", box_warp=config.box_warp),
        channel_base=32768, channel_max=512, fused_modconv_default="inference_only", flame_full=True,
        has_superresolution=config.has_superresolution, has_background=config.has_background,
        num_blocks_neutral=config.num_blocks_neutral, num_blocks_motion=config.num_blocks_motion,
        motion_map_layers=config.motion_map_layers,
        rendering_kwargs=dict(
            image_resolution=512, disparity_space_sampling=False, clamp_mode="softplus",
            superresolution_module="models.stylegan.superresolution.SuperresolutionHybrid8XDC",
            c_gen_conditioning_zero=False, gpc_reg_prob=0.5, c_scale=1, superresolution_noise_mode="none",
            density_reg=0.25, density_reg_p_dist=0.004, reg_type="l1", decoder_lr_mul=config.decoder_lr_mul,
            sr_antialias=config.sr_antialias, depth_resolution=48, depth_resolution_importance=48,
            ray_start="auto-plane", ray_end="auto-plane", box_warp=config.box_warp, avg_camera_radius=1.0,
            avg_camera_pivot=[0, 0, 0.2]),
        num_fp16_res=0, sr_num_fp16_res=config.sr_num_fp16_res, add_block=False, masked_sampling=0.0,
        sr_kwargs=UpstreamEasyDict(channel_base=config.channel_base, channel_max=config.channel_max,
                                   fused_modconv_default=config.fused_modconv_default, use_ws_ones=False),
        conv_clamp=None)
    kwargs.update(changes)
    return kwargs


RECONSTRUCTOR_NETWORKS = ("encoder_global", "encoder_detail", "encoder_canonical", "generator_triplane",
                          "background", "superresolution", "decoder")


def reconstructor_tree(R, head, kwargs, *, neural_rendering_resolution=128, drop=()):
    """R's networks and ``w_avg`` as the upstream ``TriPlaneReconstructorNeutralize`` record
    (upstream module names), the deformer from ``head`` (`flame_tree`), ``dataset_label_std``,
    the recorded ``init_kwargs`` and the ``rendering_kwargs`` and ``neural_rendering_resolution``
    attributes."""
    modules = {name: None if getattr(R, name) is None else PersistentTree.of_module(getattr(R, name))
               for name in RECONSTRUCTOR_NETWORKS}
    modules["renderer"] = PartDeformImportanceRenderer()
    modules["deformer"] = flame_tree(head, drop)
    return PersistentTree("TriPlaneReconstructorNeutralize", modules=modules,
                          buffers={"w_avg": R.w_avg, "dataset_label_std": torch.rand(437, dtype=torch.float64)},
                          init_kwargs=kwargs,
                          attributes={"rendering_kwargs": kwargs.get("rendering_kwargs"),
                                      "neural_rendering_resolution": neural_rendering_resolution,
                                      "mot_dims": kwargs.get("mot_dims")})
