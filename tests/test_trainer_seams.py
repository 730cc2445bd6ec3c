"""The trainer's seams on real computations: the typed config (files and overrides checked
alike), resumes that refuse or honour a changed config (against uninterrupted runs), the
backbone registry (ResNet and a timm ViT, random weights: nothing is downloaded), export
formats per family, AdamW/clipping/gradient accumulation, and a toy method added from a
temporary module with only its own file, recipe and config."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.config import ConfigError, load_config
from train.pretrain import train

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train" / "configs"


# ----------------------------------------------------------------------------- typed config
@pytest.mark.parametrize("text,message", [
    ("optim: {warmup_epoch: 3}", r"child.yaml: unknown key 'optim.warmup_epoch'; did you mean optim.warmup_epochs"),
    ("train: {step: 3}", r"child.yaml: unknown key 'train.step'; did you mean train.steps"),
    ("trian: {steps: 3}", r"child.yaml: unknown section 'trian'; did you mean train"),
    ("model: {widht: 8}", r"child.yaml: unknown key 'model.widht'; did you mean model.width"),
    ("data: {options: {scale2: [0.5, 1]}}", r"unknown key 'data.options.scale2'; did you mean data.options.scale"),
    ("data: {batch_size: many}", r"child.yaml: data.batch_size='many' \(str\): expected int"),
])
def test_a_typo_or_wrong_type_inside_a_recipe_file_is_refused_naming_the_file_and_key(tmp_path, text, message):
    (tmp_path / "child.yaml").write_text(f"_base_: {CONFIGS / 'mocov2_small_cpu.yaml'}\n{text}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "child.yaml")


def test_an_override_with_a_wrong_type_names_the_override_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"override 'data.batch_size=abc': data.batch_size='abc' \(str\): expected int"):
        load_config(CONFIGS / "soco_small_cpu.yaml", ["data.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"optim.name='adam' \(str\): expected 'auto' \| 'lars' \| 'sgd' \| 'adamw'"):
        load_config(CONFIGS / "soco_small_cpu.yaml", ["optim.name=adam"])
    cfg = load_config(CONFIGS / "soco_small_cpu.yaml", ["optim.base_lr=1", "train.accum_steps=2"])
    assert isinstance(cfg["optim"]["base_lr"], float) and cfg["train"]["accum_steps"] == 2


def test_every_shipped_config_validates_and_holds_every_section_with_the_contract_defaults():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        assert set(cfg) == {"method", "model", "data", "optim", "train", "export", "eval", "debug"}, path
    cfg = load_config(CONFIGS / "soco_r50_fpn.yaml")
    assert cfg["eval"] == dict(every=0, train=None, test=None, test_fraction=0.5, k=20, temperature=0.07,
                               levels=["res5"], target=True, max_samples=None, image_size=None, crop_size=None,
                               scope="crop", batch_size=64)
    assert cfg["data"]["max_bad_samples"] == 0 and cfg["train"]["resume"] == "auto"


def test_a_batch_larger_than_the_dataset_is_refused_before_training(sample_shards, tmp_path):
    cfg = load_config(CONFIGS / "mocov2_small_cpu.yaml", [f"data.shards={sample_shards}", "data.batch_size=128",
                                                          f"train.out={tmp_path}", "train.tensorboard=false"])
    with pytest.raises(ConfigError, match=r"data.batch_size=128 is larger than the 14 samples"):
        train(cfg)


# ----------------------------------------------------------------------------- resume
def _run(out: Path, shards: Path, *extra: str, config: str = "soco_small_cpu") -> dict[int, dict]:
    cfg = load_config(CONFIGS / f"{config}.yaml", [
        f"data.shards={shards}", "data.batch_size=4", f"train.out={out}", "train.checkpoint_every=2",
        "train.log_every=1", "train.tensorboard=false", "export.enabled=false", "optim.warmup_steps=2",
        "data.backend=reference", "data.num_workers=0", *extra])
    train(cfg)
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r and "event" not in r}


def _lr(step: int, total: int, base_lr: float, batch: int = 4, warmup: int = 2, min_lr: float = 1e-6) -> float:
    """Warm-up from lr/100 then cosine to min_lr, written out (lr of the step with `step` done before)."""
    lr = base_lr * batch / 256
    if step < warmup:
        return lr * (0.01 + 0.99 * step / warmup)
    t = (step - warmup) / (total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def test_more_steps_on_resume_follow_the_uninterrupted_longer_run_exactly(sample_shards, tmp_path):
    """MoCo v2: its key momentum is constant, so nothing but the lr depends on the total (an EMA
    on a cosine of the total, as SoCo's, would differ during the first 2 steps)."""
    moco = dict(config="mocov2_small_cpu")
    lr = ("optim.min_lr=1e-6", "optim.base_lr=0.03")
    straight = _run(tmp_path / "straight", sample_shards, "train.steps=5", *lr, **moco)
    _run(tmp_path / "extended", sample_shards, "train.steps=2", *lr, **moco)  # ends in warm-up
    extended = _run(tmp_path / "extended", sample_shards, "train.steps=5", *lr, **moco)
    assert sorted(extended) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        assert extended[step]["lr"] == pytest.approx(_lr(step - 1, 5, 0.03), rel=1e-9), step
        assert extended[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-4, abs=1e-6), step  # as e2e resume


def test_a_finished_run_extended_with_a_new_base_lr_ramps_from_the_floor_to_the_new_schedule(sample_shards, tmp_path):
    _run(tmp_path, sample_shards, "train.steps=3", "optim.base_lr=1.0")      # ends at the cosine floor
    assert _lr(3, 3, 1.0) == pytest.approx(1e-6)
    resumed = _run(tmp_path, sample_shards, "train.steps=6", "optim.base_lr=2.0")
    # no jump: step 4 starts at the checkpoint's lr, the ramp (the 2 warm-up steps) reaches the new
    # schedule, and from step 6 on the lr is exactly an uninterrupted 6-step run's at base_lr 2
    target = _lr(5, 6, 2.0)
    assert resumed[4]["lr"] == pytest.approx(1e-6, rel=1e-6)
    assert resumed[5]["lr"] == pytest.approx(1e-6 + (target - 1e-6) / 2, rel=1e-9)
    assert resumed[6]["lr"] == pytest.approx(target, rel=1e-9) and target > 1e-3
    log = (tmp_path / "train.log").read_text()
    assert "resuming with a changed config (optim.base_lr: 1.0 -> 2.0, train.steps: 3 -> 6)" in log


def test_an_lr_ramp_cut_by_a_crash_goes_on_where_it_was_after_the_restart(sample_shards, tmp_path, monkeypatch):
    from train import callbacks

    class Crash(Exception):
        pass

    def crash_at_4(cfg, info, step):
        if step == 4:          # after the step-4 checkpoint, inside the 4-step ramp (steps 4-7)
            raise Crash(step)

    longer = ("train.steps=9", "optim.base_lr=2.0", "optim.resume_warmup_steps=4")
    _run(tmp_path / "a", sample_shards, "train.steps=3")
    straight = _run(tmp_path / "a", sample_shards, *longer)
    _run(tmp_path / "b", sample_shards, "train.steps=3")
    monkeypatch.setattr(callbacks, "maybe_fault", crash_at_4)
    with pytest.raises(Crash):
        _run(tmp_path / "b", sample_shards, *longer)
    monkeypatch.undo()
    resumed = _run(tmp_path / "b", sample_shards, *longer)      # same config as the checkpoint's
    assert sorted(resumed) == list(range(1, 10))
    for step in range(4, 10):
        assert resumed[step]["lr"] == pytest.approx(straight[step]["lr"], rel=1e-9), step
    assert straight[4]["lr"] == pytest.approx(1e-6, rel=1e-6)                 # the ramp starts at the floor
    assert straight[8]["lr"] == pytest.approx(_lr(7, 9, 2.0), rel=1e-9)       # and ends on the new schedule


def test_resume_warmup_steps_0_takes_the_new_schedule_at_once(sample_shards, tmp_path):
    _run(tmp_path, sample_shards, "train.steps=3")
    resumed = _run(tmp_path, sample_shards, "train.steps=6", "optim.base_lr=2.0", "optim.resume_warmup_steps=0")
    for step in (4, 5, 6):   # timm's choice: exactly the lr an uninterrupted 6-step run has there
        assert resumed[step]["lr"] == pytest.approx(_lr(step - 1, 6, 2.0), rel=1e-9), step


def test_resuming_with_another_method_or_batch_is_one_message_listing_the_keys(sample_shards, tmp_path):
    _run(tmp_path, sample_shards, "train.steps=2")
    with pytest.raises(ConfigError) as e:
        _run(tmp_path, sample_shards, "train.steps=4", config="mocov2_small_cpu")
    text = str(e.value)
    assert "cannot resume" in text and "method: 'soco' -> 'mocov2'" in text and "model.fpn_channels" in text
    assert "train.out" in text and "train.resume=force" in text and "load_state_dict" not in text
    with pytest.raises(ConfigError, match=r"(?s)1 key\(s\) changed.*data.batch_size: 4 -> 2"):
        _run(tmp_path, sample_shards, "train.steps=4", "data.batch_size=2")
    with pytest.raises(ConfigError, match=r"does not fit this model.*start fresh"):   # forced, still no traceback
        _run(tmp_path, sample_shards, "train.steps=4", "train.resume=force", config="mocov2_small_cpu")


# ----------------------------------------------------------------------------- backbones
VIT = dict(backbone="vit_tiny_patch16_224",
           backbone_options=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))


