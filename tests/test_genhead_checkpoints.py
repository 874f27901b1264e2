"""Portrait4D GenHead pickles into ``head4d.models.GenHead`` (``load_network_pkl``) and head4d's own
safetensors format (``GenHead.save`` / ``GenHead.load``).

The pickles are written here in the upstream format (tests/upstream_pickles.py): a small
GenHead's networks as persistent-object trees under the upstream names, the FLAME arrays
Portrait4D keeps under ``deformer.flame_deform`` (taken from the built-in procedural head,
already in Portrait4D's units; posedirs in the transposed ``[36, 3V]`` layout), the
recorded ``init_kwargs``, ``rendering_kwargs`` and ``neural_rendering_resolution``, and
embedded source that would leave a mark if it ever ran.
"""
import io
import os
import pickle

import pytest
import torch

from head4d.checkpoints import load_network_pkl, read_pickle
from head4d.head import FLAME, ProceduralHead
from head4d.models import GenHead, GenHeadConfig
from upstream_pickles import (MARK_ENV, PartDeformImportanceRenderer, PersistentTree, UpstreamEasyDict,
                              assert_bit_exact, dump_upstream, flame_tree, marking_source,
                              upstream_modules_installed, upstream_modules_loaded)

RES = 8  # neural rendering resolution of the small model
#: head4d's own settings (not in an upstream pickle), given to load_network_pkl as overrides.
HEAD4D_ONLY = ("fine_resolution", "coarse_resolution", "mask_resolution")
SMALL = dict(channel_base=256, channel_max=16, triplane_resolution=32, background_resolution=16,
             background_channel_base=128, background_channel_max=16, background_mapping_layers=2,
             depth_resolution=6, depth_resolution_importance=6, neural_rendering_resolution=RES,
             fine_resolution=8, coarse_resolution=4, mask_resolution=32)


def init_kwargs(config: GenHeadConfig, **changes):
    """The upstream constructor arguments for ``config`` (A1 of the generator's recorded arguments)."""
    kwargs = dict(
        c_dim=325, img_resolution=config.img_resolution, img_channels=3, z_dim=config.z_dim, w_dim=config.w_dim,
        mapping_kwargs=UpstreamEasyDict(num_layers=config.mapping_layers), channel_base=config.channel_base,
        channel_max=config.channel_max, triplane_channels=config.triplane_channels,
        triplane_resolution=config.triplane_resolution, num_fp16_res=0, conv_clamp=None,
        fused_modconv_default="inference_only", add_block=False, masked_sampling=0.0,
        has_superresolution=config.has_superresolution, has_background=config.has_background,
        flame_condition=True, flame_full=True, random_combine=False, dynamic_texture=False,
        deformation_kwargs=UpstreamEasyDict(flame_cfg_path="models/FLAME/cfg.yaml", mapping_kwargs={},
                                            box_warp=config.box_warp),
        sr_kwargs=UpstreamEasyDict(channel_base=32768, channel_max=512, fused_modconv_default="inference_only",
                                   use_ws_ones=True),
        sr_num_fp16_res=4,
        rendering_kwargs=dict(
            superresolution_module="models.stylegan.superresolution.SuperresolutionHybrid8XDC",
            c_gen_conditioning_zero=False, c_scale=1, superresolution_noise_mode="none", clamp_mode="softplus",
            sr_antialias=True, decoder_lr_mul=1, density_reg=0.25, density_reg_p_dist=0.004,
            depth_resolution=config.depth_resolution, depth_resolution_importance=config.depth_resolution_importance,
            ray_start="auto-plane", ray_end="auto-plane", box_warp=config.box_warp, decoder_output_dim=32,
            white_back=False))
    kwargs.update(changes)
    return kwargs


