"""``head4d reenact`` (:mod:`head4d.reenact`).

- The command end to end with ``--synthetic`` and untrained weights (the procedural subject
  fitted on a tiny budget, a 64 x 64 source): its files (source, frames, depth maps, the
  animation, the mesh), the printed warning, frames per second and stages; the frames
  stream: when each batch's triplanes are computed, every earlier frame is already on disk
  and in the animation.
- A reconstructor with a super-resolution (narrowed blocks, random weights): the command's
  frames, neck turns included, are the one-call forward's images (with the same codes), and
  the super-resolution is timed as a stage;
  the canonical mesh comes from the motion-free triplane.
- A head4d checkpoint directory (``Reconstructor.save`` of a small PD-FGC-motion model): the
  command reads the user's .npy source and motions with orbit cameras, and ``--synthetic``
  with it says that the motion is random (no PD-FGC encoder in head4d).
- Marching tetrahedra on spheres: vertices on the sphere within a fraction of the grid
  spacing, a closed, consistently oriented, outward-facing mesh (each edge in two
  triangles, Euler characteristic 2 per sphere), the volume; the PLY round trip.
- Bad inputs: the image's size and channels, motion of the wrong length, cameras, neck poses, a
  checkpoint of another kind, argument combinations; each a clear error.
"""
import math
import struct
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import head4d.nn as hnn
from head4d import cli, media
from head4d.demo.subject import FitSettings
from head4d.models import Reconstructor
from head4d.reenact import (ReenactError, load_cameras, load_motion, load_reconstructor, load_source_image,
                            marching_tetrahedra, portrait_cameras, read_ply, run_reenact, untrained_config,
                            write_ply)
from head4d.reenact import run as reenact_run

from genhead_testing import randomize

SOURCE = 64
#: A procedural subject fitted in seconds (a few steps on a small pool).
TINY = FitSettings(plane_resolution=32, plane_features=8, hidden=16, steps=5, batch=1024, pool=8_000)


def read_png(path):
    """``[H, W, 3]`` uint8 of a PNG written by :func:`head4d.media.write_png` (filter 0 rows)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h = size
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, 3)


# ----------------------------------------------------------------------------------
# the command with --synthetic, untrained weights
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """``head4d reenact --synthetic`` (5 frames in batches of 2, depth, mesh) with the
    frames on disk and in the animation recorded at each triplane computation."""
    out = tmp_path_factory.mktemp("synthetic")
    seen = []
    triplanes = Reconstructor.triplanes

    def recording(self, encoded, motion, **kwargs):
        frames = sorted(p.name for p in (out / "frames").glob("*.png"))
        seen.append((motion.shape[0], frames, kwargs.get("motion_scale")))
        return triplanes(self, encoded, motion, **kwargs)

    appended = []
    append = media.AnimationWriter.append

    def counting(self, frame):
        appended.append(tuple(frame.shape))
        return append(self, frame)

    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Reconstructor, "triplanes", recording)
        mp.setattr(media.AnimationWriter, "append", counting)
        result = run_reenact(str(out), synthetic=True, frames=5, batch=2, depth=True, mesh=True, mesh_resolution=20,
                             cache_dir=str(out / "cache"), settings=TINY, log=lines.append)
    return out, result, seen, appended, "\n".join(lines)


def test_synthetic_writes_its_files(synthetic_run):
    out, result, _, appended, text = synthetic_run
    assert result["frames"] == 5
    assert read_png(out / "source.png").shape == (SOURCE, SOURCE, 3)
    for k in range(5):
        frame = read_png(out / "frames" / f"{k:05d}.png")
        assert frame.shape == (32, 32, 3)  # the untrained model's raw frames
        assert read_png(out / "depth" / f"{k:05d}.png").shape == (32, 32, 3)
    assert not (out / "frames" / "00005.png").exists()
    animation = result["animation"]
    assert animation.exists() and animation.suffix in (".mp4", ".gif") and animation.stat().st_size > 0
    if animation.suffix == ".gif":  # head4d's streamed GIF: one image descriptor per frame
        data = animation.read_bytes()
        assert data[:6] == b"GIF89a" and data[-1:] == b"\x3b"
        assert data.count(b"\x21\xf9\x04\x00") == 5
    assert len(appended) == 5
    vertices, faces = read_ply(result["mesh"])
    assert vertices.shape[1] == 3 and faces.shape[1] == 3
    # the untrained reconstructor's frames are not a re-enactment: the command says so
    assert "UNTRAINED" in text and "not a re-enactment" in text
    assert "frames per second" in text and "where the time went: encode" in text
    for stage in ("triplanes", "render", "writing"):
        assert f"{stage} " in text and result["timings"].stages[stage] > 0


def test_synthetic_frames_stream(synthetic_run):
    """Each batch's frames are written (PNG and animation) before the next batch renders;
    the mesh's triplane comes last, with the motion switched off."""
    _, _, seen, _, _ = synthetic_run
    batches = [(n, frames) for n, frames, scale in seen if scale is None]
    assert [n for n, _ in batches] == [2, 2, 1]
    assert [len(frames) for _, frames in batches] == [0, 2, 4]
    assert batches[2][1] == [f"{k:05d}.png" for k in range(4)]
    last = seen[-1]
    assert last[2] == 0.0 and last[0] == 1 and len(last[1]) == 5


