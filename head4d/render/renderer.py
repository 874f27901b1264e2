"""``TriplaneRenderer``: EG3D's ``ImportanceRenderer`` (with Portrait4D's options)
composed from head4d's ops, every stage one op call.

Two ways to decode the sample points (step 2 below), with the same results:

* fused: one op (:func:`~head4d.ops.decode_triplanes`) samples the planes and runs the
  decoder MLP per point, writing only colors and densities and keeping only its inputs
  for the backward (far less memory);
* unfused: :func:`~head4d.ops.sample_triplanes` (compiled where built) -> ``decoder``,
  which materializes the per-sample features and the MLP's activations (and autograd
  keeps them); the reference, and the only way for any other decoder.

The default (``fused=None``) is the faster one per device type (:data:`FUSED_BY_DEFAULT`):
unfused on the CPU, fused on CUDA; ``fused=True`` asks for the fused path's memory.

Pipeline per call (the random numbers are drawn in this order, all from
``generator`` when one is given):

1. coarse depths ``[N, R, S, 1]`` (:func:`~head4d.ops.stratified_depths`; jitter);
2. points ``o + t * d`` -> :func:`~head4d.ops.sample_triplanes` (mean over planes)
   -> ``decoder`` (or :func:`~head4d.ops.decode_triplanes`, fused) -> colors and raw
   densities (+ Gaussian density noise);
3. if ``depth_resolution_importance > 0``: :func:`~head4d.ops.composite_rays` for the
   weights, :func:`~head4d.ops.sample_importance` (its uniform numbers), decode the
   fine points (density noise again), :func:`~head4d.ops.merge_samples`;
4. :func:`~head4d.ops.composite_rays` of all samples, with the background.
"""
from __future__ import annotations

import numbers
from typing import Callable, Mapping, Optional, Tuple

import torch
from torch import nn

from .._checks import check_choice, check_tensor
from .._nvtx import nvtx_range
from ..ops import (auto_plane_limits, composite_rays, decode_triplanes, merge_samples, ray_box_limits,
                   sample_importance, sample_triplanes, stratified_depths)
from ..ops import decoding as _decoding
from ..ops.triplanes import LAYOUTS
from .decoder import TriplaneDecoder

NAME = "TriplaneRenderer"

#: What ``fused=None`` does per device type (when the decoder can be fused and a compiled
#: ``decode_triplanes`` backend runs there), by the speed of the whole render's forward +
#: backward. CPU: unfused, with the compiled ``sample_triplanes``; the fused C++ decode
#: ran at 0.44-0.56x its speed at every shape tried (251 ms against 112 ms at 32x32 rays,
#: 48 + 48 samples, 256x256 planes; 0.80x in a rerun on a loaded machine), since torch's
#: MKL matrix products beat the per-point MLP. CUDA: fused, the expected winner, not yet
#: measured (no GPU run so far): a GPU run should confirm or flip it. Other device types:
#: unfused.
FUSED_BY_DEFAULT = {"cpu": False, "cuda": True}


def _check_fused(name: str, value) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{NAME}: {name} must be None (auto), True or False, got {value!r}")


def _option(options: Mapping, key: str):
    if key not in options:
        raise ValueError(f"{NAME}: options[{key!r}] is required")
    return options[key]


def _fusable(decoder) -> bool:
    """Whether ``decoder`` is exactly a :class:`TriplaneDecoder` computation that
    :func:`~head4d.ops.decode_triplanes` reproduces (its own ``forward``, no hooks, sizes
    the compiled kernels take)."""
    return (isinstance(decoder, TriplaneDecoder) and type(decoder).forward is TriplaneDecoder.forward
            and not decoder._forward_hooks and not decoder._forward_pre_hooks
            and decoder.n_features <= _decoding.MAX_FEATURES and decoder.hidden <= _decoding.MAX_HIDDEN
            and 1 + decoder.out_features <= _decoding.MAX_OUTPUTS)


