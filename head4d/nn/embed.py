"""Patch embedding (feature map -> tokens) and the motion-token MLP (motion vector ->
motion tokens) of Portrait4D's reconstructor (``docs/design.md``, "The reconstructor's
transformer")."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .._checks import FLOATING, check_tensor
from ._common import (check_positive_float, check_positive_int, grid_to_tokens, init_conv, init_layer_norm,
                      init_linear, nvtx, op_name)

__all__ = ["FLAME_MOTION_DIM", "MOTION_DIM", "MotionTokens", "PatchEmbed"]

#: PD-FGC's motion vector, the reconstructor's motion input: eyes (6) + emotion (30) +
#: mouth (512), concatenated in that order; the head pose (6) is excluded.
MOTION_DIM = 6 + 30 + 512
#: The FLAME alternative of the paper's ablation: expression (100) + jaw (3) + eyes (6).
FLAME_MOTION_DIM = 100 + 3 + 6


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: ``proj = Conv2d(in_ch, dim, 3, stride=2, padding=1)``
    (with bias), then the map is flattened to tokens and ``norm = LayerNorm(dim)`` is applied.

    Portrait4D: 256 -> 1,024 channels on the 64 x 64 global features (32 x 32 = 1,024
    tokens) and 128 -> 1,024 on the decoder's 256 x 256 map (16,384 tokens).

    Args:
        in_ch: input channels.
        dim: token channels.

    Parameters: ``proj.weight [dim, in_ch, 3, 3]``, ``proj.bias [dim]``, ``norm.weight [dim]``,
    ``norm.bias [dim]``.
    """

    def __init__(self, in_ch: int, dim: int):
        super().__init__()
        op = op_name(self)
        self.in_ch = check_positive_int(op, "in_ch", in_ch)
        self.dim = check_positive_int(op, "dim", dim)
        self.proj = nn.Conv2d(in_ch, dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``proj``: He normal over the fan-out, zero bias; ``norm``: ones and zeros."""
        init_conv(self.proj)
        init_layer_norm(self.norm)

    @staticmethod
    def output_grid(height: int, width: int) -> Tuple[int, int]:
        """The token grid of an ``height x width`` map: ``(ceil(height / 2), ceil(width / 2))``."""
        return (height + 1) // 2, (width + 1) // 2

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Args:
            x: ``[B, in_ch, H, W]`` floating feature map (dtype of the parameters, or any
                under autocast), any memory format.

        Returns:
            ``(tokens, (h, w))``: tokens ``[B, h*w, dim]`` in row-major grid order, in the
            conv's output dtype, with ``h = ceil(H / 2)``, ``w = ceil(W / 2)`` (Python ints).
        """
        op = op_name(self)
        check_tensor(op, "x", x, f"[B, {self.in_ch}, H, W]", 4, dtypes=FLOATING)
        if x.shape[1] != self.in_ch:
            raise ValueError(f"{op}: x must have in_ch = {self.in_ch} channels in dimension 1, "
                             f"got shape {list(x.shape)}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"{op}: x must be non-empty, got shape {list(x.shape)}")
        with nvtx(self):
            y = self.proj(x)
            h, w = int(y.shape[2]), int(y.shape[3])
            return self.norm(grid_to_tokens(y)), (h, w)

    def extra_repr(self) -> str:
        return f"in_ch={self.in_ch}, dim={self.dim}"


class MotionTokens(nn.Module):
    """The motion MLP: a motion vector to ``num_tokens`` motion tokens.

    ``mlp = [Linear(in_dim, hidden), LeakyReLU(0.01), Linear(hidden, hidden),
    LeakyReLU(0.01)]`` (``num_layers`` pairs), then ``proj = Linear(hidden, num_tokens *
    token_dim)`` (no activation), reshaped token-major to ``[B, num_tokens, token_dim]``
    (output ``t * token_dim + c`` is channel ``c`` of token ``t``, the released layout).
    Portrait4D: 548 -> 512 -> 512 -> 64 x 1,024, one instance for the source's motion
    (canonicalization) and one for the driver's (re-enactment).

    Args:
        in_dim: motion vector size (:data:`MOTION_DIM` = 548, PD-FGC's eyes 6 + emotion
            30 + mouth 512; :data:`FLAME_MOTION_DIM` = 109 for FLAME codes).
        hidden: hidden width of the MLP.
        num_tokens: motion tokens produced (Portrait4D: 8 * 8 = 64).
        token_dim: channels per token (the blocks' ``context_dim``; Portrait4D: 1,024).
        num_layers: Linear + LeakyReLU pairs before ``proj`` (Portrait4D: 2; 0 means
            ``proj`` reads the motion vector directly).
        negative_slope: the LeakyReLU slope.

    Parameters: ``mlp.0.weight [hidden, in_dim]``, ``mlp.0.bias``, ``mlp.2.weight
    [hidden, hidden]``, ``mlp.2.bias`` (one pair per layer, even indices),
    ``proj.weight [num_tokens * token_dim, hidden]``, ``proj.bias``.
    """

    def __init__(self, in_dim: int = MOTION_DIM, hidden: int = 512, num_tokens: int = 64, token_dim: int = 1024,
                 *, num_layers: int = 2, negative_slope: float = 0.01):
        super().__init__()
        op = op_name(self)
        self.in_dim = check_positive_int(op, "in_dim", in_dim)
        self.hidden = check_positive_int(op, "hidden", hidden)
        self.num_tokens = check_positive_int(op, "num_tokens", num_tokens)
        self.token_dim = check_positive_int(op, "token_dim", token_dim)
        self.num_layers = check_positive_int(op, "num_layers", num_layers, minimum=0)
        self.negative_slope = check_positive_float(op, "negative_slope", negative_slope)
        layers = []
        for i in range(self.num_layers):
            layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.LeakyReLU(self.negative_slope)]
        self.mlp = nn.Sequential(*layers)
        self.proj = nn.Linear(hidden if self.num_layers > 0 else in_dim, num_tokens * token_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every Linear: truncated normal (std 0.02), zero bias."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_linear(m)

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        """Args:
            motion: ``[B, in_dim]`` floating motion vectors (dtype of the parameters, or
                any under autocast).

        Returns:
            ``[B, num_tokens, token_dim]`` motion tokens in the layers' output dtype.
        """
        op = op_name(self)
        check_tensor(op, "motion", motion, f"[B, {self.in_dim}]", 2, dtypes=FLOATING)
        if motion.shape[1] != self.in_dim:
            raise ValueError(f"{op}: motion must have in_dim = {self.in_dim} values per sample, "
                             f"got shape {list(motion.shape)}")
        with nvtx(self):
            y = self.proj(self.mlp(motion))
            return y.view(motion.shape[0], self.num_tokens, self.token_dim)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, hidden={self.hidden}, num_tokens={self.num_tokens}, "
                f"token_dim={self.token_dim}, num_layers={self.num_layers}")

