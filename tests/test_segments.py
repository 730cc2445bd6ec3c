"""FH segments: ids in raster order, label maps never wrap, and the downscaled path agrees
with full resolution."""
from __future__ import annotations

import numpy as np
import pytest

from shards.format import decode_label_png
from preprocess.segments import (SegmentParams, encode_label_png, fh_segments,
                                 relabel_in_order)


def quadrants(h: int, w: int) -> np.ndarray:
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[: h // 2, : w // 2] = (230, 20, 20)
    rgb[: h // 2, w // 2:] = (20, 230, 20)
    rgb[h // 2:, : w // 2] = (20, 20, 230)
    rgb[h // 2:, w // 2:] = (230, 230, 20)
    return rgb


def test_ids_are_contiguous_in_raster_order():
    labels = relabel_in_order(np.array([[7, 7, 3], [3, 9, 9], [1, 1, 1]]))
    np.testing.assert_array_equal(labels, [[0, 0, 1], [1, 2, 2], [3, 3, 3]])


def test_flat_regions_become_one_segment_each():
    rgb = quadrants(200, 240)
    labels = fh_segments(rgb, SegmentParams(scale=1000, sigma=0.8, min_size=1000))
    assert labels.shape == (200, 240)
    assert labels.max() + 1 == 4
    for y, x in ((50, 60), (50, 180), (150, 60), (150, 180)):  # each quadrant is uniform
        quadrant = labels[(y // 100) * 100:(y // 100) * 100 + 100, (x // 120) * 120:(x // 120) * 120 + 120]
        assert (quadrant == labels[y, x]).mean() > 0.97


def pair_agreement(a: np.ndarray, b: np.ndarray, n: int = 20000) -> float:
    """Fraction of random pixel pairs on which two label maps agree about same/different segment."""
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, a.size, n), rng.integers(0, a.size, n)
    a, b = a.ravel(), b.ravel()
    return float(((a[i] == a[j]) == (b[i] == b[j])).mean())


def test_downscaled_segmentation_agrees_with_full_resolution(sample_raw):
    """On a half-size copy (min_size and sigma scaled) the segments still match full resolution."""
    from preprocess.datasets import list_images
    from preprocess.decode import load_rgb
    agreements = []
    for record in list_images("sample", sample_raw)[:6]:
        rgb = load_rgb(record.path)
        full = fh_segments(rgb, SegmentParams(scale=300, min_size=300, max_side=0))
        half = fh_segments(rgb, SegmentParams(scale=300, min_size=300, max_side=max(rgb.shape[:2]) // 2))
        assert half.shape == full.shape == rgb.shape[:2]
        agreements.append(pair_agreement(full, half))
    assert np.mean(agreements) > 0.85, agreements


def test_many_segments_switch_to_16_bit_and_never_wrap():
    rng = np.random.default_rng(0)
    cells = rng.integers(0, 256, size=(18, 20, 3), dtype=np.uint8)  # 360 distinct flat cells
    rgb = np.kron(cells, np.ones((6, 6, 1), np.uint8))
    labels = fh_segments(rgb, SegmentParams(scale=1, sigma=0, min_size=1))
    assert labels.max() > 255
    png = encode_label_png(labels)
    assert png[24] == 16  # PNG IHDR bit depth
    np.testing.assert_array_equal(decode_label_png(png), labels)


def test_few_segments_stay_8_bit():
    labels = np.arange(256, dtype=np.uint32).reshape(16, 16)
    png = encode_label_png(labels)
    assert png[24] == 8
    np.testing.assert_array_equal(decode_label_png(png), labels)


def test_ids_beyond_16_bit_are_refused():
    with pytest.raises(ValueError, match="16-bit"):
        encode_label_png(np.array([[0, 70000]], np.uint32))


def test_sample_images_give_a_label_per_pixel(sample_raw):
    from preprocess.datasets import list_images
    from preprocess.decode import load_rgb
    record = list_images("sample", sample_raw)[0]
    rgb = load_rgb(record.path)
    labels = fh_segments(rgb)
    assert labels.shape == rgb.shape[:2]
    assert set(np.unique(labels)) == set(range(int(labels.max()) + 1))
