"""Portrait4D reconstructor pickles into ``head4d.models.Reconstructor`` (``load_network_pkl``)
and ``head4d.checkpoints.load`` for pickles and head4d directories of either model kind.

The pickles are written here in the upstream format (tests/upstream_pickles.py): a head4d
Reconstructor's networks and ``w_avg`` as the ``TriPlaneReconstructorNeutralize`` record under
the upstream names, the FLAME arrays under ``deformer.flame_deform`` (from the built-in
procedural head), ``dataset_label_std``, and the constructor arguments the training scripts
record. The networks are full width (their sizes are fixed), with one canonicalization and
one re-enactment block instead of four to keep the pickle at ~0.6 GB; the released
snapshots' rendering settings (128 rendering, 48 + 48 samples) are recorded and head4d's
settings for a cheap run (a 64 x 64 source, 8 x 8 rendering, 6 + 6 samples) are given as
``config_overrides``.
"""
import io
import math
import os

import pytest
import torch

from head4d.checkpoints import KINDS, load, load_network_pkl, read_pickle
from head4d.checkpoints._reconstructor import reconstructor_config
from head4d.head import FLAME, ProceduralHead
from head4d.models import GenHead, GenHeadConfig, Reconstructor, ReconstructorConfig

from genhead_testing import randomize
from upstream_pickles import (PersistentTree, UpstreamEasyDict, assert_bit_exact, dump_upstream,
                              reconstructor_init_kwargs, reconstructor_tree)

#: head4d's settings for a cheap run (not in an upstream pickle), given as overrides.
OVERRIDES = {"source_resolution": 64, "neural_rendering_resolution": 8, "depth_resolution": 6,
             "depth_resolution_importance": 6, "fine_resolution": 8, "coarse_resolution": 4}
#: The recorded arguments that head4d does not use, as the warning names them.
IGNORED = r"init_kwargs\.num_fp16_res, init_kwargs\.add_block, init_kwargs\.masked_sampling"


def camera(n):
    """Frontal Portrait4D cameras ``[n, 25]``: 4 units along +z looking at the origin, FOV 12
    degrees, centred principal point."""
    cam2world = torch.eye(4).repeat(n, 1, 1)
    cam2world[:, 2, 3] = 4.0
    focal = 1 / (math.tan(math.radians(12) / 2) * 1.414)
    intrinsics = torch.tensor([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1.0]]).repeat(n, 1, 1)
    return torch.cat([cam2world.reshape(n, 16), intrinsics.reshape(n, 9)], dim=1)


def small_config(**changes):
    return ReconstructorConfig(num_blocks_neutral=1, num_blocks_motion=1, **{**OVERRIDES, **changes})


def build_source(head, seed, **changes):
    """A Reconstructor with random weights, non-zero biases and w_avg, and a density that is
    not ~0 everywhere (so that renders see the planes)."""
    torch.manual_seed(seed)
    R = randomize(Reconstructor(small_config(**changes), head), seed + 1)
    with torch.no_grad():
        R.decoder.out_sigma.bias.fill_(2.0)
    return R.eval()


def snapshot_bytes(R, head, kwargs=None, *, with_training_copy=False, **tree_args):
    kwargs = reconstructor_init_kwargs(R.config) if kwargs is None else kwargs
    snapshot = dict(training_set_kwargs=UpstreamEasyDict(resolution=512),
                    G_ema=reconstructor_tree(R, head, kwargs, **tree_args),
                    D=PersistentTree("DualDiscriminatorDeform", init_kwargs={"c_dim": 25}), augment_pipe=None)
    if with_training_copy:
        snapshot["G"] = reconstructor_tree(R, head, kwargs, **tree_args)
    return dump_upstream(snapshot)


def inputs(R, seed=0):
    gen = torch.Generator().manual_seed(seed)
    side = R.config.source_resolution
    return (torch.rand(1, 3, side, side, generator=gen) * 2 - 1, torch.randn(1, R.motion_dim, generator=gen),
            torch.randn(1, R.motion_dim, generator=gen), camera(1))


def run(R, seed=0, codes=None):
    with torch.no_grad():
        return R(*inputs(R, seed), codes=codes, generator=torch.Generator().manual_seed(seed + 1))


def assert_weights_bit_exact(loaded, source):
    expected = source.state_dict()
    state = loaded.state_dict()
    assert list(state) == list(expected) and "w_avg" in state
    for key, value in state.items():
        assert_bit_exact(value, expected[key], key)


@pytest.fixture(scope="module")
def head():
    return ProceduralHead()


@pytest.fixture(scope="module")
def source(head):
    return build_source(head, 0)


@pytest.fixture(scope="module")
def pickle_bytes(source, head):
    return snapshot_bytes(source, head)


@pytest.fixture(scope="module")
def loaded(pickle_bytes):
    with pytest.warns(UserWarning, match=IGNORED + r".*rendering_kwargs\.density_reg"):
        return load_network_pkl(io.BytesIO(pickle_bytes), config_overrides=OVERRIDES)


