"""Which samples each rank and loader worker reads, in which order, every epoch.

One seeded permutation of all samples per epoch is laid out in global batches;
rank r takes global batches r, r+W, r+2W, ... so every rank gets the same number of
steps. When the sample count does not fill the last round of batches, the slots
wrap around to the start of the same permutation (like DistributedSampler's padding):
every sample is read at least once per epoch, and the `slot` numbers of the wrapped
copies are >= the sample count, so they can be told apart. Within a rank, worker w of
N reads batches w, w+N, ... and batches come back in batch order. A position is
just (epoch, batches already consumed), so resuming needs no other state."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    num_samples: int
    batch_size: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.num_samples <= 0:
            raise ValueError("no samples to split: the shards folder holds no samples")
        if self.batch_size <= 0 or self.world_size <= 0:
            raise ValueError("batch_size and world_size must be positive")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")

    @property
    def steps(self) -> int:
        """Batches per epoch on every rank."""
        return math.ceil(self.num_samples / (self.batch_size * self.world_size))

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of sample indices (same on every rank)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def batches(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """This rank's batches as (sample indices, global slots); slot >= num_samples marks
        a wrapped copy. A sample's augmentation is seeded by (seed, epoch, slot)."""
        per_round = self.batch_size * self.world_size
        total = self.steps * per_round
        slots = np.arange(total).reshape(self.steps, self.world_size, self.batch_size)[:, self.rank]
        samples = np.resize(self.order(epoch), total)[slots]
        return list(zip(samples, slots))


def worker_batches(batches: list, num_workers: int, worker: int) -> list:
    """Batches that loader worker `worker` of `num_workers` produces (round robin)."""
    return batches[worker::max(num_workers, 1)]
