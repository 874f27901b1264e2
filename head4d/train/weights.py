"""The ImageNet weights the trainings start from, read from torchvision's download cache
(``torch.hub.get_dir()/checkpoints/``, ``$TORCH_HOME/hub/checkpoints`` by default); head4d
never downloads them. A missing file is a :class:`MissingWeightsError` that names the file
and the folder.

- VGG16 (``vgg16-397923af.pth``): LPIPS's backbone (:mod:`head4d.train.perceptual`).
- ResNet-34 (``resnet34-b627a593.pth``, torchvision's ``ResNet34_Weights.IMAGENET1K_V1``):
  the trunk of the reconstructor's global encoder, as upstream starts it
  (:meth:`head4d.nn.EncoderGlobal.load_imagenet_trunk`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

__all__ = ["MissingWeightsError", "RESNET34_FILE", "VGG16_FILE", "resnet34_state_dict", "torchvision_weights_path"]

#: torchvision's file name of the ImageNet VGG16 weights (``VGG16_Weights.IMAGENET1K_V1``).
VGG16_FILE = "vgg16-397923af.pth"
#: torchvision's file name of the ImageNet ResNet-34 weights (``ResNet34_Weights.IMAGENET1K_V1``).
RESNET34_FILE = "resnet34-b627a593.pth"


class MissingWeightsError(FileNotFoundError):
    """A weights file a training needs is not on this machine (the message says which and where)."""


def torchvision_weights_path(name: str) -> Path:
    """Where torchvision keeps its downloaded weights file ``name``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def resnet34_state_dict(what: str = "the reconstructor's global encoder",
                        alternative: str = "'--global-encoder-init random' starts it from random weights "
                                           "instead") -> Dict[str, torch.Tensor]:
    """torchvision's ImageNet ResNet-34 state dict from the cache (no code runs on load).

    Raises:
        MissingWeightsError: the file is absent; the message names ``what`` needs it and
            ``alternative``.
    """
    path = torchvision_weights_path(RESNET34_FILE)
    if not path.is_file():
        raise MissingWeightsError(
            f"{what} starts from torchvision's ImageNet ResNet-34 weights and they are not on this machine: place "
            f"the file {RESNET34_FILE} (torchvision's ResNet34_Weights.IMAGENET1K_V1, which "
            f"torchvision.models.resnet34(weights='IMAGENET1K_V1') downloads on a machine with network) at {path} "
            f"(torch.hub.get_dir()/checkpoints/; TORCH_HOME moves that cache); {alternative}.")
    return torch.load(path, map_location="cpu", weights_only=True)
