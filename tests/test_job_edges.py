"""Dataset edges and job hazards as real runs on real files: a COCO file_name that leaves
the root, boxes outside the image, a negative width, a missing width, an invalid polygon,
symlinked folders and a link loop, a source image changed after make proposals and the
command that reprocesses it, two proposals jobs at once, a full disk under make proposals,
make shards and a checkpoint write, and Makefile variables holding shell characters."""
from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import common.io
from common.paths import proposals_dir
from preprocess.datasets import list_images_counted
from preprocess.job import JobConfig, main as job_main, run
from shards.reader import ShardDataset
from shards.write import main as shards_main, write_shards

REPO = Path(__file__).resolve().parents[1]
ESCAPE = "../../../outside/secret.jpg"


@contextmanager
def small_disk(path: Path, size: str, monkeypatch):
    """A tmpfs of `size` at `path` where this machine lets us mount one; else ENOSPC is
    injected at the atomic writers' fsync (the write call that reports a full disk on
    file systems that allocate late)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    if not mounted:
        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(common.io.os, "fsync", full)
    try:
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=False)


def config(root: Path, work: Path, **kw) -> JobConfig:
    return JobConfig(dataset="sample", root=str(root), work_dir=str(work), name="edges",
                     part_size=8, num_cpus=2, **kw)


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    """A 4-image sample whose annotation file carries every COCO edge, and one job run."""
    from preprocess.sample import generate
    base = tmp_path_factory.mktemp("edges")
    root = generate(base / "ds" / "raw", n_scene=4, n_object=0, seed=2, min_side=64, max_side=96)
    ann_file = root / "annotations" / "instances_sample.json"
    doc = json.loads(ann_file.read_text())
    (base / "outside").mkdir()
    secret = base / "outside" / "secret.jpg"
    shutil.copy(root / "images" / doc["images"][0]["file_name"], secret)
    assert (root / "images" / ESCAPE).resolve() == secret.resolve()
    im1, im2 = doc["images"][1], doc["images"][2]
    w1, h1 = im1["width"], im1["height"]
    extra = [{"image_id": im1["id"], "bbox": [5000, 5000, 300, 300]},        # outside: dropped
             {"image_id": im1["id"], "bbox": [w1 - 10, 2, 50, 20]},          # clipped
             {"image_id": im1["id"], "bbox": [10, 10, -5, 20]},              # negative: dropped
             {"image_id": im2["id"], "bbox": [1, 1, 5, 5], "segmentation": [[1, 2, 3]]}]
    for i, ann in enumerate(extra):
        doc["annotations"].append(ann | {"id": 9000 + i, "category_id": doc["categories"][0]["id"],
                                         "iscrowd": 0, "area": 1.0})
    del im2["width"]                                                         # read from the file
    doc["images"] += [{"id": 900, "file_name": ESCAPE, "width": 10, "height": 10},
                      {"id": 901, "file_name": "nothere.jpg"}]
    ann_file.write_text(json.dumps(doc))
    work = base / "work"
    job = run(config(root, work))
    rows = {r["key"]: r for r in pq.read_table(proposals_dir("edges", work)).to_pylist()}
    return {"root": root, "work": work, "job": job, "rows": rows, "doc": doc, "w1": w1, "h1": h1,
            "ids": (im1["id"], im2["id"]), "secret": secret}


def key(image_id: int) -> str:
    return f"{image_id:012d}"


def test_a_coco_file_name_outside_the_root_is_a_failed_row_and_never_read(edges):
    row = edges["rows"][key(900)]
    assert row["status"] == "failed" and row["sha256"] is None
    assert "resolves outside the dataset root" in row["error"] and ESCAPE in row["error"]
    assert edges["job"]["listing"]["entries failed: file_name outside the dataset root"] == 1


def test_an_entry_without_width_reads_it_from_the_file_or_fails_naming_the_entry(edges):
    im2 = edges["ids"][1]
    assert edges["rows"][key(im2)]["status"] == "ok"
    missing = edges["rows"][key(901)]
    assert missing["status"] == "failed"
    assert "image entry id=901 (nothere.jpg) has no usable width/height" in missing["error"]
    listing = edges["job"]["listing"]
    assert listing["image sizes read from the file (entry without width/height)"] == 1
    assert listing["entries failed: no width/height"] == 1


def test_boxes_outside_are_clipped_or_dropped_and_negative_sizes_dropped_all_counted(edges):
    gt = json.loads(edges["rows"][key(edges["ids"][0])]["gt_json"])
    boxes = {a["id"]: a["bbox"] for a in gt["annotations"]}
    assert 9000 not in boxes and 9002 not in boxes
    x, y, w, h = boxes[9001]
    assert (x, y, x + w, y + h) == (edges["w1"] - 10, 2, edges["w1"], 22)
    for x, y, w, h in boxes.values():
        assert 0 <= x < x + w <= edges["w1"] and 0 <= y < y + h <= edges["h1"]
    listing = edges["job"]["listing"]
    assert listing["annotations dropped: bbox outside the image"] == 1
    assert listing["annotations dropped: bbox with zero or negative width/height"] == 1
    assert listing["boxes clipped to the image"] >= 1


def test_an_invalid_polygon_drops_that_annotation_not_the_image(edges):
    row = edges["rows"][key(edges["ids"][1])]
    assert row["status"] == "ok"
    ids = [a["id"] for a in json.loads(row["gt_json"])["annotations"]]
    assert 9003 not in ids and ids  # the image's other annotations are kept
    assert edges["job"]["listing"]["annotations dropped: bad segmentation (polygon of 3 values)"] == 1


def test_folder_datasets_follow_symlinked_folders_and_skip_loops_counting_them(tmp_path):
    root, elsewhere = tmp_path / "tree", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    elsewhere.mkdir()
    Image.new("RGB", (20, 20), (9, 9, 9)).save(root / "a" / "one.jpg")
    Image.new("RGB", (20, 20), (90, 9, 9)).save(elsewhere / "two.jpg")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    records, counts = list_images_counted("folder", root)
    assert sorted(r.relpath for r in records) == ["a/one.jpg", "linked/two.jpg"]
    assert counts["folders skipped: reached twice (symlink loop or duplicate link)"] == 1
    assert counts["files skipped: not an image extension"] == 1


def test_a_changed_source_is_reprocessed_by_the_command_make_shards_names(edges, tmp_path, capsys):
    root, work = tmp_path / "raw", tmp_path / "work"
    shutil.copytree(edges["root"], root)
    shutil.copytree(edges["work"], work)
    shards = tmp_path / "shards"
    pdir = proposals_dir("edges", work)
    write_shards("edges", proposals=pdir, out=shards, root=root)
    victim = edges["ids"][0]
    path = root / "images" / next(i["file_name"] for i in edges["doc"]["images"] if i["id"] == victim)
    pixels = np.asarray(Image.open(path)).copy()
    pixels[: pixels.shape[0] // 2] = 255 - pixels[: pixels.shape[0] // 2]
    Image.fromarray(pixels).save(path, quality=90)
    write_shards("edges", proposals=pdir, out=shards, root=root, overwrite=True)
    error = ShardDataset(shards).failed[key(victim)]
    assert "changed since make proposals" in error
    fix = "PROPOSALS_ARGS=--refresh-changed"
    assert fix in error and "SHARDS_ARGS=--overwrite" in error
    argv = ["--dataset", "sample", "--root", str(root), "--name", "edges", "--work-dir", str(work),
            "--part-size", "8", "--num-cpus", "2", "--stats", "off", fix.split("=")[1]]
    capsys.readouterr()
    assert job_main(argv) == 0
    assert f"1 image(s) changed since they were processed ({key(victim)})" in capsys.readouterr().out
    rows = {r["key"]: r for r in pq.read_table(pdir).to_pylist()}
    assert rows[key(victim)]["sha256"] == common.io.sha256_file(path)
    write_shards("edges", proposals=pdir, out=shards, root=root, overwrite=True)
    data = ShardDataset(shards)
    assert key(victim) in data.keys and key(victim) not in data.failed
    np.testing.assert_array_equal(data.get(key(victim)).image, np.asarray(Image.open(path).convert("RGB")))


def test_a_second_proposals_job_on_the_same_work_dir_stops_at_once(edges, tmp_path):
    out = proposals_dir("edges", edges["work"])
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from common.io import exclusive
        with exclusive({str(out / '.lock')!r}, "busy"):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=rf"another make proposals is writing {out}; wait"):
            run(config(edges["root"], edges["work"]))
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_under_make_proposals_is_one_message_naming_the_part(edges, tmp_path,
                                                                         monkeypatch, capsys):
    with small_disk(tmp_path / "disk", "8k", monkeypatch) as disk:
        argv = ["--dataset", "sample", "--root", str(edges["root"]), "--work-dir", str(disk),
                "--part-size", "8", "--num-cpus", "2", "--stats", "off"]
        capsys.readouterr()
        assert job_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        last = err[-1]
        assert last.startswith("error: disk full while writing ") and "Traceback" not in "".join(err)
        assert str(disk / "sample" / "proposals") in last and "Free space there" in last
        assert not list((disk / "sample" / "proposals").glob(".*.tmp"))


def test_a_full_disk_under_make_shards_is_one_message_naming_the_file(edges, tmp_path,
                                                                      monkeypatch, capsys):
    with small_disk(tmp_path / "disk", "64k", monkeypatch) as disk:
        out = disk / "shards"
        argv = ["--dataset", "edges", "--proposals", str(proposals_dir("edges", edges["work"])),
                "--out", str(out), "--max-samples", "1"]
        capsys.readouterr()
        assert shards_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: disk full while writing ") and str(out) in err[-1]
        assert not list(out.glob(".*.tmp")) and not (out / "manifest.json").exists()


def test_a_full_disk_under_a_checkpoint_write_raises_disk_full_error_naming_it(tmp_path, monkeypatch):
    """torch.save re-raises the ENOSPC as its own RuntimeError; the atomic writer finds
    the OSError it came from (what train/checkpoint.py's callers catch)."""
    import torch
    with small_disk(tmp_path / "disk", "64k", monkeypatch) as disk:
        with pytest.raises(common.io.DiskFullError, match=rf"writing a checkpoint to {disk}/last.pt"):
            with common.io.atomic_open(disk / "last.pt", "a checkpoint") as f:
                torch.save({"w": torch.zeros(100_000)}, f)
        assert not list(disk.iterdir())


@pytest.mark.parametrize("target,variable,value,flag", [
    ("report", "NAME", "x<b>y", "--name"), ("report", "DATASETS", "a b", "--datasets"),
    ("proposals", "DATA_ROOT", "/data/it's here", "--root"), ("verify", "DATASET", "x;y", "--dataset")])
def test_makefile_variables_reach_the_command_as_one_word(target, variable, value, flag):
    extra = ["DATASET=folder"] if variable == "DATA_ROOT" else []
    out = subprocess.run(["make", "-n", "-s", "--no-print-directory", target, f"{variable}={value}",
                          *extra, "REQ_STAMP=requirements.txt"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    words = shlex.split(out.replace("\\\n", " ").strip().splitlines()[-1])
    assert words[words.index(flag) + 1] == value
