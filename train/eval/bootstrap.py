"""95% percentile bootstrap confidence intervals over test items.

`accuracy_ci` resamples the test items with replacement B times; `paired_diff_ci` draws
the SAME resampled items for both networks, so the interval on the difference accounts
for their correlation. Fixed seed, B = 1000: the same inputs give the same interval."""
from __future__ import annotations

import numpy as np

BOOT = 1000
SEED = 0


def _indices(n: int, boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(boot, n))


def accuracy_ci(correct, boot: int = BOOT, seed: int = SEED, level: float = 0.95) -> dict:
    """{"acc", "lo", "hi", "n"} of a boolean vector of per-item correctness."""
    c = np.asarray(correct, np.float64)
    if c.size == 0:
        return dict(acc=float("nan"), lo=float("nan"), hi=float("nan"), n=0)
    means = c[_indices(c.size, boot, seed)].mean(1)
    a = (1 - level) / 2
    return dict(acc=float(c.mean()), lo=float(np.quantile(means, a)),
                hi=float(np.quantile(means, 1 - a)), n=int(c.size))


def paired_diff_ci(correct_a, correct_b, boot: int = BOOT, seed: int = SEED, level: float = 0.95) -> dict:
    """{"diff", "lo", "hi", "n"} of acc(a) - acc(b) over the same test items."""
    a_, b_ = np.asarray(correct_a, np.float64), np.asarray(correct_b, np.float64)
    if a_.shape != b_.shape:
        raise ValueError(f"paired bootstrap needs the same test items, got {a_.shape} and {b_.shape}")
    d = a_ - b_
    if d.size == 0:
        return dict(diff=float("nan"), lo=float("nan"), hi=float("nan"), n=0)
    means = d[_indices(d.size, boot, seed)].mean(1)
    a = (1 - level) / 2
    return dict(diff=float(d.mean()), lo=float(np.quantile(means, a)),
                hi=float(np.quantile(means, 1 - a)), n=int(d.size))
