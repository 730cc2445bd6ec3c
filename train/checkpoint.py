"""Checkpoints that survive kills: <out>/checkpoints/last.pt written atomically
(temp file + fsync + rename, common.io) by rank 0, with the resolved config beside
it as config.yaml. A run always resumes from last.pt when it exists, which is what
`torchrun --max-restarts` needs: restarted workers get the same arguments.

Everything stored is tensors, numbers, strings, lists and dicts, so it loads with
torch.load(weights_only=True) (no pickled code runs on load)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from common.io import atomic_open, remove_stale_temporaries
from train.config import save_config

LAST = "last.pt"


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def rng_state() -> dict:
    """This process's RNG states in weights_only-loadable form."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = dict(
        torch=torch.get_rng_state(),
        numpy=dict(keys=torch.from_numpy(np_state[1].astype(np.int64)), pos=int(np_state[2]),
                   has_gauss=int(np_state[3]), gauss=float(np_state[4])),
        python=dict(version=py_version, internal=list(py_internal), gauss=py_gauss),
    )
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out_dir: str | Path, state: dict, cfg: dict, keep_step_copy: bool = False) -> Path:
    """Write last.pt (and step-NNNNNNN.pt when `keep_step_copy`) plus config.yaml."""
    folder = checkpoint_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    path = folder / LAST
    with atomic_open(path) as f:
        torch.save(state, f)
    if keep_step_copy:
        with atomic_open(folder / f"step-{state['step']:07d}.pt") as f:
            torch.save(state, f)
    return path


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated copy, foreign file, or unsafe content
        raise RuntimeError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {e}. Our checkpoints are "
            "written atomically, so this file was changed or copied partially; restore it, or "
            "move it away to start the run from scratch") from None


def load_latest(out_dir: str | Path) -> dict | None:
    """The state in <out>/checkpoints/last.pt, or None for a fresh run."""
    folder = checkpoint_dir(out_dir)
    remove_stale_temporaries(folder)  # leftovers of a save killed mid-write
    path = folder / LAST
    return load(path) if path.is_file() else None
