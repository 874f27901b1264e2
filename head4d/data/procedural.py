"""``head4d make-dataset --procedural N``: a small labelled dataset rendered from the built-in
:class:`~head4d.head.ProceduralHead`, so that GenHead's training runs with no download.

Each image is the head mesh rasterized (:func:`head4d.ops.rasterize_triangles`, then
:func:`head4d.ops.interpolate` of the vertex normals and colours) under a random camera with
random FLAME-style codes near the canonical ones, and shaded simply:

* camera: Portrait4D's look-at distribution (:func:`head4d.synthesis.sample_look_at_parameters`:
  yaw U(-0.78, 0.78), elevation 0.2 + U(-0.45, 0.45), roll U(-0.25, 0.25), a pivot near the
  face, radius U(3.65, 4.45)) with a 12 degree field of view (normalized focal
  ``0.5 / tan(6 deg)``, about 4.757);
* codes: shape ``N(0, SHAPE_STD^2)`` per coefficient, expression ``N(0, EXPRESSION_STD^2)``,
  jaw opening (x) ``|N(0, JAW_STD^2)|`` clamped to ``JAW_MAX`` (y, z 0), both eyes one random
  rotation ``N(0, EYE_STD^2)`` per angle, neck 0 (as in the labels Portrait4D trains with);
* shading: Lambertian with one fixed light in the camera's frame (from the upper left, in
  front) plus ambient light; the albedo is skin on the head (times a per-image tint, U(0.9, 1.1) per channel), white
  eyeballs with a dark iris/pupil cap around each eye's forward axis; the background a
  vertical gradient between two random greys.

Files: ``DIR/00000/img00000000.png``, ..., ``DIR/dataset.json`` and each image's foreground
mask ``DIR/masks/00000/img00000000.png``, ... in the format of :mod:`head4d.data.dataset`
(``--zip``: the same inside ``DIR.zip`` rather than a folder). The mask is the head's
silhouette, the rasterizer's coverage: 255 where a pixel's centre is covered by a triangle of
the mesh (``face_index >= 0``), 0 elsewhere.
"""
from __future__ import annotations

import json
import math
import os
import time
import zipfile
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F

from ..head import ProceduralHead
from ..head.base import rodrigues
from ..head.labels import make_labels, parse_labels
from ..media import encode_png, to_uint8
from ..models.genhead import clip_vertices
from ..ops import interpolate, rasterize_triangles
from ..synthesis.cameras import look_at_cameras, sample_look_at_parameters
from .dataset import LABELS_FILE, mask_name

#: Field of view of the cameras, degrees (Portrait4D's examples use 12).
FOV_DEGREES = 12.0
#: Standard deviations of the random codes (see the module docstring).
SHAPE_STD = 0.5
EXPRESSION_STD = 0.5
JAW_STD = 0.1
JAW_MAX = 0.35
EYE_STD = 0.1
#: Light direction in the camera's frame (x right, y up, +z towards the viewer), and the
#: ambient and diffuse weights.
LIGHT_DIRECTION = (-0.4, 0.5, 0.75)
AMBIENT, DIFFUSE = 0.35, 0.65
#: Albedos (linear RGB in [0, 1]): skin before the per-image tint, eyeball, iris.
SKIN = (0.80, 0.60, 0.50)
EYEBALL = (0.92, 0.92, 0.90)
IRIS = (0.12, 0.08, 0.06)
#: Cosine of the iris cap's half-angle about each eye's forward axis.
IRIS_COS = math.cos(0.35)
#: Images per rendered batch.
BATCH = 8


def fov_focal(fov_degrees: float = FOV_DEGREES) -> float:
    """Normalized focal length (in image widths) of a field of view in degrees."""
    return 0.5 / math.tan(math.radians(fov_degrees) / 2)


