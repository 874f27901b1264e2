"""FLAME motions of the synthesis: the 109-number motion vector and where its frames
come from.

A motion is ``[..., 109]``: expression coefficients 0-99, jaw pose 100-102 (axis-angle,
x first: the opening), eye poses 103-108 (left then right eye axis-angles). The neck
(Portrait4D's global pose) is not part of it; the synthesis keeps the neck at 0.

Sources of frames (:class:`MotionSource`):

* ``clips`` ``[C, T, 109]``: C motion clips of T frames each (for example FLAME fits of
  talking-head videos). A dynamic sample takes two frames of one random clip (the two
  frame indices drawn independently, so they may coincide), as Portrait4D draws its
  source and driver from one video; its two eye poses come from two random frames of any
  clip (Portrait4D draws the eye poses apart from the clip). A static sample takes the
  expression and jaw of one random frame of any clip and the eyes of another.
* ``None``: head4d's random motion model near the canonical codes (head4d ships no motion
  dataset). Per clip a centre expression ``N(0, EXPRESSION_CLIP_STD^2)`` per coefficient;
  per frame the centre plus ``N(0, EXPRESSION_FRAME_STD^2)``; the jaw opening (x) per
  frame ``|N(0, JAW_STD^2)|`` clamped to ``JAW_MAX``, its y and z 0; each eye angle
  ``N(0, EYE_STD^2)``, both eyes alike (they look the same way). A static sample is one
  frame of a fresh clip. These numbers are head4d's choice, not Portrait4D's.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

EXPRESSION = slice(0, 100)
JAW = slice(100, 103)
EYES = slice(103, 109)
MOTION_SIZE = 109

EXPRESSION_CLIP_STD = 0.5
EXPRESSION_FRAME_STD = 0.25
JAW_STD = 0.1
JAW_MAX = 0.35
EYE_STD = 0.1


def _device_of(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _randn(shape, generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=_device_of(generator))


def _randint(high: int, shape, generator) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=generator, device=_device_of(generator))


def check_clips(clips: torch.Tensor) -> torch.Tensor:
    """``clips`` must be a floating ``[C, T, 109]`` tensor with C, T >= 1; returns it as float32."""
    if not isinstance(clips, torch.Tensor) or not clips.is_floating_point() or clips.dim() != 3 \
            or clips.shape[2] != MOTION_SIZE or clips.shape[0] < 1 or clips.shape[1] < 1:
        raise ValueError(f"motions must be a floating tensor [C, T, {MOTION_SIZE}] (C clips of T frames: "
                         f"expression 100, jaw 3, eyes 6), got "
                         f"{getattr(clips, 'dtype', type(clips).__name__)} {list(getattr(clips, 'shape', []))}")
    return clips.to(torch.float32)


class MotionSource:
    """Draws motion frames (module docstring) from ``clips`` ``[C, T, 109]`` or, with None,
    from head4d's random model. All draws use the ``generator`` given to each call and
    happen on its device (the CPU for None); the results are float32 on that device."""

    def __init__(self, clips: Optional[torch.Tensor] = None):
        self.clips = None if clips is None else check_clips(clips)

    def dynamic(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``[n, 2, 109]``: two frames of one clip per sample."""
        if self.clips is None:
            centre = EXPRESSION_CLIP_STD * _randn((n, 1, 100), generator)
            return self._frames(centre + EXPRESSION_FRAME_STD * _randn((n, 2, 100), generator), generator)
        clips = self.clips.to(_device_of(generator))
        c, t, _ = clips.shape
        clip = _randint(c, (n, 1), generator)
        frame = _randint(t, (n, 2), generator)
        motions = clips[clip, frame].clone()
        flat = clips.reshape(c * t, MOTION_SIZE)
        motions[..., EYES] = flat[_randint(c * t, (n, 2), generator), EYES]
        return motions

    def static(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``[n, 109]``: one frame per sample."""
        if self.clips is None:
            centre = EXPRESSION_CLIP_STD * _randn((n, 1, 100), generator)
            return self._frames(centre + EXPRESSION_FRAME_STD * _randn((n, 1, 100), generator), generator)[:, 0]
        clips = self.clips.to(_device_of(generator))
        flat = clips.reshape(-1, MOTION_SIZE)
        motions = flat[_randint(flat.shape[0], (n,), generator)].clone()
        motions[:, EYES] = flat[_randint(flat.shape[0], (n,), generator), EYES]
        return motions

    @staticmethod
    def _frames(expression: torch.Tensor, generator) -> torch.Tensor:
        """Random-model frames ``[n, F, 109]`` around the given expressions ``[n, F, 100]``."""
        n, f, _ = expression.shape
        jaw = torch.zeros(n, f, 3, device=expression.device)
        jaw[..., 0] = (JAW_STD * _randn((n, f), generator)).abs().clamp(max=JAW_MAX)
        eye = EYE_STD * _randn((n, f, 3), generator)
        return torch.cat([expression, jaw, eye, eye], dim=2)


def perturb_jaw(motions: torch.Tensor, probability: float, maximum: float,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Portrait4D's jaw perturbation: each frame's jaw x-rotation independently replaced,
    with ``probability``, by ``U(0, maximum)``.

    Args:
        motions: ``[..., 109]`` float32 on the generator's device.

    Returns:
        ``(motions, perturbed)``: a new tensor and the ``[...]`` bool mask of replaced frames.
    """
    shape = motions.shape[:-1]
    device = _device_of(generator)
    perturbed = torch.rand(shape, generator=generator, device=device) < probability
    value = maximum * torch.rand(shape, generator=generator, device=device)
    out = motions.clone()
    out[..., JAW.start] = torch.where(perturbed, value, motions[..., JAW.start])
    return out, perturbed
