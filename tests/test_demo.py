"""``head4d demo`` and its procedural subject (:mod:`head4d.demo`).

- The subject fitted on a tiny budget renders, through ``GenHead.render`` with the
  canonical codes, an opacity whose silhouette overlaps the rasterized canonical mesh's
  (IoU threshold), and does so much better than a shifted mesh would.
- A neck rotation moves the rendered silhouette the way it moves the posed mesh's.
- The cache: a second load with the same settings reads the file, equal bit for bit.
- The command end to end at tiny sizes writes its PNG grids, one frame, the animation and
  prints the frames per second and the device; the PNG writer round-trips exactly, and the
  GIF writer's frames decode (a general LZW decoder) to their palette indices.
- A checkpoint goes through the loader (replaced by one returning a small GenHead):
  planes from its backbone, its background, no fitting.
- Argument and checkpoint errors are clear.
"""
import importlib.util
import re
import struct
import zlib
from pathlib import Path

import pytest
import torch

from head4d import cli
from head4d import media as images
from head4d.demo.run import SEQUENCES, orbit_camera
from head4d.demo.subject import FitSettings, fit_subject, load_or_fit_subject, subject_model
from head4d.head import ProceduralHead
from head4d.models import clip_vertices
from head4d.ops import rasterize_triangles

RES = 32
#: A fit that takes a few seconds: small planes, few steps.
TINY = FitSettings(plane_resolution=64, plane_features=8, hidden=32, steps=120, batch=4096, pool=60_000)


@pytest.fixture(scope="module")
def head():
    return ProceduralHead()


@pytest.fixture(scope="module")
def model(head):
    subject = fit_subject(TINY, head)
    return subject_model(subject, head, depth_resolution=24, depth_resolution_importance=24), subject.planes


def render_opacity(model, head, codes, yaw=0.0):
    G, planes = model
    camera = orbit_camera(torch.tensor([yaw]))
    out = G.render(planes, camera, codes, neural_rendering_resolution=RES, generator=torch.Generator().manual_seed(0))
    return out["opacity"][0, 0]


def mesh_silhouette(head, codes, yaw=0.0, shift=(0.0, 0.0, 0.0)):
    """Coverage ``[RES, RES]`` bool of the head mesh posed by ``codes`` (plus ``shift``)."""
    camera = orbit_camera(torch.tensor([yaw]))
    with torch.no_grad():
        verts = head(**codes) + torch.tensor(shift)
        clip = clip_vertices(verts, camera[:, :16].reshape(1, 4, 4), camera[:, 16:].reshape(1, 3, 3))
        face, _, _ = rasterize_triangles(clip, head.faces, (RES, RES))
    return face[0] >= 0


def iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


def test_fitted_subject_silhouette_matches_the_canonical_mesh(model, head):
    codes = head.canonical_codes(1)
    opacity = render_opacity(model, head, codes)
    assert torch.isfinite(opacity).all() and opacity.min() >= 0 and opacity.max() <= 1 + 1e-5
    rendered = opacity > 0.5
    truth = mesh_silhouette(head, codes)
    assert iou(rendered, truth) > 0.75
    # the overlap is specific: the same mesh moved by a tenth of the head's size overlaps less
    moved = mesh_silhouette(head, codes, shift=(0.1, 0.0, 0.0))
    assert iou(rendered, moved) < iou(rendered, truth) - 0.1


def centroid_x(mask):
    cols = torch.arange(mask.shape[1], dtype=torch.float32)
    return (mask.float().sum(0) * cols).sum() / mask.float().sum()


def test_neck_rotation_moves_the_silhouette_with_the_mesh(model, head):
    rest = head.canonical_codes(1)
    tilted = head.canonical_codes(1)
    tilted["neck_pose"][0, 2] = 0.4  # roll about +z: the head leans towards -x (image left)
    before = render_opacity(model, head, rest) > 0.5
    after = render_opacity(model, head, tilted) > 0.5
    mesh_before, mesh_after = mesh_silhouette(head, rest), mesh_silhouette(head, tilted)
    assert iou(before, after) < 0.9  # it moved
    assert iou(after, mesh_after) > 0.75
    assert iou(after, mesh_after) > iou(after, mesh_before) + 0.05
    shift, mesh_shift = centroid_x(after) - centroid_x(before), centroid_x(mesh_after) - centroid_x(mesh_before)
    assert mesh_shift < -0.5  # pixels: the mesh moves left ...
    assert shift < 0.5 * mesh_shift  # ... and so does the render


