"""Shard writer, reader and verifier on the built-in sample.

The proposals parts here are built by hand from the sample's images with label maps
whose values we choose, so the round trip compares against values we know. The
end-to-end test at the bottom uses the real preprocessing job (`sample_parts`)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from common.keys import BadKeyError
from preprocess.datasets import list_images
from schemas.proposals import PROPOSALS
from shards.reader import ShardDataset, iter_tar
from shards.tarfmt import ShardError
from shards.verify import main as verify_main
from shards.write import PackParams, write_shards
from tests.test_shards_parts import build_parts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def hand_parts(sample_raw, tmp_path_factory):
    pdir = tmp_path_factory.mktemp("hand_parts") / "proposals"
    return pdir, build_parts(sample_raw, pdir)


@pytest.fixture(scope="session")
def hand_shards(hand_parts, tmp_path_factory):
    pdir, info = hand_parts
    out = tmp_path_factory.mktemp("hand_shards") / "shards"
    write_shards("sample", PackParams(max_samples=4), proposals=pdir, out=out)
    return out, info


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_round_trip_every_member(hand_shards):
    out, info = hand_shards
    ds = ShardDataset(out)
    expected = info["expected"]
    assert len(ds) == len(expected) == info["n_rows"] - 1
    assert sorted(s.key for s in ds) == sorted(expected)
    assert ds.keys != sorted(ds.keys), "samples should be shuffled across shards"
    assert len(ds.shards) == 4 and len(ds.manifest["shards"]) == 4
    for sample in ds:
        e = expected[sample.key]
        assert sample.jpeg == Path(e["path"]).read_bytes()  # plain JPEG kept as is
        np.testing.assert_array_equal(sample.image, e["rgb"])
        np.testing.assert_array_equal(sample.boxes, e["boxes"])
        assert sample.boxes.dtype == np.float32
        np.testing.assert_array_equal(sample.fh, e["fh"])
        assert sample.fh.dtype == np.uint16
        np.testing.assert_array_equal(sample.mcg, e["masks"])
        assert sample.gt == e["gt"]
        if e["gt"] is None:
            assert sample.gt_labels is None
        else:
            np.testing.assert_array_equal(sample.gt_labels, e["gt_labels"])
        h, w = e["rgb"].shape[:2]
        assert sample.meta["width"] == w and sample.meta["height"] == h
        assert sample.meta["num_masks"] == 3 and sample.meta["num_boxes"] == 2
        got = ds.get(sample.key)
        assert got.members == sample.members
        # label maps keep the bit depth preprocessing gave them (no widening to 16 bits)
        fh_bytes = np.frombuffer(sample.members["fh.png"], np.uint8)
        assert cv2.imdecode(fh_bytes, cv2.IMREAD_UNCHANGED).dtype == e["fh"].dtype


def test_index_lists_failures_and_offsets(hand_shards):
    out, info = hand_shards
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert len(index) == info["n_rows"]
    failed = [r for r in index if r["status"] != "ok"]
    assert [r["key"] for r in failed] == [info["failed"]]
    assert failed[0]["shard"] is None and "made-up failure" in failed[0]["error"]
    with pytest.raises(KeyError, match="made-up failure"):
        ShardDataset(out).get(info["failed"])
    ok = next(r for r in index if r["status"] == "ok")
    jpg = next(m for m in ok["members"] if m["ext"] == "jpg")
    with open(out / ok["shard"], "rb") as f:
        f.seek(jpg["offset"])
        assert f.read(jpg["size"]) == Path(info["expected"][ok["key"]]["path"]).read_bytes()
        f.seek(ok["tar_offset"])  # the documented checksum: zlib's crc32 (we compute it with zlib-ng)
        assert ok["crc32"] == zlib.crc32(f.read(ok["tar_size"]))
    assert ok["jpeg_reencoded"] is False and ok["resnet_distance_mean"] is not None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == len(info["expected"]) and manifest["num_failed"] == 1
    assert manifest["packing"]["max_samples"] == 4 and manifest["packages"]["pyarrow"]
    assert manifest["preprocessing"]["part_params"] == {"test": True}
    assert all(s["num_samples"] <= 4 for s in manifest["shards"])


def test_idx_equals_dali_wds2idx(hand_shards, tmp_path):
    """Our .idx, written from known offsets, equals what DALI's own tool derives from the tar."""
    out, _ = hand_shards
    tool = Path(sys.executable).with_name("wds2idx")
    for tar in sorted(out.glob("*.tar")):
        subprocess.run([str(tool), str(tar), str(tmp_path / "x.idx")], check=True,
                       capture_output=True)
        assert (tmp_path / "x.idx").read_text() == tar.with_suffix(".idx").read_text()


