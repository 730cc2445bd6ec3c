"""The report's gallery over the built-in sample: drawn from the shards when they exist (else
from the parts), the worst cases chosen right, the removed boxes recomputed exactly, and the
overlays really on the thumbnails: each panel is decoded and compared with an independent
blend of the stored masks (read through shards.reader), pixel by pixel inside the regions."""
from __future__ import annotations

import json
import re
import shutil
from fractions import Fraction

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common.paths import proposals_dir, shards_dir
from preprocess.audit import gallery, report
from preprocess.proposals import ProposalParams, selective_search
from shards.reader import ShardDataset

TOL = 14  # mean |difference| per channel allowed for lossy WebP inside a region


@pytest.fixture(scope="module")
def built(sample_parts, sample_shards, tmp_path_factory):
    """'withshards': parts + shards; 'partsonly': the same parts without shards."""
    src_work, name = sample_parts
    work = tmp_path_factory.mktemp("gallery_work")
    for ds in ("withshards", "partsonly"):
        shutil.copytree(proposals_dir(name, src_work), proposals_dir(ds, work))
    shutil.copytree(sample_shards, shards_dir("withshards", work))
    out = report.build_report(["withshards", "partsonly"], "g", work=work, reps=50,
                              gallery_sample=4, gallery_worst=2)
    return work, out, (out / "index.html").read_text()


def figures(page: str, dataset: str) -> dict[str, dict[str, str]]:
    """key -> {panel: src} of one dataset's gallery items."""
    out = {}
    for key, body in re.findall(rf'<div class="item" data-key="([^"]+)" data-dataset="{dataset}">(.*?)</div>\n</div>',
                                page, flags=re.S):
        out[key] = dict((p, s) for s, p in re.findall(r'src="([^"]+)" alt="[^"]*" data-key="[^"]+" data-panel="(\w+)"', body))
    return out


def thumb(out, src) -> np.ndarray:
    return np.asarray(Image.open(out / src).convert("RGB")).astype(np.float64)


def expected_base(rgb: np.ndarray, size) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR)).astype(np.float64)


def sample_points(shape, size):
    """Map thumbnail pixel centres to source pixels (nearest), independently of the code."""
    h, w = shape
    tw, th = size
    ys = np.clip(np.floor((np.arange(th) + 0.5) * h / th), 0, h - 1).astype(int)
    xs = np.clip(np.floor((np.arange(tw) + 0.5) * w / tw), 0, w - 1).astype(int)
    return ys, xs


def interior(mask: np.ndarray, r: int = 2) -> np.ndarray:
    """Pixels whose whole (2r+1)^2 neighbourhood is in `mask` (away from lossy edges)."""
    m = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            m &= np.roll(np.roll(mask, dy, 0), dx, 1)
    m[:r], m[-r:], m[:, :r], m[:, -r:] = False, False, False, False
    return m


def test_gallery_is_read_from_the_shards_and_the_mask_overlay_matches_them(built):
    work, out, page = built
    assert f"Read from shards ({shards_dir('withshards', work)})" in page
    figs = figures(page, "withshards")
    assert figs, "no gallery items"
    shards = ShardDataset(shards_dir("withshards", work))
    checked = 0
    for key, panels in figs.items():
        assert set(panels) == {"boxes", "segments", "masks", "gt"}  # the sample has GT
        s = shards.get(key)
        got = thumb(out, panels["masks"])
        size = got.shape[1], got.shape[0]
        ys, xs = sample_points(s.image.shape[:2], size)
        # The best-ranked mask per pixel, painted from the worst rank up: the lowest wins.
        best = np.zeros(s.image.shape[:2], int)
        for i in range(len(s.mcg) - 1, -1, -1):
            best[s.mcg[i]] = i + 1
        best = best[ys[:, None], xs[None, :]]
        base = expected_base(s.image, size)
        for mask_id in np.unique(best):
            region = interior(best == mask_id)
            if region.sum() < 30:
                continue
            want = base[region] if mask_id == 0 else (
                0.5 * base[region] + 0.5 * np.array(gallery.PALETTE[(mask_id - 1) % 16], float))
            assert np.abs(got[region] - want).mean() < TOL, (key, mask_id)
            checked += 1
    assert checked >= len(figs)


def test_ground_truth_is_tinted_inside_its_known_box(built):
    """Pixels of the first instance's colour inside its annotated box on the thumbnail, and
    the untinted image outside every instance."""
    work, out, page = built
    shards = ShardDataset(shards_dir("withshards", work))
    for key, panels in figures(page, "withshards").items():
        s = shards.get(key)
        got = thumb(out, panels["gt"])
        size = got.shape[1], got.shape[0]
        x, y, bw, bh = s.gt["annotations"][0]["bbox"]
        fx, fy = size[0] / s.image.shape[1], size[1] / s.image.shape[0]
        box = np.zeros(got.shape[:2], bool)
        box[int(np.ceil(y * fy)) + 2:int((y + bh) * fy) - 2, int(np.ceil(x * fx)) + 2:int((x + bw) * fx) - 2] = True
        ys, xs = sample_points(s.image.shape[:2], size)
        ids = s.gt_labels[ys[:, None], xs[None, :]]
        base = expected_base(s.image, size)
        inside = interior(ids == 1) & box
        assert inside.sum() > 20, key
        tinted = 0.5 * base[inside] + 0.5 * np.array(gallery.PALETTE[0], float)
        assert np.abs(got[inside] - tinted).mean() < TOL
        assert np.abs(got[inside] - base[inside]).mean() > 2 * TOL  # really changed
        outside = interior(ids == 0, 3)
        assert np.abs(got[outside] - base[outside]).mean() < TOL


