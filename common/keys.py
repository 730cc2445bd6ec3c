"""Sample keys: stable, unique within a dataset, and unable to escape a folder.

A key becomes a tar member prefix (`KEY.jpg`) and a file name, and WebDataset and
DALI split member names at the first dot, so keys are restricted to
[A-Za-z0-9_-], 1..128 characters, never '.' or '/'."""
from __future__ import annotations

import hashlib
import re
import unicodedata

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_SLUG_DROP = re.compile(r"[^A-Za-z0-9]+")


class BadKeyError(ValueError):
    pass


def check_key(key: str, where: str = "") -> str:
    """Return `key` if it is safe, else raise naming where it came from."""
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        place = f" in {where}" if where else ""
        raise BadKeyError(
            f"unsafe sample key {key!r}{place}: keys must match {KEY_PATTERN.pattern} "
            "(no dots, slashes or other characters that could escape a folder or split a "
            "WebDataset member name); regenerate the data with our preprocess step"
        )
    return key


def coco_key(image_id: int) -> str:
    """COCO image ids zero-padded to 12 digits, as COCO names its files."""
    return check_key(f"{int(image_id):012d}")


def path_key(relative_path: str) -> str:
    """Slug of a path relative to the dataset root plus a short hash of the exact path.

    The hash keeps keys unique when slugs collide (equal basenames in different
    folders, names differing only in unicode or punctuation)."""
    normalised = unicodedata.normalize("NFC", relative_path.replace("\\", "/"))
    stem = normalised.rsplit(".", 1)[0] if "." in normalised.rsplit("/", 1)[-1] else normalised
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    slug = _SLUG_DROP.sub("_", ascii_stem).strip("_")[-80:].lstrip("_") or "img"
    digest = hashlib.sha1(normalised.encode("utf-8")).hexdigest()[:10]
    return check_key(f"{slug}-{digest}")
