"""Online evaluation while pretraining: the object-crop kNN of the backbone every
`eval.every` steps and at the end, as a trainer callback (train/callbacks.py).
`eval.scope` says which object features: `crop` (default; each box cut out and resized to
`eval.crop_size`, null = data.image_size) or `object` (RoIAlign of the image's maps).

Config (section `eval`, docs/interfaces.md "Session 10 contracts"): `every`, `train`
(labelled shards: the kNN memory bank; null = data.shards), `test` (null = a split of
`train` by key, `test_fraction`), `k`, `temperature`, `levels` (default [res5]),
`target` (also the momentum/EMA branch when the method has one), `max_samples`,
`image_size` (null = data.image_size or 224), `batch_size`.

Runs on rank 0 only (the other ranks go on; they never wait for it). Each evaluation
records `{"event": "eval", "step", "knn_<scope>_<level>"[, "knn_<scope>_<level>_target"],
"seconds"}` through ctx.metrics.record (metrics.jsonl and TensorBoard `eval/...`). The
networks go back to their train/eval mode afterwards and no global RNG is consumed, so a
run with online eval trains exactly as one without."""
from __future__ import annotations

import time

import torch

from train.callbacks import Callback, TrainContext
from train.eval import knn
from train.eval.data import load_labelled, split_by_key
from train.eval.features import crop_size_of, embedding_levels, extract, image_size_of, resolve_levels


class OnlineEval(Callback):
    def __init__(self, cfg: dict):
        ev = cfg.get("eval") or {}
        data = cfg.get("data") or {}
        self.every = int(ev.get("every") or 0)
        self.train_dir = ev.get("train") or data.get("shards")
        self.test_dir = ev.get("test")
        self.test_fraction = float(ev.get("test_fraction") or 0.5)
        self.k = int(ev.get("k") or knn.K)
        self.temperature = float(ev.get("temperature") or knn.TEMPERATURE)
        self.levels = list(ev.get("levels") or ["res5"])
        self.target = bool(ev.get("target", True))
        self.max_samples = ev.get("max_samples")
        self.image_size = image_size_of(cfg)
        self.batch_size = int(ev.get("batch_size") or 64)
        self.scope = ev.get("scope") or "crop"
        if self.scope not in ("crop", "object"):
            from train.config import ConfigError
            raise ConfigError(f"eval.scope: {self.scope!r} is not a scope; choose crop or object")
        self.crop_size = crop_size_of(cfg)
        if self.scope == "crop" and not self.crop_size:
            from train.config import ConfigError
            raise ConfigError("eval.crop_size=0 turns the crop probe off; set eval.scope=object or a crop size")
        self._data = None
        self._last = -1

    def _sets(self):
        if self._data is None:
            train = load_labelled(self.train_dir, self.image_size, self.max_samples)
            if self.test_dir:
                test = load_labelled(self.test_dir, self.image_size, self.max_samples)
            else:
                train, test = split_by_key(train, self.test_fraction)
            if len(train.box_labels) == 0 or len(test.box_labels) == 0:
                from train.eval.data import EvalDataError
                raise EvalDataError(f"online eval: {self.train_dir} has no ground-truth boxes on one side "
                                    "of the split; point eval.train/eval.test at shards with objects "
                                    "(the built-in sample, COCO with instances)")
            self._data = (train, test)
        return self._data

    def _branches(self, method) -> dict:
        nets = {"": method.export_modules()["backbone"]}
        if self.target:
            try:
                nets["_target"] = method.export_modules(target=True)["backbone"]
            except NotImplementedError:  # no target branch (DetCon-S, MoCo-free methods)
                pass
        return nets

    def evaluate(self, ctx: TrainContext) -> dict:
        t0 = time.perf_counter()
        train, test = self._sets()
        values = {}
        ytr, yte = torch.from_numpy(train.box_labels), torch.from_numpy(test.box_labels)
        device = ctx.info.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for suffix, net in self._branches(ctx.method).items():
                crop = self.crop_size if self.scope == "crop" else None   # only the scope it logs
                ftr, fte = (extract(net, d, self.levels, self.batch_size, device, crop, whole=crop is None)[self.scope]
                            for d in (train, test))
                for lv in self.levels:
                    pred = knn.knn_predict(ftr[lv], ytr, fte[lv], self.k, self.temperature)
                    values[f"knn_{self.scope}_{lv}{suffix}"] = float((pred == yte).double().mean())
        values["seconds"] = time.perf_counter() - t0
        return values

    def _run(self, ctx: TrainContext) -> None:
        if not ctx.is_main or ctx.step == self._last:
            return
        self._last = ctx.step
        values = self.evaluate(ctx)
        ctx.metrics.record(ctx.step, "eval", **values)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if k != "seconds")
        ctx.metrics.say(f"[eval] step {ctx.step}: {shown} ({values['seconds']:.1f}s)")

    def on_train_start(self, ctx: TrainContext) -> None:
        if ctx.is_main:  # read (and check) the labelled shards now, not after hours of training
            from train.config import ConfigError
            from train.eval.data import EvalDataError
            try:
                self._sets()
            except EvalDataError as e:  # a config problem: the trainer prints it in one line
                raise ConfigError(f"online eval (eval.every={self.every}): {e}; or turn it off with "
                                  "eval.every=0") from None
            self._check_levels(ctx.method.export_modules()["backbone"])

    def _check_levels(self, backbone) -> None:
        """eval.levels against the backbone, before training: an unknown level, or a vector
        level (a ViT's cls) at object scope, where a box has no feature of its own."""
        from train.config import ConfigError
        try:
            names = resolve_levels(backbone, self.levels)
        except ValueError as e:
            raise ConfigError(f"online eval: {e}") from None
        vectors = [lv for lv, real in names.items() if real in embedding_levels(backbone)]
        if self.scope == "object" and vectors:
            raise ConfigError(f"eval.levels: {vectors} is one vector an image (a ViT's CLS), with no feature "
                              "for a box at eval.scope=object; use eval.scope=crop or a map level (tokens)")

    def on_step_end(self, ctx: TrainContext) -> None:
        if self.every > 0 and ctx.step % self.every == 0:
            self._run(ctx)

    def on_train_end(self, ctx: TrainContext) -> None:
        self._run(ctx)
