"""ArcFace's face-recognition backbone, the "improved ResNet" (IResNet) of insightface's
``arcface_torch``, with its module, parameter and buffer names, so the released
``backbone.pth`` state dicts load with ``load_state_dict(strict=True)``
(``tests/data/iresnet18_state_dict.txt`` lists iresnet18's names and shapes).

Portrait4D's reconstructor training compares identity embeddings of its renders and targets
with :func:`iresnet18` (the loss is :class:`head4d.train.identity.IdentityLoss`).

Structure (input ``[N, 3, 112, 112]``, RGB in ``[-1, 1]``; output ``[N, num_features]``):

- Stem: ``conv1`` (3x3, stride 1, padding 1, 3 -> 64, no bias), ``bn1``, ``prelu``
  (one slope per channel).
- ``layer1`` .. ``layer4``: stages of :class:`IBasicBlock` with 64, 128, 256, 512 channels;
  each stage halves the resolution in its first block (112 -> 56 -> 28 -> 14 -> 7). The
  stage depths are ``(2, 2, 2, 2)`` for iresnet18, ``(3, 4, 6, 3)`` for iresnet34,
  ``(3, 4, 14, 3)`` for iresnet50 and ``(3, 13, 30, 3)`` for iresnet100.
- Head: ``bn2`` (BatchNorm2d over the 512 channels), flatten (channel-major, ``512 * 7 * 7``
  = 25,088 numbers), ``dropout`` (p = 0 in the released models), ``fc`` (Linear 25,088 ->
  512, with bias), ``features`` (BatchNorm1d over the 512 outputs, its weight fixed at 1 and
  not trained).

An :class:`IBasicBlock` is pre-activation-like, with BatchNorm on both sides of each conv and
no activation after the sum: ``bn1``, ``conv1`` (3x3, stride 1), ``bn2``, ``prelu``, ``conv2``
(3x3, carrying the block's stride), ``bn3``; the shortcut is the input itself or, in a stage's
first block, ``downsample`` = (1x1 conv with the stride, no bias; BatchNorm2d) applied to the
block's input. Every conv is bias-free, every BatchNorm has eps 1e-5.

BatchNorm statistics: the embedding is computed with the running statistics (eval mode) when
the module is in eval mode, as a loss network always is; :class:`IdentityLoss` keeps it there.

The output is not normalized: callers compare embeddings by cosine similarity.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._checks import check_dim, check_tensor
from ._common import nvtx, op_name

#: Side of the square face crops the network takes.
INPUT_SIZE = 112
#: Channels of the four stages.
STAGE_CHANNELS = (64, 128, 256, 512)
#: Spatial size after the four stride-2 stages: 112 / 16.
FINAL_SIZE = 7
#: Blocks per stage of each released depth.
STAGE_DEPTHS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
BATCH_NORM_EPS = 1e-5


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """A bias-free 3x3 convolution with padding 1."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """One residual block: ``bn3(conv2(prelu(bn2(conv1(bn1(x)))))) + shortcut(x)``.

    Args:
        inplanes: channels of the input ``[N, inplanes, H, W]``.
        planes: channels of the output ``[N, planes, H / stride, W / stride]``.
        stride: 1 or 2, applied by ``conv2`` and by the shortcut's 1x1 conv.
        downsample: the shortcut (``nn.Sequential(conv 1x1, BatchNorm2d)``), or ``None`` for the
            identity (then ``inplanes == planes`` and ``stride == 1``).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None, groups: int = 1,
                 base_width: int = 64, dilation: int = 1):
        super().__init__()
        if groups != 1 or base_width != 64 or dilation != 1:
            raise ValueError(f"{op_name(self)}: only groups=1, base_width=64 and dilation=1 exist in the released "
                             f"models, got groups={groups}, base_width={base_width}, dilation={dilation}")
        if downsample is None and (stride != 1 or inplanes != planes):
            raise ValueError(f"{op_name(self)}: a block with stride {stride} from {inplanes} to {planes} channels "
                             f"needs a downsample shortcut")
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BATCH_NORM_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=BATCH_NORM_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=BATCH_NORM_EPS)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        residual = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return residual + shortcut


