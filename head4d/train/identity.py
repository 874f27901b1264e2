"""The identity loss of Portrait4D's reconstructor training: ``1 - cos`` between ArcFace
embeddings (:func:`head4d.nn.iresnet.iresnet18`, frozen) of a rendered image and its target.

What Portrait4D does (restated here; the trainer applies the schedule and the weight):

- The pair compared is the super-resolved render and its target image, ``[N, 3, S, S]`` in
  ``[-1, 1]``. The loss has weight 1 and is switched on only after 400 kimg.
- Both images are aligned to ArcFace's 112 x 112 face crop by ONE similarity transform
  (rotation, uniform scale, translation) per sample: the least-squares fit of five face
  points in the image (the two eye centres, the nose tip, the two mouth corners; upstream
  takes them from the FLAME landmarks projected with the target's camera, the same for both
  images) to ArcFace's five-point template :data:`ARCFACE_TEMPLATE`. The crop is sampled
  bilinearly, pixel centres at integer coordinates (``align_corners=True``), zero outside the
  image, with no antialiasing; then clamped to ``[-1, 1]``.
- The target's embedding is detached; the render's carries the gradient to the render. The
  recognition network is never trained.
- Per sample, ``1 - cosine_similarity(embed(render), embed(target))`` over the 512 features
  (upstream then averages over the batch).

head4d has no FLAME landmark embedding (upstream's 68 points sit at barycentric positions on
FLAME's faces, from a file head4d does not ship), so the five points are taken from the posed
mesh's vertices by one rule that any head model answers (:func:`face_points`): the two
eyeball centres (the mean of each eyeball's vertices), the nose tip (the face vertex that is
frontmost on the template mesh) and the two mouth corners (the lip vertices leftmost and
rightmost on the template mesh), each followed as the head is posed, then projected with the
target's camera (:func:`project_points`). The reconstructor's training passes these points to
:meth:`IdentityLoss.forward` as ``landmarks``. Without landmarks the loss uses one fixed
alignment for every sample: the five points at :data:`CANONICAL_FACE_POINTS`, where the same
rule puts them for head4d's built-in procedural head, frontal and neutral, in Portrait4D's
frontal camera (identity rotation, distance 4, focal 4.2647 image widths, centred principal
point; scaled by 3 and recentred on the neck as Portrait4D does). That fixed crop drifts from
the face as the head turns.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _nvtx
from .._checks import check_dim, check_tensor
from ..nn.iresnet import INPUT_SIZE, STAGE_DEPTHS, IResNet, IBasicBlock

_NAME = "head4d.train.IdentityLoss"

#: ArcFace's five-point face template in its 112 x 112 crop, pixel coordinates (x to the
#: right, y down): the eye centres (image left, image right), the nose tip, the mouth corners
#: (image left, image right). insightface's standard alignment target.
ARCFACE_TEMPLATE = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655),
                    (70.7299, 92.2041))

#: The same five points, in the template's order, for a frontal, neutral head in Portrait4D's
#: frontal camera, as fractions of the image side measured from the image's top-left corner
#: (see the module docstring for how they were measured; the eyes and mouth corners are
#: symmetric about the vertical centre line; the frontmost vertex lies 2.6 mm (in FLAME's
#: metres) to one side of it and the nose tip is put on it).
CANONICAL_FACE_POINTS = ((0.4140, 0.2370), (0.5860, 0.2370), (0.5000, 0.3444), (0.4053, 0.3937),
                         (0.5947, 0.3937))

#: Number of face points of an alignment.
NUM_FACE_POINTS = 5

PathLike = Union[str, os.PathLike]


def similarity_to_template(points: torch.Tensor, template: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The least-squares similarity transform from ``points`` to ArcFace's template.

    Args:
        points: ``[N, 5, 2]`` floating, pixel coordinates ``(x, y)`` in the source image (x the
            column, y the row from the top, pixel centres at integers), in the order of
            :data:`ARCFACE_TEMPLATE`.
        template: ``[5, 2]`` target points in the crop (default :data:`ARCFACE_TEMPLATE`).

    Returns:
        ``[N, 2, 3]`` in ``points.dtype``: ``crop = M[:, :, :2] @ source + M[:, :, 2]``, with
        ``M[:, :, :2] = [[a, -b], [b, a]]`` (a rotation times a scale; no reflection), the
        ``(a, b, t)`` minimizing the summed squared distance to the template. Points that
        all coincide have no fit: their transform is the identity.
    """
    check_tensor(_NAME, "points", points, f"[N, {NUM_FACE_POINTS}, 2]", 3)
    check_dim(_NAME, "points", points, 1, NUM_FACE_POINTS, f"[N, {NUM_FACE_POINTS}, 2]")
    check_dim(_NAME, "points", points, 2, 2, f"[N, {NUM_FACE_POINTS}, 2]")
    if template is None:
        template = torch.tensor(ARCFACE_TEMPLATE, dtype=points.dtype, device=points.device)
    template = template.to(points)
    # Writing 2D points as complex numbers, the similarity is crop = c * source + t with c = a + ib;
    # after centring both sets the best c is <p, q> / <p, p> (complex inner product), t follows.
    source_mean = points.mean(dim=1, keepdim=True)
    target_mean = template.mean(dim=0, keepdim=True)
    p = points - source_mean
    q = template - target_mean
    spread = p.square().sum(dim=(1, 2))
    a = (p * q).sum(dim=(1, 2))
    b = (p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]).sum(dim=1)
    degenerate = spread <= torch.finfo(points.dtype).tiny
    spread = torch.where(degenerate, torch.ones_like(spread), spread)
    a = torch.where(degenerate, torch.ones_like(a), a / spread)
    b = torch.where(degenerate, torch.zeros_like(b), b / spread)
    linear = torch.stack([torch.stack([a, -b], dim=-1), torch.stack([b, a], dim=-1)], dim=-2)  # [N, 2, 2]
    shift = target_mean - source_mean @ linear.transpose(1, 2)  # [N, 1, 2]
    shift = torch.where(degenerate[:, None, None], torch.zeros_like(shift), shift)
    return torch.cat([linear, shift.transpose(1, 2)], dim=2)


