"""Helpers of the StyleGAN2-network, GenHead and reconstructor tests: the upstream parameter
lists (GenHead's ``tests/data/genhead_state_dict.txt``, the reconstructor's
``tests/data/reconstructor_state_dict.txt``) parsed, for the tests that hold head4d's modules to
upstream's names, shapes and parameter counts; and the randomization of the parameters a
fresh module initializes to zero or one, so that the tests see them act; Portrait4D-style
cameras; the super-resolution narrowed for quick runs; a tiny in-memory labelled dataset
for the training tests.

Not a test file (no ``test_`` prefix).
"""
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from head4d.head.labels import make_labels

DATA = Path(__file__).parent / "data" / "genhead_state_dict.txt"
#: The reconstructor's sub-networks (``encoder_global``, ``encoder_detail``, ``background``, ...),
#: entries ``name (shape)`` without a dtype.
RECONSTRUCTOR_DATA = Path(__file__).parent / "data" / "reconstructor_state_dict.txt"

Entry = Tuple[str, Tuple[int, ...], Optional[str]]


def upstream_sections(strip_prefix: bool = False, path: Path = DATA) -> Dict[str, Tuple[int, int, List[Entry]]]:
    """``{section: (key count, parameter count, [(name, shape, dtype), ...])}`` in file
    order, one section per ``== name: K keys, P params`` header of ``path`` (by default
    GenHead's list: ``backbone``, ``background``, ``superresolution``; dtype None where an
    entry names none). ``strip_prefix`` drops each name's first component
    (``backbone.synthesis.b4.const`` -> ``synthesis.b4.const``)."""
    sections, current = {}, None
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        header = re.match(r"== (\w+): (\d+) keys, (\d+) params", line)
        if header:
            current = header.group(1)
            sections[current] = (int(header.group(2)), int(header.group(3)), [])
            continue
        name, shape, dtype = re.match(r"(\S+) (\(.*\))(?: (\w+))?$", line).groups()
        dims = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        sections[current][2].append((name.split(".", 1)[1] if strip_prefix else name, dims, dtype))
    return sections


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Biases, noise strengths, the affine biases (around their init of 1), the decoder's
    density weights (zero at init) and ``w_avg`` random and non-zero, in place; the other
    weights keep their random init (drawn under ``torch.manual_seed``). Returns ``module``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("noise_strength"):
                p.copy_(0.2 + 0.5 * torch.rand(p.shape, generator=gen))
            elif name.endswith("affine.bias"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif name == "decoder.out_sigma.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            if name.endswith("w_avg"):
                b.copy_(torch.randn(b.shape, generator=gen))
    return module


def camera(n, distance=4.0, yaw=0.0):
    """Portrait4D cameras ``[n, 25]``: looking at the origin from ``distance`` along +z
    (rotated by ``yaw`` about +y), FOV 12 degrees, principal point at the centre."""
    c, s = math.cos(yaw), math.sin(yaw)
    rot = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    cam2world = torch.eye(4).repeat(n, 1, 1)
    cam2world[:, :3, :3] = rot
    cam2world[:, :3, 3] = rot @ torch.tensor([0.0, 0.0, distance])
    focal = 1 / (math.tan(math.radians(12) / 2) * 1.414)
    intrinsics = torch.tensor([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1.0]]).repeat(n, 1, 1)
    return torch.cat([cam2world.reshape(n, 16), intrinsics.reshape(n, 9)], dim=1)


def narrow_superresolution(model: torch.nn.Module) -> None:
    """A model's super-resolution blocks replaced, in place, by narrow ones (8 and 4
    channels) at the upstream resolutions, so that tests run it quickly."""
    import head4d.nn as hnn

    sr = model.superresolution
    sr.block0 = hnn.SynthesisBlock(sr.channels, 8, w_dim=512, resolution=256, img_channels=3, is_last=False,
                                   use_fp16=True, conv_clamp=256, fused_modconv_default="inference_only")
    sr.block1 = hnn.SynthesisBlock(8, 4, w_dim=512, resolution=512, img_channels=3, is_last=True,
                                   use_fp16=True, conv_clamp=256, fused_modconv_default="inference_only")


#: The neural rendering resolution of :func:`small_genhead_config`.
SMALL_RES = 12


def small_genhead_config(**kwargs):
    """A GenHeadConfig with tiny channels and resolutions and few samples (``kwargs``
    override), for tests that run whole GenHeads on the CPU."""
    from head4d.models import GenHeadConfig

    args = dict(channel_base=256, channel_max=16, triplane_resolution=32, background_resolution=16,
                background_channel_base=128, background_channel_max=16, background_mapping_layers=2,
                depth_resolution=8, depth_resolution_importance=8, neural_rendering_resolution=SMALL_RES,
                fine_resolution=12, coarse_resolution=4, mask_resolution=48)
    args.update(kwargs)
    return GenHeadConfig(**args)


def make_dataset(count=4, resolution=16, seed=0):
    """``count`` items ``(uint8 [3, R, R], float32 [437])``: random images, cameras at
    yaws in [-0.4, 0.4], random expressions and jaw openings, zero shape and neck."""
    gen = torch.Generator().manual_seed(seed)
    cams = torch.cat([camera(1, yaw=-0.4 + 0.8 * i / max(count - 1, 1)) for i in range(count)])
    jaw = torch.zeros(count, 3)
    jaw[:, 0] = 0.3 * torch.rand(count, generator=gen)
    labels = make_labels(cams[:, :16].reshape(count, 4, 4), cams[:, 16:].reshape(count, 3, 3), torch.zeros(count, 300),
                         0.5 * torch.randn(count, 100, generator=gen), torch.zeros(count, 3), jaw,
                         torch.zeros(count, 6)).float()
    images = torch.randint(0, 256, (count, 3, resolution, resolution), generator=gen, dtype=torch.uint8)
    return [(images[i], labels[i]) for i in range(count)]
