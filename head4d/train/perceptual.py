"""LPIPS (VGG) for the trainings' image losses, through the ``lpips`` package.

:func:`build_lpips` returns ``lpips.LPIPS(net="vgg")``, frozen (every parameter's
``requires_grad`` False) and in eval mode, called as ``loss = lpips_model(a, b)`` on images
``[N, 3, H, W]`` in [-1, 1] (``[N, 1, 1, 1]``, one distance per pair). Its two parts come
from two places:

- the linear heads (LPIPS v0.1's learned channel weights) always from the ``lpips``
  package, which ships them;
- the VGG16 backbone: ``backbone="pretrained"`` reads torchvision's ImageNet VGG16 weights
  from torchvision's download cache, the file ``vgg16-397923af.pth`` in
  ``torch.hub.get_dir()/checkpoints/``, and never downloads: when the file is absent it
  raises :class:`MissingWeightsError` saying which file to place where.
  ``backbone="random"`` builds the backbone with fixed random weights drawn from ``seed``
  (for tests: the distances are then not perceptual) and warns that it does so.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .weights import VGG16_FILE, MissingWeightsError, torchvision_weights_path

__all__ = ["LPIPS_BACKBONES", "MissingWeightsError", "VGG16_FILE", "build_lpips", "vgg16_weights_path"]

#: Where the LPIPS backbone's weights come from.
LPIPS_BACKBONES = ("pretrained", "random")


def vgg16_weights_path() -> Path:
    """Where torchvision keeps its ImageNet VGG16 weights: ``torch.hub.get_dir()/checkpoints/
    vgg16-397923af.pth`` (``$TORCH_HOME/hub/checkpoints`` by default)."""
    return torchvision_weights_path(VGG16_FILE)


def _vgg_layers(model: nn.Module) -> dict:
    """The VGG16 feature layers inside an ``lpips.LPIPS(net="vgg")``, by their index in
    torchvision's ``vgg16().features`` (lpips names each slice's children so)."""
    layers = {}
    for index in range(1, model.net.N_slices + 1):
        for name, layer in getattr(model.net, f"slice{index}").named_children():
            layers[name] = layer
    return layers


def _load_vgg16_features(model: nn.Module, path: Path) -> None:
    """Copy torchvision's VGG16 ``features.*`` weights from ``path`` into ``model``'s slices."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    layers = _vgg_layers(model)
    copied = 0
    with torch.no_grad():
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] != "features" or len(parts) != 3:
                continue
            if parts[1] not in layers:  # features 30 (the last pooling) is past LPIPS's slices: no weights
                continue
            getattr(layers[parts[1]], parts[2]).copy_(value)
            copied += 1
    if copied != 26:  # 13 convolutions, a weight and a bias each
        raise ValueError(f"build_lpips: {path} holds {copied} of VGG16's 26 feature tensors; expected torchvision's "
                         f"ImageNet VGG16 state dict ({VGG16_FILE})")


def build_lpips(backbone: str = "pretrained", seed: int = 0) -> nn.Module:
    """LPIPS with a VGG16 backbone, frozen and in eval mode (module docstring).

    Args:
        backbone: ``"pretrained"`` (torchvision's cached ImageNet VGG16 file, see
            :func:`vgg16_weights_path`) or ``"random"`` (fixed random weights from
            ``seed``, for tests; warns).
        seed: the random backbone's seed (the global random state is left as it was).

    Returns:
        an ``lpips.LPIPS`` module on the CPU: ``model(a, b)`` with ``a, b [N, 3, H, W]`` in
        [-1, 1] gives ``[N, 1, 1, 1]``.

    Raises:
        ValueError: ``backbone`` is neither.
        MissingWeightsError: ``"pretrained"`` and the VGG16 file is absent.
        ImportError: the ``lpips`` package is not installed.
    """
    if backbone not in LPIPS_BACKBONES:
        raise ValueError(f"build_lpips: backbone must be one of {LPIPS_BACKBONES}, got {backbone!r}")
    path = vgg16_weights_path()
    if backbone == "pretrained" and not path.is_file():
        raise MissingWeightsError(
            f"LPIPS needs torchvision's ImageNet VGG16 weights and they are not on this machine: place the file "
            f"{VGG16_FILE} (torchvision's VGG16_Weights.IMAGENET1K_V1, which "
            f"torchvision.models.vgg16(weights='IMAGENET1K_V1') downloads on a machine with network) at {path} "
            f"(torch.hub.get_dir()/checkpoints/; TORCH_HOME moves that cache). For a test run only, "
            f"'--lpips-backbone random' builds the backbone with random weights instead.")
    try:
        import lpips
    except ImportError as exc:
        raise ImportError("build_lpips: the 'lpips' package is not installed (pip install lpips; head4d's 'train' "
                          "extra installs it)") from exc
    # pnet_rand: lpips asks torchvision for an untrained VGG16 (no download); the heads load from the package
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        torch.manual_seed(seed)
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if backbone == "pretrained":
        _load_vgg16_features(model, path)
    else:
        warnings.warn(f"LPIPS is built with a randomly initialised VGG16 backbone (seed {seed}), for tests: its "
                      f"distances are not perceptual", stacklevel=2)
    return model.eval().requires_grad_(False)

