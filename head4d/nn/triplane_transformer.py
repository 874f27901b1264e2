"""Portrait4D's reconstructor: the canonicalization / re-enactment module
(:class:`EncoderCanonical`) and the triplane decoder (:class:`DecoderTriplane`), with the
released module names, parameter names and call signatures, so that the released
``encoder_canonical.*`` and ``generator_triplane.*`` state dicts load as they are
(``docs/design.md``, "The reconstructor's transformer").

Data flow at Portrait4D's sizes (float32 unless the parameters are cast)::

    x  [B, 256, 64, 64]  global features        y, y_x  [B, 548]  driving, source motion
    patch_embed                 -> tokens [B, 1024, 1024], grid (32, 32)
    trans_blocks_neutral x 4    (cross-attention to the source's 64 motion tokens)
    trans_blocks_motion x 4     (cross-attention to the driver's 64 motion tokens)
    pixel shuffle               -> lr [B, 256, 64, 64]
    convs                       -> sr [B, 96, 256, 256]
    DecoderTriplane(sr, detail [B, 96, 256, 256]) -> planes [B, 96, 256, 256] (3 x 32 channels)

Reshapes between tokens, grids and pixel-shuffled maps are einops patterns
(:mod:`head4d.nn._common`).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from einops import rearrange
from torch import nn

from .._checks import FLOATING, check_same_device, check_tensor
from ._common import (check_grid, check_positive_float, check_positive_int, check_tokens, init_conv,
                      init_layer_norm, init_linear, nvtx, op_name, tokens_to_shuffled_grid)
from .blocks import Block, BlockCross, Scale
from .embed import PatchEmbed

__all__ = ["DecoderTriplane", "EncoderCanonical"]

#: Slope of every LeakyReLU in both modules.
NEGATIVE_SLOPE = 0.01
#: The triplane decoder's LeakyReLUs follow convs whose outputs nothing else reads, so they
#: run in place: autograd keeps their results (the next conv's saved inputs) rather than
#: their inputs too; the gradients are the same.
CONV_LEAKY_INPLACE = True


def _conv_leaky() -> nn.Module:
    """The LeakyReLU after a triplane-decoder conv (slope :data:`NEGATIVE_SLOPE`, in place
    per :data:`CONV_LEAKY_INPLACE`)."""
    return nn.LeakyReLU(NEGATIVE_SLOPE, inplace=CONV_LEAKY_INPLACE)
#: Channels of the canonical feature map (``sr``), of the detail features and of the planes.
PLANE_CHANNELS = 96


def _released_init(module: nn.Module) -> None:
    """The released initialization, applied to every submodule: Linear truncated normal
    (std 0.02) with zero bias, LayerNorm ones and zeros, Conv2d He normal over the
    fan-out with zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            init_linear(m)
        elif isinstance(m, nn.LayerNorm):
            init_layer_norm(m)
        elif isinstance(m, nn.Conv2d):
            init_conv(m)


def _conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)


def _check_map(op: str, name: str, x, channels: int) -> None:
    """``x`` is a non-empty floating ``[B, channels, H, W]`` map."""
    check_tensor(op, name, x, f"[B, {channels}, H, W]", 4, dtypes=FLOATING)
    if x.shape[1] != channels:
        raise ValueError(f"{op}: {name} must have {channels} channels in dimension 1, got shape {list(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{op}: {name} must be non-empty, got shape {list(x.shape)}")


