"""Weighted kNN top-1, as InstDisc (Wu et al. 2018) and solo-learn evaluate: cosine
similarity to every memory-bank feature, the k nearest vote for their label with weight
exp(s / T). Defaults k = 20, T = 0.07. Ties between classes go to the smaller label."""
from __future__ import annotations

import torch
import torch.nn.functional as F

K = 20
TEMPERATURE = 0.07


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                k: int = K, temperature: float = TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Predicted label of each query [Q, D] from the bank [N, D] with labels [N]."""
    if len(bank) == 0:
        raise ValueError("kNN: the memory bank is empty (no labelled training items)")
    bank = F.normalize(bank.double(), dim=1)
    labels = bank_labels.long()
    classes, dense = torch.unique(labels, return_inverse=True)
    k = min(int(k), len(bank))
    preds = []
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start:start + chunk].double(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), len(classes), dtype=torch.float64)
        votes.scatter_add_(1, dense[idx], (sim / temperature).exp())
        preds.append(classes[votes.argmax(1)])
    return torch.cat(preds) if preds else labels.new_zeros(0)