def face_points(head: nn.Module, vertices: torch.Tensor) -> torch.Tensor:
    """The five face points of posed meshes of ``head``, in :data:`ARCFACE_TEMPLATE`'s order
    (the rule is in the module docstring).

    The head's right side is the image's left in a frontal camera, so the first point is
    the head's right eyeball and the fourth its right mouth corner (smaller x on the
    template, the head model's x pointing to the head's left).

    Args:
        head: a :class:`~head4d.head.HeadModel` with a lips set (FLAME with its masks file,
            or the procedural head).
        vertices: ``[N, V, 3]`` floating, ``head``'s posed vertices (``head(...)``).

    Returns:
        ``[N, 5, 3]`` in ``vertices.dtype``.

    Raises:
        ValueError: ``vertices`` is not ``[N, V, 3]`` for this head, or the head has no lips set.
    """
    op = "head4d.train.identity.face_points"
    check_tensor(op, "vertices", vertices, "[N, V, 3]", 3)
    if vertices.shape[1:] != (head.num_vertices, 3):
        raise ValueError(f"{op}: vertices must have shape [N, {head.num_vertices}, 3] for this head, "
                         f"got {list(vertices.shape)}")
    template = head.v_template
    face, lips = head.face_indices, head.lips  # head.lips raises for a head without the set
    nose = face[template[face, 2].argmax()]
    mouth_right, mouth_left = lips[template[lips, 0].argmin()], lips[template[lips, 0].argmax()]
    eye_right = vertices[:, head.right_eye_indices].mean(dim=1)
    eye_left = vertices[:, head.left_eye_indices].mean(dim=1)
    return torch.stack([eye_right, eye_left, vertices[:, nose], vertices[:, mouth_right], vertices[:, mouth_left]],
                       dim=1)