def test_a_vit_backbone_gives_its_token_grid_and_cls_through_the_protocol():
    from train.models import create_backbone
    torch.manual_seed(0)
    vit = create_backbone(VIT["backbone"], options=VIT["backbone_options"])   # random weights
    assert vit.feature_info == [dict(name="tokens", channels=32, stride=8)]
    x = torch.randn(2, 3, 32, 32)
    feats = vit.forward_features(x)
    tokens = vit.vit.forward_features(x)                                     # timm's own [B, 1+16, D]
    assert feats["tokens"].shape == (2, 32, 4, 4) and feats["cls"].shape == (2, 32)
    torch.testing.assert_close(feats["tokens"][:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2])   # row-major grid
    torch.testing.assert_close(vit(x), tokens[:, 0])
    names = vit.no_weight_decay()
    assert {"vit.pos_embed", "vit.cls_token", "vit.norm.weight", "vit.blocks.0.attn.qkv.bias"} <= names
    assert "vit.blocks.0.attn.qkv.weight" not in names
    with pytest.raises(ValueError, match="model.width=16 scales ResNets only"):
        create_backbone(VIT["backbone"], width=16, options=VIT["backbone_options"])
    with pytest.raises(ValueError, match="unknown backbone 'resnet5'"):
        create_backbone("resnet5")


