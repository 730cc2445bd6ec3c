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
