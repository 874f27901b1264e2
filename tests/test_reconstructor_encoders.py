"""The reconstructor's convolutional encoders (``head4d.nn.encoders``): each network against
an independent composition of ``torch.nn.functional`` calls written out here (the layer
table, strides, dilations, paddings, skips, activations and coordinate channels spelled
again, from the facts, not from the module), with the module's own randomly drawn
weights and non-zero biases, forward and backward in float64 (and the float32 module
against the float64 composition); the upstream parameter names, shapes and counts; the
initialization; gradients to every parameter; NVTX ranges; errors for bad input.

Sizes: 64 x 64 inputs (8 x 8 maps in the dilated ResNet, whose layer-4 taps at dilation 4
then all fall inside the map); the ASPP is also run at dilations 2, 3, 5 so that its
off-centre taps matter (Portrait4D's 12 / 24 / 36 reach past an 8 x 8 map).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import head4d.nn as hnn
from head4d import _nvtx
from head4d.nn import encoders as enc

from genhead_testing import RECONSTRUCTOR_DATA, upstream_sections

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps

# Tolerances (norm-wise relative error). The module and the composition run the same
# convolutions, possibly in another summation order or with another pooling / coordinate
# formula. Each conv's rounding, averaged over its outputs, is a few eps in norm (the
# errors of long sums are random-walk-like, and the ReLU compositions without
# normalization but with He-scaled weights keep each layer's relative error from
# growing); the deepest path stacks about 40 convs (ResNet-34's 33 and the head's 3; the
# U-Net's 19 with its skips), so ~40 x 4 eps = 160 eps; 256 eps covers it.
# Measured: at most 12 eps64 (the U-Net's gradients) and 6.5 eps32 (float32 modules).
TOL64 = 256 * EPS64
TOL32 = 256 * EPS32


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def randomized(module, seed=0):
    """``module`` with every bias non-zero (drawn N(0, 0.1^2)); weights keep their init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return module


def image(b=2, h=64, w=64, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, h, w, generator=gen) * 2 - 1).to(dtype)


# ----------------------------------------------------------------------------------
# the independent composition (p: the module's parameters by name)
# ----------------------------------------------------------------------------------

def r_coordinates(x):
    """x then y, -1 + 2 i / (n - 1) at pixel i."""
    b, _, h, w = x.shape
    xs = -1 + 2 * torch.arange(w, dtype=x.dtype) / (w - 1)
    ys = -1 + 2 * torch.arange(h, dtype=x.dtype) / (h - 1)
    gx = xs.view(1, 1, 1, w).expand(b, 1, h, w)
    gy = ys.view(1, 1, h, 1).expand(b, 1, h, w)
    return torch.cat([x, gx, gy], 1)


# ResNet-34 at output stride 8: (layer, blocks, stride of the first block, dilation)
R_LAYERS = (("layer1", 3, 1, 1), ("layer2", 4, 2, 1), ("layer3", 6, 1, 2), ("layer4", 3, 1, 4))


def r_encoder_global(p, img, rates=(12, 24, 36), layers=R_LAYERS):
    x = F.relu(F.conv2d(r_coordinates(img), p["encoder.conv1.weight"], stride=2, padding=3))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for layer, blocks, stride, d in layers:
        for i in range(blocks):
            pre = f"encoder.{layer}.{i}."
            s = stride if i == 0 else 1
            y = F.relu(F.conv2d(x, p[pre + "conv1.weight"], stride=s, padding=d, dilation=d))
            y = F.conv2d(y, p[pre + "conv2.weight"], padding=d, dilation=d)
            short = F.conv2d(x, p[pre + "downsample.0.weight"], stride=s) if pre + "downsample.0.weight" in p else x
            x = F.relu(y + short)
    h, w = x.shape[-2:]
    branches = [F.relu(F.conv2d(x, p["decoder.0.convs.0.0.weight"]))]
    for k, r in enumerate(rates, start=1):
        branches.append(F.relu(F.conv2d(x, p[f"decoder.0.convs.{k}.0.weight"], padding=r, dilation=r)))
    pooled = F.relu(F.conv2d(x.mean(dim=(2, 3), keepdim=True), p["decoder.0.convs.4.1.weight"]))
    branches.append(F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=False))
    x = F.relu(F.conv2d(torch.cat(branches, 1), p["decoder.0.project.0.weight"]))
    return F.relu(F.conv2d(x, p["decoder.1.weight"], padding=1))


