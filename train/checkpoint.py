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


# ----------------------------------------------------------------------------- resume rules
# Keys a resume honours when they change (everything else is refused unless train.resume=force):
SCHEDULE_KEYS = ("train.steps", "train.epochs", "optim.base_lr", "optim.min_lr", "optim.warmup_epochs",
                 "optim.warmup_steps")      # the lr schedule is rebuilt for the new values (pretrain.py)
HYPER_KEYS = ("optim.weight_decay", "optim.momentum", "optim.trust", "optim.betas", "optim.eps",
              "optim.clip_grad")            # apply from the resumed step on; optimiser state kept
RUNTIME_KEYS = ("train.out", "train.device", "train.precision", "train.channels_last", "train.checkpoint_every",
                "train.log_every", "train.tensorboard", "train.resume", "data.num_workers", "data.prefetch",
                "data.backend", "data.max_bad_samples", "export.", "eval.", "debug.")


def flat(cfg: dict, prefix: str = "") -> dict:
    """{dotted key: value} of the leaves of a nested config."""
    out = {}
    for k, v in (cfg or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def _honoured(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k))
               for k in SCHEDULE_KEYS + HYPER_KEYS + RUNTIME_KEYS)


def config_changes(saved: dict, new: dict) -> tuple[dict, dict]:
    """(refused, honoured): {key: (saved value, new value)} between the checkpoint's resolved
    config and this run's. A key absent on one side counts as changed."""
    a, b = flat(saved), flat(new)
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    refused = {k: v for k, v in changed.items() if not _honoured(k)}
    return refused, {k: v for k, v in changed.items() if k not in refused}


def saved_config(out_dir: str | Path) -> dict | None:
    """The resolved config saved beside last.pt (None if missing)."""
    import yaml
    path = checkpoint_dir(out_dir) / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def refusal_message(out_dir, step: int, refused: dict) -> str:
    lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
    return (f"cannot resume {checkpoint_dir(out_dir) / LAST} (step {step}) with this config: "
            f"{len(refused)} key(s) changed that a resumed run cannot honour:\n{lines}\n"
            "Start fresh with a new train.out (e.g. train.out=<new folder>), put the keys back, "
            "or pass train.resume=force to load the checkpoint anyway (its weights must still fit the model).")
