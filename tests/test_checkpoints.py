"""head4d.checkpoints.read_pickle on network pickles written here in the upstream formats.

No upstream package is needed: the test installs stand-ins for the modules a
StyleGAN / EG3D / Portrait4D snapshot names (``torch_utils.persistence``,
``dnnlib.util``, a renderer class under ``training.``) only while it writes a pickle,
and removes them before reading it back.

- Persistent objects pickle as upstream's ``persistence.persistent_class`` does: a call
  of ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with the meta dict
  (type, version, module_src, class_name, state) and no BUILD step. The stand-in
  reconstruct function does what upstream's does (runs module_src, builds the object),
  so a plain ``pickle.loads`` of the test pickles runs the embedded source: the
  positive control for "read_pickle never runs it".
- Tensors are written two ways: as torch 1.11 wrote them (``_rebuild_tensor_v2`` /
  ``_rebuild_parameter`` around ``_load_from_bytes`` of a legacy storage blob built
  here byte by byte from the format's description, numpy 1.x's ``numpy.core``
  globals), and as the installed torch and numpy write them in a plain ``pickle.dump``.
- The module tree carries upstream names (tests/data/genhead_state_dict_subset.txt);
  its state_dict is checked against torch's own ``state_dict()`` of the tree pickled.
"""
from __future__ import annotations

import copy
import functools
import io
import operator
import os
import pickle
import struct
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from head4d.checkpoints import EasyDict, ObjectRecord, PersistentRecord, UnsafePickleError, read_pickle
from upstream_pickles import (LEGACY_STORAGE_CLASSES, MARK_ENV, Call, Global, PartDeformImportanceRenderer, Persistent,
                              UpstreamEasyDict, UpstreamPickler, fake_module, storage_bytes, upstream_modules_installed,
                              assert_bit_exact, dump_calls, dump_upstream, legacy_storage_blob, marking_source,
                              upstream_modules_loaded)

KEY_LIST = Path(__file__).parent / "data" / "genhead_state_dict_subset.txt"


# ----------------------------------------------------------------------------------------
# Persistent classes with upstream names (networks_stylegan2.py, triplane.py), small
# ----------------------------------------------------------------------------------------
def _resample_filter() -> torch.Tensor:
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    return torch.outer(taps, taps) / 64


class FullyConnectedLayer(Persistent, torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, activation="linear", lr_multiplier=1, bias_init=0):
        super().__init__(in_features, out_features, bias=bias, activation=activation,
                         lr_multiplier=lr_multiplier, bias_init=bias_init)
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / np.sqrt(in_features)  # a numpy float64 attribute
        self.bias_gain = lr_multiplier


class MappingNetwork(Persistent, torch.nn.Module):
    def __init__(self, z_dim, c_dim, w_dim, num_ws, num_layers=2, lr_multiplier=0.01, w_avg_beta=0.998):
        super().__init__(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=num_ws, num_layers=num_layers,
                         lr_multiplier=lr_multiplier, w_avg_beta=w_avg_beta)
        self.num_ws, self.w_avg_beta = num_ws, w_avg_beta
        self.embed = FullyConnectedLayer(c_dim, w_dim)
        features = [z_dim + w_dim] + [w_dim] * num_layers
        for index in range(num_layers):
            layer = FullyConnectedLayer(features[index], features[index + 1], activation="lrelu",
                                        lr_multiplier=lr_multiplier)
            setattr(self, f"fc{index}", layer)
        self.register_buffer("w_avg", torch.randn([w_dim]))


class SynthesisLayer(Persistent, torch.nn.Module):
    def __init__(self, in_channels, out_channels, w_dim, resolution, kernel_size=3):
        super().__init__(in_channels, out_channels, w_dim, resolution, kernel_size=kernel_size)
        self.resolution, self.padding = resolution, kernel_size // 2
        self.act_gain = np.sqrt(2.0)  # numpy float64, as bias_act's def_gain
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.noise_strength = torch.nn.Parameter(torch.randn([]))
        self.bias = torch.nn.Parameter(torch.randn([out_channels]))
        self.register_buffer("resample_filter", _resample_filter())
        self.register_buffer("noise_const", torch.randn([resolution, resolution]))


