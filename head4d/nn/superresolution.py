"""EG3D's ``SuperresolutionHybrid8XDC`` with Portrait4D's ``use_ws_ones``: the network
that turns GenHead's 64 x 64 rendered feature image into the 512 x 512 image.

Upstream names and arguments (so a Portrait4D state dict loads as it is): two
:class:`~head4d.nn.stylegan2.SynthesisBlock` of architecture ``'skip'``,

- ``block0``: ``channels`` -> 256 channels at 256 x 256 (it upsamples its 128 x 128 input),
- ``block1``: 256 -> 128 channels at 512 x 512, the last block,

both with 3 image channels, FP16 (on CUDA) and ``conv_clamp`` 256 when
``sr_num_fp16_res > 0`` (FP32 and no clamp otherwise). The module has no parameter or
buffer of its own; ``num_fp16_res``, ``conv_clamp``, ``channel_base`` and ``channel_max``
are accepted and ignored, as upstream.

Forward: the feature image ``x`` and the ``rgb`` image are resized to 128 x 128 (bilinear,
``align_corners=False``, antialiased when ``sr_antialias``) unless ``x`` is already
128 wide; each block reads 3 ws, the last entry of ``ws`` (or ``ws_super``) repeated
3 times, or all ones when built with ``use_ws_ones`` (GenHead's setting: its
super-resolution is then unconditional, every style being ``affine(1)``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import FLOATING, check_tensor
from ._common import check_positive_int, nvtx, op_name
from .stylegan2 import SynthesisBlock

__all__ = ["SuperresolutionHybrid8XDC"]


class SuperresolutionHybrid8XDC(nn.Module):
    """128 x 128 features and rgb -> a 512 x 512 rgb image (8x the 64 x 64 rendering).

    Modules: ``block0``, ``block1`` (:class:`~head4d.nn.stylegan2.SynthesisBlock`).

    Args:
        channels: the feature image's channels (GenHead: 32).
        img_resolution: the output resolution; must be 512.
        sr_num_fp16_res: > 0 makes both blocks FP16 (on CUDA) with ``conv_clamp`` 256.
        sr_antialias: antialias the bilinear resize of the inputs to 128 x 128.
        num_fp16_res, conv_clamp, channel_base, channel_max: ignored (upstream's
            arguments, which the generator passes along).
        use_ws_ones: feed every block w = ones instead of the last w.
        **block_kwargs: more :class:`~head4d.nn.stylegan2.SynthesisBlock` arguments
            (``fused_modconv_default``, ...).
    """

    #: The resolution the inputs are resized to.
    input_resolution = 128

    def __init__(self, channels: int, img_resolution: int, sr_num_fp16_res: int, sr_antialias: bool,
                 num_fp16_res: int = 4, conv_clamp: Optional[float] = None, channel_base: Optional[int] = None,
                 channel_max: Optional[int] = None, use_ws_ones: bool = False, **block_kwargs):
        super().__init__()
        del num_fp16_res, conv_clamp, channel_base, channel_max  # upstream accepts and ignores them
        op = op_name(self)
        channels = check_positive_int(op, "channels", channels)
        if img_resolution != 512:
            raise ValueError(f"{op}: img_resolution must be 512 (the network upsamples 128 -> 512), "
                             f"got {img_resolution!r}")
        use_fp16 = check_positive_int(op, "sr_num_fp16_res", sr_num_fp16_res, 0) > 0
        self.sr_antialias = bool(sr_antialias)
        self.use_ws_ones = bool(use_ws_ones)
        self.channels = channels
        clamp = 256 if use_fp16 else None
        self.block0 = SynthesisBlock(channels, 256, w_dim=512, resolution=256, img_channels=3, is_last=False,
                                     use_fp16=use_fp16, conv_clamp=clamp, **block_kwargs)
        self.block1 = SynthesisBlock(256, 128, w_dim=512, resolution=512, img_channels=3, is_last=True,
                                     use_fp16=use_fp16, conv_clamp=clamp, **block_kwargs)

    def _block_ws(self, ws: torch.Tensor, ws_super: Optional[torch.Tensor]) -> torch.Tensor:
        """The ``[N, 3, 512]`` ws each block reads."""
        op = op_name(self)
        source = ws[:, -1:]
        if ws_super is not None:
            if not isinstance(ws_super, torch.Tensor) or ws_super.dtype not in FLOATING:
                raise TypeError(f"{op}: ws_super must be a floating torch.Tensor of shape [N, 512] or [N, 1, 512], "
                                f"got {type(ws_super).__name__}"
                                + (f" of dtype {ws_super.dtype}" if isinstance(ws_super, torch.Tensor) else ""))
            source = ws_super.unsqueeze(1) if ws_super.dim() == 2 else ws_super
            if tuple(source.shape) != (ws.shape[0], 1, 512):
                raise ValueError(f"{op}: ws_super must have shape [N, 512] or [N, 1, 512] with N = {ws.shape[0]}, "
                                 f"got {list(ws_super.shape)}")
        block_ws = source.repeat(1, 3, 1)
        return torch.ones_like(block_ws) if self.use_ws_ones else block_ws

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, ws: torch.Tensor, ws_super: Optional[torch.Tensor] = None,
                **block_kwargs) -> torch.Tensor:
        """Args:
            rgb: ``[N, 3, H, H]`` floating, the low-resolution image (GenHead: the first
                3 channels of the 64 x 64 feature image).
            x: ``[N, channels, H, H]`` floating, the feature image; both are resized to
                128 x 128 unless ``H == 128``.
            ws: ``[N, K, 512]`` floating, K >= 1; only ``ws[:, -1]`` is read (nothing when
                ``use_ws_ones``).
            ws_super: ``[N, 512]`` or ``[N, 1, 512]`` floating, read instead of
                ``ws[:, -1]`` when given (and ``use_ws_ones`` is off).
            **block_kwargs: passed to both blocks (``noise_mode``, ``fused_modconv``, ...).

        Returns:
            float32 ``[N, 3, 512, 512]``.
        """
        op = op_name(self)
        with nvtx(self):
            check_tensor(op, "rgb", rgb, "[N, 3, H, H]", 4, dtypes=FLOATING)
            check_tensor(op, "x", x, f"[N, {self.channels}, H, H]", 4, dtypes=FLOATING)
            check_tensor(op, "ws", ws, "[N, K, 512]", 3, dtypes=FLOATING)
            if rgb.shape[1] != 3 or rgb.shape[2] != rgb.shape[3]:
                raise ValueError(f"{op}: rgb must have shape [N, 3, H, H], got {list(rgb.shape)}")
            if x.shape[1] != self.channels or x.shape[2] != x.shape[3]:
                raise ValueError(f"{op}: x must have shape [N, {self.channels}, H, H], got {list(x.shape)}")
            if ws.shape[1] < 1 or ws.shape[2] != 512:
                raise ValueError(f"{op}: ws must have shape [N, K, 512] with K >= 1, got {list(ws.shape)}")
            if not rgb.shape[0] == x.shape[0] == ws.shape[0]:
                raise ValueError(f"{op}: rgb, x and ws must hold the same number of samples, got "
                                 f"{rgb.shape[0]}, {x.shape[0]} and {ws.shape[0]}")
            block_ws = self._block_ws(ws, ws_super)
            size = self.input_resolution
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=self.sr_antialias)
                rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False,
                                    antialias=self.sr_antialias)
            x, rgb = self.block0(x, rgb, block_ws, **block_kwargs)
            x, rgb = self.block1(x, rgb, block_ws, **block_kwargs)
            return rgb

    def extra_repr(self) -> str:
        return f"channels={self.channels}, sr_antialias={self.sr_antialias}, use_ws_ones={self.use_ws_ones}"