def test_webdataset_reads_the_same_samples(hand_shards):
    out, info = hand_shards
    ds = ShardDataset(out)
    urls = [str(p) for p in ds.tar_paths]
    seen = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        seen[s["__key__"]] = {k: v for k, v in s.items() if not k.startswith("__")}
    assert list(seen) == ds.keys
    for key, members in seen.items():
        assert members == ds.get(key).members


def test_rerun_is_byte_identical_and_resumes(hand_parts, hand_shards, tmp_path):
    pdir, _ = hand_parts
    ref, _ = hand_shards
    out = tmp_path / "shards"
    write_shards("sample", PackParams(max_samples=4), proposals=pdir, out=out, workers=1)
    assert files_of(out) == files_of(ref)  # and the thread count does not change a byte
    # a rerun skips finished shards: their files are not rewritten
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    # simulate a run killed while writing shard 2: later shards gone, a temporary left behind
    for p in list(out.glob("sample-00000[23].*")) + list(out.glob("_rows/sample-00000[23].*")):
        p.unlink()
    (out / "manifest.json").unlink()
    (out / ".sample-000002.tar.abc.tmp").write_bytes(b"half a shard")
    write_shards("sample", PackParams(max_samples=4), proposals=pdir, out=out)
    assert files_of(out) == files_of(ref)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert after["sample-000000.tar"] == before["sample-000000.tar"]
    assert after["sample-000002.tar"] != before["sample-000002.tar"]


def test_other_parameters_refuse_to_mix_then_overwrite(hand_parts, hand_shards, tmp_path):
    pdir, _ = hand_parts
    out = tmp_path / "shards"
    shutil.copytree(hand_shards[0], out)
    with pytest.raises(SystemExit, match="--overwrite"):
        write_shards("sample", PackParams(max_samples=4, seed=1), proposals=pdir, out=out)
    write_shards("sample", PackParams(max_samples=4, seed=1), proposals=pdir, out=out,
                 overwrite=True)
    assert ShardDataset(out).keys != ShardDataset(hand_shards[0]).keys
    assert sorted(ShardDataset(out).keys) == sorted(ShardDataset(hand_shards[0]).keys)
    import fcntl
    with open(out / "_rows" / ".lock") as held:  # a second writer on the same folder waits
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SystemExit, match="another make shards is writing"):
            write_shards("sample", PackParams(max_samples=4, seed=1), proposals=pdir, out=out)
    assert verify_main(["--dir", str(out)]) == 0


