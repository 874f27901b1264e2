"""GenHead's training data: :class:`ImageLabelDataset` reads a folder or zip of aligned
images with Portrait4D's 437-number labels (format: :mod:`head4d.data.dataset`);
:func:`make_procedural_dataset` (``head4d make-dataset --procedural N``) writes such a
dataset from the built-in procedural head (:mod:`head4d.data.procedural`).
"""
from .dataset import (LABELS_FILE, MASKS_DIR, ImageLabelDataset, blendshape_mirror_signs, decode_image, decode_mask,
                      mask_name, mirror_labels, read_labels_json)
from .procedural import (FOV_DEGREES, fov_focal, make_procedural_dataset, render_procedural,
                         sample_procedural_labels)

__all__ = ["FOV_DEGREES", "ImageLabelDataset", "LABELS_FILE", "MASKS_DIR", "blendshape_mirror_signs", "decode_image",
           "decode_mask", "fov_focal", "mask_name", "make_procedural_dataset", "mirror_labels", "read_labels_json",
           "render_procedural", "sample_procedural_labels"]