def test_reconstructor_pickle_config_weights_and_head_model(source, head, loaded):
    R = loaded["G_ema"]
    assert isinstance(R, Reconstructor) and not R.training
    assert not any(p.requires_grad for p in R.parameters())
    assert loaded["D"].class_name == "DualDiscriminatorDeform" and "G" not in loaded
    assert loaded["training_set_kwargs"]["resolution"] == 512
    assert R.config == source.config  # recorded, or overridden
    assert_weights_bit_exact(R, source)

    flame = R.head_model
    assert isinstance(flame, FLAME) and flame.has_lips
    for name in ("v_template", "shapedirs", "exprdirs", "posedirs", "j_regressor", "lbs_weights", "faces",
                 "eye_indices", "lips_indices", "companion_indices", "companion_faces", "parents"):
        assert torch.equal(getattr(flame, name), getattr(head, name)), name
    codes = head.canonical_codes(1)
    codes["neck_pose"] = torch.tensor([[0.1, -0.2, 0.05]])
    torch.testing.assert_close(flame(**codes), head(**codes), rtol=0, atol=64 * torch.finfo(torch.float32).eps)


def test_recorded_settings_without_overrides(pickle_bytes):
    """The config read from the record alone: the released rendering settings, the recorded
    motion size and block counts (the networks are not built)."""
    record = read_pickle(io.BytesIO(pickle_bytes))["G_ema"]
    with pytest.warns(UserWarning, match=IGNORED):
        config = reconstructor_config(record)
    expected = ReconstructorConfig(num_blocks_neutral=1, num_blocks_motion=1)
    assert config == expected
    assert (config.neural_rendering_resolution, config.depth_resolution, config.box_warp) == (128, 48, 1.3)


def test_loaded_reconstructor_forward(source, head, loaded):
    """The loaded model renders what the source networks render (no neck warp: the head model
    is not used), bit for bit; with FLAME codes its neck warp turns the head."""
    R = loaded["G_ema"]
    out = run(R)
    expected = run(source)
    assert out["image"].shape == (1, 3, 512, 512) and out["image_raw"].shape == (1, 3, 8, 8)
    for key in ("image", "image_raw", "image_depth", "opacity", "image_feature"):
        assert torch.isfinite(out[key]).all(), key
        assert torch.equal(out[key], expected[key]), key
    codes = R.head_model.canonical_codes(1)
    codes["neck_pose"] = torch.tensor([[0.0, 0.4, 0.0]])
    turned = run(R, codes=codes)
    assert torch.isfinite(turned["image_raw"]).all()
    assert (turned["image_raw"] - out["image_raw"]).abs().max() > 1e-3


def test_flame_motion_variant_with_training_copy(head):
    """A FLAME-motion (109) snapshot with ``G`` as well: both become Reconstructors with the
    recorded motion size, weights bit for bit; the re-enacted triplanes are the source's."""
    source = build_source(head, 3, motion_dim=109)
    data = snapshot_bytes(source, head, with_training_copy=True)
    with pytest.warns(UserWarning, match=IGNORED):
        out = load_network_pkl(io.BytesIO(data), config_overrides=OVERRIDES)
    del data
    for name in ("G_ema", "G"):
        R = out[name]
        assert isinstance(R, Reconstructor) and R.motion_dim == 109 and R.config == source.config, name
        assert_weights_bit_exact(R, source)
    R = out.pop("G_ema")
    del out
    image, source_motion, driving_motion, _ = inputs(R, 4)
    with torch.no_grad():
        planes = R.triplanes(R.encode(image, source_motion), driving_motion)
        expected = source.triplanes(source.encode(image, source_motion), driving_motion)
    assert planes.shape == (1, 3, 32, 32, 32) and torch.equal(planes, expected)
    with pytest.raises(ValueError, match=r"driving_motion must have shape \[N, 109\]"):
        R.triplanes(R.encode(image, source_motion), torch.zeros(1, 548))


def test_portrait4d_v2_snapshot_loads_as_the_same_class(source, head):
    """Portrait4D-v2 pickles the same class with the same modules; what its training records
    differently (another density regularization, 128 rendering from the start) is ignored."""
    kwargs = reconstructor_init_kwargs(source.config)
    kwargs["rendering_kwargs"] = {**kwargs["rendering_kwargs"], "reg_type": "G_fix_img", "density_reg": 1}
    # the older module path that upstream renames before building the super-resolution
    kwargs["rendering_kwargs"]["superresolution_module"] = "training.superresolution.SuperresolutionHybrid8XDC"
    data = snapshot_bytes(source, head, kwargs)
    with pytest.warns(UserWarning, match=r"rendering_kwargs\.reg_type"):
        R = load(io.BytesIO(data), kind="Reconstructor")
    assert isinstance(R, Reconstructor) and R.config.neural_rendering_resolution == 128
    assert R.config == ReconstructorConfig(num_blocks_neutral=1, num_blocks_motion=1)
    assert_weights_bit_exact(R, source)


