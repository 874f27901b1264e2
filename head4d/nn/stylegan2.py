"""StyleGAN2's generator networks as used by GenHead (the triplane backbone, the
background generator and the blocks of the super-resolution), on head4d's ops.

Drop-in compatibility is the point: class names, constructor arguments, forward
signatures and every parameter and buffer name and shape are those of the StyleGAN2
networks that EG3D and Portrait4D build on, so their state dicts load as they are. The
values are theirs too (same arithmetic, same order of the random draws):

- :class:`FullyConnectedLayer`: the stored weight is ``randn / lr_multiplier``; the
  layer uses ``weight * lr_multiplier / sqrt(in_features)`` and ``bias * lr_multiplier``
  (the equalized learning rate). A linear layer with a bias is one ``addmm``; any other
  activation goes through :func:`head4d.ops.bias_act`.
- :class:`MappingNetwork`: z and the embedded condition are each scaled to unit second
  moment and concatenated; ``num_layers`` FC layers (lrelu, ``lr_multiplier`` 0.01) give
  w, which is repeated ``num_ws`` times. ``update_emas=True`` moves the ``w_avg``
  buffer towards the batch mean (``w_avg = lerp(mean(w), w_avg, w_avg_beta)``);
  truncation is ``w_avg + psi * (w - w_avg)`` over the first ``truncation_cutoff`` ws.
- :class:`SynthesisLayer`: styles ``affine(w)`` (an FC layer whose bias starts at 1),
  :func:`head4d.ops.modulated_conv2d` (demodulated, 2x upsampling in a block's first
  conv), noise ``noise_strength * (randn | noise_const | nothing)`` added after the
  demodulation, then lrelu with gain ``sqrt(2) * gain`` and clamp ``conv_clamp * gain``.
- :class:`ToRGBLayer`: a 1x1 modulated conv without demodulation, styles scaled by
  ``1 / sqrt(in_channels * k * k)``, linear bias_act with clamp ``conv_clamp``.
- :class:`SynthesisBlock`: the learned ``const`` (first block) or ``conv0`` (2x up),
  ``conv1``, the ``torgb`` output added to the 2x upsampled image of the block before
  (:func:`head4d.ops.upsample2d`, architecture ``'skip'``); ``'orig'`` has a torgb in
  the last block only and ``'resnet'`` adds a 1x1 upsampling skip convolution
  (:class:`Conv2dLayer`) to the two convs, both scaled by ``sqrt(0.5)``.
- :class:`SynthesisNetwork`: blocks ``b4`` ... ``b<img_resolution>`` with
  ``min(channel_base // res, channel_max)`` channels; block ``i`` reads ``num_conv +
  num_torgb`` ws starting at the sum of the earlier blocks' ``num_conv``, so a torgb
  shares its w with the next block's first conv.
- :class:`Generator`: ``synthesis(mapping(z, c))``.

Precision: a block built with ``use_fp16`` runs its convolutions in float16 on CUDA
only; on any other device (and with ``force_fp32``) everything is float32. The image
path between blocks is always float32. ``fused_modconv`` (``True``, ``False`` or
``'inference_only'``: fused in eval mode, not fused in training mode) chooses between
the two equal forms of the modulated convolution.

Backends: every layer here has a ``backend`` attribute (``None``: each op's default,
``'torch'``: the plain-PyTorch references, or a compiled backend such as ``'cpu'`` /
``'cuda'``), read at every forward and handed to ``bias_act``, ``upfirdn2d`` (through
``upsample2d``, ``conv2d_resample`` and ``modulated_conv2d``).
:func:`set_stylegan2_backend` sets it on every such layer of a model.

Every module call opens the NVTX range ``head4d.nn.<ClassName>``; bad input raises
``TypeError`` / ``ValueError`` starting with ``head4d.nn.<ClassName>:``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .. import ops as _ops
from .._checks import FLOATING, check_tensor
from ..reference.bias_act import ACTIVATIONS as _ACTIVATIONS
from ._common import check_backend_choice, check_positive_int, nvtx, op_name
from ._recompute import recompute, recompute_wanted

__all__ = ["Conv2dLayer", "FullyConnectedLayer", "Generator", "MappingNetwork", "STYLEGAN2_BACKENDS",
           "SynthesisBlock", "SynthesisLayer", "SynthesisNetwork", "ToRGBLayer", "normalize_2nd_moment",
           "set_stylegan2_backend"]

#: Values of the ``backend`` attribute: None / ``'auto'`` (each op's default) or a backend
#: that both ``bias_act`` and ``upfirdn2d`` implement.
STYLEGAN2_BACKENDS = ("cpu", "cuda", "torch")

#: The noise modes of :class:`SynthesisLayer`.
NOISE_MODES = ("random", "const", "none")

#: The architectures of :class:`SynthesisBlock`.
ARCHITECTURES = ("orig", "skip", "resnet")

#: The values of ``fused_modconv`` besides True and False.
_INFERENCE_ONLY = "inference_only"


# ----------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------

def _check_backend(op: str, backend) -> Optional[str]:
    return check_backend_choice(op, backend, STYLEGAN2_BACKENDS)


class _OpsBackend:
    """The ``backend`` attribute (checked when set) of a layer that calls head4d's ops."""

    _backend: Optional[str] = None

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        self._backend = _check_backend(op_name(self), value)