def r_encoder_detail(p, img):
    return r_detail_layers(p, r_coordinates(img))


def r_detail_layers(p, x):
    for k, stride, pad in ((0, 2, 3), (2, 1, 1), (4, 1, 1), (6, 1, 1), (8, 1, 1)):
        x = F.leaky_relu(F.conv2d(x, p[f"encoder.{k}.weight"], p[f"encoder.{k}.bias"], stride=stride, padding=pad),
                         0.01)
    return x


def r_encoder_bg(p, img):
    def conv(x, name, stride=1):
        return F.conv2d(x, p[name + ".weight"], p[name + ".bias"], stride=stride, padding=1)

    def lrelu(x):
        return F.leaky_relu(x, 0.01)

    def up(x, name):
        return conv(F.interpolate(x, scale_factor=2, mode="nearest"), name)

    h1 = lrelu(conv(r_coordinates(img), "input_conv.0", 2))
    h2 = conv(lrelu(conv(h1, "down_conv_1.0")), "down_conv_1.2.op", 2)
    h3 = conv(lrelu(conv(h2, "down_conv_2.0")), "down_conv_2.2.op", 2)
    h4 = conv(lrelu(conv(h3, "down_conv_3.0")), "down_conv_3.2.op", 2)
    mid = lrelu(conv(h4, "middle.0"))
    x = up(lrelu(conv(torch.cat([mid, h4], 1), "up_conv_1.0")), "up_conv_1.2.conv")
    x = up(lrelu(conv(torch.cat([x, h3], 1), "up_conv_2.0")), "up_conv_2.2.conv")
    x = up(lrelu(conv(torch.cat([x, h2], 1), "up_conv_3.0")), "up_conv_3.2.conv")
    x = up(lrelu(conv(torch.cat([x, h1], 1), "up_conv_4.0")), "up_conv_4.2.conv")
    return conv(x, "out_conv")


CASES = {
    "global": (lambda: hnn.EncoderGlobal(), r_encoder_global),
    "global_small_rates": (lambda: hnn.EncoderGlobal(atrous_rates=(2, 3, 5)),
                           lambda p, img: r_encoder_global(p, img, rates=(2, 3, 5))),
    "detail": (lambda: hnn.EncoderDetail(), r_encoder_detail),
    "bg": (lambda: hnn.EncoderBG(), r_encoder_bg),
}


# ----------------------------------------------------------------------------------
# against the composition
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_float64_forward_backward_match_composition(case):
    make, reference = CASES[case]
    torch.manual_seed(3)
    net = randomized(make()).double()
    img = image(b=1 if case.startswith("global") else 2).requires_grad_(True)
    params = dict(net.named_parameters())
    out = net(img)
    ref = reference(params, img)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= TOL64, (case, rel_err(out, ref) / EPS64)
    assert out.abs().amax() > 0 and ref.std() > 0          # a live network, not all zeros

    cotangent = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    leaves = [img] + list(params.values())
    grads = torch.autograd.grad((out * cotangent).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * cotangent).sum(), leaves)
    for name, g, rg in zip(["image"] + list(params), grads, ref_grads):
        assert rg.abs().amax() > 0, name
        assert rel_err(g, rg) <= TOL64, (case, name, rel_err(g, rg) / EPS64)


