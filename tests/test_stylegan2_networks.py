"""``head4d.nn`` StyleGAN2 networks (GenHead's backbone, background and super-resolution).

- Upstream compatibility: the three networks built with GenHead's arguments have the
  upstream state-dict keys (order included), shapes, dtypes and parameter counts, listed
  in ``tests/data/genhead_state_dict.txt``.
- Values: every layer, block and network against an independent composition written
  here in float64 from plain torch ops (explicit equalized-lr scaling, per-sample
  modulation and demodulation, ``F.conv2d`` / ``F.conv_transpose2d``, zero insertion and an
  explicit 4 x 4 FIR filter, leaky ReLU, clamp), with random weights, non-zero biases,
  noise strengths and noise buffers. Layers run in float64 (``module.double()``) and must
  agree to float64 rounding; the networks compute in float32 (as upstream: the mapping
  and the synthesis cast to float32) and must agree to float32 rounding.
- Mapping truncation and ``w_avg`` updates, the three noise modes, fused and non-fused
  modulated convolutions, the FP16 switch (off on the CPU), gradients to every
  parameter, head4d's compiled kernels against the ``torch`` backend, argument errors.

Small shapes: img_resolution 32, 4-16 channels; the super-resolution (whose sizes are
fixed: 128 -> 512) with its two blocks replaced by narrow ones of the same resolutions.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import head4d.nn as hnn
from head4d.nn import stylegan2 as sg2

from conftest import require_backend
from genhead_testing import randomize, upstream_sections

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
SQRT2 = math.sqrt(2.0)
FIR_TAPS = (1.0, 3.0, 3.0, 1.0)

# Tolerances (norm-wise relative error), eps of the computing dtype times a factor.
# Each layer rounds its sums of at most ~150 products (3 x 3 x 16 inputs) about once
# per term, which averages to ~eps relative per layer (demodulation renormalizes, so
# nothing grows); a network stacks ~10 such layers and the mapping's 2-8. 64 eps covers
# that with a wide margin (measured: under 1 eps64 for the float64 layers; 1-4 eps32 for
# the float32 networks, the super-resolution and the kernels-vs-torch comparison).
TOL64 = 64 * EPS64
TOL32 = 64 * EPS32


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------------
# the independent composition, float64
# ----------------------------------------------------------------------------------

def P(t):
    return t.detach().double()


def r_lrelu(x, gain=1.0, clamp=None):
    y = torch.where(x >= 0, x, 0.2 * x) * (SQRT2 * gain)
    return y if clamp is None else y.clamp(-clamp * gain, clamp * gain)


def r_fc(layer, x):
    """Equalized lr: w = stored * lr / sqrt(in), b = stored * lr."""
    lr = layer.bias_gain
    y = x @ (P(layer.weight) * (lr / math.sqrt(layer.in_features))).T
    if layer.bias is not None:
        y = y + P(layer.bias) * lr
    assert layer.activation in ("linear", "lrelu")
    return y if layer.activation == "linear" else r_lrelu(y)


def r_fir(x, taps=FIR_TAPS, gain=1.0):
    """Depthwise 'valid' filtering with the normalized outer product of ``taps`` (symmetric,
    so convolution and correlation agree) times ``gain``."""
    t = torch.tensor(taps, dtype=torch.float64)
    f = torch.outer(t, t) / t.sum() ** 2 * gain
    c = x.shape[1]
    return F.conv2d(x, f[None, None].expand(c, 1, *f.shape), groups=c)


def r_zero_insert(x):
    n, c, h, w = x.shape
    y = torch.zeros(n, c, 2 * h, 2 * w, dtype=x.dtype)
    y[:, :, ::2, ::2] = x
    return y


def r_upsample(x):
    """StyleGAN2's upsample2d with the 4-tap filter: zero insertion, pad 2 before and
    1 after, the filter times 4."""
    return r_fir(F.pad(r_zero_insert(x), [2, 1, 2, 1]), gain=4.0)


def r_modconv(x, weight, styles, demodulate, up=1, noise=None):
    """One sample at a time: w_n = weight * s_n (input channels), divided per output
    channel by sqrt(sum w_n^2 + 1e-8) when demodulating; 3x3 'same' conv, or for up=2
    a stride-2 transposed conv, pad 1 and the 4x4 filter times 4; then + noise."""
    outputs = []
    k = weight.shape[-1]
    for n in range(x.shape[0]):
        w = weight * styles[n][None, :, None, None]
        if demodulate:
            w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        xn = x[n:n + 1]
        if up == 1:
            outputs.append(F.conv2d(xn, w, padding=k // 2))
        else:
            y = F.conv_transpose2d(xn, w.transpose(0, 1), stride=2)
            outputs.append(r_fir(F.pad(y, [1, 1, 1, 1]), gain=4.0))
    y = torch.cat(outputs)
    return y if noise is None else y + noise


def r_synthesis_layer(layer, x, w, noise_mode, gain=1.0):
    styles = r_fc(layer.affine, w)
    noise = None
    if noise_mode == "random":  # the same draw as the layer's (same seed, same order)
        # float32 noise times the strength stays float32 (a 0-dim strength does not
        # promote it, even a float64 one), as in the layer and upstream
        noise = torch.randn([x.shape[0], 1, layer.resolution, layer.resolution])
        noise = (noise * layer.noise_strength.detach().float()).double()
    elif noise_mode == "const":
        noise = P(layer.noise_const) * P(layer.noise_strength)
    y = r_modconv(x, P(layer.weight), styles, True, up=layer.up, noise=noise)
    return r_lrelu(y + P(layer.bias)[None, :, None, None], gain, layer.conv_clamp)


def r_torgb(layer, x, w):
    styles = r_fc(layer.affine, w) / math.sqrt(layer.in_channels * layer.weight.shape[-1] ** 2)
    y = r_modconv(x, P(layer.weight), styles, False) + P(layer.bias)[None, :, None, None]
    return y if layer.conv_clamp is None else y.clamp(-layer.conv_clamp, layer.conv_clamp)


def r_skip(layer, x, gain):
    """The 'resnet' skip: 4-tap upsampling, then a bias-free linear 1x1 conv."""
    w = P(layer.weight) / math.sqrt(layer.in_channels)
    return F.conv2d(r_upsample(x), w) * gain


def r_block(block, x, img, ws, noise_mode):
    ws = ws.double()
    if block.in_channels == 0:
        x = P(block.const)[None].repeat(ws.shape[0], 1, 1, 1)
        x = r_synthesis_layer(block.conv1, x, ws[:, 0], noise_mode)
        used = 1
    elif block.architecture == "resnet":
        x = x.double()
        y = r_skip(block.skip, x, math.sqrt(0.5))
        x = r_synthesis_layer(block.conv0, x, ws[:, 0], noise_mode)
        x = y + r_synthesis_layer(block.conv1, x, ws[:, 1], noise_mode, gain=math.sqrt(0.5))
        used = 2
    else:
        x = r_synthesis_layer(block.conv0, x.double(), ws[:, 0], noise_mode)
        x = r_synthesis_layer(block.conv1, x, ws[:, 1], noise_mode)
        used = 2
    if img is not None:
        img = r_upsample(img.double())
    if hasattr(block, "torgb"):
        y = r_torgb(block.torgb, x, ws[:, used])
        img = y if img is None else img + y
    return x, img


def r_synthesis(net, ws, noise_mode):
    x = img = None
    start = 0
    for res in net.block_resolutions:
        block = getattr(net, f"b{res}")
        x, img = r_block(block, x, img, ws[:, start:start + block.num_conv + block.num_torgb], noise_mode)
        start += block.num_conv
    return img


def r_normalize(x):
    return x / (x.square().mean(dim=1, keepdim=True) + 1e-8).sqrt()


def r_mapping(net, z, c, psi=1.0, cutoff=None):
    parts = []
    if net.z_dim > 0:
        parts.append(r_normalize(z.double()))
    if net.c_dim > 0:
        parts.append(r_normalize(r_fc(net.embed, c.double())))
    x = torch.cat(parts, dim=1)
    for i in range(net.num_layers):
        x = r_fc(getattr(net, f"fc{i}"), x)
    ws = x[:, None].repeat(1, net.num_ws, 1)
    if psi != 1:
        avg = P(net.w_avg)
        cut = net.num_ws if cutoff is None else cutoff
        ws[:, :cut] = avg + psi * (ws[:, :cut] - avg)
    return ws


# ----------------------------------------------------------------------------------
# fixtures: small networks
# ----------------------------------------------------------------------------------

def small_generator(seed=0, c_dim=5, **kwargs):
    """img_resolution 32, channels 16 / 16 / 16 / 8 (b4-b32), 6 image channels."""
    torch.manual_seed(seed)
    args = dict(channel_base=256, channel_max=16, num_fp16_res=0, conv_clamp=None)
    args.update(kwargs)
    g = hnn.Generator(z_dim=12, c_dim=c_dim, w_dim=16, img_resolution=32, img_channels=6,
                      mapping_kwargs={"num_layers": 2}, **args)
    return randomize(g, seed + 100)


def small_sr(seed=0, use_ws_ones=True, sr_antialias=True, channels=6):
    """The super-resolution as GenHead builds it, its two blocks then replaced by narrow
    ones (8 and 4 channels) of the upstream resolutions (256, 512) and settings."""
    torch.manual_seed(seed)
    sr = hnn.SuperresolutionHybrid8XDC(channels=channels, img_resolution=512, sr_num_fp16_res=4,
                                       sr_antialias=sr_antialias, use_ws_ones=use_ws_ones,
                                       fused_modconv_default="inference_only")
    sr.block0 = hnn.SynthesisBlock(channels, 8, w_dim=512, resolution=256, img_channels=3, is_last=False,
                                   use_fp16=True, conv_clamp=256, fused_modconv_default="inference_only")
    sr.block1 = hnn.SynthesisBlock(8, 4, w_dim=512, resolution=512, img_channels=3, is_last=True,
                                   use_fp16=True, conv_clamp=256, fused_modconv_default="inference_only")
    return randomize(sr, seed + 100)


# ----------------------------------------------------------------------------------
# upstream names, shapes and parameter counts
# ----------------------------------------------------------------------------------

def genhead_networks():
    backbone = hnn.Generator(512, 325, 512, img_resolution=256, img_channels=192, mapping_kwargs={"num_layers": 2},
                             channel_base=32768, channel_max=512, num_fp16_res=0, conv_clamp=None,
                             fused_modconv_default="inference_only")
    background = hnn.Generator(512, 0, 512, img_resolution=64, mapping_kwargs={"num_layers": 8},
                               channel_base=16384, img_channels=32)
    superresolution = hnn.SuperresolutionHybrid8XDC(channels=32, img_resolution=512, sr_num_fp16_res=4,
                                                    sr_antialias=True, channel_base=32768, channel_max=512,
                                                    fused_modconv_default="inference_only", use_ws_ones=True)
    return {"backbone": backbone, "background": background, "superresolution": superresolution}


def test_state_dicts_match_upstream():
    sections = upstream_sections(strip_prefix=True)
    networks = genhead_networks()
    assert set(sections) == set(networks)
    for key, net in networks.items():
        num_keys, num_params, entries = sections[key]
        mine = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in net.state_dict().items()]
        assert len(entries) == num_keys
        assert mine == entries, f"{key}: differs from upstream: {sorted(set(mine) ^ set(entries))[:8]}"
        assert sum(p.numel() for p in net.parameters()) == num_params
    assert networks["backbone"].num_ws == 14 and networks["background"].num_ws == 10
    bg = networks["background"].synthesis
    assert [getattr(bg, f"b{r}").use_fp16 for r in bg.block_resolutions] == [False, True, True, True, True]
    assert networks["superresolution"].block0.use_fp16 and networks["superresolution"].block1.use_fp16
    # an upstream state dict (here: another instance's) loads strictly
    other = genhead_networks()["backbone"]
    other.load_state_dict(networks["backbone"].state_dict(), strict=True)


# ----------------------------------------------------------------------------------
# layers, float64 against the composition
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("activation,lr,bias", [("linear", 1.0, True), ("lrelu", 0.01, True), ("linear", 0.5, False),
                                                ("lrelu", 1.0, False)])
def test_fully_connected_layer(activation, lr, bias):
    torch.manual_seed(0)
    layer = hnn.FullyConnectedLayer(24, 10, bias=bias, activation=activation, lr_multiplier=lr, bias_init=0.5)
    assert torch.allclose(layer.weight.std() * lr, torch.tensor(1.0), atol=0.15)
    randomize(layer).double()
    x = torch.randn(7, 24, dtype=torch.float64)
    assert rel_err(layer(x), r_fc(layer, x)) < TOL64


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("noise_mode", ["random", "const", "none"])
@pytest.mark.parametrize("fused", [True, False])
def test_synthesis_layer(up, noise_mode, fused):
    torch.manual_seed(1)
    layer = randomize(hnn.SynthesisLayer(5, 7, w_dim=16, resolution=8, up=up, conv_clamp=0.8)).double()
    x = torch.randn(3, 5, 8 // up, 8 // up, dtype=torch.float64)
    w = torch.randn(3, 16, dtype=torch.float64)
    torch.manual_seed(7)
    y = layer(x, w, noise_mode=noise_mode, fused_modconv=fused, gain=1.3)
    torch.manual_seed(7)
    ref = r_synthesis_layer(layer, x, w, noise_mode, gain=1.3)
    assert y.shape == (3, 7, 8, 8) and y.dtype == torch.float64
    assert rel_err(y, ref) < TOL64
    assert (y.abs() >= 0.8 * 1.3 * (1 - 1e-12)).any()  # the clamp is exercised
    if noise_mode != "none":  # the noise matters
        assert rel_err(ref, r_synthesis_layer(layer, x, w, "none", gain=1.3)) > 1e-3


@pytest.mark.parametrize("fused", [True, False])
def test_torgb_layer(fused):
    torch.manual_seed(2)
    layer = randomize(hnn.ToRGBLayer(9, 4, w_dim=16, conv_clamp=0.5)).double()
    x = torch.randn(2, 9, 6, 6, dtype=torch.float64)
    w = torch.randn(2, 16, dtype=torch.float64)
    y = layer(x, w, fused_modconv=fused)
    assert rel_err(y, r_torgb(layer, x, w)) < TOL64
    assert y.abs().max() == 0.5


@pytest.mark.parametrize("architecture", ["orig", "skip", "resnet"])
@pytest.mark.parametrize("first", [True, False])
def test_synthesis_block(architecture, first):
    """A block computes in float32 (FP32 block): against the float64 composition."""
    torch.manual_seed(3)
    in_channels = 0 if first else 6
    block = hnn.SynthesisBlock(in_channels, 5, w_dim=16, resolution=8, img_channels=3, is_last=False,
                               architecture=architecture, conv_clamp=None)
    block = randomize(block)
    n_ws = block.num_conv + block.num_torgb
    assert (block.num_conv, block.num_torgb) == (1 if first else 2, 1 if architecture == "skip" else 0)
    assert hasattr(block, "skip") == (architecture == "resnet" and not first)
    x = None if first else torch.randn(2, 6, 4, 4)
    img = torch.randn(2, 3, 4, 4)
    ws = torch.randn(2, n_ws, 16)
    torch.manual_seed(5)
    y, out_img = block(x, img, ws, noise_mode="random")
    torch.manual_seed(5)
    ref_x, ref_img = r_block(block, x, img, ws, "random")
    assert y.dtype == out_img.dtype == torch.float32 and y.shape == (2, 5, 8, 8) and out_img.shape == (2, 3, 8, 8)
    assert rel_err(y, ref_x) < TOL32 and rel_err(out_img, ref_img) < TOL32


# ----------------------------------------------------------------------------------
# networks, float32 against the float64 composition
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("noise_mode", ["const", "random"])
def test_generator_against_composition(noise_mode):
    g = small_generator(conv_clamp=4.0)  # a clamp within the values' range
    z, c = torch.randn(2, 12), torch.randn(2, 5)
    torch.manual_seed(11)
    img = g(z, c, noise_mode=noise_mode)
    torch.manual_seed(11)
    ref = r_synthesis(g.synthesis, r_mapping(g.mapping, z, c), noise_mode)
    assert img.shape == (2, 6, 32, 32) and img.dtype == torch.float32
    assert rel_err(img, ref) < TOL32
    assert g.num_ws == 1 + 3 * 2 + 1


def test_unconditional_generator_and_background_defaults():
    """The background's configuration in small: no condition (no ``embed``), 8 mapping
    layers, conv_clamp 256 and FP16 blocks (float32 on the CPU)."""
    torch.manual_seed(4)
    g = randomize(hnn.Generator(z_dim=12, c_dim=0, w_dim=16, img_resolution=16, img_channels=4,
                                mapping_kwargs={"num_layers": 8}, channel_base=128, channel_max=8))
    assert not hasattr(g.mapping, "embed") and g.synthesis.b16.use_fp16 and g.synthesis.b16.conv1.conv_clamp == 256
    z = torch.randn(3, 12)
    img = g(z, None, noise_mode="const")
    ref = r_synthesis(g.synthesis, r_mapping(g.mapping, z, None), "const")
    assert img.dtype == torch.float32 and rel_err(img, ref) < TOL32


def test_noise_modes_differ_and_none_is_deterministic():
    g = small_generator()
    ws = g.mapping(torch.randn(2, 12), torch.randn(2, 5))
    a = g.synthesis(ws, noise_mode="random")
    b = g.synthesis(ws, noise_mode="random")
    const = g.synthesis(ws, noise_mode="const")
    none = g.synthesis(ws, noise_mode="none")
    assert rel_err(a, b) > 1e-3 and rel_err(const, none) > 1e-3
    assert torch.equal(const, g.synthesis(ws, noise_mode="const"))
    torch.manual_seed(0)
    ref_none = r_synthesis(g.synthesis, ws, "none")
    assert rel_err(none, ref_none) < TOL32


def test_mapping_truncation():
    g = small_generator()
    z, c = torch.randn(4, 12), torch.randn(4, 5)
    for psi, cutoff in [(0.7, None), (0.5, 3), (0.0, 8), (1.5, 1)]:
        ws = g.mapping(z, c, truncation_psi=psi, truncation_cutoff=cutoff)
        assert ws.shape == (4, 8, 16) and ws.dtype == torch.float32
        assert rel_err(ws, r_mapping(g.mapping, z, c, psi, cutoff)) < TOL32
    full = g.mapping(z, c)
    cut = g.mapping(z, c, truncation_psi=0.5, truncation_cutoff=3)
    assert torch.equal(cut[:, 3:], full[:, 3:]) and not torch.allclose(cut[:, :3], full[:, :3])
    zero = g.mapping(z, c, truncation_psi=0.0)
    assert torch.allclose(zero, g.mapping.w_avg.expand_as(zero))
    # the generator hands truncation to its mapping
    torch.manual_seed(0)
    img = g(z, c, truncation_psi=0.5, truncation_cutoff=3, noise_mode="none")
    assert torch.equal(img, g.synthesis(cut, noise_mode="none"))


def test_w_avg_update():
    g = small_generator()
    z, c = torch.randn(6, 12), torch.randn(6, 5)
    before = g.mapping.w_avg.clone()
    g.train()
    g.mapping(z, c)  # no update without update_emas (training mode or not)
    assert torch.equal(g.mapping.w_avg, before)
    img = g(z, c, update_emas=True, noise_mode="none")
    mean = r_mapping(g.mapping, z, c)[:, 0].mean(dim=0)
    expected = before.double() * 0.998 + mean * 0.002
    assert rel_err(g.mapping.w_avg, expected) < TOL32 and img.shape == (6, 6, 32, 32)
    g.mapping.w_avg_beta = 0.5
    g.eval()
    after = g.mapping.w_avg.clone()
    g.mapping(z, c, update_emas=True)
    assert rel_err(g.mapping.w_avg, 0.5 * after.double() + 0.5 * mean) < TOL32


def test_fused_modconv_forms_and_inference_only(monkeypatch):
    g = small_generator(fused_modconv_default="inference_only")
    ws = g.mapping(torch.randn(2, 12), torch.randn(2, 5))
    calls = []
    original = sg2._ops.modulated_conv2d

    def spy(*args, **kwargs):
        calls.append(kwargs["fused_modconv"])
        return original(*args, **kwargs)

    monkeypatch.setattr(sg2._ops, "modulated_conv2d", spy)
    g.eval()
    fused = g.synthesis(ws, noise_mode="const")
    assert calls and all(calls)
    calls.clear()
    g.train()
    unfused = g.synthesis(ws, noise_mode="const")
    assert calls and not any(calls)
    calls.clear()
    explicit = g.synthesis(ws, noise_mode="const", fused_modconv=True)
    assert calls and all(calls)
    assert rel_err(fused, unfused) < TOL32 and rel_err(explicit, fused) < TOL32


def test_fp16_blocks_run_float32_off_cuda():
    """FP16 is for CUDA only: on the CPU an FP16 network gives the FP32 network's values
    exactly (same weights), in float32."""
    fp16 = small_generator(num_fp16_res=3)
    fp32 = small_generator(num_fp16_res=0)
    fp32.load_state_dict(fp16.state_dict())
    assert [getattr(fp16.synthesis, f"b{r}").use_fp16 for r in (4, 8, 16, 32)] == [False, True, True, True]
    ws = fp16.mapping(torch.randn(2, 12), torch.randn(2, 5))
    for force_fp32 in (False, True):
        img = fp16.synthesis(ws, noise_mode="const", force_fp32=force_fp32)
        assert img.dtype == torch.float32 and torch.equal(img, fp32.synthesis(ws, noise_mode="const"))
    x, _ = fp16.synthesis.b8(torch.randn(2, 16, 4, 4), None, ws[:, 1:4])
    assert x.dtype == torch.float32


# ----------------------------------------------------------------------------------
# super-resolution
# ----------------------------------------------------------------------------------

def r_superresolution(sr, rgb, x, ws, ws_super=None):
    source = ws[:, -1:] if ws_super is None else ws_super.reshape(ws.shape[0], 1, -1)
    block_ws = torch.ones(ws.shape[0], 3, 512) if sr.use_ws_ones else source.repeat(1, 3, 1)
    if x.shape[-1] != 128:
        x = F.interpolate(x.double(), size=(128, 128), mode="bilinear", align_corners=False,
                          antialias=sr.sr_antialias)
        rgb = F.interpolate(rgb.double(), size=(128, 128), mode="bilinear", align_corners=False,
                            antialias=sr.sr_antialias)
    x, rgb = r_block(sr.block0, x, rgb, block_ws, "none")
    x, rgb = r_block(sr.block1, x, rgb, block_ws, "none")
    return rgb


@pytest.mark.parametrize("use_ws_ones,size", [(True, 64), (False, 128)])
def test_superresolution_against_composition(use_ws_ones, size):
    sr = small_sr(use_ws_ones=use_ws_ones).eval()
    feats = torch.randn(2, 6, size, size)
    rgb = feats[:, :3]
    ws = torch.randn(2, 14, 512)
    out = sr(rgb, feats, ws, noise_mode="none")
    assert out.shape == (2, 3, 512, 512) and out.dtype == torch.float32
    assert rel_err(out, r_superresolution(sr, rgb, feats, ws)) < TOL32
    other_ws = torch.randn(2, 14, 512)
    changed = sr(rgb, feats, other_ws, noise_mode="none")
    if use_ws_ones:  # unconditional: the ws are not read
        assert torch.equal(out, changed)
    else:
        assert rel_err(changed, out) > 1e-3
        ws_super = torch.randn(2, 512)
        out_super = sr(rgb, feats, ws, ws_super=ws_super, noise_mode="none")
        assert rel_err(out_super, r_superresolution(sr, rgb, feats, ws, ws_super)) < TOL32


def test_superresolution_antialias_matters():
    """Antialiasing changes a downsizing resize (256 -> 128); GenHead's 64 -> 128 is an
    upsizing one, where the antialiased bilinear filter is the plain one."""
    feats = torch.randn(1, 6, 256, 256)
    ws = torch.randn(1, 14, 512)
    a = small_sr(sr_antialias=True).eval()(feats[:, :3], feats, ws, noise_mode="none")
    b = small_sr(sr_antialias=False).eval()(feats[:, :3], feats, ws, noise_mode="none")
    assert rel_err(a, b) > 1e-4
    ref = r_superresolution(small_sr(sr_antialias=True), feats[:, :3], feats, ws)
    assert rel_err(a, ref) < TOL32


# ----------------------------------------------------------------------------------
# gradients, backends, errors
# ----------------------------------------------------------------------------------

def test_gradients_reach_every_parameter():
    """Through a generator and two super-resolution-shaped blocks (w size 16) fed by it."""
    g = small_generator(conv_clamp=None).train()
    torch.manual_seed(9)
    sr = torch.nn.ModuleDict({
        "block0": hnn.SynthesisBlock(6, 8, w_dim=16, resolution=256, img_channels=3, is_last=False, conv_clamp=None),
        "block1": hnn.SynthesisBlock(8, 4, w_dim=16, resolution=512, img_channels=3, is_last=True, conv_clamp=None)})
    randomize(sr, 9).train()
    img = g(torch.randn(2, 12), torch.randn(2, 5), noise_mode="random")
    ws = g.mapping(torch.randn(2, 12), torch.randn(2, 5))
    x, rgb = sr.block0(F.interpolate(img, size=(128, 128), mode="bilinear", antialias=True),
                       F.interpolate(img[:, :3], size=(128, 128), mode="bilinear", antialias=True),
                       ws[:, -3:], noise_mode="random")
    x, rgb = sr.block1(x, rgb, ws[:, -3:], noise_mode="random")
    (img.square().mean() + rgb.square().mean()).backward()
    for module in (g, sr):
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_compiled_kernels_match_torch_backend():
    require_backend("cpu")
    g = small_generator(conv_clamp=4.0)
    sr = small_sr(use_ws_ones=False).eval()
    z, c = torch.randn(2, 12), torch.randn(2, 5)
    ws_sr = torch.randn(2, 14, 512)
    feats = torch.randn(2, 6, 64, 64)
    outputs = {}
    for backend in ("cpu", "torch"):
        hnn.set_stylegan2_backend(g, backend)
        hnn.set_stylegan2_backend(sr, backend)
        assert all(m.backend == backend for m in list(g.modules()) + list(sr.modules())
                   if isinstance(m, sg2._OpsBackend))
        img = g(z, c, noise_mode="const")
        img.square().mean().backward()
        grads = [p.grad.clone() for p in g.parameters()]
        g.zero_grad()
        outputs[backend] = (img, grads, sr(feats[:, :3], feats, ws_sr, noise_mode="none"))
    (a, ga, sa), (b, gb, sb) = outputs["cpu"], outputs["torch"]
    assert rel_err(a, b) < TOL32 and rel_err(sa, sb) < TOL32
    for x, y in zip(ga, gb):
        assert rel_err(x, y) < TOL32


def test_backend_is_used(monkeypatch):
    """The attribute reaches the ops: with 'torch', the compiled bias_act is never called."""
    from head4d.ops import _library
    g = small_generator()
    hnn.set_stylegan2_backend(g, "torch")

    def fail(*args, **kwargs):
        raise AssertionError("compiled bias_act called on the torch backend")

    monkeypatch.setattr(_library, "bias_act", fail)
    g(torch.randn(1, 12), torch.randn(1, 5), noise_mode="const")
    with pytest.raises(ValueError, match="backend"):
        hnn.set_stylegan2_backend(g, "tpu")
    with pytest.raises(ValueError, match="backend"):
        g.synthesis.b4.conv1.backend = "nope"


def test_errors_name_the_argument():
    g = small_generator()
    z, c = torch.randn(2, 12), torch.randn(2, 5)
    with pytest.raises(ValueError, match="MappingNetwork: z must have shape \\[N, 12\\]"):
        g.mapping(torch.randn(2, 11), c)
    with pytest.raises(ValueError, match="MappingNetwork: c must have shape"):
        g.mapping(z, torch.randn(2, 4))
    with pytest.raises(ValueError, match="SynthesisNetwork: ws must have shape \\[N, 8, 16\\]"):
        g.synthesis(torch.randn(2, 7, 16))
    with pytest.raises(ValueError, match="noise_mode must be one of"):
        g.synthesis(g.mapping(z, c), noise_mode="loud")
    with pytest.raises(ValueError, match="fused_modconv"):
        g.synthesis(g.mapping(z, c), fused_modconv="sometimes")
    with pytest.raises(ValueError, match="SynthesisBlock: x must have shape \\[N, 16, 4, 4\\]"):
        g.synthesis.b8(torch.randn(2, 16, 5, 5), None, torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="architecture"):
        hnn.SynthesisBlock(4, 4, 16, 8, 3, False, architecture="unet")
    with pytest.raises(ValueError, match="img_resolution must be 512"):
        hnn.SuperresolutionHybrid8XDC(32, 256, 4, True)
    with pytest.raises(ValueError, match="img_resolution must be a power of two"):
        hnn.Generator(4, 0, 8, img_resolution=48, img_channels=3)
    sr = small_sr()
    with pytest.raises(ValueError, match="SuperresolutionHybrid8XDC: x must have shape \\[N, 6, H, H\\]"):
        sr(torch.randn(1, 3, 64, 64), torch.randn(1, 5, 64, 64), torch.randn(1, 14, 512))
    with pytest.raises(ValueError, match="ws_super"):
        sr(torch.randn(1, 3, 64, 64), torch.randn(1, 6, 64, 64), torch.randn(1, 14, 512),
           ws_super=torch.randn(1, 2, 512))


def test_deepcopy_keeps_backend_and_values():
    g = small_generator()
    hnn.set_stylegan2_backend(g, "torch")
    h = copy.deepcopy(g)
    assert h.synthesis.b8.conv0.backend == "torch"
    ws = g.mapping(torch.randn(1, 12), torch.randn(1, 5))
    assert torch.equal(g.synthesis(ws, noise_mode="const"), h.synthesis(ws, noise_mode="const"))


def test_nvtx_ranges(monkeypatch):
    from head4d import _nvtx
    names = []
    real = _nvtx.nvtx_range

    def record(name):
        names.append(name)
        return real(name)

    monkeypatch.setattr(_nvtx, "nvtx_range", record)
    torch.manual_seed(0)
    g = hnn.Generator(z_dim=4, c_dim=0, w_dim=8, img_resolution=8, img_channels=3, mapping_kwargs={"num_layers": 1},
                      channel_base=32, channel_max=4)
    g(torch.randn(1, 4), None, noise_mode="none")
    module_ranges = [n for n in names if n.startswith("head4d.nn.")]
    assert module_ranges[:4] == ["head4d.nn.Generator", "head4d.nn.MappingNetwork", "head4d.nn.FullyConnectedLayer",
                                 "head4d.nn.SynthesisNetwork"]
    assert module_ranges.count("head4d.nn.SynthesisBlock") == 2
    assert module_ranges.count("head4d.nn.SynthesisLayer") == 3 and module_ranges.count("head4d.nn.ToRGBLayer") == 2


@pytest.mark.gpu
def test_fp16_blocks_on_cuda():
    """On CUDA an FP16 block computes in float16 (its image path in float32) and stays
    within float16 rounding of the FP32 network with the same weights (not run here:
    needs a GPU)."""
    fp16 = small_generator(num_fp16_res=3, conv_clamp=256).cuda()
    fp32 = small_generator(num_fp16_res=0, conv_clamp=256).cuda()
    fp32.load_state_dict(fp16.state_dict())
    ws = fp16.mapping(torch.randn(2, 12, device="cuda"), torch.randn(2, 5, device="cuda"))
    x, img = fp16.synthesis.b8(torch.randn(2, 16, 4, 4, device="cuda"), None, ws[:, 1:4], noise_mode="const")
    assert x.dtype == torch.float16 and img.dtype == torch.float32
    out16 = fp16.synthesis(ws, noise_mode="const")
    out32 = fp32.synthesis(ws, noise_mode="const")
    assert out16.dtype == torch.float32
    assert rel_err(out16, out32) < 64 * torch.finfo(torch.float16).eps
    assert rel_err(fp16.synthesis(ws, noise_mode="const", force_fp32=True), out32) < TOL32