def set_stylegan2_backend(module: nn.Module, backend: Optional[str]) -> nn.Module:
    """Sets ``backend`` (None, ``'auto'``, ``'cpu'``, ``'cuda'`` or ``'torch'``) on every
    StyleGAN2 layer inside ``module`` (itself included); returns ``module``."""
    backend = _check_backend("head4d.nn.set_stylegan2_backend", backend)
    for child in module.modules():
        if isinstance(child, _OpsBackend):
            child.backend = backend
    return module


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """``x * rsqrt(mean(x ** 2, dim) + eps)``: x scaled to unit second moment along ``dim``."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def _resolve_fused_modconv(op: str, fused_modconv, training: bool) -> bool:
    """True / False as given; ``'inference_only'``: fused in eval mode only."""
    if isinstance(fused_modconv, str) and fused_modconv == _INFERENCE_ONLY:
        return not training
    if isinstance(fused_modconv, bool):
        return fused_modconv
    raise ValueError(f"{op}: fused_modconv must be True, False, {_INFERENCE_ONLY!r} or None (the block's "
                     f"default), got {fused_modconv!r}")


def _check_features(op: str, name: str, x, features: int) -> torch.Tensor:
    """``x`` is ``[N, features]`` floating."""
    check_tensor(op, name, x, f"[N, {features}]", 2, dtypes=FLOATING)
    if x.shape[1] != features:
        raise ValueError(f"{op}: {name} must have shape [N, {features}], got {list(x.shape)}")
    return x


def _check_image(op: str, name: str, x, channels: int, size: int) -> torch.Tensor:
    """``x`` is ``[N, channels, size, size]`` floating."""
    expected = f"[N, {channels}, {size}, {size}]"
    check_tensor(op, name, x, expected, 4, dtypes=FLOATING)
    if tuple(x.shape[1:]) != (channels, size, size):
        raise ValueError(f"{op}: {name} must have shape {expected}, got {list(x.shape)}")
    return x


def _check_ws(op: str, ws, count: int, w_dim: int) -> torch.Tensor:
    """``ws`` is ``[N, count, w_dim]`` floating."""
    expected = f"[N, {count}, {w_dim}]"
    check_tensor(op, "ws", ws, expected, 3, dtypes=FLOATING)
    if tuple(ws.shape[1:]) != (count, w_dim):
        raise ValueError(f"{op}: ws must have shape {expected}, got {list(ws.shape)}")
    return ws


def _activation_gain(op: str, activation: str) -> float:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    return _ACTIVATIONS[activation].default_gain


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


# ----------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------

class FullyConnectedLayer(_OpsBackend, nn.Module):
    """StyleGAN2's equalized-learning-rate fully connected layer.

    Parameters: ``weight [out_features, in_features]`` (initialized ``randn /
    lr_multiplier``) and ``bias [out_features]`` (initialized ``bias_init``).

    Args:
        in_features, out_features: sizes.
        bias: whether the layer has a bias.
        activation: a :func:`head4d.ops.bias_act` activation (``'linear'``, ``'lrelu'``, ...).
        lr_multiplier: the learning-rate multiplier (weights and bias are scaled by it).
        bias_init: the initial value of every bias entry.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1, bias_init: float = 0):
        super().__init__()
        op = op_name(self)
        self.in_features = check_positive_int(op, "in_features", in_features)
        self.out_features = check_positive_int(op, "out_features", out_features)
        _activation_gain(op, activation)
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: ``[..., in_features]`` floating, usually ``[N, in_features]`` (the layer
                computes in x's dtype; leading dimensions are flattened and restored).

        Returns:
            ``[..., out_features]`` in x's dtype.
        """
        with nvtx(self):
            op = op_name(self)
            rank = x.dim() if isinstance(x, torch.Tensor) else 2  # any rank: only the type and dtype checked here
            check_tensor(op, "x", x, f"[..., {self.in_features}]", rank, dtypes=FLOATING)
            if x.dim() < 1 or x.shape[-1] != self.in_features:
                raise ValueError(f"{op}: x must have shape [..., {self.in_features}], got {list(x.shape)}")
            lead = x.shape[:-1]
            x = x.reshape(-1, self.in_features)
            w = self.weight.to(x.dtype) * self.weight_gain
            b = self.bias
            if b is not None:
                b = b.to(x.dtype)
                if self.bias_gain != 1:
                    b = b * self.bias_gain
            if self.activation == "linear" and b is not None:
                y = torch.addmm(b.unsqueeze(0), x, w.t())
            else:
                y = x.matmul(w.t())  # under autocast, in the autocast dtype: the bias follows it
                y = _ops.bias_act(y, b.to(y.dtype) if b is not None else None, act=self.activation,
                                  backend=self.backend)
            return y.reshape(*lead, self.out_features)

    def effective_weights(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(weight * weight_gain, bias * bias_gain)`` in the parameters' dtype: what
        :meth:`forward` multiplies with (differentiable; the bias None without one).
        The fused triplane decode takes these."""
        bias = self.bias
        if bias is not None and self.bias_gain != 1:
            bias = bias * self.bias_gain
        return self.weight * self.weight_gain, bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features:d}, out_features={self.out_features:d}, activation={self.activation}"