class EncoderCanonical(nn.Module):
    """The canonicalization and re-enactment module of Portrait4D's reconstructor.

    The global features are embedded to tokens (``patch_embed``, a 3x3 stride-2 conv and
    LayerNorm), **neutralized** by ``num_blocks_neutral`` :class:`BlockCross` blocks
    attending to the SOURCE image's motion tokens (``y_x``), **re-enacted** by
    ``num_blocks_motion`` blocks attending to the DRIVING motion tokens (``y``), then
    pixel-shuffled (x2) to ``lr`` and upsampled by ``convs`` to ``sr``. Each motion vector
    becomes ``H_y * W_y`` motion tokens of ``embed_dims`` channels: ``mapping_layers``
    pairs of (Linear, LeakyReLU 0.01) (``maps`` for the driver, ``maps_neutral`` for the
    source; none when 0), then a Linear (``proj_y``, ``proj_y_neutral``) whose output
    ``t * embed_dims + c`` is channel ``c`` of token ``t``. The motion ``scale`` multiplies
    the cross-attention of every block (0 = static: the output then does not depend on
    the motion).

    ``convs``: ``0`` bilinear x2 (``align_corners=True``, the released
    ``UpsamplingBilinear2d``), ``1`` conv 3x3 ``in_chans`` -> 128, ``2`` ReLU, ``3``
    bilinear x2 (``align_corners=True``), ``4`` conv 128 -> 128, ``5`` ReLU, ``6`` conv
    128 -> 96.

    Weights as the released code leaves them: every Linear truncated normal (std 0.02)
    with zero bias, LayerNorms ones and zeros, every conv He normal over the fan-out with
    zero bias. The paper zero-initializes the cross-attentions' output projections; the
    released module re-initializes every Linear after building its blocks, so they end
    up random, and so do they here (the released final state).

    Args (the released names; defaults: Portrait4D's released v1 model):
        in_chans: channels of the global features ``x``; must be ``embed_dims / 4`` (the
            pixel-shuffled tokens feed ``convs``, built for ``in_chans``).
        embed_dims: token channels (the motion tokens' too).
        mot_dims: motion vector size (548: PD-FGC's eyes 6 + emotion 30 + mouth 512; 109
            for FLAME motion: expression 100 + jaw 3 + eyes 6).
        mot_dims_hidden: width of the motion mapping layers.
        H_y, W_y: the motion tokens, ``H_y * W_y`` of them.
        num_heads: attention heads (``embed_dims / num_heads`` one of 32 ... 512).
        mlp_ratios: Mix-FFN hidden channels over ``embed_dims``.
        num_blocks_neutral, num_blocks_motion: canonicalization / re-enactment blocks.
        mapping_layers: (Linear, LeakyReLU) pairs before ``proj_y`` / ``proj_y_neutral``.
        backend: attention backend of every block (keyword only; see
            :class:`~head4d.nn.Attention`).

    Submodules, in the released state dict's order: ``maps``, ``maps_neutral``
    (``ModuleList`` or ``None``), ``proj_y_neutral``, ``proj_y``, ``patch_embed``,
    ``trans_blocks_neutral``, ``trans_blocks_motion``, ``convs``. At the defaults: 214
    parameter tensors, 172,209,504 parameters.
    """

    def __init__(self, in_chans: int = 256, embed_dims: int = 1024, mot_dims: int = 548, mot_dims_hidden: int = 512,
                 H_y: int = 8, W_y: int = 8, num_heads: int = 4, mlp_ratios: float = 2,  # noqa: N803 (released names)
                 num_blocks_neutral: int = 4, num_blocks_motion: int = 4, mapping_layers: int = 2, *,
                 backend: Optional[str] = None):
        super().__init__()
        op = op_name(self)
        self.in_chans = check_positive_int(op, "in_chans", in_chans)
        self.embed_dims = check_positive_int(op, "embed_dims", embed_dims)
        if self.embed_dims != 4 * self.in_chans:
            raise ValueError(f"{op}: embed_dims must be 4 * in_chans (the pixel-shuffled tokens, embed_dims / 4 "
                             f"channels, feed convs built for in_chans), got embed_dims {embed_dims} and "
                             f"in_chans {in_chans}")
        self.mot_dims = check_positive_int(op, "mot_dims", mot_dims)
        self.mot_dims_hidden = check_positive_int(op, "mot_dims_hidden", mot_dims_hidden)
        self.H_y = check_positive_int(op, "H_y", H_y)
        self.W_y = check_positive_int(op, "W_y", W_y)
        self.num_blocks_neutral = check_positive_int(op, "num_blocks_neutral", num_blocks_neutral, minimum=0)
        self.num_blocks_motion = check_positive_int(op, "num_blocks_motion", num_blocks_motion, minimum=0)
        self.mapping_layers = check_positive_int(op, "mapping_layers", mapping_layers, minimum=0)
        check_positive_float(op, "mlp_ratios", mlp_ratios)

        self.maps = self._mapping() if self.mapping_layers > 0 else None
        self.maps_neutral = self._mapping() if self.mapping_layers > 0 else None
        proj_in = self.mot_dims_hidden if self.mapping_layers > 0 else self.mot_dims
        self.proj_y_neutral = nn.Linear(proj_in, self.H_y * self.W_y * self.embed_dims)
        self.proj_y = nn.Linear(proj_in, self.H_y * self.W_y * self.embed_dims)
        self.patch_embed = PatchEmbed(self.in_chans, self.embed_dims)
        self.trans_blocks_neutral = nn.ModuleList(
            BlockCross(self.embed_dims, num_heads, mlp_ratio=mlp_ratios, qkv_bias=True, backend=backend)
            for _ in range(self.num_blocks_neutral))
        self.trans_blocks_motion = nn.ModuleList(
            BlockCross(self.embed_dims, num_heads, mlp_ratio=mlp_ratios, qkv_bias=True, backend=backend)
            for _ in range(self.num_blocks_motion))
        self.convs = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            _conv3x3(self.in_chans, 128), nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            _conv3x3(128, 128), nn.ReLU(),
            _conv3x3(128, PLANE_CHANNELS))
        self.reset_parameters()

    def _mapping(self) -> nn.ModuleList:
        """``[Linear, LeakyReLU] * mapping_layers``: ``mot_dims`` -> ``mot_dims_hidden`` -> ..."""
        layers = []
        for i in range(self.mapping_layers):
            layers += [nn.Linear(self.mot_dims if i == 0 else self.mot_dims_hidden, self.mot_dims_hidden),
                       nn.LeakyReLU(NEGATIVE_SLOPE)]
        return nn.ModuleList(layers)

    def reset_parameters(self) -> None:
        """The released final state (see the class docstring): the cross-attentions'
        output projections random like every other Linear."""
        _released_init(self)

    @property
    def num_motion_tokens(self) -> int:
        return self.H_y * self.W_y

    def motion_tokens(self, motion: torch.Tensor, source: bool) -> torch.Tensor:
        """One motion vector per sample to its motion tokens.

        Args:
            motion: ``[B, mot_dims]`` floating motion vectors (dtype of the parameters,
                or any under autocast).
            source: ``True`` for the source image's motion (``maps_neutral``,
                ``proj_y_neutral``; the canonicalization blocks' context), ``False`` for
                the driving motion (``maps``, ``proj_y``; the re-enactment blocks').

        Returns:
            ``[B, H_y * W_y, embed_dims]`` in the layers' output dtype.
        """
        maps, proj = (self.maps_neutral, self.proj_y_neutral) if source else (self.maps, self.proj_y)
        for layer in maps if maps is not None else ():
            motion = layer(motion)
        return rearrange(proj(motion), "b (t c) -> b t c", t=self.num_motion_tokens)

    def _check_motion(self, op: str, name: str, motion, batch: int, like: torch.Tensor) -> None:
        check_tensor(op, name, motion, f"[B, {self.mot_dims}] = [{batch}, {self.mot_dims}]", 2, dtypes=FLOATING)
        if motion.shape[1] != self.mot_dims:
            raise ValueError(f"{op}: {name} must have mot_dims = {self.mot_dims} values per sample, "
                             f"got shape {list(motion.shape)}")
        if motion.shape[0] != batch:
            raise ValueError(f"{op}: {name} has batch {motion.shape[0]} (shape {list(motion.shape)}) but the "
                             f"tokens / features have {batch}; they must match")
        check_same_device(op, [("features", like), (name, motion)])

    def canonicalize(self, x: torch.Tensor, y_x: torch.Tensor,
                     scale: Scale = 1.0) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """The source image's canonical tokens: patch embedding, then the
        canonicalization blocks attending to the source's motion tokens. Run once per
        source image; :meth:`reenact` then runs per driving motion.

        Args:
            x: ``[B, in_chans, H, W]`` global features (Portrait4D: ``[B, 256, 64, 64]``),
                float32 (the parameters' dtype; float16 / bfloat16 with cast parameters
                or under autocast).
            y_x: ``[B, mot_dims]`` the SOURCE image's motion vectors.
            scale: the motion scale of the blocks' cross-attention: a number, or a tensor
                of shape ``[B]`` or ``[]`` (see :class:`BlockCross`).

        Returns:
            ``(tokens, (h, w))``: tokens ``[B, h*w, embed_dims]`` (Portrait4D:
            ``[B, 1024, 1024]``) and the grid ``(ceil(H/2), ceil(W/2))`` (Python ints).
        """
        op = op_name(self)
        _check_map(op, "x", x, self.in_chans)
        self._check_motion(op, "y_x", y_x, x.shape[0], x)
        with nvtx(self):
            tokens, (h, w) = self.patch_embed(x)
            motion = self.motion_tokens(y_x, source=True)
            for blk in self.trans_blocks_neutral:
                tokens = blk(tokens, motion, h, w, scale=scale)
            return tokens, (h, w)

    def reenact(self, tokens: torch.Tensor, H: int, W: int, y: torch.Tensor,  # noqa: N803
                scale: Scale = 1.0) -> List[torch.Tensor]:
        """Canonical tokens to the re-enacted feature maps: the re-enactment blocks
        attending to the driving motion tokens, the pixel shuffle and ``convs``.

        Args:
            tokens: ``[B, H*W, embed_dims]`` from :meth:`canonicalize` (repeat them along
                the batch to re-enact one source with several driving motions).
            H, W: their grid.
            y: ``[B, mot_dims]`` the DRIVING motion vectors.
            scale: as for :meth:`canonicalize`.

        Returns:
            The released list ``[lr, sr]``: ``lr [B, embed_dims / 4, 2H, 2W]`` (the
            pixel-shuffled tokens; Portrait4D ``[B, 256, 64, 64]``) and ``sr [B, 96, 8H,
            8W]`` (Portrait4D ``[B, 96, 256, 256]``), in the layers' output dtype.
        """
        op = op_name(self)
        H, W = check_grid(op, H, W)
        check_tokens(op, "tokens", tokens, self.embed_dims, H, W)
        self._check_motion(op, "y", y, tokens.shape[0], tokens)
        with nvtx(self):
            motion = self.motion_tokens(y, source=False)
            for blk in self.trans_blocks_motion:
                tokens = blk(tokens, motion, H, W, scale=scale)
            lr = tokens_to_shuffled_grid(tokens, H, W, factor=2)
            return [lr, self.convs(lr)]

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_x: torch.Tensor, scale: Scale = 1.0) -> List[torch.Tensor]:
        """The released call: ``reenact(*canonicalize(x, y_x, scale), y, scale)``.

        Args:
            x: ``[B, in_chans, H, W]`` global features (Portrait4D ``[B, 256, 64, 64]``).
            y: ``[B, mot_dims]`` the DRIVING motion (the re-enactment blocks' context).
            y_x: ``[B, mot_dims]`` the SOURCE image's motion (the canonicalization blocks').
            scale: the motion scale of every block's cross-attention (number, ``[B]`` or
                ``[]`` tensor); 0 makes the output independent of ``y`` and ``y_x``.

        Returns:
            ``[lr, sr]``: ``[B, 256, 64, 64]`` and ``[B, 96, 256, 256]`` at Portrait4D's
            sizes (see :meth:`reenact`).
        """
        tokens, (h, w) = self.canonicalize(x, y_x, scale)
        return self.reenact(tokens, h, w, y, scale)

    def extra_repr(self) -> str:
        return (f"in_chans={self.in_chans}, embed_dims={self.embed_dims}, mot_dims={self.mot_dims}, "
                f"motion_tokens={self.H_y}x{self.W_y}, blocks={self.num_blocks_neutral}+{self.num_blocks_motion}")


