"""Rank-0 training metrics: a progress line on stderr (also appended to
<out>/train.log), <out>/metrics.jsonl and TensorBoard (<out>/tb). Other ranks construct it too and do nothing, so the
trainer needs no `if rank == 0` around logging.

On resume, JSONL records past the resumed step (written by the attempt that died
after its last checkpoint) are dropped, so the file shows one continuous run, and
a `{"event": "resume"}` record notes where and why."""
from __future__ import annotations

import json
import time
from pathlib import Path

from common.io import atomic_write_text
from common.progress import Progress, format_duration


class Metrics:
    def __init__(self, out_dir: str | Path, total_steps: int, images_per_step: int,
                 start_step: int = 0, enabled: bool = True, log_every: int = 10,
                 tensorboard: bool = True):
        self.enabled, self.log_every, self.images_per_step = enabled, max(1, log_every), images_per_step
        self.out = Path(out_dir)
        self.path = self.out / "metrics.jsonl"
        # Progress counts this attempt's steps, so rate and ETA stay right after a resume.
        self.progress = Progress("pretrain", total_steps - start_step, unit="step", every_s=float("inf"))
        self.total_steps = total_steps
        self._window = dict(steps=0, time=0.0, wait=0.0)
        self.totals = dict(steps=0, time=0.0, wait=0.0)
        self.tb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._log = open(self.out / "train.log", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tb"), purge_step=start_step + 1 if start_step else None)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def say(self, line: str) -> None:
        """A human-readable line: stderr and train.log (rank 0 only)."""
        if self.enabled:
            print(line, file=self.progress.stream, flush=True)
            self._log.write(line + "\n")
            self._log.flush()

    def event(self, name: str, **fields) -> None:
        if self.enabled:
            self._write(dict(event=name, time=time.time(), **fields))

    def _write(self, rec: dict) -> None:
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()

    def record(self, step: int, group: str, **values) -> None:
        """A non-step record (e.g. `group="eval"`): one metrics.jsonl line
        `{"event": group, "step": step, **values}` and TensorBoard scalars `group/<name>`."""
        if not self.enabled:
            return
        self._write(dict(event=group, step=step, time=time.time(), **values))
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{group}/{k}", v, step)

    def step(self, step: int, loss: float, lr: float, step_time: float, data_wait: float,
             extra: dict | None = None) -> None:
        """Record one optimiser step; `data_wait` is the part of `step_time` spent
        waiting for the loader."""
        for acc in (self._window, self.totals):
            acc["steps"] += 1
            acc["time"] += step_time
            acc["wait"] += data_wait
        self.progress.done += 1
        if not self.enabled:
            return
        rec = dict(step=step, loss=loss, lr=lr, step_time=step_time, data_wait=data_wait,
                   **(extra or {}))
        self._write(rec)
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if step % self.log_every == 0 or step == self.total_steps:
            w, p = self._window, self.progress
            ips = self.images_per_step * w["steps"] / w["time"] if w["time"] else 0.0
            wait = 100.0 * w["wait"] / w["time"] if w["time"] else 0.0
            eta = format_duration((p.total - p.done) / p.rate) if p.rate > 0 else "?"
            self.say(f"[pretrain] step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.3g} "
                     f"{ips:.1f} img/s data-wait {wait:.1f}% ETA {eta}")
            self._window = dict(steps=0, time=0.0, wait=0.0)

    def summary(self) -> dict:
        t = self.totals
        return dict(steps=t["steps"], seconds=t["time"],
                    images_per_s=self.images_per_step * t["steps"] / t["time"] if t["time"] else 0.0,
                    data_wait_share=t["wait"] / t["time"] if t["time"] else 0.0)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._log.close()
            if self.tb is not None:
                self.tb.close()
