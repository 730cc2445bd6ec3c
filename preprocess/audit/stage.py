"""The distance statistic as a Ray Data actor pool: inside the preprocessing job (a
preprocess.stages.Stage, chosen by `python -m preprocess.job --stats/--backbone`) and for
`make stats` (preprocess.audit.stats)."""
from __future__ import annotations

import dataclasses
import os

import pyarrow as pa

from preprocess.audit.backbones import Backbone, BackboneError, MissingWeightsError, resolve, weights_available
from preprocess.audit.distance import FeatureDistance, StatsConfig, add_stats
from preprocess.stages import Stage


class StatsActor:
    """Ray Data actor: builds the backbone once, then fills the stats columns batch by batch."""

    def __init__(self, root: str, cfg: dict, backbone: dict, threads: int | None = None,
                 prep_threads: int = 1):
        self.root, self.cfg, self.prep_threads = root, StatsConfig(**cfg), prep_threads
        self.model = FeatureDistance(backbone=Backbone(**backbone), threads=threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return add_stats(batch, self.root, self.model, self.cfg, self.prep_threads)


def stats_stage(ds, root: str | os.PathLike, cfg: StatsConfig, backbone: Backbone, *,
                cpu_share: float = 0.5, reserve_cpus: int = 1, batch_images: int = 8,
                actors: int | None = None):
    """Append the actor-pool stage to a ray.data.Dataset of proposals rows.

    With GPUs in the cluster: one actor per GPU, with up to 4 CPUs (half the CPUs per GPU)
    decoding and cropping so the GPU is not left waiting. Without: actors get `cpu_share`
    of the cluster's CPUs in total (at most 8 threads each), never all of them: an actor
    pool that takes every CPU starves the upstream read/map tasks and the job hangs
    silently (pipeline.md section 3)."""
    import ray
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        prep = max(1, min(4, cpus // gpus // 2))
        per_actor = {"num_gpus": 1, "num_cpus": prep}
        threads, size = None, actors or gpus
    else:
        prep = 1
        budget = max(1, min(int(cpus * cpu_share), cpus - reserve_cpus))
        threads = min(8, budget)
        size = actors or max(1, budget // threads)
        per_actor = {"num_cpus": threads}
    return ds.map_batches(
        StatsActor, batch_size=batch_images, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=size),
        fn_constructor_kwargs={"root": str(root), "cfg": dataclasses.asdict(cfg),
                               "backbone": dataclasses.asdict(backbone), "threads": threads,
                               "prep_threads": prep},
        **per_actor)


def job_stage(mode: str = "auto", weights: str | None = None, backbone: str | None = None,
              cfg: StatsConfig = StatsConfig()) -> Stage | None:
    """The distance stage for `python -m preprocess.job --stats MODE [--weights F]
    [--backbone SPEC]`, or None when it is off (--stats off; auto without torchvision's
    weights and without --backbone: `make stats` can add the columns later). Raises
    ValueError naming the flag when --stats on cannot find its network."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--stats must be auto, on or off, not {mode!r}")
    if mode == "off" or (mode == "auto" and not backbone and not weights_available(weights)):
        return None
    try:
        chosen = resolve(backbone, weights)
    except (MissingWeightsError, BackboneError) as e:  # a usage error of the job, said plainly
        raise ValueError(f"--stats {mode}: {e}") from e
    params = cfg.params(chosen)

    def apply(ds, config, num_cpus):
        return stats_stage(ds, config.root, cfg, chosen, cpu_share=0.5)
    return Stage("stats", apply, params, describe=f"distance statistic with {chosen.name}")
