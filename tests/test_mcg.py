"""MCG-style masks: at most 16, ranked by score, no near-duplicates, overlaps allowed, the
bitfield PNG round-trips, and the top masks find the sample's objects."""
from __future__ import annotations

import numpy as np
import pytest

from preprocess.datasets import annotation_mask, list_images
from preprocess.decode import load_rgb
from shards.format import MemberError, check_bitfield, decode_bitfield_png, decode_label_png
from preprocess.mcg import MaskParams, encode_bitfield_png, mask_iou, mcg_masks


@pytest.fixture(scope="module")
def sample_masks(sample_raw):
    """(record, rgb, masks, scores) for every sample image, computed once."""
    out = []
    for record in list_images("sample", sample_raw):
        rgb = load_rgb(record.path)
        masks, scores = mcg_masks(rgb)
        out.append((record, rgb, masks, scores))
    return out


def test_count_ranking_and_no_near_duplicates(sample_masks):
    p = MaskParams()
    for record, rgb, masks, scores in sample_masks:
        assert 1 <= len(masks) <= 16 and len(scores) == len(masks)
        assert masks.shape[1:] == rgb.shape[:2] and masks.dtype == bool
        assert np.all(np.diff(scores) <= 0), "masks must be ranked best first"
        for i in range(len(masks)):
            assert masks[i].any()
            for j in range(i):
                assert mask_iou(masks[i], masks[j]) <= p.max_iou + 0.05  # small slack: IoU measured at work size


def test_masks_may_overlap(sample_masks):
    """Unlike a partition, a region and a merge containing it can both be kept."""
    overlapping = sum(any((m[i] & m[j]).any() for i in range(len(m)) for j in range(i))
                      for _, _, m, _ in sample_masks)
    assert overlapping >= len(sample_masks) // 2


def test_top_masks_cover_the_ground_truth_objects(sample_masks):
    best = []
    for record, rgb, masks, _ in sample_masks:
        H, W = rgb.shape[:2]
        for ann in record.gt:
            gt = annotation_mask(ann, H, W)
            if np.sqrt(gt.sum() / (W * H)) >= 0.2:
                best.append(max(mask_iou(gt, m) for m in masks))
    assert len(best) >= 8
    assert np.mean(best) >= 0.5, np.round(best, 2)


def test_a_salient_compact_object_ranks_first():
    yy, xx = np.mgrid[0:240, 0:320]
    disk = (yy - 110) ** 2 + (xx - 170) ** 2 < 60 ** 2
    rng = np.random.default_rng(0)
    rgb = np.clip(np.where(disk[..., None], [200, 40, 40], [70, 110, 70]) + rng.normal(0, 3, (240, 320, 3)),
                  0, 255).astype(np.uint8)
    masks, scores = mcg_masks(rgb)
    assert mask_iou(masks[0], disk) >= 0.85
    assert scores[0] > 0


def test_max_masks_is_respected_and_bounded():
    rgb = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    masks, _ = mcg_masks(rgb, MaskParams(max_masks=4))
    assert len(masks) <= 4
    with pytest.raises(ValueError, match="max_masks"):
        MaskParams(max_masks=17)


def test_bitfield_png_round_trips_16_masks():
    rng = np.random.default_rng(0)
    masks = rng.random((16, 20, 30)) > 0.5
    decoded = decode_bitfield_png(encode_bitfield_png(masks), 16)
    np.testing.assert_array_equal(decoded, masks)


def test_a_bitfield_with_bits_beyond_its_mask_count_is_refused():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 20, 30)) > 0.5
    bits = decode_label_png(encode_bitfield_png(masks))
    check_bitfield(bits, 3)
    check_bitfield(bits, 4)                      # a fourth, empty mask is allowed
    with pytest.raises(MemberError, match="sets bits of masks beyond the 2 the sample counts"):
        check_bitfield(bits, 2)
    with pytest.raises(MemberError, match="17 masks do not fit a 16-bit bitfield"):
        check_bitfield(bits, 17)


def test_tiny_images_do_not_crash():
    for size in (1, 16):
        masks, scores = mcg_masks(np.full((size, size, 3), 128, np.uint8))
        assert masks.shape[1:] == (size, size) and len(masks) == len(scores) <= 16
