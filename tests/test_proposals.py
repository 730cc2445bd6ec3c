"""Selective-search proposals: SoCo's filter exact at its edges, fallbacks, coordinate mapping
through the downscaled copy, and recall on the built-in sample's ground truth."""
from __future__ import annotations

import numpy as np
import pytest

from preprocess.datasets import list_images
from preprocess.decode import load_rgb
from preprocess.proposals import (ProposalParams, box_iou, filter_boxes, map_boxes, propose,
                                  recall, resized_size, selective_search, unique_in_order)

P = ProposalParams()


def kept(box, width, height, p=P):
    boxes, rule = filter_boxes(np.array([box], np.float32), width, height, p)
    return rule == "soco"


@pytest.mark.parametrize("box,size,expected", [
    ([0, 0, 60, 60], (200, 200), True),          # sqrt(wh/WH) = 0.3 exactly: kept
    ([0, 0, 60, 59.75], (200, 200), False),      # just below 0.3
    ([0, 0, 80, 80], (100, 100), True),          # 0.8 exactly: kept
    ([0, 0, 80, 80.25], (100, 100), False),      # just above 0.8
    ([0, 0, 32, 96], (160, 160), True),          # w/h = 1/3 exactly, w = 32 exactly
    ([0, 0, 32, 96.25], (160, 160), False),      # w/h just below 1/3
    ([0, 0, 96, 32], (160, 160), True),          # w/h = 3 exactly
    ([0, 0, 96.25, 32], (160, 160), False),      # just above 3
    ([0, 0, 31.75, 40], (100, 100), False),      # w just under 32 px
])
def test_soco_filter_is_exact_at_its_edges(box, size, expected):
    assert kept(box, *size) is expected


def test_fallbacks_in_soco_order():
    W = H = 1000
    too_small_scale = [0, 0, 100, 100]       # ratio ok, scale 0.1 < 0.3
    too_elongated = [0, 0, 500, 100]         # size ok, ratio 5
    tiny = [0, 0, 10, 10]                    # fails even the 32 px minimum
    good = [0, 0, 500, 500]
    cases = [([too_elongated, too_small_scale, good], "soco", [good]),
             ([too_elongated, too_small_scale], "ratio_only", [too_small_scale]),
             ([too_elongated, tiny], "size_only", [too_elongated]),
             ([tiny], "whole_image", [[0, 0, W, H]]),
             ([], "whole_image", [[0, 0, W, H]])]
    for boxes, rule, expected in cases:
        out, got_rule = filter_boxes(np.array(boxes, np.float32).reshape(-1, 4), W, H, P)
        assert got_rule == rule
        np.testing.assert_array_equal(out, np.array(expected, np.float32))


def test_duplicates_dropped_order_kept_and_capped():
    a, b, c = [10, 10, 300, 300], [20, 20, 330, 300], [5, 5, 310, 320]
    boxes = np.array([b, a, b, c, a], np.float32)
    np.testing.assert_array_equal(unique_in_order(boxes), np.array([b, a, c], np.float32))
    out, rule = filter_boxes(boxes, 500, 500, ProposalParams(max_boxes=2))
    assert rule == "soco"
    np.testing.assert_array_equal(out, np.array([b, a], np.float32))


def test_box_mapping_round_trips_through_the_downscaled_size():
    width, height = 1001, 667
    small = resized_size(width, height, 300)
    assert max(small) == 300
    rng = np.random.default_rng(0)
    xy = np.sort(rng.integers(0, small[0], size=(50, 2)), axis=1)
    yy = np.sort(rng.integers(0, small[1], size=(50, 2)), axis=1)
    boxes_small = np.stack([xy[:, 0], yy[:, 0], xy[:, 1], yy[:, 1]], 1).astype(np.float32)
    there = map_boxes(boxes_small, small, (width, height))
    back = map_boxes(there, (width, height), small)
    np.testing.assert_allclose(back, boxes_small, atol=1e-3)
    # the small image's far edges land exactly on the original's
    edge = map_boxes(np.array([[0, 0, small[0], small[1]]], np.float32), small, (width, height))
    np.testing.assert_array_equal(edge, [[0, 0, width, height]])


@pytest.mark.parametrize("max_side", [0, 100])
def test_search_on_downscaled_copy_finds_object_in_original_pixels(max_side):
    rng = np.random.default_rng(1)
    rgb = np.full((300, 400, 3), 90, np.uint8) + rng.integers(0, 6, (300, 400, 3), dtype=np.uint8)
    rgb[80:200, 100:260] = (220, 30, 30)
    boxes = selective_search(rgb, "fast", max_side)
    assert boxes.dtype == np.float32 and len(boxes) > 0
    assert boxes[:, [0, 2]].max() <= 400 and boxes[:, [1, 3]].max() <= 300 and boxes.min() >= 0
    assert box_iou(np.array([[100, 80, 260, 200]]), boxes).max() >= 0.9


def test_tiny_images_get_the_whole_image_box():
    for size in (1, 16):
        boxes, rule, _ = propose(np.zeros((size, size, 3), np.uint8))
        assert rule == "whole_image"
        np.testing.assert_array_equal(boxes, [[0, 0, size, size]])


def test_recall_of_large_ground_truth_on_the_sample(sample_raw):
    """SoCo-sized GT boxes (sqrt(wh/WH) >= 0.3) are found at IoU >= 0.5 after the filter."""
    hit = total = 0
    for record in list_images("sample", sample_raw):
        rgb = load_rgb(record.path)
        H, W = rgb.shape[:2]
        gt = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                       for a in record.gt], np.float64)
        large = gt[np.sqrt((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]) / (W * H)) >= 0.3]
        boxes, rule, _ = propose(rgb)
        assert rule in ("soco", "ratio_only", "size_only", "whole_image") and len(boxes) >= 1
        h, t = recall(boxes, large)
        hit, total = hit + h, total + t
    assert total >= 5, "the sample should hold several SoCo-sized objects"
    assert hit / total >= 0.8, f"recall {hit}/{total}"


def test_reruns_give_identical_boxes(sample_raw):
    """OpenCV's own order is random run to run; ours must not be (resume relies on it)."""
    rgb = load_rgb(list_images("sample", sample_raw)[2].path)
    first = selective_search(rgb)
    for _ in range(2):
        np.testing.assert_array_equal(selective_search(rgb), first)