class MappingNetwork(nn.Module):
    """StyleGAN2's mapping network: (z, c) -> ws.

    Modules: ``embed`` (``FullyConnectedLayer(c_dim, embed_features)``, only when
    ``c_dim > 0``), ``fc0`` ... ``fc<num_layers - 1>``; buffer ``w_avg [w_dim]`` (when
    ``num_ws`` and ``w_avg_beta`` are not None).

    Args:
        z_dim: latent size, 0 for none.
        c_dim: condition size, 0 for none.
        w_dim: output size.
        num_ws: how many copies of w to output, None for ``[N, w_dim]``.
        num_layers: FC layers.
        embed_features: the condition embedding's size (None: ``w_dim``).
        layer_features: the hidden layers' size (None: ``w_dim``).
        activation: of the FC layers.
        lr_multiplier: of the FC layers (not of ``embed``).
        w_avg_beta: decay of the running mean of w, None to keep none.
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: Optional[int], num_layers: int = 8,
                 embed_features: Optional[int] = None, layer_features: Optional[int] = None,
                 activation: str = "lrelu", lr_multiplier: float = 0.01, w_avg_beta: Optional[float] = 0.998):
        super().__init__()
        op = op_name(self)
        self.z_dim = check_positive_int(op, "z_dim", z_dim, 0)
        self.c_dim = check_positive_int(op, "c_dim", c_dim, 0)
        self.w_dim = check_positive_int(op, "w_dim", w_dim)
        self.num_ws = None if num_ws is None else check_positive_int(op, "num_ws", num_ws)
        self.num_layers = check_positive_int(op, "num_layers", num_layers)
        self.w_avg_beta = w_avg_beta
        if self.z_dim == 0 and self.c_dim == 0:
            raise ValueError(f"{op}: z_dim and c_dim are both 0; the network needs an input")
        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        widths = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for index in range(num_layers):
            layer = FullyConnectedLayer(widths[index], widths[index + 1], activation=activation,
                                        lr_multiplier=lr_multiplier)
            setattr(self, f"fc{index}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: Optional[torch.Tensor], c: Optional[torch.Tensor], truncation_psi: float = 1,
                truncation_cutoff: Optional[int] = None, update_emas: bool = False) -> torch.Tensor:
        """Args:
            z: ``[N, z_dim]`` floating (None when ``z_dim == 0``); computed in float32.
            c: ``[N, c_dim]`` floating (ignored, may be None, when ``c_dim == 0``).
            truncation_psi: 1 for no truncation; otherwise the ws move to
                ``w_avg + truncation_psi * (w - w_avg)``.
            truncation_cutoff: truncate only the first this many ws (None: all).
            update_emas: move ``w_avg`` towards this batch's mean w first.

        Returns:
            float32 ``[N, num_ws, w_dim]`` (``[N, w_dim]`` when ``num_ws`` is None).
        """
        op = op_name(self)
        with nvtx(self):
            x = None
            if self.z_dim > 0:
                x = normalize_2nd_moment(_check_features(op, "z", z, self.z_dim).to(torch.float32))
            if self.c_dim > 0:
                _check_features(op, "c", c, self.c_dim)
                if x is not None and c.shape[0] != x.shape[0]:
                    raise ValueError(f"{op}: c has {c.shape[0]} rows but z has {x.shape[0]}")
                y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
                x = y if x is None else torch.cat([x, y], dim=1)
            for index in range(self.num_layers):
                x = getattr(self, f"fc{index}")(x)
            if update_emas and self.w_avg_beta is not None:
                with torch.no_grad():
                    self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
            if self.num_ws is not None:
                x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
            if truncation_psi != 1:
                if self.w_avg_beta is None:
                    raise ValueError(f"{op}: truncation_psi != 1 needs w_avg, which a network built with "
                                     f"w_avg_beta=None does not keep")
                if self.num_ws is None or truncation_cutoff is None:
                    x = self.w_avg.lerp(x, truncation_psi)
                else:
                    cutoff = check_positive_int(op, "truncation_cutoff", truncation_cutoff, 0)
                    x = torch.cat([self.w_avg.lerp(x[:, :cutoff], truncation_psi), x[:, cutoff:]], dim=1)
            return x

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim:d}, c_dim={self.c_dim:d}, w_dim={self.w_dim:d}, num_ws={self.num_ws}"


class Conv2dLayer(_OpsBackend, nn.Module):
    """StyleGAN2's equalized-learning-rate convolution with optional FIR resampling
    (the skip convolution of a ``'resnet'`` synthesis block).

    Parameters (buffers when not ``trainable``): ``weight [out, in, k, k]`` (``randn``),
    ``bias [out]`` (zeros, when ``bias``); buffer ``resample_filter [4, 4]``.

    Args:
        in_channels, out_channels, kernel_size: the convolution.
        bias: whether it has a bias.
        activation: a :func:`head4d.ops.bias_act` activation.
        up, down: resampling factors.
        resample_filter: the 1-D low-pass filter taps.
        conv_clamp: clamp of the output (times ``gain``), None for none.
        channels_last: keep the weight channels-last.
        trainable: parameters (True) or buffers (False).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", up: int = 1, down: int = 1, resample_filter=(1, 3, 3, 1),
                 conv_clamp: Optional[float] = None, channels_last: bool = False, trainable: bool = True):
        super().__init__()
        op = op_name(self)
        self.in_channels = check_positive_int(op, "in_channels", in_channels)
        self.out_channels = check_positive_int(op, "out_channels", out_channels)
        kernel_size = check_positive_int(op, "kernel_size", kernel_size)
        self.activation = activation
        self.up = check_positive_int(op, "up", up)
        self.down = check_positive_int(op, "down", down)
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", _ops.setup_filter(list(resample_filter)))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.act_gain = _activation_gain(op, activation)
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size])
        weight = weight.to(memory_format=_memory_format(channels_last))
        bias_value = torch.zeros([out_channels]) if bias else None
        if trainable:
            self.weight = nn.Parameter(weight)
            self.bias = nn.Parameter(bias_value) if bias_value is not None else None
        else:
            self.register_buffer("weight", weight)
            if bias_value is not None:
                self.register_buffer("bias", bias_value)
            else:
                self.bias = None

    def forward(self, x: torch.Tensor, gain: float = 1) -> torch.Tensor:
        """Args:
            x: ``[N, in_channels, H, W]`` floating.
            gain: multiplies the activation's gain and the clamp.

        Returns:
            ``[N, out_channels, H * up / down, W * up / down]`` in x's dtype.
        """
        op = op_name(self)
        with nvtx(self):
            check_tensor(op, "x", x, f"[N, {self.in_channels}, H, W]", 4)
            if x.shape[1] != self.in_channels:
                raise ValueError(f"{op}: x must have {self.in_channels} channels, got shape {list(x.shape)}")
            w = (self.weight * self.weight_gain).to(x.dtype)
            x = _ops.conv2d_resample(x, w, self.resample_filter, up=self.up, down=self.down, padding=self.padding,
                                     flip_weight=(self.up == 1), backend=self.backend)
            # the bias in the product's dtype (autocast may have changed it)
            b = self.bias.to(x.dtype) if self.bias is not None else None
            clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
            return _ops.bias_act(x, b, act=self.activation, gain=self.act_gain * gain, clamp=clamp,
                                 backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels:d}, out_channels={self.out_channels:d}, "
                f"activation={self.activation}, up={self.up}, down={self.down}")


