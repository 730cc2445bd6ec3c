"""`python -m shards.verify --dataset X`: check a shards folder end to end.

Every shard's size and sha256 against the manifest, every header and member by a
full walk of each tar (no index trusted), agreement of members, offsets, sizes and
crc32 with index.parquet, the .idx files with what the tar holds, and each member's
content (boxes size, JSON, PNG sizes). Prints problems by shard and key; exits 1
when there is any."""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from common.io import crc32, sha256_file
from common.keys import BadKeyError, check_key
from common.paths import shards_dir
from common.progress import Progress
from schemas import validate
from schemas.index import INDEX, check_manifest
from shards import format as fmt
from shards.reader import INDEX_FILE, MANIFEST, iter_tar
from shards.tarfmt import ShardError, check_shard_name


def check_sample(key: str, members: dict[str, bytes], row: dict, decode: bool) -> list[str]:
    """Problems with one sample's content, given its index row (shards.format's checks)."""
    return fmt.sample_problems(key, members, row["width"], row["height"], row["num_boxes"] or 0,
                               jpeg=decode, pngs=decode, num_masks=row["num_masks"] or 0)


def verify_shard(path: Path, record: dict, rows: list[dict], decode: bool,
                 progress: Progress) -> tuple[list[str], set[str]]:
    """Problems in one tar (prefixed with its name) and the keys found in it."""
    name = path.name
    problems, found = [], set()
    if not path.is_file():
        return [f"shard {name}: missing"], found
    if path.stat().st_size != record["bytes"]:
        problems.append(f"shard {name}: {path.stat().st_size} bytes, manifest says "
                        f"{record['bytes']} (truncated or altered)")
    if sha256_file(path) != record["sha256"]:
        problems.append(f"shard {name}: sha256 differs from the manifest (altered or corrupted)")
    by_key = {r["key"]: r for r in rows}
    idx = path.with_suffix(".idx")
    expected = [(r["key"], {m["ext"]: (m["offset"], m["size"]) for m in r["members"]})
                for r in sorted(rows, key=lambda r: r["position"])]
    try:
        if fmt.parse_index(idx.read_text(), idx.name, path.stat().st_size) != expected:
            problems.append(f"shard {name}: {idx.name} disagrees with the index")
    except FileNotFoundError:
        problems.append(f"shard {name}: {idx.name} missing")
    except fmt.MemberError as e:
        problems.append(f"shard {name}: {e}")
    position = 0
    try:
        with open(path, "rb") as raw:
            for key, members, start in iter_tar(path):
                found.add(key)
                row = by_key.get(key)
                where = f"shard {name} key {key} (offset {start})"
                if row is None:
                    problems.append(f"{where}: in the tar but not listed for this shard in "
                                    "index.parquet")
                    continue
                if row["position"] != position or row["tar_offset"] != start:
                    problems.append(f"{where}: index says position {row['position']} offset "
                                    f"{row['tar_offset']}, the tar has {position} {start}")
                raw.seek(row["tar_offset"])
                if crc32(raw.read(row["tar_size"])) != row["crc32"]:
                    problems.append(f"{where}: crc32 differs from the index (altered bytes)")
                for m, want in zip(row["members"], row["member_crc32"] or []):
                    if m["ext"] in members and crc32(members[m["ext"]]) != want:
                        problems.append(f"{where}: member {key}.{m['ext']} at offset "
                                        f"{m['offset']}: crc32 differs from the index")
                listed = [(m["ext"], m["size"]) for m in row["members"]]
                actual = [(ext, len(data)) for ext, data in members.items()]
                if listed != actual:
                    problems.append(f"{where}: members {actual} differ from the index {listed}")
                problems += [f"{where}: {p}" for p in check_sample(key, members, row, decode)]
                position += 1
                progress.update()
    except ShardError as e:  # its message starts with the shard's name
        problems.append(f"shard {e}")
    except BadKeyError as e:
        problems.append(f"shard {name}: {e}")
    if position != record["num_samples"]:
        problems.append(f"shard {name}: {position} samples read, manifest says "
                        f"{record['num_samples']}")
    for key in sorted(set(by_key) - found):
        problems.append(f"shard {name} key {key}: listed in index.parquet but not in the tar")
    return problems, found


def verify(folder, decode: bool = False) -> list[str]:
    """All problems found in a shards folder (empty when it is sound)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return [f"{folder / MANIFEST} not found: the shards are missing or unfinished; run "
                "make shards DATASET=<name>"]
    try:
        manifest = check_manifest(json.loads((folder / MANIFEST).read_text()), str(folder / MANIFEST))
        index = validate(pq.read_table(folder / INDEX_FILE), INDEX, str(folder / INDEX_FILE))
    except (OSError, ValueError) as e:
        return [f"{folder}: {e}"]
    problems = []
    if sha256_file(folder / INDEX_FILE) != manifest.get("index", {}).get("sha256"):
        problems.append(f"{INDEX_FILE}: sha256 differs from the manifest")
    rows_by_shard, seen = defaultdict(list), set()
    for row in index.to_pylist():
        try:
            check_key(row["key"], INDEX_FILE)
        except BadKeyError as e:
            problems.append(str(e))
            continue
        if row["key"] in seen:
            problems.append(f"{INDEX_FILE} key {row['key']}: listed twice")
        seen.add(row["key"])
        if row["status"] == "ok":
            rows_by_shard[row["shard"]].append(row)
        elif row["shard"] is not None:
            problems.append(f"{INDEX_FILE} key {row['key']}: failed but assigned to {row['shard']}")
    try:
        names = [check_shard_name(s["name"], MANIFEST) for s in manifest["shards"]]
    except BadKeyError as e:
        return problems + [str(e)]
    for name in sorted(set(rows_by_shard) - set(names)):
        problems.append(f"{INDEX_FILE}: samples in shard {name}, which the manifest does not list")
    stray = sorted(p.name for p in folder.glob("*.tar") if p.name not in names)
    problems += [f"shard {n}: in the folder but not in the manifest" for n in stray]
    progress = Progress(f"verify {manifest['dataset']}", manifest["num_samples"], unit="sample")
    for record in manifest["shards"]:
        shard_problems, _ = verify_shard(folder / record["name"], record,
                                         rows_by_shard.get(record["name"], []), decode, progress)
        problems += shard_problems
    print(f"[verify {manifest['dataset']}] {len(names)} shards, {progress.done} samples checked, "
          f"{len(problems)} problems; {progress.elapsed:.1f}s", file=sys.stderr, flush=True)
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", help="dataset name under WORK_DIR")
    ap.add_argument("--dir", help="shards folder (default WORK_DIR/<ds>/shards)")
    ap.add_argument("--decode", action="store_true", help="also decode every image and PNG")
    a = ap.parse_args(argv)
    if not (a.dataset or a.dir):
        ap.error("give --dataset or --dir")
    folder = Path(a.dir) if a.dir else shards_dir(a.dataset)
    problems = verify(folder, decode=a.decode)
    for p in problems:
        print(f"PROBLEM {p}")
    print(f"{folder}: {'OK' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
