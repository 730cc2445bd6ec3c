"""Streaming multi-view loader: shards -> per-method views with exact boxes and masks.

`build_loader(recipe, shards_dir, batch_size, ...)` (contract in docs/interfaces.md)
returns a `Loader`: `len()` = steps per epoch (equal on every rank), iteration yields
batch dicts of torch tensors, `set_epoch`, `state_dict` / `load_state_dict` for
mid-epoch resume. Modules: split (who reads what), source (shard index + reads),
recipes (per-method geometry plans), geometry (box arithmetic and samplers),
dali_pipeline (the fast backend), reference (torchvision backend and test oracle),
collate (batch assembly)."""
from __future__ import annotations

import os

from .recipes import DEFAULTS, Recipe
from .source import ShardReadError, ShardSource
from .split import Split

BACKENDS = ("dali", "reference")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class Loader:
    """One rank's loader. Every batch is a pure function of (seed, epoch, slot), so a
    position (epoch, batches consumed) is all the state a resume needs."""

    def __init__(self, recipe: Recipe, source: ShardSource, split: Split, backend: str,
                 num_workers: int, device_id: int | None, decode: str = "auto"):
        self.recipe, self.source, self.split = recipe, source, split
        self.backend, self.num_workers, self.device_id = backend, num_workers, device_id
        self.decode = decode
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return self.split.steps

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, unless a loaded state is already inside it."""
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        s = self.split
        return {"epoch": self.epoch, "position": self.position, "seed": s.seed,
                "num_samples": s.num_samples, "batch_size": s.batch_size,
                "world_size": s.world_size, "recipe": self.recipe.name}

    def load_state_dict(self, state: dict) -> None:
        s = self.split
        ours = {"seed": s.seed, "num_samples": s.num_samples, "batch_size": s.batch_size,
                "world_size": s.world_size, "recipe": self.recipe.name}
        differ = {k: (state.get(k), v) for k, v in ours.items() if state.get(k) != v}
        if differ:
            raise ValueError(f"loader state does not match this loader (saved, now): {differ}; "
                             "resume with the same shards, seed, batch size and world size, or "
                             "start a fresh epoch without loading the loader state")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self):
        batches = self.split.batches(self.epoch)[self.position:]
        if self.backend == "dali":
            from . import dali_pipeline
            it = dali_pipeline.iterate(self.recipe, self.source, batches, self.epoch,
                                       self.split.seed, self.split.batch_size,
                                       max(self.num_workers, 1), self.device_id, self.decode)
        else:
            from . import reference
            it = reference.iterate(self.recipe, self.source, batches, self.epoch,
                                   self.split.seed, self.num_workers)
        for batch in it:
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0


def build_loader(recipe: str, shards_dir: str | os.PathLike, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, num_workers: int = 1, seed: int = 0, backend: str = "dali",
                 image_size: int | None = None, device_id: int | None = None,
                 decode: str = "auto", **recipe_overrides) -> Loader:
    """The loader for `recipe` over the shards in `shards_dir` for one rank.

    backend "dali" falls back to "reference" (with a warning) when DALI is not installed.
    num_workers: DALI threads, or DataLoader processes for the reference (0 = inline).
    device_id: CUDA device for DALI's mixed decode and GPU ops; None picks the current
    CUDA device when torch sees one, else runs DALI on CPU.
    decode (DALI only): "auto" | "dali" | "feeder", see dali_pipeline.iterate."""
    if decode not in ("auto", "dali", "feeder"):
        raise ValueError(f"decode {decode!r} is not one of auto, dali, feeder")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    if backend == "dali" and not dali_available():
        import warnings
        warnings.warn("nvidia-dali is not installed: using the reference (torchvision) loader; "
                      "pip install nvidia-dali-cuda120 for the fast one")
        backend = "reference"
    if device_id is None and backend == "dali":
        import torch
        device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
    source = ShardSource(shards_dir)
    split = Split(len(source), batch_size, world_size, rank, seed)
    return Loader(Recipe(recipe, image_size, **recipe_overrides), source, split, backend,
                  num_workers, device_id, decode)


def __getattr__(name: str):
    if name == "RECIPES":  # read lazily: methods declare recipes, found on first use (no import circle)
        return tuple(sorted(DEFAULTS))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["build_loader", "Loader", "RECIPES", "ShardReadError"]