class ToRGBLayer(Persistent, torch.nn.Module):
    def __init__(self, in_channels, out_channels, w_dim, kernel_size=1):
        super().__init__(in_channels, out_channels, w_dim, kernel_size=kernel_size)
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = torch.nn.Parameter(torch.randn([out_channels]))
        self.weight_gain = 1 / np.sqrt(in_channels * kernel_size ** 2)


class SynthesisBlock(Persistent, torch.nn.Module):
    def __init__(self, in_channels, out_channels, w_dim, resolution, img_channels):
        super().__init__(in_channels, out_channels, w_dim=w_dim, resolution=resolution, img_channels=img_channels)
        self.num_conv, self.num_torgb = 1, 1
        self.const = torch.nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        self.register_buffer("resample_filter", _resample_filter())
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim)


class SynthesisNetwork(Persistent, torch.nn.Module):
    def __init__(self, w_dim, img_resolution, img_channels):
        super().__init__(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels)
        self.block_resolutions = [4]
        self.b4 = SynthesisBlock(0, 512, w_dim, 4, img_channels)


class Generator(Persistent, torch.nn.Module):
    def __init__(self, z_dim, c_dim, w_dim, img_resolution, img_channels, mapping_kwargs=None):
        super().__init__(z_dim, c_dim, w_dim, img_resolution, img_channels, mapping_kwargs=mapping_kwargs)
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels)
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, num_ws=14, **(mapping_kwargs or {}))


class OSGDecoder(Persistent, torch.nn.Module):
    def __init__(self, n_features, options):
        super().__init__(n_features, options)
        self.hidden_dim = 64
        self.net = torch.nn.Sequential(FullyConnectedLayer(n_features, self.hidden_dim), torch.nn.Softplus())
        self.out_sigma = FullyConnectedLayer(self.hidden_dim, 1)
        self.out_rgb = FullyConnectedLayer(self.hidden_dim, options["decoder_output_dim"])


GENHEAD_INIT_KWARGS = dict(
    z_dim=512, w_dim=512, c_dim=325, img_resolution=512, img_channels=3, mapping_kwargs={"num_layers": 2},
    triplane_channels=192, has_superresolution=True, flame_condition=True,
    deformation_kwargs=UpstreamEasyDict(flame_cfg_path="models/FLAME/cfg.yaml", mapping_kwargs={}, box_warp=1.3),
    sr_kwargs=UpstreamEasyDict(channel_base=32768, channel_max=512, fused_modconv_default="inference_only",
                               use_ws_ones=True),
    rendering_kwargs={"clamp_mode": "softplus", "superresolution_noise_mode": "none", "box_warp": 1.0},
)


class PartTriPlaneGeneratorDeform(Persistent, torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.backbone = Generator(kwargs["z_dim"], kwargs["c_dim"], kwargs["w_dim"], 256,
                                  kwargs["triplane_channels"], mapping_kwargs=kwargs["mapping_kwargs"])
        self.renderer = PartDeformImportanceRenderer()
        self.decoder = OSGDecoder(32, {"decoder_output_dim": 32})
        self.rendering_kwargs = kwargs["rendering_kwargs"]
        self.neural_rendering_resolution = 64
        self.face_mask = np.arange(0, 40, 3, dtype=np.int64)    # numpy index arrays, not in the state_dict
        self.lips_mask = np.arange(10) % 3 == 0
        self.register_buffer("scratch", torch.randn(5), persistent=False)  # excluded from state_dict


def build_generator(seed: int) -> PartTriPlaneGeneratorDeform:
    """GenHead's G_ema with random weights, every float given a few special values (bit-exactness)."""
    torch.manual_seed(seed)
    generator = PartTriPlaneGeneratorDeform(**GENHEAD_INIT_KWARGS)
    generator.register_buffer("dataset_label_std", torch.rand(325, dtype=torch.float64))  # registered after init
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, -3.4e38])
    with torch.no_grad():
        for value in generator.state_dict(keep_vars=True).values():
            if value.numel() >= specials.numel():
                value.view(-1)[: specials.numel()] = specials.to(value.dtype)
    return generator.eval().requires_grad_(False)


def read_key_list():
    entries = []
    for line in KEY_LIST.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, rest = line.split(" ", 1)
        shape_text, dtype, kind = rest.rsplit(" ", 2)
        shape = tuple(int(n) for n in shape_text.strip("()").split(",") if n.strip())
        entries.append((name, shape, dtype, kind))
    return entries


