"""ResNet distance: geometry of the crops, the distance itself against a direct torchvision
computation, determinism, the missing-weights error, and `make stats` rewriting parts.
The ResNet-50 has random weights (no download here) and 64 px views to stay fast; the
statistic's code path is the same as with the real weights."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision

from common.io import sha256_file
from preprocess.audit import backbones, distance
from preprocess.audit import stats as make_stats
from preprocess.audit.stage import job_stage
from audit_checks import direct_distances
from preprocess.datasets import list_images
from preprocess.decode import load_rgb
from schemas import table_params
from schemas.proposals import PROPOSALS

SMALL = distance.StatsConfig(seed=3, pairs=2, size=64, batch_views=16)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return distance.FeatureDistance(random_weights=True, device="cpu")


@pytest.fixture(scope="module")
def images(sample_raw):
    return [(r.key, load_rgb(r.path)) for r in list_images("sample", sample_raw)[:4]]


def test_crops_follow_random_resized_crop():
    cfg = distance.StatsConfig(seed=0, pairs=200)
    boxes = distance.crop_pairs("img", 320, 240, cfg).reshape(-1, 4)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 320).all() and (boxes[:, 3] <= 240).all()
    area = w * h / (320 * 240)
    assert area.min() >= 0.19 and area.max() <= 1.0
    assert (w / h).min() >= 0.74 and (w / h).max() <= 1.35
    # Same distribution as torchvision's own sampler (rejections bias it below 0.6).
    torch.manual_seed(0)
    img = torch.zeros(3, 240, 320)
    ref = np.array([torchvision.transforms.RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3])
                    for _ in range(400)])
    ref_area = ref[:, 2] * ref[:, 3] / (320 * 240)
    assert area.mean() == pytest.approx(ref_area.mean(), abs=0.04)
    assert np.median(area) == pytest.approx(np.median(ref_area), abs=0.06)
    # A strip no 3/4..4/3 crop of 20%+ area fits in: torchvision's centre-crop fallback.
    x1, y1, x2, y2 = distance.crop_pairs("strip", 1000, 10, cfg)[0, 0]
    assert (x2 - x1, y2 - y1) == (13, 10) and x1 == (1000 - 13) // 2


def test_identical_views_give_zero(model, images):
    key, rgb = images[0]
    boxes = distance.crop_pairs(key, rgb.shape[1], rgb.shape[0], SMALL)[:, 0]
    views = distance.render_views(rgb, boxes, SMALL.size)
    z = model.embed(np.concatenate([views, views]))
    d = distance.pair_distance(z[:len(views)], z[len(views):])
    assert np.abs(d).max() < 1e-6
    other = distance.pair_distance(z[:1], z[1:2])  # two different crops
    assert other[0] > 1e-5


def test_distance_range(model, images):
    d = np.concatenate([dist for _, dist in model.image_distances(images, SMALL)])
    assert d.shape == (len(images) * SMALL.pairs,)
    assert (d >= 0).all() and (d <= 4).all() and d.max() > 0
    u = np.eye(3, dtype=np.float32)
    assert distance.pair_distance(u, -u).tolist() == [4.0, 4.0, 4.0]
    assert distance.pair_distance(u, u[[1, 2, 0]]).tolist() == [2.0, 2.0, 2.0]


def test_agrees_with_direct_torchvision_computation(model, images):
    net = torchvision.models.resnet50(weights=None)
    net.load_state_dict(model.net.state_dict())
    net.fc = torch.nn.Identity()
    net.eval()
    ours = dict(model.image_distances(images[:3], SMALL))
    for key, rgb in images[:3]:
        expected = direct_distances(net, key, rgb, SMALL)
        np.testing.assert_allclose(ours[key], expected, rtol=2e-3, atol=1e-6)


def test_deterministic_under_seed(model, images):
    first = dict(model.image_distances(images, SMALL))
    again = dict(distance.FeatureDistance(random_weights=True).image_distances(images, SMALL))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    other_seed = distance.StatsConfig(seed=4, pairs=2, size=64)
    key, rgb = images[0]
    assert not np.array_equal(distance.crop_pairs(key, 160, 160, SMALL),
                              distance.crop_pairs(key, 160, 160, other_seed))
    # Helper threads for loading and cropping change nothing, order included.
    threaded = list(model.image_distances(images, SMALL, prep_threads=3))
    assert [k for k, _ in threaded] == [k for k, _ in images]
    for key, d in threaded:
        np.testing.assert_allclose(d, first[key], rtol=1e-5)
    # Crops of an image do not depend on which other images are in the batch.
    alone = dict(model.image_distances(images[2:3], SMALL))
    np.testing.assert_allclose(alone[images[2][0]], first[images[2][0]], rtol=1e-5)


def test_missing_weights_error_names_file_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv("WEIGHTS", raising=False)
    with pytest.raises(backbones.MissingWeightsError) as err:
        backbones.find_weights()
    text = str(err.value)
    assert backbones.WEIGHTS_URL in text
    assert str(tmp_path / "hub" / "hub" / "checkpoints" / backbones.WEIGHTS_NAME) in text
    assert "WEIGHTS=" in text
    monkeypatch.setenv("WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(backbones.MissingWeightsError, match="nope.pth does not exist"):
        distance.FeatureDistance()
    garbage = tmp_path / backbones.WEIGHTS_NAME
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(backbones.MissingWeightsError, match="not a loadable"):
        distance.FeatureDistance(weights=garbage)


def write_parts(work, dataset: str, root, records, per_part: int = 3) -> list:
    """Minimal proposals parts over real images (boxes = the ground truth), plus one failed
    row, as the preprocessing job would leave them: part-NNNNN.parquet + _job.json."""
    folder = work / dataset / "proposals"
    folder.mkdir(parents=True)
    rows = []
    for r in records:
        rgb = load_rgb(r.path)
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in (r.gt or [])] or [[0, 0, rgb.shape[1], rgb.shape[0]]]
        rows.append({"key": r.key, "source_path": r.relpath, "status": "ok", "width": rgb.shape[1],
                     "height": rgb.shape[0], "boxes": boxes, "num_boxes": len(boxes),
                     "filter_rule": "soco" if r.gt else "whole_image", "num_segments": 5,
                     "num_masks": 3})
    rows.append({"key": "broken", "source_path": "images/broken.jpg", "status": "failed",
                 "error": "DecodeError: truncated JPEG"})
    paths = []
    for i in range(0, len(rows), per_part):
        paths.append(folder / f"part-{i // per_part:05d}.parquet")
        pq.write_table(PROPOSALS.from_rows(rows[i:i + per_part], params={"job": "test"}), paths[-1])
    (folder / "_job.json").write_text(json.dumps({"root": str(root)}))
    return paths


@pytest.fixture()
def parts(tmp_path, sample_raw, monkeypatch):
    monkeypatch.setenv("WORK_DIR", str(tmp_path / "work"))
    records = list_images("sample", sample_raw)[:5]
    return write_parts(tmp_path / "work", "mini", sample_raw, records), sample_raw


def test_make_stats_fills_columns_and_keeps_the_rest(parts, model, capsys):
    paths, root = parts
    before = [pq.read_table(p) for p in paths]
    summary = make_stats.run_stats("mini", SMALL, random_weights=True, use_ray=False)
    assert summary["parts_written"] == len(paths) and summary["with_stats"] == 5
    assert summary["without_stats"] == 1  # the failed row, counted, not dropped
    after = [pq.read_table(p) for p in paths]
    records = {r.key: r for r in list_images("sample", root)}
    for old, new in zip(before, after):
        assert new.num_rows == old.num_rows
        for name in old.column_names:
            if name not in distance.STATS_COLUMNS:
                assert new.column(name).equals(old.column(name)), name
        params = table_params(new.schema)
        assert params["job"] == "test" and params["stats"]["meaningful"] is False
        assert params["stats"]["seed"] == SMALL.seed and params["stats"]["weights"] == "random"
        for row in new.to_pylist():
            if row["status"] != "ok":
                assert row["resnet_distance_mean"] is None and row["stats_meaningful"] is None
                continue
            d = dict(model.image_distances([(row["key"], load_rgb(records[row["key"]].path))], SMALL))
            assert row["resnet_distance_mean"] == pytest.approx(float(d[row["key"]].mean()), rel=1e-5)
            assert row["resnet_distance_std"] == pytest.approx(float(d[row["key"]].std(ddof=1)), rel=1e-4)
            assert row["resnet_distance_pairs"] == SMALL.pairs and row["stats_meaningful"] is False
    # A rerun with the same settings leaves the parts alone; new settings refresh them.
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert make_stats.run_stats("mini", SMALL, random_weights=True, use_ray=False)["parts_written"] == 0
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    other = distance.StatsConfig(seed=9, pairs=1, size=64)
    assert make_stats.run_stats("mini", other, random_weights=True, use_ray=False)["parts_written"] == len(paths)
    row = pq.read_table(paths[0]).to_pylist()[0]
    assert row["resnet_distance_pairs"] == 1 and row["resnet_distance_std"] is None


def test_unreadable_or_changed_image_gets_null_and_a_message(tmp_path, sample_raw, monkeypatch, capsys):
    monkeypatch.setenv("WORK_DIR", str(tmp_path / "work"))
    root = tmp_path / "raw"
    shutil.copytree(sample_raw, root)
    records = list_images("sample", root)[:3]
    write_parts(tmp_path / "work", "gone", root, records, per_part=10)
    (root / records[0].relpath).unlink()
    small = load_rgb(records[1].path)[:40, :50]
    from PIL import Image
    Image.fromarray(small).save(root / records[1].relpath)
    summary = make_stats.run_stats("gone", SMALL, random_weights=True, use_ray=False)
    assert summary["with_stats"] == 1 and summary["without_stats"] == 3  # + the failed row
    err = capsys.readouterr().err
    assert f"{root / records[0].relpath}: cannot read" in err
    assert f"{root / records[1].relpath}: is 50x40 now" in err
    by_key = {r["key"]: r for r in pq.read_table(tmp_path / "work/gone/proposals/part-00000.parquet").to_pylist()}
    assert by_key[records[0].key]["resnet_distance_mean"] is None
    assert by_key[records[1].key]["resnet_distance_mean"] is None
    assert by_key[records[2].key]["resnet_distance_mean"] is not None


def test_make_stats_without_weights_fails_clearly(parts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("WEIGHTS", raising=False)
    assert make_stats.main(["--dataset", "mini", "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert backbones.WEIGHTS_URL in err and backbones.WEIGHTS_NAME in err
    assert make_stats.main(["--dataset", "absent", "--random-weights", "--no-ray"]) == 2
    assert "make proposals DATASET=absent" in capsys.readouterr().err


def test_proposals_job_runs_the_stage_when_weights_exist(sample_raw, tmp_path, monkeypatch):
    """`make proposals --stats on` fills the columns through the actor pool in the Ray job and
    records params["stats"], so a later `make stats` finds the parts current; `make stats
    --force` through its own actor pool gives the same numbers. One Ray session for both.
    The weights file holds a random ResNet-50 saved under the official name (none can be
    downloaded here)."""
    import ray
    from preprocess.job import JobConfig, run
    weights = tmp_path / backbones.WEIGHTS_NAME
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    digest = sha256_file(weights)
    monkeypatch.setenv("WEIGHTS", str(weights))
    work = tmp_path / "work"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run(JobConfig(dataset="sample", root=str(sample_raw), work_dir=str(work), part_size=2,
                      limit=3, num_cpus=2), [job_stage("on")])
        paths = sorted(proposals_dir_of(work).glob("part-*.parquet"))
        rows = [r for p in paths for r in pq.read_table(p).to_pylist()]
        current = make_stats.run_stats("sample", distance.StatsConfig(), use_ray=False, work=work)
        again = make_stats.run_stats("sample", distance.StatsConfig(), force=True, work=work, batch_images=2)
    finally:
        ray.shutdown()
        weights.unlink()  # 100 MB; pytest keeps its last temporary folders
    assert again["parts_written"] == len(paths) and again["with_stats"] == 3
    refreshed = [r for p in paths for r in pq.read_table(p).to_pylist()]
    assert [r["resnet_distance_mean"] for r in refreshed] == pytest.approx(
        [r["resnet_distance_mean"] for r in rows], rel=1e-5)
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    assert all(0 <= r["resnet_distance_mean"] <= 4 and r["resnet_distance_pairs"] == 4 for r in rows)
    assert all(r["stats_meaningful"] is True for r in rows)
    assert table_params(pq.read_schema(paths[0]))["stats"]["weights_sha256"] == digest
    model = distance.FeatureDistance(random_weights=True, device="cpu")  # the same seed-0 weights
    key = rows[0]["key"]
    record = {r.key: r for r in list_images("sample", sample_raw)}[key]
    d = dict(model.image_distances([(key, load_rgb(record.path))], distance.StatsConfig()))[key]
    assert rows[0]["resnet_distance_mean"] == pytest.approx(float(d.mean()), rel=1e-4)
    assert current["parts_written"] == 0 and current["parts_skipped"] == len(paths)
    with pytest.raises(ValueError, match="--stats on: .*does not exist"):
        monkeypatch.setenv("WEIGHTS", str(tmp_path / "gone.pth"))
        job_stage("on")


def proposals_dir_of(work):
    from common.paths import proposals_dir
    return proposals_dir("sample", work)
