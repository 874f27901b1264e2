"""``TriplaneDecoder``: EG3D's and Portrait4D's ``OSGDecoder``, the small MLP that turns
mean triplane features into raw density and features.

Parameter names are the upstream ones, so upstream state dicts load unchanged
(after the generator's ``decoder.`` prefix is removed):

=====================  ===================================  ======================
variant                upstream key                         shape (defaults)
=====================  ===================================  ======================
both                   ``net.0.weight``, ``net.0.bias``     [64, 32], [64]
``"eg3d"``             ``net.2.weight``, ``net.2.bias``     [1 + 32, 64], [1 + 32]
``"portrait4d"``       ``out_sigma.weight``, ``.bias``      [1, 64], [1]
``"portrait4d"``       ``out_rgb.weight``, ``.bias``        [32, 64], [32]
=====================  ===================================  ======================

``net.1`` is the parameter-free softplus. In an upstream generator (``G_ema``) the
keys carry the prefix ``decoder.``. Parameters are stored as StyleGAN2 stores them
(before the run-time gains), so ``lr_multiplier`` must equal the checkpoint's
``decoder_lr_mul`` (1 in EG3D's and Portrait4D's released configs).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from .._nvtx import nvtx_range
from ..nn.stylegan2 import FullyConnectedLayer

VARIANTS = ("eg3d", "portrait4d")

#: Upstream key -> head4d key, per variant (the names are the same by design).
EG3D_KEY_MAP = {
    "eg3d": {k: k for k in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")},
    "portrait4d": {k: k for k in ("net.0.weight", "net.0.bias", "out_sigma.weight", "out_sigma.bias",
                                  "out_rgb.weight", "out_rgb.bias")},
}


def map_upstream_decoder_state_dict(state_dict: Mapping[str, torch.Tensor], variant: Optional[str] = None,
                                    prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Pick and rename an upstream ``OSGDecoder``'s parameters for :class:`TriplaneDecoder`.

    Args:
        state_dict: the decoder's own state dict (``G.decoder.state_dict()``) or a whole
            generator's (keys ``decoder.net.0.weight``, ...).
        variant: ``"eg3d"``, ``"portrait4d"``, or None to detect it (``out_sigma.weight``
            present means Portrait4D).
        prefix: the prefix to strip; None means ``"decoder."`` when such keys exist, else ``""``.

    Returns:
        ``{head4d key: tensor}`` with exactly the keys of ``EG3D_KEY_MAP[variant]``.
    """
    if prefix is None:
        prefix = "decoder." if any(k.startswith("decoder.") for k in state_dict) else ""
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if variant is None:
        variant = "portrait4d" if "out_sigma.weight" in own else "eg3d"
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    mapping = EG3D_KEY_MAP[variant]
    missing = [k for k in mapping if k not in own]
    if missing:
        raise KeyError(f"upstream {variant} decoder state dict (prefix {prefix!r}) lacks {missing}; "
                       f"it has {sorted(own)}")
    return {mapping[k]: own[k] for k in mapping}