def project_points(points: torch.Tensor, camera: torch.Tensor, size: int) -> torch.Tensor:
    """World points in pixel coordinates of a ``size x size`` image seen by Portrait4D's
    OpenGL camera (the projection of :func:`head4d.models.genhead.clip_vertices`).

    Args:
        points: ``[N, P, 3]`` floating, world space.
        camera: ``[N, 25]``: the flattened 4 x 4 camera-to-world matrix, then the flattened
            normalized 3 x 3 intrinsics.
        size: the image side in pixels.

    Returns:
        ``[N, P, 2]`` in ``points.dtype``: ``(x, y)``, x the column and y the row from the
        top, pixel centres at integers (the convention of ``landmarks``).
    """
    from ..models.genhead import clip_vertices  # the models import the ops; keep this module light

    op = "head4d.train.identity.project_points"
    check_tensor(op, "points", points, "[N, P, 3]", 3)
    n = points.shape[0]
    if tuple(camera.shape) != (n, 25):
        raise ValueError(f"{op}: camera must have shape [N, 25] = {[n, 25]}, got {list(camera.shape)}")
    clip = clip_vertices(points, camera[:, :16].reshape(n, 4, 4), camera[:, 16:25].reshape(n, 3, 3))
    ndc = clip[..., :2] / clip[..., 3:4]
    return torch.stack([(ndc[..., 0] + 1) * 0.5 * size - 0.5, (1 - ndc[..., 1]) * 0.5 * size - 0.5], dim=-1)


