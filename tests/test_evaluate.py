"""`python -m train.evaluate` on a real (tiny) run: summary.json and the HTML page, whose
tables a headless Chromium shows with the summary's numbers; bad input (unknown run,
missing export, shards without labels) ends in one clear message; online eval logs the
object-crop kNN of both branches through the trainer's callback."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from train.config import load_config
from train.evaluate import main as evaluate_main
from train.pretrain import train

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
RUN_ARGS = ["data.batch_size=4", "train.steps=2", "train.checkpoint_every=2", "train.log_every=1",
            "train.tensorboard=false", "model.queue_size=8", "eval.every=1", "eval.image_size=64",
            "eval.levels=[res4,res5]"]


@pytest.fixture(scope="module")
def tiny_run(sample_shards, tmp_path_factory) -> Path:
    """Two MoCo v2 steps on the sample with online eval every step (the real trainer)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("eval_run") / "mocov2_tiny"
    train(load_config(CONFIGS / "mocov2_small_cpu.yaml", [f"data.shards={sample_shards}",
                                                          f"train.out={out}", *RUN_ARGS]))
    return out


def _evaluate(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()   # drop what earlier steps printed
    try:
        code = evaluate_main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_online_eval_logs_the_object_crop_knn_of_both_branches_every_step_and_at_the_end(tiny_run):
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [1, 2]          # the end (step 2) is not evaluated twice
    for r in evals:
        for key in ("knn_crop_res4", "knn_crop_res5", "knn_crop_res4_target", "knn_crop_res5_target"):
            assert 0.0 <= r[key] <= 1.0, key
        assert r["seconds"] > 0
    steps = [r for r in records if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert "[eval] step 2: knn_crop_res4" in (tiny_run / "train.log").read_text()


def test_online_eval_puts_the_model_back_in_train_mode_and_skips_other_ranks(sample_shards):
    from types import SimpleNamespace
    from train.eval.online import OnlineEval
    from train.methods import build_method
    cfg = load_config(CONFIGS / "mocov2_small_cpu.yaml", [f"data.shards={sample_shards}", *RUN_ARGS])
    _, method = build_method(cfg)
    method.train()
    logged = []
    metrics = SimpleNamespace(record=lambda step, group, **v: logged.append((step, group, v)), say=lambda s: None)
    cb = OnlineEval(cfg)
    for is_main in (False, True):
        info = SimpleNamespace(is_main=is_main, device=torch.device("cpu"))
        from train.callbacks import TrainContext
        ctx = TrainContext(cfg=cfg, method=method, step=1, total=2, steps_per_epoch=3, out=Path("."),
                           info=info, metrics=metrics)
        cb.on_step_end(ctx)
    assert [(s, g) for s, g, _ in logged] == [(1, "eval")]               # rank 0 only
    assert method.training and method.key_backbone.training and method.backbone.training


def test_evaluate_writes_a_summary_and_a_page_for_pretrained_and_random(tiny_run, sample_shards, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, err = _evaluate(capsys, tiny_run, "--train", sample_shards, "--levels", "res3", "C5",
                                  "--image-size", "64", "--k", "5", "--out", out)
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["schema"] == "regionssl.eval/1" and s["method"] == "mocov2"
    assert s["weights"].endswith("exported/backbone_torchvision.pth") and s["settings"]["k"] == 5
    keys = {(r["scope"], r["level"], r["probe"], r["network"]) for r in s["results"]}
    assert keys == {(sc, lv, p, n) for sc in ("image", "object", "crop") for lv in ("res3", "C5")
                    for p in ("knn", "linear") for n in ("pretrained", "random")}
    for r in s["results"]:
        assert 0 <= r["lo"] <= r["acc"] <= r["hi"] <= 1 and r["n"] > 0
    assert s["settings"]["crop_size"] == 64                            # data.image_size of the run
    assert len(s["differences"]) == 12 and all(d["lo"] <= d["diff"] <= d["hi"] for d in s["differences"])
    assert s["train"]["images"] + s["test"]["images"] == 14              # the split keeps every image
    assert [r["step"] for r in s["online"]] == [1, 2]
    assert "object  C5     knn" in stdout                               # the printed table


def _dom_cells(html_path: Path, tmp_path: Path) -> dict[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (Debian package `chromium`): the page's browser check is skipped")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "page.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,1600", html_path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = subprocess.run([chromium, *flags, "--dump-dom", html_path.as_uri()], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    assert "<svg" in dom and "<polyline" in dom                         # bar charts and the online curve
    return dict(re.findall(r'data-cell="([^"]+)">([^<]+)<', dom))


def test_the_page_in_chromium_shows_the_numbers_of_summary_json(tiny_run, sample_shards, tmp_path, capsys):
    out = tmp_path / "eval"
    code, _, err = _evaluate(capsys, tiny_run, "--train", sample_shards, "--levels", "res5",
                             "--image-size", "64", "--out", out)
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    cells = _dom_cells(out / "index.html", tmp_path)
    expected = {f"{r['scope']}/{r['level']}/{r['probe']}/{r['network']}": f"{r['acc']:.3f}" for r in s["results"]}
    expected.update({f"{d['scope']}/{d['level']}/{d['probe']}/{d['network']}-random": f"{d['diff']:+.3f}"
                     for d in s["differences"]})
    assert cells == expected


def test_an_unknown_run_is_one_message_naming_it_and_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORK_DIR", str(tmp_path))
    code, _, err = _evaluate(capsys, "no_such_run")
    assert code == 2 and "unknown run 'no_such_run'" in err and "make pretrain" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_run_without_export_says_how_to_export_or_use_the_checkpoint(tiny_run, sample_shards, tmp_path, capsys):
    run = tmp_path / "noexport"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("exported"))
    code, _, err = _evaluate(capsys, run, "--train", sample_shards)
    assert code == 2 and "backbone_torchvision.pth not found" in err
    assert "python -m train.export --checkpoint" in err and "--checkpoint" in err
    code, _, err = _evaluate(capsys, run, "--train", sample_shards, "--checkpoint", "--target", "--levels",
                             "res5", "--image-size", "64", "--out", tmp_path / "ckpt")
    assert code == 0, err
    assert json.loads((tmp_path / "ckpt" / "summary.json").read_text())["weights"].endswith("last.pt (target)")


def test_a_vit_run_is_evaluated_from_its_timm_export_at_its_tokens_and_cls_levels(sample_shards, tmp_path, capsys):
    """ccMIM's tiny ViT (random init, 2 steps): the export is backbone_timm.pth, the levels
    default to the backbone's own (`tokens`, then the CLS embedding `cls`, which has no
    object-scope row), and the exported weights are the ones probed."""
    out = tmp_path / "ccmim_tiny"
    train(load_config(CONFIGS / "ccmim_small_cpu.yaml", [f"data.shards={sample_shards}", f"train.out={out}",
                                                          "data.batch_size=4", "train.steps=2",
                                                          "train.checkpoint_every=2", "train.tensorboard=false"]))
    code, _, err = _evaluate(capsys, out, "--train", sample_shards, "--image-size", "96", "--k", "5",
                             "--out", tmp_path / "eval")
    assert code == 0, err
    s = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert s["weights"].endswith("exported/backbone_timm.pth") and s["settings"]["levels"] == ["tokens", "cls"]
    assert s["settings"]["vector_levels"] == ["cls"]
    assert {(r["scope"], r["level"]) for r in s["results"]} == {("image", "tokens"), ("object", "tokens"),
                                                                 ("crop", "tokens"), ("image", "cls"), ("crop", "cls")}
    from train.evaluate import load_backbone
    net, _ = load_backbone(load_config(out / "checkpoints" / "config.yaml"), out)
    exported = torch.load(out / "exported" / "backbone_timm.pth", weights_only=True)
    assert all(torch.equal(net.vit.state_dict()[k], v) for k, v in exported.items())


def test_shards_without_labels_are_one_message_with_the_fix(tiny_run, sample_parts, tmp_path, capsys):
    from common.paths import proposals_dir
    from shards.write import PackParams, write_shards
    work, dataset = sample_parts
    parts = tmp_path / "parts"
    shutil.copytree(proposals_dir(dataset, work), parts)
    for p in parts.glob("part-*.parquet"):        # the same images with their ground truth removed
        t = pq.read_table(p)
        for col in ("gt_json", "gt_png"):
            i = t.schema.get_field_index(col)
            t = t.set_column(i, t.schema.field(i), pa.nulls(len(t), t.schema.field(i).type))
        pq.write_table(t, p)
    shards = tmp_path / "shards"
    write_shards(dataset, PackParams(), proposals=parts, out=shards)
    code, _, err = _evaluate(capsys, tiny_run, "--train", shards)
    assert code == 2 and f"{shards}: none of its 14 samples has a label" in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert "EVAL_DATASET=sample" in err and len(errors) == 1 and "Traceback" not in err
    # the same shards as the online eval's bank: the trainer stops before training, in one line
    from train.pretrain import main as pretrain_main
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        pretrain_main(["--config", str(CONFIGS / "mocov2_small_cpu.yaml"), f"data.shards={shards}",
                       f"train.out={tmp_path / 'online'}", *RUN_ARGS])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "online eval (eval.every=1)" in err and "eval.every=0" in err
    assert "none of its 14 samples has a label" in err and "Traceback" not in err
    assert not (tmp_path / "online" / "checkpoints").exists()


@pytest.mark.parametrize("config,levels,scope,says", [
    ("mocov2_small_cpu", "[res9]", "crop", "unknown feature level 'res9'"),
    ("ccmim_small_cpu", "[tokens,cls]", "object", "['cls'] is one vector an image"),
])
def test_online_eval_levels_the_backbone_cannot_give_stop_the_trainer_before_it_trains(
        sample_shards, tmp_path, capsys, config, levels, scope, says):
    from train.pretrain import main as pretrain_main
    out = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        pretrain_main(["--config", str(CONFIGS / f"{config}.yaml"), f"data.shards={sample_shards}",
                       f"train.out={out}", "data.batch_size=4", "train.steps=2", "train.tensorboard=false",
                       "eval.every=1", "eval.image_size=64", f"eval.levels={levels}", f"eval.scope={scope}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and says in err and "eval.levels" in err and "Traceback" not in err
    assert not (out / "checkpoints").exists()