class TriplaneDecoder(nn.Module):
    """EG3D's ``OSGDecoder`` (``variant="eg3d"``) or Portrait4D's (``variant="portrait4d"``).

    ``eg3d``: ``net = [FC(n_features -> hidden), softplus, FC(hidden -> 1 + out_features)]``;
    output 0 is the raw density, outputs 1.. the features.
    ``portrait4d``: ``net = [FC(n_features -> hidden), softplus]``, then the heads
    ``out_sigma = FC(hidden -> 1)``, initialized to zero (weight and bias), and
    ``out_rgb = FC(hidden -> out_features)``.
    Both: ``rgb = sigmoid(features) * (1 + 2 * 0.001) - 0.001``; the density is
    returned raw (the ray marcher applies ``softplus(sigma - 1)``).

    FC layers are StyleGAN2's :class:`FullyConnectedLayer` with ``lr_multiplier``.
    See the module docstring for the upstream parameter names.

    Unlike upstream, ``forward`` takes features already averaged over the three
    planes, ``[N, M, C]`` (``sample_triplanes(..., reduce="mean")``); upstream's
    decoders take ``[N, 3, M, C]`` and average over dim 1 themselves.
    """

    def __init__(self, n_features: int = 32, hidden: int = 64, out_features: int = 32, variant: str = "eg3d",
                 lr_multiplier: float = 1.0):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"TriplaneDecoder: variant must be one of {VARIANTS}, got {variant!r}")
        self.n_features = n_features
        self.hidden = hidden
        self.out_features = out_features
        self.variant = variant
        self.lr_multiplier = float(lr_multiplier)
        if variant == "eg3d":
            self.net = nn.Sequential(
                FullyConnectedLayer(n_features, hidden, lr_multiplier=lr_multiplier),
                nn.Softplus(),
                FullyConnectedLayer(hidden, 1 + out_features, lr_multiplier=lr_multiplier),
            )
        else:
            self.net = nn.Sequential(FullyConnectedLayer(n_features, hidden, lr_multiplier=lr_multiplier),
                                     nn.Softplus())
            self.out_sigma = FullyConnectedLayer(hidden, 1, lr_multiplier=lr_multiplier)
            self.out_rgb = FullyConnectedLayer(hidden, out_features, lr_multiplier=lr_multiplier)
            with torch.no_grad():
                self.out_sigma.weight.zero_()
                self.out_sigma.bias.zero_()

    def forward(self, features: torch.Tensor, ray_directions: Optional[torch.Tensor] = None
                ) -> Dict[str, torch.Tensor]:
        """Decode mean triplane features.

        Args:
            features: ``[N, M, n_features]`` floating point, the mean over the planes.
            ray_directions: ``[N, M, 3]`` or None; ignored (accepted so the decoder can
                be called like upstream's, which also ignore them).

        Returns:
            ``{"rgb": [N, M, out_features], "sigma": [N, M, 1]}`` in ``features.dtype``.
        """
        if not isinstance(features, torch.Tensor) or features.dim() != 3:
            shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            hint = (" (upstream's [N, 3, M, C] per-plane features: take .mean(1) first, or sample with "
                    "reduce='mean')" if isinstance(features, torch.Tensor) and features.dim() == 4 else "")
            raise ValueError(f"TriplaneDecoder: features must have shape [N, M, {self.n_features}], got {shape}{hint}")
        if features.shape[-1] != self.n_features:
            raise ValueError(f"TriplaneDecoder: features must have {self.n_features} channels "
                             f"(shape [N, M, {self.n_features}]), got {list(features.shape)}")
        with nvtx_range("head4d.decoder"):
            x = self.net(features)
            if self.variant == "eg3d":
                sigma, raw_rgb = x[..., 0:1], x[..., 1:]
            else:
                sigma, raw_rgb = self.out_sigma(x), self.out_rgb(x)
            rgb = torch.sigmoid(raw_rgb) * (1 + 2 * 0.001) - 0.001
            return {"rgb": rgb, "sigma": sigma}

    def effective_weights(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MLP's weights as :meth:`forward` uses them, StyleGAN2's gains applied:
        ``(weight1 [hidden, n_features], bias1 [hidden], weight2 [1 + out_features, hidden],
        bias2 [1 + out_features])``, density first (for ``"portrait4d"``, ``weight2`` and
        ``bias2`` are ``out_sigma``'s and ``out_rgb``'s concatenated). Differentiable with
        respect to the parameters; what :func:`head4d.ops.decode_triplanes` takes."""
        weight1, bias1 = self.net[0].effective_weights()
        if self.variant == "eg3d":
            weight2, bias2 = self.net[2].effective_weights()
        else:
            sigma_weight, sigma_bias = self.out_sigma.effective_weights()
            rgb_weight, rgb_bias = self.out_rgb.effective_weights()
            weight2, bias2 = torch.cat([sigma_weight, rgb_weight]), torch.cat([sigma_bias, rgb_bias])
        return weight1, bias1, weight2, bias2

    def load_eg3d_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                             prefix: Optional[str] = None):
        """Load an upstream (EG3D or Portrait4D, matching ``self.variant``) decoder
        state dict, or a generator's with ``decoder.`` keys. Returns ``load_state_dict``'s result."""
        mapped = map_upstream_decoder_state_dict(state_dict, self.variant, prefix)
        return self.load_state_dict(mapped, strict=strict)

    @classmethod
    def from_eg3d_state_dict(cls, state_dict: Mapping[str, torch.Tensor], lr_multiplier: float = 1.0,
                             variant: Optional[str] = None, prefix: Optional[str] = None) -> "TriplaneDecoder":
        """A decoder whose sizes and variant are read from an upstream state dict, with its weights loaded."""
        mapped = map_upstream_decoder_state_dict(state_dict, variant, prefix)
        variant = "portrait4d" if "out_sigma.weight" in mapped else "eg3d"
        hidden, n_features = mapped["net.0.weight"].shape
        out_features = (mapped["net.2.weight"].shape[0] - 1 if variant == "eg3d"
                        else mapped["out_rgb.weight"].shape[0])
        decoder = cls(n_features, hidden, out_features, variant, lr_multiplier)
        decoder.load_state_dict(mapped)
        return decoder

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, n_features={self.n_features}, hidden={self.hidden}, "
                f"out_features={self.out_features}")