@pytest.mark.parametrize("case", ["global", "detail", "bg"])
def test_float32_module_against_float64_composition(case):
    make, reference = CASES[case]
    torch.manual_seed(5)
    net = randomized(make())
    img = image(b=1, dtype=torch.float32)
    out = net(img)
    assert out.dtype == torch.float32
    params64 = {k: v.detach().double() for k, v in net.named_parameters()}
    ref = reference(params64, img.double())
    assert rel_err(out, ref) <= TOL32, (case, rel_err(out, ref) / EPS32)


def test_composition_sees_dilation_and_coordinate_order():
    """The comparison can fail: the composition with undilated layers 3 and 4, or with the
    two coordinate channels swapped, is far from the module's output."""
    torch.manual_seed(6)
    img = image(b=1)
    net = hnn.EncoderGlobal(atrous_rates=(2, 3, 5)).double()
    p = {k: v.detach() for k, v in net.named_parameters()}
    undilated = tuple((name, n, s, 1) for name, n, s, _ in R_LAYERS)
    with torch.no_grad():
        assert rel_err(net(img), r_encoder_global(p, img, rates=(2, 3, 5), layers=undilated)) > 1e-3
        detail = randomized(hnn.EncoderDetail()).double()
        p = {k: v.detach() for k, v in detail.named_parameters()}
        swapped = r_coordinates(img)[:, [0, 1, 2, 4, 3]]
        assert rel_err(detail(img), r_detail_layers(p, swapped)) > 1e-3


# ----------------------------------------------------------------------------------
# coordinates, shapes
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_add_coordinates(dtype):
    img = torch.randn(2, 3, 5, 7).to(dtype)
    out = hnn.add_coordinates(img)
    assert out.shape == (2, 5, 5, 7) and out.dtype == dtype
    assert torch.equal(out[:, :3], img)
    ref = r_coordinates(img.double())[:, 3:]
    assert rel_err(out[:, 3:], ref) <= 4 * torch.finfo(dtype).eps
    # x runs along the width (channel 3), y along the height (channel 4), -1 to 1
    assert torch.all(out[:, 3, :, 0] == -1) and torch.all(out[:, 3, :, -1] == 1)
    assert torch.all(out[:, 4, 0, :] == -1) and torch.all(out[:, 4, -1, :] == 1)
    assert torch.all(out[:, 3].diff(dim=-1) > 0) and torch.all(out[:, 3].diff(dim=-2) == 0)


@pytest.mark.parametrize("make, size, expected", [
    (lambda: hnn.EncoderGlobal(), (40, 24), (256, 5, 3)),
    (lambda: hnn.EncoderGlobal(decoder_channels=32), (16, 32), (32, 2, 4)),
    (lambda: hnn.EncoderDetail(), (18, 10), (96, 9, 5)),
    (lambda: hnn.EncoderBG(), (32, 48), (32, 32, 48)),
    (lambda: hnn.EncoderBG(out_channels=4), (16, 16), (4, 16, 16)),
])
def test_output_shapes(make, size, expected):
    with torch.no_grad():
        out = make()(torch.randn(1, 3, *size))
    assert out.shape == (1, *expected) and out.dtype == torch.float32


# ----------------------------------------------------------------------------------
# upstream names, shapes, counts; initialization
# ----------------------------------------------------------------------------------

def full_size_encoders():
    return {"encoder_global": hnn.EncoderGlobal(), "encoder_detail": hnn.EncoderDetail(),
            "background": hnn.EncoderBG()}


def test_state_dicts_match_upstream():
    sections = upstream_sections(strip_prefix=True, path=RECONSTRUCTOR_DATA)
    networks = full_size_encoders()
    assert set(networks) <= set(sections)
    for key, net in networks.items():
        num_keys, num_params, entries = sections[key]
        assert len(entries) == num_keys
        mine = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
        theirs = [(name, shape) for name, shape, _ in entries]
        assert mine == theirs, f"{key}: differs from upstream: {sorted(set(mine) ^ set(theirs))[:8]}"
        assert sum(p.numel() for p in net.parameters()) == num_params
        assert all(v.dtype == torch.float32 for v in net.state_dict().values())
        assert len(list(net.buffers())) == 0
        # a state dict built from the upstream list alone loads strictly, every tensor in place
        gen = torch.Generator().manual_seed(8)
        upstream_state = {name: torch.randn(shape, generator=gen) for name, shape, _ in entries}
        net.load_state_dict(upstream_state, strict=True)
        assert all(torch.equal(v, upstream_state[k]) for k, v in net.state_dict().items())


