"""``head4d synthesize``'s files: triplets from a :class:`~head4d.synthesis.TripletSampler`
written to a directory, for inspection or offline training.

Layout of ``out``:

* ``images/{i:06d}_{view}.png``: triplet i's super-resolved image of view ``source``,
  ``driver`` or ``target`` (8-bit RGB, [-1, 1] mapped to [0, 255]); without a
  super-resolution the raw image;
* ``raw/{i:06d}_{view}.png``: the raw (neural-resolution) images;
* ``labels.npz`` (NumPy, float32 unless said), row i of every array is triplet i, views in
  the order source, driver, target: ``views`` (the three names), ``cameras [N, 3, 25]``,
  ``condition_camera [N, 25]``, ``z [N, z_dim]``, ``shape [N, 300]``,
  ``expression [N, 3, 100]``, ``jaw_pose [N, 3, 3]``, ``eye_pose [N, 3, 6]``,
  ``neck_pose [N, 3, 3]``, ``motions [N, 3, 109]``, ``motion_scale [N]``,
  ``from_dataset [N, 3]`` bool, ``jaw_perturbed [N, 2]`` bool, ``image_depth``,
  ``opacity``, ``eye_mask``, ``mouth_mask`` ``[N, 3, 1, r, r]``, ``triplane_points
  [N, K, 3]``, ``triplane_features [N, K, C]``. The feature maps, the background and the
  planes are not written (the online sampler provides them).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch

from ..media import to_uint8, write_png
from .sampler import VIEWS, TripletSampler

#: The TripletBatch fields written to ``labels.npz``.
LABEL_FIELDS = ("cameras", "condition_camera", "z", "shape", "expression", "jaw_pose", "eye_pose", "neck_pose",
                "motions", "motion_scale", "from_dataset", "jaw_perturbed", "image_depth", "opacity", "eye_mask",
                "mouth_mask", "triplane_points", "triplane_features")
LABELS_FILE = "labels.npz"


class _Progress:
    """tqdm's bar when tqdm is installed, else a counter printed on one line; both on
    standard error, as progress bars go."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.start = total, 0, enabled, time.perf_counter()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="triplet", desc="synthesize")
            except ImportError:
                pass

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.enabled:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            print(f"\rsynthesize: {self.done}/{self.total} triplets ({rate:.2f}/s)", end="", flush=True,
                  file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def _png(image: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` in [-1, 1] to ``[H, W, 3]`` uint8."""
    return to_uint8((image + 1) / 2)


def write_triplets(sampler: TripletSampler, out: Union[str, Path], count: int, batch: int = 4,
                   progress: bool = True, log: Optional[Callable[[str], None]] = None) -> Path:
    """Draw ``count`` triplets in batches of at most ``batch`` and write them to ``out``
    (created if needed; module docstring for the files). Returns the labels file's path."""
    for name, value in (("count", count), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"write_triplets: {name} must be a positive int, got {value!r}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    labels: Dict[str, list] = {k: [] for k in LABEL_FIELDS}
    bar = _Progress(count, progress)
    written = 0
    try:
        while written < count:
            size = min(batch, count - written)
            triplets = sampler.sample(size)
            images = triplets.image if triplets.image is not None else triplets.image_raw
            for i in range(size):
                for v, view in enumerate(VIEWS):
                    write_png(out / "images" / f"{written + i:06d}_{view}.png", _png(images[i, v]))
                    write_png(out / "raw" / f"{written + i:06d}_{view}.png", _png(triplets.image_raw[i, v]))
            for k in LABEL_FIELDS:
                labels[k].append(getattr(triplets, k).cpu())
            written += size
            bar.update(size)
    finally:
        bar.close()
    arrays = {k: torch.cat(v).numpy() for k, v in labels.items()}
    arrays["views"] = np.array(VIEWS)
    path = out / LABELS_FILE
    partial = out / (LABELS_FILE + ".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)
    if log is not None:
        log(f"wrote {count} triplets to {out}")
    return path


def read_labels(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    """The arrays of a ``labels.npz`` written by :func:`write_triplets` (a file or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILE
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
