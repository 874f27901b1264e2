"""Reference triplane sampling: EG3D's ``sample_from_planes`` as plain PyTorch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: The point axes giving each plane's (u, v); u indexes the width, v the height.
PLANE_AXES = {
    # Portrait4D's planes: XY, YZ, ZX.
    "portrait4d": ((0, 1), (1, 2), (2, 0)),
    # EG3D's planes as its projection matrices make them: XY, XZ, ZX.
    "eg3d": ((0, 1), (0, 2), (2, 0)),
}


def sample_triplanes(planes: torch.Tensor, points: torch.Tensor, box_warp: float = 1.0,
                     plane_layout: str = "portrait4d", reduce: str = "mean") -> torch.Tensor:
    """Sample three feature planes at projected points, exactly as EG3D does.

    Args:
        planes: ``[N, 3, C, H, W]`` float16, bfloat16, float32 or float64.
        points: ``[N, M, 3]`` floating point, world coordinates; the cube of side
            ``box_warp`` centred at the origin maps onto the planes.
        box_warp: side of that cube (points are scaled by ``2 / box_warp``).
        plane_layout: ``"portrait4d"`` (planes at (x, y), (y, z), (z, x)) or
            ``"eg3d"`` (planes at (x, y), (x, z), (z, x)).
        reduce: ``"mean"`` or ``"sum"`` over the planes, or ``"none"``.

    Returns:
        ``[N, M, C]`` (mean, sum) or ``[N, 3, M, C]`` (none), in ``planes.dtype``.
        Half-precision inputs are computed in float32 and rounded once at the end.
        A point with a NaN or infinite coordinate gets NaN from every plane that uses
        that coordinate.
    """
    n, _, c, h, w = planes.shape
    m = points.shape[1]
    compute = torch.float64 if planes.dtype == torch.float64 else torch.float32
    scaled = points.to(compute) * (2.0 / box_warp)
    coords = torch.stack([scaled[..., list(axes)] for axes in PLANE_AXES[plane_layout]], dim=1)
    features = F.grid_sample(
        planes.to(compute).reshape(n * 3, c, h, w),
        coords.reshape(n * 3, 1, m, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # [N*3, C, 1, M]
    features = features.permute(0, 3, 2, 1).reshape(n, 3, m, c)
    # A NaN or infinite plane coordinate samples NaN on that plane (grid_sample gives
    # NaN there on the CPU but zeros on CUDA; stated here so that every device agrees).
    finite = torch.isfinite(coords).all(dim=-1, keepdim=True)  # [N, 3, M, 1]
    features = torch.where(finite, features, torch.full_like(features, float("nan")))
    if reduce == "mean":
        out = features.mean(dim=1)
    elif reduce == "sum":
        out = features.sum(dim=1)
    else:
        out = features
    return out.to(planes.dtype)