def test_byte_bound_and_unpackable_samples(hand_parts, tmp_path):
    """Shards stay under the byte bound; images that cannot be packed become failed index
    rows with the reason (source changed, corrupt label map, box outside the image) and
    the rest is packed."""
    pdir, info = hand_parts
    raw, bad_parts = tmp_path / "raw", tmp_path / "proposals"
    job = json.loads((pdir / "_job.json").read_text())
    shutil.copytree(job["root"], raw)
    shutil.copytree(pdir, bad_parts)
    victim = next(iter(info["expected"].values()))
    rel = Path(victim["path"]).relative_to(job["root"])
    (raw / rel).write_bytes(b"not the image preprocessing saw")
    part = bad_parts / "part-00000.parquet"
    rows = pq.read_table(part).to_pylist()
    rows[1]["fh_png"] = rows[1]["fh_png"][:60]  # header intact, pixels cut off
    rows[2]["boxes"][1] = [0.0, 0.0, rows[2]["width"] + 5.0, 10.0]
    cut_row = next(r for r in rows[3:] if r["status"] == "ok")
    cut = raw / cut_row["source_path"]   # a JPEG cut short, its sha256 recorded as such:
    cut.write_bytes(cut.read_bytes()[:-200])  # kept as-is, so only the strict decode finds it
    cut_row["sha256"] = hashlib.sha256(cut.read_bytes()).hexdigest()
    pq.write_table(PROPOSALS.from_rows(rows), part)
    limit = 40_000
    out = tmp_path / "shards"
    manifest = write_shards("sample", PackParams(max_bytes=limit), proposals=bad_parts, out=out,
                            root=raw)
    for s in manifest["shards"]:
        assert s["bytes"] <= limit or s["num_samples"] == 1
        assert (out / s["name"]).stat().st_size == s["bytes"]
    assert len(manifest["shards"]) > 1
    index = {r["key"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    errors = {k: r["error"] for k, r in index.items() if "packing" in (r["error"] or "")}
    assert sorted(errors) == sorted(r["key"] for r in [*rows[:3], cut_row])
    assert "changed since make proposals" in errors[rows[0]["key"]]
    assert "fh.png does not decode" in errors[rows[1]["key"]]
    assert "is empty, not finite or outside the" in errors[rows[2]["key"]]
    assert f"{cut_row['key']}.jpg decodes with errors (libjpeg: Premature end" in errors[cut_row["key"]]
    assert all(index[k]["status"] == "failed" and index[k]["shard"] is None for k in errors)
    assert manifest["num_samples"] == len(info["expected"]) - 4
    assert verify_main(["--dir", str(out)]) == 0


def test_verify_passes_then_catches_truncation_and_alteration(hand_shards, tmp_path, capsys):
    out = tmp_path / "shards"
    shutil.copytree(hand_shards[0], out)
    assert verify_main(["--dir", str(out), "--decode"]) == 0
    ds = ShardDataset(out)
    row = ds._by_key[ds.keys[5]]
    shard = out / row["shard"]
    data = bytearray(shard.read_bytes())
    data[row["tar_offset"] + 700] ^= 0xFF  # inside the first member's data
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert verify_main(["--dir", str(out)]) == 1
    report = capsys.readouterr().out
    assert f"shard {row['shard']} key {row['key']} (offset {row['tar_offset']})" in report
    with pytest.raises(ShardError, match=rf"{row['shard']}: sample {row['key']} at offset "
                                         rf"{row['tar_offset']}: crc32 mismatch"):
        ShardDataset(out).get(row["key"])
    cut = row["tar_offset"] + 100
    shard.write_bytes(bytes(data[:cut]))
    assert verify_main(["--dir", str(out)]) == 1
    assert f"shard {row['shard']}: truncated at offset {row['tar_offset']}" in capsys.readouterr().out
    with pytest.raises(ShardError, match=rf"{row['shard']}: {cut} bytes but manifest.json says "
                                         rf"{len(data)} \(truncated"):
        ShardDataset(out)


def test_escaping_keys_rejected_on_write_and_read(sample_raw, hand_shards, tmp_path):
    first = list_images("sample", sample_raw)[0].key
    pdir = tmp_path / "proposals"
    build_parts(sample_raw, pdir, keys_override={first: "../../etc/x"})
    with pytest.raises(BadKeyError, match="part-00000.parquet"):
        write_shards("sample", proposals=pdir, out=tmp_path / "shards")
    assert not list(tmp_path.rglob("*.tar")) and not list(tmp_path.rglob("*.tmp"))
    # a tar from elsewhere with a member that would escape the folder
    import io
    import tarfile
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo("../escape.jpg")
        info.size = 3
        t.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(BadKeyError, match="evil.tar"):
        list(iter_tar(evil))
    # an index whose key was edited to escape
    out = tmp_path / "edited"
    shutil.copytree(hand_shards[0], out)
    table = pq.read_table(out / "index.parquet")
    keys = table.column("key").to_pylist()
    keys[0] = "a/../../b"
    table = table.set_column(0, table.schema.field(0), [keys])
    pq.write_table(table, out / "index.parquet")
    with pytest.raises(BadKeyError, match="index.parquet"):
        ShardDataset(out)
    # a manifest whose shard name was edited to point outside the folder
    shutil.copy(hand_shards[0] / "index.parquet", out / "index.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../../outside.tar"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BadKeyError, match="unsafe shard name '../../outside.tar'"):
        ShardDataset(out)
    assert verify_main(["--dir", str(out)]) == 1


def test_cli_make_shards_then_verify(hand_parts, tmp_path):
    """The make targets' commands, run as a user would (WORK_DIR layout)."""
    pdir, _ = hand_parts
    work = tmp_path / "work"
    shutil.copytree(pdir, work / "sample" / "proposals")
    env = {"WORK_DIR": str(work), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1"}
    w = subprocess.run([sys.executable, "-m", "shards.write", "--dataset", "sample",
                        "--max-samples", "5", "--max-bytes", "1.5M"], env=env,
                       capture_output=True, text=True)
    assert w.returncode == 0, w.stderr
    assert "done: 13 samples in 3 shards" in w.stderr
    manifest = json.loads((work / "sample" / "shards" / "manifest.json").read_text())
    assert manifest["packing"]["max_bytes"] == 1536 * 1024
    umask = os.umask(0o022)
    os.umask(umask)
    for f in (work / "sample" / "shards").glob("*.*"):  # not mkstemp's 0600: others may read
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    v = subprocess.run([sys.executable, "-m", "shards.verify", "--dataset", "sample"],
                       env=env, capture_output=True, text=True)
    assert v.returncode == 0 and "OK" in v.stdout, v.stdout + v.stderr
    missing = subprocess.run([sys.executable, "-m", "shards.write", "--dataset", "nothing"],
                             env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "run make proposals" in missing.stderr
    assert not (work / "nothing").exists()
    unbuilt = subprocess.run([sys.executable, "-m", "shards.verify", "--dataset", "nothing"],
                             env=env, capture_output=True, text=True)
    assert unbuilt.returncode == 1 and "run make shards" in unbuilt.stdout


def test_dali_reads_shards_with_their_index(hand_shards):
    """DALI's CPU webdataset reader (device_id=None) over our tars + .idx files decodes
    the same images, boxes and label maps as the Python reader. Label maps keep their
    bit depth, and DALI's ANY_DATA/UINT16 decode scales an 8-bit PNG by 257 (the reader
    returns the ids as stored): callers of DALI divide by 257 where the header says 8."""
    from shards.format import png_header
    from nvidia.dali import fn, pipeline_def, types
    ds = ShardDataset(hand_shards[0])

    @pipeline_def(batch_size=len(ds), num_threads=1, device_id=None)
    def pipe():
        jpg, boxes, fh, mcg = fn.readers.webdataset(
            paths=[str(p) for p in ds.tar_paths], index_paths=[str(p) for p in ds.idx_paths],
            ext=["jpg", "boxes", "fh.png", "mcg.png"],
            dtypes=[types.UINT8, types.FLOAT, types.UINT8, types.UINT8],
            missing_component_behavior="error", name="reader")
        return (fn.decoders.image(jpg, output_type=types.RGB), fn.reshape(boxes, shape=[-1, 4]),
                fn.decoders.image(fh, output_type=types.ANY_DATA, dtype=types.UINT16),
                fn.decoders.image(mcg, output_type=types.ANY_DATA, dtype=types.UINT16),
                fn.get_property(jpg, key="source_info"))

    p = pipe()
    p.build()
    assert p.reader_meta("reader")["epoch_size"] == len(ds)
    images, boxes, fh, mcg, info = p.run()
    keys = []
    for i in range(len(ds)):
        source = bytes(np.array(info.at(i))).decode()
        key = source.rsplit(":", 1)[1].split(".")[0]
        keys.append(key)
        s = ds.get(key)
        assert source.startswith(str(ds.dir / s.where))
        assert np.abs(np.array(images.at(i)).astype(int) - s.image).mean() < 1.0
        np.testing.assert_array_equal(np.array(boxes.at(i)), s.boxes)
        scale = 257 if png_header(s.members["fh.png"], "fh.png")[2] == 8 else 1
        np.testing.assert_array_equal(np.array(fh.at(i))[..., 0], s.fh * scale)
        bits = np.array(mcg.at(i))[..., 0]
        for k in range(s.mcg.shape[0]):
            np.testing.assert_array_equal((bits >> k) & 1 == 1, s.mcg[k])
    assert keys == ds.keys


def test_end_to_end_on_the_real_preprocessing_job(sample_parts, sample_shards):
    """Shards of the real job's parts: every ok row packed once, boxes and label maps equal
    to the parts, members consistent, and make verify (with decoding) clean."""
    from common.paths import proposals_dir
    from shards.format import decode_label_png as decode_png
    work, dataset = sample_parts
    parts = pq.read_table(proposals_dir(dataset, work)).to_pylist()
    ds = ShardDataset(sample_shards)
    ok = {r["key"]: r for r in parts if r["status"] == "ok"}
    assert sorted(ds.keys) == sorted(ok) and len(ds.shards) == -(-len(ok) // 4)
    for sample in ds:
        row = ok[sample.key]
        np.testing.assert_array_equal(sample.boxes, np.asarray(row["boxes"], np.float32))
        np.testing.assert_array_equal(sample.fh, decode_png(row["fh_png"], "parts"))
        assert sample.image.shape == (row["height"], row["width"], 3)
        assert sample.mcg.shape == (row["num_masks"], row["height"], row["width"])
        assert sample.fh.max() < row["num_segments"]
        assert (sample.gt is None) == (row["gt_json"] is None)
        assert sample.meta["source_path"] == row["source_path"]
    assert verify_main(["--dir", str(sample_shards), "--decode"]) == 0


@pytest.mark.coco128
def test_real_photos_and_a_greyscale_jpeg(coco128_root, tmp_path):
    """coco128 photos keep their source bytes; the one greyscale JPEG is re-encoded as RGB
    (flagged in the index) and decodes to exactly the pixels stored_jpeg reported."""
    from preprocess.decode import stored_jpeg
    grey = "000000000086"
    keys = {grey, "000000000009", "000000000025", "000000000030", "000000000034",
            "000000000036"}
    pdir = tmp_path / "proposals"
    info = build_parts(coco128_root, pdir, kind="coco", split="train2017", only=keys)
    out = tmp_path / "shards"
    write_shards("coco128", PackParams(max_samples=2), proposals=pdir, out=out)
    ds = ShardDataset(out)
    index = {r["key"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    assert sorted(ds.keys) == sorted(info["expected"]) and grey in ds.keys
    for sample in ds:
        e = info["expected"][sample.key]
        source = Path(e["path"]).read_bytes()
        assert index[sample.key]["jpeg_reencoded"] == (sample.key == grey)
        assert (sample.jpeg == source) == (sample.key != grey)
        np.testing.assert_array_equal(sample.image, stored_jpeg(e["path"])[1])
        assert sample.image.shape == e["rgb"].shape and sample.image.shape[2] == 3
        np.testing.assert_array_equal(sample.boxes, e["boxes"])
        assert sample.gt == e["gt"]
    assert verify_main(["--dir", str(out), "--decode"]) == 0


def test_longest_keys_round_trip_through_dali(sample_raw, tmp_path):
    """A 128-character key needs a GNU long-name header (names > 100 bytes); our .idx
    points at the data, so DALI and webdataset read it (DALI's wds2idx would not: it
    takes the long-name header's block for the member's)."""
    from nvidia.dali import fn, pipeline_def, types
    first = list_images("sample", sample_raw)[0].key
    long_key = "k" * 115 + "_" + first
    build_parts(sample_raw, tmp_path / "p", keys_override={first: long_key})
    write_shards("s", PackParams(max_samples=100), proposals=tmp_path / "p", out=tmp_path / "s")
    ds = ShardDataset(tmp_path / "s")
    assert len(long_key) == 128 and long_key in ds.keys
    web = {s["__key__"]: s["boxes"] for s in wds.WebDataset([str(ds.tar_paths[0])],
                                                              shardshuffle=False)}
    assert web[long_key] == ds.get(long_key).members["boxes"]

    @pipeline_def(batch_size=len(ds), num_threads=1, device_id=None)
    def pipe():
        jpg, boxes = fn.readers.webdataset(paths=[str(ds.tar_paths[0])],
                                           index_paths=[str(ds.idx_paths[0])],
                                           ext=["jpg", "boxes"], dtypes=[types.UINT8, types.FLOAT])
        return fn.get_property(jpg, key="source_info"), fn.reshape(boxes, shape=[-1, 4])

    p = pipe()
    p.build()
    info, boxes = p.run()
    names = [bytes(np.array(info.at(i))).decode().rsplit(":", 1)[1] for i in range(len(ds))]
    i = names.index(f"{long_key}.jpg")
    np.testing.assert_array_equal(np.array(boxes.at(i)), ds.get(long_key).boxes)
    assert verify_main(["--dir", str(tmp_path / "s")]) == 0


def test_statistics_filled_later_refresh_the_index_only(hand_parts, hand_shards, tmp_path):
    """`make stats` after `make shards` rewrites the parts' statistics columns: a rerun keeps
    every tar and takes the new figures into index.parquet; other changes still refuse."""
    pdir = tmp_path / "proposals"
    shutil.copytree(hand_parts[0], pdir)
    out = tmp_path / "shards"
    shutil.copytree(hand_shards[0], out)
    tars = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    for part in sorted(pdir.glob("part-*.parquet")):
        t = pq.read_table(part)
        i = t.schema.get_field_index("resnet_distance_mean")
        t = t.set_column(i, t.schema.field(i), pa.array([7.25] * t.num_rows, pa.float32()))
        pq.write_table(t, part, row_group_size=3)  # other chunking, same content
    write_shards("sample", PackParams(max_samples=4), proposals=pdir, out=out)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")} == tars
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert {r["resnet_distance_mean"] for r in index if r["status"] == "ok"} == {7.25}
    assert verify_main(["--dir", str(out)]) == 0
    part = sorted(pdir.glob("part-*.parquet"))[0]
    t = pq.read_table(part)
    i = t.schema.get_field_index("num_segments")
    pq.write_table(t.set_column(i, t.schema.field(i), pa.array([1] * t.num_rows, pa.int32())), part)
    with pytest.raises(SystemExit, match="proposals parts .* changed"):
        write_shards("sample", PackParams(max_samples=4), proposals=pdir, out=out)


def test_killed_writer_resumes_to_identical_files(tmp_path):
    """SIGKILL a real `python -m shards.write` after its second shard; the rerun cleans up
    the dead run's temporaries, keeps the finished shards and ends byte-identical to an
    uninterrupted run."""
    import signal
    import time
    from bench.shards import build_dataset
    pdir = build_dataset(tmp_path / "raw", 96, 4)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "shards.write", "--dataset", "k", "--proposals", str(pdir),
            "--max-samples", "16", "--workers", "1", "--out"]
    reference = subprocess.run(args + [str(tmp_path / "ref")], env=env, capture_output=True)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "out"
    proc = subprocess.Popen(args + [str(out)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "_rows" / "k-000001.parquet").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "manifest.json").exists():
        pytest.skip("the writer finished before it could be killed (machine too fast)")
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("k-00000[01].tar")}
    again = subprocess.run(args + [str(out)], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert files_of(out) == files_of(tmp_path / "ref")
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == kept
