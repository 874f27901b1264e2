"""The convolutional encoders of Portrait4D's reconstructor, with the upstream module and
parameter names, so that the released state dicts load as they are under the prefixes
``encoder_global.``, ``encoder_detail.`` and ``background.``.

- :func:`add_coordinates`: the two coordinate channels (x, then y, each from -1 to 1)
  every encoder appends to its RGB input, so each network reads 5 channels.
- :class:`EncoderGlobal`: a ResNet-34 without normalization, dilated to output stride 8,
  then a DeepLabV3 head (ASPP + 3x3 conv) without normalization, dropout or biases:
  ``[B, 3, H, W]`` -> ``[B, 256, H/8, W/8]`` (512 -> 64 in Portrait4D).
- :class:`EncoderDetail`: a 7x7 stride-2 conv and four 3x3 convs with LeakyReLU(0.01):
  ``[B, 3, H, W]`` -> ``[B, 96, H/2, W/2]``.
- :class:`EncoderBG`: the background U-Net, ``[B, 3, H, W]`` -> ``[B, 32, H, W]`` (the
  reconstructor applies the sigmoid and the resize to the neural resolution itself).

Facts of the released networks these follow (stated here because the code relies on them):

- The ResNet-34 is torchvision's layout (``conv1`` 7x7/2, 3x3/2 max pool, ``layer1`` ..
  ``layer4`` of 3, 4, 6, 3 basic blocks, a 1x1 ``downsample.0`` conv in the first block of
  layers 2-4) with every normalization layer an identity: no batch-norm keys and no conv
  biases; its pooling and classifier are removed. Output stride 8 is reached the way the
  segmentation library upstream uses does it: every conv of ``layer3`` (first block
  included) gets stride 1 and dilation 2, every conv of ``layer4`` stride 1 and dilation 4,
  with padding ``(k // 2) * dilation``. For the 1x1 ``downsample`` convs this means stride 1
  and padding 0; their dilation does nothing, so they are plain 1x1 convs.
- The DeepLabV3 head: ASPP branches ``convs.0`` (1x1), ``convs.1..3`` (3x3 at dilation 12, 24,
  36, padding = dilation) and ``convs.4`` (global average pool, 1x1 conv, spread back over
  the map), each followed by a ReLU; concatenated in that order and projected by
  ``project.0`` (1x1) + ReLU (the dropout of the original DeepLabV3 is removed); then
  ``decoder.1`` (3x3, padding 1) + ReLU. No conv has a bias.
- The U-Net: ``input_conv`` (3x3 stride 2), three ``down_conv_k`` (3x3 conv, LeakyReLU,
  3x3 stride-2 conv ``.2.op``), ``middle``, four ``up_conv_k`` (3x3 conv, LeakyReLU,
  nearest x2 then 3x3 conv ``.2.conv``) each reading the previous output concatenated with
  the skip of the same size (previous first), and ``out_conv``; LeakyReLU(0.01) after
  every conv but the stride-2 ``op``, the ``.2.conv`` and ``out_conv``.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from .._checks import FLOATING, check_tensor
from ._common import check_positive_int, init_conv, nvtx, op_name

__all__ = ["EncoderBG", "EncoderDetail", "EncoderGlobal", "add_coordinates"]

#: The slope of every LeakyReLU in the detail encoder and the U-Net.
LEAKY_SLOPE = 0.01
#: Every LeakyReLU here follows a conv whose output nothing else reads, so it runs in place:
#: autograd then keeps its result (which the next conv keeps anyway as its input) instead
#: of its input as well, about halving what a conv stack saves for the backward; the
#: gradient is the same (the result has the input's sign, the slope being positive).
LEAKY_INPLACE = True
#: Coordinate channels :func:`add_coordinates` appends.
COORDINATE_CHANNELS = 2
#: ``(width, blocks, stride, dilation)`` of ResNet-34's ``layer1`` .. ``layer4`` dilated to
#: output stride 8 (layers 3 and 4 lose their stride 2 to dilation).
RESNET34_DILATED_LAYERS = ((64, 3, 1, 1), (128, 4, 2, 1), (256, 6, 1, 2), (512, 3, 1, 4))
#: DeepLabV3's ASPP dilations.
ASPP_RATES = (12, 24, 36)


def add_coordinates(image: torch.Tensor) -> torch.Tensor:
    """Appends the pixel coordinates to an image: channel ``C`` is x and ``C + 1`` is y,
    ``x[..., i, j] = linspace(-1, 1, W)[j]`` and ``y[..., i, j] = linspace(-1, 1, H)[i]``
    (a size of 1 gives -1).

    Args:
        image: ``[B, C, H, W]`` floating tensor.

    Returns:
        ``[B, C + 2, H, W]`` in ``image.dtype`` on ``image.device`` (upstream makes the
        coordinates float32 and lets the concatenation promote; here they take the image's
        dtype, so a float64 image stays float64 and a half image stays half).
    """
    check_tensor("head4d.nn.add_coordinates", "image", image, "[B, C, H, W]", 4, dtypes=FLOATING)
    b, _, h, w = image.shape
    xs = torch.linspace(-1.0, 1.0, w, dtype=image.dtype, device=image.device)
    ys = torch.linspace(-1.0, 1.0, h, dtype=image.dtype, device=image.device)
    x = repeat(xs, "w -> b 1 h w", b=b, h=h)
    y = repeat(ys, "h -> b 1 h w", b=b, w=w)
    return torch.cat([image, x, y], dim=1)


def _check_image(module: nn.Module, image, channels: int, multiple: int) -> None:
    """``image`` is a floating ``[B, channels, H, W]`` with B >= 1 and H, W positive
    multiples of ``multiple``; errors start with the module's name."""
    op = op_name(module)
    expected = f"[B, {channels}, H, W] (RGB; H and W multiples of {multiple})"
    check_tensor(op, "image", image, expected, 4, dtypes=FLOATING)
    if image.shape[1] != channels:
        raise ValueError(f"{op}: image must have {channels} channels (RGB; the network appends the 2 "
                         f"coordinate channels itself) in dimension 1, got shape {list(image.shape)}")
    b, _, h, w = image.shape
    if b == 0:
        raise ValueError(f"{op}: image must hold at least one sample, got shape {list(image.shape)}")
    if h == 0 or w == 0 or h % multiple or w % multiple:
        raise ValueError(f"{op}: image height and width must be positive multiples of {multiple} "
                         f"(what the network's strides need), got shape {list(image.shape)}")