def _std_close(w, std, rel=0.05):
    return abs(w.std().item() / std - 1) < rel and abs(w.mean().item()) < 0.05 * std


def test_initialization():
    torch.manual_seed(0)
    nets = full_size_encoders()
    g = nets["encoder_global"]
    for name, m in g.encoder.named_modules():
        if isinstance(m, torch.nn.Conv2d):   # He normal over the fan-out
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            assert _std_close(m.weight, math.sqrt(2 / fan_out)), name
    for name, m in g.decoder.named_modules():
        if isinstance(m, torch.nn.Conv2d):   # torch's default: U(+-1/sqrt(fan_in)), std bound / sqrt(3)
            bound = 1 / math.sqrt(m.in_channels * m.kernel_size[0] * m.kernel_size[1])
            assert m.weight.abs().max() <= bound and _std_close(m.weight, bound / math.sqrt(3)), name
    for name, m in nets["encoder_detail"].named_modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            assert _std_close(m.weight, math.sqrt(2 / fan_out)), name
            bound = 1 / math.sqrt(m.in_channels * m.kernel_size[0] * m.kernel_size[1])
            assert m.bias.abs().max() <= bound and m.bias.abs().max() > 0, name
    for name, m in nets["background"].named_modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            rel = 0.05 if m.weight.numel() > 10_000 else 0.15   # the 32-channel out_conv: 18k numbers
            assert _std_close(m.weight, math.sqrt(2 / fan_out), rel), name
            assert torch.all(m.bias == 0), name


def test_global_trunk_from_torchvision_resnet34():
    import torchvision
    torch.manual_seed(1)
    resnet = torchvision.models.resnet34(weights=None)  # torchvision's names, random stand-in weights
    source = resnet.state_dict()
    g = hnn.EncoderGlobal()
    head = [p.detach().clone() for p in g.decoder.parameters()]
    assert g.load_imagenet_trunk(source) == 36
    convs = [n for n, m in g.encoder.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 36 and "layer2.0.downsample.0" in convs
    for name in convs:
        weight = g.encoder.get_submodule(name).weight
        if name == "conv1":  # RGB + x + y: filters R, G, B, R, G, times 3 / 5
            rgb = source["conv1.weight"]
            for i in range(5):
                assert torch.equal(weight[:, i], rgb[:, i % 3] * (3.0 / 5)), i
        else:
            assert torch.equal(weight, source[f"{name}.weight"]), name
    assert all(torch.equal(a, b) for a, b in zip(head, g.decoder.parameters()))  # the head is left alone
    with pytest.raises(ValueError, match="lacks 1 of the trunk's convolution weights.*layer4.2.conv2.weight"):
        g.load_imagenet_trunk({k: v for k, v in source.items() if k != "layer4.2.conv2.weight"})
    with pytest.raises(ValueError, match=r"layer1.0.conv1.weight has shape \[64, 64, 1, 1\]"):
        g.load_imagenet_trunk({**source, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)})


# ----------------------------------------------------------------------------------
# gradients, NVTX
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, size", [
    (lambda: hnn.EncoderGlobal(), 32), (lambda: hnn.EncoderDetail(), 16), (lambda: hnn.EncoderBG(), 32)])