def test_kept_boxes_are_drawn_in_cyan_on_their_edges(built):
    work, out, page = built
    shards = ShardDataset(shards_dir("withshards", work))
    key, panels = next(iter(figures(page, "withshards").items()))
    s = shards.get(key)
    got = thumb(out, panels["boxes"])
    fx, fy = got.shape[1] / s.image.shape[1], got.shape[0] / s.image.shape[0]
    x1, y1, x2, y2 = s.boxes[0]
    top = got[int(round(y1 * fy)), int(x1 * fx) + 3:int(x2 * fx) - 3]
    assert np.abs(np.median(top, axis=0) - np.array(gallery.KEPT)).max() < 40


def filter_rejects(rgb, rule: str, p: ProposalParams) -> int:
    """SoCo's rule written out with fractions, box by box, on the unique raw proposals."""
    raw = {tuple(b) for b in selective_search(rgb, p.mode, p.max_side).tolist()}
    h, w = rgb.shape[:2]
    rejected = 0
    for x1, y1, x2, y2 in raw:
        bw, bh = Fraction(x2) - Fraction(x1), Fraction(y2) - Fraction(y1)
        size = bw >= 32 and bh >= 32
        ratio = size and Fraction(1, 3) <= bw / bh <= 3
        scale = Fraction(9, 100) <= bw * bh / (w * h) <= Fraction(64, 100)
        keep = {"soco": size and ratio and scale, "ratio_only": ratio, "size_only": size}[rule]
        rejected += not keep
    return rejected


def test_removed_boxes_are_the_filters_rejects_and_worst_cases_are_chosen_right(built, sample_raw):
    work, out, page = built
    rows = {r["key"]: r for r in pq.read_table(proposals_dir("partsonly", work) / "part-00000.parquet").to_pylist()}
    rows.update({r["key"]: r for p in sorted(proposals_dir("partsonly", work).glob("part-*.parquet"))
                 for r in pq.read_table(p).to_pylist()})
    params = ProposalParams(**json.loads(pq.read_schema(proposals_dir("partsonly", work) / "part-00000.parquet")
                                         .metadata[b"params"])["proposals"])
    from preprocess.decode import load_rgb
    captions = dict(re.findall(r"<div>(\w+): \d+ proposals \(soco\), (\d+) removed by the filter", page))
    assert captions
    for key, removed in list(captions.items())[:3]:
        rgb = load_rgb(sample_raw / rows[key]["source_path"])
        assert int(removed) == filter_rejects(rgb, "soco", params), key
    # Worst cases: the first 'fewest proposals' figure has the fewest boxes of all rows.
    section = page.split("partsonly: fewest proposals")[1]
    first = re.search(r'data-key="(\w+)"', section).group(1)
    assert rows[first]["num_boxes"] == min(r["num_boxes"] for r in rows.values())
    section = page.split("partsonly: most segments")[1]
    first = re.search(r'data-key="(\w+)"', section).group(1)
    assert rows[first]["num_segments"] == max(r["num_segments"] for r in rows.values())


def test_without_shards_the_parts_are_drawn_and_reruns_give_the_same_files(built):
    work, out, page = built
    assert "Read from proposals parts" in page
    a, b = figures(page, "withshards"), figures(page, "partsonly")
    assert set(a) == set(b)  # same selection from the same rows
    again = report.build_report(["withshards", "partsonly"], "g2", work=work, reps=50,
                                gallery_sample=4, gallery_worst=2)
    for panels in b.values():
        for src in panels.values():
            assert (again / src).read_bytes() == (out / src).read_bytes()
    # The sample's stored JPEGs are the source bytes, so both sources draw the same pixels.
    key = next(iter(a))
    assert np.abs(thumb(out, a[key]["masks"]) - thumb(out, b[key]["masks"])).mean() < 1


def test_gallery_says_why_removed_boxes_are_missing_when_the_source_is_gone(built, tmp_path):
    work, _, _ = built
    copy = tmp_path / "work"
    shutil.copytree(proposals_dir("partsonly", work), proposals_dir("moved", copy))
    shutil.copytree(shards_dir("withshards", work), shards_dir("moved", copy))
    job = json.loads((proposals_dir("moved", copy) / "_job.json").read_text())
    job["root"] = str(tmp_path / "gone")
    (proposals_dir("moved", copy) / "_job.json").write_text(json.dumps(job))
    out = report.build_report(["moved"], "m", work=copy, reps=50, gallery_sample=2, gallery_worst=1)
    page = (out / "index.html").read_text()
    assert "removed boxes not shown: cannot read" in page and str(tmp_path / "gone") in page
    assert figures(page, "moved")  # still drawn, from the shards