def test_a_method_on_a_vit_exports_a_timm_state_dict_and_refuses_resnet_formats(tmp_path):
    import timm

    from train.export import ExportError, export_method
    from train.methods import get
    from train.optim import build_optimizer
    torch.manual_seed(0)
    method = get("mocov2").build({"model": dict(VIT, dim=16, queue_size=8)})
    batch = {"query": torch.randn(2, 3, 32, 32), "key": torch.randn(2, 3, 32, 32)}
    assert torch.isfinite(method(batch)["loss"])
    opt = build_optimizer(method, {"optim": {"name": "adamw", "betas": [0.9, 0.95], "weight_decay": 0.05}}, 256)
    assert type(opt).__name__ == "AdamW" and opt.param_groups[0]["betas"] == (0.9, 0.95)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    named = dict(method.named_parameters())
    assert id(named["backbone.vit.pos_embed"]) not in decayed and id(named["backbone.vit.cls_token"]) not in decayed
    assert id(named["backbone.vit.blocks.1.mlp.fc1.weight"]) in decayed
    assert opt.param_groups[1]["weight_decay"] == 0 and id(named["backbone.vit.norm.bias"]) in \
        {id(p) for p in opt.param_groups[1]["params"]}

    paths = export_method(method, tmp_path)
    assert set(paths) == {"timm"}
    meta = json.loads((tmp_path / "backbone_timm.json").read_text())
    loaded = timm.create_model(meta["name"], pretrained=False, num_classes=0, **meta["kwargs"])
    loaded.load_state_dict(torch.load(paths["timm"], weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    method.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), method.backbone(x))
    for fmt in ("torchvision", "detectron2"):
        with pytest.raises(ExportError, match=f"a vit backbone cannot be exported as '{fmt}': it supports timm"):
            export_method(method, tmp_path / fmt, formats=[fmt])
        assert not (tmp_path / fmt).exists()
    with pytest.raises(ValueError, match="SoCo needs a multi-scale ResNet"):
        get("soco").build({"model": dict(VIT)})


