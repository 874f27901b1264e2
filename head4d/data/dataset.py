"""GenHead's training images: a folder or a ``.zip`` of aligned portraits with their labels.

Layout (StyleGAN's and EG3D's convention, with Portrait4D's 437-number label)::

    DIR/ or DIR.zip
        dataset.json
        00000/img00000000.png
        00000/img00000001.png
        ...
        masks/00000/img00000000.png     (optional)
        ...

``dataset.json`` holds ``{"labels": [["00000/img00000000.png", [437 numbers]], ...]}``: one
entry per image, the image's path relative to the dataset root (forward slashes) and its
label in the layout of :mod:`head4d.head.labels` (cam2world 16, normalized intrinsics 9,
FLAME shape 300, expression 100, neck 3, jaw 3, eyes 6). Images are square RGB PNGs or JPEGs
of one resolution, already aligned as Portrait4D crops faces; grey images are repeated to
three channels and an alpha channel is dropped. PNG and JPEG are read through Pillow when it
is installed; without it, PNGs (8-bit, non-interlaced) through :func:`head4d.media.decode_png`
and a JPEG raises an error that says to install Pillow.

Optional foreground masks: a ``masks/`` folder at the root (zip entries under ``masks/``)
with one single-channel (greyscale, 8-bit) PNG per image, under the image's relative path
with its extension replaced by ``.png`` (``masks/00000/img00000000.png`` for
``00000/img00000000.png``), of the image's size: 255 on the head (foreground), 0 on the
background, values in between for soft edges. When the folder exists every image must have
its mask (the first image without one is named in the error); files under ``masks/`` are not
images of the dataset. Portrait4D stores such a head mask with each GenHead training image
and feeds it to the discriminator's ``seg`` channel as ``mask / 127.5 - 1`` (0 -> -1,
255 -> +1), the range of a rendered ``opacity * 2 - 1``.

Portrait4D's GenHead data stores the same 437 numbers per image; it trains with the neck at
0 and the camera carrying the whole head rotation, which is what ``head4d make-dataset``
writes. Its generic loader's x-flip doubles the dataset by mirroring the image only (a
flipped image keeps the unflipped label), its GenHead loader ignores the flag, and the
mirrored FFHQ images it trains with are stored as images of their own, each with its own
label. head4d's ``xflip=True`` instead mirrors the label with the image (:func:`mirror_labels`), so that a flipped image's label
describes it: the camera is reflected through the head's plane of symmetry (x = 0), the
neck and jaw rotations are reflected, the two eyes' rotations are reflected and swapped;
shape and expression coefficients are kept unless ``mirror_head`` gives a head model whose
blendshapes are each mirror-symmetric or mirror-antisymmetric (the built-in
:class:`~head4d.head.ProceduralHead`'s are), whose antisymmetric coefficients then change
sign (FLAME's PCA bases need not be either; :func:`blendshape_mirror_signs` raises when they
are not, since such codes have no exact mirror).
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..head.labels import LABEL_SIZE, make_labels, parse_labels

#: Name of the labels file at the dataset root.
LABELS_FILE = "dataset.json"
#: Image file extensions the dataset lists (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
#: Folder (zip prefix) of the optional foreground masks.
MASKS_DIR = "masks"
#: Reflection through the plane x = 0, the head's plane of symmetry.
_MIRROR = (-1.0, 1.0, 1.0)


def decode_image(data: bytes, name: str) -> torch.Tensor:
    """An image file's bytes to ``[3, H, W]`` uint8 RGB: Pillow when installed, else
    head4d's PNG reader; ``name`` (the file) is named in every error."""
    try:
        from PIL import Image
    except ImportError:
        if not name.lower().endswith(".png"):
            raise ValueError(f"{name}: reading {Path(name).suffix} images needs Pillow (pip install pillow); "
                             f"without it head4d reads PNG only") from None
        from ..media import decode_png

        return decode_png(data, name).permute(2, 0, 1).contiguous()
    try:
        with Image.open(io.BytesIO(data)) as picture:
            array = np.asarray(picture.convert("RGB"))
    except OSError as exc:
        raise ValueError(f"{name}: cannot decode the image ({exc})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def mask_name(image: str) -> str:
    """The dataset path of image ``image``'s mask: ``masks/`` + its path with ``.png``."""
    return f"{MASKS_DIR}/{os.path.splitext(image)[0]}.png"


def decode_mask(data: bytes, name: str) -> torch.Tensor:
    """A single-channel 8-bit PNG's bytes to ``[1, H, W]`` uint8 (Pillow when installed, else
    head4d's PNG reader); colour or 16-bit masks raise an error naming ``name``."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 26:
        raise ValueError(f"{name}: a mask must be a PNG file (no PNG signature and header)")
    colour_type, depth = data[25], data[24]  # IHDR: the first chunk, at a fixed offset
    if colour_type != 0 or depth not in (1, 2, 4, 8):
        raise ValueError(f"{name}: a mask must be a single-channel (greyscale) PNG of at most 8 bits, got PNG "
                         f"colour type {colour_type}, bit depth {depth}")
    try:
        from PIL import Image
    except ImportError:
        from ..media import decode_png

        return decode_png(data, name)[..., :1].permute(2, 0, 1).contiguous()
    try:
        with Image.open(io.BytesIO(data)) as picture:
            array = np.asarray(picture.convert("L"))
    except OSError as exc:
        raise ValueError(f"{name}: cannot decode the mask ({exc})") from None
    return torch.from_numpy(array.copy())[None]


def _axis_angle_mirror(pose: torch.Tensor) -> torch.Tensor:
    """Reflect axis-angle rotations ``[..., 3]`` through x = 0: ``S R S`` for ``S = diag(-1, 1, 1)``
    is the rotation by the same angle about ``(x, -y, -z)`` (an axis is a pseudo-vector)."""
    return pose * pose.new_tensor((1.0, -1.0, -1.0))


def blendshape_mirror_signs(head, tolerance: float = 1e-3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-coefficient signs that mirror a head model's shape and expression codes.

    A blendshape ``B`` (``[V, 3]``) is mirror-symmetric when reflecting it through x = 0 and
    moving each vertex to its mirror vertex gives ``B`` back (sign +1), antisymmetric when it
    gives ``-B`` (sign -1). Mirror vertices are found on the template (nearest neighbour of
    the reflected vertex).

    Args:
        head: a :class:`~head4d.head.base.HeadModel` (template mirror-symmetric).
        tolerance: relative residual allowed for either case.

    Returns:
        ``(shape_signs [300], expression_signs [100])`` float32 in {-1, +1}, on the CPU.

    Raises:
        ValueError: when the template is not symmetric, or a blendshape is neither.
    """
    template = head.v_template.detach().double().cpu()
    reflect = template.new_tensor(_MIRROR)
    distance, mirror_vertex = torch.cdist(template * reflect, template).min(dim=1)
    size = (template.max(0).values - template.min(0).values).max()
    if distance.max() > tolerance * size:
        raise ValueError(f"blendshape_mirror_signs: the template of {type(head).__name__} is not mirror-symmetric "
                         f"about x = 0 (a reflected vertex is {distance.max().item():.3g} from the nearest vertex)")
    signs = []
    for name in ("shapedirs", "exprdirs"):
        basis = getattr(head, name).detach().double().cpu()  # [V, 3, K]
        mirrored = basis[mirror_vertex] * reflect[None, :, None]
        norm = basis.flatten(0, 1).norm(dim=0).clamp_min(1e-30)
        symmetric = (mirrored - basis).flatten(0, 1).norm(dim=0) / norm <= tolerance
        antisymmetric = (mirrored + basis).flatten(0, 1).norm(dim=0) / norm <= tolerance
        neither = ~(symmetric | antisymmetric)
        if neither.any():
            raise ValueError(f"blendshape_mirror_signs: {name} of {type(head).__name__} has "
                             f"{int(neither.sum())} blendshapes that are neither mirror-symmetric nor "
                             f"antisymmetric (the first is {int(neither.nonzero()[0])}): its codes have no exact mirror")
        signs.append(torch.where(antisymmetric & ~symmetric, -1.0, 1.0).float())
    return signs[0], signs[1]


def mirror_labels(labels: torch.Tensor, *, shape_signs: Optional[torch.Tensor] = None,
                  expression_signs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Labels of the horizontally flipped images: ``[N, 437]`` in, ``[N, 437]`` out (same dtype).

    The camera is reflected through x = 0 (``cam2world -> S cam2world S`` with ``S =
    diag(-1, 1, 1, 1)``; the principal point's x goes to ``1 - cx`` and the skew changes
    sign), so that the reflected head seen by the reflected camera is the flipped image. Neck
    and jaw axis-angles ``(x, y, z)`` become ``(x, -y, -z)``; the eyes are reflected the same
    way and swapped (the left eye's new rotation is the reflected right eye's). Shape and
    expression coefficients are multiplied by ``shape_signs [300]`` / ``expression_signs
    [100]`` when given (:func:`blendshape_mirror_signs`), else kept.
    """
    fields = parse_labels(labels)
    n = labels.shape[0]
    reflect4 = labels.new_tensor(_MIRROR + (1.0,))
    cam2world = fields["cam2world"] * reflect4[None, :, None] * reflect4[None, None, :]
    intrinsics = fields["intrinsics"].clone()
    intrinsics[:, 0, 2] = intrinsics[:, 2, 2] - intrinsics[:, 0, 2]  # 1 - cx for normalized intrinsics
    intrinsics[:, 0, 1] = -intrinsics[:, 0, 1]
    eyes = _axis_angle_mirror(fields["eye_pose"].reshape(n, 2, 3)).flip(1).reshape(n, 6)
    shape, expression = fields["shape"], fields["expression"]
    if shape_signs is not None:
        shape = shape * shape_signs.to(shape)
    if expression_signs is not None:
        expression = expression * expression_signs.to(expression)
    return make_labels(cam2world, intrinsics, shape, expression, _axis_angle_mirror(fields["neck_pose"]),
                       _axis_angle_mirror(fields["jaw_pose"]), eyes)


class _Files:
    """Read access to the files of a folder or a zip. The archive is opened lazily and once
    per process: DataLoader workers (forked or spawned) never share an open handle, whose
    file position they would race on."""

    def __init__(self, path: Path):
        self.path = path
        self.is_zip = path.is_file()
        self._zip: Optional[zipfile.ZipFile] = None
        self._zip_pid: Optional[int] = None
        if self.is_zip and not zipfile.is_zipfile(path):
            raise ValueError(f"ImageLabelDataset: path {str(path)!r} is a file but not a zip archive")
        if not self.is_zip and not path.is_dir():
            raise FileNotFoundError(f"ImageLabelDataset: path {str(path)!r} is neither a folder nor a zip")

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)  # a forked worker's inherited handle is dropped, not closed
            self._zip_pid = os.getpid()
        return self._zip

    def names(self) -> List[str]:
        """Every file's path relative to the root, with forward slashes, sorted."""
        if self.is_zip:
            return sorted(n for n in self._archive().namelist() if not n.endswith("/"))
        root = self.path
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        if self.is_zip:
            return self._archive().read(name)
        return (self.path / name).read_bytes()

    def close(self) -> None:
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip = None

    def __getstate__(self):
        return dict(self.__dict__, _zip=None)


def read_labels_json(data: bytes, where: str) -> Dict[str, np.ndarray]:
    """Parse a ``dataset.json``: ``{relative path: float32 [437]}``; errors name ``where`` and the image."""
    try:
        entries = json.loads(data)["labels"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{where}: expected JSON {{\"labels\": [[\"path.png\", [{LABEL_SIZE} numbers]], ...]}} "
                         f"({type(exc).__name__}: {exc})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{where}: \"labels\" must be a list of [path, label] pairs, got {type(entries).__name__}")
    labels: Dict[str, np.ndarray] = {}
    for entry in entries:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"{where}: every entry of \"labels\" must be [path, label], got {str(entry)[:80]}")
        name, values = entry[0].replace("\\", "/"), entry[1]
        try:
            label = np.asarray(values, dtype=np.float32)
        except (ValueError, TypeError):
            raise ValueError(f"{where}: the label of {name} is not a list of numbers") from None
        if label.shape != (LABEL_SIZE,):
            raise ValueError(f"{where}: the label of {name} has shape {list(label.shape)}, expected "
                             f"[{LABEL_SIZE}] (head4d.head.labels)")
        if not np.isfinite(label).all():
            raise ValueError(f"{where}: the label of {name} has non-finite values")
        labels[name] = label
    return labels


class ImageLabelDataset(torch.utils.data.Dataset):
    """Aligned portraits and their 437-number labels (format: the module docstring).

    Args:
        path: a dataset folder or ``.zip``.
        resolution: the images' side; ``None`` takes the first image's. Every image must be
            ``resolution`` x ``resolution`` (no resizing: a mismatch raises, naming the file).
        xflip: double the dataset with horizontally flipped copies (the second half),
            labels mirrored (:func:`mirror_labels`).
        use_labels: read ``dataset.json`` (required then); ``False`` lists every image and
            returns empty labels ``[0]``.
        mirror_head: with ``xflip``, a head model whose blendshape mirror signs
            (:func:`blendshape_mirror_signs`) mirror the shape and expression codes too.

    ``dataset[i]`` is ``(image, label)``: ``[3, R, R]`` uint8 and ``[437]`` float32 (``[0]``
    without labels); with masks (:attr:`has_masks`) ``(image, label, mask)``, the mask
    ``[1, R, R]`` uint8 (255 foreground), mirrored with the image in the x-flipped half.
    ``labels`` is the ``[len, 437]`` float32 table of every item.
    """

    def __init__(self, path: Union[str, os.PathLike], *, resolution: Optional[int] = None, xflip: bool = False,
                 use_labels: bool = True, mirror_head=None):
        self._files = _Files(Path(path))
        self.path = str(path)
        where = f"ImageLabelDataset({self.path!r})"
        names = self._files.names()
        images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(MASKS_DIR + "/")]
        mask_files = {n for n in names if n.startswith(MASKS_DIR + "/")}
        if use_labels:
            if LABELS_FILE not in names:
                raise FileNotFoundError(f"{where}: no {LABELS_FILE} at the dataset root (use_labels=True needs "
                                        f"{{\"labels\": [[\"path.png\", [{LABEL_SIZE} numbers]], ...]}})")
            table = read_labels_json(self._files.read(LABELS_FILE), f"{where}: {LABELS_FILE}")
            present = set(images)
            for name in table:
                if name not in present:
                    raise FileNotFoundError(f"{where}: {LABELS_FILE} labels {name}, which is not in the dataset")
            for name in images:
                if name not in table:
                    raise ValueError(f"{where}: image {name} has no label in {LABELS_FILE}")
            raw = np.stack([table[n] for n in images]) if images else np.zeros((0, LABEL_SIZE), np.float32)
        else:
            raw = np.zeros((len(images), 0), dtype=np.float32)
        if not images:
            raise ValueError(f"{where}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the dataset")
        self.image_names = images
        self.mask_names: Optional[List[str]] = None
        if mask_files:
            self.mask_names = [mask_name(n) for n in images]
            for image, mask in zip(images, self.mask_names):
                if mask not in mask_files:
                    raise FileNotFoundError(f"{where}: image {image} has no mask {mask} (a dataset with a "
                                            f"{MASKS_DIR}/ folder needs one single-channel PNG per image)")
            unmatched = sorted(mask_files - set(self.mask_names))
            if unmatched:
                raise ValueError(f"{where}: mask {unmatched[0]} belongs to no image of the dataset")
        self.xflip = bool(xflip)
        raw_labels = torch.from_numpy(raw)
        if self.xflip:
            flipped = raw_labels
            if use_labels:
                signs = {}
                if mirror_head is not None:
                    signs = dict(zip(("shape_signs", "expression_signs"), blendshape_mirror_signs(mirror_head)))
                flipped = mirror_labels(raw_labels, **signs)
            raw_labels = torch.cat([raw_labels, flipped])
        self.labels = raw_labels.contiguous()
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                       or resolution < 1):
            raise ValueError(f"{where}: resolution must be a positive int or None, got {resolution!r}")
        self.resolution = resolution
        first = self._load(0)  # checks the first image against resolution now rather than in training
        self.resolution = int(first.shape[-1])
        if self.has_masks:
            self._load_mask(0)

    def _load_mask(self, raw_index: int) -> torch.Tensor:
        name = self.mask_names[raw_index]
        mask = decode_mask(self._files.read(name), f"{self.path}: {name}")
        if mask.shape[1:] != (self.resolution, self.resolution):
            raise ValueError(f"ImageLabelDataset({self.path!r}): mask {name} is {mask.shape[2]} x {mask.shape[1]} "
                             f"(width x height), expected {self.resolution} x {self.resolution} like its image")
        return mask

    def _load(self, raw_index: int) -> torch.Tensor:
        name = self.image_names[raw_index]
        image = decode_image(self._files.read(name), f"{self.path}: {name}")
        resolution = self.resolution
        if image.shape[1] != image.shape[2] or (resolution is not None and image.shape[1] != resolution):
            want = f"{resolution} x {resolution}" if resolution is not None else "square"
            raise ValueError(f"ImageLabelDataset({self.path!r}): image {name} is {image.shape[2]} x {image.shape[1]} "
                             f"(width x height), expected {want}")
        return image

    def __len__(self) -> int:
        return len(self.image_names) * (2 if self.xflip else 1)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, ...]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"ImageLabelDataset: index {index} out of range for {len(self)} items")
        index %= len(self)
        count = len(self.image_names)
        image = self._load(index % count)
        mask = self._load_mask(index % count) if self.has_masks else None
        if index >= count:
            image = image.flip(-1).contiguous()
            mask = mask.flip(-1).contiguous() if mask is not None else None
        if mask is None:
            return image, self.labels[index].clone()
        return image, self.labels[index].clone(), mask

    @property
    def has_masks(self) -> bool:
        """Whether the dataset has a ``masks/`` folder (items are then ``(image, label, mask)``)."""
        return self.mask_names is not None

    @property
    def has_labels(self) -> bool:
        """Whether items carry labels (``use_labels=True``)."""
        return self.labels.shape[1] > 0

    @property
    def name(self) -> str:
        """The dataset's folder or archive name without its extension."""
        return Path(self.path).stem

    @property
    def image_shape(self) -> List[int]:
        """``[3, R, R]``, as StyleGAN's datasets give it."""
        return [3, self.resolution, self.resolution]

    @property
    def num_channels(self) -> int:
        return 3

    @property
    def label_dim(self) -> int:
        """437 with labels, 0 without."""
        return int(self.labels.shape[1])

    def get_label(self, index: int) -> torch.Tensor:
        """Item ``index``'s label without reading its image: ``[437]`` float32 (``[0]`` without labels)."""
        return self.labels[index].clone()

    def close(self) -> None:
        """Close the zip archive (reopened on the next read)."""
        self._files.close()
