"""The built-in sample: deterministic bytes, exact ground truth, scene vs object-centric, and
dataset listing for every layout (keys unique and safe)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from common.io import sha256_file
from common.keys import KEY_PATTERN
from preprocess.datasets import DatasetError, annotation_mask, list_images
from preprocess.sample import generate, rle_encode


def tree_hashes(root):
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_image_independent_of_count(tmp_path):
    a = generate(tmp_path / "a", n_scene=2, n_object=1, seed=3, min_side=64, max_side=96)
    b = generate(tmp_path / "b", n_scene=2, n_object=1, seed=3, min_side=64, max_side=96)
    c = generate(tmp_path / "c", n_scene=1, n_object=0, seed=3, min_side=64, max_side=96)
    d = generate(tmp_path / "d", n_scene=2, n_object=1, seed=4, min_side=64, max_side=96)
    assert tree_hashes(a) == tree_hashes(b)
    assert tree_hashes(c)["images/000000000001.jpg"] == tree_hashes(a)["images/000000000001.jpg"]
    assert tree_hashes(d)["images/000000000001.jpg"] != tree_hashes(a)["images/000000000001.jpg"]


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 5)) > 0.5, np.ones((3, 4), bool), np.zeros((2, 2), bool)):
        ann = {"segmentation": rle_encode(mask)}
        np.testing.assert_array_equal(annotation_mask(ann, *mask.shape), mask)


def test_ground_truth_is_exact_and_visible_masks_disjoint(sample_raw):
    doc = json.loads((sample_raw / "annotations" / "instances_sample.json").read_text())
    records = list_images("sample", sample_raw)
    assert [r.key for r in records] == sorted(r.key for r in records) and len(records) == 14
    subsets = {im["id"]: im["subset"] for im in doc["images"]}
    for record in records:
        w, h = Image.open(record.path).size
        assert record.gt_size == (w, h)
        covered = np.zeros((h, w), bool)
        for ann in record.gt:
            mask = annotation_mask(ann, h, w)
            ys, xs = np.nonzero(mask)
            assert ann["area"] == mask.sum() > 0
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert not (covered & mask).any(), "visible parts of shapes must not overlap"
            covered |= mask
            assert ann["category_name"] in {"ellipse", "rectangle", "triangle", "star"}
        n = len(record.gt)
        if subsets[int(record.key)] == "object":
            assert n == 1 and np.sqrt(record.gt[0]["area"] / (w * h)) >= 0.3
    scene_counts = [len(r.gt) for r in records if subsets[int(r.key)] == "scene"]
    assert np.mean(scene_counts) >= 2.5 and max(scene_counts) >= 4


def test_shapes_are_visible_in_the_pixels(sample_raw):
    """GT masks mark real image content: the colour inside differs from just outside."""
    import cv2
    record = list_images("sample", sample_raw)[0]
    rgb = np.asarray(Image.open(record.path).convert("RGB"), np.float32)
    for ann in record.gt:
        mask = annotation_mask(ann, *rgb.shape[:2])
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~mask
        if ring.sum() > 20 and mask.sum() > 200:
            assert np.abs(rgb[mask].mean(0) - rgb[ring].mean(0)).max() > 10


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one image"):
        generate(tmp_path, n_scene=0, n_object=0)
    with pytest.raises(ValueError, match="min_side"):
        generate(tmp_path, n_scene=1, n_object=0, min_side=100, max_side=50)


def make_tree(root, names):
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".txt":
            p.write_text("not an image")
        else:
            Image.new("RGB", (8, 8), (10, 20, 30)).save(p)


def test_folder_and_imagenet_listing(tmp_path):
    names = ["cat/a.jpg", "cat/b.png", "dog/a.jpg", "dog/sub/ü ber.webp", "dog/x.TIFF", "dog/note.txt"]
    make_tree(tmp_path / "tree", names)
    folder = list_images("folder", tmp_path / "tree")
    assert len(folder) == 5  # note.txt is not an image
    assert len({r.key for r in folder}) == 5  # equal basenames a.jpg in two folders stay distinct
    assert all(KEY_PATTERN.match(r.key) for r in folder)
    assert {r.relpath for r in folder} == set(names[:-1])
    imagenet = list_images("imagenet", tmp_path / "tree")
    labels = {r.relpath: r.label for r in imagenet}
    assert labels["cat/a.jpg"] == labels["cat/b.png"] == 0 and labels["dog/a.jpg"] == labels["dog/x.TIFF"] == 1
    with pytest.raises(DatasetError, match="unset SPLIT"):
        list_images("imagenet", tmp_path / "tree", "train")


def test_coco_listing_with_and_without_annotations(tmp_path, sample_raw):
    import shutil
    root = tmp_path / "coco"
    shutil.copytree(sample_raw / "images", root / "images" / "val2017")
    shutil.copytree(sample_raw / "images", root / "unlabeled2017")
    (root / "annotations").mkdir()
    shutil.copy(sample_raw / "annotations" / "instances_sample.json", root / "annotations" / "instances_val2017.json")
    labelled = list_images("coco", root, "val2017")
    unlabelled = list_images("coco", root, "unlabeled2017")
    assert [r.key for r in labelled] == [r.key for r in unlabelled] == [r.key for r in list_images("sample", sample_raw)]
    assert all(r.gt is not None for r in labelled) and all(r.gt is None for r in unlabelled)
    with pytest.raises(DatasetError, match="SPLIT"):
        list_images("coco", root, "train2017")


def test_coco128_listing(coco128_root):
    records = list_images("coco", coco128_root, "train2017")
    assert len(records) == 128
    assert sum(len(r.gt) for r in records) == 939
    assert all(r.gt_size is not None for r in records)


def test_missing_roots_name_the_fix(tmp_path):
    with pytest.raises(DatasetError, match="not a folder"):
        list_images("folder", tmp_path / "nope")
    with pytest.raises(DatasetError, match="preprocess.sample"):
        list_images("sample", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset kind"):
        list_images("laion", tmp_path)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_ground_truth_follows_exif_orientation_like_the_pixels(orientation):
    """Boxes mapped with orient_points land where PIL's transposition puts the mask's pixels."""
    from preprocess.datasets import gt_in_stored_frame, orient_mask
    mask = np.zeros((30, 50), bool)
    mask[4:12, 7:20] = True
    ann = {"id": 1, "bbox": [7, 4, 13, 8], "segmentation": rle_encode(mask), "category_id": 1}
    anns, label_map = gt_in_stored_frame([ann], (50, 30), (50, 30), orientation)
    moved = orient_mask(mask, orientation)
    ys, xs = np.nonzero(moved)
    assert anns[0]["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
    np.testing.assert_array_equal(label_map == 1, moved)
    np.testing.assert_array_equal(annotation_mask(anns[0], *moved.shape), moved)


def test_ground_truth_for_another_image_size_is_refused():
    from preprocess.datasets import gt_in_stored_frame
    with pytest.raises(DatasetError, match="does not match"):
        gt_in_stored_frame([], (640, 480), (320, 240), 1)
