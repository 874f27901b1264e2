"""Benchmark cases of the deformation ops (``sample_grid3d``, ``one_ring_deform``,
``surface_field_grid``) and of the whole part-wise deformation (``deform``)."""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..case import PASSES, Case, Inputs, Settings, default_batches, fast_backends, process_backend, register


def _procedural_meshes(n: int, device: torch.device, gen: torch.Generator):
    """A :class:`~head4d.head.ProceduralHead` on ``device`` and, for ``n`` random code
    sets (shape and expression ``randn * 0.5``, neck and eyes ``randn * 0.2``, jaw in
    [0, 0.3] about x), its posed vertices ``[n, V, 3]`` and the codes."""
    from ...head import ProceduralHead

    head = ProceduralHead().to(device)
    codes = {"shape": torch.randn(n, 300, generator=gen, device=device) * 0.5,
             "expression": torch.randn(n, 100, generator=gen, device=device) * 0.5,
             "neck_pose": torch.randn(n, 3, generator=gen, device=device) * 0.2,
             "jaw_pose": torch.zeros(n, 3, device=device),
             "eye_pose": torch.randn(n, 6, generator=gen, device=device) * 0.2}
    codes["jaw_pose"][:, 0] = torch.rand(n, generator=gen, device=device) * 0.3
    with torch.no_grad():
        verts = head(codes["shape"], codes["expression"], codes["neck_pose"], codes["jaw_pose"],
                     codes["eye_pose"])
    return head, verts, codes