def test_gradients_reach_every_parameter(make, size):
    torch.manual_seed(7)
    net = randomized(make())
    img = torch.randn(1, 3, size, size, requires_grad=True)
    (net(img) * torch.randn(net(img).shape)).sum().backward()
    for name, p in list(net.named_parameters()) + [("image", img)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().amax() > 0, name


def test_nvtx_ranges(monkeypatch):
    names = []
    real = _nvtx.nvtx_range

    def record(name):
        names.append(name)
        return real(name)

    monkeypatch.setattr(_nvtx, "nvtx_range", record)
    with torch.no_grad():
        hnn.EncoderGlobal(decoder_channels=8)(torch.randn(1, 3, 16, 16))
        hnn.EncoderDetail()(torch.randn(1, 3, 4, 4))
        hnn.EncoderBG()(torch.randn(1, 3, 16, 16))
    assert names == ["head4d.nn.EncoderGlobal", "head4d.nn.EncoderDetail", "head4d.nn.EncoderBG"]


# ----------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, multiple", [(hnn.EncoderGlobal, 8), (hnn.EncoderDetail, 2), (hnn.EncoderBG, 16)])
def test_bad_images(cls, multiple):
    net = cls()
    prefix = f"head4d.nn.{cls.__name__}: image"
    with pytest.raises(TypeError, match=prefix):
        net([[0.0]])
    with pytest.raises(TypeError, match=prefix + " must have a dtype"):
        net(torch.zeros(1, 3, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match=prefix + r" must have shape \[B, 3, H, W\]"):
        net(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=prefix + " must have 3 channels"):
        net(torch.zeros(1, 5, 16, 16))        # coordinates already appended: refused
    with pytest.raises(ValueError, match=prefix + f" height and width must be positive multiples of {multiple}"):
        net(torch.zeros(1, 3, 16 + max(1, multiple // 2), 16))
    with pytest.raises(ValueError, match=prefix + f" height and width must be positive multiples of {multiple}"):
        net(torch.zeros(1, 3, 16, 16 + max(1, multiple // 2)))
    with pytest.raises(ValueError, match=prefix + " must hold at least one sample"):
        net(torch.zeros(0, 3, 16, 16))


def test_bad_arguments():
    for cls in (hnn.EncoderGlobal, hnn.EncoderDetail, hnn.EncoderBG):
        with pytest.raises(ValueError, match=f"head4d.nn.{cls.__name__}: in_channels must be >= 3"):
            cls(in_channels=2)
        with pytest.raises(TypeError, match=f"head4d.nn.{cls.__name__}: in_channels must be an int"):
            cls(in_channels=5.0)
    with pytest.raises(ValueError, match="head4d.nn.EncoderGlobal: atrous_rates must hold 3"):
        hnn.EncoderGlobal(atrous_rates=(6, 12))
    with pytest.raises(ValueError, match="head4d.nn.EncoderGlobal: decoder_channels must be >= 1"):
        hnn.EncoderGlobal(decoder_channels=0)
    with pytest.raises(ValueError, match="head4d.nn.EncoderBG: out_channels must be >= 1"):
        hnn.EncoderBG(out_channels=0)
    with pytest.raises(TypeError, match="head4d.nn.add_coordinates: image"):
        hnn.add_coordinates(torch.zeros(1, 3, 4, 4, dtype=torch.int32))
    # another in_channels takes in_channels - 2 image channels
    assert hnn.EncoderDetail(in_channels=6)(torch.zeros(1, 4, 8, 8)).shape == (1, 96, 4, 4)


def test_detail_encoder_keeps_one_map_per_conv_for_the_backward():
    """The LeakyReLUs run in place, so autograd keeps each conv's input (the previous
    LeakyReLU's result, which that LeakyReLU keeps as well: one storage) and the last
    result, not the convs' outputs besides: 5 maps, not 9."""
    net = hnn.EncoderDetail()
    image = torch.randn(1, 3, 32, 32, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(image)
    maps = [5 * 32 * 32] + [64 * 16 * 16] + [96 * 16 * 16] * 4  # the coordinate-appended input, then 5 results
    assert sum(saved.values()) == 4 * sum(maps)
    grad, = torch.autograd.grad(out.sum(), image)
    assert grad.abs().sum() > 0