def sample_procedural_labels(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, 437]`` float32 labels: random cameras and codes as the module docstring says
    (drawn on the CPU from ``generator``)."""
    camera = look_at_cameras(**sample_look_at_parameters(n, generator=generator), focal=fov_focal())
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    jaw = torch.zeros(n, 3)
    jaw[:, 0] = (JAW_STD * randn(n)).abs().clamp(max=JAW_MAX)
    eye = EYE_STD * randn(n, 3)
    return make_labels(camera[:, :16].reshape(n, 4, 4), camera[:, 16:].reshape(n, 3, 3), SHAPE_STD * randn(n, 300),
                       EXPRESSION_STD * randn(n, 100), torch.zeros(n, 3), jaw, torch.cat([eye, eye], dim=1))


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals ``[N, V, 3]`` (unit) of meshes ``[N, V, 3]`` with faces ``[F, 3]``."""
    corners = vertices[:, faces]  # [N, F, 3, 3]
    face_normals = torch.linalg.cross(corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0])
    normals = torch.zeros_like(vertices)
    for k in range(3):
        normals.index_add_(1, faces[:, k], face_normals)
    return F.normalize(normals, dim=-1)


def _albedo(head: ProceduralHead, vertices: torch.Tensor, eye_forward: torch.Tensor,
            tint: torch.Tensor) -> torch.Tensor:
    """Per-vertex albedo ``[N, V, 3]``: tinted skin, eyeballs white with an iris cap about
    ``eye_forward`` ``[N, 2, 3]`` (left, right)."""
    n, v = vertices.shape[:2]
    colour = lambda rgb: torch.tensor(rgb, dtype=vertices.dtype, device=vertices.device)  # noqa: E731
    albedo = (colour(SKIN) * tint[:, None, :]).expand(n, v, 3).clone()
    for side, indices in enumerate((head.left_eye_indices, head.right_eye_indices)):
        ball = vertices[:, indices]
        direction = F.normalize(ball - ball.mean(dim=1, keepdim=True), dim=-1)
        in_iris = (direction * eye_forward[:, side, None]).sum(-1, keepdim=True) > IRIS_COS
        albedo[:, indices] = torch.where(in_iris, colour(IRIS), colour(EYEBALL))
    return albedo