def _near_surface_points(verts: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """``[N, m, 3]`` points within a few cm of random vertices of ``verts`` ``[N, V, 3]``
    (where ray samples that matter lie), plus a quarter uniform in the 1.3 box."""
    n, v, _ = verts.shape
    idx = torch.randint(0, v, (n, m), generator=gen, device=verts.device)
    near = verts.gather(1, idx.unsqueeze(-1).expand(n, m, 3))
    near = near + torch.randn(n, m, 3, generator=gen, device=verts.device) * 0.03
    uniform = (torch.rand(n, m, 3, generator=gen, device=verts.device) - 0.5) * 1.3
    pick = torch.rand(n, m, 1, generator=gen, device=verts.device) < 0.25
    return torch.where(pick, uniform, near)


@register("sample_grid3d")
def _sample_grid3d_cases(settings: Settings) -> List[Case]:
    """Portrait4D's fine neck field: a ``[N, 3, 24, 24, 24]`` fp32 displacement grid over
    the 24^3 cell centres of the 1.3 box, read at points uniform in the box (zeros padding).
    GPU: 64^2 and 128^2 rays x 96 samples (393,216 and 1,572,864 points), N = 1 (full: 1 and 4).
    CPU: 393,216 points, N = 1 (quick: 65,536)."""
    from ...ops import deformation

    device = settings.device
    cuda = device.type == "cuda"
    batches = default_batches(settings)
    if cuda:
        counts = (64 * 64 * 96,) if settings.small else (64 * 64 * 96, 128 * 128 * 96)
    else:
        counts = (65536,) if settings.small else (64 * 64 * 96,)
    backends = fast_backends(deformation.PREFERENCES, device)
    return [_grid3d_case(n, 3, 24, m, backends) for n in batches for m in counts]


def _grid3d_case(n: int, c: int, res: int, m: int, backends: Tuple[str, ...]) -> Case:
    from ...ops import sample_grid3d
    from ...ops.deformation import cell_centre_bound

    bound = cell_centre_bound(res)

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        return {"grid": torch.randn(n, c, res, res, res, generator=gen, device=device) * 0.05,
                "points": (torch.rand(n, m, 3, generator=gen, device=device) - 0.5) * 1.3,
                "grad_out": torch.randn(n, m, c, generator=gen, device=device)}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        return sample_grid3d(inputs["grid"], inputs["points"], bound=bound, backend=backend)

    grid_b, pts_b, out_b = n * c * res ** 3 * 4, n * m * 12, n * m * c * 4
    fwd_flops = n * m * (8 * 2 * c + 30)
    return Case(op="sample_grid3d", shape=f"N{n}_C{c}_{res}^3_M{m}_fp32", make_inputs=make_inputs, run=run,
                grad_of=("grid", "points"),
                nbytes={"fwd": grid_b + pts_b + out_b, "fwd+bwd": 2 * (grid_b + pts_b + out_b)},
                flops={"fwd": fwd_flops, "fwd+bwd": 3 * fwd_flops}, dtype=torch.float32, backends=backends)


@register("one_ring_deform")
def _one_ring_cases(settings: Settings) -> List[Case]:
    """The face part of Portrait4D's deformation on the built-in ProceduralHead (5,044
    vertices; the 3,952-vertex face subset; one-ring table [V, 10]): posed (observed)
    and canonical vertices, points near the surface. GPU: 393,216 and 1,572,864 points,
    N = 1 (full: 1 and 4). CPU: 65,536 points, N = 1 (quick: 8,192)."""
    from ...ops import deformation

    device = settings.device
    cuda = device.type == "cuda"
    batches = default_batches(settings)
    if cuda:
        counts = (64 * 64 * 96,) if settings.small else (64 * 64 * 96, 128 * 128 * 96)
    else:
        counts = (8192,) if settings.small else (65536,)
    backends = fast_backends(deformation.PREFERENCES, device)
    return [_one_ring_case(n, m, backends) for n in batches for m in counts]


def _one_ring_case(n: int, m: int, backends: Tuple[str, ...]) -> Case:
    from ...ops import one_ring_deform

    state = {}

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        head, verts, _ = _procedural_meshes(n, device, gen)
        state["neighbours"], state["subset"] = head.one_ring, head.face_indices
        canon = head.canonical_vertices().unsqueeze(0).expand(n, -1, -1).contiguous()
        return {"points": _near_surface_points(verts, m, gen), "verts_obs": verts, "verts_canon": canon,
                "grad_out": torch.randn(n, m, 3, generator=gen, device=device)}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        return one_ring_deform(inputs["points"], inputs["verts_obs"], inputs["verts_canon"],
                               state["neighbours"], vertex_subset=state["subset"], backend=backend)

    subset, v = 3952, 5044
    fwd_flops = n * m * (9 * subset + 10 * 12)
    nbytes = n * m * 24 + 2 * n * v * 12
    return Case(op="one_ring_deform", shape=f"N{n}_V{v}_S{subset}_K10_M{m}_fp32", make_inputs=make_inputs, run=run,
                grad_of=("points", "verts_obs", "verts_canon"),
                nbytes={"fwd": nbytes, "fwd+bwd": 2 * nbytes + n * m * 12},
                flops={"fwd": fwd_flops, "fwd+bwd": fwd_flops + n * m * 10 * 40}, dtype=torch.float32,
                backends=backends)


@register("surface_field_grid")
def _surface_field_cases(settings: Settings) -> List[Case]:
    """The neck surface field per image (forward only): the ProceduralHead's companion
    mesh (728 vertices, 1,452 faces) at 24^3 (Portrait4D's grid) and, on the GPU, the
    full mesh (5,044 vertices, 10,076 faces) at 64^3. N = 1. CPU quick: the companion
    mesh at 12^3 (the reference's 24^3 takes 0.7 s on 2 quiet cores, 40 s on busy ones)."""
    from ...ops import deformation

    device = settings.device
    backends = fast_backends(deformation.PREFERENCES, device)
    out = [_surface_case("companion", 12 if settings.small and device.type != "cuda" else 24, backends)]
    if device.type == "cuda" and not settings.small:
        out.append(_surface_case("full", 64, backends))
    return out


def _surface_case(mesh: str, res: int, backends: Tuple[str, ...]) -> Case:
    from ...ops import surface_field_grid
    from ...ops.deformation import cell_centre_bound

    state = {}

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        head, verts, _ = _procedural_meshes(1, device, gen)
        canon = head.canonical_vertices().unsqueeze(0)
        if mesh == "companion":
            verts, canon = head.companion_vertices(verts), head.companion_vertices(canon)
            state["faces"] = head.companion_faces
        else:
            state["faces"] = head.faces
        return {"verts_obs": verts.contiguous(), "verts_canon": canon.contiguous()}

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        disp, sq = surface_field_grid(inputs["verts_obs"], inputs["verts_canon"], state["faces"],
                                      resolution=res, bound=cell_centre_bound(res), backend=backend)
        return torch.cat([disp, sq], dim=1)

    faces = 1452 if mesh == "companion" else 10076
    return Case(op="surface_field_grid", shape=f"{mesh}_F{faces}_{res}^3_fp32", make_inputs=make_inputs, run=run,
                grad_of=(), nbytes={"fwd": res ** 3 * 16}, flops={"fwd": res ** 3 * faces * 60},
                dtype=torch.float32, backends=backends, passes=("fwd",))


@register("deform", whole_model=True)
def _deform_cases(settings: Settings) -> List[Case]:
    """The whole :class:`~head4d.deform.PartwiseDeformation` (build the grids and meshes
    of an image, then warp its ray samples) on the ProceduralHead with random codes;
    ``backend`` = every op on that backend (``HEAD4D_BACKEND``) against all references.
    GPU: 64^2 and 128^2 rays x 96 samples, N = 1 (full: 1 and 4), fwd and fwd+bwd (points).
    CPU: 16,384 points, N = 1, fwd; none in the quick mode: whatever the points, the
    reference rebuilds the 24^3 surface field on every call (about 1 s on 2 quiet cores,
    50 s on busy ones)."""
    from ...ops import deformation

    device = settings.device
    cuda = device.type == "cuda"
    if settings.small and not cuda:
        return []
    batches = default_batches(settings)
    if cuda:
        counts = (64 * 64 * 96,) if settings.small else (64 * 64 * 96, 128 * 128 * 96)
        passes = PASSES
    else:
        counts, passes = (16384,), ("fwd",)
    backends = fast_backends(deformation.PREFERENCES, device)
    return [_deform_case(n, m, backends, passes) for n in batches for m in counts]


def _deform_case(n: int, m: int, backends: Tuple[str, ...], passes: Tuple[str, ...]) -> Case:
    from ...deform import PartwiseDeformation

    state = {}

    def make_inputs(device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        head, verts, codes = _procedural_meshes(n, device, gen)
        state["model"] = PartwiseDeformation(head)
        inputs = {"points": _near_surface_points(verts, m, gen), **codes}
        inputs["grad_out"] = torch.randn(n, m, 13, generator=gen, device=device)
        return inputs

    def run(inputs: Inputs, backend: str) -> torch.Tensor:
        with process_backend(backend):
            out = state["model"](inputs["points"], inputs["shape"], inputs["expression"], inputs["neck_pose"],
                                 inputs["jaw_pose"], inputs["eye_pose"])
        return torch.cat([out.neck, out.head, out.eyes, out.mouth, out.inside_eye_box.unsqueeze(-1).to(out.head.dtype)],
                         dim=-1)

    fwd_flops = n * m * (9 * 5226 + 650) + n * 60 * (24 ** 3 + 8 ** 3) * 1452
    return Case(op="deform", shape=f"N{n}_M{m}_procedural_fp32", make_inputs=make_inputs, run=run,
                grad_of=("points",), nbytes={"fwd": n * m * 61, "fwd+bwd": n * m * 133},
                flops={"fwd": fwd_flops, "fwd+bwd": int(1.1 * fwd_flops)}, dtype=torch.float32,
                backends=backends, passes=passes)

