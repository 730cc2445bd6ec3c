"""Trainer building blocks on real computations: LARS against its formula, the lr
schedule, config overrides, checkpoints (atomic, weights_only, RNG), exports loading
back into torchvision and matching the detectron2 key mapping. Random weights."""
from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch
import torchvision

from train import checkpoint
from train.config import ConfigError, load_config
from train.export import export_method
from train.methods import get
from train.optim import LARS, WarmupCosine, build_optimizer, build_scheduler, scaled_lr

torch.set_num_threads(1)


def test_lars_step_matches_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(4))
    zero = torch.nn.Parameter(torch.zeros(2, 2))
    lr, wd, trust, mom = 0.5, 1e-2, 0.001, 0.9
    opt = LARS([dict(params=[w, zero], weight_decay=wd, lars=True), dict(params=[b], weight_decay=0.0, lars=False)],
               lr=lr, momentum=mom, trust=trust)
    w0, b0 = w.detach().numpy().astype(np.float64).copy(), b.detach().numpy().astype(np.float64).copy()
    bufs = {}
    for it in range(2):
        gw = np.random.default_rng(it).normal(size=(4, 3))
        gb = np.random.default_rng(10 + it).normal(size=4)
        gz = np.random.default_rng(20 + it).normal(size=(2, 2))
        w.grad, b.grad, zero.grad = (torch.tensor(g, dtype=torch.float32) for g in (gw, gb, gz))
        opt.step()
        d = gw + wd * w0
        d = d * trust * np.linalg.norm(w0) / (np.linalg.norm(d) + 1e-8)
        bufs["w"] = d if it == 0 else mom * bufs["w"] + d
        bufs["b"] = gb if it == 0 else mom * bufs["b"] + gb
        w0, b0 = w0 - lr * bufs["w"], b0 - lr * bufs["b"]
        np.testing.assert_allclose(w.detach().numpy(), w0, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b.detach().numpy(), b0, rtol=1e-5, atol=1e-7)
        if it == 0:  # ||w|| = 0: the trust scaling is skipped, plain SGD on the gradient
            np.testing.assert_allclose(zero.detach().numpy(), -lr * gz, rtol=1e-5)


def test_method_param_groups_skip_1d_and_frozen():
    method = get("soco").build({"model": dict(backbone="resnet18", width=8, fpn_channels=8, head_conv_channels=8,
                                              head_fc_dim=16, proj_hidden=16, proj_dim=8)})
    cfg = {"optim": {"base_lr": 1.0, "weight_decay": 1e-5}}
    opt = build_optimizer(method, cfg, global_batch=512)
    assert isinstance(opt, LARS)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0) == scaled_lr(1.0, 512)
    lars, plain = opt.param_groups
    assert lars["lars"] and lars["weight_decay"] == 1e-5 and all(p.ndim >= 2 for p in lars["params"])
    assert not plain["lars"] and plain["weight_decay"] == 0 and all(p.ndim == 1 for p in plain["params"])
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in method.target.parameters()}
    assert in_opt == {id(p) for p in method.parameters() if p.requires_grad}


def test_warmup_cosine_schedule():
    f = WarmupCosine(total=110, warmup=10, lr=2.0, min_lr=1e-6)
    assert f(0) * 2.0 == pytest.approx(0.02)  # starts at lr / 100
    assert f(5) * 2.0 == pytest.approx(0.02 + (2.0 - 0.02) * 0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(60) * 2.0 == pytest.approx(1e-6 + (2.0 - 1e-6) * 0.5)
    assert f(110) * 2.0 == pytest.approx(1e-6)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, {"optim": {"warmup_epochs": 2, "min_lr": 0.0}}, total_steps=20, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.02) and lrs[10] == pytest.approx(2.0)
    assert lrs[15] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))