def test_detcon_and_maskco_train_on_a_vit_token_grid():
    from train.methods import get
    torch.manual_seed(0)
    views = {k: torch.randn(2, 3, 32, 32) for k in ("view1", "view2", "query", "key")}
    masks = {k: torch.randint(0, 3, (2, 32, 32)) for k in ("mask1", "mask2")}
    detcon = get("detcon").build({"model": dict(VIT, hidden_dim=16, dim=8, num_samples=4, gather=False)})
    assert torch.isfinite(detcon({**views, **masks})["loss"])
    boxes = torch.tensor([[0.0, 0, 16, 16]]).repeat(2, 17, 1)
    maskco = get("maskco").build({"model": dict(VIT, mph_blocks=1, dim=8)})
    out = maskco({**views, "key_boxes": boxes, "query_box": boxes[:, 0]})
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert maskco.backbone.vit.pos_embed.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- optimiser
def test_two_accumulated_micro_batches_equal_one_step_on_the_whole_batch():
    """BN in eval mode (fixed statistics): every loss term is a per-image mean, so the
    average of two half-batch gradients is the full-batch gradient; with train-mode BN the
    half batches would be normalised by their own statistics and legitimately differ."""
    from tests.test_soco import TINY, synthetic_batch
    from train.methods import get
    from train.optim import build_optimizer, build_scheduler
    from train.pretrain import train_step

    def run(accumulate: bool):
        torch.manual_seed(0)
        method = get("soco").build({"model": dict(TINY)})
        method.eval()
        cfg = {"optim": {"name": "adamw", "base_lr": 0.1, "warmup_steps": 0, "clip_grad": 0.5}}
        opt = build_optimizer(method, cfg, global_batch=4)
        sched = build_scheduler(opt, cfg, total_steps=4, steps_per_epoch=2)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        losses = []
        for step in range(2):
            batch = synthetic_batch(B=4, seed=step)
            halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
            loss, logs = train_step(method, method, opt, sched, scaler, halves if accumulate else batch,
                                    None, step, 4, clip_grad=0.5)
            losses.append(loss)
        return losses, logs, method.state_dict()

    (l1, logs1, s1), (l2, logs2, s2) = run(False), run(True)
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert logs1["grad_norm"] == pytest.approx(logs2["grad_norm"], rel=1e-4) and logs1["grad_norm"] > 0.5  # clipped
    for k, v in s1.items():
        torch.testing.assert_close(s2[k], v, rtol=1e-4, atol=1e-6, msg=k)


class Crash(Exception):
    pass


def test_accumulated_steps_resume_mid_epoch_like_an_uninterrupted_run(sample_shards, tmp_path, monkeypatch):
    """14 samples, 2 a micro-step, 2 micro-steps a step: 3 steps an epoch and one micro-batch
    left over at each epoch's end (skipped and counted); a crash after step 2 resumes at the
    same loader position."""
    from train import callbacks
    moco = ["train.accum_steps=2", "train.steps=4"]
    straight = _run(tmp_path / "straight", sample_shards, *moco, config="mocov2_small_cpu")
    end = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()][-1]
    assert sorted(straight) == [1, 2, 3, 4] and end["event"] == "end" and end["dropped_micro_batches"] == 1

    def crash_after_step_2(cfg, info, step):
        if step == 2:
            raise Crash(step)
    monkeypatch.setattr(callbacks, "maybe_fault", crash_after_step_2)
    with pytest.raises(Crash):
        _run(tmp_path / "split", sample_shards, *moco, config="mocov2_small_cpu")
    monkeypatch.undo()
    resumed = _run(tmp_path / "split", sample_shards, *moco, config="mocov2_small_cpu")
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-4, abs=1e-6), step