def record_holding(root: ObjectRecord, key: str):
    """The record that holds `key` and the key's last part."""
    *path, leaf = key.split(".")
    record = root
    for part in path:
        record = record.state["_modules"][part]
    return record, leaf


# ----------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint():
    """A GenHead training snapshot as the training loop writes it, and the modules it was made of."""
    G, G_ema = build_generator(1), build_generator(2)
    G.backbone.mapping.fc0.weight.requires_grad_(True)  # one parameter still requiring grad
    torch.manual_seed(3)
    D = FullyConnectedLayer(25, 512)
    snapshot = dict(training_set_kwargs=UpstreamEasyDict(path="ffhq512.zip", resolution=512, use_labels=True,
                                                         max_size=None, xflip=False),
                    G=G, D=D, G_ema=G_ema, D_patch=None, augment_pipe=None)
    return snapshot


@pytest.mark.parametrize("writer", ["torch-1.11", "installed-torch"])
def test_checkpoint_state_dicts_names_and_tensors(checkpoint, writer):
    data = dump_upstream(checkpoint, legacy=writer == "torch-1.11")
    assert not upstream_modules_loaded()
    loaded = read_pickle(io.BytesIO(data))
    assert not upstream_modules_loaded(), "reading imported an upstream module"

    assert isinstance(loaded, dict) and set(loaded) == set(checkpoint)
    assert loaded["D_patch"] is None and loaded["augment_pipe"] is None
    for name in ("G", "D", "G_ema"):
        record, module = loaded[name], checkpoint[name]
        assert isinstance(record, PersistentRecord)
        assert record.class_name == type(module).__name__ and record.module_name is None and record.version == 6
        expected = module.state_dict()
        actual = record.state_dict()
        assert list(actual) == list(expected)
        for key, value in expected.items():
            assert_bit_exact(actual[key], value, key)

    G_ema = loaded["G_ema"]
    # The upstream names (and shapes, dtypes, kinds) are all there, in upstream's order.
    entries = read_key_list()
    names = [name for name, *_ in entries]
    state = G_ema.state_dict()
    assert [key for key in state if key in set(names)] == names
    assert set(state) - set(names) == {"dataset_label_std"}
    assert "scratch" not in state and "scratch" in G_ema.state["_buffers"]  # non-persistent buffer left out
    for name, shape, dtype, kind in entries:
        assert tuple(state[name].shape) == shape and str(state[name].dtype) == f"torch.{dtype}", name
        holder, leaf = record_holding(G_ema, name)
        assert leaf in holder.state["_parameters" if kind == "parameter" else "_buffers"], name
    assert list(state)[0] == "dataset_label_std"  # a module's own tensors come before its submodules'


