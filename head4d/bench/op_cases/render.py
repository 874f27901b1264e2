"""Benchmark cases of ``render``: the whole triplane renderer, fused against the unfused
composition of references."""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..case import REFERENCE, Case, Inputs, Settings, default_batches, fast_backends, process_backend, register


#: EG3D's FFHQ camera: radius 2.7 around the origin, normalized focal 4.2647,
#: near / far 2.25 / 3.3.
_FFHQ_FOCAL, _FFHQ_RADIUS, _FFHQ_NEAR, _FFHQ_FAR = 4.2647, 2.7, 2.25, 3.3


@register("render", whole_model=True)
def _render_cases(settings: Settings) -> List[Case]:
    """The whole renderer, fused (``backend`` = every op on that backend, the fused
    decode path on) against the unfused composition of references (``torch``).

    Planes ``[N, 3, 32, 256, 256]`` fp32, a Portrait4D decoder (32 -> 64 -> 1 + 32, its
    density head randomized), EG3D's FFHQ cameras (OpenCV, radius 2.7, near / far
    2.25 / 3.3, box 1.0, EG3D plane layout), 48 coarse + 48 importance samples,
    deterministic (no jitter, ``det_importance``, no density noise) so that backends
    can be compared. GPU: 64^2 and 128^2 rays, N = 1 (full: 1 and 4). CPU: N = 1, 32^2 rays
    (quick: 16^2). The output is ``cat([features, depth, opacity], -1)``; ``fwd+bwd``
    differentiates the planes and the four decoder tensors, and measures memory.
    """
    from ...ops import decoding

    device = settings.device
    cuda = device.type == "cuda"
    batches = default_batches(settings)
    if cuda:
        resolutions = (64,) if settings.small else (64, 128)
    else:
        resolutions = (16,) if settings.small else (32,)
    backends = fast_backends(decoding.PREFERENCES, device)
    return [_render_case(n, res, 48, 48, backends) for n in batches for res in resolutions]


def _look_at_origin(n: int, radius: float, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """``[N, 4, 4]`` OpenCV cam2world matrices on a sphere of ``radius`` (yaw and
    pitch within +-0.3 rad of the front), looking at the origin, y down."""
    yaw = (torch.rand(n, generator=gen, device=device) - 0.5) * 0.6
    pitch = (torch.rand(n, generator=gen, device=device) - 0.5) * 0.6
    position = radius * torch.stack([torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch),
                                     torch.cos(yaw) * torch.cos(pitch)], dim=-1)
    forward = -position / position.norm(dim=-1, keepdim=True)
    down = torch.tensor([0.0, -1.0, 0.0], device=device).expand(n, 3)
    right = torch.linalg.cross(down, forward)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(forward, right)
    cam2world = torch.eye(4, device=device).repeat(n, 1, 1)
    cam2world[:, :3, 0], cam2world[:, :3, 1], cam2world[:, :3, 2] = right, down, forward
    cam2world[:, :3, 3] = position
    return cam2world


def _render_case(n: int, res: int, n_coarse: int, n_fine: int, backends: Tuple[str, ...]) -> Case:
    from ...ops import generate_rays
    from ...render import TriplaneDecoder, TriplaneRenderer

    c, h, w = 32, 256, 256
    r = res * res
    decoder_keys = ("decoder.net.0.weight", "decoder.net.0.bias", "decoder.out_sigma.weight",
                    "decoder.out_sigma.bias", "decoder.out_rgb.weight", "decoder.out_rgb.bias")
    options = {"ray_start": _FFHQ_NEAR, "ray_end": _FFHQ_FAR, "box_warp": 1.0, "depth_resolution": n_coarse,
               "depth_resolution_importance": n_fine, "jitter": "none", "det_importance": True,
               "density_noise": 0.0, "plane_layout": "eg3d"}

    class _Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = TriplaneDecoder(c, 64, 32, variant="portrait4d")
            self.renderer = TriplaneRenderer(plane_layout="eg3d")

        def forward(self, planes, origins, directions, fused):
            features, depth, opacity = self.renderer(planes, self.decoder, origins, directions,
                                                     dict(options, fused=fused))
            return torch.cat([features, depth, opacity], dim=-1)

    model = _Model()

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        planes = torch.randn(n, 3, c, h, w, generator=gen, device=device)
        intrinsics = torch.tensor([[_FFHQ_FOCAL, 0, 0.5], [0, _FFHQ_FOCAL, 0.5], [0, 0, 1]],
                                  device=device).expand(n, 3, 3)
        origins, directions = generate_rays(_look_at_origin(n, _FFHQ_RADIUS, device, gen), intrinsics, res)
        inputs = {"planes": planes, "origins": origins, "directions": directions}
        for key in decoder_keys:
            shape = dict(model.named_parameters())[key].shape
            scale = 0.5 if key.endswith("bias") else 1.0
            inputs[key] = torch.randn(shape, generator=gen, device=device) * scale
        inputs["grad_out"] = torch.randn(n, r, 32 + 2, generator=gen, device=device)
        return inputs

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        params = {k: inputs[k] for k in decoder_keys}
        with process_backend(backend):
            return torch.func.functional_call(model, params, (inputs["planes"], inputs["origins"],
                                                              inputs["directions"], backend != REFERENCE))

    m = n * r * (n_coarse + n_fine)
    planes_b = n * 3 * c * h * w * 4
    out_b = n * r * (32 + 2) * 4
    # Forward per decoded point: 12 taps x 32 channels x 2 + the MLP 2 x (32 x 64 + 64 x 33);
    # compositing about 20 + 3 x 32 per interval, twice for the coarse samples.
    mlp = 2 * (c * 64 + 64 * 33)
    fwd_flops = m * (12 * c * 2 + mlp) + n * r * (2 * n_coarse + n_fine) * (20 + 3 * 32)
    return Case(
        op="render",
        shape=f"N{n}_R{res}x{res}_S{n_coarse}+{n_fine}_C{c}_{h}x{w}_fp32",
        make_inputs=make_inputs,
        run=run,
        grad_of=("planes",) + decoder_keys,
        # what must move at the least: the planes and the image (plus their gradients)
        nbytes={"fwd": planes_b + out_b, "fwd+bwd": 2 * planes_b + 2 * out_b},
        flops={"fwd": fwd_flops, "fwd+bwd": 3 * fwd_flops},
        dtype=torch.float32,
        backends=backends,
        measure_memory=True,
        # dozens of ops in a row, two passes summing into the planes' gradient in
        # another order: 1e-5 relative is too tight for float32 (measured 1.7e-5)
        tolerance=1e-4,
    )