def _image_channels(op: str, in_channels: int) -> int:
    in_channels = check_positive_int(op, "in_channels", in_channels, minimum=COORDINATE_CHANNELS + 1)
    return in_channels - COORDINATE_CHANNELS


def _he_normal_fan_out(conv: nn.Conv2d) -> None:
    """``N(0, 2 / (out * k_h * k_w))`` weights (torch's Kaiming normal, fan-out, ReLU gain);
    the bias, if any, is left as it is."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


# ----------------------------------------------------------------------------------
# EncoderGlobal: dilated ResNet-34 + DeepLabV3 head
# ----------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """ResNet's basic block without normalization:
    ``relu(conv2(relu(conv1(x))) + shortcut(x))``, ``shortcut = downsample`` (a 1x1 conv
    of the same stride) where the width or the stride changes, else the identity.

    Args:
        in_ch, out_ch: channels in and out.
        stride: of ``conv1`` and ``downsample``.
        dilation: of both 3x3 convs (padding = dilation keeps the size at stride 1).

    Parameters: ``conv1.weight [out_ch, in_ch, 3, 3]``, ``conv2.weight [out_ch, out_ch, 3, 3]``,
    ``downsample.0.weight [out_ch, in_ch, 1, 1]`` (only with a downsample). No biases.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False))
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_ch, H, W]`` -> ``[B, out_ch, ceil(H / stride), ceil(W / stride)]``."""
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(F.relu(self.conv1(x))) + shortcut)


class DilatedResNet34(nn.Module):
    """ResNet-34's convolutional trunk without normalization, dilated to output stride 8
    (the layer table is :data:`RESNET34_DILATED_LAYERS`): ``conv1`` (7x7, stride 2,
    padding 3) + ReLU, max pool (3x3, stride 2, padding 1), ``layer1`` .. ``layer4``.

    Args:
        in_ch: input channels (Portrait4D: 5, RGB and coordinates).

    Parameters (no biases): ``conv1.weight [64, in_ch, 7, 7]`` and, per block,
    ``layerK.i.conv1.weight``, ``layerK.i.conv2.weight``, ``layerK.0.downsample.0.weight``
    (K = 2, 3, 4); 21,273,920 parameters with ``in_ch`` 5.
    """

    def __init__(self, in_ch: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 64, 7, stride=2, padding=3, bias=False)
        width_in = 64
        for k, (width, blocks, stride, dilation) in enumerate(RESNET34_DILATED_LAYERS, start=1):
            layer = [BasicBlock(width_in, width, stride, dilation)]
            layer += [BasicBlock(width, width, 1, dilation) for _ in range(blocks - 1)]
            setattr(self, f"layer{k}", nn.Sequential(*layer))
            width_in = width
        self.out_channels = width_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_ch, H, W]`` -> ``[B, 512, ceil(H / 8), ceil(W / 8)]`` (exactly H/8 for
        multiples of 8)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ASPPPooling(nn.Sequential):
    """The image-pooling branch of ASPP: global average pool, ``1`` = 1x1 conv (no bias),
    ReLU, then the ``[B, out_ch, 1, 1]`` result spread over the input's ``H x W``.

    Upstream resizes the 1x1 map bilinearly; that is a constant, which this spreads
    exactly (the resize can differ from it by rounding)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_ch, H, W]`` -> ``[B, out_ch, H, W]``, constant over H and W."""
        pooled = super().forward(x)
        return repeat(pooled, "b c 1 1 -> b c h w", h=x.shape[2], w=x.shape[3])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling without normalization, dropout or biases.

    ``convs.0``: 1x1 conv + ReLU; ``convs.1..3``: 3x3 conv at dilation ``rates[i]``
    (padding = dilation) + ReLU; ``convs.4``: :class:`ASPPPooling`. The five maps are
    concatenated in that order and ``project`` (1x1 conv ``5 * out_ch -> out_ch`` + ReLU)
    reduces them.

    Parameters: ``convs.0.0.weight [out_ch, in_ch, 1, 1]``, ``convs.{1,2,3}.0.weight
    [out_ch, in_ch, 3, 3]``, ``convs.4.1.weight [out_ch, in_ch, 1, 1]``,
    ``project.0.weight [out_ch, 5 * out_ch, 1, 1]``.
    """

    def __init__(self, in_ch: int, out_ch: int, rates: Sequence[int] = ASPP_RATES):
        super().__init__()
        branches = [nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.ReLU())]
        branches += [nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=r, dilation=r, bias=False), nn.ReLU())
                     for r in rates]
        branches.append(ASPPPooling(in_ch, out_ch))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(nn.Conv2d(len(branches) * out_ch, out_ch, 1, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_ch, H, W]`` -> ``[B, out_ch, H, W]``."""
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class EncoderGlobal(nn.Module):
    """Portrait4D's global appearance encoder: :func:`add_coordinates`, a dilated ResNet-34
    without normalization (``encoder``, :class:`DilatedResNet34`), and a DeepLabV3 head
    without normalization (``decoder``: ``0`` = :class:`ASPP` at rates 12/24/36, ``1`` =
    3x3 conv, padding 1, no bias, ``2`` = ReLU).

    Args:
        in_channels: the encoder's input channels, coordinates included (5: RGB + x + y);
            ``forward`` takes ``in_channels - 2``.
        decoder_channels: ASPP and output channels (256).
        atrous_rates: the ASPP dilations (keyword; Portrait4D's 12, 24, 36).

    Parameters: the 43 weights of the released model (25,992,512 numbers with the
    defaults), named ``encoder.conv1.weight``, ``encoder.layerK.i.conv{1,2}.weight``,
    ``encoder.layerK.0.downsample.0.weight``, ``decoder.0.convs.{0.0,1.0,2.0,3.0,4.1}.weight``,
    ``decoder.0.project.0.weight``, ``decoder.1.weight``; no biases, no buffers.

    Initialization: upstream builds this network with ImageNet weights downloaded for the
    trunk; head4d downloads nothing, so the trunk gets torchvision's random ResNet init
    (He normal over the fan-out for every conv) until :meth:`load_imagenet_trunk` is given
    torchvision's ResNet-34 weights (the reconstructor's training does so by default), and
    the head keeps torch's default conv init, as upstream's head does (it never
    re-initializes it). Released checkpoints replace both.
    """

    def __init__(self, in_channels: int = 5, decoder_channels: int = 256, *,
                 atrous_rates: Sequence[int] = ASPP_RATES):
        super().__init__()
        op = op_name(self)
        self.image_channels = _image_channels(op, in_channels)
        self.in_channels = in_channels
        self.decoder_channels = check_positive_int(op, "decoder_channels", decoder_channels)
        rates = tuple(atrous_rates)
        if len(rates) != 3:
            raise ValueError(f"{op}: atrous_rates must hold 3 dilations, got {atrous_rates!r}")
        self.atrous_rates = tuple(check_positive_int(op, "atrous_rates[i]", r) for r in rates)
        self.encoder = DilatedResNet34(in_channels)
        self.decoder = nn.Sequential(
            ASPP(self.encoder.out_channels, decoder_channels, self.atrous_rates),
            nn.Conv2d(decoder_channels, decoder_channels, 3, padding=1, bias=False),
            nn.ReLU(),
        )
        self.reset_parameters()

    def load_imagenet_trunk(self, state_dict: Mapping[str, torch.Tensor]) -> int:
        """Start the trunk from torchvision's ImageNet ResNet-34, as upstream does.

        Copies every convolution weight of ``state_dict`` (torchvision's ``resnet34()``
        state dict: ``conv1.weight``, ``layerK.i.convJ.weight``,
        ``layerK.0.downsample.0.weight``) into ``encoder`` under the same names; the
        batch norms (``bn*``, ``downsample.1``) and ``fc`` are left out, the trunk having no
        normalization. ``conv1`` takes ``in_channels`` (RGB + x + y) where ImageNet's takes
        RGB: input channel ``i`` gets the RGB filter ``i % 3``, all of them times
        ``3 / in_channels`` (segmentation_models_pytorch's patch of a pretrained first
        convolution, which upstream's encoder goes through). The head is not touched.

        Returns:
            the number of tensors copied (36).

        Raises:
            ValueError: a convolution weight is missing from ``state_dict`` or has another shape.
        """
        op = op_name(self) + ".load_imagenet_trunk"
        convs = {name + ".weight": m for name, m in self.encoder.named_modules() if isinstance(m, nn.Conv2d)}
        missing = sorted(set(convs) - set(state_dict))
        if missing:
            raise ValueError(f"{op}: state_dict lacks {len(missing)} of the trunk's convolution weights (first: "
                             f"{missing[0]}); expected torchvision's resnet34() state dict")
        with torch.no_grad():
            for name, conv in convs.items():
                value = state_dict[name].detach().to(conv.weight.dtype)
                if name == "conv1.weight" and value.dim() == 4 and value.shape[1] == 3:
                    rgb = value
                    value = torch.stack([rgb[:, i % 3] for i in range(self.in_channels)], dim=1)
                    value = value * (3.0 / self.in_channels)
                if value.shape != conv.weight.shape:
                    raise ValueError(f"{op}: {name} has shape {list(state_dict[name].shape)}, the trunk's is "
                                     f"{list(conv.weight.shape)} (RGB filters for conv1)")
                conv.weight.copy_(value)
        return len(convs)

    def reset_parameters(self) -> None:
        """Trunk convs: He normal over the fan-out; head convs: torch's default
        (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``)."""
        for m in self.encoder.modules():
            if isinstance(m, nn.Conv2d):
                _he_normal_fan_out(m)
        for m in self.decoder.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Args:
            image: ``[B, 3, H, W]`` RGB, floating (the parameters' dtype, or any under
                autocast), H and W multiples of 8 (Portrait4D: 512 x 512).

        Returns:
            ``[B, decoder_channels, H / 8, W / 8]`` features, non-negative (a ReLU ends the
            head), in the convs' output dtype.
        """
        _check_image(self, image, self.image_channels, 8)
        with nvtx(self):
            return self.decoder(self.encoder(add_coordinates(image)))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, decoder_channels={self.decoder_channels}, "
                f"atrous_rates={self.atrous_rates}")


# ----------------------------------------------------------------------------------
# EncoderDetail
# ----------------------------------------------------------------------------------

class EncoderDetail(nn.Module):
    """Portrait4D's detail appearance encoder: :func:`add_coordinates`, then ``encoder`` =
    ``[conv 7x7 stride 2 padding 3 -> 64, LeakyReLU, conv 3x3 -> 96, LeakyReLU, then three
    times (conv 3x3 96 -> 96, LeakyReLU)]`` (slope 0.01, padding 1, with biases).

    Args:
        in_channels: input channels, coordinates included (5); ``forward`` takes
            ``in_channels - 2``.

    Parameters: ``encoder.{0,2,4,6,8}.weight`` / ``.bias`` (``[64, 5, 7, 7]``,
    ``[96, 64, 3, 3]``, three ``[96, 96, 3, 3]``); 320,256 numbers with the default.

    Initialization (upstream's): conv weights He normal over the fan-out; biases torch's
    default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
    """

    def __init__(self, in_channels: int = 5):
        super().__init__()
        self.image_channels = _image_channels(op_name(self), in_channels)
        self.in_channels = in_channels
        layers = []
        for c_in, c_out, k, stride in ((in_channels, 64, 7, 2), (64, 96, 3, 1), (96, 96, 3, 1), (96, 96, 3, 1),
                                       (96, 96, 3, 1)):
            layers += [nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2),
                       nn.LeakyReLU(LEAKY_SLOPE, inplace=LEAKY_INPLACE)]
        self.encoder = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.encoder.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()        # torch's default bias
                _he_normal_fan_out(m)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Args:
            image: ``[B, 3, H, W]`` RGB, floating, H and W even (Portrait4D: 512 x 512).

        Returns:
            ``[B, 96, H / 2, W / 2]`` in the convs' output dtype.
        """
        _check_image(self, image, self.image_channels, 2)
        with nvtx(self):
            return self.encoder(add_coordinates(image))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}"


# ----------------------------------------------------------------------------------
# EncoderBG: the background U-Net
# ----------------------------------------------------------------------------------

class StridedConv(nn.Module):
    """Halves the size: ``op`` = 3x3 conv, stride 2, padding 1 (with bias).
    ``[B, in_ch, H, W]`` -> ``[B, out_ch, ceil(H / 2), ceil(W / 2)]``."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.op = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class UpsampleConv(nn.Module):
    """Doubles the size: nearest-neighbour x2, then ``conv`` = 3x3 conv, padding 1 (with
    bias). ``[B, in_ch, H, W]`` -> ``[B, out_ch, 2 H, 2 W]``."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _conv_leaky(in_ch: int, out_ch: int, stride: int = 1) -> Tuple[nn.Module, nn.Module]:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1), nn.LeakyReLU(LEAKY_SLOPE, inplace=LEAKY_INPLACE)


class EncoderBG(nn.Module):
    """Portrait4D's background U-Net (output channels and size for an ``H x W`` input):

    ==============  =====================================================  ===========
    module          layers                                                 output
    ==============  =====================================================  ===========
    ``input_conv``  conv 3x3 stride 2 (5 -> 64), LeakyReLU                 64, H/2
    ``down_conv_1`` conv 64 -> 64, LeakyReLU, ``2.op`` stride 2 -> 128     128, H/4
    ``down_conv_2`` conv 128 -> 128, LeakyReLU, ``2.op`` -> 256            256, H/8
    ``down_conv_3`` conv 256 -> 256, LeakyReLU, ``2.op`` -> 512            512, H/16
    ``middle``      conv 512 -> 512, LeakyReLU                             512, H/16
    ``up_conv_1``   [middle, down_conv_3] 1024 -> 256, LeakyReLU, ``2.conv``  256, H/8
    ``up_conv_2``   [up_conv_1, down_conv_2] 512 -> 128, ...               128, H/4
    ``up_conv_3``   [up_conv_2, down_conv_1] 256 -> 64, ...                64, H/2
    ``up_conv_4``   [up_conv_3, input_conv] 128 -> 64, ...                 64, H
    ``out_conv``    conv 64 -> out_channels                                32, H
    ==============  =====================================================  ===========

    Every conv is 3x3 with padding 1 and a bias; LeakyReLU slope 0.01; ``[a, b]`` is the
    channel concatenation, ``a`` first; ``2.conv`` is a nearest x2 upsampling followed by
    a conv (:class:`UpsampleConv`), ``2.op`` a stride-2 conv (:class:`StridedConv`).

    Args:
        in_channels: input channels, coordinates included (5); ``forward`` takes
            ``in_channels - 2``.
        out_channels: output channels (32).

    Parameters: 34 tensors (``*.weight``, ``*.bias``), 8,687,328 numbers with the defaults.

    Initialization (upstream's): conv weights ``N(0, 2 / (out * 3 * 3))``, biases zero.
    """

    def __init__(self, in_channels: int = 5, out_channels: int = 32):
        super().__init__()
        op = op_name(self)
        self.image_channels = _image_channels(op, in_channels)
        self.in_channels = in_channels
        self.out_channels = check_positive_int(op, "out_channels", out_channels)
        self.input_conv = nn.Sequential(*_conv_leaky(in_channels, 64, stride=2))
        self.down_conv_1 = nn.Sequential(*_conv_leaky(64, 64), StridedConv(64, 128))
        self.down_conv_2 = nn.Sequential(*_conv_leaky(128, 128), StridedConv(128, 256))
        self.down_conv_3 = nn.Sequential(*_conv_leaky(256, 256), StridedConv(256, 512))
        self.middle = nn.Sequential(*_conv_leaky(512, 512))
        self.up_conv_1 = nn.Sequential(*_conv_leaky(1024, 256), UpsampleConv(256, 256))
        self.up_conv_2 = nn.Sequential(*_conv_leaky(512, 128), UpsampleConv(128, 128))
        self.up_conv_3 = nn.Sequential(*_conv_leaky(256, 64), UpsampleConv(64, 64))
        self.up_conv_4 = nn.Sequential(*_conv_leaky(128, 64), UpsampleConv(64, 64))
        self.out_conv = nn.Conv2d(64, out_channels, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_conv(m)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Args:
            image: ``[B, 3, H, W]`` RGB, floating, H and W multiples of 16 (four halvings
                whose skips must match the upsampled maps; Portrait4D: 512 x 512).

        Returns:
            ``[B, out_channels, H, W]`` logits (no sigmoid) in the convs' output dtype.
        """
        _check_image(self, image, self.image_channels, 16)
        with nvtx(self):
            h1 = self.input_conv(add_coordinates(image))
            h2 = self.down_conv_1(h1)
            h3 = self.down_conv_2(h2)
            h4 = self.down_conv_3(h3)
            x = self.up_conv_1(torch.cat([self.middle(h4), h4], dim=1))
            x = self.up_conv_2(torch.cat([x, h3], dim=1))
            x = self.up_conv_3(torch.cat([x, h2], dim=1))
            x = self.up_conv_4(torch.cat([x, h1], dim=1))
            return self.out_conv(x)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"
