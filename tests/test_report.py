"""The audit report: built over parts of the real preprocessing job (sample_parts) whose
distances come from `make stats` with a random-weight ResNet-50 (so every figure must be
flagged not meaningful), for one and for two datasets."""
from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common.paths import proposals_dir
from preprocess.audit import distance, gather, report
from preprocess.audit import stats as make_stats
from schemas.proposals import PROPOSALS

SECTIONS = ["distance", "distribution", "examples", "gallery", "proposals", "failures"]
FAST = distance.StatsConfig(seed=1, pairs=2, size=64, batch_views=32)


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.imgs, self.panels = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":  # crop-pair examples in imgs, gallery panels in panels
            (self.panels if "data-panel" in a else self.imgs).append(a.get("src", ""))


@pytest.fixture(scope="module")
def audit_work(sample_parts, tmp_path_factory):
    """Two datasets from the sample job's parts: 'scenes' (all parts, plus one failed row
    whose error text holds HTML) and 'subset' (the first two parts); distances from
    `make stats --random-weights`."""
    src_work, name = sample_parts
    src = proposals_dir(name, src_work)
    work = tmp_path_factory.mktemp("audit_work")
    shutil.copytree(src, proposals_dir("scenes", work))
    sub = proposals_dir("subset", work)
    sub.mkdir(parents=True)
    shutil.copy(src / "_job.json", sub / "_job.json")
    for p in sorted(src.glob("part-*.parquet"))[:2]:
        shutil.copy(p, sub / p.name)
    failed = PROPOSALS.from_rows([{"key": "zz-broken", "source_path": "images/zz.jpg", "status": "failed",
                                   "error": "DecodeError: <truncated> & bad"}])
    pq.write_table(failed, proposals_dir("scenes", work) / "part-09999.parquet")
    for ds in ("scenes", "subset"):
        make_stats.run_stats(ds, FAST, random_weights=True, use_ray=False, work=work)
    return work


def per_image_means(work, ds) -> np.ndarray:
    t = pq.ParquetDataset(proposals_dir(ds, work)).read(columns=["resnet_distance_mean"])
    v = t.column(0).to_numpy(zero_copy_only=False).astype(float)
    return v[~np.isnan(v)]


def check_page(out, datasets, top):
    page = (out / "index.html").read_text()
    parser = Collect()
    parser.feed(page)
    assert parser.ids == SECTIONS
    # Self-contained: every image a file inside the report folder, nothing fetched from elsewhere.
    assert parser.imgs and parser.panels
    for src in parser.imgs + parser.panels:
        assert src.startswith("img/") and (out / src).is_file(), src
        assert Image.open(out / src).format == "JPEG"
    assert not re.search(r'(src|href)="(http|file|/|data:)', page)
    for svg in re.findall(r"<svg.*?</svg>", page, flags=re.S):
        ET.fromstring(svg)  # well-formed XML, or the browser shows nothing
    assert "ECDF of per-image distances" in page and "Proposal size distribution" in page
    for label, value in distance.PAPER_TABLE1.items():
        assert label in page and f"{value:.4f}" in page
    assert report.NOT_MEANINGFUL in page and page.count("not meaningful") >= 2 * len(datasets)
    assert ">NOT MEANINGFUL</text>" in page  # on the chart itself
    return page, parser


def test_report_one_dataset(audit_work):
    out = report.build_report(["scenes"], "one", work=audit_work, top=3, reps=500)
    page, parser = check_page(out, ["scenes"], 3)
    summary = json.loads((out / "summary.json").read_text())
    s = summary["datasets"]["scenes"]
    d = per_image_means(audit_work, "scenes")
    assert s["resnet_distance"]["n"] == len(d) == 14
    assert s["resnet_distance"]["mean"] == pytest.approx(d.mean(), rel=1e-6)
    lo, hi = s["resnet_distance"]["ci95"]
    assert lo < d.mean() < hi
    assert summary["meaningful"] is False and s["resnet_distance"]["meaningful"] is False
    assert s["resnet_distance"]["params"][0]["seed"] == FAST.seed
    # 3 least + 3 most consistent, each a thumbnail and its two views.
    assert len(parser.imgs) == 2 * 3 * 3
    # Proposal statistics agree with the parts.
    t = pq.ParquetDataset(proposals_dir("scenes", audit_work)).read(columns=["status", "num_boxes", "filter_rule"])
    ok = [r for r in t.to_pylist() if r["status"] == "ok"]
    assert s["proposals_per_image"]["mean"] == pytest.approx(np.mean([r["num_boxes"] for r in ok]))
    assert sum(s["filter_rules"].values()) == len(ok) == s["ok"]
    assert sum(s["box_relative_side_hist"]["counts"]) == sum(r["num_boxes"] for r in ok)
    # The failure is listed, its text escaped, and left out of the figures.
    assert s["failed"] == 1 and s["failures"][0]["key"] == "zz-broken"
    assert "DecodeError: &lt;truncated&gt; &amp; bad" in page and "<truncated>" not in page


def test_report_two_datasets(audit_work):
    out = report.build_report(["scenes", "subset"], "two", work=audit_work, top=2, reps=500)
    page, parser = check_page(out, ["scenes", "subset"], 2)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["datasets"]) == {"scenes", "subset"}
    sub = summary["datasets"]["subset"]["resnet_distance"]
    assert sub["n"] == len(per_image_means(audit_work, "subset")) == 8
    assert sub["mean"] == pytest.approx(per_image_means(audit_work, "subset").mean(), rel=1e-6)
    assert len(parser.imgs) == 2 * (2 * 2 * 3)
    assert page.count("<polyline") >= 2 * 3  # both datasets on each chart


def test_report_without_distances_says_run_stats(sample_parts, tmp_path):
    src_work, name = sample_parts
    shutil.copytree(proposals_dir(name, src_work), proposals_dir("raw", tmp_path))
    for part in proposals_dir("raw", tmp_path).glob("part-*.parquet"):  # as made without weights
        t = pq.read_table(part)
        for col in distance.STATS_COLUMNS:
            t = t.set_column(t.column_names.index(col), col, pa.nulls(t.num_rows, t.schema.field(col).type))
        pq.write_table(t, part)
    out = report.build_report(["raw"], "nostats", work=tmp_path, reps=100)
    page = (out / "index.html").read_text()
    assert "run `make stats`" in page
    summary = json.loads((out / "summary.json").read_text())
    assert summary["datasets"]["raw"]["resnet_distance"]["n"] == 0
    assert summary["meaningful"] is False


def test_report_missing_dataset_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORK_DIR", str(tmp_path))
    assert report.main(["--datasets", "nothing", "--name", "x"]) == 2
    assert "make proposals DATASET=nothing" in capsys.readouterr().err


def test_bootstrap_interval_covers_and_has_the_normal_width():
    rng = np.random.default_rng(5)
    x = rng.exponential(0.2, size=4000)
    lo, hi = gather.bootstrap_ci(x, reps=1000, seed=0)
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert gather.bootstrap_ci(np.array([0.3])) == (0.3, 0.3)
    assert gather.bootstrap_ci(np.array([])) == (None, None)