def test_synthetic_motion_is_flame_motion_of_the_genhead_sequence():
    base = {"shape": torch.zeros(1, 300), "expression": torch.zeros(1, 100), "neck_pose": torch.zeros(1, 3),
            "jaw_pose": torch.zeros(1, 3), "eye_pose": torch.zeros(1, 6)}
    codes = reenact_run.synthetic_codes(base, 8)
    motion = reenact_run.flame_motion(codes)
    assert motion.shape == (8, 109)
    assert torch.equal(motion[0], torch.zeros(109))  # the source is the sequence's first frame
    assert torch.equal(motion[:, :100], codes["expression"]) and torch.equal(motion[:, 100:103], codes["jaw_pose"])
    assert torch.equal(motion[:, 103:], codes["eye_pose"])
    assert motion[1:].abs().amax(dim=0)[[1, 2, 100, 104, 107]].min() > 0.1  # expression, jaw and eyes move


def test_cameras():
    fixed = load_cameras("fixed", 3)
    assert fixed.shape == (3, 25)
    cam2world = fixed[0, :16].reshape(4, 4)
    assert torch.equal(cam2world[:3, :3], torch.eye(3))
    assert torch.allclose(cam2world[:3, 3], torch.tensor([0.0, 0.01, 4.2]))
    assert torch.allclose(fixed[0, 16:], torch.tensor([4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1]))
    orbit = load_cameras("orbit", 4)
    assert torch.allclose(orbit[0], fixed[0])
    yaw = math.atan2(orbit[1, 2].item(), orbit[1, 0].item())  # rotation entry (0, 2) = sin, (0, 0) = cos
    assert abs(yaw - 0.6) < 1e-5
    positions = orbit[:, :16].reshape(4, 4, 4)[:, :3, 3]
    assert torch.allclose(positions.norm(dim=1), fixed[0, :16].reshape(4, 4)[:3, 3].norm().expand(4))
    assert torch.allclose(portrait_cameras(torch.zeros(1)), fixed[:1])


# ----------------------------------------------------------------------------------
# a reconstructor with the super-resolution: the command equals the one-call forward
# ----------------------------------------------------------------------------------
def narrowed_sr_model():
    """The untrained configuration with a super-resolution whose blocks are narrowed (at
    their upstream resolutions), random weights, non-zero biases and density weights."""
    torch.manual_seed(0)
    config = untrained_config(SOURCE, 109)
    config.has_superresolution = True
    config.sr_num_fp16_res = 0
    model = Reconstructor(config)
    sr = model.superresolution
    sr.block0 = hnn.SynthesisBlock(sr.channels, 8, w_dim=512, resolution=256, img_channels=3, is_last=False,
                                   use_fp16=False, conv_clamp=None, fused_modconv_default="inference_only")
    sr.block1 = hnn.SynthesisBlock(8, 4, w_dim=512, resolution=512, img_channels=3, is_last=True,
                                   use_fp16=False, conv_clamp=None, fused_modconv_default="inference_only")
    randomize(model, 1)
    with torch.no_grad():  # a density that crosses Portrait4D's mesh level inside the box
        model.decoder.out_sigma.bias.fill_(reenact_run.MESH_LEVEL)
    return model.eval()