def test_gradient_clipping_bounds_the_global_norm():
    from train.optim import clip_gradients
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    before = clip_gradients([a, b], 1.0)
    assert before == pytest.approx(math.sqrt(9 * 3 + 16 * 4))
    assert math.sqrt(float((a.grad ** 2).sum() + (b.grad ** 2).sum())) == pytest.approx(1.0, rel=1e-5)
    assert clip_gradients([a, b], None) is None


# ----------------------------------------------------------------------------- adding a method
TOY = '''
"""A toy method: two crops, a pooled backbone, negative cosine between the views."""
from dataclasses import dataclass

import torch.nn.functional as F

from train.loader.recipes import Plan, Recipe, ViewSpec, two_crops
from train.methods import Method, build_on_backbone
from train.schema import BackboneFields

RECIPE = "toy_two_crops"
VIEWS = ("a", "b")


class ToyRecipe(Recipe):
    name = RECIPE
    DEFAULTS = dict(size=32, scale=(0.3, 1.0), colour=False)

    def view_specs(self):
        return [ViewSpec(v, self.cfg["size"], "moco") for v in VIEWS]

    def plan(self, W, H, boxes, draw, rng) -> Plan:
        return two_crops(self, W, H, draw, VIEWS)


@dataclass
class ModelConfig(BackboneFields):
    scale: float = 1.0


class Toy(Method):
    optimizer = "sgd"

    def __init__(self, backbone, scale):
        super().__init__()
        self.backbone, self.scale = backbone, scale

    def forward(self, batch):
        za, zb = (F.normalize(self.backbone(batch[v]), dim=1) for v in VIEWS)
        return dict(loss=-self.scale * (za * zb).sum(1).mean())


def build(cfg):
    return build_on_backbone(Toy, cfg, ModelConfig, "toy")
'''


def test_a_toy_method_from_its_own_module_recipe_and_config_trains_through_pretrain(sample_shards, tmp_path,
                                                                                    monkeypatch):
    (tmp_path / "toymethod.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "toy.yaml").write_text(f"""method: toymethod
model: {{backbone: resnet18, width: 8, scale: 2.0}}
data: {{shards: {sample_shards}, batch_size: 4, backend: reference, num_workers: 0, options: {{scale: [0.5, 1.0]}}}}
optim: {{base_lr: 0.1}}
train: {{out: {tmp_path / 'run'}, steps: 3, device: cpu, tensorboard: false, log_every: 1}}
""")
    from train.pretrain import main
    assert main(["--config", str(tmp_path / "toy.yaml")]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and "event" not in r]
    assert len(losses) == 3 and all(-2.0 <= v <= 2.0 for v in losses)
    from train.models.backbone import build_backbone
    sd = torch.load(tmp_path / "run" / "exported" / "backbone_torchvision.pth", weights_only=True)
    build_backbone("resnet18", width=8).load_state_dict(sd, strict=True)
    with pytest.raises(ConfigError, match=r"unknown key 'model.scal'; did you mean model.scale"):
        load_config(tmp_path / "toy.yaml", ["model.scal=1"])


@pytest.mark.parametrize("module", ["train.loader.collate", "train.methods.maskco", "train.export", "train.pretrain"])
def test_modules_import_first_without_an_import_circle(module):
    """Each module imported first in a fresh interpreter (a circle shows as a partial import)."""
    code = f"import {module}; import train.loader as L; assert set(L.RECIPES) >= {{'soco', 'detcon', 'maskco', 'mocov2'}}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
