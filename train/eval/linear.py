"""Linear probe: multinomial logistic regression on standardised features.

Fixed recipe (no tuning on the test set): features are standardised with the training
set's per-dimension mean and std (std floored at 1e-6); weights W [C,D] and bias b [C]
minimise  mean_i CE(W x_i + b, y_i) + L2/2 * ||W||^2  (bias not decayed), L2 = 1e-3,
by full-batch L-BFGS (torch.optim.LBFGS, strong Wolfe line search, history 20) in float64
from zeros, at most MAX_ITER = 500 iterations, tolerance 1e-9 on the gradient. The
objective is strictly convex, so the answer does not depend on a seed."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

L2 = 1e-3
MAX_ITER = 500


@dataclass
class LinearProbe:
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor     # [C, D] on standardised features
    bias: torch.Tensor       # [C]
    classes: torch.Tensor    # [C] label of each row

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.double() - self.mean) / self.std
        return self.classes[(z @ self.weight.T + self.bias).argmax(1)]


def fit_linear(x: torch.Tensor, y: torch.Tensor, l2: float = L2, max_iter: int = MAX_ITER) -> LinearProbe:
    """One torch thread while solving: the problem is small and many tiny ops on several
    threads of a busy machine were measured 40x slower than on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(x, y, l2, max_iter)
    finally:
        torch.set_num_threads(threads)


def _fit(x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int) -> LinearProbe:
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    classes, target = torch.unique(y.long(), return_inverse=True)
    w = torch.zeros(len(classes), z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, target) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    if len(classes) > 1:
        with torch.enable_grad():
            opt.step(closure)
    return LinearProbe(mean, std, w.detach(), b.detach(), classes)
