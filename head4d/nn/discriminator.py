"""StyleGAN2's discriminator as Portrait4D trains GenHead with it (and the reconstructor's
adversarial term): the camera-conditioned dual discriminator, on head4d's ops.

Drop-in compatibility: class names, constructor arguments, forward signatures and every
parameter and buffer name and shape are those of the StyleGAN2 / EG3D / Portrait4D
discriminator, so its state dict loads as it is (``tests/data/discriminator_state_dict.txt``).

- :class:`DiscriminatorBlock`: one resolution, ``res -> res / 2``. The first block turns
  the image into features (``fromrgb``, 1x1, lrelu); then ``conv0`` (3x3, lrelu) and
  ``conv1`` (3x3, lrelu, 2x down through the ``[1, 3, 3, 1]`` filter). ``'resnet'`` adds
  ``skip`` (1x1, 2x down, no bias, linear) and scales both branches by ``sqrt(0.5)``
  (``conv1``'s clamp too); ``'skip'`` has a ``fromrgb`` in every block and downsamples
  the image alongside; ``'orig'`` is the plain chain.
- :class:`MinibatchStdLayer`: the batch is split into groups of ``G = min(group_size, N)``
  samples (sample ``i`` is in group ``i mod (N / G)``); per group, the standard
  deviation over its members (``sqrt(var + 1e-8)``), averaged over each of
  ``num_channels`` channel slices and all pixels, is appended as ``num_channels``
  constant feature maps.
- :class:`DiscriminatorEpilogue` (the ``b4`` block): minibatch std, ``conv`` (3x3,
  lrelu), ``fc`` (flattened ``C * 4 * 4 -> C``, lrelu), ``out`` (linear, to ``cmap_dim``
  or 1); with a camera the logit is ``sum(out * cmap) / sqrt(cmap_dim)``. Always float32.
- :class:`DualDiscriminatorDeform`: blocks ``b<res> ... b8`` with ``min(channel_base //
  res, channel_max)`` channels, the camera ``mapping`` (a :class:`MappingNetwork` with
  z_dim 0: ``embed`` (c_dim -> cmap_dim), unit second moment, 8 FC layers with lrelu and
  learning-rate multiplier 0.01, no w_avg), and ``b4``. Its input is one image of
  ``3 * 2 + 3 + 1 = 10`` channels made from a dict (the default names): the super-resolved
  image ``'image_sr'``, the raw image ``'image'`` resized to the super-resolved size with
  antialiased bilinear filtering, the correspondence map ``'uv'`` and the mask ``'seg'``
  (both resized the same way when their size is not ``img_resolution``).

The blur that fades out at the start of training is not part of the discriminator: the
loss blurs the super-resolved image (only that entry) before the call, with
:func:`blur_discriminator_input`.

Precision: blocks built with ``use_fp16`` (the top ``num_fp16_res`` resolutions) compute
in float16 on CUDA only; elsewhere, and with ``force_fp32``, in float32. The epilogue,
the mapping and the logits are float32.

Backends: every layer has the ``backend`` attribute of :mod:`head4d.nn.stylegan2`
(``bias_act`` / ``upfirdn2d`` / ``conv2d_resample``); :func:`set_stylegan2_backend` sets
it on a whole discriminator. R1's double backward (the gradient of the logits with
respect to the input, then a backward of its norm) runs through those ops.

Every module call opens the NVTX range ``head4d.nn.<ClassName>``; bad input raises
``TypeError`` / ``ValueError`` starting with ``head4d.nn.<ClassName>:``.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops as _ops
from .._checks import FLOATING, check_tensor
from ._common import check_positive_int, nvtx, op_name
from .stylegan2 import ARCHITECTURES, Conv2dLayer, FullyConnectedLayer, MappingNetwork, _OpsBackend

__all__ = ["DiscriminatorBlock", "DiscriminatorEpilogue", "DualDiscriminatorDeform", "MinibatchStdLayer",
           "blur_discriminator_input", "filtered_resizing"]

#: The group size of the minibatch standard deviation that Portrait4D trains with (its
#: ``--mbstd-group``); the epilogue's own default is StyleGAN2's 4.
RELEASED_MBSTD_GROUP_SIZE = 2


def filtered_resizing(image: torch.Tensor, size: int) -> torch.Tensor:
    """``image [N, C, H, W]`` resized to ``[N, C, size, size]``: bilinear, ``align_corners``
    False, antialiased (Portrait4D's ``'antialiased'`` filter mode; differentiable twice)."""
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def blur_discriminator_input(img: Mapping[str, torch.Tensor], blur_sigma: float, img_name: str = "image_sr",
                             backend: Optional[str] = None) -> dict:
    """The discriminator's input dict with the entry ``img_name`` blurred, as the GAN loss
    does it during the blur fade: the separable filter ``2^(-(k / sigma)^2)``, ``k = -r..r``
    with ``r = floor(3 sigma)``, normalised, zero padding, same size
    (:func:`head4d.ops.filter2d`). No blur (the dict copied as it is) when ``r == 0``.

    Args:
        img: the discriminator's input dict (see :meth:`DualDiscriminatorDeform.forward`).
        blur_sigma: the blur's sigma in pixels, >= 0.
        img_name: the entry to blur (``'image_sr'``; ``'image'`` for a discriminator
            without super-resolution).
        backend: ``filter2d``'s backend.

    Returns:
        a new dict (the other entries are the same tensors).
    """
    from ..render.masks import blur_kernel  # imported here: head4d.render imports head4d.nn

    op = "head4d.nn.blur_discriminator_input"
    if not isinstance(img, Mapping):
        raise TypeError(f"{op}: img must be a dict of tensors, got {type(img).__name__}")
    if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, (int, float)) or not math.isfinite(blur_sigma) \
            or blur_sigma < 0:
        raise ValueError(f"{op}: blur_sigma must be a finite number >= 0, got {blur_sigma!r}")
    if img_name not in img:
        raise ValueError(f"{op}: img has no entry {img_name!r} (entries: {sorted(img)})")
    out = dict(img)
    if math.floor(3 * blur_sigma) > 0:
        image = check_tensor(op, f"img[{img_name!r}]", img[img_name], "[N, C, H, W]", 4)
        out[img_name] = _ops.filter2d(image, blur_kernel(float(blur_sigma), image.device).to(image.dtype),
                                      backend=backend)
    return out


