"""The shard index (`index.parquet`, one row per input image) and the manifest version.

Every input image has a row, packed or not: failed images keep their error and have
no shard. For packed ones, `tar_offset`/`tar_size` cover the whole sample (headers
included) so one read fetches it, `crc32` of those bytes catches altered shards, and
`members` gives each member's data offset and size for reads without parsing a tar.
"""
from __future__ import annotations

import pyarrow as pa

from schemas import SchemaError, field, make_table_schema

MEMBER = pa.struct([
    pa.field("ext", pa.string(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
])

INDEX = make_table_schema("index", "1.1", [
    field("key", pa.string(), "sample key, unique in the dataset (common.keys)", nullable=False),
    field("status", pa.string(), "'ok' (packed) or 'failed' (not packed, see error)",
          nullable=False),
    field("error", pa.string(), "why the image failed in preprocessing or packing; null when ok"),
    field("shard", pa.string(), "tar file name in the shards folder; null when failed"),
    field("position", pa.int32(), "sample number inside its shard, 0-based"),
    field("tar_offset", pa.int64(), "byte offset of the sample's first member header"),
    field("tar_size", pa.int64(), "bytes from tar_offset to the end of the sample's last "
          "member (headers and padding included)"),
    field("crc32", pa.int64(), "zlib.crc32 of those tar_size bytes (catches altered shards)"),
    field("members", pa.list_(MEMBER), "each member in tar order: extension (after the "
          "first dot), data offset in the tar, data size in bytes"),
    field("member_crc32", pa.list_(pa.int64()), "zlib.crc32 of each member's data, in the order "
          "of members (1.1; null in 1.0 indexes, whose readers check the whole-sample crc32)"),
    field("source_path", pa.string(), "image path relative to the dataset root",
          nullable=False),
    field("sha256", pa.string(), "sha256 of the source file bytes"),
    field("jpeg_sha256", pa.string(), "sha256 of the stored KEY.jpg bytes"),
    field("jpeg_reencoded", pa.bool_(), "false when KEY.jpg is the source bytes, true when "
          "it is a re-encode (not a plain JPEG, EXIF rotation, CMYK, ...)"),
    field("width", pa.int32(), "stored image width in pixels"),
    field("height", pa.int32(), "stored image height in pixels"),
    field("label", pa.int32(), "class index for class-folder datasets, else null"),
    field("num_boxes", pa.int32(), "proposals in KEY.boxes"),
    field("filter_rule", pa.string(), "rule that produced the boxes (see proposals table)"),
    field("num_segments", pa.int32(), "FH segments in KEY.fh.png"),
    field("num_masks", pa.int32(), "MCG-style masks (bits) in KEY.mcg.png"),
    field("has_gt", pa.bool_(), "KEY.gt.json is present"),
    field("resnet_distance_mean", pa.float32(), "audit statistic, copied from proposals"),
    field("resnet_distance_std", pa.float32(), "audit statistic, copied from proposals"),
    field("resnet_distance_pairs", pa.int32(), "audit statistic, copied from proposals"),
    field("stats_meaningful", pa.bool_(), "audit: false when computed with random weights"),
])

# manifest.json carries this under "schema_version"; same MAJOR.MINOR rules as the tables.
MANIFEST_VERSION = "1.1"  # 1.1: per-member crc32, label maps stored at their own bit depth
MANIFEST_REQUIRED = ("schema_version", "dataset", "num_samples", "shards", "packing",
                     "preprocessing", "packages")


def check_manifest(manifest: dict, source: str) -> dict:
    """Refuse a manifest of another major version or one missing required keys."""
    if not isinstance(manifest, dict):
        raise SchemaError(f"{source}: manifest must be a JSON object; rebuild with make shards")
    version = manifest.get("schema_version")
    if not isinstance(version, str):
        raise SchemaError(f"{source}: no schema_version; it was not written by this pipeline. "
                          "Rebuild the shards with make shards.")
    major, ours = int(version.split(".")[0]), int(MANIFEST_VERSION.split(".")[0])
    if major > ours:
        raise SchemaError(f"{source}: manifest schema version {version} is newer than the "
                          f"{MANIFEST_VERSION} this code reads (major {major} > {ours}). "
                          "Upgrade this package, or rebuild the shards with this version.")
    if major < ours:
        raise SchemaError(f"{source}: manifest schema version {version} is older than "
                          f"{MANIFEST_VERSION}. Rebuild the shards with make shards.")
    missing = [k for k in MANIFEST_REQUIRED if k not in manifest]
    if missing:
        raise SchemaError(f"{source}: manifest lacks {missing}; rebuild with make shards")
    return manifest
