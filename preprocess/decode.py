"""Robust image decoding: every input becomes 8-bit RGB in its EXIF-oriented frame.

Why one module: the proposals, the segments and the stored JPEG must all refer to the same
pixels, so the Ray job and the shard writer both decode through here.

Pixel limit: images above MAX_PIXELS (default 64 megapixels, override with the
REGIONSSL_MAX_PIXELS environment variable) are refused before their pixels are decoded, which
guards against decompression bombs (a small file that expands to gigabytes). A 64 MP RGB
image is 192 MB decoded; raise the limit only with memory to match.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 64_000_000
STORED_JPEG_QUALITY = 95


class DecodeError(ValueError):
    """An image that cannot become RGB pixels; the message names the file and the fix."""


def max_pixels() -> int:
    return int(os.environ.get("REGIONSSL_MAX_PIXELS", DEFAULT_MAX_PIXELS))


def _open(path, data: bytes | None = None, limit: int | None = None, load: bool = True) -> Image.Image:
    """The image opened and size-checked; decoded too unless `load` is False (header only)."""
    path = Path(path)
    try:
        if data is None:
            data = path.read_bytes()
    except OSError as e:
        raise DecodeError(f"{path}: cannot read the file ({e.strerror or e}); check it exists "
                          "and is readable") from e
    if not data:
        raise DecodeError(f"{path}: zero-byte file; re-copy or remove it")
    limit = limit or max_pixels()
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # PIL's own bomb check must not undercut a raised limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limit:
                raise DecodeError(f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {limit} "
                                  "(decompression-bomb guard); downscale the image or raise "
                                  "REGIONSSL_MAX_PIXELS")
            if load:
                img.load()
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(f"{path}: {e}; downscale the image or raise REGIONSSL_MAX_PIXELS") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"{path}: not a decodable image ({e}); the file is truncated, "
                          "corrupt or not an image: re-download or remove it") from e
    return img


def _high_bit_depth_to_8(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale to 8-bit L, by range, not by clipping."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.clip(arr, 0.0, 1.0) * 255.0 if arr.max(initial=0) <= 1.0 else np.clip(arr, 0, 255)
    elif arr.max(initial=0) > 255 or img.mode.startswith("I;16"):
        arr = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB. Transparency is composited over white, not dropped, so hidden
    colour under alpha 0 cannot leak into the pixels."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _high_bit_depth_to_8(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclass(frozen=True)
class Decoded:
    rgb: np.ndarray              # HxWx3 uint8, EXIF orientation applied
    orientation: int             # EXIF orientation tag of the file (1 = none)
    raw_size: tuple[int, int]    # (width, height) of the file's pixels before orientation


def decode(path, data: bytes | None = None, limit: int | None = None) -> Decoded:
    """Decode to RGB in the stored frame, keeping what is needed to move GT into it."""
    img = _open(path, data, limit)
    orientation = exif_orientation(img)
    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose the image: keep the raw frame
        oriented, orientation = img, 1
    if orientation not in range(1, 9):
        orientation = 1
    return Decoded(np.asarray(to_rgb(oriented), dtype=np.uint8), orientation, img.size)


def load_rgb(path, data: bytes | None = None, limit: int | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB, EXIF orientation applied. Raises DecodeError naming the file."""
    return decode(path, data, limit).rgb


def exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def stored_jpeg_bytes(path, quality: int = STORED_JPEG_QUALITY, data: bytes | None = None,
                      limit: int | None = None) -> bytes:
    """The JPEG bytes to store for an image (stored_jpeg without decoding them back).

    The source bytes are kept when the file is already a plain RGB JPEG with no EXIF
    rotation to apply (no re-encode loss; read from the header, nothing decoded: the caller
    decodes it strictly, e.g. shards.format.check_jpeg); anything else is re-encoded from
    load_rgb's pixels, so the stored image is exactly the frame every coordinate refers to."""
    path = Path(path)
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DecodeError(f"{path}: cannot read the file ({e.strerror or e}); check it "
                              "exists and is readable") from e
    img = _open(path, data, limit, load=False)
    if img.format == "JPEG" and img.mode == "RGB" and exif_orientation(img) == 1:
        return data
    buf = io.BytesIO()
    Image.fromarray(load_rgb(path, data, limit)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def stored_jpeg(path, quality: int = STORED_JPEG_QUALITY, data: bytes | None = None,
                limit: int | None = None) -> tuple[bytes, np.ndarray]:
    """(JPEG bytes to store, the RGB pixels those bytes decode to); see stored_jpeg_bytes."""
    encoded = stored_jpeg_bytes(path, quality, data, limit)
    return encoded, np.asarray(_open(path, encoded, limit).convert("RGB"), dtype=np.uint8)