def _stage(inplanes: int, planes: int, depth: int) -> nn.Sequential:
    """``depth`` blocks; the first halves the resolution and changes the channel count."""
    shortcut = nn.Sequential(
        nn.Conv2d(inplanes, planes, kernel_size=1, stride=2, bias=False),
        nn.BatchNorm2d(planes, eps=BATCH_NORM_EPS),
    )
    blocks = [IBasicBlock(inplanes, planes, stride=2, downsample=shortcut)]
    blocks += [IBasicBlock(planes, planes) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class IResNet(nn.Module):
    """ArcFace's IResNet: a face crop ``[N, 3, 112, 112]`` in ``[-1, 1]`` to an identity
    embedding ``[N, num_features]`` (see the module docstring for the layers).

    Args:
        block: the residual block class (:class:`IBasicBlock`, the only one released).
        layers: blocks per stage, four positive ints (e.g. ``(2, 2, 2, 2)`` for iresnet18).
        dropout: dropout probability before ``fc`` (0 in the released models; active only in
            training mode).
        num_features: embedding size (512 in the released models).
        zero_init_residual: arcface_torch's option to start each block's ``bn2`` weight at 0.
        groups, width_per_group, replace_stride_with_dilation: accepted for arcface_torch's
            signature; only their defaults (1, 64, no dilation) exist.
        fp16: compute the stem and the four stages under float16 autocast on CUDA; the head,
            from ``bn2`` on, runs in float32 (arcface_torch's ``fp16`` option leaves autocast
            after the flatten; here it ends one BatchNorm earlier).

    ``forward(x)``: ``x`` ``[N, 3, 112, 112]`` floating, in the dtype of the parameters;
    returns ``[N, num_features]`` in that dtype.
    """

    fc_scale = FINAL_SIZE * FINAL_SIZE

    def __init__(self, block=IBasicBlock, layers: Sequence[int] = STAGE_DEPTHS["iresnet18"], dropout: float = 0.0,
                 num_features: int = 512, zero_init_residual: bool = False, groups: int = 1,
                 width_per_group: int = 64, replace_stride_with_dilation=None, fp16: bool = False):
        super().__init__()
        name = op_name(self)
        if groups != 1 or width_per_group != 64 or (replace_stride_with_dilation is not None
                                                     and any(replace_stride_with_dilation)):
            raise ValueError(f"{name}: only groups=1, width_per_group=64 and no dilation exist in the released "
                             f"models, got groups={groups}, width_per_group={width_per_group}, "
                             f"replace_stride_with_dilation={replace_stride_with_dilation}")
        if block is not IBasicBlock:
            raise ValueError(f"{name}: block must be IBasicBlock, got {block!r}")
        layers = tuple(layers)
        if len(layers) != 4 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in layers):
            raise ValueError(f"{name}: layers must be four positive ints (blocks per stage), got {layers}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        self.layers_per_stage = layers
        self.num_features = num_features
        self.fp16 = bool(fp16)

        stem_channels = STAGE_CHANNELS[0]
        self.conv1 = _conv3x3(3, stem_channels)
        self.bn1 = nn.BatchNorm2d(stem_channels, eps=BATCH_NORM_EPS)
        self.prelu = nn.PReLU(stem_channels)
        inplanes = stem_channels
        for index, (planes, depth) in enumerate(zip(STAGE_CHANNELS, layers), start=1):
            setattr(self, f"layer{index}", _stage(inplanes, planes, depth))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(inplanes, eps=BATCH_NORM_EPS)
        self.dropout = nn.Dropout(p=float(dropout))
        self.fc = nn.Linear(inplanes * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BATCH_NORM_EPS)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """arcface_torch's initialization (for training from scratch; loaded weights replace
        it): convs N(0, 0.1), 2D BatchNorms weight 1 and bias 0, the embedding BatchNorm's
        weight 1 and frozen."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, IBasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = op_name(self)
        shape = f"[N, 3, {INPUT_SIZE}, {INPUT_SIZE}]"
        check_tensor(name, "x", x, shape, 4)
        check_dim(name, "x", x, 1, 3, shape)
        check_dim(name, "x", x, 2, INPUT_SIZE, shape)
        check_dim(name, "x", x, 3, INPUT_SIZE, shape)
        with nvtx(self):
            half = self.fp16 and x.is_cuda
            with torch.autocast("cuda", dtype=torch.float16, enabled=half):
                x = self.prelu(self.bn1(self.conv1(x)))
                x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            if half:
                x = x.float()
            x = self.bn2(x).flatten(1)
            return self.features(self.fc(self.dropout(x)))


def _iresnet(arch: str, pretrained: bool, **kwargs) -> IResNet:
    if pretrained:
        raise ValueError(f"head4d.nn.{arch}: pretrained weights are not bundled; build the network and load the "
                         f"released backbone.pth with load_state_dict (or use IdentityLoss.from_file)")
    return IResNet(IBasicBlock, STAGE_DEPTHS[arch], **kwargs)


def iresnet18(pretrained: bool = False, progress: bool = True, **kwargs) -> IResNet:
    """ArcFace's iresnet18 (stages of 2, 2, 2, 2 blocks), the network Portrait4D's identity
    loss uses. Keyword arguments go to :class:`IResNet` (``dropout``, ``num_features``, ``fp16``);
    ``pretrained=True`` raises (no weights are bundled), ``progress`` is ignored (arcface_torch's
    signature)."""
    return _iresnet("iresnet18", pretrained, **kwargs)


def iresnet34(pretrained: bool = False, progress: bool = True, **kwargs) -> IResNet:
    """ArcFace's iresnet34 (stages of 3, 4, 6, 3 blocks)."""
    return _iresnet("iresnet34", pretrained, **kwargs)


def iresnet50(pretrained: bool = False, progress: bool = True, **kwargs) -> IResNet:
    """ArcFace's iresnet50 (stages of 3, 4, 14, 3 blocks)."""
    return _iresnet("iresnet50", pretrained, **kwargs)


def iresnet100(pretrained: bool = False, progress: bool = True, **kwargs) -> IResNet:
    """ArcFace's iresnet100 (stages of 3, 13, 30, 3 blocks)."""
    return _iresnet("iresnet100", pretrained, **kwargs)
