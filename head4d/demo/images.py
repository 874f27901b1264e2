"""Writing the demo's images without an imaging package: PNG (zlib from the standard
library), an animated GIF (Pillow's when it is installed; else head4d's own: a fixed 6x7x6
colour cube, LZW codes written without a growing table), and MP4 through ``imageio`` / ``imageio-ffmpeg`` or ``torchvision`` when either is
installed. Images are ``[H, W, 3]`` uint8 tensors (``[H, W]`` for grey)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import List, Sequence

import torch

#: Levels of the GIF palette's colour cube (red, green, blue): 6 * 7 * 6 = 252 colours.
GIF_LEVELS = (6, 7, 6)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` or ``[1, H, W]`` floating in [0, 1] to ``[H, W, 3]`` uint8 (grey repeated)."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"to_uint8: image must have shape [3, H, W] or [1, H, W], got {list(image.shape)}")
    image = image.detach().float().cpu().clamp(0, 1).expand(3, -1, -1)
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def grid(rows: Sequence[Sequence[torch.Tensor]], gap: int = 2, fill: int = 255) -> torch.Tensor:
    """Tiles ``[H, W, 3]`` uint8 (all one size) laid out in ``rows``, ``gap`` pixels apart."""
    h, w, _ = rows[0][0].shape
    cols = max(len(r) for r in rows)
    out = torch.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), fill, dtype=torch.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tile
    return out


def write_png(path: Path, image: torch.Tensor) -> None:
    """Write ``[H, W, 3]`` uint8 as an 8-bit RGB PNG."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + bytes(image[y].numpy().tobytes()) for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(data)


def _palette_indices(image: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` uint8 indices into the colour cube of :data:`GIF_LEVELS`."""
    levels = torch.tensor(GIF_LEVELS)
    q = (image.float() / 255 * (levels - 1)).round().long()
    return (q[..., 0] * levels[1] * levels[2] + q[..., 1] * levels[2] + q[..., 2]).to(torch.uint8)


def _palette() -> bytes:
    r, g, b = GIF_LEVELS
    colours = [(round(i * 255 / (r - 1)), round(j * 255 / (g - 1)), round(k * 255 / (b - 1)))
               for i in range(r) for j in range(g) for k in range(b)]
    colours += [(0, 0, 0)] * (256 - len(colours))
    return bytes(c for colour in colours for c in colour)


def _lzw_codes(indices: bytes) -> bytes:
    """GIF image data for 8-bit ``indices``: 9-bit codes, each a literal, with a clear code
    before the table would grow to 10 bits (so no string table is ever used)."""
    clear, end = 256, 257
    out, buffer, bits = bytearray(), 0, 0

    def emit(code: int) -> None:
        nonlocal buffer, bits
        buffer |= code << bits
        bits += 9
        while bits >= 8:
            out.append(buffer & 0xFF)
            buffer >>= 8
            bits -= 8

    for start in range(0, len(indices), 254):
        emit(clear)
        for value in indices[start:start + 254]:
            emit(value)
    emit(end)
    if bits:
        out.append(buffer & 0xFF)
    blocks = bytearray([8])  # the minimum code size
    for i in range(0, len(out), 255):
        piece = out[i:i + 255]
        blocks += bytes([len(piece)]) + piece
    return bytes(blocks + b"\x00")


def write_gif(path: Path, frames: List[torch.Tensor], fps: float) -> None:
    """Write ``[H, W, 3]`` uint8 frames (one size) as a looping animated GIF."""
    h, w, _ = frames[0].shape
    delay = max(2, round(100 / fps))
    data = bytearray(b"GIF89a" + struct.pack("<HHBBB", w, h, 0xF7, 0, 0) + _palette())
    data += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop forever
    for frame in frames:
        data += b"\x21\xf9\x04\x00" + struct.pack("<H", delay) + b"\x00\x00"
        data += b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0)
        data += _lzw_codes(_palette_indices(frame).numpy().tobytes())
    data += b"\x3b"
    Path(path).write_bytes(bytes(data))


def write_animation(stem: Path, frames: List[torch.Tensor], fps: float) -> Path:
    """Write ``frames`` as ``stem.mp4`` through imageio-ffmpeg or torchvision when one is
    importable and works, else as ``stem.gif`` (through Pillow when importable, else
    :func:`write_gif`); returns the path written."""
    even = [f[:f.shape[0] // 2 * 2, :f.shape[1] // 2 * 2] for f in frames]  # H.264 wants even sizes
    try:
        import imageio.v2 as imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401

        path = stem.with_suffix(".mp4")
        with imageio.get_writer(path, fps=fps, macro_block_size=1) as writer:
            for frame in even:
                writer.append_data(frame.numpy())
        return path
    except (ImportError, OSError, RuntimeError, ValueError):  # not installed, or no working encoder
        pass
    try:
        import torchvision.io

        path = stem.with_suffix(".mp4")
        torchvision.io.write_video(str(path), torch.stack(even), fps=fps)
        return path
    except (ImportError, OSError, RuntimeError, ValueError):  # likewise: try the GIF writers
        pass
    path = stem.with_suffix(".gif")
    try:
        from PIL import Image

        pictures = [Image.fromarray(frame.numpy()) for frame in frames]
        pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=round(1000 / fps), loop=0)
        return path
    except ImportError:  # no Pillow: head4d's own GIF writer
        pass
    write_gif(path, frames, fps)
    return path