def _check_features(op: str, name: str, x, channels: int, size: int) -> torch.Tensor:
    expected = f"[N, {channels}, {size}, {size}]"
    check_tensor(op, name, x, expected, 4, dtypes=FLOATING)
    if tuple(x.shape[1:]) != (channels, size, size):
        raise ValueError(f"{op}: {name} must have shape {expected}, got {list(x.shape)}")
    return x


def _block_dtype(use_fp16: bool, force_fp32: bool, device: torch.device) -> torch.dtype:
    """float16 for an FP16 block on CUDA unless forced to float32; float32 otherwise."""
    return torch.float16 if use_fp16 and not force_fp32 and device.type == "cuda" else torch.float32


class DiscriminatorBlock(_OpsBackend, nn.Module):
    """One resolution of StyleGAN2's discriminator: ``[N, tmp, res, res] -> [N, out, res/2, res/2]``.

    Buffer ``resample_filter [4, 4]``; modules ``fromrgb`` (first block or ``'skip'``:
    ``Conv2dLayer(img_channels, tmp_channels, 1)``, lrelu), ``conv0`` (3x3, lrelu),
    ``conv1`` (3x3, lrelu, 2x down), ``skip`` (``'resnet'``: 1x1, 2x down, no bias).
    ``num_layers`` counts them (Freeze-D counts layers across blocks from
    ``first_layer_idx``; layers below ``freeze_layers`` hold buffers, not parameters).

    Args:
        in_channels: the features' channels, 0 for the first block (which reads the image).
        tmp_channels: the block's channels (``in_channels`` when not 0).
        out_channels: the output's channels.
        resolution: the input's height and width.
        img_channels: the image's channels.
        first_layer_idx: the index of the block's first layer in the discriminator.
        architecture: ``'orig'``, ``'skip'`` or ``'resnet'``.
        activation: of the convolutions.
        resample_filter: the 1-D low-pass filter taps.
        conv_clamp: clamp of the convolutions' outputs, None for none.
        use_fp16: compute in float16 (on CUDA only).
        fp16_channels_last: channels-last activations in FP16 mode.
        freeze_layers: layers with an index below this are not trainable.
    """

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int, img_channels: int,
                 first_layer_idx: int, architecture: str = "resnet", activation: str = "lrelu",
                 resample_filter=(1, 3, 3, 1), conv_clamp: Optional[float] = None, use_fp16: bool = False,
                 fp16_channels_last: bool = False, freeze_layers: int = 0):
        super().__init__()
        op = op_name(self)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"{op}: architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        self.in_channels = check_positive_int(op, "in_channels", in_channels, 0)
        tmp_channels = check_positive_int(op, "tmp_channels", tmp_channels)
        if in_channels not in (0, tmp_channels):
            raise ValueError(f"{op}: in_channels must be 0 (first block) or tmp_channels ({tmp_channels}), "
                             f"got {in_channels}")
        self.tmp_channels = tmp_channels
        self.out_channels = check_positive_int(op, "out_channels", out_channels)
        self.resolution = check_positive_int(op, "resolution", resolution, 2)
        if self.resolution % 2 != 0:
            raise ValueError(f"{op}: resolution must be even (the block halves it), got {resolution}")
        self.img_channels = check_positive_int(op, "img_channels", img_channels)
        self.first_layer_idx = check_positive_int(op, "first_layer_idx", first_layer_idx, 0)
        freeze_layers = check_positive_int(op, "freeze_layers", freeze_layers, 0)
        self.architecture = architecture
        self.use_fp16 = bool(use_fp16)
        self.channels_last = self.use_fp16 and bool(fp16_channels_last)
        self.register_buffer("resample_filter", _ops.setup_filter(list(resample_filter)))

        self.num_layers = 0

        def trainable() -> bool:
            """Whether the next layer trains (Freeze-D), counting it."""
            index = self.first_layer_idx + self.num_layers
            self.num_layers += 1
            return index >= freeze_layers

        common = dict(conv_clamp=conv_clamp, channels_last=self.channels_last)
        if in_channels == 0 or architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, activation=activation,
                                       trainable=trainable(), **common)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, activation=activation,
                                 trainable=trainable(), **common)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, activation=activation, down=2,
                                 trainable=trainable(), resample_filter=resample_filter, **common)
        if architecture == "resnet":
            self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                    trainable=trainable(), resample_filter=resample_filter,
                                    channels_last=self.channels_last)

    def forward(self, x: Optional[torch.Tensor], img: Optional[torch.Tensor],
                force_fp32: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Args:
            x: ``[N, in_channels, resolution, resolution]`` floating, None for the first block.
            img: ``[N, img_channels, resolution, resolution]`` floating (read by the first
                block, and by every block of a ``'skip'`` discriminator), else ignored.
            force_fp32: compute in float32 even when ``use_fp16`` (always so off CUDA).

        Returns:
            ``(x, img)``: ``x [N, out_channels, resolution / 2, resolution / 2]`` in float16
            (an FP16 block on CUDA) or float32; ``img`` downsampled 2x for ``'skip'``, else None.
        """
        op = op_name(self)
        with nvtx(self):
            reads_image = self.in_channels == 0 or self.architecture == "skip"
            if x is None and self.in_channels != 0:
                raise ValueError(f"{op}: x must be a tensor of shape [N, {self.in_channels}, {self.resolution}, "
                                 f"{self.resolution}] (only the first block takes None), got None")
            if reads_image:
                _check_features(op, "img", img, self.img_channels, self.resolution)
            device = (x if x is not None else img).device
            dtype = _block_dtype(self.use_fp16, force_fp32, device)
            memory_format = torch.channels_last if self.channels_last and dtype == torch.float16 \
                else torch.contiguous_format
            if x is not None:
                _check_features(op, "x", x, self.in_channels, self.resolution)
                x = x.to(dtype=dtype, memory_format=memory_format)
            if reads_image:
                if x is not None and img.shape[0] != x.shape[0]:
                    raise ValueError(f"{op}: img holds {img.shape[0]} samples but x {x.shape[0]}")
                img = img.to(dtype=dtype, memory_format=memory_format)
                y = self.fromrgb(img)
                x = y if x is None else x + y
                img = _ops.downsample2d(img, self.resample_filter, backend=self.backend) \
                    if self.architecture == "skip" else None
            else:
                img = None

            if self.architecture == "resnet":
                y = self.skip(x, gain=math.sqrt(0.5))
                x = self.conv0(x)
                x = self.conv1(x, gain=math.sqrt(0.5))
                x = y + x
            else:
                x = self.conv0(x)
                x = self.conv1(x)
            return x, img

    def extra_repr(self) -> str:
        return f"resolution={self.resolution:d}, architecture={self.architecture}, use_fp16={self.use_fp16}"


class MinibatchStdLayer(nn.Module):
    """Appends the minibatch standard deviation as ``num_channels`` feature maps:
    ``[N, C, H, W] -> [N, C + num_channels, H, W]``.

    Args:
        group_size: samples per group (``min(group_size, N)``; None: the whole batch).
            N must be divisible by the group size.
        num_channels: how many statistics (the channels are split into this many slices).
    """

    def __init__(self, group_size: Optional[int], num_channels: int = 1):
        super().__init__()
        op = op_name(self)
        self.group_size = None if group_size is None else check_positive_int(op, "group_size", group_size)
        self.num_channels = check_positive_int(op, "num_channels", num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: ``[N, C, H, W]`` floating, C divisible by ``num_channels``.

        Returns:
            ``[N, C + num_channels, H, W]`` in x's dtype.
        """
        op = op_name(self)
        with nvtx(self):
            check_tensor(op, "x", x, "[N, C, H, W]", 4, dtypes=FLOATING)
            n, c, h, w = x.shape
            groups = n if self.group_size is None else min(self.group_size, n)
            if groups == 0 or n % groups != 0:
                raise ValueError(f"{op}: the batch size ({n}) must be a positive multiple of the group size "
                                 f"min(group_size={self.group_size}, N) = {groups}")
            slices = self.num_channels
            if c % slices != 0:
                raise ValueError(f"{op}: x's channels ({c}) must be divisible by num_channels ({slices})")
            y = x.reshape(groups, -1, slices, c // slices, h, w)  # member, group, slice, channels, H, W
            y = y - y.mean(dim=0)
            y = (y.square().mean(dim=0) + 1e-8).sqrt()               # std over each group's members
            y = y.mean(dim=[2, 3, 4]).reshape(-1, slices, 1, 1)      # [N / G, slices, 1, 1]
            y = y.repeat(groups, 1, h, w)                            # sample i gets group i mod (N / G)
            return torch.cat([x, y], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels:d}"


class DiscriminatorEpilogue(nn.Module):
    """StyleGAN2's last discriminator block (``b4``): features ``[N, C, res, res]`` to logits ``[N, 1]``.

    Modules: ``fromrgb`` (``'skip'`` only), ``mbstd`` (:class:`MinibatchStdLayer`, when
    ``mbstd_num_channels > 0``), ``conv`` (3x3, ``C + mbstd_num_channels -> C``, lrelu),
    ``fc`` (``C * res^2 -> C``, lrelu), ``out`` (``C -> cmap_dim``, or 1 without a camera).

    Args:
        in_channels: C.
        cmap_dim: the size of the mapped camera, 0 for an unconditional discriminator.
        resolution: res.
        img_channels: the image's channels (``'skip'``).
        architecture: ``'orig'``, ``'skip'`` or ``'resnet'``.
        mbstd_group_size: :class:`MinibatchStdLayer`'s group size (None: the whole batch).
        mbstd_num_channels: its statistics, 0 for none.
        activation: of ``conv`` and ``fc``.
        conv_clamp: clamp of ``conv``'s output, None for none.
    """

    def __init__(self, in_channels: int, cmap_dim: int, resolution: int, img_channels: int,
                 architecture: str = "resnet", mbstd_group_size: Optional[int] = 4, mbstd_num_channels: int = 1,
                 activation: str = "lrelu", conv_clamp: Optional[float] = None):
        super().__init__()
        op = op_name(self)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"{op}: architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        self.in_channels = check_positive_int(op, "in_channels", in_channels)
        self.cmap_dim = check_positive_int(op, "cmap_dim", cmap_dim, 0)
        self.resolution = check_positive_int(op, "resolution", resolution)
        self.img_channels = check_positive_int(op, "img_channels", img_channels)
        mbstd_num_channels = check_positive_int(op, "mbstd_num_channels", mbstd_num_channels, 0)
        self.architecture = architecture
        if architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, in_channels, kernel_size=1, activation=activation)
        self.mbstd = MinibatchStdLayer(group_size=mbstd_group_size, num_channels=mbstd_num_channels) \
            if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation=activation,
                                conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution ** 2, in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: torch.Tensor, img: Optional[torch.Tensor], cmap: Optional[torch.Tensor],
                force_fp32: bool = False) -> torch.Tensor:
        """Args:
            x: ``[N, in_channels, resolution, resolution]`` floating.
            img: ``[N, img_channels, resolution, resolution]`` (``'skip'``), else ignored.
            cmap: ``[N, cmap_dim]`` floating, the mapped camera (ignored when ``cmap_dim`` is 0).
            force_fp32: unused (the epilogue is always float32).

        Returns:
            float32 logits ``[N, 1]``.
        """
        del force_fp32  # StyleGAN2's signature; the epilogue always computes in float32
        op = op_name(self)
        with nvtx(self):
            _check_features(op, "x", x, self.in_channels, self.resolution)
            x = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            if self.architecture == "skip":
                _check_features(op, "img", img, self.img_channels, self.resolution)
                x = x + self.fromrgb(img.to(dtype=torch.float32, memory_format=torch.contiguous_format))
            if self.mbstd is not None:
                x = self.mbstd(x)
            x = self.conv(x)
            x = self.fc(x.flatten(1))
            x = self.out(x)
            if self.cmap_dim > 0:
                check_tensor(op, "cmap", cmap, f"[N, {self.cmap_dim}]", 2, dtypes=FLOATING)
                if tuple(cmap.shape) != (x.shape[0], self.cmap_dim):
                    raise ValueError(f"{op}: cmap must have shape [N, {self.cmap_dim}] with N = {x.shape[0]}, "
                                     f"got {list(cmap.shape)}")
                x = (x * cmap.to(torch.float32)).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
            return x

    def extra_repr(self) -> str:
        return f"resolution={self.resolution:d}, architecture={self.architecture}, cmap_dim={self.cmap_dim:d}"


