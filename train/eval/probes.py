"""Every probe for a set of networks on one train/test pair, with bootstrap CIs.

For each scope (image: pooled maps, label per image; object: RoIAlign over ground-truth
boxes, label per box; crop: each box cut out and resized to `crop_size`, then through the
network, label per box -- skipped when crop_size is None), each level and each probe (kNN,
linear), the accuracy of every network, and the paired difference of each network against
the `baseline` (random init) over the same test items."""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from train.eval import bootstrap, knn, linear
from train.eval.data import LabelledSet
from train.eval.features import extract

SCOPES = ("image", "object", "crop")
PROBES = ("knn", "linear")


def random_init_backbone(cfg: dict, seed: int = 0) -> nn.Module:
    """The run's architecture at its initialisation under `seed`, built by the same
    `build_method(cfg)` the trainer uses; the global RNG is left as it was."""
    from train.methods import build_method
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, method = build_method(cfg)
    return method.export_modules()["backbone"]


def _labels(data: LabelledSet, scope: str) -> np.ndarray:
    return data.image_labels if scope == "image" else data.box_labels


def _valid(labels: np.ndarray) -> np.ndarray:
    return np.flatnonzero(labels >= 0)


def predict(probe: str, train_x, train_y, test_x, k: int, temperature: float) -> torch.Tensor:
    if probe == "knn":
        return knn.knn_predict(train_x, train_y, test_x, k=k, temperature=temperature)
    if probe == "linear":
        return linear.fit_linear(train_x, train_y).predict(test_x)
    raise ValueError(f"unknown probe {probe!r}: choose from {PROBES}")


def run_probes(networks: dict[str, nn.Module], train: LabelledSet, test: LabelledSet, levels,
               k: int = knn.K, temperature: float = knn.TEMPERATURE, probes=PROBES, scopes=SCOPES,
               baseline: str = "random", batch_size: int = 64, device="cpu", say=print,
               crop_size: int | None = None) -> dict:
    """{"results": [row], "differences": [row], "seconds": {...}}.

    result row: scope, level, probe, network, acc, lo, hi, n; difference row: scope, level,
    probe, network, baseline, diff, lo, hi, n."""
    seconds = {}
    feats = {}
    scopes = [s for s in scopes if s != "crop" or crop_size]
    crop_size = crop_size if "crop" in scopes else None
    for name, net in networks.items():
        t0 = time.perf_counter()
        feats[name] = (extract(net, train, levels, batch_size, device, crop_size),
                       extract(net, test, levels, batch_size, device, crop_size))
        seconds[f"features_{name}"] = time.perf_counter() - t0
    results, differences = [], []
    t0 = time.perf_counter()
    for scope in scopes:
        ytr_all, yte_all = _labels(train, scope), _labels(test, scope)
        tr, te = _valid(ytr_all), _valid(yte_all)
        if len(tr) == 0 or len(te) == 0:
            say(f"[eval] {scope} level skipped: {len(tr)} labelled train and {len(te)} test items")
            continue
        ytr, yte = torch.from_numpy(ytr_all[tr]), torch.from_numpy(yte_all[te])
        for level in levels:
            if any(level not in feats[name][0][scope] for name in networks):
                say(f"[eval] {scope} scope of {level} skipped: {level} is one vector an image "
                    "(a ViT's CLS), it has no feature of its own for a box")
                continue
            for probe in probes:
                correct = {}
                for name in networks:
                    ftr, fte = feats[name][0][scope][level], feats[name][1][scope][level]
                    pred = predict(probe, ftr[tr], ytr, fte[te], k, temperature)
                    correct[name] = (pred == yte).numpy()
                    results.append(dict(scope=scope, level=level, probe=probe, network=name,
                                        **bootstrap.accuracy_ci(correct[name])))
                if baseline in correct:
                    for name in networks:
                        if name != baseline:
                            differences.append(dict(scope=scope, level=level, probe=probe, network=name,
                                                    baseline=baseline,
                                                    **bootstrap.paired_diff_ci(correct[name], correct[baseline])))
    seconds["probes"] = time.perf_counter() - t0
    return dict(results=results, differences=differences, seconds=seconds)


def find(rows: list[dict], **match) -> dict | None:
    """The first row whose fields equal `match` (None when none does)."""
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None
