"""The Ray job end to end: one valid row per image, resume after a kill gives the same rows,
reruns are idempotent, changed parameters are refused, and every bad input is handled."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common.paths import proposals_dir
from preprocess.datasets import list_images
from preprocess.job import JOB_FILE, JobConfig, JobError, read_parts, run
from preprocess.proposals import ProposalParams
from preprocess.stages import Stage
from shards.format import check_bitfield, decode_bitfield_png, decode_label_png
from schemas import table_version

REPO = Path(__file__).resolve().parents[1]
VOLATILE = ("elapsed_ms",)  # timing differs between runs; every other column must not


def rows_by_key(folder) -> dict[str, dict]:
    table = read_parts(folder)
    return {r["key"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in table.to_pylist()}


def test_sample_parts_hold_one_valid_row_per_image(sample_parts, sample_raw):
    work, name = sample_parts
    out = proposals_dir(name, work)
    records = list_images("sample", sample_raw)
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-{i:05d}.parquet" for i in range(4)]
    assert table_version(pq.read_schema(out / "part-00000.parquet")) == ("proposals", "1.0")
    rows = read_parts(out).to_pylist()
    assert [r["key"] for r in rows] == [r.key for r in records]  # key order, none missing, none twice
    for row, record in zip(rows, records):
        assert row["status"] == "ok" and row["error"] is None
        w, h = Image.open(record.path).size
        assert (row["width"], row["height"]) == (w, h) and row["source_path"] == record.relpath
        boxes = np.array(row["boxes"], np.float32)
        assert len(boxes) == row["num_boxes"] >= 1
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        fh = decode_label_png(row["fh_png"])
        assert fh.shape == (h, w) and int(fh.max()) + 1 == row["num_segments"]
        masks = decode_bitfield_png(row["mcg_png"], row["num_masks"])
        check_bitfield(decode_label_png(row["mcg_png"]), row["num_masks"])  # no uncounted mask bits
        assert masks.shape == (row["num_masks"], h, w) and len(row["mask_scores"]) == row["num_masks"]
        gt = json.loads(row["gt_json"])
        gt_ids = decode_label_png(row["gt_png"])
        assert len(gt["annotations"]) == len(record.gt)
        assert set(np.unique(gt_ids)) - {0} == set(range(1, len(record.gt) + 1))
    job = json.loads((out / JOB_FILE).read_text())
    assert job["complete"] and job["counts"]["status"] == {"ok": len(records)}
    assert sum(job["counts"]["filter_rule"].values()) == len(records)


def test_rerun_skips_everything_and_changes_nothing(sample_parts, tmp_path):
    import shutil
    work, name = sample_parts
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    before = {p.name: p.read_bytes() for p in proposals_dir(name, copy).glob("part-*")}
    job = run(JobConfig(dataset="sample", root=json.loads((proposals_dir(name, work) / JOB_FILE).read_text())["root"],
                        work_dir=str(copy), part_size=4))
    assert job["processed_this_run"] == 0
    assert {p.name: p.read_bytes() for p in proposals_dir(name, copy).glob("part-*")} == before


def test_changed_parameters_are_refused(sample_parts, tmp_path):
    import shutil
    work, name = sample_parts
    shutil.copytree(work, tmp_path / "work")
    root = json.loads((proposals_dir(name, work) / JOB_FILE).read_text())["root"]
    with pytest.raises(JobError, match="different params"):
        run(JobConfig(dataset="sample", root=root, work_dir=str(tmp_path / "work"), part_size=4,
                      proposals=ProposalParams(max_boxes=7)))


def test_killed_run_resumes_to_the_same_rows(sample_parts, sample_raw, tmp_path):
    """SIGKILL the whole job (driver and its Ray) once a part is on disk, plant the leftover of
    an interrupted write, rerun: the rows equal those of the uninterrupted run."""
    work = tmp_path / "work"
    out = proposals_dir("sample", work)
    cmd = [sys.executable, "-m", "preprocess.job", "--dataset", "sample", "--root", str(sample_raw),
           "--work-dir", str(work), "--part-size", "4", "--num-cpus", "1", "--batch-size", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "part-00000.parquet").exists():
            assert proc.poll() is None, "the job ended before writing a part"
            assert time.monotonic() < deadline, "no part written in 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # driver, raylet, workers: one process group
        proc.wait()
    done_before = sorted(p.name for p in out.glob("part-*.parquet"))
    assert len(done_before) < 4, "killed too late to test a resume"
    (out / ".part-00003.parquet.killed.tmp").write_bytes(b"half a parquet file")

    job = run(JobConfig(dataset="sample", root=str(sample_raw), work_dir=str(work), part_size=4, num_cpus=2))
    assert 0 < job["processed_this_run"] <= 14 - 4 * len(done_before)
    assert not list(out.glob(".*.tmp"))
    assert rows_by_key(out) == rows_by_key(proposals_dir(*reversed(sample_parts)))


# ---------------------------------------------------------------- bad input
def _jpeg(rgb: np.ndarray, **kw) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def make_bad_inputs(root: Path) -> dict[str, str]:
    """Write one file per bad-input case; returns relpath -> expected status."""
    rng = np.random.default_rng(0)
    photo = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    cases = {}

    def put(rel, data, status):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        cases[rel] = status

    def put_image(rel, img, status="ok", **kw):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, **kw)
        cases[rel] = status

    put("zero.jpg", b"", "failed")
    put("truncated.jpg", _jpeg(photo)[:300], "failed")
    put("text.jpg", b"this is a text file with a .jpg name\n", "failed")
    put_image("alpha.png", Image.fromarray(np.dstack([photo, np.full((48, 64), 128, np.uint8)]), "RGBA"))
    put_image("deep.png", Image.fromarray((photo[..., 0].astype(np.uint16) * 257)))
    put_image("gray.jpg", Image.fromarray(photo[..., 0]), format="JPEG")
    put_image("cmyk.jpg", Image.fromarray(photo).convert("CMYK"), format="JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    put("rotated.jpg", _jpeg(photo, exif=exif.tobytes()), "ok")
    put_image("one.png", Image.new("RGB", (1, 1), (3, 4, 5)))
    put_image("sixteen.png", Image.fromarray(photo[:16, :16]))
    put_image("huge.png", Image.new("RGB", (600, 400)), "failed")  # above the test's pixel limit
    (root / "unreadable.jpg").symlink_to(root / "no-such-target.jpg")
    cases["unreadable.jpg"] = "failed"
    put("ünï cödé with spaces.jpg", _jpeg(photo), "ok")
    put("left/same.jpg", _jpeg(photo), "ok")
    put("right/same.jpg", _jpeg(photo[::-1]), "ok")
    put("lost.jpg", _jpeg(photo), "failed")  # dropped inside Ray by the stage below
    return cases


def drop_lost_image(ds, config, num_cpus):
    """A stage whose Ray task fails for one image after the per-image step (as a crashed
    worker would): the job must go on and record that image as lost."""
    def crash_on_lost(batch):  # nested, so Ray ships it by value (workers cannot import tests)
        if any(p.endswith("lost.jpg") for p in batch.column("source_path").to_pylist()):
            raise RuntimeError("simulated worker crash")
        return batch
    return ds.map_batches(crash_on_lost, batch_format="pyarrow", batch_size=None)


@pytest.fixture(scope="module")
def bad_rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    cases = make_bad_inputs(root)
    work = tmp_path_factory.mktemp("bad_work")
    job = run(JobConfig(dataset="folder", root=str(root), work_dir=str(work), part_size=5, num_cpus=2,
                        batch_size=1, max_pixels=200_000),  # one image a task: only lost.jpg is lost
              [Stage("drop_lost", drop_lost_image)])
    rows = {r["source_path"]: r for r in read_parts(proposals_dir("folder", work)).to_pylist()}
    return cases, rows, job


def test_bad_input_job_finishes_with_one_row_each(bad_rows):
    cases, rows, job = bad_rows
    assert set(rows) == set(cases)
    assert len({r["key"] for r in rows.values()}) == len(cases)  # equal basenames: distinct keys
    assert job["counts"]["status"] == {"failed": 6, "ok": len(cases) - 6}


@pytest.mark.parametrize("name,reason", [
    ("zero.jpg", "zero-byte"), ("truncated.jpg", "truncated"), ("text.jpg", "not a decodable image"),
    ("huge.png", "exceeds the limit of 200000"), ("unreadable.jpg", "cannot read"),
    ("lost.jpg", "lost: no result came back"),
])
def test_bad_file_is_a_failed_row_with_its_reason(bad_rows, name, reason):
    _, rows, _ = bad_rows
    row = rows[name]
    assert row["status"] == "failed" and reason in row["error"] and name in row["error"]
    assert row["boxes"] is None and row["fh_png"] is None


@pytest.mark.parametrize("name,size", [
    ("alpha.png", (64, 48)), ("deep.png", (64, 48)), ("gray.jpg", (64, 48)), ("cmyk.jpg", (64, 48)),
    ("rotated.jpg", (48, 64)), ("one.png", (1, 1)), ("sixteen.png", (16, 16)),
    ("ünï cödé with spaces.jpg", (64, 48)), ("left/same.jpg", (64, 48)), ("right/same.jpg", (64, 48)),
])
def test_unusual_but_valid_file_is_processed(bad_rows, name, size):
    _, rows, _ = bad_rows
    row = rows[name]
    assert row["status"] == "ok", row["error"]
    assert (row["width"], row["height"]) == size  # rotated.jpg: EXIF 6 swaps the sides
    assert decode_label_png(row["fh_png"]).shape == size[::-1]
    if size[0] < 32:
        assert row["filter_rule"] == "whole_image" and row["boxes"] == [[0, 0, size[0], size[1]]]


# ---------------------------------------------------------------- listing streams, worker-written parts
def test_worker_written_parts_equal_a_direct_loop_over_the_in_memory_listing(sample_parts, sample_raw):
    """The parts the workers wrote hold, part by part, the rows of process_image run in this
    process over fixed chunks of list_images (no Ray, no on-disk listing), and the same
    params; only the timings differ."""
    from preprocess.job import _item, process_image
    work, name = sample_parts
    out = proposals_dir(name, work)
    config = JobConfig(dataset="sample", root=str(sample_raw), part_size=4)
    params = config.params()
    records = list_images("sample", sample_raw)
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == -(-len(records) // 4)
    for p, path in enumerate(parts):
        table = pq.read_table(path)
        assert json.loads(table.schema.metadata[b"params"]) == json.loads(json.dumps(params))
        expected = [process_image(_item(r, p), params) for r in records[4 * p:4 * p + 4]]
        got = table.to_pylist()
        assert [r["key"] for r in got] == [r["key"] for r in expected]
        for g, e in zip(got, expected):
            e = {k: v for k, v in e.items() if k not in VOLATILE}
            g = {k: v for k, v in g.items() if k not in VOLATILE and k in e}
            assert g == e


def _tree(root: Path, n: int) -> list[str]:
    """n empty image files in nested folders (listing never opens them)."""
    rels = [f"d{i % 3}/s{i % 5}/img {i:03d}.jpg" for i in range(n)]
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    return rels


def test_the_on_disk_listing_merges_runs_into_the_in_memory_order_and_hash(tmp_path, monkeypatch):
    """Small runs (7 records) and small file-list chunks (64 bytes) force many runs and a
    real k-way merge; the parts it writes are the key-sorted list cut every 5 records, and
    its hash is that of the list computed here."""
    import hashlib
    from preprocess import datasets, listing
    root = tmp_path / "tree"
    rels = _tree(root, 40)
    (tmp_path / "list.txt").write_text("\n".join(rels + rels[:3]) + "\n\n")  # 3 listed twice, 1 empty
    monkeypatch.setattr(listing, "RUN_RECORDS", 7)
    monkeypatch.setattr(datasets, "LIST_CHUNK_BYTES", 64)
    for kind, file_list in (("folder", None), ("filelist", tmp_path / "list.txt")):
        expected, counts = datasets.list_images_counted(kind, root, None, file_list)
        sources = datasets.dataset_sources(kind, root, None, file_list)
        assert kind == "folder" or len(sources) > 10
        out = tmp_path / kind
        (out / "runs").mkdir(parents=True)
        merged = datasets.Counts()
        for i, source in enumerate(sources):
            for what, k in listing.list_source(source, str(out / "runs"), i).items():
                merged.add(what, k)
        summary = listing.merge_runs(str(out), part_size=5)
        for what, k in summary["counts"].items():
            merged.add(what, k)
        assert summary["num_images"] == len(expected) == 40 and summary["num_parts"] == 8
        got = [r for p in range(8) for r in listing.read_part(out, p)]
        assert got == expected and [len(listing.read_part(out, p)) for p in range(8)] == [5] * 8
        h = hashlib.sha256("".join(f"{r.key}\t{r.relpath}\n" for r in expected).encode())
        assert summary["image_list_sha256"] == h.hexdigest()
        assert dict(merged) == dict(counts)
    assert counts == {"entries skipped: the same path listed twice": 3, "file list: empty lines skipped": 1}


def test_a_file_list_text_or_parquet_is_a_dataset_with_the_folder_keys(tmp_path):
    """make proposals DATASET=filelist FILE_LIST=...: the same keys as `folder` on the same
    files; a path outside the root and a missing file are failed rows saying why; the
    job's listing counts say what was skipped."""
    import pyarrow as pa
    from preprocess.job import main
    root = tmp_path / "crawl"
    rels = _tree(root, 12)
    folder_keys = [r.key for r in list_images("folder", root)]
    lines = [str(root / rels[0])] + rels[1:] + ["../elsewhere.jpg", "gone.jpg", rels[2]]
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"url_path": lines}), root / "list.parquet", row_group_size=4)
    for name, extra in (("txt", ["--file-list", str(root / "list.txt")]),
                        ("pq", ["--file-list", str(root / "list.parquet"), "--file-list-column", "url_path"])):
        work = tmp_path / f"work-{name}"
        assert main(["--dataset", "filelist", *extra, "--work-dir", str(work), "--part-size", "5",
                     "--num-cpus", "2", "--stats", "off", "--dry-run"]) == 0
        rows = {r["source_path"]: r for r in read_parts(proposals_dir("filelist", work)).to_pylist()}
        assert len(rows) == 14
        assert sorted(r["key"] for p, r in rows.items() if p in rels) == sorted(folder_keys)
        assert "outside the dataset root" in rows["../elsewhere.jpg"]["error"]
        assert rows["gone.jpg"]["status"] == "failed"
        job = json.loads((proposals_dir("filelist", work) / JOB_FILE).read_text())
        assert job["root"] == str(root) and job["num_images"] == 14
        assert job["listing"] == {"entries failed: path outside the dataset root": 1,
                                  "entries skipped: the same path listed twice": 1}
    from preprocess.datasets import DatasetError
    with pytest.raises(DatasetError, match="has no column .path."):
        run(JobConfig(dataset="filelist", root=None, file_list=str(root / "list.parquet"),
                      work_dir=str(tmp_path / "w3")))


def test_a_dry_run_writes_one_failed_row_per_image_and_refuses_to_mix_with_a_real_run(tmp_path):
    from preprocess.job import DRY_RUN_ERROR
    root = tmp_path / "tree"
    rels = _tree(root, 9)
    work = tmp_path / "work"
    job = run(JobConfig(dataset="folder", root=str(root), work_dir=str(work), part_size=4, num_cpus=2,
                        dry_run=True))
    rows = read_parts(proposals_dir("folder", work)).to_pylist()
    assert sorted(r["source_path"] for r in rows) == sorted(rels)
    assert {r["error"] for r in rows} == {DRY_RUN_ERROR} and job["counts"]["status"] == {"failed": 9}
    assert job["driver_max_rss_mb"] > 0 and not (proposals_dir("folder", work) / "_listing").exists()
    with pytest.raises(JobError, match="different params"):
        run(JobConfig(dataset="folder", root=str(root), work_dir=str(work), part_size=4, num_cpus=2))