def test_checkpoint_records_attributes_and_init_args(checkpoint):
    loaded = read_pickle(io.BytesIO(dump_upstream(checkpoint)))
    G_ema, original = loaded["G_ema"], checkpoint["G_ema"]

    assert G_ema.init_args == ()
    assert G_ema.init_kwargs == GENHEAD_INIT_KWARGS
    assert isinstance(G_ema.init_kwargs["deformation_kwargs"], EasyDict)
    assert G_ema.init_kwargs["deformation_kwargs"].box_warp == 1.3
    assert isinstance(loaded["training_set_kwargs"], EasyDict)
    assert loaded["training_set_kwargs"] == checkpoint["training_set_kwargs"]
    assert loaded["D"].init_args == (25, 512)
    assert loaded["D"].init_kwargs == dict(bias=True, activation="linear", lr_multiplier=1, bias_init=0)

    # Attributes: plain values, numpy arrays and scalars, nested records by attribute as on a Module.
    assert G_ema.neural_rendering_resolution == 64 and G_ema.rendering_kwargs == original.rendering_kwargs
    for name in ("face_mask", "lips_mask"):
        value = getattr(G_ema, name)
        assert isinstance(value, np.ndarray) and value.dtype == getattr(original, name).dtype
        np.testing.assert_array_equal(value, getattr(original, name))
    conv1 = G_ema.backbone.synthesis.b4.conv1
    assert isinstance(conv1, PersistentRecord) and conv1.class_name == "SynthesisLayer"
    assert conv1.init_args == (512, 512, 512, 4) and conv1.init_kwargs == {"kernel_size": 3}
    assert type(conv1.act_gain) is np.float64 and conv1.act_gain == original.backbone.synthesis.b4.conv1.act_gain
    assert type(conv1.affine.weight_gain) is np.float64
    assert conv1.affine.weight_gain == original.backbone.synthesis.b4.conv1.affine.weight_gain
    assert_bit_exact(conv1.noise_const, original.backbone.synthesis.b4.conv1.noise_const)

    # Plain torch.nn modules and the non-persistent upstream class: inert records of their state.
    net = G_ema.decoder.net
    assert type(net) is ObjectRecord and net.qualified_name == "torch.nn.modules.container.Sequential"
    softplus = net.state["_modules"]["1"]
    assert type(softplus) is ObjectRecord and softplus.class_name == "Softplus"
    assert softplus.beta == 1 and softplus.threshold == 20
    renderer = G_ema.renderer
    assert type(renderer) is ObjectRecord
    assert renderer.qualified_name == "training.volumetric_rendering.renderer.PartDeformImportanceRenderer"
    assert_bit_exact(renderer.plane_axes, original.renderer.plane_axes)
    assert renderer.ray_start == "auto"
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        ObjectRecord("m", "C", state={"x": 1}).state_dict()

    # requires_grad as pickled; parameters come back as parameters.
    G = loaded["G"]
    assert G.backbone.mapping.fc0.weight.requires_grad and isinstance(G.backbone.mapping.fc0.weight, torch.nn.Parameter)
    assert not G.backbone.mapping.fc1.weight.requires_grad

    # A record survives deepcopy as a record.
    copied = copy.deepcopy(conv1)
    assert type(copied) is PersistentRecord and list(copied.state_dict()) == list(conv1.state_dict())


@pytest.mark.parametrize("writer", ["torch-1.11", "installed-torch"])
def test_tensors_of_every_storage_type_and_views_are_bit_exact(writer):
    torch.manual_seed(0)
    base = torch.randn(6, 5, dtype=torch.float64)
    tensors = {str(dtype): (base * 100).to(dtype) for dtype in LEGACY_STORAGE_CLASSES if not dtype.is_complex}
    tensors["complex64"] = torch.randn(4, dtype=torch.complex64)
    tensors["complex128"] = torch.randn(4, dtype=torch.complex128)
    tensors["bool"] = torch.rand(7) > 0.5
    tensors["float32 specials"] = torch.tensor([float("nan"), -0.0, float("inf"), 1e-45], dtype=torch.float32)
    tensors["transposed"] = base.float().t()
    tensors["narrow (offset)"] = base.float()[2:, 1:4]
    tensors["strided"] = base.float()[::2, ::3]
    tensors["0-d"] = torch.tensor(2.5, dtype=torch.float16)
    tensors["empty"] = torch.empty(0, 3)
    tensors["parameter"] = torch.nn.Parameter(torch.randn(3, 2))
    data = dump_upstream(tensors, legacy=writer == "torch-1.11")
    loaded = read_pickle(io.BytesIO(data))
    assert list(loaded) == list(tensors)
    for name, tensor in tensors.items():
        assert_bit_exact(loaded[name], tensor.detach(), name)
    assert isinstance(loaded["parameter"], torch.nn.Parameter) and loaded["parameter"].requires_grad