def _run_model(planes: torch.Tensor, decoder: Callable, origins: torch.Tensor, directions: torch.Tensor,
               depths: torch.Tensor, box_warp: float, plane_layout: str, density_noise: float,
               generator: Optional[torch.Generator],
               fused_weights: Optional[Tuple[torch.Tensor, ...]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode the points ``origins + depths * directions``: colors ``[N, R, S, C]`` and
    raw densities ``[N, R, S, 1]``, in ``depths.dtype`` (EG3D's ``run_model``).

    With ``fused_weights`` (the decoder's :meth:`~TriplaneDecoder.effective_weights`),
    :func:`~head4d.ops.decode_triplanes` replaces ``sample_triplanes`` + ``decoder``."""
    n, r, s, _ = depths.shape
    points = (origins.unsqueeze(-2) + depths * directions.unsqueeze(-2)).reshape(n, r * s, 3)
    if _is_field(planes):
        point_dirs = directions.unsqueeze(-2).expand(n, r, s, 3).reshape(n, r * s, 3)
        out = planes(points, point_dirs)
        if not isinstance(out, Mapping) or "rgb" not in out or "sigma" not in out:
            raise TypeError(f"{NAME}: a point field must return a dict with 'rgb' [N, M, C] and 'sigma' [N, M, 1], "
                            f"got {type(out).__name__}")
        rgb, sigma = out["rgb"], out["sigma"]
    elif fused_weights is not None:
        rgb, sigma = decode_triplanes(planes, points, *fused_weights, box_warp=box_warp,
                                      plane_layout=plane_layout)
    else:
        point_dirs = directions.unsqueeze(-2).expand(n, r, s, 3).reshape(n, r * s, 3)
        features = sample_triplanes(planes, points, box_warp=box_warp, plane_layout=plane_layout, reduce="mean")
        out = decoder(features, point_dirs)
        if not isinstance(out, Mapping) or "rgb" not in out or "sigma" not in out:
            raise TypeError(f"{NAME}: the decoder must return a dict with 'rgb' [N, M, C] and 'sigma' [N, M, 1], "
                            f"got {type(out).__name__}")
        rgb, sigma = out["rgb"], out["sigma"]
    if rgb.dim() != 3 or tuple(rgb.shape[:2]) != (n, r * s):
        raise ValueError(f"{NAME}: decoder 'rgb' must have shape [N, M, C] = [{n}, {r * s}, C], got {list(rgb.shape)}")
    if tuple(sigma.shape) != (n, r * s, 1):
        raise ValueError(f"{NAME}: decoder 'sigma' must have shape [N, M, 1] = [{n}, {r * s}, 1], "
                         f"got {list(sigma.shape)}")
    if density_noise > 0:
        if generator is None:
            noise = torch.randn(sigma.shape, dtype=sigma.dtype, device=sigma.device)
        else:
            noise = torch.randn(sigma.shape, generator=generator, dtype=sigma.dtype,
                                device=generator.device).to(sigma.device)
        sigma = sigma + noise * density_noise
    return rgb.reshape(n, r, s, rgb.shape[-1]).to(depths.dtype), sigma.reshape(n, r, s, 1).to(depths.dtype)


def _is_field(planes) -> bool:
    """Whether ``planes`` is a point field (a callable, not a tensor of planes)."""
    return callable(planes) and not isinstance(planes, torch.Tensor)


class TriplaneRenderer(nn.Module):
    """EG3D's ``ImportanceRenderer`` with Portrait4D's options, built from head4d's ops.

    Args:
        plane_layout: ``"eg3d"`` (planes (x, y), (x, z), (z, x): EG3D-family
            checkpoints) or ``"portrait4d"`` ((x, y), (y, z), (z, x)); ``options["plane_layout"]``
            overrides it per call.
        fused: how the sample points are decoded; ``options["fused"]`` overrides it per call.
            ``None`` (auto): the faster path for the planes' device type
            (:data:`FUSED_BY_DEFAULT`): on CUDA fused (:func:`~head4d.ops.decode_triplanes`)
            when the decoder is a plain :class:`~head4d.render.TriplaneDecoder` and a
            compiled ``decode_triplanes`` backend (not the reference) runs there; on the
            CPU unfused, where the compiled ``sample_triplanes`` and torch's matrix
            products beat the fused decode (about 2x, forward + backward). ``True``:
            fused (the decoder must be a ``TriplaneDecoder``), for its memory.
            ``False``: unfused, ``sample_triplanes`` then ``decoder`` (the reference).
            Both give the same results to rounding; fused keeps far less memory for the
            backward (only its inputs per pass instead of per-sample features and
            activations: 5-6x less for the whole render).

    ``options`` (EG3D's ``rendering_kwargs``; unknown keys are ignored):

    ``ray_start``, ``ray_end`` (required)
        Numbers (FFHQ: 2.25, 3.3); both ``"auto"`` (EG3D: each ray's entry/exit of the
        ``box_warp`` cube, :func:`~head4d.ops.ray_box_limits`; rays that miss borrow
        from the others as set by ``invalid_end``); or both ``"auto-plane"``
        (Portrait4D: one range per image around the camera-space depth of the
        origin, :func:`~head4d.ops.auto_plane_limits`; needs the camera, from the
        ``cam2world`` argument or else ``options["cam2world"]``, ``[N, 4, 4]``).
    ``box_warp`` (required)
        Side of the head cube (FFHQ EG3D 1.0, Portrait4D 1.3).
    ``depth_resolution`` (required)
        Coarse samples per ray, S >= 2 (>= 4 with importance sampling).
    ``depth_resolution_importance`` (default 0)
        Fine samples per ray; 0 renders the coarse pass only.
    ``disparity_space_sampling`` (default False)
        Coarse samples evenly spaced in inverse depth.
    ``clamp_mode`` (default ``"softplus"``)
        Only ``"softplus"`` exists (as in EG3D).
    ``white_back`` (default False)
        White background (``background = 1``); not with a ``background`` argument.
    ``density_noise`` (default 0)
        Standard deviation of Gaussian noise added to the raw densities of every
        decoded sample (both passes), as EG3D's ``run_model``.
    ``plane_layout`` (default: the constructor's)
    ``jitter`` (default ``"per_image"`` for ``"auto-plane"``, else ``"per_sample"``)
        Stratified jitter of the coarse depths (:func:`~head4d.ops.stratified_depths`);
        ``"none"`` makes the coarse depths deterministic.
    ``det_importance`` (default False)
        Deterministic importance sampling (EG3D always samples randomly).
    ``invalid_end`` (default ``"max_start"``)
        For ``"auto"``: see :func:`~head4d.ops.ray_box_limits`.
    ``fused`` (default: the constructor's)
        ``None``, ``True`` or ``False``: see ``fused`` above.

    Unfused, the decoder is called as ``decoder(features [N, M, C_planes], directions [N, M, 3])``
    with the plane features already averaged (``reduce="mean"``), and must return
    ``{"rgb": [N, M, C], "sigma": [N, M, 1]}`` (:class:`~head4d.render.TriplaneDecoder`
    does). Fused, a ``TriplaneDecoder``'s :meth:`~head4d.render.TriplaneDecoder.effective_weights`
    go to :func:`~head4d.ops.decode_triplanes` instead. The colors and densities are cast
    to the rays' dtype for compositing.
    """

    def __init__(self, plane_layout: str = "eg3d", fused: Optional[bool] = None):
        super().__init__()
        check_choice(NAME, "plane_layout", plane_layout, tuple(LAYOUTS))
        _check_fused("fused", fused)
        self.plane_layout = plane_layout
        self.fused = fused

    def extra_repr(self) -> str:
        return f"plane_layout={self.plane_layout!r}, fused={self.fused!r}"

    def uses_fused(self, decoder: Callable, device: torch.device, fused: Optional[bool] = None) -> bool:
        """Whether a call with this ``decoder`` on ``device`` decodes fused (``fused``:
        the per-call override, as ``options["fused"]``; None means the constructor's)."""
        if fused is None:
            fused = self.fused
        if fused is None:
            return (FUSED_BY_DEFAULT.get(device.type, False) and _fusable(decoder)
                    and _decoding.resolve_backend(device) != "torch")
        if fused and not isinstance(decoder, TriplaneDecoder):
            raise TypeError(f"{NAME}: fused decoding needs a TriplaneDecoder (its MLP runs inside "
                            f"decode_triplanes), got {type(decoder).__name__}; use fused=False or None")
        return bool(fused)

    def forward(self, planes: torch.Tensor, decoder: Callable, ray_origins: torch.Tensor,
                ray_directions: torch.Tensor, options: Mapping, *, background: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, cam2world: Optional[torch.Tensor] = None,
                return_samples: bool = False):
        """Render rays through a triplane.

        Args:
            planes: ``[N, 3, C, H, W]`` floating point; or a point field: a callable
                ``field(points [N, M, 3], directions [N, M, 3]) -> {"rgb": [N, M, C],
                "sigma": [N, M, 1]}`` that decodes the sample points itself (M = R * S,
                the S samples of each ray contiguous), with ``decoder=None``. A field is
                how a model renders what one triplane and decoder cannot express
                (Portrait4D's deformed points and its blend of a part and a head triplane,
                :class:`head4d.models.GenHead`); it is never fused.
            decoder: see the class docstring (None with a point field).
            ray_origins: ``[N, R, 3]`` floating point, same device.
            ray_directions: ``[N, R, 3]`` unit vectors, same dtype and device.
            options: see the class docstring.
            background: ``[N, R, C_out]`` background features composited with
                ``1 - opacity`` before the final ``* 2 - 1`` (Portrait4D), or None.
            generator: ``torch.Generator`` for every random number, or None (global RNG).
            cam2world: ``[N, 4, 4]`` for ``"auto-plane"`` (else ``options["cam2world"]``).
            return_samples: also return the final composite's samples (for losses on the
                ray weights, such as :func:`~head4d.render.distortion_loss`); off by default.

        Returns:
            ``(features [N, R, C_out], depth [N, R, 1], opacity [N, R, 1])`` in the rays'
            dtype: the composited features mapped to [-1, 1] (``* 2 - 1``), the expected
            depth, and the sum of the final compositing weights. With ``return_samples`` a
            fourth item, a dict: ``"depths"`` ``[N, R, S, 1]`` the depths of the final pass's
            samples (coarse and fine merged, sorted; S = ``depth_resolution +
            depth_resolution_importance``; no gradient: the samples are drawn), the edges of
            the S - 1 compositing intervals, and ``"weights"`` ``[N, R, S - 1, 1]`` each
            interval's compositing weight (differentiable; they sum to ``opacity``).
        """
        if not isinstance(return_samples, bool):
            raise TypeError(f"{NAME}: return_samples must be a bool, got {type(return_samples).__name__}")
        check_tensor(NAME, "ray_origins", ray_origins, "[N, R, 3]", 3)
        check_tensor(NAME, "ray_directions", ray_directions, "[N, R, 3]", 3)
        if ray_origins.shape[2] != 3 or ray_directions.shape != ray_origins.shape:
            raise ValueError(f"{NAME}: ray_origins and ray_directions must both have shape [N, R, 3], got "
                             f"{list(ray_origins.shape)} and {list(ray_directions.shape)}")
        if ray_directions.dtype != ray_origins.dtype:
            raise TypeError(f"{NAME}: ray_directions has dtype {ray_directions.dtype} but ray_origins has "
                            f"{ray_origins.dtype}; they must match")
        if not isinstance(options, Mapping):
            raise TypeError(f"{NAME}: options must be a dict, got {type(options).__name__}")
        n, r, _ = ray_origins.shape

        box_warp = _option(options, "box_warp")
        n_coarse = _option(options, "depth_resolution")
        n_fine = options.get("depth_resolution_importance", 0) or 0
        disparity = bool(options.get("disparity_space_sampling", False))
        clamp_mode = options.get("clamp_mode", "softplus")
        if clamp_mode != "softplus":
            raise ValueError(f"{NAME}: options['clamp_mode'] must be 'softplus' (the only mode EG3D's ray "
                             f"marcher has), got {clamp_mode!r}")
        white_back = bool(options.get("white_back", False))
        density_noise = float(options.get("density_noise", 0) or 0)
        plane_layout = options.get("plane_layout", self.plane_layout)
        check_choice(NAME, "options['plane_layout']", plane_layout, tuple(LAYOUTS))
        det_importance = bool(options.get("det_importance", False))
        ray_start, ray_end = _option(options, "ray_start"), _option(options, "ray_end")
        fused = options.get("fused", None)
        _check_fused("options['fused']", fused)
        device = planes.device if isinstance(planes, torch.Tensor) else ray_origins.device
        if _is_field(planes):
            if decoder is not None:
                raise ValueError(f"{NAME}: with a point field as planes, decoder must be None (the field decodes), "
                                 f"got {type(decoder).__name__}")
            if (self.fused if fused is None else fused) is True:
                raise ValueError(f"{NAME}: fused = True needs planes and a TriplaneDecoder, "
                                 f"not a point field")
            fused_weights = None
        else:
            fused_weights = decoder.effective_weights() if self.uses_fused(decoder, device, fused) else None

        with nvtx_range("head4d.render"):
            with nvtx_range("head4d.render.coarse"):
                if isinstance(ray_start, str) or isinstance(ray_end, str):
                    if ray_start != ray_end or ray_start not in ("auto", "auto-plane"):
                        raise ValueError(f"{NAME}: options['ray_start'] and options['ray_end'] must be numbers, "
                                         f"both 'auto' or both 'auto-plane', got {ray_start!r} and {ray_end!r}")
                    if ray_start == "auto":
                        start, end = ray_box_limits(ray_origins, ray_directions, box_warp,
                                                    invalid_end=options.get("invalid_end", "max_start"))
                        default_jitter = "per_sample"
                    else:
                        camera = cam2world if cam2world is not None else options.get("cam2world")
                        if camera is None:
                            raise ValueError(f"{NAME}: ray_start = ray_end = 'auto-plane' needs the camera: pass "
                                             f"cam2world=[N, 4, 4] or set options['cam2world']")
                        check_tensor(NAME, "cam2world", camera, "[N, 4, 4]", 3)
                        if camera.shape[0] != n:
                            raise ValueError(f"{NAME}: cam2world has batch size {camera.shape[0]} but the rays "
                                             f"have {n}; they must match")
                        start, end = auto_plane_limits(camera.to(device=ray_origins.device, dtype=ray_origins.dtype),
                                                       box_warp)
                        default_jitter = "per_image"
                    jitter = options.get("jitter", default_jitter)
                    depths_coarse = stratified_depths(start, end, n_coarse, r, disparity=disparity, jitter=jitter,
                                                      generator=generator)
                else:
                    for key, value in (("ray_start", ray_start), ("ray_end", ray_end)):
                        if isinstance(value, bool) or not isinstance(value, numbers.Real):
                            raise TypeError(f"{NAME}: options[{key!r}] must be a number, 'auto' or 'auto-plane', "
                                            f"got {type(value).__name__}")
                    jitter = options.get("jitter", "per_sample")
                    depths_coarse = stratified_depths(float(ray_start), float(ray_end), n_coarse, r,
                                                      disparity=disparity, jitter=jitter, generator=generator,
                                                      batch_size=n, device=ray_origins.device,
                                                      dtype=ray_origins.dtype)
                colors_coarse, densities_coarse = _run_model(planes, decoder, ray_origins, ray_directions,
                                                             depths_coarse, box_warp, plane_layout, density_noise,
                                                             generator, fused_weights)

            if n_fine > 0:
                with nvtx_range("head4d.render.importance"):
                    # the weights only place the fine samples (no gradient flows through
                    # them): nothing of this composite is kept for the backward
                    with torch.no_grad():
                        _, _, weights = composite_rays(colors_coarse, densities_coarse, depths_coarse)
                    depths_fine = sample_importance(depths_coarse, weights, n_fine, det=det_importance,
                                                    generator=generator)
                with nvtx_range("head4d.render.fine"):
                    colors_fine, densities_fine = _run_model(planes, decoder, ray_origins, ray_directions,
                                                             depths_fine, box_warp, plane_layout, density_noise,
                                                             generator, fused_weights)
                    depths, colors, densities = merge_samples(depths_coarse, colors_coarse, densities_coarse,
                                                              depths_fine, colors_fine, densities_fine)
            else:
                depths, colors, densities = depths_coarse, colors_coarse, densities_coarse

            with nvtx_range("head4d.render.composite"):
                if background is not None and isinstance(background, torch.Tensor):
                    background = background.to(colors.dtype)
                rgb, depth, weights = composite_rays(colors, densities, depths, white_back=white_back,
                                                     background=background)
            if return_samples:
                return rgb, depth, weights.sum(dim=2), {"depths": depths, "weights": weights}
            return rgb, depth, weights.sum(dim=2)
