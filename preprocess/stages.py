"""The contract between the preprocessing job and the steps it runs after the per-image
work: a `Stage` is handed to `preprocess.job.run(config, stages)`; the job knows nothing
else about it (the audit's distance stage is one, tests add others).

A stage maps the Ray dataset of PROPOSALS rows (plus the job's `_path` column, the absolute
source path) to another with the same rows: it may fill columns (e.g. resnet_distance_*)
but keeps one row per image and the key. `params`, when not None, is recorded in every part
the job writes, under `params[name]`, so a later step can tell how those columns were made.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Stage:
    name: str
    apply: Callable  # (ray.data.Dataset, JobConfig, num_cpus: int) -> ray.data.Dataset
    params: dict | None = None
    describe: str = ""  # one line for the job's log

    def __call__(self, ds, config, num_cpus: int):
        return self.apply(ds, config, num_cpus)