def test_current_torch_plain_pickle_blob_matches_the_described_format():
    """The installed torch still writes the legacy blob this reader and the test's writer assume."""
    tensor = torch.arange(5, dtype=torch.float32)
    _, (storage, *_) = tensor.__reduce_ex__(2)[:2]
    _, (blob,) = storage.__reduce__()
    stream = io.BytesIO(blob)
    assert [pickle.load(stream) for _ in range(2)] == [0x1950A86A20F9469CFC6C, 1001]
    assert pickle.load(stream)["little_endian"] is True
    assert blob.endswith(struct.pack("<q", 5) + storage_bytes(tensor))
    assert_bit_exact(read_pickle(io.BytesIO(pickle.dumps(tensor))), tensor)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_arrays_scalars_and_easydicts_in_both_numpy_namings(protocol):
    values = UpstreamEasyDict(index=np.array([[3, 1], [4, 1]], dtype=np.int32), mask=np.array([True, False]),
                              fortran=np.asfortranarray(np.arange(6.0).reshape(2, 3)),
                              objects=np.array([1, "a", None], dtype=object), gain=np.float64(0.1), count=np.int64(7),
                              nested=UpstreamEasyDict(a=[np.float32(1.5)], b={"c": (np.uint8(3),)}))
    for legacy in (True, False):
        data = dump_upstream(values, legacy=legacy, protocol=protocol)
        assert (b"numpy.core.multiarray" in data) == legacy and (b"numpy._core.multiarray" in data) != legacy
        loaded = read_pickle(io.BytesIO(data))
        assert isinstance(loaded, EasyDict) and isinstance(loaded.nested, EasyDict)
        for name in ("index", "mask", "fortran", "objects"):
            assert loaded[name].dtype == values[name].dtype
            assert loaded[name].flags.f_contiguous == values[name].flags.f_contiguous
            np.testing.assert_array_equal(loaded[name], values[name])
        assert type(loaded.gain) is np.float64 and loaded.gain == values.gain
        assert type(loaded["count"]) is np.int64 and loaded["count"] == 7
        assert type(loaded.nested.a[0]) is np.float32 and loaded.nested.b["c"][0] == np.uint8(3)


def test_embedded_module_src_never_runs(tmp_path):
    mark = tmp_path / "module_src_ran"

    class Marked(Persistent, torch.nn.Module):
        module_src = marking_source(mark)

        def __init__(self):
            super().__init__(7, option="x")
            self.weight = torch.nn.Parameter(torch.randn(3))

    obj = Marked()
    data = dump_upstream({"G_ema": obj})
    os.environ.pop(MARK_ENV, None)
    # Positive control: a plain unpickle with the upstream module present runs the source and leaves the mark.
    with upstream_modules_installed():
        pickle.loads(data)
    assert mark.exists() and os.environ.pop(MARK_ENV) == "ran"
    mark.unlink()

    loaded = read_pickle(io.BytesIO(data))
    assert not mark.exists() and MARK_ENV not in os.environ
    record = loaded["G_ema"]
    assert record.module_src == Marked.module_src and record.class_name == "Marked"
    assert record.init_args == (7,) and record.init_kwargs == {"option": "x"}
    assert_bit_exact(record.state_dict()["weight"], obj.weight.detach())
    assert not upstream_modules_loaded()


def _malicious_payloads(mark: Path):
    touch = f"touch {mark}"
    return {
        "os.system": (Call(os.system, touch), f"{os.system.__module__}.system"),
        "os.system by its os name": (Call(Global("os", "system"), touch), "os.system"),
        "builtins.eval": (Call(eval, f"open({str(mark)!r}, 'w')"), "builtins.eval"),
        "builtins.exec": (Call(exec, f"open({str(mark)!r}, 'w')"), "builtins.exec"),
        "subprocess.Popen": (Call(subprocess.Popen, ["touch", str(mark)]), "subprocess.Popen"),
        "getattr chain": (Call(Call(getattr, Call(__import__, "os"), "system"), touch), "builtins.getattr"),
        "__import__": (Call(__import__, "os"), "builtins.__import__"),
        "nested in a dict": ({"G_ema": {"state": [1, Call(os.system, touch)]}}, f"{os.system.__module__}.system"),
        "functools.partial": (functools.partial(os.system, touch), "functools.partial"),
        "operator.attrgetter": (Call(operator.attrgetter("system"), Call(Global("os", "path"))),
                                "operator.attrgetter"),
        "importlib": (Call(Global("importlib", "import_module"), "os"), "importlib.import_module"),
        "attribute chain": (Call(Global("torch", "load.__globals__")), "torch.load.__globals__"),
        "unknown function": (Call(Global("some_upstream.helpers", "run"), touch), "some_upstream.helpers.run"),
        "torch.load": (Call(Global("torch", "load"), str(mark)), "torch.load"),
        "copyreg over a refused class": (Call(Global("copyreg", "_reconstructor"),
                                              Global("subprocess", "Popen"), Global("builtins", "object"), None),
                                         "subprocess.Popen"),
    }