def test_frames_equal_the_forward_with_superresolution(tmp_path, monkeypatch):
    model = narrowed_sr_model()
    gen = torch.Generator().manual_seed(5)
    image = (torch.rand(SOURCE, SOURCE, 3, generator=gen) * 255).round().to(torch.uint8)
    motion = torch.randn(3, 109, generator=gen)
    np.save(tmp_path / "source.npy", image.numpy())
    np.save(tmp_path / "motion.npy", motion.numpy())
    neck = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.4, 0.0], [-0.1, -0.3, 0.05]])
    np.save(tmp_path / "neck.npy", neck.numpy())
    monkeypatch.setattr(reenact_run, "load_reconstructor", lambda path, device: model)
    out = tmp_path / "out"
    lines = []
    result = run_reenact(str(out), checkpoint="given", source=str(tmp_path / "source.npy"),
                         motion=str(tmp_path / "motion.npy"), camera="orbit", neck=str(tmp_path / "neck.npy"),
                         batch=3, resolution=16, mesh=True, mesh_resolution=24, seed=11, log=lines.append)
    assert result["timings"].stages["super-resolution"] > 0 and "super-resolution " in "\n".join(lines)

    source = image.permute(2, 0, 1)[None].float() / 255 * 2 - 1
    codes = model.head_model.zero_codes(3)
    codes["neck_pose"] = neck.to(codes["neck_pose"].dtype)
    with torch.no_grad():
        expected = model(source, motion[:1], motion, load_cameras("orbit", 3), neural_rendering_resolution=16,
                         codes=codes, generator=torch.Generator().manual_seed(11))["image"]
        unwarped = model(source, motion[:1], motion, load_cameras("orbit", 3), neural_rendering_resolution=16,
                         generator=torch.Generator().manual_seed(11))["image"]
    assert (expected[1:] - unwarped[1:]).abs().amax() > 0.05  # the neck turns change the frames
    for k in range(3):
        frame = torch.from_numpy(read_png(out / "frames" / f"{k:05d}.png").copy())
        assert frame.shape == (512, 512, 3)
        want = media.to_uint8((expected[k] + 1) / 2)
        # the same computation; a float32 difference may flip a rounding to the next level
        assert (frame.int() - want.int()).abs().max() <= 1
        assert (frame != want).float().mean() < 1e-3

    vertices, faces = read_ply(result["mesh"])
    assert len(faces) > 0
    box = model.config.box_warp / 2
    assert np.abs(vertices).max() <= box + 1e-5


# ----------------------------------------------------------------------------------
# a head4d checkpoint directory
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """``Reconstructor.save`` of the untrained small configuration with PD-FGC motion (548)."""
    root = tmp_path_factory.mktemp("checkpoint")
    directory = root / "reconstructor"
    torch.manual_seed(0)
    Reconstructor(untrained_config(SOURCE, 548)).save(directory)
    yield directory
    shutil.rmtree(root, ignore_errors=True)  # 0.6 GB: gone with the module, not at the session's end


