"""The distance statistic through other backbones (`make stats BACKBONE=...`): an export of
ours, a checkpoint of ours, a timm model from a local file. Every network here has RANDOM
weights (seeded; nothing can be downloaded and nothing is trained in a test), so the numbers
mean nothing about the data; what is checked is that the statistic is computed with exactly
that network (against a direct computation with torchvision's / timm's own pieces), that
the parts record which network (name + sha256), and that the report keeps each network's
figures apart."""
from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision

from common.io import sha256_file
from common.paths import proposals_dir
from preprocess.audit import backbones, distance, report
from preprocess.audit import stats as make_stats
from preprocess.datasets import list_images
from preprocess.decode import load_rgb
from schemas import table_params
from train.checkpoint import save
from train.config import load_config, save_config

from audit_checks import direct_distances

SMALL = distance.StatsConfig(seed=2, pairs=2, size=64, batch_views=16)
REPO_CONFIGS = "train/configs"


@pytest.fixture(scope="module")
def images(sample_raw):
    return [(r.key, load_rgb(r.path)) for r in list_images("sample", sample_raw)[:3]]


def export_run(root, arch="resnet18", width=64, seed=0):
    """A run folder as `make pretrain` leaves it: checkpoints/config.yaml + exported/."""
    from train.models.backbone import build_backbone
    torch.manual_seed(seed)
    net = build_backbone(arch, width=width, zero_init_residual=False)
    (root / "exported").mkdir(parents=True)
    torch.save(net.state_dict(), root / "exported" / "backbone_torchvision.pth")
    cfg = load_config(f"{REPO_CONFIGS}/soco_small_cpu.yaml")
    cfg["model"].update(backbone=arch, width=width)
    (root / "checkpoints").mkdir()
    save_config(cfg, root / "checkpoints" / "config.yaml")
    return net


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain") / "soco_test"
    export_run(root)
    return root


def test_an_export_of_ours_gives_the_statistic_of_that_network(run_dir, images):
    chosen = backbones.resolve(str(run_dir))
    path = run_dir / "exported" / "backbone_torchvision.pth"
    assert chosen.kind == "export" and chosen.arch == "resnet18" and chosen.width == 64
    assert chosen.sha256 == sha256_file(path) and "soco_test" in chosen.name
    model = distance.FeatureDistance(backbone=chosen, device="cpu")
    ref = torchvision.models.resnet18(weights=None)  # width 64 = torchvision's own network
    ref.fc = torch.nn.Identity()
    ref.load_state_dict(torch.load(path, weights_only=True))
    ref.eval()
    ours = dict(model.image_distances(images, SMALL))
    for key, rgb in images:
        np.testing.assert_allclose(ours[key], direct_distances(ref, key, rgb, SMALL), rtol=2e-3, atol=1e-6)
    # The exported file named directly is the same backbone.
    assert backbones.resolve(str(path)) == chosen


def test_a_checkpoint_of_ours_is_built_through_its_method(tmp_path, images):
    from train.methods import build_method
    cfg = load_config(f"{REPO_CONFIGS}/soco_small_cpu.yaml")
    torch.manual_seed(1)
    _, method = build_method(cfg)
    with torch.no_grad():  # BN statistics that differ from the defaults: loading must carry them
        for m in method.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    out = tmp_path / "run"
    last = save(out, {"step": 3, "model": method.state_dict()}, cfg)
    chosen = backbones.resolve(str(out))
    assert chosen.kind == "checkpoint" and chosen.path == str(last) and chosen.width == 16
    model = distance.FeatureDistance(backbone=chosen, device="cpu")
    ref = method.export_modules()["backbone"].eval()
    loaded = model.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ref.state_dict().items())
    ours = dict(model.image_distances(images, SMALL))
    for key, rgb in images:  # small distances (random net): PIL box-resize vs crop+resize rounding
        np.testing.assert_allclose(ours[key], direct_distances(ref, key, rgb, SMALL), rtol=5e-3, atol=1e-4)
    # An export beside the checkpoint wins: it is what the run shipped.
    export_run(tmp_path / "both")
    save(tmp_path / "both", {"step": 3, "model": method.state_dict()}, cfg)
    assert backbones.resolve(str(tmp_path / "both")).kind == "export"


def test_a_timm_model_loads_from_a_local_file(tmp_path, images):
    timm = pytest.importorskip("timm", reason="timm not installed (requirements.txt pins timm==1.0.31)")
    torch.manual_seed(3)
    net = timm.create_model("test_vit", pretrained=False, num_classes=0)
    weights = tmp_path / "test_vit.pth"
    torch.save(net.state_dict(), weights)
    chosen = backbones.resolve("timm:test_vit", str(weights))
    assert chosen.kind == "timm" and chosen.sha256 == sha256_file(weights)
    model = distance.FeatureDistance(backbone=chosen, device="cpu")
    cfg = net.pretrained_cfg
    at_size = distance.StatsConfig(seed=2, pairs=2, size=cfg["input_size"][-1])  # test_vit: 160 px
    ours = dict(model.image_distances(images, at_size))
    for key, rgb in images:
        np.testing.assert_allclose(ours[key], direct_distances(net.eval(), key, rgb, at_size, cfg["mean"], cfg["std"]),
                                   rtol=5e-3, atol=1e-4)


