"""Where each stage reads and writes: WORK_DIR/<dataset>/{proposals,shards}, WORK_DIR/report."""
from __future__ import annotations

import os
from pathlib import Path


def work_dir(override: str | os.PathLike | None = None) -> Path:
    return Path(override or os.environ.get("WORK_DIR") or "work")


def dataset_dir(dataset: str, override: str | os.PathLike | None = None) -> Path:
    return work_dir(override) / dataset


def proposals_dir(dataset: str, override=None) -> Path:
    return dataset_dir(dataset, override) / "proposals"


def shards_dir(dataset: str, override=None) -> Path:
    return dataset_dir(dataset, override) / "shards"


def report_dir(name: str, override=None) -> Path:
    return work_dir(override) / "report" / name
