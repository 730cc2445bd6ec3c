"""The shard sample format: the ONE home of what a sample's members are and how they decode.

A sample is a run of tar members `KEY.<ext>` in MEMBER_ORDER (docs/interfaces.md, Shards):
  jpg      the stored JPEG (the pixels every box and label map refers to)
  boxes    N x 4 little-endian float32 x1 y1 x2 y2, pixels, half-open, inside the image
  fh.png   FH segment ids, single-channel 8- or 16-bit PNG, the image's size
  mcg.png  MCG-style masks as a 16-bit bitfield PNG: bit i set where mask i covers a pixel
  gt.png   ground-truth instance ids (16-bit PNG), only with ground truth
  gt.json  ground-truth annotations in stored pixels, only with ground truth
  json     the sample's metadata (key, width, height, counts, source)
Each shard has a DALI webdataset index v1.2 (`<shard>.idx`): one line per sample,
`ext offset size name` per member. The writer (shards.write), the reader
(shards.reader), `make verify` (shards.verify) and the training loader
(train.loader.source) encode, decode and check members only through this module.

Errors raised here are MemberError naming the member; callers add where it came from
and the fix that fits their stage (rerun make proposals / rebuild with make shards)."""
from __future__ import annotations

import json
import struct

import cv2
import numpy as np

MEMBER_ORDER = ("jpg", "boxes", "fh.png", "mcg.png", "gt.png", "gt.json", "json")
REQUIRED = ("jpg", "boxes", "json")
LABEL_MAPS = ("fh.png", "mcg.png", "gt.png")
MAX_MASKS = 16          # bits of the mcg.png bitfield
INDEX_VERSION = "v1.2"  # DALI webdataset index
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class MemberError(ValueError):
    """One member's bytes are not what the format says; the message names the member."""


# ---------------------------------------------------------------- boxes
def encode_boxes(boxes) -> bytes:
    return np.asarray(boxes, np.float32).reshape(-1, 4).astype("<f4").tobytes()


def decode_boxes(raw: bytes, what: str) -> np.ndarray:
    """(N, 4) float32 from a `.boxes` member."""
    if len(raw) % 16:
        raise MemberError(f"{what} has {len(raw)} bytes, not a multiple of 16 (4 float32 a box)")
    return np.frombuffer(raw, "<f4").reshape(-1, 4).astype(np.float32)


def check_boxes(boxes: np.ndarray, width: int, height: int, what: str) -> np.ndarray:
    """At least one box, every box finite, non-empty and inside the width x height image."""
    if len(boxes) == 0:
        raise MemberError(f"{what} holds no box (every sample has >= 1: the whole-image fallback)")
    x1, y1, x2, y2 = boxes.T
    bad = ~(np.isfinite(boxes).all(1) & (x1 >= 0) & (y1 >= 0) & (x2 <= width) & (y2 <= height)
            & (x1 < x2) & (y1 < y2))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MemberError(f"{what}: box {i} {boxes[i].tolist()} is empty, not finite or outside "
                          f"the {width}x{height} image ({int(bad.sum())} such boxes)")
    return boxes


# ---------------------------------------------------------------- label maps and bitfields
def png_header(data: bytes, what: str) -> tuple[int, int, int]:
    """(width, height, bit depth) of a single-channel PNG from its IHDR, without decoding."""
    if len(data) < 29 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise MemberError(f"{what} is not a PNG")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if colour != 0:
        raise MemberError(f"{what} is not a single-channel (grey) PNG")
    if depth not in (8, 16):
        raise MemberError(f"{what} is a {depth}-bit PNG; label maps are 8- or 16-bit")
    return width, height, depth


def check_label_png(data: bytes, width: int, height: int, what: str) -> int:
    """The PNG's bit depth, after checking it is a grey 8/16-bit map of the image's size."""
    w, h, depth = png_header(data, what)
    if (w, h) != (width, height):
        raise MemberError(f"{what} is {w}x{h}, the image is {width}x{height}")
    return depth