def warp_to_crop(image: torch.Tensor, matrix: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Resample ``image`` into a ``size x size`` crop through a similarity transform.

    Args:
        image: ``[N, C, H, W]`` floating.
        matrix: ``[N, 2, 3]`` from :func:`similarity_to_template`: source pixel coordinates to
            crop pixel coordinates (pixel centres at integers in both).
        size: side of the crop.

    Returns:
        ``[N, C, size, size]`` in ``image.dtype``: crop pixel ``(x, y)`` is the bilinear sample
        of ``image`` at ``M^-1 (x, y)``, zero outside the image. Differentiable in ``image``.
    """
    n, _, height, width = image.shape
    matrix = matrix.to(image.dtype)
    linear, shift = matrix[:, :, :2], matrix[:, :, 2]
    a, b = linear[:, 0, 0], linear[:, 1, 0]
    norm = a.square() + b.square()
    inverse = torch.stack([torch.stack([a, b], dim=-1), torch.stack([-b, a], dim=-1)], dim=-2) / norm[:, None, None]
    coords = torch.arange(size, dtype=image.dtype, device=image.device)
    crop_points = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=-1).reshape(1, -1, 2)  # (x, y)
    source = (crop_points - shift[:, None, :]) @ inverse.transpose(1, 2)  # [N, size*size, 2]
    scale = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], dtype=image.dtype, device=image.device)
    grid = (source * scale - 1.0).reshape(n, size, size, 2)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


class IdentityLoss(nn.Module):
    """Portrait4D's ArcFace identity loss (see the module docstring for what it computes).

    Args:
        network: the recognition network, ``[N, 3, 112, 112]`` -> ``[N, D]`` (default: an
            :func:`~head4d.nn.iresnet.iresnet18` with arcface_torch's random initialization;
            load trained weights with :meth:`from_file`). It is frozen here: no parameter
            requires a gradient and it stays in eval mode (its BatchNorms use their running
            statistics) whatever ``train()`` is called with.
        face_points: the fixed alignment used when ``forward`` gets no landmarks: five
            ``(x, y)`` fractions of the image side, in :data:`ARCFACE_TEMPLATE`'s order
            (default :data:`CANONICAL_FACE_POINTS`).

    ``forward(image, target, landmarks=None) -> [N]``:
        ``image``: ``[N, 3, S, S]`` floating, RGB in ``[-1, 1]``, ``S >= 112``: the render; the
        gradient reaches it. ``target``: the same shape, detached inside. ``landmarks``:
        optional ``[N, 5, 2]`` pixel coordinates of the five face points in ``image`` (x the
        column, y the row from the top), one alignment per sample shared by both images.
        Returns ``1 - cos`` per sample, in ``[0, 2]``, in the network's dtype. The images
        are cast to the network's parameter dtype (float32 unless the module was converted;
        a network without parameters takes them as they are) and the network runs outside
        autocast, in that dtype, as upstream runs it in float32.
    """

    def __init__(self, network: Optional[nn.Module] = None, *,
                 face_points: Sequence[Tuple[float, float]] = CANONICAL_FACE_POINTS):
        super().__init__()
        if network is None:
            network = IResNet(IBasicBlock, STAGE_DEPTHS["iresnet18"])
        if not isinstance(network, nn.Module):
            raise TypeError(f"{_NAME}: network must be a torch.nn.Module, got {type(network).__name__}")
        face_points = torch.as_tensor(face_points, dtype=torch.float64)
        if face_points.shape != (NUM_FACE_POINTS, 2) or not torch.isfinite(face_points).all():
            raise ValueError(f"{_NAME}: face_points must be {NUM_FACE_POINTS} finite (x, y) pairs, "
                             f"got shape {list(face_points.shape)}")
        self.network = network
        self.network.requires_grad_(False)
        self.network.eval()
        self.face_points = tuple(tuple(point) for point in face_points.tolist())

    @classmethod
    def from_file(cls, path: PathLike, *, arch: str = "iresnet18", **kwargs) -> "IdentityLoss":
        """An identity loss whose network (``arch``: one of ``iresnet18``, ``iresnet34``,
        ``iresnet50``, ``iresnet100``) holds the weights of a state-dict file: arcface_torch's
        released ``backbone.pth`` (a ``torch.save`` of the network's state dict) or a
        ``.safetensors`` file of the same names. Loaded on the CPU, strictly: a missing or
        unreadable file, missing or unexpected names, or a shape that differs raise an error
        naming them. Other keyword arguments go to :class:`IdentityLoss`."""
        path = Path(path)
        if arch not in STAGE_DEPTHS:
            raise ValueError(f"{_NAME}.from_file: arch must be one of {tuple(STAGE_DEPTHS)}, got {arch!r}")
        if not path.is_file():
            raise FileNotFoundError(f"{_NAME}.from_file: no identity network weights at {str(path)!r} (expected "
                                    f"arcface_torch's {arch} backbone.pth, a state dict file)")
        state = _read_state_dict(path)
        network = IResNet(IBasicBlock, STAGE_DEPTHS[arch])
        _check_state_dict(network, state, path, arch)
        network.load_state_dict(state, strict=True)
        return cls(network, **kwargs)

    def train(self, mode: bool = True) -> "IdentityLoss":
        super().train(mode)
        self.network.eval()
        return self

    def _dtype(self, image: torch.Tensor) -> torch.dtype:
        """The network's parameter dtype (``image``'s for a network without parameters)."""
        for parameter in self.network.parameters():
            return parameter.dtype
        return image.dtype

    def _check_images(self, image: torch.Tensor, target: Optional[torch.Tensor] = None) -> None:
        shape = f"[N, 3, S, S] with S >= {INPUT_SIZE}"
        check_tensor(_NAME, "image", image, shape, 4)
        check_dim(_NAME, "image", image, 1, 3, shape)
        if image.shape[2] != image.shape[3] or image.shape[2] < INPUT_SIZE:
            raise ValueError(f"{_NAME}: image must have shape {shape}, got {list(image.shape)}")
        if target is not None:
            check_tensor(_NAME, "target", target, shape, 4)
            if target.shape != image.shape:
                raise ValueError(f"{_NAME}: target must have image's shape {list(image.shape)}, "
                                 f"got {list(target.shape)}")
            if target.device != image.device:
                raise ValueError(f"{_NAME}: target is on {target.device} but image is on {image.device}")

    def alignment(self, image: torch.Tensor, landmarks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[N, 2, 3]``: the similarity from ``image``'s pixels to the 112 crop, fitted to
        ``landmarks`` (``[N, 5, 2]`` pixel coordinates) or to the fixed face points."""
        n, size = image.shape[0], image.shape[-1]
        dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
        if landmarks is None:
            points = torch.tensor(self.face_points, dtype=dtype, device=image.device) * size - 0.5
            points = points.expand(n, NUM_FACE_POINTS, 2)
        else:
            shape = f"[N, {NUM_FACE_POINTS}, 2] = [{n}, {NUM_FACE_POINTS}, 2]"
            check_tensor(_NAME, "landmarks", landmarks, shape, 3)
            if landmarks.shape != (n, NUM_FACE_POINTS, 2):
                raise ValueError(f"{_NAME}: landmarks must have shape {shape}, got {list(landmarks.shape)}")
            if landmarks.device != image.device:
                raise ValueError(f"{_NAME}: landmarks is on {landmarks.device} but image is on {image.device}")
            points = landmarks.detach().to(dtype)
        return similarity_to_template(points)

    def _aligned(self, image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """The 112 crops of ``image`` through ``matrix``, clamped to [-1, 1], in the network's dtype."""
        return warp_to_crop(image.to(self._dtype(image)), matrix).clamp(-1.0, 1.0)

    def crop(self, image: torch.Tensor, landmarks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[N, 3, 112, 112]``: the aligned face crops of ``image`` (``[N, 3, S, S]``, S >= 112),
        clamped to ``[-1, 1]``, in the network's dtype."""
        self._check_images(image)
        return self._aligned(image, self.alignment(image, landmarks))

    def embed(self, image: torch.Tensor, landmarks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[N, D]``: the identity embeddings of ``image`` (``[N, 3, S, S]`` in ``[-1, 1]``),
        computed outside autocast (in the network's dtype)."""
        self._check_images(image)
        with _nvtx.nvtx_range(_NAME + ".embed"), torch.autocast(image.device.type, enabled=False):
            return self.network(self._aligned(image, self.alignment(image, landmarks)))

    def forward(self, image: torch.Tensor, target: torch.Tensor,
                landmarks: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_images(image, target)
        # Upstream aligns and runs the recognition network in float32: autocast is off here.
        with _nvtx.nvtx_range(_NAME), torch.autocast(image.device.type, enabled=False):
            matrix = self.alignment(image, landmarks)
            with torch.no_grad():
                target_embedding = self.network(self._aligned(target.detach(), matrix))
            image_embedding = self.network(self._aligned(image, matrix))
            return 1.0 - F.cosine_similarity(image_embedding, target_embedding, dim=-1)

def _read_state_dict(path: Path) -> Mapping:
    """The tensors of a state-dict file (``torch.save`` or safetensors), read on the CPU."""
    from safetensors.torch import load_file

    from .common import unreadable_file_errors

    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except unreadable_file_errors() as error:
        raise ValueError(f"{_NAME}.from_file: cannot read {str(path)!r} as a state dict: {error}") from error
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{_NAME}.from_file: {str(path)!r} must hold a state dict (names to tensors), "
                         f"got {type(state).__name__}")
    return state


def _check_state_dict(network: nn.Module, state: Mapping, path: Path, arch: str, shown: int = 5) -> None:
    """Raise naming the first missing / unexpected names and the first shape that differs."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:shown])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:shown])})")
        raise ValueError(f"{_NAME}.from_file: {str(path)!r} does not match {arch}'s state dict: " + "; ".join(parts))
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{_NAME}.from_file: {str(path)!r}: {key} has shape {list(state[key].shape)}, "
                             f"{arch} expects {list(value.shape)}")