class SynthesisLayer(_OpsBackend, nn.Module):
    """A modulated 3x3 convolution with noise, bias and lrelu (StyleGAN2's synthesis layer).

    Parameters: ``weight [out, in, k, k]`` (``randn``), ``noise_strength []`` (zero,
    when ``use_noise``), ``bias [out]`` (zeros); buffers ``resample_filter [4, 4]``,
    ``noise_const [resolution, resolution]`` (``randn``, when ``use_noise``); module
    ``affine`` (``FullyConnectedLayer(w_dim, in_channels, bias_init=1)``).

    Args:
        in_channels, out_channels: channels.
        w_dim: the size of w.
        resolution: the output's height and width.
        kernel_size: of the convolution.
        up: 1, or 2 for the first conv of a block (input at ``resolution // 2``).
        use_noise: whether the layer has noise.
        activation: a :func:`head4d.ops.bias_act` activation.
        resample_filter: the 1-D low-pass filter taps of the upsampling.
        conv_clamp: clamp of the output (times ``gain``), None for none.
        channels_last: keep the weight channels-last.

    Memory: when autograd records and the layer's ops are not on the ``torch`` references,
    the layer keeps only its inputs for the backward and runs its forward again there
    (:func:`head4d.nn._recompute.recompute`), instead of keeping the modulated input, the
    convolution's output and the pre-activation (three maps of the output's size in the
    training form); the values are the same.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, kernel_size: int = 3,
                 up: int = 1, use_noise: bool = True, activation: str = "lrelu", resample_filter=(1, 3, 3, 1),
                 conv_clamp: Optional[float] = None, channels_last: bool = False):
        super().__init__()
        op = op_name(self)
        self.in_channels = check_positive_int(op, "in_channels", in_channels)
        self.out_channels = check_positive_int(op, "out_channels", out_channels)
        self.w_dim = check_positive_int(op, "w_dim", w_dim)
        self.resolution = check_positive_int(op, "resolution", resolution)
        kernel_size = check_positive_int(op, "kernel_size", kernel_size)
        self.up = check_positive_int(op, "up", up)
        if resolution % self.up != 0:
            raise ValueError(f"{op}: resolution {resolution} must be divisible by up {up}")
        self.use_noise = bool(use_noise)
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", _ops.setup_filter(list(resample_filter)))
        self.padding = kernel_size // 2
        self.act_gain = _activation_gain(op, activation)
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size])
                                   .to(memory_format=_memory_format(channels_last)))
        if self.use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random", fused_modconv: bool = True,
                gain: float = 1) -> torch.Tensor:
        """Args:
            x: ``[N, in_channels, resolution // up, resolution // up]`` floating
                (float16 in an FP16 block).
            w: ``[N, w_dim]`` floating (float32).
            noise_mode: ``'random'`` (fresh ``torch.randn [N, 1, res, res]`` noise),
                ``'const'`` (the ``noise_const`` buffer) or ``'none'``; either noise is
                scaled by ``noise_strength``.
            fused_modconv: the grouped (True) or the activation-scaling (False) form of
                the modulated convolution; the same values.
            gain: multiplies the activation's gain and the clamp.

        Returns:
            ``[N, out_channels, resolution, resolution]`` in x's dtype.
        """
        op = op_name(self)
        with nvtx(self):
            if noise_mode not in NOISE_MODES:
                raise ValueError(f"{op}: noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
            _check_image(op, "x", x, self.in_channels, self.resolution // self.up)
            _check_features(op, "w", w, self.w_dim)
            if w.shape[0] != x.shape[0]:
                raise ValueError(f"{op}: w has {w.shape[0]} rows but x holds {x.shape[0]} samples")
            styles = self.affine(w)
            noise = None
            if self.use_noise and noise_mode == "random":
                noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution],
                                    device=x.device) * self.noise_strength
            if self.use_noise and noise_mode == "const":
                noise = self.noise_const * self.noise_strength
            clamp = self.conv_clamp * gain if self.conv_clamp is not None else None

            # the settings as they are now: a recomputing backward runs this again later
            up, padding, f, act, act_gain, backend = (self.up, self.padding, self.resample_filter, self.activation,
                                                      self.act_gain * gain, self.backend)

            def layer(x, weight, styles, noise, bias):
                x = _ops.modulated_conv2d(x, weight, styles, noise=noise, up=up, padding=padding, resample_filter=f,
                                          flip_weight=(up == 1), fused_modconv=fused_modconv, backend=backend)
                return _ops.bias_act(x, bias.to(x.dtype), act=act, gain=act_gain, clamp=clamp, backend=backend)

            inputs = (x, self.weight, styles, noise, self.bias)
            if recompute_wanted(self.backend, *inputs):
                return recompute(layer, *inputs)  # keeps x alone for the backward, not 3 maps of the output's size
            return layer(*inputs)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels:d}, out_channels={self.out_channels:d}, w_dim={self.w_dim:d}, "
                f"resolution={self.resolution:d}, up={self.up}, activation={self.activation}")


class ToRGBLayer(_OpsBackend, nn.Module):
    """A modulated (not demodulated) 1x1 convolution to the output channels.

    Parameters: ``weight [out, in, k, k]`` (``randn``), ``bias [out]`` (zeros); module
    ``affine`` (``FullyConnectedLayer(w_dim, in_channels, bias_init=1)``).

    Args:
        in_channels, out_channels: channels (out: the image's).
        w_dim: the size of w.
        kernel_size: of the convolution (1 in every StyleGAN2 network).
        conv_clamp: clamp of the output, None for none.
        channels_last: keep the weight channels-last.

    Memory: recomputed in the backward as :class:`SynthesisLayer` is (only x and the
    styles kept).
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: Optional[float] = None, channels_last: bool = False):
        super().__init__()
        op = op_name(self)
        self.in_channels = check_positive_int(op, "in_channels", in_channels)
        self.out_channels = check_positive_int(op, "out_channels", out_channels)
        self.w_dim = check_positive_int(op, "w_dim", w_dim)
        kernel_size = check_positive_int(op, "kernel_size", kernel_size)
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size])
                                   .to(memory_format=_memory_format(channels_last)))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        """Args:
            x: ``[N, in_channels, H, W]`` floating.
            w: ``[N, w_dim]`` floating (float32).
            fused_modconv: the form of the modulated convolution (same values).

        Returns:
            ``[N, out_channels, H, W]`` in x's dtype.
        """
        op = op_name(self)
        with nvtx(self):
            check_tensor(op, "x", x, f"[N, {self.in_channels}, H, W]", 4)
            if x.shape[1] != self.in_channels:
                raise ValueError(f"{op}: x must have {self.in_channels} channels, got shape {list(x.shape)}")
            _check_features(op, "w", w, self.w_dim)
            if w.shape[0] != x.shape[0]:
                raise ValueError(f"{op}: w has {w.shape[0]} rows but x holds {x.shape[0]} samples")
            styles = self.affine(w) * self.weight_gain

            clamp, backend = self.conv_clamp, self.backend  # as they are now (a recomputing backward runs later)

            def layer(x, weight, styles, bias):
                x = _ops.modulated_conv2d(x, weight, styles, demodulate=False, fused_modconv=fused_modconv,
                                          backend=backend)
                return _ops.bias_act(x, bias.to(x.dtype), clamp=clamp, backend=backend)

            inputs = (x, self.weight, styles, self.bias)
            if recompute_wanted(self.backend, *inputs):
                return recompute(layer, *inputs)  # keeps x alone for the backward
            return layer(*inputs)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels:d}, out_channels={self.out_channels:d}, w_dim={self.w_dim:d}"


