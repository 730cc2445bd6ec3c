"""`make shards` on Ray (shards.parallel): the same bytes as the in-process writer for the
same parts and seed, under count and byte bounds, with unpackable samples in the middle
of the order; resumable per shard."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from schemas.proposals import PROPOSALS
from shards.parallel import plan_shards, write_shards_on_ray
from shards.tarfmt import end_of_archive
from shards.write import PackParams, write_shards
from tests.test_shards import files_of, hand_parts  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def ray_session():
    import ray
    from preprocess.job import start_ray
    started, _ = start_ray(2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def bad_parts(hand_parts, tmp_path_factory):  # noqa: F811
    """hand_parts with three samples that fail packing (a changed source, a cut label map,
    a box outside the image) and its one failed preprocessing row."""
    pdir, info = hand_parts
    tmp = tmp_path_factory.mktemp("bad_parts")
    raw, parts = tmp / "raw", tmp / "proposals"
    job = json.loads((pdir / "_job.json").read_text())
    shutil.copytree(job["root"], raw)
    shutil.copytree(pdir, parts)
    victim = next(iter(info["expected"].values()))
    (raw / Path(victim["path"]).relative_to(job["root"])).write_bytes(b"not the image preprocessing saw")
    part = parts / "part-00000.parquet"
    rows = pq.read_table(part).to_pylist()
    rows[1]["fh_png"] = rows[1]["fh_png"][:60]
    rows[2]["boxes"][1] = [0.0, 0.0, rows[2]["width"] + 5.0, 10.0]
    pq.write_table(PROPOSALS.from_rows(rows), part)
    return parts, raw


@pytest.mark.parametrize("params", [PackParams(max_bytes=100_000, seed=3), PackParams(max_samples=4)],
                         ids=["byte-bound", "count-bound"])
def test_ray_tasks_write_the_same_bytes_as_the_in_process_writer(ray_session, bad_parts, tmp_path, params):
    parts, raw = bad_parts
    local = write_shards("sample", params, proposals=parts, out=tmp_path / "local", root=raw)
    ray = write_shards_on_ray("sample", params, parts, tmp_path / "ray", raw, False, None, chunk=3)
    assert 1 < len(local["shards"]) < local["num_samples"] and local["num_failed"] == 4
    assert ray == local  # manifest: every shard's sha256 and size, counts, inputs
    unlocked = {k: v for k, v in files_of(tmp_path / "local").items() if k != "_rows/.lock"}
    assert files_of(tmp_path / "ray") == unlocked  # tars, .idx, index, _rows


def test_the_plan_closes_shards_by_count_and_bytes_like_a_direct_loop():
    """plan_shards against a loop written here from the rule: a shard closes before the
    sample that would exceed the count or (with its end of archive) the bytes; failures
    (-1) join the shard they fall in, those after the last sample the last shard; with
    no packable sample at all there is no shard and every failure is left to the index."""
    sizes = [-1, 3000, 2048, -1, 5000, 512, -1, 7000, 1024, -1, -1]
    params = PackParams(max_samples=2, max_bytes=12_000)
    shards, tail = plan_shards(sizes, params)
    expected, start, count, size = [], 0, 0, 0
    for pos, s in enumerate(sizes):
        if s < 0:
            continue
        grown = size + s
        full = count >= 2 or grown + len(end_of_archive(grown)) > 12_000
        if count and full:
            expected.append((start, pos))
            start, count, size = pos, 0, 0
            grown = s
        count, size = count + 1, grown
    expected.append((start, len(sizes)))
    assert shards == expected and tail == len(sizes)
    assert plan_shards([-1, -1], params) == ([], 0)


def test_a_killed_ray_pack_resumes_per_shard_keeping_finished_shards(ray_session, bad_parts, tmp_path, capsys):
    parts, raw = bad_parts
    params = PackParams(max_samples=3)
    out = tmp_path / "shards"
    write_shards_on_ray("sample", params, parts, out, raw, False, None, chunk=4)
    before = files_of(out)
    kept = out / "sample-000000.tar"
    stamp = kept.stat().st_mtime_ns
    for name in ("sample-000001.tar", "manifest.json", "index.parquet"):  # as a kill leaves it
        (out / name).unlink()
    (out / "_rows" / "sample-000002.parquet").unlink()
    capsys.readouterr()
    write_shards_on_ray("sample", params, parts, out, raw, False, None, chunk=4)
    n = len(json.loads((out / "manifest.json").read_text())["shards"])
    assert f"{n - 2} shards were complete already and kept" in capsys.readouterr().err
    assert files_of(out) == before and kept.stat().st_mtime_ns == stamp
    assert not (out / "_rows" / "chunks").exists()
