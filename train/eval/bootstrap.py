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


def _ci(values: np.ndarray, boot: int, seed: int, level: float) -> tuple[float, float, float]:
    """(mean, lo, hi) of the percentile bootstrap of a per-item vector's mean."""
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    means = values[_indices(values.size, boot, seed)].mean(1)
    a = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def accuracy_ci(correct, boot: int = BOOT, seed: int = SEED, level: float = 0.95) -> dict:
    """{"acc", "lo", "hi", "n"} of a boolean vector of per-item correctness."""
    c = np.asarray(correct, np.float64)
    acc, lo, hi = _ci(c, boot, seed, level)
    return dict(acc=acc, lo=lo, hi=hi, n=int(c.size))


def paired_diff_ci(correct_a, correct_b, boot: int = BOOT, seed: int = SEED, level: float = 0.95) -> dict:
    """{"diff", "lo", "hi", "n"} of acc(a) - acc(b) over the same test items."""
    a_, b_ = np.asarray(correct_a, np.float64), np.asarray(correct_b, np.float64)
    if a_.shape != b_.shape:
        raise ValueError(f"paired bootstrap needs the same test items, got {a_.shape} and {b_.shape}")
    diff, lo, hi = _ci(a_ - b_, boot, seed, level)
    return dict(diff=diff, lo=lo, hi=hi, n=int(a_.size))