@torch.no_grad()
def render_procedural(head: ProceduralHead, labels: torch.Tensor, resolution: int, *, tint: torch.Tensor,
                      background: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Render the head with the codes and cameras of ``labels`` (module docstring: shading).

    Args:
        head: the procedural head (float32, CPU or CUDA).
        labels: ``[N, 437]`` floating, on the head's device.
        resolution: image side R.
        tint: ``[N, 3]`` skin albedo multipliers; background: ``[N, 2, 3]`` top and bottom colours.

    Returns:
        ``{"image": [N, 3, R, R] float32 in [0, 1], "face_index": [N, R, R] int64 (-1: background),
        "mask": [N, 1, R, R] uint8}``, the mask 255 where the head covers the pixel (face_index >= 0), else 0.
    """
    fields = parse_labels(labels.to(head.dtype))
    vertices = head.forward_labels(labels.to(head.dtype))
    n = vertices.shape[0]
    cam2world, intrinsics = fields["cam2world"], fields["intrinsics"]
    clip = clip_vertices(vertices, cam2world, intrinsics)
    face_index, barycentric, _ = rasterize_triangles(clip, head.faces, (resolution, resolution))
    rotation = cam2world[:, :3, :3]
    normals_camera = torch.einsum("nji,nvj->nvi", rotation, vertex_normals(vertices, head.faces))
    # An eye looks along +z at rest; posed, its joint's rotation follows the neck's (global 0).
    eye_rotation = rodrigues(fields["neck_pose"])[:, None] @ rodrigues(fields["eye_pose"].reshape(n, 2, 3))
    eye_forward = eye_rotation[..., 2]  # [N, 2, 3]: the rotated +z axis
    albedo = _albedo(head, vertices, eye_forward, tint.to(vertices))
    attributes = torch.cat([normals_camera, albedo], dim=-1)
    pixel = interpolate(attributes, head.faces, face_index, barycentric)
    normal = F.normalize(pixel[..., :3], dim=-1)
    light = F.normalize(torch.tensor(LIGHT_DIRECTION, dtype=vertices.dtype, device=vertices.device), dim=0)
    # Faces seen from behind (inside the mouth) are lit as if they faced the camera.
    facing = torch.where(normal[..., 2:3] < 0, -normal, normal)
    shade = AMBIENT + DIFFUSE * (facing * light).sum(-1, keepdim=True).clamp_min(0)
    colour = (pixel[..., 3:] * shade).permute(0, 3, 1, 2)
    ramp = torch.linspace(0, 1, resolution, device=vertices.device).view(1, 1, resolution, 1)
    top, bottom = background[:, 0, :, None, None].to(ramp), background[:, 1, :, None, None].to(ramp)
    backdrop = (top + (bottom - top) * ramp).expand(n, 3, resolution, resolution)
    image = torch.where((face_index >= 0)[:, None], colour, backdrop).clamp(0, 1)
    mask = (face_index >= 0)[:, None].to(torch.uint8) * 255
    return {"image": image, "face_index": face_index, "mask": mask}


def image_name(index: int) -> str:
    """The dataset path of image ``index``: StyleGAN's ``00000/img00000000.png`` (1000 per folder)."""
    return f"{index // 1000:05d}/img{index:08d}.png"


def make_procedural_dataset(count: int, out: Union[str, os.PathLike], *, resolution: int = 512, seed: int = 0,
                            as_zip: bool = False, device: Union[str, torch.device] = "cpu",
                            log: Optional[Callable[[str], None]] = None) -> Path:
    """Write ``count`` procedural images, their masks and ``dataset.json`` (module docstring).

    Args:
        count: number of images (>= 1).
        out: the dataset folder, or with ``as_zip`` the archive (``.zip`` appended when missing).
        resolution: image side (>= 8).
        seed: seed of every random draw (cameras, codes, tints, backgrounds).
        device: where the head is rasterized.
        log: called with one progress line per batch.

    Returns:
        The path written (folder or zip).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"make_procedural_dataset: count must be a positive int, got {count!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"make_procedural_dataset: resolution must be an int >= 8, got {resolution!r}")
    out = Path(out)
    if as_zip and out.suffix.lower() != ".zip":
        out = out.with_name(out.name + ".zip")
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise FileExistsError(f"make_procedural_dataset: out {str(out)!r} exists and is not an empty folder")
    generator = torch.Generator().manual_seed(seed)
    labels = sample_procedural_labels(count, generator)
    tints = 0.9 + 0.2 * torch.rand(count, 3, generator=generator)
    greys = torch.rand(count, 2, 1, generator=generator).expand(count, 2, 3)
    head = ProceduralHead().to(device)
    files: Dict[str, bytes] = {}
    start = time.perf_counter()
    for first in range(0, count, BATCH):
        rows = slice(first, min(first + BATCH, count))
        rendered = render_procedural(head, labels[rows].to(device), resolution, tint=tints[rows],
                                     background=greys[rows])
        for offset, (image, mask) in enumerate(zip(rendered["image"].cpu(), rendered["mask"].cpu())):
            name = image_name(first + offset)
            files[name] = encode_png(to_uint8(image))
            files[mask_name(name)] = encode_png(mask.permute(1, 2, 0).contiguous())
        if log is not None:
            log(f"make-dataset: {rows.stop}/{count} images ({time.perf_counter() - start:.1f} s)")
    table = {"labels": [[image_name(i), [float(x) for x in labels[i].tolist()]] for i in range(count)]}
    files[LABELS_FILE] = json.dumps(table).encode()
    if as_zip:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        os.replace(partial, out)
    else:
        for name, data in files.items():
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return out