@pytest.mark.parametrize("case", sorted(_malicious_payloads(Path("x"))))
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickles_are_refused_naming_the_global(tmp_path, case, protocol):
    mark = tmp_path / "payload_ran"
    payload, global_name = _malicious_payloads(mark)[case]
    data = dump_calls(payload, protocol=protocol)
    with pytest.raises(UnsafePickleError) as refusal:
        read_pickle(io.BytesIO(data))
    assert refusal.value.global_name == global_name
    assert repr(global_name) in str(refusal.value)
    assert not mark.exists()
    assert not upstream_modules_loaded()


def test_malicious_pickle_positive_control(tmp_path):
    """The payloads above are live: a plain unpickle of the os.system one runs it."""
    mark = tmp_path / "payload_ran"
    payload, _ = _malicious_payloads(mark)["os.system"]
    pickle.loads(dump_calls(payload))
    assert mark.exists()


def test_unknown_classes_become_records_in_every_protocol():
    class Settings:
        __module__ = "pytorch3d.renderer.mesh.rasterizer"
        __qualname__ = "RasterizationSettings"

        def __init__(self):
            self.image_size = (64, 64)
            self.blur_radius = 0.0

    names = ("pytorch3d", "pytorch3d.renderer", "pytorch3d.renderer.mesh", "pytorch3d.renderer.mesh.rasterizer")
    modules = {name: fake_module(name) for name in names}
    modules[names[-1]].RasterizationSettings = Settings
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        sys.modules.update(modules)
        try:
            data = pickle.dumps({"settings": Settings()}, protocol=protocol)
        finally:
            for name in names:
                del sys.modules[name]
        record = read_pickle(io.BytesIO(data))["settings"]
        assert type(record) is ObjectRecord, protocol
        assert record.qualified_name == "pytorch3d.renderer.mesh.rasterizer.RasterizationSettings"
        assert record.image_size == (64, 64) and record.blur_radius == 0.0
        assert not upstream_modules_loaded()


def _build_pickle(target, state) -> bytes:
    """A pickle that applies BUILD(state) to `target`."""
    out = io.BytesIO()
    pickler = UpstreamPickler(out, legacy=False)
    pickler.framer.start_framing()
    pickler.write(pickle.PROTO + bytes([4]))
    pickler.save(target)
    pickler.save(state)
    pickler.write(pickle.BUILD + pickle.STOP)
    pickler.framer.end_framing()
    return out.getvalue()


def test_pickle_cannot_set_the_state_of_globals_or_tensors():
    # BUILD applied to an allow-listed function, EasyDict's class, a placeholder class, torch.Size, a tensor.
    tensor = torch.arange(4, dtype=torch.float32)
    storage = Call(torch.storage._load_from_bytes, legacy_storage_blob(tensor))
    tensor_call = Call(torch._utils._rebuild_tensor_v2, storage, 0, (4,), (1,), False, OrderedDict())
    cases = {
        "allow-listed function": (Global("torch._utils", "_rebuild_tensor_v2"), ({"__getattr__": 1}, {"__call__": 1})),
        "EasyDict class": (Global("dnnlib.util", "EasyDict"), ({"__getattr__": 1}, {"__getattr__": 1})),
        "placeholder class": (Global("some_upstream.helpers", "Thing"), ({"__new__": 1}, {"__new__": 1})),
        "torch.Size": (Global("torch", "Size"), ({}, {"__new__": 1})),
        "tensor (legacy set_)": (tensor_call, (tensor_call, 0, (8,), (1,))),
        "tensor (hooks)": (tensor_call, (False, None, OrderedDict(hook=Global("torch._utils", "_rebuild_tensor")))),
    }
    for name, (target, state) in cases.items():
        with pytest.raises(pickle.UnpicklingError, match="may not set the state"):
            read_pickle(io.BytesIO(_build_pickle(target, state)))
    assert EasyDict(a=1).a == 1
    # BUILD on a record is how a pickled object gets its state.
    record = read_pickle(io.BytesIO(_build_pickle(Call(Global("copyreg", "_reconstructor"),
                                                       Global("some_upstream.helpers", "Thing"),
                                                       Global("builtins", "object"), None), {"size": 3})))
    assert type(record) is ObjectRecord and record.size == 3 and record.qualified_name == "some_upstream.helpers.Thing"
    # State that is not a dict (a class with its own __getstate__) is kept as it is; slots go into the state.
    record = read_pickle(io.BytesIO(_build_pickle(Call(Global("copyreg", "__newobj__"),
                                                       Global("some_upstream.helpers", "Thing")), (1, [2.5]))))
    assert record.raw_state == (1, [2.5]) and record.state == {}
    record = read_pickle(io.BytesIO(_build_pickle(Call(Global("copyreg", "__newobj__"),
                                                       Global("some_upstream.helpers", "Thing")), (None, {"a": 1}))))
    assert record.raw_state is None and record.state == {"a": 1}
    # A class of a script's __main__ is a record too (a dunder module is not a dunder attribute chain).
    record = read_pickle(io.BytesIO(dump_calls(Call(Global("copyreg", "__newobj__"), Global("__main__", "Config"), 5))))
    assert type(record) is ObjectRecord and record.qualified_name == "__main__.Config" and record.new_args == (5,)