class DecoderTriplane(nn.Module):
    """The triplane decoder of Portrait4D's reconstructor: canonical (re-enacted) features
    and detail features to the three feature planes.

    ``concat(x_global, x_detail)`` (192 channels) -> ``convs1`` (conv 3x3 192 -> 256,
    LeakyReLU 0.01, conv 256 -> 128, LeakyReLU) -> ``patch_embed`` (3x3 stride 2, 128 ->
    ``embed_dims``, LayerNorm) -> ``num_blocks`` :class:`Block` s (spatial reduction
    ``sr_ratios``) -> pixel shuffle x2 (``embed_dims / 4`` channels) -> concat
    ``x_global`` -> ``convs2`` (conv 3x3 to 256, 128, 128, LeakyReLU 0.01 after each) ->
    ``conv_last`` (128 -> 96). At Portrait4D's sizes the block attends with 2 heads of 512
    over 128 x 128 = 16,384 tokens and 64 x 64 = 4,096 reduced keys.

    Weights as released: Linear truncated normal (std 0.02) with zero bias, LayerNorms
    ones and zeros, convs He normal over the fan-out with zero bias, except ``conv_last``:
    ``N(0, 0.15)`` weights, zero bias.

    Args (the released names; defaults: Portrait4D's):
        embed_dims: token channels (a multiple of 4; ``convs2`` reads ``embed_dims / 4 +
            96`` channels, 352 at 1,024).
        num_heads: attention heads.
        mlp_ratios: Mix-FFN hidden channels over ``embed_dims``.
        num_blocks: transformer blocks.
        sr_ratios: spatial reduction of the blocks' keys and values.
        backend: attention backend (keyword only; see :class:`~head4d.nn.Attention`).

    Submodules: ``convs1``, ``patch_embed``, ``trans_blocks``, ``convs2``, ``conv_last``.
    At the defaults: 36 parameter tensors, 15,902,688 parameters.
    """

    def __init__(self, embed_dims: int = 1024, num_heads: int = 2, mlp_ratios: float = 2, num_blocks: int = 1,
                 sr_ratios: int = 2, *, backend: Optional[str] = None):
        super().__init__()
        op = op_name(self)
        self.embed_dims = check_positive_int(op, "embed_dims", embed_dims)
        if self.embed_dims % 4 != 0:
            raise ValueError(f"{op}: embed_dims must be a multiple of 4 (the pixel shuffle x2 divides it by 4), "
                             f"got {embed_dims}")
        self.num_blocks = check_positive_int(op, "num_blocks", num_blocks, minimum=0)
        self.sr_ratios = check_positive_int(op, "sr_ratios", sr_ratios)
        check_positive_float(op, "mlp_ratios", mlp_ratios)
        self.convs1 = nn.Sequential(
            _conv3x3(2 * PLANE_CHANNELS, 256), _conv_leaky(),
            _conv3x3(256, 128), _conv_leaky())
        self.patch_embed = PatchEmbed(128, self.embed_dims)
        self.trans_blocks = nn.ModuleList(
            Block(self.embed_dims, num_heads, mlp_ratio=mlp_ratios, qkv_bias=True, sr_ratio=self.sr_ratios,
                  backend=backend)
            for _ in range(self.num_blocks))
        self.convs2 = nn.Sequential(
            _conv3x3(self.embed_dims // 4 + PLANE_CHANNELS, 256), _conv_leaky(),
            _conv3x3(256, 128), _conv_leaky(),
            _conv3x3(128, 128), _conv_leaky())
        self.conv_last = _conv3x3(128, PLANE_CHANNELS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released initialization (see the class docstring)."""
        _released_init(self)
        nn.init.normal_(self.conv_last.weight, 0.0, 0.15)
        nn.init.zeros_(self.conv_last.bias)

    def forward(self, x_global: torch.Tensor, x_detail: torch.Tensor) -> torch.Tensor:
        """Args:
            x_global: ``[B, 96, H, W]`` the canonical features (:class:`EncoderCanonical`'s
                ``sr``; Portrait4D ``[B, 96, 256, 256]``), float32 (the parameters' dtype;
                half precision with cast parameters or under autocast). ``H`` and ``W``
                even, at least ``2 * sr_ratios``.
            x_detail: ``[B, 96, H, W]`` the detail features, same batch, size, device and
                dtype.

        Returns:
            ``[B, 96, H, W]`` the planes (three 32-channel planes, plane-major), in the
            layers' output dtype.
        """
        op = op_name(self)
        _check_map(op, "x_global", x_global, PLANE_CHANNELS)
        _check_map(op, "x_detail", x_detail, PLANE_CHANNELS)
        if x_detail.shape != x_global.shape:
            raise ValueError(f"{op}: x_detail must have x_global's shape {list(x_global.shape)}, "
                             f"got {list(x_detail.shape)}")
        check_same_device(op, [("x_global", x_global), ("x_detail", x_detail)])
        height, width = x_global.shape[2:]
        if height % 2 or width % 2 or height < 2 * self.sr_ratios or width < 2 * self.sr_ratios:
            raise ValueError(f"{op}: x_global and x_detail must have an even height and width of at least "
                             f"2 * sr_ratios = {2 * self.sr_ratios} (the tokens' grid is half of it and is "
                             f"pixel-shuffled back), got shape {list(x_global.shape)}")
        with nvtx(self):
            x = self.convs1(torch.cat([x_global, x_detail], dim=1))
            tokens, (h, w) = self.patch_embed(x)
            for blk in self.trans_blocks:
                tokens = blk(tokens, h, w)
            x = torch.cat([tokens_to_shuffled_grid(tokens, h, w, factor=2), x_global], dim=1)
            return self.conv_last(self.convs2(x))

    def extra_repr(self) -> str:
        return f"embed_dims={self.embed_dims}, num_blocks={self.num_blocks}, sr_ratios={self.sr_ratios}"
