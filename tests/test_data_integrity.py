"""Attacks on shards as the trainer's loader meets them: flipped bytes in members, deleted
or unlisted shards, manifests of other schema versions, shards of the old format, JPEGs
that decode with errors, and the bad-sample policy. Every shard here comes from the real
writer (train.loader.synthetic.pack -> shards.write), every attack is done to the files."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from shards.reader import ShardDataset
from train.loader import ShardReadError, build_loader
from train.loader.synthetic import draw_image, jpeg, pack, write_shards

BACKENDS = ["dali", "reference"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("integrity") / "shards", 8, per_shard=4, seed=1)


@pytest.fixture
def copy(shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    return out


def flip(folder, key_index: int, ext: str, at: float = 0.5) -> dict:
    """Flip one byte inside member `ext` of the key_index-th sample; returns its row."""
    data = ShardDataset(folder)
    row = data.row(key_index)
    member = next(m for m in row["members"] if m["ext"] == ext)
    path = folder / row["shard"]
    raw = bytearray(path.read_bytes())
    raw[member["offset"] + int(member["size"] * at)] ^= 0x5A
    path.write_bytes(bytes(raw))
    return row | {"member": member}


def run_epoch(folder, backend, batch=2, **kw):
    loader = build_loader("soco", folder, batch, backend=backend, num_workers=0, **kw)
    return loader, list(loader)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ext", ["jpg", "boxes"])
def test_a_flipped_byte_in_a_member_stops_the_run_naming_shard_key_member_and_offset(
        ext, backend, copy):
    row = flip(copy, 3, ext, at=0.6 if ext == "jpg" else 0.1)
    where = (f"{copy / row['shard']}: sample {row['key']} member {row['key']}.{ext} at offset "
             f"{row['member']['offset']}: crc32 mismatch")
    with pytest.raises(ShardReadError, match=rf"{where}.*make shards"):
        run_epoch(copy, backend)


def test_a_deleted_or_an_unlisted_shard_is_refused_before_training(copy):
    victim = sorted(copy.glob("*.tar"))[1]
    stray = copy / "other-000000.tar"
    shutil.copy(victim, stray)
    with pytest.raises(ShardReadError, match=rf"{stray}: a tar that manifest.json does not list"):
        build_loader("soco", copy, 2)
    stray.unlink()
    victim.unlink()
    with pytest.raises(ShardReadError, match=rf"{victim}: shard listed in manifest.json is "
                                             r"missing.*copy it back.*make shards"):
        build_loader("soco", copy, 2)


@pytest.mark.parametrize("version,message", [("2.0", "newer than"), ("0.9", "older than")])
def test_a_manifest_of_another_major_version_is_refused(version, message, copy):
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(manifest | {"schema_version": version}))
    with pytest.raises(ShardReadError, match=rf"manifest schema version {version} is {message}"):
        build_loader("soco", copy, 2)


def test_a_sample_count_that_disagrees_with_the_manifest_is_refused(copy):
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["num_samples"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(ShardReadError, match=rf"{manifest['shards'][0]['name']}: index.parquet "
                                             r"lists 4 samples in it, manifest.json says 5"):
        build_loader("soco", copy, 2)


def test_shards_of_the_1_0_format_still_load_and_their_flips_are_caught(copy):
    """Index 1.0 had no per-member crc32 (and 16-bit label maps): reads check the whole
    sample's crc32 instead."""
    path = copy / "index.parquet"
    table = pq.read_table(path).drop_columns(["member_crc32"])
    meta = dict(table.schema.metadata)
    key = next(k for k in meta if b"version" in k)
    meta[key] = meta[key].replace(b"1.1", b"1.0")
    pq.write_table(table.replace_schema_metadata(meta), path)
    manifest = json.loads((copy / "manifest.json").read_text()) | {"schema_version": "1.0"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    loader, batches = run_epoch(copy, "reference")
    assert len(batches) == len(loader) == 4
    row = flip(copy, 2, "boxes", at=0.1)
    with pytest.raises(ShardReadError, match=rf"sample {row['key']} at offset {row['tar_offset']}: "
                                             r"crc32 mismatch"):
        run_epoch(copy, "reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_bad_samples_skips_and_lists_them_keeping_every_batch_and_rank_full(backend, copy):
    first = flip(copy, 1, "jpg")
    second = flip(copy, 6, "boxes", at=0.1)
    ranks = [build_loader("soco", copy, 2, backend=backend, num_workers=0, rank=r, world_size=2,
                          max_bad_samples=2) for r in range(2)]
    for loader in ranks:
        batches = list(loader)
        assert len(batches) == len(loader) == 2
        assert all(b["view1"].shape[0] == 2 for b in batches)
        used = torch.cat([b["index"] for b in batches]).tolist()
        assert 1 not in used and 6 not in used  # replaced by the next readable samples
    bad = ranks[0].bad_samples + ranks[1].bad_samples
    assert sorted(k for k, _ in bad) == sorted([first["key"], second["key"]])
    assert all("crc32 mismatch" in reason for _, reason in bad)
    strict = build_loader("soco", copy, 8, backend=backend, num_workers=0, max_bad_samples=1)
    with pytest.raises(ShardReadError, match=r"more than data.max_bad_samples = 1; skipped so far"):
        list(strict)


def test_skipped_samples_from_loader_workers_reach_the_parent(copy):
    row = flip(copy, 5, "jpg")
    loader = build_loader("soco", copy, 2, backend="reference", num_workers=2, max_bad_samples=3)
    assert len(list(loader)) == len(loader) == 4
    assert [k for k, _ in loader.bad_samples] == [row["key"]]


def test_a_jpeg_that_decodes_with_errors_fails_packing_naming_its_key(tmp_path):
    """One byte flipped after the start of scan: OpenCV, PIL and torchvision decode it to
    garbage without an error; the writer's strict decode refuses it."""
    rng = np.random.default_rng(0)
    rgb, labels, rects = draw_image(rng, 96, 64, 2)
    rgb = (rgb.astype(int) + rng.integers(-20, 20, rgb.shape)).clip(0, 255).astype(np.uint8)
    good = jpeg(rgb)
    bad = bytearray(good)
    bad[good.index(b"\xff\xda") + 50] ^= 0x55  # (some flips stay valid JPEG: no decoder sees them)
    from PIL import Image
    Image.open(io.BytesIO(bytes(bad))).load()  # decodes "fine" in PIL
    out = pack(tmp_path / "shards", [("good", good, labels, rects), ("bad", bytes(bad), labels, rects)])
    data = ShardDataset(out)
    assert data.keys == ["good"]
    assert "bad.jpg decodes with errors (libjpeg: Corrupt JPEG data" in data.failed["bad"]


def test_a_bad_sample_in_a_loader_worker_stops_the_run_with_its_message_not_a_traceback(copy):
    row = flip(copy, 2, "jpg")
    loader = build_loader("soco", copy, 2, backend="reference", num_workers=2)
    with pytest.raises(ShardReadError) as caught:
        list(loader)
    message = str(caught.value)
    assert f"sample {row['key']} member {row['key']}.jpg" in message
    assert "Traceback" not in message and "worker process" not in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_jpeg_that_decodes_with_errors_in_shards_with_matching_crcs_stops_naming_its_key(
        backend, copy):
    """As shards packed before the strict check could hold: the crc32s in the index match
    the damaged bytes, and only libjpeg's warning gives it away."""
    from common.io import crc32
    data = ShardDataset(copy)
    row = data.row(4)
    member = next(m for m in row["members"] if m["ext"] == "jpg")
    path = copy / row["shard"]
    raw = bytearray(path.read_bytes())
    jpg = raw[member["offset"]:member["offset"] + member["size"]]
    raw[member["offset"] + jpg.index(b"\xff\xda") + 50] ^= 0x55
    path.write_bytes(bytes(raw))
    table = pq.read_table(copy / "index.parquet")
    rows = table.to_pylist()
    for r in rows:
        if r["key"] == row["key"]:
            r["crc32"] = crc32(bytes(raw[r["tar_offset"]:r["tar_offset"] + r["tar_size"]]))
            r["member_crc32"] = [crc32(bytes(raw[m["offset"]:m["offset"] + m["size"]]))
                                 for m in r["members"]]
    pq.write_table(table.from_pylist(rows, schema=table.schema), copy / "index.parquet")
    with pytest.raises(ShardReadError, match=rf"sample {row['key']}: {row['key']}\.jpg decodes "
                                             r"with errors \(libjpeg: Corrupt JPEG data"):
        run_epoch(copy, backend)


def _pretrain(folder, out, *extra):
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, str(repo / "train" / "pretrain.py"), "--config", str(repo / "train/configs/soco_small_cpu.yaml"),
         f"data.shards={folder}", f"train.out={out}", "data.batch_size=2", "train.steps=4", "data.backend=reference",
         "data.num_workers=0", "train.tensorboard=false", "export.enabled=false", "eval.every=0", *extra],
        capture_output=True, text=True, timeout=600, cwd=repo, env={**__import__("os").environ, "PYTHONPATH": str(repo)})


def test_the_trainer_stops_on_a_flipped_byte_in_one_line_or_skips_and_counts_it_with_max_bad_samples(copy, tmp_path):
    row = flip(copy, 0, "boxes", at=0.1)
    stopped = _pretrain(copy, tmp_path / "strict")
    assert stopped.returncode == 2, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert f"sample {row['key']} member {row['key']}.boxes" in stopped.stderr and "make shards" in stopped.stderr
    skipped = _pretrain(copy, tmp_path / "lenient", "data.max_bad_samples=1")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert f"1 bad sample(s) skipped (data.max_bad_samples): {row['key']}: " in skipped.stderr
    end = [json.loads(line) for line in (tmp_path / "lenient" / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["bad_samples"] == 1