def test_config_overrides_and_base(tmp_path):
    (tmp_path / "base.yaml").write_text("method: soco\noptim: {base_lr: 1.0, name: auto}\n"
                                        "model: {level_ranges: [1, 2]}\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\noptim: {base_lr: 0.5}\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.base_lr=3e-1", "model.level_ranges=[3]",
                                                 "+data.options.k=12", "train.steps=5"])
    assert cfg["method"] == "soco" and cfg["optim"]["base_lr"] == 0.3 and cfg["optim"]["name"] == "auto"
    assert cfg["model"]["level_ranges"] == [3.0] and cfg["data"]["options"] == {"k": 12}
    assert cfg["train"]["steps"] == 5 and cfg["optim"]["min_lr"] == 1e-6   # schema default filled
    with pytest.raises(ConfigError, match=r"unknown key 'optim.base_l'.*optim.base_lr"):
        load_config(tmp_path / "child.yaml", ["optim.base_l=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(tmp_path / "child.yaml", ["optim.base_lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_build(tmp_path):
    for name, variant in [("soco_r50_fpn", "fpn"), ("soco_star_r50_fpn", "star"), ("soco_r50_c4", "c4"),
                          ("soco_small_cpu", "fpn"), ("soco_c4_small_cpu", "c4")]:
        cfg = load_config(f"train/configs/{name}.yaml")
        assert cfg["method"] == "soco" and cfg["model"]["variant"] == variant
    small = load_config("train/configs/soco_small_cpu.yaml")
    assert small["model"]["backbone"] == "resnet18" and 64 <= small["data"]["image_size"] <= 96


def test_checkpoint_roundtrip_weights_only_and_rng(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = dict(step=7, model={"w": torch.arange(3.0)}, rng=[checkpoint.rng_state()], loader={"epoch": 1, "position": 2})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = checkpoint.save(tmp_path, state, {"method": "soco"})
    (path.parent / ".last.pt.123.tmp").write_bytes(b"partial")  # a save killed mid-way
    loaded = checkpoint.load_latest(tmp_path)  # torch.load(weights_only=True) inside
    assert not list(path.parent.glob(".*.tmp"))
    assert loaded["step"] == 7 and loaded["loader"] == {"epoch": 1, "position": 2}
    torch.testing.assert_close(loaded["model"]["w"], torch.arange(3.0))
    assert (path.parent / "config.yaml").read_text().startswith("method: soco")
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    checkpoint.set_rng_state(loaded["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="cannot read checkpoint .*last.pt"):
        checkpoint.load_latest(tmp_path)
    assert checkpoint.load_latest(tmp_path / "fresh") is None


def test_export_torchvision_strict_and_detectron2_keys(tmp_path):
    torch.manual_seed(0)
    method = get("soco").build({"model": dict(backbone="resnet18", width=64, fpn_channels=16, head_conv_channels=16,
                                              head_fc_dim=32, proj_hidden=32, proj_dim=16)})
    paths = export_method(method, tmp_path)
    tv = torchvision.models.resnet18()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(torch.load(paths["torchvision"], weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    tv.eval(), method.backbone.eval()
    torch.testing.assert_close(tv(x), method.backbone(x))

    d2 = pickle.loads(paths["detectron2"].read_bytes())
    assert d2["matching_heuristics"] is True and d2["__author__"]
    model = d2["model"]
    src = {**{k: v for k, v in method.backbone.state_dict().items()},
           **{"fpn." + k: v for k, v in method.neck.state_dict().items()},
           **{"head." + k: v for k, v in method.head.state_dict().items()}}
    mapping = {"conv1.weight": "stem.conv1.weight", "bn1.running_var": "stem.conv1.norm.running_var",
               "layer1.0.conv2.weight": "res2.0.conv2.weight", "layer1.1.bn2.bias": "res2.1.conv2.norm.bias",
               "layer2.0.downsample.0.weight": "res3.0.shortcut.weight",
               "layer4.0.downsample.1.running_mean": "res5.0.shortcut.norm.running_mean",
               "fpn.lateral_convs.0.conv.weight": "fpn_lateral2.weight",
               "fpn.lateral_convs.3.bn.weight": "fpn_lateral5.norm.weight",
               "fpn.fpn_convs.1.conv.weight": "fpn_output3.weight", "fpn.fpn_convs.2.bn.bias": "fpn_output4.norm.bias",
               "head.conv1.weight": "box_head.conv1.weight", "head.bn4.running_mean": "box_head.conv4.norm.running_mean",
               "head.fc1.weight": "box_head.fc1.weight", "head.fc1.bias": "box_head.fc1.bias"}
    for ours, theirs in mapping.items():
        np.testing.assert_array_equal(model[theirs], src[ours].numpy())
    assert len(model) == sum(not k.endswith("num_batches_tracked") for k in src)
    assert not [k for k in model if "layer" in k or ".bn" in k or "downsample" in k or k.startswith("fc.")]


def test_export_bottleneck_keys(tmp_path):
    method = get("soco").build({"model": dict(variant="c4", backbone="resnet50", width=8, proj_hidden=16, proj_dim=8)})
    model = pickle.loads(export_method(method, tmp_path)["detectron2"].read_bytes())["model"]
    assert "res4.5.conv3.norm.weight" in model and "res2.0.shortcut.norm.bias" in model
    assert not [k for k in model if k.startswith(("fpn", "box_head"))]  # C4: backbone only
    tv_keys = set(torch.load(tmp_path / "backbone_torchvision.pth", weights_only=True))
    full = torchvision.models.resnet50()
    assert tv_keys == set(full.state_dict()) - {"fc.weight", "fc.bias"}


def test_sync_bn_only_on_cuda_and_precision_defaults():
    from train.distributed import DistInfo, convert_sync_bn
    from train.pretrain import autocast_dtype

    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    has_sync = lambda m: any(isinstance(x, torch.nn.SyncBatchNorm) for x in m.modules())  # noqa: E731
    assert not has_sync(convert_sync_bn(net(), DistInfo(world_size=2, device=torch.device("cpu"))))
    assert not has_sync(convert_sync_bn(net(), DistInfo(world_size=1, device=torch.device("cuda", 0))))
    assert has_sync(convert_sync_bn(net(), DistInfo(world_size=2, device=torch.device("cuda", 0))))
    assert autocast_dtype({}, torch.device("cpu")) is None
    assert autocast_dtype({}, torch.device("cuda", 0)) is torch.bfloat16
    assert autocast_dtype({"train": {"precision": "fp16"}}, torch.device("cuda", 0)) is torch.float16
    with pytest.raises(ConfigError, match="train.precision"):
        autocast_dtype({"train": {"precision": "half"}}, torch.device("cpu"))