# ----------------------------------------------------------------------------------
# blocks and networks
# ----------------------------------------------------------------------------------

class SynthesisBlock(_OpsBackend, nn.Module):
    """One resolution of StyleGAN2's synthesis network.

    Parameter ``const [out_channels, resolution, resolution]`` (first block only,
    ``in_channels == 0``); buffer ``resample_filter [4, 4]``; modules ``conv0`` (2x up,
    not in the first block), ``conv1``, ``torgb`` (last block, or every block of a
    ``'skip'`` network), ``skip`` (``'resnet'``, not in the first block).

    ``num_conv`` and ``num_torgb`` count the ws the block reads (``conv0``, ``conv1``,
    then ``torgb``).

    Args:
        in_channels: the input's channels, 0 for the first block.
        out_channels: the block's channels.
        w_dim: the size of w.
        resolution: the block's output resolution.
        img_channels: the image's channels.
        is_last: whether this is the last block (it always has a torgb).
        architecture: ``'orig'``, ``'skip'`` or ``'resnet'``.
        resample_filter: the 1-D low-pass filter taps.
        conv_clamp: clamp of every conv's output, None for none.
        use_fp16: run the convs in float16 (on CUDA only).
        fp16_channels_last: channels-last activations in FP16 mode.
        fused_modconv_default: the ``fused_modconv`` used when forward gets None:
            True, False or ``'inference_only'``.
        **layer_kwargs: more :class:`SynthesisLayer` arguments (``kernel_size``,
            ``use_noise``, ``activation``).
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 is_last: bool, architecture: str = "skip", resample_filter=(1, 3, 3, 1),
                 conv_clamp: Optional[float] = 256, use_fp16: bool = False, fp16_channels_last: bool = False,
                 fused_modconv_default: Union[bool, str] = True, **layer_kwargs):
        super().__init__()
        op = op_name(self)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"{op}: architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        _resolve_fused_modconv(op, fused_modconv_default, False)
        self.in_channels = check_positive_int(op, "in_channels", in_channels, 0)
        self.w_dim = check_positive_int(op, "w_dim", w_dim)
        self.resolution = check_positive_int(op, "resolution", resolution)
        self.img_channels = check_positive_int(op, "img_channels", img_channels)
        self.is_last = bool(is_last)
        self.architecture = architecture
        self.use_fp16 = bool(use_fp16)
        self.channels_last = self.use_fp16 and bool(fp16_channels_last)
        self.fused_modconv_default = fused_modconv_default
        self.register_buffer("resample_filter", _ops.setup_filter(list(resample_filter)))
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        if in_channels != 0:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=2,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp,
                                        channels_last=self.channels_last, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    conv_clamp=conv_clamp, channels_last=self.channels_last, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp,
                                    channels_last=self.channels_last)
            self.num_torgb += 1
        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2,
                                    resample_filter=resample_filter, channels_last=self.channels_last)

    def forward(self, x: Optional[torch.Tensor], img: Optional[torch.Tensor], ws: torch.Tensor,
                force_fp32: bool = False, fused_modconv: Union[bool, str, None] = None, update_emas: bool = False,
                **layer_kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Args:
            x: ``[N, in_channels, resolution // 2, resolution // 2]`` floating, or None
                for the first block (which starts from ``const``).
            img: ``[N, img_channels, resolution // 2, resolution // 2]`` float32, or None.
            ws: ``[N, num_conv + num_torgb, w_dim]`` floating (float32).
            force_fp32: run in float32 even when ``use_fp16`` (always so off CUDA).
            fused_modconv: True, False, ``'inference_only'`` or None (the block's default).
            update_emas: unused (StyleGAN2's signature).
            **layer_kwargs: passed to the synthesis layers (``noise_mode``).

        Returns:
            ``(x, img)``: ``x [N, out_channels, resolution, resolution]`` in float16 (an
            FP16 block on CUDA) or float32; ``img [N, img_channels, resolution,
            resolution]`` float32, or None when the block has no torgb and got no image.
        """
        del update_emas  # StyleGAN2's signature; the block keeps no running averages
        op = op_name(self)
        with nvtx(self):
            _check_ws(op, ws, self.num_conv + self.num_torgb, self.w_dim)
            w_iter = iter(ws.unbind(dim=1))
            if ws.device.type != "cuda":
                force_fp32 = True
            dtype = torch.float16 if self.use_fp16 and not force_fp32 else torch.float32
            memory_format = torch.channels_last if self.channels_last and not force_fp32 else torch.contiguous_format
            if fused_modconv is None:
                fused_modconv = self.fused_modconv_default
            fused_modconv = _resolve_fused_modconv(op, fused_modconv, self.training)
            if self.in_channels == 0:
                x = self.const.to(dtype=dtype, memory_format=memory_format)
                x = x.unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            else:
                if x is None:
                    raise ValueError(f"{op}: x must be a tensor of shape [N, {self.in_channels}, "
                                     f"{self.resolution // 2}, {self.resolution // 2}] (only the first block "
                                     f"takes None), got None")
                _check_image(op, "x", x, self.in_channels, self.resolution // 2)
                x = x.to(dtype=dtype, memory_format=memory_format)
            if x.shape[0] != ws.shape[0]:
                raise ValueError(f"{op}: x holds {x.shape[0]} samples but ws {ws.shape[0]}")

            if self.in_channels == 0:
                x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            elif self.architecture == "resnet":
                y = self.skip(x, gain=math.sqrt(0.5))
                x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
                x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, gain=math.sqrt(0.5), **layer_kwargs)
                x = y + x
            else:
                x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
                x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)

            if img is not None:
                _check_image(op, "img", img, self.img_channels, self.resolution // 2)
                img = _ops.upsample2d(img, self.resample_filter, backend=self.backend)
            if self.is_last or self.architecture == "skip":
                y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv)
                y = y.to(dtype=torch.float32, memory_format=torch.contiguous_format)
                img = y if img is None else img + y
            return x, img

    def extra_repr(self) -> str:
        return (f"resolution={self.resolution:d}, architecture={self.architecture}, use_fp16={self.use_fp16}, "
                f"num_conv={self.num_conv}, num_torgb={self.num_torgb}")