def test_checkpoint_directory_with_user_files(tmp_path, checkpoint_dir, capsys):
    gen = torch.Generator().manual_seed(2)
    np.save(tmp_path / "source.npy", torch.rand(3, SOURCE, SOURCE, generator=gen).numpy())  # [3, S, S] in [0, 1]
    np.save(tmp_path / "motion.npy", torch.randn(3, 548, generator=gen).numpy())
    np.save(tmp_path / "wrong.npy", torch.randn(3, 109, generator=gen).numpy())
    out = tmp_path / "out"
    code = cli.main(["reenact", "--checkpoint", str(checkpoint_dir), "--source", str(tmp_path / "source.npy"),
                     "--motion", str(tmp_path / "motion.npy"), "--camera", "orbit", "--batch", "2", "--out",
                     str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert "frames per second" in text and "UNTRAINED" not in text
    # motion vectors of the wrong length for this checkpoint
    code = cli.main(["reenact", "--checkpoint", str(checkpoint_dir), "--source", str(tmp_path / "source.npy"),
                     "--motion", str(tmp_path / "wrong.npy"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--motion" in err and "[F, 548]" in err and "[3, 109]" in err


def test_synthetic_with_a_pdfgc_checkpoint_says_the_motion_is_random(tmp_path, checkpoint_dir):
    lines = []
    result = run_reenact(str(tmp_path), checkpoint=str(checkpoint_dir), synthetic=True, frames=2, batch=2,
                         cache_dir=str(tmp_path / "cache"), settings=TINY, log=lines.append)
    text = "\n".join(lines)
    assert result["frames"] == 2
    assert "no PD-FGC motion encoder" in text and "random" in text


# ----------------------------------------------------------------------------------
# marching tetrahedra
# ----------------------------------------------------------------------------------
def sphere_grid(n, centres, radius, low=-1.0, high=1.0):
    axis = np.linspace(low, high, n)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    points = np.stack([x, y, z], axis=-1)
    distance = np.min([np.linalg.norm(points - np.array(c), axis=-1) for c in centres], axis=0)
    return radius - distance, axis[1] - axis[0]  # above 0 inside


def edge_counts(faces):
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    return np.unique(edges, axis=0, return_counts=True)


@pytest.mark.parametrize("n", [17, 32])
def test_marching_tetrahedra_sphere(n):
    centre = (0.1, -0.05, 0.0)
    values, spacing = sphere_grid(n, [centre], 0.6)
    vertices, faces = marching_tetrahedra(values, 0.0, origin=(-1.0, -1.0, -1.0), spacing=spacing)
    radius = np.linalg.norm(vertices - np.array(centre), axis=1)
    # linear interpolation of the distance along a grid edge: off the sphere by much less than a step
    assert np.abs(radius - 0.6).max() < 0.1 * spacing
    edges, counts = edge_counts(faces)
    assert (counts == 2).all()  # closed: every edge in two triangles
    assert len(vertices) - len(edges) + len(faces) == 2  # a sphere's Euler characteristic
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    assert len(np.unique(directed, axis=0)) == len(directed)  # consistently oriented
    a, b, c = (vertices[faces[:, k]] - np.array(centre) for k in range(3))
    volume = np.einsum("ij,ij->i", np.cross(a, b), c).sum() / 6  # positive: normals point outwards
    assert abs(volume / (4 / 3 * math.pi * 0.6 ** 3) - 1) < 0.05
    assert len(faces) > 4 * (0.6 / spacing) ** 2  # far more triangles than the coarsest closed surfaces


def test_marching_tetrahedra_two_spheres_anisotropic_and_empty(tmp_path):
    values, spacing = sphere_grid(24, [(-0.5, 0, 0), (0.5, 0, 0)], 0.3)
    step = (spacing, 2 * spacing, 0.5 * spacing)
    vertices, faces = marching_tetrahedra(values, 0.0, origin=(1.0, 2.0, 3.0), spacing=step)
    edges, counts = edge_counts(faces)
    assert (counts == 2).all() and len(vertices) - len(edges) + len(faces) == 4  # two spheres
    # the grid's positions: back to the unit grid, the vertices lie on the spheres
    unit = (vertices - np.array([1.0, 2.0, 3.0])) / np.array(step) * spacing - 1.0
    radius = np.min([np.linalg.norm(unit - np.array(c), axis=1) for c in [(-0.5, 0, 0), (0.5, 0, 0)]], axis=0)
    assert np.abs(radius - 0.3).max() < 0.1 * spacing
    path = tmp_path / "mesh.ply"
    write_ply(path, vertices, faces)
    v, f = read_ply(path)
    assert np.array_equal(f, faces) and np.array_equal(v, vertices.astype(np.float32))
    empty_vertices, empty_faces = marching_tetrahedra(values, 5.0)
    assert empty_vertices.shape == (0, 3) and empty_faces.shape == (0, 3)
    with pytest.raises(ValueError, match="values must be a 3-d grid"):
        marching_tetrahedra(np.zeros((4, 4)), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        marching_tetrahedra(np.full((3, 3, 3), np.nan), 0.0)
    with pytest.raises(ValueError, match="spacing must be positive"):
        marching_tetrahedra(values, 0.0, spacing=0.0)


# ----------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------
def test_bad_source_images(tmp_path, monkeypatch):
    cases = {
        "small.npy": (np.zeros((48, 48, 3), np.uint8), "must be 64x64"),
        "grey.npy": (np.zeros((64, 64), np.uint8), "RGB image"),
        "rgba.npy": (np.zeros((64, 64, 4), np.uint8), "RGB image"),
        "range.npy": (np.full((64, 64, 3), 2.0), r"must be in \[0, 1\]"),
        "ints.npy": (np.zeros((64, 64, 3), np.int32), "uint8 or floating"),
    }
    for name, (array, message) in cases.items():
        np.save(tmp_path / name, array)
        with pytest.raises(ReenactError, match=message) as info:
            load_source_image(str(tmp_path / name), 64)
        assert "--source" in str(info.value)
    np.save(tmp_path / "good.npy", np.zeros((3, 64, 64), np.float32))
    image = load_source_image(str(tmp_path / "good.npy"), 64)
    assert image.shape == (1, 3, 64, 64) and torch.equal(image, torch.full_like(image, -1.0))
    with pytest.raises(ReenactError, match="no such file"):
        load_source_image(str(tmp_path / "missing.png"), 64)
    (tmp_path / "image.bmp").write_bytes(b"BM")
    with pytest.raises(ReenactError, match=r"\.png, \.jpg"):
        load_source_image(str(tmp_path / "image.bmp"), 64)
    png = tmp_path / "image.png"
    media.write_png(png, torch.zeros(64, 64, 3, dtype=torch.uint8))
    monkeypatch.setitem(sys.modules, "PIL", None)  # as on a machine without Pillow
    with pytest.raises(ReenactError, match="needs Pillow"):
        load_source_image(str(png), 64)


def test_bad_motion_and_cameras(tmp_path):
    np.save(tmp_path / "short.npy", np.zeros((4, 100), np.float32))
    with pytest.raises(ReenactError, match=r"--motion .*\[F, 109\].*FLAME motion.*\[4, 100\]"):
        load_motion(str(tmp_path / "short.npy"), 109)
    np.save(tmp_path / "nan.npy", np.full((2, 109), np.nan))
    with pytest.raises(ReenactError, match="NaN"):
        load_motion(str(tmp_path / "nan.npy"), 109)
    with pytest.raises(ReenactError, match=r"\.npy file"):
        load_motion(str(tmp_path / "motion.txt"), 109)
    assert load_motion(str(tmp_path / "short.npy"), 100).shape == (4, 100)
    np.save(tmp_path / "cams.npy", np.zeros((3, 16), np.float32))
    with pytest.raises(ReenactError, match=r"--camera .*\[5, 25\].*\[3, 16\]"):
        load_cameras(str(tmp_path / "cams.npy"), 5)
    np.save(tmp_path / "neck.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(ReenactError, match=r"--neck .*\[5, 3\].*\[2, 3\]"):
        reenact_run.load_neck_poses(str(tmp_path / "neck.npy"), 5)
    with pytest.raises(ReenactError, match="'fixed', 'orbit'"):
        load_cameras("sideways", 5)
    np.save(tmp_path / "one.npy", load_cameras("fixed", 1)[0].numpy())
    assert torch.equal(load_cameras(str(tmp_path / "one.npy"), 3), load_cameras("fixed", 3))


def test_checkpoints_of_another_kind(tmp_path):
    with pytest.raises(ReenactError, match="no such file"):
        load_reconstructor(str(tmp_path / "missing.pkl"), torch.device("cpu"))
    # a directory that is not head4d's format
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReenactError, match="not a reconstructor checkpoint"):
        load_reconstructor(str(tmp_path / "empty"), torch.device("cpu"))
    # a GenHead directory: refused by its format tag
    from head4d.demo.subject import fit_subject, subject_model
    subject_model(fit_subject(TINY)).save(tmp_path / "genhead")
    with pytest.raises(ReenactError, match="not a reconstructor checkpoint.*head4d.GenHead"):
        load_reconstructor(str(tmp_path / "genhead"), torch.device("cpu"))
    # a file that is no pickle at all
    (tmp_path / "garbage.pkl").write_bytes(b"\x00\x01 not a pickle")
    with pytest.raises(ReenactError, match="not a reconstructor checkpoint"):
        load_reconstructor(str(tmp_path / "garbage.pkl"), torch.device("cpu"))
    # (a pickle of another network kind is refused by head4d.checkpoints.load(kind=...),
    # tested with upstream-format pickles in test_reconstructor_checkpoints.py)


def test_argument_errors(tmp_path, capsys):
    out = str(tmp_path)
    assert cli.main(["reenact", "--out", out, "--source", "a.png"]) == 2
    assert "--motion MOTIONS.npy are needed" in capsys.readouterr().err
    assert cli.main(["reenact", "--out", out, "--source", "a.png", "--motion", "m.npy"]) == 2
    assert "--checkpoint is needed" in capsys.readouterr().err
    assert cli.main(["reenact", "--out", out, "--synthetic", "--source", "a.png"]) == 2
    assert "leave out --source" in capsys.readouterr().err
    assert cli.main(["reenact", "--out", out, "--synthetic", "--batch", "0"]) == 2
    assert "--batch must be an int >= 1" in capsys.readouterr().err
    assert cli.main(["reenact", "--out", out, "--genhead", "g.pkl", "--source", "a", "--motion", "m",
                     "--checkpoint", "c"]) == 2
    assert "needs --synthetic" in capsys.readouterr().err
