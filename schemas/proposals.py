"""The per-image table written by the preprocessing Ray job (one row per input image).

Coordinates: boxes are float32 x1,y1,x2,y2 in pixels of the stored (EXIF-oriented)
image, half-open, origin top-left. Label maps are PNG bytes of that same image size.
"""
from __future__ import annotations

import pyarrow as pa

from schemas import field, make_table_schema

BOX = pa.list_(pa.float32(), 4)

PROPOSALS = make_table_schema("proposals", "1.0", [
    field("key", pa.string(), "sample key, unique in the dataset (common.keys)", nullable=False),
    field("source_path", pa.string(), "image path relative to the dataset root", nullable=False),
    field("sha256", pa.string(), "sha256 of the source file bytes (null if unreadable)"),
    field("status", pa.string(), "'ok' or 'failed'", nullable=False),
    field("error", pa.string(), "why the image failed (null when ok)"),
    field("label", pa.int32(), "class index for class-folder datasets (imagenet), else null"),
    field("width", pa.int32(), "stored image width in pixels (after EXIF orientation)"),
    field("height", pa.int32(), "stored image height in pixels"),
    field("boxes", pa.list_(BOX), "selective-search proposals after the filter, "
          "x1,y1,x2,y2 float32 pixels, half-open, in a fixed pseudo-random order (OpenCV's "
          "own order is random per run; see preprocess.proposals.deterministic_order), "
          "exact duplicates dropped, at most max_boxes; at least one box"),
    field("num_boxes", pa.int32(), "number of proposals kept"),
    field("filter_rule", pa.string(), "rule that produced the boxes: soco, ratio_only, "
          "size_only or whole_image"),
    field("fh_png", pa.binary(), "Felzenszwalb-Huttenlocher segment label map, PNG, "
          "ids 0..n-1 in raster order; 8-bit when ids <= 255, else 16-bit (never wraps)"),
    field("num_segments", pa.int32(), "number of FH segments"),
    field("mcg_png", pa.binary(), "MCG-style masks (our multiscale grouping, not MCG; preprocess.mcg) as a 16-bit PNG bitfield: bit i of a "
          "pixel is set when mask i covers it; masks ranked best first"),
    field("num_masks", pa.int32(), "number of MCG-style masks (<= 16)"),
    field("mask_scores", pa.list_(pa.float32()), "ranking score of each MCG-style mask"),
    field("gt_json", pa.string(), "ground truth as JSON {width, height, annotations: "
          "[COCO annotation + category_name]}: bbox xywh, segmentation, iscrowd, all in "
          "stored-image pixels (moved through EXIF orientation); null when the dataset has none"),
    field("gt_png", pa.binary(), "ground-truth instance label map, 16-bit PNG, 0 = none, "
          "i = i-th annotation of gt_json (1-based; later annotations win where masks "
          "overlap); null when no annotation has a mask"),
    field("resnet_distance_mean", pa.float32(), "audit: mean ResNet distance over the "
          "view pairs (filled by the stats step)"),
    field("resnet_distance_std", pa.float32(), "audit: std of the ResNet distance"),
    field("resnet_distance_pairs", pa.int32(), "audit: number of view pairs"),
    field("stats_meaningful", pa.bool_(), "audit: false when computed with random weights"),
    field("elapsed_ms", pa.float32(), "processing time of this image"),
])