def _channels_per_resolution(channel_base: int, channel_max: int, resolutions: List[int]) -> Dict[int, int]:
    """StyleGAN2's channel rule: ``min(channel_base // res, channel_max)``."""
    return {res: min(channel_base // res, channel_max) for res in resolutions}


class SynthesisNetwork(nn.Module):
    """StyleGAN2's synthesis network: ws -> image, blocks ``b4`` ... ``b<img_resolution>``.

    Args:
        w_dim: the size of w.
        img_resolution: the output resolution, a power of two >= 4.
        img_channels: the output's channels.
        channel_base: block ``res`` has ``min(channel_base // res, channel_max)`` channels.
        channel_max: the channel cap.
        num_fp16_res: blocks at the highest this many resolutions are FP16 (on CUDA),
            never b4.
        **block_kwargs: more :class:`SynthesisBlock` arguments (``architecture``,
            ``conv_clamp``, ``fused_modconv_default``, ...).
    """

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768,
                 channel_max: int = 512, num_fp16_res: int = 4, **block_kwargs):
        super().__init__()
        op = op_name(self)
        img_resolution = check_positive_int(op, "img_resolution", img_resolution, 4)
        if img_resolution & (img_resolution - 1) != 0:
            raise ValueError(f"{op}: img_resolution must be a power of two >= 4, got {img_resolution}")
        self.w_dim = check_positive_int(op, "w_dim", w_dim)
        self.img_resolution = img_resolution
        self.img_resolution_log2 = img_resolution.bit_length() - 1
        self.img_channels = check_positive_int(op, "img_channels", img_channels)
        self.num_fp16_res = check_positive_int(op, "num_fp16_res", num_fp16_res, 0)
        self.block_resolutions = [2 ** i for i in range(2, self.img_resolution_log2 + 1)]
        channels = _channels_per_resolution(channel_base, channel_max, self.block_resolutions)
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - self.num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            is_last = res == img_resolution
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim=w_dim, resolution=res,
                                   img_channels=img_channels, is_last=is_last, use_fp16=(res >= fp16_resolution),
                                   **block_kwargs)
            self.num_ws += block.num_conv
            if is_last:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def forward(self, ws: torch.Tensor, **block_kwargs) -> torch.Tensor:
        """Args:
            ws: ``[N, num_ws, w_dim]`` floating (computed in float32).
            **block_kwargs: passed to every block (``noise_mode``, ``force_fp32``,
                ``fused_modconv``, ``update_emas``).

        Returns:
            float32 ``[N, img_channels, img_resolution, img_resolution]``.
        """
        with nvtx(self):
            ws = _check_ws(op_name(self), ws, self.num_ws, self.w_dim).to(torch.float32)
            x = img = None
            w_idx = 0
            for res in self.block_resolutions:
                block = getattr(self, f"b{res}")
                block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
                x, img = block(x, img, block_ws, **block_kwargs)
                w_idx += block.num_conv
            return img

    def extra_repr(self) -> str:
        return (f"w_dim={self.w_dim:d}, num_ws={self.num_ws:d}, img_resolution={self.img_resolution:d}, "
                f"img_channels={self.img_channels:d}, num_fp16_res={self.num_fp16_res:d}")


