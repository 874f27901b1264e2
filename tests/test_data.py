"""GenHead's training data: head4d.data.ImageLabelDataset (with and without foreground masks),
mirror_labels, head4d's PNG reader and `head4d make-dataset --procedural N` (images, labels, masks)."""
import importlib.util
import json
import math
import os
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch

from head4d.cli import main
from head4d.data import (ImageLabelDataset, blendshape_mirror_signs, decode_mask, fov_focal, make_procedural_dataset,
                         mask_name, mirror_labels, render_procedural, sample_procedural_labels)
from head4d.head import ProceduralHead
from head4d.head.labels import LABEL_SIZE, parse_labels
from head4d.media import decode_png, encode_png
from head4d.models.genhead import clip_vertices
from head4d.ops import rasterize_triangles
from head4d.synthesis.cameras import ELEVATION_RANGE, RADIUS_RANGE, YAW_RANGE, look_at_angles

COUNT, RESOLUTION = 6, 64


@pytest.fixture(scope="module")
def head():
    return ProceduralHead()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same procedural dataset written by the CLI as a folder and as a zip."""
    root = tmp_path_factory.mktemp("procedural")
    for extra, name in (([], "folder"), (["--zip"], "archive")):
        argv = ["make-dataset", "--procedural", str(COUNT), "--out", str(root / name),
                "--resolution", str(RESOLUTION), "--seed", "3"] + extra
        assert main(argv) == 0
    return root / "folder", root / "archive.zip"


def silhouette(head, labels, resolution, backend="torch"):
    """``[N, R, R]`` bool: where the head of ``labels`` covers a pixel centre (the reference rasterizer)."""
    fields = parse_labels(labels)
    with torch.no_grad():
        clip = clip_vertices(head.forward_labels(labels), fields["cam2world"], fields["intrinsics"])
        face_index, _, _ = rasterize_triangles(clip, head.faces, (resolution, resolution), backend=backend)
    return face_index >= 0


def boundary(mask):
    """``[N, H, W]`` bool: pixels of ``mask`` with a 4-neighbour outside it, and their outside neighbours."""
    padded = torch.nn.functional.pad(mask.float()[:, None], (1, 1, 1, 1), mode="replicate")
    low = -torch.nn.functional.max_pool2d(-padded, 3, stride=1)[:, 0]
    high = torch.nn.functional.max_pool2d(padded, 3, stride=1)[:, 0]
    return high != low


# ---------------------------------------------------------------- make-dataset and reading back
def test_make_dataset_writes_what_the_dataset_reads(datasets):
    folder, archive = datasets
    names = sorted(p.relative_to(folder).as_posix() for p in folder.glob("0*/*.png"))
    assert names == [f"00000/img{i:08d}.png" for i in range(COUNT)]
    masks = sorted(p.relative_to(folder).as_posix() for p in (folder / "masks").rglob("*"))
    assert masks == ["masks/00000"] + [f"masks/00000/img{i:08d}.png" for i in range(COUNT)]
    table = json.loads((folder / "dataset.json").read_text())["labels"]
    assert [entry[0] for entry in table] == names
    assert all(len(entry[1]) == LABEL_SIZE for entry in table)
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == sorted(names + masks[1:] + ["dataset.json"])

    from_folder, from_zip = ImageLabelDataset(folder), ImageLabelDataset(archive)
    assert len(from_folder) == len(from_zip) == COUNT
    assert from_folder.resolution == RESOLUTION and from_zip.image_shape == [3, RESOLUTION, RESOLUTION]
    assert from_folder.label_dim == LABEL_SIZE and from_zip.name == "archive"
    assert from_folder.has_masks and from_zip.has_masks
    assert torch.equal(from_zip.get_label(COUNT - 1), from_zip[COUNT - 1][1])
    for i in range(COUNT):
        image, label, mask = from_folder[i]
        assert image.dtype == torch.uint8 and image.shape == (3, RESOLUTION, RESOLUTION)
        assert label.dtype == torch.float32 and label.shape == (LABEL_SIZE,)
        assert mask.dtype == torch.uint8 and mask.shape == (1, RESOLUTION, RESOLUTION)
        torch.testing.assert_close(label, torch.tensor(table[i][1], dtype=torch.float32), rtol=0, atol=0)
        zip_image, zip_label, zip_mask = from_zip[i]
        assert torch.equal(zip_image, image) and torch.equal(zip_label, label) and torch.equal(zip_mask, mask)
    assert len(set(from_folder[i][0].float().sum().item() for i in range(COUNT))) == COUNT  # distinct images


def test_make_dataset_is_seeded(tmp_path):
    a = make_procedural_dataset(2, tmp_path / "a", resolution=16, seed=5)
    b = make_procedural_dataset(2, tmp_path / "b", resolution=16, seed=5)
    c = make_procedural_dataset(2, tmp_path / "c", resolution=16, seed=6)
    assert (a / "dataset.json").read_bytes() == (b / "dataset.json").read_bytes()
    assert (a / "00000/img00000001.png").read_bytes() == (b / "00000/img00000001.png").read_bytes()
    assert (a / "dataset.json").read_bytes() != (c / "dataset.json").read_bytes()


def test_procedural_labels_follow_the_documented_distribution():
    labels = sample_procedural_labels(4000, torch.Generator().manual_seed(0))
    fields = parse_labels(labels)
    yaw, elevation, roll, radius = look_at_angles(fields["camera"])
    for value, (low, high) in ((yaw, YAW_RANGE), (radius, RADIUS_RANGE)):
        assert value.min() >= low - 1e-4 and value.max() <= high + 1e-4
        assert value.min() < low + 0.05 * (high - low) and value.max() > high - 0.05 * (high - low)
    # The elevation is recovered from the position, which depends on the pivot too: loose bounds.
    assert elevation.min() > ELEVATION_RANGE[0] - 0.05 and elevation.max() < ELEVATION_RANGE[1] + 0.05
    focal = fov_focal()
    assert math.isclose(focal, 0.5 / math.tan(math.radians(6.0)), rel_tol=1e-12)
    expected_k = torch.tensor([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1]], dtype=torch.float32)
    assert torch.equal(fields["intrinsics"], expected_k.expand(4000, 3, 3))
    assert torch.equal(fields["neck_pose"], torch.zeros(4000, 3))
    jaw = fields["jaw_pose"]
    assert (jaw[:, 0] >= 0).all() and (jaw[:, 0] <= 0.35).all() and torch.equal(jaw[:, 1:], torch.zeros(4000, 2))
    assert torch.equal(fields["eye_pose"][:, :3], fields["eye_pose"][:, 3:])
    # standard deviations within 5 sigma of their sampling error (std of a sample std: s / sqrt(2n))
    for name, std in (("shape", 0.5), ("expression", 0.5)):
        values = fields[name]
        assert abs(values.std().item() - std) < 5 * std / math.sqrt(2 * values.numel())


def test_labels_parse_into_the_cameras_and_codes_that_rendered_them(datasets, head):
    """The head's centre projected with each label's camera lands on skin (the head is a
    closed surface, radial about its skull centre, so a ray through that centre crosses
    it), and the skin-coloured region is the head's silhouette rasterized from the label
    (reference backend)."""
    dataset = ImageLabelDataset(datasets[0])
    images = torch.stack([dataset[i][0] for i in range(COUNT)]).long()
    labels = dataset.labels
    fields = parse_labels(labels)
    with torch.no_grad():
        vertices = head.forward_labels(labels)
    centre = vertices[:, head.head_indices].mean(dim=1, keepdim=True)
    clip = clip_vertices(centre, fields["cam2world"], fields["intrinsics"])[:, 0]
    column = ((clip[:, 0] / clip[:, 3] + 1) / 2 * RESOLUTION).floor().long()
    row = ((1 - clip[:, 1] / clip[:, 3]) / 2 * RESOLUTION).floor().long()
    assert ((column >= 0) & (column < RESOLUTION) & (row >= 0) & (row < RESOLUTION)).all()
    red_minus_blue = images[:, 0] - images[:, 2]
    grey = (images[:, 0] == images[:, 1]) & (images[:, 1] == images[:, 2])
    for i in range(COUNT):
        assert red_minus_blue[i, row[i], column[i]] > 8, f"image {i}: the head centre's pixel is not skin-coloured"
    mask = silhouette(head, labels, RESOLUTION)
    # Skin has red well above blue (albedo 0.8 vs 0.5, tint within 10%, ambient 0.35): every
    # covered pixel but the eyeballs (white / dark) is non-grey; every uncovered one is grey.
    eyes = torch.zeros_like(mask)
    for i in range(COUNT):
        eyes[i] = (images[i].float().std(0) < 1.0) & mask[i]
    assert grey[~mask].all(), "a background pixel is not grey"
    assert not grey[mask & ~eyes].any()
    assert eyes.sum() < 0.05 * mask.sum()
    assert mask.float().mean(dim=(1, 2)).min() > 0.1  # the head fills a good part of each image


# ---------------------------------------------------------------- x-flip
def test_mirror_labels_is_an_involution_and_mirrors_the_fields(head):
    labels = sample_procedural_labels(5, torch.Generator().manual_seed(1)).double()
    labels[:, 16 + 2] = 0.46  # an off-centre principal point
    labels[:, 16 + 1] = 0.01  # and a skew
    labels[:, 425:437] = 0.1 * torch.randn(5, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    signs = blendshape_mirror_signs(head)
    once = mirror_labels(labels, shape_signs=signs[0], expression_signs=signs[1])
    torch.testing.assert_close(mirror_labels(once, shape_signs=signs[0], expression_signs=signs[1]), labels,
                               rtol=0, atol=1e-15)
    a, b = parse_labels(labels), parse_labels(once)
    s = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(b["cam2world"], s @ a["cam2world"] @ s, rtol=0, atol=0)
    torch.testing.assert_close(b["intrinsics"][:, 0, 2], 1 - a["intrinsics"][:, 0, 2], rtol=0, atol=1e-15)
    torch.testing.assert_close(b["intrinsics"][:, 0, 1], -a["intrinsics"][:, 0, 1], rtol=0, atol=0)
    torch.testing.assert_close(b["eye_pose"][:, :3], a["eye_pose"][:, 3:] * torch.tensor([1.0, -1, -1]).double())
    assert set(signs[0].tolist()) == {-1.0, 1.0} and set(signs[1].tolist()) == {-1.0, 1.0}
    # The mirrored codes pose the reflected head: each vertex lands on its mirror vertex's reflection.
    head64 = ProceduralHead(dtype=torch.float64)
    reflect = torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    template = head64.v_template
    mirror_vertex = torch.cdist(template * reflect, template).argmin(dim=1)
    with torch.no_grad():
        posed, posed_mirror = head64.forward_labels(labels), head64.forward_labels(once)
    error = (posed_mirror - posed[:, mirror_vertex] * reflect).norm(dim=-1).max()
    assert error < 1e-12 * (template.max(0).values - template.min(0).values).max(), error


@pytest.mark.parametrize("mirror_codes", [True, False])
def test_flipped_label_renders_the_flipped_silhouette(head, mirror_codes):
    """Rasterize the head with a label and with its mirror: the masks are each other's
    left-right flips (pixel centres are symmetric about the image's middle column)."""
    labels = sample_procedural_labels(4, torch.Generator().manual_seed(2)).double()
    labels[:, 16 + 2] = 0.47  # off-centre principal point: the flip must move it
    labels[:, 428:431] += torch.tensor([0.0, 0.08, -0.05], dtype=torch.float64)  # an asymmetric jaw
    labels[:, 431:437] = 0.2 * torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    head64 = ProceduralHead(dtype=torch.float64)
    if mirror_codes:
        signs = dict(zip(("shape_signs", "expression_signs"), blendshape_mirror_signs(head)))
    else:  # camera and poses only: exact when the shape and expression are symmetric (zero here)
        labels[:, 25:425] = 0
        signs = {}
    mask = silhouette(head64, labels, 96)
    flipped = silhouette(head64, mirror_labels(labels, **signs), 96)
    # The procedural mesh is mirror-symmetric in its vertices (to rounding) but not
    # in every triangle's diagonal, so pixel centres within that much of the silhouette may
    # go either way: differences are allowed on the silhouette's edge only, and rarely.
    differing = flipped != mask.flip(-1)
    edge = boundary(mask.flip(-1))
    assert not (differing & ~edge).any(), "a pixel away from the silhouette's edge differs"
    assert differing.sum() <= 0.02 * edge.sum(), f"{int(differing.sum())} of {int(edge.sum())} edge pixels differ"
    # not vacuous: the masks are not symmetric themselves
    assert (mask != mask.flip(-1)).sum() > 50


def test_flipped_shape_without_signs_is_not_the_mirror(head):
    """Keeping shape codes (no mirror signs) does not mirror an asymmetric face: the
    signs are needed for the procedural head."""
    labels = sample_procedural_labels(2, torch.Generator().manual_seed(4)).double()
    head64 = ProceduralHead(dtype=torch.float64)
    labels[:, 25:325] *= 4  # pronounced shape
    mask = silhouette(head64, labels, 96)
    kept = silhouette(head64, mirror_labels(labels), 96)
    differing = kept != mask.flip(-1)
    assert differing.sum() > 0.1 * boundary(mask.flip(-1)).sum()


def test_dataset_xflip_flips_images_and_mirrors_labels(datasets, head):
    plain = ImageLabelDataset(datasets[1])
    flipped = ImageLabelDataset(datasets[1], xflip=True, mirror_head=head)
    assert len(flipped) == 2 * COUNT
    signs = blendshape_mirror_signs(head)
    for i in range(COUNT):
        image, label, mask = plain[i]
        assert all(torch.equal(a, b) for a, b in zip(flipped[i], (image, label, mask)))
        mirrored_image, mirrored_label, mirrored_mask = flipped[COUNT + i]
        assert torch.equal(mirrored_image, image.flip(-1)) and torch.equal(mirrored_mask, mask.flip(-1))
        assert not torch.equal(mirrored_mask, mask)  # the head is not centred: the flip shows
        expected = mirror_labels(label[None], shape_signs=signs[0], expression_signs=signs[1])[0]
        assert torch.equal(mirrored_label, expected)
    # The mirrored label's silhouette is the flipped image's head region (up to the
    # silhouette-edge pixels of test_flipped_label_renders_the_flipped_silhouette).
    images = torch.stack([flipped[COUNT + i][0] for i in range(COUNT)])
    coloured = (images[:, 0] != images[:, 1]) | (images[:, 1] != images[:, 2])
    mask = silhouette(head, flipped.labels[COUNT:], RESOLUTION)
    stray = coloured & ~mask
    assert not (stray & ~boundary(mask)).any()
    assert stray.sum() <= 0.02 * boundary(mask).sum()
    assert (coloured & mask).sum() > 0.9 * mask.sum()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_zip_dataset_in_dataloader_workers(datasets, context):
    """Workers read the zip through handles of their own (a shared one races on its position)."""
    dataset = ImageLabelDataset(datasets[1])  # the parent has read the first image: its archive is open
    loader = torch.utils.data.DataLoader(_ArchiveOwner(dataset), batch_size=2, num_workers=2,
                                         multiprocessing_context=context)
    batches = list(loader)
    images = torch.cat([batch[0] for batch in batches])
    assert torch.equal(images, torch.stack([dataset[i][0] for i in range(COUNT)]))
    reader, opener = torch.cat([batch[1] for batch in batches]), torch.cat([batch[2] for batch in batches])
    assert torch.equal(reader, opener) and (reader != os.getpid()).all()


class _ArchiveOwner(torch.utils.data.Dataset):
    """Items of a zip dataset with the reading process and the process that opened the archive read."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image = self.dataset[index][0]
        return image, os.getpid(), self.dataset._files._zip_pid


def test_dataset_without_labels(datasets):
    dataset = ImageLabelDataset(datasets[0], use_labels=False, xflip=True)
    assert len(dataset) == 2 * COUNT and not dataset.has_labels and dataset.has_masks
    image, label, mask = dataset[COUNT]
    assert label.shape == (0,) and torch.equal(image, dataset[0][0].flip(-1))
    assert torch.equal(mask, dataset[0][2].flip(-1))


def test_make_dataset_masks_are_the_rasterizer_coverage(datasets, head):
    """Each written mask is 255 exactly where the rasterizer (the default backend, as
    make-dataset renders) covers a pixel centre for the image's label, 0 elsewhere; and it
    is the head region of the image (skin-coloured or eye pixels, the background grey)."""
    dataset = ImageLabelDataset(datasets[0])
    masks = torch.stack([dataset[i][2] for i in range(COUNT)])[:, 0]
    assert set(masks.unique().tolist()) == {0, 255}
    covered = silhouette(head, dataset.labels, RESOLUTION, backend=None)
    assert torch.equal(masks, covered.to(torch.uint8) * 255)
    # the reference rasterizer agrees up to pixel centres on an edge
    reference = silhouette(head, dataset.labels, RESOLUTION)
    assert not ((reference != covered) & ~boundary(reference)).any()
    images = torch.stack([dataset[i][0] for i in range(COUNT)])
    grey = (images[:, 0] == images[:, 1]) & (images[:, 1] == images[:, 2])
    assert grey[masks == 0].all()


def _write_masks(root, masks):
    for name, mask in masks.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encode_png(mask))


def test_dataset_reads_masks_from_a_folder_and_a_zip(tmp_path):
    """Masks are read back bit-exactly (values 0..255, not only 0 / 255), for PNG and JPEG
    images (the mask's name has .png), and mirrored with x-flip; a dataset without masks
    keeps (image, label) items."""
    generator = torch.Generator().manual_seed(11)
    pixels = {name: torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=generator)
              for name in ("a.png", "sub/b.png")}
    label = [0.0] * LABEL_SIZE
    root = _write_dataset(tmp_path / "masked", pixels, [["a.png", label], ["sub/b.png", label]])
    masks = {mask_name(name): torch.randint(0, 256, (8, 8, 1), dtype=torch.uint8, generator=generator)
             for name in pixels}
    assert sorted(masks) == ["masks/a.png", "masks/sub/b.png"]
    _write_masks(root, masks)
    archive = tmp_path / "masked.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(root).as_posix())
    for source in (root, archive):
        dataset = ImageLabelDataset(source, xflip=True)
        assert dataset.has_masks and len(dataset) == 4 and dataset.image_names == ["a.png", "sub/b.png"]
        for i, name in enumerate(dataset.image_names):
            image, _, mask = dataset[i]
            expected = masks[mask_name(name)].permute(2, 0, 1)
            assert torch.equal(image, pixels[name].permute(2, 0, 1)) and torch.equal(mask, expected)
            flipped_image, _, flipped_mask = dataset[2 + i]
            assert torch.equal(flipped_image, image.flip(-1)) and torch.equal(flipped_mask, expected.flip(-1))
    assert mask_name("00000/img1.jpg") == "masks/00000/img1.png"
    assert torch.equal(decode_mask(encode_png(masks["masks/a.png"]), "m.png"), masks["masks/a.png"].permute(2, 0, 1))
    plain = ImageLabelDataset(_write_dataset(tmp_path / "plain", pixels, [["a.png", label], ["sub/b.png", label]]))
    assert not plain.has_masks and len(plain[0]) == 2


def test_mask_reader_without_pillow(monkeypatch):
    """Without Pillow a mask goes through head4d's PNG reader, to the same values."""
    mask = torch.randint(0, 256, (5, 7, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)  # `from PIL import Image` raises ImportError
    assert torch.equal(decode_mask(encode_png(mask), "m.png"), mask.permute(2, 0, 1))


def test_bad_masks(tmp_path):
    image = torch.zeros(8, 8, 3, dtype=torch.uint8)
    mask = torch.full((8, 8, 1), 255, dtype=torch.uint8)
    label = [0.0] * LABEL_SIZE
    images, labels = {"a.png": image, "b.png": image, "c.png": image}, [[n, label] for n in ("a.png", "b.png", "c.png")]
    partial = _write_dataset(tmp_path / "partial", images, labels)
    _write_masks(partial, {"masks/a.png": mask, "masks/c.png": mask})
    with pytest.raises(FileNotFoundError, match="image b.png has no mask masks/b.png"):
        ImageLabelDataset(partial)
    stray = _write_dataset(tmp_path / "stray", {"a.png": image}, [["a.png", label]])
    _write_masks(stray, {"masks/a.png": mask, "masks/z.png": mask})
    with pytest.raises(ValueError, match="mask masks/z.png belongs to no image"):
        ImageLabelDataset(stray)
    colour = _write_dataset(tmp_path / "colour", {"a.png": image}, [["a.png", label]])
    _write_masks(colour, {"masks/a.png": image})
    with pytest.raises(ValueError, match="masks/a.png: a mask must be a single-channel .* colour type 2"):
        ImageLabelDataset(colour)
    small = _write_dataset(tmp_path / "small", {"a.png": image}, [["a.png", label]])
    _write_masks(small, {"masks/a.png": mask[:4]})
    with pytest.raises(ValueError, match=r"mask masks/a.png is 8 x 4 \(width x height\), expected 8 x 8"):
        ImageLabelDataset(small)
    with pytest.raises(ValueError, match="m.png: a mask must be a PNG"):
        decode_mask(b"GIF89a" + bytes(40), "m.png")


# ---------------------------------------------------------------- PNG reader
def _filtered_png(pixels: np.ndarray, filters) -> bytes:
    """An RGB(A) PNG whose scanline y is written with PNG filter ``filters[y]`` (the
    encoder side of the PNG specification, written here independently of the decoder)."""
    height, width, channels = pixels.shape
    bpp = channels
    rows = pixels.reshape(height, width * channels).astype(np.int64)
    out = []
    for y in range(height):
        x = rows[y]
        above = rows[y - 1] if y else np.zeros_like(x)
        left = np.concatenate([np.zeros(bpp, np.int64), x[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, np.int64), above[:-bpp]])
        kind = filters[y]
        if kind == 0:
            predicted = np.zeros_like(x)
        elif kind == 1:
            predicted = left
        elif kind == 2:
            predicted = above
        elif kind == 3:
            predicted = (left + above) // 2
        else:
            p = left + above - upper_left
            pa, pb, pc = np.abs(p - left), np.abs(p - above), np.abs(p - upper_left)
            predicted = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, above, upper_left))
        out.append(bytes([kind]) + ((x - predicted) % 256).astype(np.uint8).tobytes())

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    colour = {3: 2, 4: 6, 1: 0}[channels]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(out))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_reader_undoes_every_filter(channels):
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 256, size=(10, 7, channels), dtype=np.uint8)
    decoded = decode_png(_filtered_png(pixels, [0, 1, 2, 3, 4, 4, 3, 2, 1, 0]))
    expected = torch.from_numpy(pixels[..., :3] if channels >= 3 else np.repeat(pixels, 3, axis=2))
    assert torch.equal(decoded, expected)
    image = torch.from_numpy(rng.integers(0, 256, size=(5, 9, 3), dtype=np.uint8))
    assert torch.equal(decode_png(encode_png(image)), image)


