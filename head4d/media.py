"""Writing images and animations without an imaging package (``head4d demo`` and
``head4d reenact``): PNG (zlib from the standard library), an animated GIF (Pillow's when it
is installed; else head4d's own: a fixed 6x7x6 colour cube, LZW codes written without a
growing table), and MP4 through ``imageio`` / ``imageio-ffmpeg`` or ``torchvision`` when
either is installed. :class:`AnimationWriter` streams: each frame goes to the file when it
is appended (MP4 through imageio-ffmpeg, else head4d's GIF writer), so memory does not grow
with the number of frames. Images are ``[H, W, 3]`` uint8 tensors (``[H, W]`` for grey)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import BinaryIO, List, Optional, Sequence, Tuple

import numpy as np
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
    Path(path).write_bytes(encode_png(image))


def encode_png(image: torch.Tensor) -> bytes:
    """``[H, W, 3]`` uint8 to the bytes of an 8-bit RGB PNG file; ``[H, W, 1]`` to a
    greyscale one."""
    h, w, channels = image.shape
    if channels not in (1, 3) or image.dtype != torch.uint8:
        raise ValueError(f"encode_png: image must be uint8 [H, W, 3] or [H, W, 1], got {image.dtype} "
                         f"{list(image.shape)}")
    colour_type = 2 if channels == 3 else 0
    raw = b"".join(b"\x00" + bytes(image[y].numpy().tobytes()) for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return data


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


class GifStream:
    """An animated, looping GIF written frame by frame (head4d's writer: the colour cube of
    :data:`GIF_LEVELS`, literal LZW codes). ``append`` writes each ``[H, W, 3]`` uint8 frame
    (all of one size) to the open file at once; ``close`` ends the file."""

    def __init__(self, path: Path, fps: float):
        self.path = Path(path)
        self.delay = max(2, round(100 / fps))  # hundredths of a second
        self.size: Optional[Tuple[int, int]] = None
        self.frames = 0
        self._file: Optional[BinaryIO] = open(self.path, "wb")

    def append(self, frame: torch.Tensor) -> None:
        if self._file is None:
            raise ValueError(f"GifStream: {self.path} is already closed")
        h, w, _ = frame.shape
        if self.size is None:
            self.size = (h, w)
            self._file.write(b"GIF89a" + struct.pack("<HHBBB", w, h, 0xF7, 0, 0) + _palette())
            self._file.write(b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00")  # loop forever
        elif self.size != (h, w):
            raise ValueError(f"GifStream: frame must have shape [{self.size[0]}, {self.size[1]}, 3] like the "
                             f"first, got {list(frame.shape)}")
        data = b"\x21\xf9\x04\x00" + struct.pack("<H", self.delay) + b"\x00\x00"
        data += b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0)
        self._file.write(data + _lzw_codes(_palette_indices(frame).numpy().tobytes()))
        self.frames += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.write(b"\x3b")
            self._file.close()
            self._file = None


def write_gif(path: Path, frames: List[torch.Tensor], fps: float) -> None:
    """Write ``[H, W, 3]`` uint8 frames (one size) as a looping animated GIF (:class:`GifStream`)."""
    stream = GifStream(path, fps)
    try:
        for frame in frames:
            stream.append(frame)
    finally:
        stream.close()


def _even(frame: torch.Tensor) -> torch.Tensor:
    """``frame`` cropped to even height and width (H.264 wants even sizes)."""
    return frame[:frame.shape[0] // 2 * 2, :frame.shape[1] // 2 * 2]


class AnimationWriter:
    """Streams ``[H, W, 3]`` uint8 frames (one size) into ``stem.mp4`` through imageio-ffmpeg
    when it is importable and its encoder starts, else into ``stem.gif`` through
    :class:`GifStream`; each frame is written when appended. (Pillow's GIF writer and
    torchvision's MP4 writer take the whole sequence at once, so they are not used here.)

    ``path`` is known after the first frame; ``close()`` (or the ``with`` block's end)
    finishes the file and returns its path."""

    def __init__(self, stem: Path, fps: float):
        self.stem = Path(stem)
        self.fps = float(fps)
        self.path: Optional[Path] = None
        self.frames = 0
        self._mp4 = None
        self._gif: Optional[GifStream] = None

    def _open(self) -> None:
        try:
            import imageio.v2 as imageio
            import imageio_ffmpeg  # noqa: F401

            path = self.stem.with_suffix(".mp4")
            self._mp4 = imageio.get_writer(path, fps=self.fps, macro_block_size=1)
            self.path = path
            return
        except (ImportError, OSError, RuntimeError, ValueError):  # not installed, or no working encoder
            self._mp4 = None
        self.path = self.stem.with_suffix(".gif")
        self._gif = GifStream(self.path, self.fps)

    def append(self, frame: torch.Tensor) -> None:
        if self.path is None:
            self._open()
        if self._mp4 is not None:
            self._mp4.append_data(_even(frame).numpy())
        else:
            self._gif.append(frame)
        self.frames += 1

    def close(self) -> Optional[Path]:
        if self._mp4 is not None:
            self._mp4.close()
            self._mp4 = None
        if self._gif is not None:
            self._gif.close()
            self._gif = None
        return self.path

    def __enter__(self) -> "AnimationWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_animation(stem: Path, frames: List[torch.Tensor], fps: float) -> Path:
    """Write ``frames`` as ``stem.mp4`` through imageio-ffmpeg or torchvision when one is
    importable and works, else as ``stem.gif`` (through Pillow when importable, else
    :func:`write_gif`); returns the path written."""
    even = [_even(f) for f in frames]
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
    # likewise, or a torchvision without write_video (0.29 removed its video writer): the GIF writers
    except (ImportError, AttributeError, OSError, RuntimeError, ValueError):
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


#: Channels per pixel of the 8-bit PNG colour types :func:`read_png` decodes: grey, RGB,
#: grey + alpha, RGBA (palette images, type 3, are not decoded).
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def _paeth(a: int, b: int, c: int) -> int:
    """The PNG Paeth predictor of one byte from its left ``a``, upper ``b`` and upper-left ``c``."""
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter_row(kind: int, row: np.ndarray, above: np.ndarray, bpp: int) -> np.ndarray:
    """Undo one scanline's PNG filter: ``row`` and ``above`` (the previous reconstructed
    scanline, zeros for the first) are uint8 arrays of one scanline's bytes."""
    if kind == 0:
        return row
    if kind == 2:  # Up
        return (row.astype(np.int64) + above).astype(np.uint8)
    if kind == 1:  # Sub: per channel, a running sum along the row
        pixels = row.astype(np.int64).reshape(-1, bpp)
        return (np.cumsum(pixels, axis=0) % 256).astype(np.uint8).reshape(-1)
    if kind not in (3, 4):
        raise ValueError(f"unknown PNG filter type {kind}")
    out = bytearray(row.tobytes())
    up = above.tobytes()
    for i in range(len(out)):
        left = out[i - bpp] if i >= bpp else 0
        if kind == 3:  # Average
            out[i] = (out[i] + ((left + up[i]) >> 1)) & 0xFF
        else:  # Paeth
            upper_left = up[i - bpp] if i >= bpp else 0
            out[i] = (out[i] + _paeth(left, up[i], upper_left)) & 0xFF
    return np.frombuffer(bytes(out), dtype=np.uint8)


def decode_png(data: bytes, name: str = "PNG data") -> torch.Tensor:
    """Decode an 8-bit, non-interlaced PNG (grey, RGB, grey + alpha or RGBA) to ``[H, W, 3]``
    uint8 RGB (grey repeated, alpha dropped), with the standard library's zlib: head4d's
    reader when Pillow is not installed. Other PNGs raise ``ValueError`` naming ``name``
    and what it holds."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{name}: not a PNG file (no PNG signature)")
    pos, header, idat = 8, None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise ValueError(f"{name}: truncated PNG (no IHDR or no IDAT chunk)")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in _PNG_CHANNELS or interlace != 0:
        raise ValueError(f"{name}: head4d's PNG reader decodes 8-bit, non-interlaced grey / RGB / grey-alpha / "
                         f"RGBA images; this one has bit depth {depth}, colour type {colour}, interlace "
                         f"{interlace} (install Pillow to read it)")
    bpp = _PNG_CHANNELS[colour]
    stride = width * bpp
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    except zlib.error as exc:
        raise ValueError(f"{name}: corrupt PNG image data ({exc})") from None
    if raw.size != height * (stride + 1):
        raise ValueError(f"{name}: PNG image data holds {raw.size} bytes, expected {height * (stride + 1)} "
                         f"for {width} x {height} with {bpp} channels")
    rows = raw.reshape(height, stride + 1)
    pixels = np.empty((height, stride), dtype=np.uint8)
    above = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        above = pixels[y] = _unfilter_row(int(rows[y, 0]), rows[y, 1:], above, bpp)
    image = torch.from_numpy(pixels.reshape(height, width, bpp).copy())
    if bpp in (1, 2):
        return image[..., :1].expand(height, width, 3).contiguous()
    return image[..., :3].contiguous()