def decode_label_png(data: bytes, what: str = "label map PNG") -> np.ndarray:
    """A single-channel 8- or 16-bit PNG as (H, W) uint16, values kept exactly."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 2:
        raise MemberError(f"{what} does not decode to a single-channel label map")
    return arr.astype(np.uint16, copy=False)


def decode_bitfield(bits: np.ndarray, num_masks: int) -> np.ndarray:
    """bool (num_masks, H, W) from a 16-bit bitfield: mask i = bit i."""
    check_mask_count(num_masks)
    k = np.arange(num_masks, dtype=np.uint16)
    return ((np.asarray(bits, np.uint16)[None] >> k[:, None, None]) & 1).astype(bool)


_LOWEST_BIT = np.zeros(1 << 16, np.uint16)
for _bit in range(15, -1, -1):  # lowest set bit wins: written last
    _LOWEST_BIT[(np.arange(1 << 16) >> _bit) & 1 == 1] = _bit + 1


def bitfield_labels(bits: np.ndarray) -> np.ndarray:
    """A bitfield (bit i = mask i, masks may overlap) as one label map: each pixel takes
    the best-ranked (lowest bit) mask covering it, as id i+1; 0 = no mask."""
    return _LOWEST_BIT[np.asarray(bits, np.uint16)]


def check_mask_count(num_masks: int, what: str | None = None) -> None:
    if not 0 <= num_masks <= MAX_MASKS:
        raise MemberError(f"{what + ': ' if what else ''}{num_masks} masks do not fit a {MAX_MASKS}-bit bitfield")


def check_bitfield(bits: np.ndarray, num_masks: int, what: str = "bitfield PNG") -> None:
    """A bitfield of `num_masks` masks: the count fits and no bit at or above it is set
    (such a bit would be a mask no index row counts)."""
    check_mask_count(num_masks, what)
    if num_masks < MAX_MASKS and (np.asarray(bits, np.uint16) >> num_masks).any():
        raise MemberError(f"{what} sets bits of masks beyond the {num_masks} the sample counts")


def decode_bitfield_png(data: bytes, num_masks: int, what: str = "bitfield PNG") -> np.ndarray:
    return decode_bitfield(decode_label_png(data, what), num_masks)


# ---------------------------------------------------------------- JPEG
def jpeg_size(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) from the JPEG's header."""
    import simplejpeg
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        raise MemberError(f"{what} is not a readable JPEG ({e})") from None
    return width, height


def check_jpeg(data: bytes, what: str, width: int | None = None, height: int | None = None) -> None:
    """Decode fully and strictly: a JPEG with a libjpeg warning (corrupt entropy data,
    premature end, extraneous bytes) is refused, as is one of another size. A flipped
    byte after the start of scan decodes "successfully" in OpenCV, PIL and torchvision
    into garbage pixels; libjpeg only warns, and strict mode turns that into an error."""
    import simplejpeg
    w, h = jpeg_size(data, what)
    if width is not None and (w, h) != (width, height):
        raise MemberError(f"{what} is {w}x{h}, the sample says {width}x{height}")
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True)
    except ValueError as e:
        raise MemberError(f"{what} decodes with errors (libjpeg: {e})") from None