def test_weight_errors_list_the_keys(source, head):
    tree = reconstructor_tree(source, head, reconstructor_init_kwargs(source.config))
    modules = tree.state["_modules"]
    patch_embed = modules["generator_triplane"].state["_modules"]["patch_embed"]
    del patch_embed.state["_modules"]["proj"].state["_parameters"]["weight"]
    modules["encoder_detail"].state["_buffers"]["extra_buffer"] = torch.zeros(3)
    tree.state["_buffers"]["w_avg"] = torch.zeros(256)
    with pytest.warns(UserWarning), pytest.raises(ValueError) as info:
        load_network_pkl(io.BytesIO(dump_upstream({"G_ema": tree})), config_overrides=OVERRIDES)
    message = str(info.value)
    assert "do not fit the Reconstructor" in message
    assert "missing keys: generator_triplane.patch_embed.proj.weight" in message
    assert "unexpected keys: encoder_detail.extra_buffer" in message
    assert "w_avg: checkpoint [256], model [512]" in message


@pytest.mark.parametrize("change, pattern", [
    ({"w_dim": 256}, r"init_kwargs\['w_dim'\] must be 512"),
    ({"flame_full": False}, r"init_kwargs\['flame_full'\] must be True"),
    ({"has_superresolution": False}, r"init_kwargs\['has_superresolution'\] must be True"),
    ({"sr_kwargs": UpstreamEasyDict(use_ws_ones=True)}, r"sr_kwargs\['use_ws_ones'\] must be False"),
    ({"rendering": {"superresolution_noise_mode": "random"}}, "superresolution_noise_mode"),
    ({"rendering": {"superresolution_module": "models.stylegan.superresolution.SuperresolutionHybrid4X"}},
     "superresolution_module"),
    ({"rendering": {"clamp_mode": "relu"}}, "clamp_mode"),
    ({"deformation_kwargs": UpstreamEasyDict(box_warp=1.2)}, "deformation_kwargs\\['box_warp'\\] \\(1.2\\) differ"),
])
def test_unsupported_arguments_are_named(change, pattern):
    """Refused before any network is built (the record holds no weights)."""
    kwargs = reconstructor_init_kwargs(small_config())
    change = dict(change)
    rendering = change.pop("rendering", None)
    if rendering:
        kwargs["rendering_kwargs"] = {**kwargs["rendering_kwargs"], **rendering}
    kwargs.update(change)
    record = PersistentTree("TriPlaneReconstructorNeutralize", init_kwargs=kwargs)
    with pytest.raises(ValueError, match=pattern):
        load_network_pkl(io.BytesIO(dump_upstream({"G_ema": record})))


def test_other_classes_and_kinds_are_refused(source, head, pickle_bytes, tmp_path):
    # a class head4d does not load: the message names the ones it does
    data = dump_upstream({"G_ema": PersistentTree("TriPlaneGenerator")})
    for reader in (load_network_pkl, load):
        with pytest.raises(ValueError, match=r"G_ema is a pickled TriPlaneGenerator; head4d loads the generator "
                                             r"classes PartTriPlaneGeneratorDeform \(as GenHead\), "
                                             r"TriPlaneReconstructorNeutralize \(as Reconstructor\)"):
            reader(io.BytesIO(data))
    # a reconstructor pickle where a GenHead is wanted (refused before anything is built)
    path = tmp_path / "portrait4d.pkl"
    path.write_bytes(pickle_bytes)
    with pytest.raises(ValueError, match=r"is a Reconstructor checkpoint \(a pickled TriPlaneReconstructorNeutralize"
                                         r"\), but a GenHead is needed here \(kind='GenHead'\)"):
        load(path, kind="GenHead")
    # head4d directories of either kind
    genhead = GenHead(GenHeadConfig(channel_base=256, channel_max=16, triplane_resolution=32,
                                    background_resolution=16, background_channel_base=128,
                                    background_channel_max=16, background_mapping_layers=2,
                                    has_superresolution=False), head).eval()
    genhead_dir, reconstructor_dir = tmp_path / "genhead", tmp_path / "reconstructor"
    genhead.save(genhead_dir)
    with pytest.raises(ValueError, match=r"is a GenHead checkpoint \(format 'head4d.GenHead'\), but a "
                                         r"Reconstructor is needed here \(kind='Reconstructor'\)"):
        load(genhead_dir, kind="Reconstructor")
    back = load(str(genhead_dir), kind="GenHead")
    assert isinstance(back, GenHead) and back.config == genhead.config
    source.save(reconstructor_dir)
    with pytest.raises(ValueError, match=r"is a Reconstructor checkpoint \(format 'head4d.Reconstructor'\), but a "
                                         r"GenHead is needed here"):
        load(reconstructor_dir, kind="GenHead")
    # arguments
    assert KINDS == ("GenHead", "Reconstructor")
    with pytest.raises(ValueError, match=r"kind must be None or one of \['GenHead', 'Reconstructor'\], got 'G'"):
        load(path, kind="G")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load(tmp_path / "missing.pkl")
    os.remove(reconstructor_dir / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(reconstructor_dir)