def test_bad_storage_blobs_and_views_are_refused():
    tensor = torch.arange(4, dtype=torch.float32)
    blob = legacy_storage_blob(tensor)
    cases = {
        "out of bounds": Call(torch._utils._rebuild_tensor_v2, Call(torch.storage._load_from_bytes, blob),
                              0, (5,), (1,), False, OrderedDict()),
        "offset out of bounds": Call(torch._utils._rebuild_tensor_v2, Call(torch.storage._load_from_bytes, blob),
                                     3, (2,), (1,), False, OrderedDict()),
        "truncated blob": Call(torch.storage._load_from_bytes, blob[:-1]),
        "not a blob": Call(torch.storage._load_from_bytes, b"\x80\x02K\x01."),
        "tensor from a non-storage": Call(torch._utils._rebuild_tensor_v2, [1.0], 0, (1,), (1,), False, OrderedDict()),
    }
    for name, payload in cases.items():
        with pytest.raises(pickle.UnpicklingError):
            read_pickle(io.BytesIO(dump_calls(payload)))
    good = Call(torch._utils._rebuild_tensor_v2, Call(torch.storage._load_from_bytes, blob),
                1, (3,), (1,), False, OrderedDict())
    assert_bit_exact(read_pickle(io.BytesIO(dump_calls(good))), tensor[1:])


def test_plain_values_of_allowed_types():
    values = {"size": torch.Size([2, 3]), "device": torch.device("cuda", 1), "dtype": torch.bfloat16,
              "format": torch.channels_last, "layout": torch.strided, "set": {1, 2}, "frozenset": frozenset("ab"),
              "slice": slice(1, None, 2), "complex": 1 - 2j, "range": range(0, 10, 3), "bytes": b"\x00\xff",
              "bytearray": bytearray(b"\x01"), "ordered": OrderedDict(b=1, a=2), "tuple": (None, True, 1.5)}
    for protocol in range(pickle.HIGHEST_PROTOCOL, -1, -1):
        if protocol < 4:  # torch memory formats pickle only from protocol 4 on
            values = {name: value for name, value in values.items() if name != "format"}
        loaded = read_pickle(io.BytesIO(pickle.dumps(values, protocol=protocol)))
        assert loaded == values and [type(v) for v in loaded.values()] == [type(v) for v in values.values()]
        assert list(loaded["ordered"]) == ["b", "a"]


def test_read_pickle_arguments(tmp_path):
    path = tmp_path / "snapshot.pkl"
    path.write_bytes(pickle.dumps({"a": torch.ones(2)}))
    assert torch.equal(read_pickle(path)["a"], torch.ones(2))
    assert torch.equal(read_pickle(str(path))["a"], torch.ones(2))
    with open(path, "rb") as stream:
        assert torch.equal(read_pickle(stream)["a"], torch.ones(2))
    with pytest.raises(TypeError, match="path_or_file"):
        read_pickle(12)
    with open(path, "r", encoding="latin1") as stream, pytest.raises(TypeError, match="path_or_file"):
        read_pickle(stream)
    zipped = tmp_path / "weights.pt"
    torch.save({"a": torch.ones(2)}, zipped)
    with pytest.raises(ValueError, match="torch.save"):
        read_pickle(zipped)