def decode_jpeg(data: bytes, what: str, width: int, height: int, factor: int = 1) -> np.ndarray:
    """RGB (H, W, 3) uint8 of a stored JPEG at 1/factor of its width x height (libjpeg's
    reduced IDCT; factor 1, 2, 4 or 8), decoded strictly: a libjpeg warning is a
    MemberError. Pixel j covers stored pixels [factor*j, factor*(j+1)). EXIF orientation
    is ignored: shards store the pixels their boxes refer to. (Same pixels as OpenCV's
    IMREAD_REDUCED_* decode, which cannot report warnings.)"""
    import simplejpeg
    want = (-(-height // factor), -(-width // factor))
    try:
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=want[0],
                                     min_width=want[1], strict=True)
    except ValueError as e:
        raise MemberError(f"{what} decodes with errors (libjpeg: {e})") from None
    if rgb.shape[:2] != want:
        raise MemberError(f"{what} decodes to {rgb.shape[1]}x{rgb.shape[0]} at 1/{factor}, "
                          f"expected {want[1]}x{want[0]} (the sample says {width}x{height})")
    return rgb


# ---------------------------------------------------------------- metadata
def encode_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def decode_meta(data: bytes, what: str) -> dict:
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise MemberError(f"{what} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in ("width", "height")):
        raise MemberError(f"{what} lacks integer width/height")
    return meta


# ---------------------------------------------------------------- one sample, every member
def sample_problems(key: str, members: dict[str, bytes], width: int, height: int,
                    num_boxes: int | None = None, jpeg: bool = False,
                    pngs: bool = False, num_masks: int | None = None) -> list[str]:
    """What is wrong with one sample's members (empty when nothing): required members,
    metadata agreeing with (key, width, height), boxes inside the image, label maps of the
    image's size; with `jpeg` the JPEG strictly decoded (check_jpeg), with `pngs` every
    label map decoded once, and with `num_masks` too the MCG bitfield holding exactly that
    many masks' bits (check_bitfield)."""
    problems = [f"member {key}.{e} is missing" for e in REQUIRED if e not in members]
    unknown = sorted(set(members) - set(MEMBER_ORDER))
    problems += [f"member {key}.{e} is not part of the format" for e in unknown]
    if problems:
        return problems
    checks = [lambda: check_meta(key, members["json"], width, height),
              lambda: check_boxes(decode_boxes(members["boxes"], f"{key}.boxes"), width, height,
                                  f"{key}.boxes")]
    if num_boxes is not None and len(members["boxes"]) != 16 * num_boxes:
        problems.append(f"{key}.boxes has {len(members['boxes'])} bytes, the index says "
                        f"{num_boxes} boxes")
    for ext in LABEL_MAPS:
        if ext in members:
            checks.append(lambda ext=ext: check_label_png(members[ext], width, height, f"{key}.{ext}"))
            if pngs and ext == "mcg.png" and num_masks is not None:
                checks.append(lambda ext=ext: check_bitfield(
                    decode_label_png(members[ext], f"{key}.{ext}"), num_masks, f"{key}.{ext}"))
            elif pngs:
                checks.append(lambda ext=ext: decode_label_png(members[ext], f"{key}.{ext}"))
    if "gt.json" in members:
        checks.append(lambda: json.loads(members["gt.json"]))
    if jpeg:
        checks.append(lambda: check_jpeg(members["jpg"], f"{key}.jpg", width, height))
    for check in checks:
        try:
            check()
        except MemberError as e:
            problems.append(str(e))
        except ValueError as e:
            problems.append(f"{key}.gt.json is not valid JSON ({e})")
    return problems


def check_meta(key: str, data: bytes, width: int, height: int) -> dict:
    meta = decode_meta(data, f"{key}.json")
    if meta.get("key") != key or (meta["width"], meta["height"]) != (width, height):
        raise MemberError(f"{key}.json says key {meta.get('key')!r} {meta['width']}x"
                          f"{meta['height']}, the index {key!r} {width}x{height}")
    return meta


# ---------------------------------------------------------------- DALI index (.idx)
def index_line(key: str, entries: list[dict]) -> str:
    """One sample of a v1.2 index: `ext offset size name` per member (data offsets)."""
    return " ".join(f"{e['ext']} {e['offset']} {e['size']} {key}.{e['ext']}" for e in entries)


def index_text(lines: list[str]) -> str:
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def parse_index(text: str, what: str, tar_size: int | None = None) -> list[tuple[str, dict]]:
    """[(key, {ext: (data offset, size)})] from a v1.2 index; with `tar_size`, every member
    must end inside the tar. Raises MemberError naming the line."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise MemberError(f"{what}: not a DALI {INDEX_VERSION} index (first line {lines[:1]})")
    if int(head[1]) != len(lines) - 1:
        raise MemberError(f"{what}: header says {head[1]} samples but the index has "
                          f"{len(lines) - 1} lines (truncated index)")
    samples = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise MemberError(f"{what}:{n}: malformed index line")
        members, key = {}, None
        for ext, off, size, name in zip(*[iter(parts)] * 4):
            key = name.partition(".")[0]
            if not (off.isdigit() and size.isdigit()) or name != f"{key}.{ext}":
                raise MemberError(f"{what}:{n}: malformed entry {ext} {off} {size} {name}")
            off, size = int(off), int(size)
            if tar_size is not None and off + size > tar_size:
                raise MemberError(f"{what}:{n}: member {name} ends at byte {off + size} but the "
                                  f"tar has {tar_size} bytes (truncated shard)")
            members[ext] = (off, size)
        samples.append((key, members))
    return samples