def test_cache_reads_back_the_same_subject(tmp_path):
    settings = FitSettings(plane_resolution=16, plane_features=4, hidden=8, steps=2, batch=256, pool=2000)
    first = load_or_fit_subject(settings, tmp_path)
    assert first.fit_seconds > 0 and first.cache_path is not None and first.cache_path.is_file()
    second = load_or_fit_subject(settings, tmp_path)
    assert second.fit_seconds == 0 and second.cache_path == first.cache_path
    assert torch.equal(first.planes, second.planes)
    assert all(torch.equal(first.decoder_state[k], second.decoder_state[k]) for k in first.decoder_state)
    other = FitSettings(plane_resolution=16, plane_features=4, hidden=8, steps=3, batch=256, pool=2000)
    assert other.key() != settings.key()


def read_png(path):
    """``[H, W, 3]`` uint8 of an 8-bit RGB PNG with unfiltered rows (what write_png writes)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
            assert body[8:10] == b"\x08\x02"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h = size
    raw = zlib.decompress(idat)
    rows = [raw[y * (3 * w + 1):(y + 1) * (3 * w + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return torch.frombuffer(bytearray(b"".join(r[1:] for r in rows)), dtype=torch.uint8).reshape(h, w, 3)


def test_png_writer_round_trips(tmp_path):
    image = torch.randint(0, 256, (7, 5, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images.write_png(tmp_path / "x.png", image)
    assert torch.equal(read_png(tmp_path / "x.png"), image)


def test_demo_command_writes_its_files(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["demo", "--out", str(out), "--device", "cpu", "--resolution", "16", "--frames", "2",
                     "--cache", str(tmp_path / "cache"), "--fit-steps", "3"])
    printed = capsys.readouterr().out
    assert code == 0
    assert re.search(r"rendered 10 frames at 16x16 in [0-9.]+ s: [0-9.]+ frames per second on cpu", printed)
    for name in SEQUENCES:
        grid = read_png(out / f"{name}.png")
        # three rows (images, depth, opacity) of two 16x16 tiles, 2-pixel gaps
        assert grid.shape == (3 * 16 + 4, 2 * 16 + 2, 3)
    frame = read_png(out / "frame.png")
    assert frame.shape[1] == 3 * frame.shape[0] + 4  # image, depth, opacity side by side
    animations = list(out.glob("demo.*"))
    assert len(animations) == 1
    animation = animations[0]
    assert f"wrote {'MP4' if animation.suffix == '.mp4' else 'animated GIF'}" in printed
    if animation.suffix == ".gif":
        data = animation.read_bytes()
        assert data[:6] == b"GIF89a" and data[-1:] == b";"
        if importlib.util.find_spec("PIL") is None:  # head4d's writer: one graphic control block per frame
            assert data.count(b"\x21\xf9\x04") == 2 * len(SEQUENCES)
    else:
        assert animation.stat().st_size > 0


def test_demo_errors_name_the_argument(tmp_path, capsys, monkeypatch):
    assert cli.main(["demo", "--out", str(tmp_path), "--resolution", "129"]) == 2
    assert "--resolution must be an int in [8, 128]" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(tmp_path), "--frames", "1"]) == 2
    assert "--frames must be an int >= 2" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(tmp_path), "--fit-steps", "0"]) == 2
    assert "--fit-steps must be >= 1" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(tmp_path), "--checkpoint", str(tmp_path / "missing.pkl")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    # a checkpoint whose loader this head4d lacks: the error names the loader
    import head4d.checkpoints

    monkeypatch.delattr(head4d.checkpoints, "load_network_pkl", raising=False)
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(b"not read")
    assert cli.main(["demo", "--out", str(tmp_path), "--checkpoint", str(pkl)]) == 2
    assert "head4d.checkpoints.load_network_pkl" in capsys.readouterr().err
    # a checkpoint of the other model kind (the loader replaced by one returning a stand-in)

    class Reconstructor(torch.nn.Module):
        pass

    monkeypatch.setattr(head4d.checkpoints, "load_network_pkl", lambda path: {"G_ema": Reconstructor()},
                        raising=False)
    assert cli.main(["demo", "--out", str(tmp_path), "--checkpoint", str(pkl)]) == 2
    assert "holds a Reconstructor, but the demo renders a GenHead" in capsys.readouterr().err


def decode_gif_frames(data):
    """Palette indices of every frame of a GIF with a global 256-colour table and no local
    tables, by a general LZW decoder (string table, growing code size)."""
    pos, frames = 13 + 3 * 256, []
    while data[pos] != 0x3B:
        if data[pos] == 0x21:  # extension: skip its sub-blocks
            pos += 2
            while data[pos]:
                pos += data[pos] + 1
            pos += 1
            continue
        assert data[pos] == 0x2C
        w, h = struct.unpack("<HH", data[pos + 5:pos + 9])
        min_size, pos = data[pos + 10], pos + 11
        stream = bytearray()
        while data[pos]:
            stream += data[pos + 1:pos + 1 + data[pos]]
            pos += data[pos] + 1
        pos += 1
        clear, end = 1 << min_size, (1 << min_size) + 1
        bits = int.from_bytes(stream, "little")
        offset, size, table, prev, out = 0, min_size + 1, None, None, []
        while True:
            code = (bits >> offset) & ((1 << size) - 1)
            offset += size
            if code == clear:
                table, size, prev = [[i] for i in range(clear)] + [None, None], min_size + 1, None
                continue
            if code == end:
                break
            entry = table[code] if code < len(table) else table[prev] + table[prev][:1]
            out += entry
            if prev is not None:
                table.append(table[prev] + entry[:1])
                if len(table) == 1 << size and size < 12:
                    size += 1
            prev = code
        frames.append(torch.tensor(out[:w * h], dtype=torch.uint8).reshape(h, w))
    return frames


def test_gif_writer_decodes_to_the_palette_indices(tmp_path):
    gen = torch.Generator().manual_seed(1)
    frames = [torch.randint(0, 256, (9, 301, 3), generator=gen, dtype=torch.uint8) for _ in range(2)]
    images.write_gif(tmp_path / "x.gif", frames, fps=5)
    decoded = decode_gif_frames((tmp_path / "x.gif").read_bytes())
    assert len(decoded) == 2
    for frame, indices in zip(frames, decoded):
        assert torch.equal(indices, images._palette_indices(frame))


def test_demo_renders_a_checkpoint_through_the_loader(tmp_path, capsys, monkeypatch, head):
    """The checkpoint path with the loader replaced by one returning a small random GenHead
    (with a background): planes from its backbone, files written, no fitting."""
    import head4d.checkpoints
    from head4d.models import GenHead, GenHeadConfig

    torch.manual_seed(0)
    small = GenHead(GenHeadConfig(z_dim=16, w_dim=16, channel_base=128, channel_max=8, triplane_resolution=16,
                                  triplane_channels=48, background_channels=8, background_resolution=16, background_channel_base=64,
                                  background_channel_max=8, background_mapping_layers=1,
                                  has_superresolution=False, depth_resolution=8, depth_resolution_importance=8,
                                  fine_resolution=8, coarse_resolution=4, mask_resolution=32), head)
    loaded = []
    monkeypatch.setattr(head4d.checkpoints, "load_network_pkl",
                        lambda path: loaded.append(Path(path)) or {"G_ema": small}, raising=False)
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(b"read by the replaced loader only")
    out = tmp_path / "out"
    assert cli.main(["demo", "--out", str(out), "--checkpoint", str(pkl), "--resolution", "8", "--frames", "2",
                     "--cache", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert loaded == [pkl]
    assert f"subject: checkpoint {pkl}" in printed and "fitted" not in printed
    assert not (tmp_path / "cache").exists()
    grid = read_png(out / "neck.png")
    assert grid.shape == (3 * 8 + 4, 2 * 8 + 2, 3)