def genhead_tree(G, head, kwargs, *, drop=(), module_src=None):
    """G's networks as the upstream ``PartTriPlaneGeneratorDeform`` tree (the deformer from ``head``)."""
    modules = {name: None if getattr(G, name) is None else PersistentTree.of_module(getattr(G, name))
               for name in ("backbone", "background", "superresolution", "decoder")}
    modules["renderer"] = PartDeformImportanceRenderer()
    modules["deformer"] = flame_tree(head, drop)
    tree = PersistentTree("PartTriPlaneGeneratorDeform", modules=modules,
                          buffers={"dataset_label_std": torch.rand(437, dtype=torch.float64)},
                          init_kwargs=kwargs, attributes={"rendering_kwargs": kwargs["rendering_kwargs"],
                                                          "neural_rendering_resolution": RES})
    if module_src is not None:
        stack = [tree]
        while stack:
            node = stack.pop()
            node.module_src = module_src
            stack += [m for m in node.state["_modules"].values() if isinstance(m, PersistentTree)]
    return tree


def randomized(G, seed):
    """Non-zero biases, noise strengths and w_avg, so that every tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(G.named_parameters()) + [(n, b) for n, b in G.named_buffers() if n.endswith("w_avg")]:
            if name.endswith(("bias", "noise_strength", "w_avg")) or name == "decoder.out_sigma.weight":
                t.copy_(0.3 * torch.randn(t.shape, generator=gen) + (1.0 if name.endswith("affine.bias") else 0.0))
    return G.eval()


def snapshot_bytes(G, head, kwargs, *, with_training_copy=False, **tree_args):
    snapshot = dict(training_set_kwargs=UpstreamEasyDict(resolution=512),
                    G_ema=genhead_tree(G, head, kwargs, **tree_args),
                    D=PersistentTree("DualDiscriminatorDeform", init_kwargs={"c_dim": 25}), D_patch=None,
                    augment_pipe=None)
    if with_training_copy:
        snapshot["G"] = genhead_tree(G, head, kwargs, **tree_args)
    return dump_upstream(snapshot)


def camera(n):
    cam2world = torch.eye(4).repeat(n, 1, 1)
    cam2world[:, 2, 3] = 4.0
    focal = 1 / (0.104720 * 1.414)
    intrinsics = torch.tensor([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1.0]]).repeat(n, 1, 1)
    return torch.cat([cam2world.reshape(n, 16), intrinsics.reshape(n, 9)], dim=1)


def run(G, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2, G.config.z_dim, generator=gen)
    codes = G.head_model.canonical_codes(2)
    codes["expression"] = 0.3 * torch.randn(2, 100, generator=gen)
    codes["jaw_pose"] = codes["jaw_pose"] + 0.05 * torch.randn(2, 3, generator=gen)
    with torch.no_grad():
        return G(z, camera(2), codes, truncation_psi=0.7, generator=torch.Generator().manual_seed(seed + 1))


@pytest.fixture(scope="module")
def head():
    return ProceduralHead()


@pytest.fixture(scope="module")
def source(head):
    """A small GenHead without super-resolution (its random weights are what the pickle holds)."""
    torch.manual_seed(0)
    config = GenHeadConfig(**SMALL, has_superresolution=False)
    return randomized(GenHead(config, head), 1)


@pytest.fixture(scope="module")
def loaded(source, head):
    data = snapshot_bytes(source, head, init_kwargs(source.config), with_training_copy=True)
    overrides = {name: getattr(source.config, name) for name in HEAD4D_ONLY}
    with pytest.warns(UserWarning, match=r"init_kwargs\.masked_sampling, rendering_kwargs\.density_reg"):
        return load_network_pkl(io.BytesIO(data), config_overrides=overrides), data


def test_load_network_pkl_config_weights_and_head_model(source, head, loaded):
    out, data = loaded
    G = out["G_ema"]
    assert isinstance(G, GenHead) and not G.training and isinstance(out["G"], GenHead)
    assert out["D"].class_name == "DualDiscriminatorDeform" and out["D_patch"] is None
    assert out["training_set_kwargs"]["resolution"] == 512
    assert G.config == source.config  # recorded, read from the weights' shapes, or overridden
    records = read_pickle(io.BytesIO(data))
    for name in ("G_ema", "G"):
        record = records[name].state_dict()
        state = out[name].state_dict()
        assert list(state) == list(source.state_dict())
        for key, value in state.items():
            assert_bit_exact(value, record[key], key)

    flame = G.head_model
    assert isinstance(flame, FLAME) and flame.has_lips
    for name in ("v_template", "shapedirs", "exprdirs", "posedirs", "j_regressor", "lbs_weights", "faces",
                 "eye_indices", "face_indices", "lips_indices", "companion_indices", "companion_faces",
                 "left_eye_indices", "right_eye_indices", "parents"):
        assert torch.equal(getattr(flame, name), getattr(head, name)), name
    codes = head.canonical_codes(1)
    codes["neck_pose"] = torch.tensor([[0.1, -0.2, 0.05]])
    torch.testing.assert_close(flame(**codes), head(**codes), rtol=0, atol=64 * torch.finfo(torch.float32).eps)


def test_loaded_generator_forward(source, head, loaded):
    """The loaded model runs, and renders what the same networks render with the same FLAME arrays."""
    G = loaded[0]["G_ema"]
    out = run(G)
    assert out["image_raw"].shape == (2, 3, RES, RES) and torch.isfinite(out["image_raw"]).all()
    assert (out["opacity"] >= 0).all() and (out["opacity"] <= 1 + 1e-6).all()
    twin = GenHead(source.config, head_model=G.head_model).eval()
    twin.load_state_dict(source.state_dict())
    expected = run(twin)
    for key in ("image_raw", "image_depth", "opacity", "eye_mask", "mouth_mask"):
        assert torch.equal(out[key], expected[key]), key


def test_superresolution_and_background_shapes_from_the_weights(head):
    torch.manual_seed(2)
    config = GenHeadConfig(**{**SMALL, "background_resolution": 8, "background_channels": 4,
                              "background_channel_max": 8, "background_mapping_layers": 3})
    G = GenHead(config, head)
    kwargs = init_kwargs(config)
    del kwargs["sr_num_fp16_res"]  # missing arguments take the defaults
    with pytest.warns(UserWarning):
        loaded = load_network_pkl(io.BytesIO(snapshot_bytes(G, head, kwargs)))["G_ema"]
    assert loaded.config.sr_num_fp16_res == GenHeadConfig().sr_num_fp16_res
    for name in ("background_resolution", "background_channels", "background_channel_max",
                 "background_mapping_layers"):
        assert getattr(loaded.config, name) == getattr(config, name), name
    expected = G.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert any(key.startswith("superresolution.block1.") for key in expected)


def test_weight_errors_list_the_keys(source, head):
    kwargs = init_kwargs(source.config)
    tree = genhead_tree(source, head, kwargs)
    backbone = tree.state["_modules"]["backbone"].state["_modules"]
    b4 = backbone["synthesis"].state["_modules"]["b4"]
    del b4.state["_parameters"]["const"]
    b4.state["_buffers"]["extra_buffer"] = torch.zeros(3)
    decoder = tree.state["_modules"]["decoder"].state["_modules"]["out_rgb"]
    decoder.state["_parameters"]["weight"] = torch.nn.Parameter(torch.zeros(7, 64), requires_grad=False)
    data = dump_upstream({"G_ema": tree})
    with pytest.warns(UserWarning), pytest.raises(ValueError) as info:
        load_network_pkl(io.BytesIO(data))
    message = str(info.value)
    assert "missing keys: backbone.synthesis.b4.const" in message
    assert "unexpected keys: backbone.synthesis.b4.extra_buffer" in message
    assert "decoder.out_rgb.weight: checkpoint [7, 64], model [32, 64]" in message


def test_missing_flame_arrays_and_unsupported_arguments(source, head):
    kwargs = init_kwargs(source.config)
    data = snapshot_bytes(source, head, kwargs, drop=("lips_idxs", "posedirs"))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"flame_model\.posedirs, .*lips_idxs"):
        load_network_pkl(io.BytesIO(data))
    for change, pattern in (({"c_dim": 25}, "c_dim"), ({"flame_full": False}, "flame_full"),
                            ({"rendering_kwargs": {**kwargs["rendering_kwargs"], "clamp_mode": "relu"}},
                             "clamp_mode")):
        data = snapshot_bytes(source, head, {**kwargs, **change})
        with pytest.raises(ValueError, match=pattern):
            load_network_pkl(io.BytesIO(data))
    with pytest.raises(ValueError, match="PartTriPlaneGeneratorDeform"):
        load_network_pkl(io.BytesIO(dump_upstream({"G_ema": PersistentTree("TriPlaneGenerator")})))
    with pytest.raises(ValueError, match="not a training snapshot|'G_ema'"):
        load_network_pkl(io.BytesIO(dump_upstream({"G": None})))
    data = snapshot_bytes(source, head, kwargs)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"not GenHeadConfig fields: \['mask_size'\]"):
        load_network_pkl(io.BytesIO(data), config_overrides={"mask_size": 32})


def test_embedded_code_never_runs(source, head, tmp_path):
    mark = tmp_path / "ran"
    data = snapshot_bytes(source, head, init_kwargs(source.config), module_src=marking_source(mark))
    os.environ.pop(MARK_ENV, None)
    with pytest.warns(UserWarning):
        G = load_network_pkl(io.BytesIO(data))["G_ema"]
    assert isinstance(G, GenHead)
    assert not mark.exists() and MARK_ENV not in os.environ and not upstream_modules_loaded()
    with upstream_modules_installed(), pytest.raises(KeyError):  # positive control: unpickling runs it
        pickle.loads(data)
    assert mark.exists() and os.environ.pop(MARK_ENV) == "ran"


@pytest.mark.parametrize("kind", ["FLAME", "ProceduralHead"])
def test_safetensors_round_trip_is_bit_exact(source, head, loaded, kind, tmp_path):
    G = loaded[0]["G_ema"] if kind == "FLAME" else source
    G.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    back = GenHead.load(tmp_path)
    assert type(back.head_model).__name__ == kind and back.config == G.config
    assert back.head_model.masks.keys() == G.head_model.masks.keys()
    for (name, value), (name_back, value_back) in zip(
            list(G.named_parameters()) + list(G.named_buffers()),
            list(back.named_parameters()) + list(back.named_buffers())):
        assert name == name_back
        assert_bit_exact(value_back, value, name)
    expected, actual = run(G), run(back)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_load_errors(tmp_path, source):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GenHead.load(tmp_path)
    source.save(tmp_path)
    text = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(text.replace('"depth_resolution":',
                                                       '"unknown_field": 1, "depth_resolution":'))
    with pytest.raises(ValueError, match="unknown_field"):
        GenHead.load(tmp_path)
    (tmp_path / "config.json").write_text(text.replace('"channel_max": 16', '"channel_max": 8'))
    with pytest.raises(ValueError, match="shape mismatches"):
        GenHead.load(tmp_path)


def test_flame_from_arrays_checks_its_arguments(head):
    nv = head.num_vertices
    arrays = dict(v_template=head.v_template, faces=head.faces, posedirs=head.posedirs,
                  shapedirs=torch.cat([head.shapedirs, head.exprdirs], dim=2), j_regressor=head.j_regressor,
                  lbs_weights=head.lbs_weights, parents=head.parents, eye_indices=head.eye_indices,
                  companion_indices=head.companion_indices, companion_weights=head.companion_weights,
                  companion_faces=head.companion_faces)
    flame = FLAME.from_arrays(**arrays)  # posedirs [V, 3, 36] as well as [36, 3V]
    assert torch.equal(flame.posedirs, head.posedirs) and not flame.has_lips
    for change, pattern in (({"shapedirs": head.shapedirs}, rf"shapedirs must have shape \[{nv}, 3, 400\]"),
                            ({"posedirs": head.posedirs[:, :, :30]}, "posedirs must have shape"),
                            ({"j_regressor": head.j_regressor[:4]}, "j_regressor"),
                            ({"eye_indices": head.face_indices[:10]}, "joint 3 .left eye. or 4"),
                            ({"face_indices": head.face_indices[1:]}, "face_indices must be every vertex"),
                            ({"companion_weights": head.companion_weights[:, :2]}, "companion_weights"),
                            ({"v_template": "not numbers"}, "v_template must be")):
        with pytest.raises(ValueError, match=pattern):
            FLAME.from_arrays(**{**arrays, **change})
