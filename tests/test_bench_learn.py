"""`make bench-learn` end to end on the tiny sample (2 training steps: this checks the bench's
plumbing, not that anything learns -- bench/results/learn.json holds the real run): the real
trainer as a subprocess, the crop-probe target against random init, MoCo v2's ln(K+1), and
--merge keeping the other methods' rows, and --also-test probing a run on a further sample."""
from __future__ import annotations

import json
import math

from bench import learn


def test_bench_learn_trains_probes_against_random_merges_rows_and_probes_further_samples(sample_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "learn.json"
    out.write_text(json.dumps({"methods": {"soco": {"kept": True}, "mocov2": {"stale": True}}}))
    extra = ("train.steps=2 data.batch_size=4 model.queue_size=8 train.checkpoint_every=2 "
             "eval.every=0 train.log_every=1")
    assert learn.main(["--train-shards", str(sample_shards), "--test-shards", str(sample_shards),
                       "--methods", "mocov2", "--extra", extra, "--image-size", "64", "--out", str(out),
                       "--merge", "--also-test", str(sample_shards)]) == 0
    doc = json.loads(out.read_text())
    assert doc["methods"]["soco"] == {"kept": True}                 # --merge keeps the other rows
    row = doc["methods"]["mocov2"]
    assert "stale" not in row and row["steps"] == 2 and row["overrides"] == extra
    assert row["target"]["scope"] == "crop" and row["target"]["level"] == "res5"
    assert row["target"]["lo"] <= row["target"]["diff"] <= row["target"]["hi"]
    assert row["target"]["met"] == (row["target"]["diff"] >= learn.TARGET)
    assert row["ln_k_plus_1"] == math.log(9)
    # the further sample is the test sample again: the same network probed twice, the same figure
    (again,) = row["target"]["also"]
    assert again["test_shards"] == str(sample_shards)
    assert (again["diff"], again["lo"], again["hi"]) == (row["target"]["diff"], row["target"]["lo"], row["target"]["hi"])
    assert row["target"]["samples"] == 2 and row["target"]["mean_over_samples"] == row["target"]["diff"]
    assert row["target"]["met_on_samples"] == 2 * row["target"]["met"]
    scopes = {r["scope"] for r in row["results"]}
    assert scopes == {"image", "object", "crop"}
    assert {r["network"] for r in row["results"]} == {"pretrained", "random"}
    assert row["wall_s"] > 0 and row["cpu_s"] > 0 and row["cpu_ratio_to_mocov2"] == 1.0


def test_the_target_level_is_res5_for_a_resnet_and_a_vits_token_map_never_its_cls_vector():
    resnet, vit = ["res2", "res3", "res4", "res5"], ["tokens", "cls"]
    assert learn.target_level("res5", resnet) == "res5"
    assert learn.target_level("res4", resnet) == "res4"
    assert learn.target_level("res5", vit, vector_levels=["cls"]) == "tokens"
    assert learn.target_level("cls", vit, vector_levels=["cls"]) == "cls"     # asked for by name
    assert learn.target_level("res5", ["tokens"]) == "tokens"


def test_a_further_sample_without_shards_stops_before_training_naming_it_and_the_make_target(sample_shards, tmp_path,
                                                                                             monkeypatch):
    import pytest
    monkeypatch.setenv("WORK_DIR", str(tmp_path / "work"))
    missing = tmp_path / "sample_seed3" / "shards"
    with pytest.raises(SystemExit) as e:
        learn.main(["--train-shards", str(sample_shards), "--test-shards", str(sample_shards),
                    "--methods", "mocov2", "--out", str(tmp_path / "learn.json"), "--also-test", str(missing)])
    assert str(missing) in str(e.value) and "make bench-learn-samples" in str(e.value)
    assert not (tmp_path / "work" / "bench_learn").exists() and not (tmp_path / "learn.json").exists()
