"""Shared fixtures. coco128 tests skip cleanly, with a reason in the output, when
../shared/data/coco128 is absent (CI clones without it)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COCO128 = Path(os.environ.get("COCO128_ROOT", REPO.parent / "shared" / "data" / "coco128"))

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def coco128_root() -> Path:
    if not (COCO128 / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"coco128 not found at {COCO128} (../shared/data/coco128 absent): "
                    "real-photo test skipped; the built-in sample tests still ran")
    return COCO128


@pytest.fixture(scope="session")
def sample_raw(tmp_path_factory) -> Path:
    """Root of a small built-in sample (preprocess.sample, seed 0): 10 scene + 4 object-centric
    images, sides 128-192 px, COCO JSON at annotations/instances_sample.json. Read-only: copy
    it before modifying. Use `preprocess.datasets.list_images("sample", root)` to list it."""
    from preprocess.sample import generate
    return generate(tmp_path_factory.mktemp("sample_raw"), n_scene=10, n_object=4, seed=0,
                    min_side=128, max_side=192)