def test_png_reader_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="x.png: not a PNG"):
        decode_png(b"GIF89a....", "x.png")
    data = bytearray(_filtered_png(np.zeros((2, 2, 3), np.uint8), [0, 0]))
    data[24] = 16  # bit depth 16
    with pytest.raises(ValueError, match="bit depth 16"):
        decode_png(bytes(data), "deep.png")


# ---------------------------------------------------------------- bad inputs
def _write_dataset(root, images, labels):
    root.mkdir(parents=True)
    for name, image in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encode_png(image))
    if labels is not None:
        (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def test_bad_inputs(tmp_path):
    image = torch.zeros(8, 8, 3, dtype=torch.uint8)
    label = [0.0] * LABEL_SIZE
    with pytest.raises(FileNotFoundError, match="neither a folder nor a zip"):
        ImageLabelDataset(tmp_path / "missing")
    no_json = _write_dataset(tmp_path / "no_json", {"a.png": image}, None)
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        ImageLabelDataset(no_json)
    assert len(ImageLabelDataset(no_json, use_labels=False)) == 1
    short = _write_dataset(tmp_path / "short", {"a.png": image}, [["a.png", label[:-1]]])
    with pytest.raises(ValueError, match=r"label of a.png has shape \[436\], expected \[437\]"):
        ImageLabelDataset(short)
    unlabelled = _write_dataset(tmp_path / "unlabelled", {"a.png": image, "b.png": image}, [["a.png", label]])
    with pytest.raises(ValueError, match="image b.png has no label"):
        ImageLabelDataset(unlabelled)
    ghost = _write_dataset(tmp_path / "ghost", {"a.png": image}, [["a.png", label], ["c.png", label]])
    with pytest.raises(FileNotFoundError, match="labels c.png, which is not in the dataset"):
        ImageLabelDataset(ghost)
    sizes = _write_dataset(tmp_path / "sizes", {"a.png": image, "b.png": torch.zeros(8, 6, 3, dtype=torch.uint8)},
                           [["a.png", label], ["b.png", label]])
    dataset = ImageLabelDataset(sizes)
    assert dataset[0][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"image b.png is 6 x 8 \(width x height\), expected 8 x 8"):
        dataset[1]
    with pytest.raises(ValueError, match="image a.png is 8 x 8 .*expected 16 x 16"):
        ImageLabelDataset(sizes, resolution=16)
    not_json = _write_dataset(tmp_path / "not_json", {"a.png": image}, None)
    (not_json / "dataset.json").write_text("{labels: oops")
    with pytest.raises(ValueError, match="dataset.json: expected JSON"):
        ImageLabelDataset(not_json)
    with pytest.raises(IndexError):
        dataset[5]
    if importlib.util.find_spec("PIL") is None:
        jpeg = _write_dataset(tmp_path / "jpeg", {}, [["a.jpg", label]])
        (jpeg / "a.jpg").write_bytes(b"\xff\xd8\xff")
        with pytest.raises(ValueError, match="a.jpg: reading .jpg images needs Pillow"):
            ImageLabelDataset(jpeg)
    with pytest.raises(ValueError, match="count must be a positive int"):
        make_procedural_dataset(0, tmp_path / "none")
    assert main(["make-dataset", "--procedural", "1", "--out", str(no_json), "--resolution", "8"]) == 2


def test_mirror_signs_reject_an_asymmetric_head(head):
    lopsided = ProceduralHead()
    lopsided.shapedirs[:, 0, 0] += torch.linspace(0, 1, lopsided.num_vertices)
    with pytest.raises(ValueError, match="shapedirs .* neither mirror-symmetric nor antisymmetric"):
        blendshape_mirror_signs(lopsided)


@pytest.mark.gpu
def test_render_procedural_on_cuda_matches_the_cpu(head):
    labels = sample_procedural_labels(3, torch.Generator().manual_seed(7))
    tint, background = torch.full((3, 3), 1.05), torch.rand(3, 2, 3, generator=torch.Generator().manual_seed(8))
    on_cpu = render_procedural(head, labels, 64, tint=tint, background=background)
    on_cuda = render_procedural(ProceduralHead().cuda(), labels.cuda(), 64, tint=tint.cuda(),
                                background=background.cuda())
    same_face = on_cuda["face_index"].cpu() == on_cpu["face_index"]
    # float32 posing on another device may move a pixel centre across an edge: only on edges, rarely
    mask = on_cpu["face_index"] >= 0
    assert not (~same_face & ~boundary(mask)).any() and (~same_face).sum() <= 0.02 * boundary(mask).sum()
    # Same face: same colour up to float32 rounding of the shading (a few ulps of 1).
    torch.testing.assert_close(on_cuda["image"].cpu().permute(0, 2, 3, 1)[same_face],
                               on_cpu["image"].permute(0, 2, 3, 1)[same_face], rtol=0, atol=1e-5)
