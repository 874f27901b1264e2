"""``head4d.nn`` dual discriminator (Portrait4D's GenHead training D).

- Upstream compatibility: built with the released arguments, the discriminator has the
  upstream state-dict keys (order included), shapes and parameter count listed in
  ``tests/data/discriminator_state_dict.txt`` (built, not run), FP16 in b512-b64 only.
- Values: a small discriminator (32 x 32, 8-16 channels, batch 4, group 2) against an
  independent float64 composition written here from plain torch ops (equalized-lr
  scaling, ``F.conv2d``, explicit zero padding and the 4 x 4 FIR filter, strided
  subsampling, leaky ReLU, clamp, the minibatch standard deviation by explicit loops over
  the groups, the camera mapping, ``sum(out * cmap) / sqrt(cmap_dim)``), for the three
  architectures, with random weights and non-zero biases; the input composition (raw
  image and uv resized with antialiased bilinear, seg as it is).
- R1 (the gradient of the logits with respect to the super-resolved and the raw image,
  the uv and the seg input, then a backward of the weighted squared norms) through head4d's compiled kernels equals the
  ``torch`` backend's, parameter gradients included; gradients reach every parameter.
- The blur of the super-resolved image, camera noise, FP16 off the CPU, errors.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import head4d.nn as hnn
from head4d.nn import discriminator as disc

from conftest import require_backend
from genhead_testing import randomize, upstream_sections

DATA = __import__("pathlib").Path(__file__).parent / "data" / "discriminator_state_dict.txt"
EPS32 = torch.finfo(torch.float32).eps
SQRT2 = math.sqrt(2.0)
FIR_TAPS = (1.0, 3.0, 3.0, 1.0)

# The network computes in float32. Each of its ~12 layers (3 convs per block, the mapping's
# 9 FC layers run alongside) rounds sums of at most ~150 products, ~1 eps relative per
# layer norm-wise; 64 eps covers that with a wide margin for features and gradients. The
# logit is a dot product that can cancel, so its error is measured against the size of
# its terms, sum |out * cmap| / sqrt(cmap_dim).
TOL32 = 64 * EPS32


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------------
# the independent composition, float64
# ----------------------------------------------------------------------------------

def P(t):
    return t.detach().double()


def r_act(x, activation, gain=1.0, clamp=None):
    if activation == "lrelu":
        x = torch.where(x >= 0, x, 0.2 * x) * SQRT2
    return x * gain if clamp is None else (x * gain).clamp(-clamp * gain, clamp * gain)


def r_fir(x):
    """Depthwise 'valid' filtering with the normalized outer product of the 4 taps."""
    t = torch.tensor(FIR_TAPS, dtype=torch.float64)
    f = torch.outer(t, t) / t.sum() ** 2
    c = x.shape[1]
    return F.conv2d(x, f[None, None].expand(c, 1, 4, 4), groups=c)


def r_downsample(x):
    """Pad 1 on each side, filter, keep every second sample: H -> H / 2."""
    return r_fir(F.pad(x, [1, 1, 1, 1]))[:, :, ::2, ::2]


def r_conv(layer, x, gain=1.0):
    """StyleGAN2's Conv2dLayer: weight / sqrt(fan_in); 'same' conv, or for down 2 the
    filtered-then-strided forms (1x1: downsample then conv; 3x3: pad 2, filter, stride-2 conv)."""
    w = P(layer.weight) / math.sqrt(layer.weight[0].numel())
    k = w.shape[-1]
    if layer.down == 1:
        y = F.conv2d(x, w, padding=k // 2)
    elif k == 1:
        y = F.conv2d(r_downsample(x), w)
    else:
        y = F.conv2d(r_fir(F.pad(x, [2, 2, 2, 2])), w, stride=2)
    if layer.bias is not None:
        y = y + P(layer.bias)[None, :, None, None]
    return r_act(y, layer.activation, gain, layer.conv_clamp)


def r_fc(layer, x):
    y = x @ (P(layer.weight) * (layer.bias_gain / math.sqrt(layer.in_features))).T
    y = y + P(layer.bias) * layer.bias_gain
    return r_act(y, layer.activation)


def r_mbstd(x, group_size):
    """Per sample: the std over its group's members (samples with the same index mod
    N / G), averaged over channels and pixels, appended as one constant channel."""
    n = x.shape[0]
    groups = n // min(group_size, n)
    stats = []
    for i in range(n):
        members = x[[j for j in range(n) if j % groups == i % groups]]
        std = (members.var(dim=0, unbiased=False) + 1e-8).sqrt()
        stats.append(std.mean().expand(1, *x.shape[2:]))
    return torch.cat([x, torch.stack(stats)], dim=1)


def r_discriminator(D, x, c):
    """Logits [N] and the mapped camera / the out layer's output of a small discriminator,
    from the stacked float64 input x."""
    features, image = None, x
    for res in D.block_resolutions:
        block = getattr(D, f"b{res}")
        if block.in_channels == 0 or block.architecture == "skip":
            y = r_conv(block.fromrgb, image)
            features = y if features is None else features + y
            image = r_downsample(image) if block.architecture == "skip" else None
        if block.architecture == "resnet":
            skip = r_conv(block.skip, features, gain=math.sqrt(0.5))
            features = skip + r_conv(block.conv1, r_conv(block.conv0, features), gain=math.sqrt(0.5))
        else:
            features = r_conv(block.conv1, r_conv(block.conv0, features))
    epi = D.b4
    if epi.architecture == "skip":
        features = features + r_conv(epi.fromrgb, image)
    h = r_conv(epi.conv, r_mbstd(features, group_size=2))  # the released group size
    out = r_fc(epi.out, r_fc(epi.fc, h.flatten(1)))
    m = D.mapping
    w = r_fc(m.embed, P(c))
    w = w / (w.square().mean(dim=1, keepdim=True) + 1e-8).sqrt()
    for i in range(m.num_layers):
        w = r_fc(getattr(m, f"fc{i}"), w)
    return (out * w).sum(dim=1) / math.sqrt(D.cmap_dim), out, w


def r_input(D, img):
    """The stacked input: image_sr | raw resized (antialiased bilinear) | uv resized | seg."""
    size = D.img_resolution
    resize = lambda t: F.interpolate(P(t), size=(size, size), mode="bilinear", align_corners=False,  # noqa: E731
                                     antialias=True)
    return torch.cat([P(img["image_sr"]), resize(img["image"]), resize(img["uv"]), P(img["seg"])], dim=1)


# ----------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------

def small_discriminator(architecture="resnet", conv_clamp=256, **kwargs):
    """32 x 32, blocks b32 (8 channels), b16, b8, epilogue with 16; cmap 16; group 2."""
    torch.manual_seed(0)
    D = disc.DualDiscriminatorDeform(c_dim=25, img_resolution=32, architecture=architecture, channel_base=256,
                                     channel_max=16, conv_clamp=conv_clamp, **kwargs)
    return randomize(D)


def small_inputs(n=4, seed=1, requires_grad=False):
    """Raw image at 16 (upsampled), uv at 64 (downsampled), seg at 32 (as it is)."""
    gen = torch.Generator().manual_seed(seed)
    img = {"image_sr": torch.randn(n, 3, 32, 32, generator=gen),
           "image": torch.randn(n, 3, 16, 16, generator=gen),
           "uv": torch.rand(n, 3, 64, 64, generator=gen) * 2 - 1,
           "seg": torch.rand(n, 1, 32, 32, generator=gen)}
    if requires_grad:
        for t in img.values():
            t.requires_grad_(True)
    return img, torch.randn(n, 25, generator=gen)


# ----------------------------------------------------------------------------------
# upstream names
# ----------------------------------------------------------------------------------

def test_state_dict_matches_upstream():
    sections = upstream_sections(strip_prefix=True, path=DATA)
    num_keys, num_params, entries = sections["D"]
    D = hnn.DualDiscriminatorDeform()
    mine = [(k, tuple(v.shape)) for k, v in D.state_dict().items()]
    assert len(entries) == num_keys == 92
    assert mine == [(name, shape) for name, shape, _ in entries], sorted(set(mine) ^ {e[:2] for e in entries})[:8]
    assert sum(p.numel() for p in D.parameters()) == num_params
    assert D.img_channels == 10 and D.cmap_dim == 512 and D.b4.mbstd.group_size == 2
    assert [getattr(D, f"b{r}").use_fp16 for r in D.block_resolutions] == [True] * 4 + [False] * 3
    m = D.mapping
    assert (m.z_dim, m.c_dim, m.num_layers, m.num_ws, m.w_avg_beta) == (0, 25, 8, None, None)
    assert m.fc0.weight_gain == pytest.approx(0.01 / math.sqrt(512)) and m.embed.bias_gain == 1


# ----------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture", ["resnet", "skip", "orig"])
@pytest.mark.parametrize("conv_clamp", [256, 0.5])
def test_against_composition(architecture, conv_clamp):
    D = small_discriminator(architecture, conv_clamp=conv_clamp)
    img, c = small_inputs()
    logits = D(img, c)
    assert logits.shape == (4, 1) and logits.dtype == torch.float32
    x = r_input(D, img)
    assert rel_err(D.compose_input(img), x) < TOL32
    expected, out, cmap = r_discriminator(D, x, c)
    scale = (out * cmap).abs().sum(dim=1) / math.sqrt(D.cmap_dim)
    assert ((logits[:, 0].double() - expected).abs() <= TOL32 * scale).all(), (logits[:, 0], expected)
    assert rel_err(D.mapping(None, c), cmap) < TOL32
    if conv_clamp < 1:  # the clamp is reached: the same weights without it give other logits
        assert not torch.allclose(logits, small_discriminator(architecture, conv_clamp=None)(img, c))


def test_minibatch_std_groups():
    layer = disc.MinibatchStdLayer(group_size=2)
    x = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    assert rel_err(layer(x), r_mbstd(x, 2)) < 4 * torch.finfo(torch.float64).eps
    assert rel_err(disc.MinibatchStdLayer(None)(x), r_mbstd(x, 6)) < 4 * torch.finfo(torch.float64).eps
    y = disc.MinibatchStdLayer(4, num_channels=5)(x[:4])
    assert y.shape == (4, 10, 3, 3)
    expected = (x[:4].var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=[1, 2])  # one statistic per channel
    assert torch.allclose(y[0, 5:, 0, 0], expected)


def test_blur_discriminator_input():
    img, _ = small_inputs(2)
    sigma = 1.5
    blurred = disc.blur_discriminator_input(img, sigma)
    assert all(blurred[k] is img[k] for k in ("image", "uv", "seg"))
    r = math.floor(3 * sigma)
    k = torch.arange(-r, r + 1, dtype=torch.float64)
    f = torch.exp2(-(k / sigma) ** 2)
    f = torch.outer(f, f) / f.sum() ** 2
    expected = F.conv2d(F.pad(P(img["image_sr"]), [r] * 4), f[None, None].expand(3, 1, *f.shape), groups=3)
    assert rel_err(blurred["image_sr"], expected) < TOL32
    unchanged = disc.blur_discriminator_input(img, 0.3)  # floor(3 sigma) == 0: no blur
    assert unchanged["image_sr"] is img["image_sr"]
    with pytest.raises(ValueError, match="blur_sigma"):
        disc.blur_discriminator_input(img, -1.0)


def test_camera_noise_leaves_c_alone():
    D = small_discriminator(disc_c_noise=1.0)
    img, c = small_inputs()
    before = c.clone()
    torch.manual_seed(3)
    a = D(img, c)
    assert torch.equal(c, before)
    D.disc_c_noise = 0.0
    assert not torch.allclose(a, D(img, c))


def test_fp16_blocks_run_float32_off_cuda():
    D = small_discriminator(num_fp16_res=2)
    assert D.b32.use_fp16 and D.b16.use_fp16 and not D.b8.use_fp16
    img, c = small_inputs()
    x, _ = D.b32(None, D.compose_input(img))
    assert x.dtype == torch.float32
    assert torch.equal(D(img, c), D(img, c, force_fp32=True))


def test_other_configurations():
    """Unconditional (no mapping, one output), no super-resolution (image | uv: 6 channels),
    no seg; Freeze-D turns the first layers into buffers."""
    torch.manual_seed(0)
    D = disc.DualDiscriminatorDeform(c_dim=0, img_resolution=16, channel_base=128, channel_max=8,
                                     has_superresolution=False, has_seg=False,
                                     block_kwargs={"freeze_layers": 2})
    assert D.img_channels == 6 and D.cmap_dim == 0 and not hasattr(D, "mapping")
    assert D.b4.out.out_features == 1 and D.b16.num_layers == 4
    frozen = {name for name, _ in D.named_buffers()} & {"b16.fromrgb.weight", "b16.conv0.weight"}
    assert frozen == {"b16.fromrgb.weight", "b16.conv0.weight"} and "b16.conv1.weight" in dict(D.named_parameters())
    img = {"image": torch.randn(2, 3, 16, 16), "uv": torch.randn(2, 3, 32, 32)}
    x = D.compose_input(img, img_name="image")
    expected = torch.cat([img["image"], F.interpolate(img["uv"], size=(16, 16), mode="bilinear",
                                                      align_corners=False, antialias=True)], dim=1)
    assert torch.equal(x, expected)
    assert D(img, None, img_name="image").shape == (2, 1)


# ----------------------------------------------------------------------------------
# gradients and R1
# ----------------------------------------------------------------------------------

def test_gradients_reach_every_parameter():
    D = small_discriminator()
    img, c = small_inputs()
    D(img, c).square().sum().backward()
    for name, p in D.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def r1_penalty(D, img, c, gammas=(10.0, 30.0, 10.0)):
    """The GAN loss's R1 for the dual discriminator: the gradients of sum(logits) with
    respect to every input entry (create_graph; here the raw image is upsampled and uv
    downsampled on the way in), squared and summed per sample, weighted by gamma / 2
    (images, uv, seg); then the backward of its sum. Returns the logits, the penalties and
    the parameter gradients by name; the last layer's bias (a constant in the logit) has
    none, as the penalty does not depend on it."""
    logits = D(img, c)
    names = ("image_sr", "image", "uv", "seg")
    grads = torch.autograd.grad(logits.sum(), [img[k] for k in names], create_graph=True)
    norms = [g.square().sum(dim=[1, 2, 3]) for g in grads]
    gamma, gamma_uv, gamma_seg = gammas
    penalty = (norms[0] + norms[1]) * (gamma / 2) + norms[2] * (gamma_uv / 2) + norms[3] * (gamma_seg / 2)
    D.zero_grad()
    penalty.sum().backward()
    no_grad = [name for name, p in D.named_parameters() if p.grad is None]
    assert no_grad == ["b4.out.bias"], no_grad
    return logits, penalty, {name: p.grad.clone() for name, p in D.named_parameters() if p.grad is not None}


def test_r1_compiled_kernels_match_torch_backend():
    require_backend("cpu")
    D = small_discriminator(conv_clamp=4.0)
    results = {}
    for backend in ("cpu", "torch"):
        hnn.set_stylegan2_backend(D, backend)
        assert all(m.backend == backend for m in D.modules() if hasattr(m, "_backend") and hasattr(m, "weight"))
        img, c = small_inputs(requires_grad=True)
        results[backend] = r1_penalty(D, img, c)
    (la, pa, ga), (lb, pb, gb) = results["cpu"], results["torch"]
    assert rel_err(la, lb) < TOL32 and rel_err(pa, pb) < TOL32
    # The network is piecewise linear in its input except for the minibatch std, so the
    # input gradient does not move with the biases after it (b4's conv and fc): their R1
    # gradients are exactly zero; every other parameter's is not.
    assert ga.keys() == gb.keys()
    assert [name for name, g in gb.items() if g.abs().sum() == 0] == ["b4.conv.bias", "b4.fc.bias"]
    # Per layer, weight and bias together: a conv bias's R1 gradient exists only through
    # the minibatch std's curvature and is a sum of terms of the weight gradient's size that
    # nearly cancel (1e-5 against 1e-3), so its rounding is relative to the layer's gradient.
    layers = {}
    for name in gb:
        layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    for layer, names in layers.items():
        a = torch.cat([ga[n].flatten() for n in names])
        b = torch.cat([gb[n].flatten() for n in names])
        assert rel_err(a, b) < TOL32, layer


# ----------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------

def test_errors_name_the_argument():
    D = small_discriminator()
    img, c = small_inputs()
    with pytest.raises(TypeError, match="DualDiscriminatorDeform: img must be a dict"):
        D(img["image_sr"], c)
    with pytest.raises(ValueError, match="img has no entry 'seg'"):
        D({k: v for k, v in img.items() if k != "seg"}, c)
    with pytest.raises(ValueError, match=r"img\['uv'\] must have shape \[N, 3, H, H\]"):
        D({**img, "uv": img["uv"][:, :2]}, c)
    with pytest.raises(ValueError, match=r"img\['image_sr'\] must be 32 x 32"):
        D({**img, "image_sr": torch.randn(4, 3, 16, 16)}, c)
    with pytest.raises(ValueError, match="every entry of img must hold 4 samples"):
        D({**img, "seg": img["seg"][:2]}, c)
    with pytest.raises(ValueError, match=r"c must have shape \[N, 25\]"):
        D(img, c[:, :24])
    with pytest.raises(TypeError, match="c must be a torch.Tensor"):
        D(img, None)
    with pytest.raises(ValueError, match="MinibatchStdLayer: the batch size \\(3\\) must be a positive multiple"):
        D({k: v[:3] for k, v in img.items()}, c[:3])
    with pytest.raises(ValueError, match="img_resolution must be a power of two"):
        disc.DualDiscriminatorDeform(img_resolution=48)
    with pytest.raises(ValueError, match="architecture"):
        disc.DiscriminatorBlock(0, 8, 16, 32, 3, 0, architecture="unet")
    with pytest.raises(ValueError, match="in_channels must be 0"):
        disc.DiscriminatorBlock(4, 8, 16, 32, 3, 0)
    with pytest.raises(ValueError, match=r"DiscriminatorBlock: x must have shape \[N, 16, 16, 16\]"):
        D.b16(torch.randn(4, 16, 8, 8), None)
    with pytest.raises(ValueError, match="disc_c_noise"):
        disc.DualDiscriminatorDeform(disc_c_noise=-1)