class Generator(nn.Module):
    """StyleGAN2's generator: ``synthesis(mapping(z, c))``.

    Modules: ``synthesis`` (:class:`SynthesisNetwork`), ``mapping``
    (:class:`MappingNetwork` with ``num_ws = synthesis.num_ws``).

    Args:
        z_dim, c_dim, w_dim: latent, condition and w sizes.
        img_resolution, img_channels: the output image.
        mapping_kwargs: more :class:`MappingNetwork` arguments (``num_layers``, ...).
        **synthesis_kwargs: more :class:`SynthesisNetwork` / :class:`SynthesisBlock`
            arguments (``channel_base``, ``channel_max``, ``num_fp16_res``,
            ``conv_clamp``, ``fused_modconv_default``, ...).
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int,
                 mapping_kwargs: Optional[dict] = None, **synthesis_kwargs):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws,
                                      **(mapping_kwargs or {}))

    def forward(self, z: Optional[torch.Tensor], c: Optional[torch.Tensor], truncation_psi: float = 1,
                truncation_cutoff: Optional[int] = None, update_emas: bool = False,
                **synthesis_kwargs) -> torch.Tensor:
        """Args:
            z: ``[N, z_dim]`` floating.
            c: ``[N, c_dim]`` floating (ignored when ``c_dim == 0``).
            truncation_psi, truncation_cutoff, update_emas: as :meth:`MappingNetwork.forward`.
            **synthesis_kwargs: passed to :meth:`SynthesisNetwork.forward` (``noise_mode``, ...).

        Returns:
            float32 ``[N, img_channels, img_resolution, img_resolution]``.
        """
        with nvtx(self):
            ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                              update_emas=update_emas)
            return self.synthesis(ws, update_emas=update_emas, **synthesis_kwargs)