def test_bad_backbone_specs_say_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.delenv("WEIGHTS", raising=False)
    with pytest.raises(backbones.BackboneError, match="no such file or folder.*timm:<model name>"):
        backbones.resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(backbones.BackboneError, match="neither exported/backbone_torchvision.pth"):
        backbones.resolve(str(tmp_path / "empty"))
    lone = tmp_path / "lone.pth"
    torch.save({}, lone)
    with pytest.raises(backbones.BackboneError, match="checkpoints/config.yaml"):
        backbones.resolve(str(lone))
    with pytest.raises(backbones.BackboneError, match="needs WEIGHTS=<local weights file>"):
        backbones.resolve("timm:test_vit")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(backbones.BackboneError, match="pip install timm==1.0.31"):
        backbones.resolve("timm:test_vit", str(lone))
    # Through `make stats`: one line, exit status 2, no traceback.
    assert make_stats.main(["--dataset", "x", "--backbone", str(tmp_path / "nope")]) == 2


@pytest.fixture()
def two_backbones(sample_parts, run_dir, tmp_path, monkeypatch):
    """Dataset 'a' measured with the random stand-in of torchvision's ResNet-50, 'b' with the
    export of ours (both random weights), then one report over both."""
    work, name = sample_parts
    for ds in ("a", "b"):
        shutil.copytree(proposals_dir(name, work), proposals_dir(ds, tmp_path))
    make_stats.run_stats("a", SMALL, random_weights=True, use_ray=False, work=tmp_path)
    monkeypatch.setenv("WORK_DIR", str(tmp_path))
    assert make_stats.main(["--dataset", "b", "--backbone", str(run_dir), "--no-ray",
                            "--pairs", "2", "--size", "64", "--seed", "2"]) == 0
    out = report.build_report(["a", "b"], "ab", work=tmp_path, reps=100, top=1, gallery=False)
    return tmp_path, out


def test_parts_record_the_backbone_and_the_report_never_mixes_two(two_backbones, run_dir):
    work, out = two_backbones
    sp = table_params(pq.read_schema(proposals_dir("b", work) / "part-00000.parquet"))["stats"]
    digest = sha256_file(run_dir / "exported" / "backbone_torchvision.pth")
    assert sp["backbone"]["kind"] == "export" and sp["backbone"]["sha256"] == digest
    assert sp["weights_sha256"] == digest and sp["meaningful"] is True
    page = (out / "index.html").read_text()
    # One table per backbone, each naming it, each holding only its dataset.
    blocks = re.split(r'<p class="backbone" data-backbone=', page.split('id="distribution"')[0])[1:]
    assert len(blocks) == 2
    by_label = {b.split(">")[0]: b for b in blocks}
    ours = next(b for k, b in by_label.items() if "soco_test" in k)
    stand_in = next(b for k, b in by_label.items() if "random" in k)
    assert "<b>b</b>" in ours and "<b>a</b>" not in ours and digest[:12] in ours
    assert "not comparable to MaskCo Table 1" in ours and "paper: COCO" not in ours
    assert "<b>a</b>" in stand_in and "<b>b</b>" not in stand_in and "paper: COCO" in stand_in
    # Two ECDF charts, one per backbone, each with one line.
    charts = re.findall(r"<svg.*?</svg>", page.split('id="distribution"')[1].split('id="examples"')[0], flags=re.S)
    assert len(charts) == 2 and all(c.count("<polyline") == 1 for c in charts)
    summary = json.loads((out / "summary.json").read_text())
    for ds in ("a", "b"):
        groups = summary["datasets"][ds]["distance_by_backbone"]
        assert len(groups) == 1 and next(iter(groups.values()))["n"] == 14
    assert summary["datasets"]["b"]["resnet_distance"]["backbone"]["sha256"] == digest


def test_a_dataset_whose_parts_disagree_is_split_by_backbone(two_backbones):
    """Parts of one dataset refreshed with different networks (an interrupted `make stats
    BACKBONE=...`): each network's images are compared only with each other."""
    work, _ = two_backbones
    shutil.copytree(proposals_dir("a", work), proposals_dir("mixed", work))
    shutil.copy(proposals_dir("b", work) / "part-00000.parquet", proposals_dir("mixed", work) / "part-00000.parquet")
    out = report.build_report(["mixed"], "mixed", work=work, reps=100, top=1, gallery=False)
    summary = json.loads((out / "summary.json").read_text())["datasets"]["mixed"]
    counts = sorted(g["n"] for g in summary["distance_by_backbone"].values())
    assert counts == [4, 10]  # part 0 holds 4 images
    assert summary["resnet_distance"]["n"] == 10 and summary["resnet_distance"]["backbone"]["kind"] == "random"
    page = (out / "index.html").read_text()
    assert page.count('<p class="backbone" data-backbone=') == 2
    assert page.count("(other backbones or none)") == 2
