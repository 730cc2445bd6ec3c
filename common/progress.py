"""Progress lines (done/total, rate, ETA) and closing summaries for long work.

One class so the Ray job, the shard writer, the stats pass and the trainer all
report the same way. Prints at most every `every_s` seconds to stderr."""
from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    def __init__(self, label: str, total: int | None, unit: str = "img", every_s: float = 2.0, stream=None):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last_print = 0.0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        if self.total:
            left = max(self.total - self.done, 0)
            eta = format_duration(left / rate) if rate > 0 else "?"
            pct = 100.0 * self.done / self.total
            return (f"[{self.label}] {self.done}/{self.total} ({pct:.0f}%) "
                    f"{rate:.2f} {self.unit}/s ETA {eta}")
        return f"[{self.label}] {self.done} {self.unit} {rate:.2f} {self.unit}/s"

    def update(self, n: int = 1, force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        if force or now - self._last_print >= self.every_s or (self.total and self.done >= self.total):
            self._last_print = now
            print(self.line(), file=self.stream, flush=True)
