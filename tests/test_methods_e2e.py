"""Every issue-7 method trains from the sample's shards on CPU with the real loader and
trainer, checkpoints, resumes to the same next-step loss as an uninterrupted run, and
exports a backbone that loads back. Tiny random-weight ResNet-18s, 64-px views."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train.config import load_config
from train.export import main as export_main
from train.models.backbone import build_backbone
from train import callbacks
from train.pretrain import train


class Crash(RuntimeError):
    """Stands for a killed process (the trainer's own debug hook sends SIGKILL)."""

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
RUNS = {                                   # name: (small config, extra overrides)
    "mocov2": ("mocov2_small_cpu", ["model.queue_size=10"]),   # 4 keys a step: wraps during step 3
    "detcon_b": ("detcon_b_small_cpu", ["data.options.mask_source=gt"]),
    "detcon_s": ("detcon_s_small_cpu", ["data.options.mask_source=grid"]),
    "maskco": ("maskco_small_cpu", []),
    "maskco_inter": ("maskco_small_cpu", ["model.intra=false", "model.mph_blocks=1"]),   # the recipe is MaskCo(+in)
    "soco_c4": ("soco_c4_small_cpu", ["eval.every=0"]),   # SoCo's C4 head at a 4x4 RoI grid
}


def _run(config: str, out: Path, shards: Path, steps: int, extra: list[str]) -> list[dict]:
    cfg = load_config(CONFIGS / f"{config}.yaml", [
        f"data.shards={shards}", "data.batch_size=4", f"train.out={out}", f"train.steps={steps}",
        "train.checkpoint_every=2", "train.log_every=1", "train.tensorboard=false", *extra])
    train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r and "event" not in r}


def _backbone_state(out: Path) -> dict[str, torch.Tensor]:
    model = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    return {k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_method_trains_checkpoints_resumes_and_exports(name, sample_shards, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    config, extra = RUNS[name]
    straight = _losses(_run(config, tmp_path / "straight", sample_shards, 4, extra))
    assert sorted(straight) == [1, 2, 3, 4]          # 3 steps an epoch: step 4 starts epoch 2
    assert all(torch.isfinite(torch.tensor(v)) for v in straight.values())

    # crash right after the step-2 checkpoint, then rerun: it must resume, not restart
    def crash_after_step_2(cfg, info, step):
        if step == 2:
            raise Crash(step)
    monkeypatch.setattr(callbacks, "maybe_fault", crash_after_step_2)   # the debug callback's fault hook
    with pytest.raises(Crash):
        _run(config, tmp_path / "split", sample_shards, 4, extra)
    monkeypatch.undo()
    at_step2 = _backbone_state(tmp_path / "split")
    records = _run(config, tmp_path / "split", sample_shards, 4, extra)
    starts = [r for r in records if r.get("event") == "start"]
    assert [s["step"] for s in starts] == [0, 2] and starts[-1]["resumed"] is True
    resumed = _losses(records)
    for step in (3, 4):        # step 4 also sees state written at step 3 (e.g. the queue pointer)
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4, abs=1e-6), step
    final, resumed_final = _backbone_state(tmp_path / "straight"), _backbone_state(tmp_path / "split")
    for key in final:
        assert torch.allclose(final[key].float(), resumed_final[key].float(), rtol=1e-4, atol=1e-6), key
    assert not torch.equal(final["conv1.weight"], at_step2["conv1.weight"])   # steps 3-4 moved the weights

    # export: a torchvision-layout backbone equal to the trained online backbone ...
    exported = torch.load(tmp_path / "straight" / "exported" / "backbone_torchvision.pth", weights_only=True)
    build_backbone("resnet18", width=16).load_state_dict(exported, strict=True)
    assert all(torch.equal(exported[k], final[k]) for k in exported)
    # ... with the detectron2 config that fine-tunes exactly these weights beside the pkl
    d2 = (tmp_path / "straight" / "exported" / "detectron2_config.yaml").read_text()
    assert "detectron2.pkl" in d2 and "STRIDE_IN_1X1: false" in d2
    # ... or, from the checkpoint, the EMA/momentum one (DetCon-S has none and says so)
    cli = ["--checkpoint", str(tmp_path / "straight" / "checkpoints" / "last.pt"), "--target",
           "--out", str(tmp_path / "target")]
    if name == "detcon_s":
        with pytest.raises(SystemExit) as exit_:        # one message, no traceback
            export_main(cli)
        assert exit_.value.code == 2 and "no EMA target network" in capsys.readouterr().err
        return
    export_main(cli)
    ema = torch.load(tmp_path / "target" / "backbone_torchvision.pth", weights_only=True)
    prefix = {"detcon": "target_backbone.", "soco": "target.0."}.get(name.split("_")[0], "key_backbone.")
    model = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(ema[k], model[prefix + k]) for k in ema)
    assert not torch.equal(ema["conv1.weight"], exported["conv1.weight"])


@pytest.mark.parametrize("name", ["mocov2", "detcon_b", "detcon_s", "maskco"])
def test_method_trains_under_bf16_autocast(name, sample_shards, tmp_path):
    """GPU runs default to bf16 autocast; the same dtype paths run here on CPU."""
    torch.set_num_threads(1)
    config, extra = RUNS[name]
    losses = _losses(_run(config, tmp_path, sample_shards, 2, extra + ["train.precision=bf16",
                                                                        "export.enabled=false"]))
    assert sorted(losses) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())


@pytest.mark.parametrize("config,optimiser,lr,weight_decay", [
    ("detcon_b_r50", "LARS", 3.2, 1.5e-6),          # methods.md 2.8: 0.2 x 4096/256
    ("detcon_s_r50", "LARS", 3.2, 1.5e-6),
    ("maskco_r50", "SGD", 0.03, 1e-3),              # paper: SGD 0.03, wd 0.001 as printed, batch 256
    ("mocov2_r50", "SGD", 0.03, 1e-4),              # methods.md 6
])
def test_full_configs_build_with_the_papers_optimiser(config, optimiser, lr, weight_decay):
    """The ResNet-50 recipes are valid (no unknown keys) and give the papers' optimiser."""
    from train.optim import build_optimizer
    from train.methods import build_method
    torch.set_num_threads(1)
    cfg = load_config(CONFIGS / f"{config}.yaml")
    _, method = build_method(cfg)
    assert method.backbone.out_channels[-1] == 2048
    opt = build_optimizer(method, cfg, int(cfg["data"]["batch_size"]))
    assert type(opt).__name__ == optimiser
    assert opt.param_groups[0]["lr"] == pytest.approx(lr)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(weight_decay)
