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


@pytest.fixture(scope="session")
def sample_shards(sample_parts, tmp_path_factory) -> Path:
    """Shards folder of the built-in sample: `<ds>-NNNNNN.tar` + `.idx`, `index.parquet`,
    `manifest.json`, packed by shards.write with at most 4 samples a shard (several shards).
    Built from `sample_parts` (the real preprocessing job, 14 images, all ok), so it holds
    14 samples in 4 shards. Read-only: copy it before modifying.
    Open with `shards.reader.ShardDataset(path)`."""
    from common.paths import proposals_dir
    from shards.write import PackParams, write_shards
    work, dataset = sample_parts
    out = tmp_path_factory.mktemp("sample_shards") / "shards"
    write_shards(dataset, PackParams(max_samples=4), proposals=proposals_dir(dataset, work), out=out)
    return out


@pytest.fixture(scope="session")
def sample_parts(sample_raw, tmp_path_factory) -> tuple[Path, str]:
    """Runs the preprocessing Ray job (preprocess.job, default parameters, 4 images a part)
    on `sample_raw` once per session; returns (work_dir, dataset_name). The parts are at
    `common.paths.proposals_dir(dataset_name, work_dir)` (PROPOSALS schema, 14 rows, all
    'ok', with gt_json/gt_png); the raw images at `sample_raw`. Read-only: copy to modify.
    No stages (the distance statistic is off), so the suite behaves the same where ResNet-50
    weights are cached."""
    from preprocess.job import JobConfig, run
    work = tmp_path_factory.mktemp("sample_work")
    run(JobConfig(dataset="sample", root=str(sample_raw), work_dir=str(work), part_size=4, num_cpus=2))
    return work, "sample"
