"""``head4d.nn``: the transformer blocks of Portrait4D's reconstructor, built on
:func:`head4d.ops.attention` (facts: ``docs/design.md``, "The reconstructor's transformer").

- :class:`PatchEmbed`: 3x3 stride-2 conv + LayerNorm, a feature map to tokens
  ``[B, h*w, dim]`` and the grid ``(h, w)``.
- :class:`MotionTokens`: a motion vector ``[B, 548]`` through 2 x (Linear, LeakyReLU)
  and a Linear to ``[B, 64, 1024]`` motion tokens.
- :class:`Attention`: self-attention over a token grid, optional spatial reduction (``sr_ratio``).
- :class:`CrossAttention`: tokens to motion tokens, output projection zero at init.
- :class:`MixFFN`: Linear, depthwise 3x3 conv over the grid, GELU, Linear.
- :class:`TransformerBlock`: ``x += scale * cross(LN(x), motion); x += attn(LN(x)); x += mlp(LN(x))``.
- :mod:`head4d.nn.upstream`: renames the released reconstructor's parameters to these modules'.

The same transformer with the released module names and call signatures, so the released
``encoder_canonical.*`` / ``generator_triplane.*`` state dicts load as they are:

- :class:`BlockCross` (``blk(x, y, H, W, scale=1.)``: ``norm2``/``attn2`` cross-attention,
  ``norm1``/``attn1`` self-attention, ``norm3``/``mlp``) and :class:`Block` (``blk(x, H, W)``:
  ``norm1``/``attn``, ``norm2``/``mlp``), sharing the motion-scale handling with
  :class:`TransformerBlock`; the Mix-FFN's depthwise conv is :class:`DWConv` (``dwconv.dwconv``).
- :class:`EncoderCanonical` (``forward(x, y, y_x, scale) -> [lr, sr]``, split as
  ``canonicalize(x, y_x)`` and ``reenact(tokens, H, W, y)``) and :class:`DecoderTriplane`
  (``forward(x_global, x_detail)``), in :mod:`head4d.nn.triplane_transformer`.

StyleGAN2's generator networks as GenHead uses them (:mod:`head4d.nn.stylegan2`,
:mod:`head4d.nn.superresolution`), with the upstream names, so Portrait4D's state dicts
load as they are: :class:`Generator` (``mapping`` + ``synthesis``),
:class:`MappingNetwork`, :class:`SynthesisNetwork`, :class:`SynthesisBlock`,
:class:`SynthesisLayer`, :class:`ToRGBLayer`, :class:`FullyConnectedLayer`,
:class:`Conv2dLayer` and :class:`SuperresolutionHybrid8XDC`; their ops' backend is the
layers' ``backend`` attribute (:func:`set_stylegan2_backend`).

Tokens are ``[B, L, C]`` in row-major grid order (token ``i * w + j`` at row ``i``,
column ``j``); modules that need the grid take ``h, w`` in ``forward``. Every module
call opens the NVTX range ``head4d.nn.<Module>``; bad input raises ``TypeError`` /
``ValueError`` starting with ``head4d.nn.<Module>:``. The attention backend is each
attention module's ``backend`` attribute (constructor argument ``backend=``;
:func:`set_attention_backend` sets it on a whole model).

Portrait4D's shapes::

    embed = PatchEmbed(256, 1024)                       # 64x64 global features -> 32x32 tokens
    source_motion, driver_motion = MotionTokens(), MotionTokens()
    blocks = [TransformerBlock(1024, 4, context_dim=1024, mlp_ratio=2) for _ in range(8)]
    x, (h, w) = embed(features)                         # [B, 1024, 1024], (32, 32)
    y_src, y_drv = source_motion(m_source), driver_motion(m_driver)   # [B, 64, 1024] each
    for i, blk in enumerate(blocks):                    # 4 canonicalization, then 4 re-enactment
        x = blk(x, h, w, y_src if i < 4 else y_drv, scale)   # scale: [B] motion scale, 0 = static
    decoder_block = TransformerBlock(1024, 2, mlp_ratio=2, sr_ratio=2)   # 128x128 tokens
"""
from .attention import Attention, CrossAttention, set_attention_backend
from .blocks import MixFFN, TransformerBlock
from .embed import FLAME_MOTION_DIM, MOTION_DIM, MotionTokens, PatchEmbed
from . import upstream

__all__ = ["Attention", "CrossAttention", "FLAME_MOTION_DIM", "MOTION_DIM", "MixFFN", "MotionTokens", "PatchEmbed",
           "TransformerBlock", "set_attention_backend", "upstream"]

# StyleGAN2's generator networks (GenHead's backbone, background and super-resolution),
# with the upstream module, parameter and buffer names.
from .stylegan2 import (Conv2dLayer, FullyConnectedLayer, Generator, MappingNetwork, SynthesisBlock,  # noqa: E402
                        SynthesisLayer, SynthesisNetwork, ToRGBLayer, normalize_2nd_moment, set_stylegan2_backend)
from .superresolution import SuperresolutionHybrid8XDC  # noqa: E402

__all__ += ["Conv2dLayer", "FullyConnectedLayer", "Generator", "MappingNetwork", "SuperresolutionHybrid8XDC",
            "SynthesisBlock", "SynthesisLayer", "SynthesisNetwork", "ToRGBLayer", "normalize_2nd_moment",
            "set_stylegan2_backend"]

# The reconstructor's transformer with the released names and call signatures, so its
# encoder_canonical.* and generator_triplane.* state dicts load as they are: the blocks
# (BlockCross, Block; the Mix-FFN's DWConv), the canonicalization / re-enactment module
# and the triplane decoder.
from .blocks import Block, BlockCross, DWConv  # noqa: E402
from .triplane_transformer import DecoderTriplane, EncoderCanonical  # noqa: E402

__all__ += ["Block", "BlockCross", "DWConv", "DecoderTriplane", "EncoderCanonical"]

# The reconstructor's convolutional encoders (global: dilated ResNet-34 + DeepLabV3 head;
# detail; background U-Net), with the upstream module and parameter names.
from .encoders import EncoderBG, EncoderDetail, EncoderGlobal, add_coordinates  # noqa: E402

__all__ += ["EncoderBG", "EncoderDetail", "EncoderGlobal", "add_coordinates"]

# StyleGAN2's discriminator as Portrait4D trains with it (the camera-conditioned dual
# discriminator and its blocks), with the upstream module and parameter names, and the
# blur the GAN loss applies to its super-resolved input during the blur fade.
from .discriminator import (DiscriminatorBlock, DiscriminatorEpilogue, DualDiscriminatorDeform,  # noqa: E402
                            MinibatchStdLayer, blur_discriminator_input, filtered_resizing)

__all__ += ["DiscriminatorBlock", "DiscriminatorEpilogue", "DualDiscriminatorDeform", "MinibatchStdLayer",
            "blur_discriminator_input", "filtered_resizing"]

# ArcFace's face-recognition backbone (insightface's arcface_torch iresnet), with its module and
# parameter names, for the reconstructor training's identity loss (head4d.train.identity).
from .iresnet import IBasicBlock, IResNet, iresnet18, iresnet34, iresnet50, iresnet100  # noqa: E402

__all__ += ["IBasicBlock", "IResNet", "iresnet18", "iresnet34", "iresnet50", "iresnet100"]