class DualDiscriminatorDeform(nn.Module):
    """Portrait4D's camera-conditioned dual discriminator: the super-resolved image, the
    raw image, the correspondence map and the mask, stacked, to one logit per sample.

    Buffer ``resample_filter [4, 4]``; modules ``b<img_resolution>`` ... ``b8``
    (:class:`DiscriminatorBlock`), ``mapping`` (:class:`MappingNetwork`, when ``c_dim >
    0``), ``b4`` (:class:`DiscriminatorEpilogue`). ``img_channels`` (the attribute) is the
    stacked input's channel count: ``img_channels * 2`` with super-resolution (else the
    argument), ``+ 3`` with uv, ``+ 1`` with seg; 10 for the defaults.

    The defaults are the released GenHead discriminator's (31.36M parameters): c_dim 25,
    512 x 512, 3 colour channels, super-resolution, uv and seg, 'resnet', channel_base
    32768, channel_max 512, FP16 in b512-b64 (on CUDA), conv_clamp 256, no camera noise,
    and a minibatch-std group of 2.

    Args:
        c_dim: the camera label's size (25: a flattened 4x4 cam-to-world and 3x3 intrinsics).
        img_resolution: the input's height and width, a power of two >= 8.
        img_channels: the colour channels of one image.
        architecture: ``'orig'``, ``'skip'`` or ``'resnet'``.
        channel_base, channel_max: block ``res`` has ``min(channel_base // res, channel_max)`` channels.
        num_fp16_res: blocks at the highest this many resolutions are FP16 (on CUDA), at most down to b8.
        conv_clamp: clamp of the convolutions' outputs, None for none.
        cmap_dim: the mapped camera's size (None: the b4 channels).
        disc_c_noise: during the forward, the camera gets Gaussian noise of this many
            standard deviations (per label entry, over the batch); 0 for none.
        block_kwargs: more :class:`DiscriminatorBlock` arguments (``freeze_layers``, ...).
        mapping_kwargs: more :class:`MappingNetwork` arguments (``num_layers``, ``lr_multiplier``, ...).
        epilogue_kwargs: more :class:`DiscriminatorEpilogue` arguments; None is the
            released ``{'mbstd_group_size': 2}`` (a given dict is used as it is: a
            missing ``mbstd_group_size`` means the epilogue's default of 4).
        has_superresolution: the input holds a super-resolved and a raw image.
        has_uv: the input holds the 3-channel correspondence map.
        has_seg: the input holds the 1-channel mask.
    """

    def __init__(self, c_dim: int = 25, img_resolution: int = 512, img_channels: int = 3,
                 architecture: str = "resnet", channel_base: int = 32768, channel_max: int = 512,
                 num_fp16_res: int = 4, conv_clamp: Optional[float] = 256, cmap_dim: Optional[int] = None,
                 disc_c_noise: float = 0, block_kwargs: Optional[dict] = None, mapping_kwargs: Optional[dict] = None,
                 epilogue_kwargs: Optional[dict] = None, has_superresolution: bool = True, has_uv: bool = True,
                 has_seg: bool = True):
        super().__init__()
        op = op_name(self)
        self.c_dim = check_positive_int(op, "c_dim", c_dim, 0)
        img_resolution = check_positive_int(op, "img_resolution", img_resolution, 8)
        if img_resolution & (img_resolution - 1) != 0:
            raise ValueError(f"{op}: img_resolution must be a power of two >= 8, got {img_resolution}")
        img_channels = check_positive_int(op, "img_channels", img_channels)
        num_fp16_res = check_positive_int(op, "num_fp16_res", num_fp16_res, 0)
        if isinstance(disc_c_noise, bool) or not isinstance(disc_c_noise, (int, float)) \
                or not math.isfinite(disc_c_noise) or disc_c_noise < 0:
            raise ValueError(f"{op}: disc_c_noise must be a finite number >= 0, got {disc_c_noise!r}")
        self.has_superresolution = bool(has_superresolution)
        self.has_uv = bool(has_uv)
        self.has_seg = bool(has_seg)
        self.color_channels = img_channels
        if self.has_superresolution:
            img_channels *= 2
        if self.has_uv:
            img_channels += 3
        if self.has_seg:
            img_channels += 1
        self.img_resolution = img_resolution
        self.img_resolution_log2 = img_resolution.bit_length() - 1
        self.img_channels = img_channels
        self.disc_c_noise = float(disc_c_noise)
        self.block_resolutions = [2 ** i for i in range(self.img_resolution_log2, 2, -1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions + [4]}
        for res, count in channels.items():
            if count < 1:
                raise ValueError(f"{op}: channel_base ({channel_base}) // {res} must be >= 1 for every block")
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)
        if cmap_dim is None:
            cmap_dim = channels[4]
        if self.c_dim == 0:
            cmap_dim = 0
        self.cmap_dim = check_positive_int(op, "cmap_dim", cmap_dim, 0)
        if epilogue_kwargs is None:
            epilogue_kwargs = {"mbstd_group_size": RELEASED_MBSTD_GROUP_SIZE}

        common = dict(img_channels=img_channels, architecture=architecture, conv_clamp=conv_clamp)
        layer_index = 0
        for res in self.block_resolutions:
            block = DiscriminatorBlock(channels[res] if res < img_resolution else 0, channels[res], channels[res // 2],
                                       resolution=res, first_layer_idx=layer_index, use_fp16=(res >= fp16_resolution),
                                       **(block_kwargs or {}), **common)
            setattr(self, f"b{res}", block)
            layer_index += block.num_layers
        if self.c_dim > 0:
            self.mapping = MappingNetwork(z_dim=0, c_dim=self.c_dim, w_dim=self.cmap_dim, num_ws=None,
                                          w_avg_beta=None, **(mapping_kwargs or {}))
        self.b4 = DiscriminatorEpilogue(channels[4], cmap_dim=self.cmap_dim, resolution=4, **epilogue_kwargs,
                                        **common)
        self.register_buffer("resample_filter", _ops.setup_filter([1, 3, 3, 1]))

    def _entry(self, img: Mapping[str, torch.Tensor], name: str, channels: Optional[int]) -> torch.Tensor:
        """``img[name]``: a floating ``[N, channels, H, W]`` tensor with H == W."""
        op = op_name(self)
        if name not in img:
            raise ValueError(f"{op}: img has no entry {name!r} (entries: {sorted(img)})")
        c = "C" if channels is None else str(channels)
        value = check_tensor(op, f"img[{name!r}]", img[name], f"[N, {c}, H, H]", 4, dtypes=FLOATING)
        if (channels is not None and value.shape[1] != channels) or value.shape[2] != value.shape[3]:
            raise ValueError(f"{op}: img[{name!r}] must have shape [N, {c}, H, H] (square), got {list(value.shape)}")
        return value

    def compose_input(self, img: Mapping[str, torch.Tensor], img_name: str = "image_sr", img_raw_name: str = "image",
                      uv_name: str = "uv", seg_name: str = "seg") -> torch.Tensor:
        """The stacked input ``[N, img_channels, img_resolution, img_resolution]``: the
        image (``img_name``; with super-resolution, then the raw image ``img_raw_name``
        resized to the image's size by :func:`filtered_resizing`), then ``uv_name`` and
        ``seg_name`` (each resized to ``img_resolution`` when its size differs)."""
        op = op_name(self)
        if not isinstance(img, Mapping):
            raise TypeError(f"{op}: img must be a dict of tensors with the entries {img_name!r}"
                            f"{', ' + repr(img_raw_name) if self.has_superresolution else ''}"
                            f"{', ' + repr(uv_name) if self.has_uv else ''}"
                            f"{', ' + repr(seg_name) if self.has_seg else ''}, got {type(img).__name__}")
        image = self._entry(img, img_name, self.color_channels)
        if image.shape[-1] != self.img_resolution:
            raise ValueError(f"{op}: img[{img_name!r}] must be {self.img_resolution} x {self.img_resolution}, "
                             f"got {list(image.shape)}")
        parts = [image]
        if self.has_superresolution:
            raw = self._entry(img, img_raw_name, self.color_channels)
            parts.append(raw if raw.shape[-1] == image.shape[-1] else filtered_resizing(raw, image.shape[-1]))
        for present, name, channels in ((self.has_uv, uv_name, 3), (self.has_seg, seg_name, 1)):
            if present:
                entry = self._entry(img, name, channels)
                parts.append(entry if entry.shape[-1] == self.img_resolution
                             else filtered_resizing(entry, self.img_resolution))
        for part in parts:
            if part.shape[0] != image.shape[0] or part.device != image.device:
                raise ValueError(f"{op}: every entry of img must hold {image.shape[0]} samples on {image.device}; "
                                 f"one holds {part.shape[0]} on {part.device}")
        return torch.cat(parts, dim=1)

    def forward(self, img: Mapping[str, torch.Tensor], c: Optional[torch.Tensor], img_name: str = "image_sr",
                img_raw_name: str = "image", uv_name: str = "uv", seg_name: str = "seg", update_emas: bool = False,
                **block_kwargs) -> torch.Tensor:
        """Args:
            img: a dict of floating tensors: ``img[img_name]`` ``[N, 3, R, R]`` with ``R =
                img_resolution`` (blurred beforehand during the blur fade, see
                :func:`blur_discriminator_input`); ``img[img_raw_name]`` ``[N, 3, r, r]``
                (super-resolution only; any r); ``img[uv_name]`` ``[N, 3, s, s]`` and
                ``img[seg_name]`` ``[N, 1, s, s]`` (any s).
            c: ``[N, c_dim]`` floating camera labels (ignored, may be None, when c_dim is 0).
            img_name, img_raw_name, uv_name, seg_name: the dict's entry names.
            update_emas: unused (StyleGAN2's signature).
            **block_kwargs: passed to every block (``force_fp32``).

        Returns:
            float32 logits ``[N, 1]``.
        """
        del update_emas  # StyleGAN2's signature; the discriminator keeps no running averages
        op = op_name(self)
        with nvtx(self):
            x = self.compose_input(img, img_name, img_raw_name, uv_name, seg_name)
            cmap = None
            if self.c_dim > 0:
                check_tensor(op, "c", c, f"[N, {self.c_dim}]", 2, dtypes=FLOATING)
                if tuple(c.shape) != (x.shape[0], self.c_dim):
                    raise ValueError(f"{op}: c must have shape [N, {self.c_dim}] with N = {x.shape[0]}, "
                                     f"got {list(c.shape)}")
                if self.disc_c_noise > 0:
                    c = c + torch.randn_like(c) * c.std(0) * self.disc_c_noise
            features, image = None, x
            for res in self.block_resolutions:
                features, image = getattr(self, f"b{res}")(features, image, **block_kwargs)
            if self.c_dim > 0:
                cmap = self.mapping(None, c)
            return self.b4(features, image, cmap)

    def extra_repr(self) -> str:
        return f"c_dim={self.c_dim:d}, img_resolution={self.img_resolution:d}, img_channels={self.img_channels:d}"
