"""Semantic-consistency audit report: one folder (index.html + summary.json + img/) a user can
copy, comparing datasets before anyone spends GPU-weeks pretraining on them.

    python -m preprocess.audit.report --datasets "coco imagenet" --name NAME   (= make report)

Reads WORK_DIR/<ds>/proposals/part-*.parquet (+ _job.json for the dataset root) and, for
the gallery, WORK_DIR/<ds>/shards/ when they exist. Gathering (preprocess.audit.gather,
.gallery) is separate from rendering: this module builds one context dict and renders
templates/report.html.j2 with Jinja2 (autoescaped); charts are inline SVG drawn by the
template from preprocess.audit.charts data; images are JPEG files under img/.

Sections: the distance per dataset with a bootstrap 95% CI, one comparison per backbone
(MaskCo's Table 1 beside torchvision's supervised ResNet-50 only), ECDFs, the most and
least consistent images with their crop pair, the gallery of proposals / FH segments /
MCG-style masks / GT, proposal statistics, failures. Distances computed with random weights
(tests) are flagged "not meaningful" in the data and on every figure.
"""
from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from common.io import atomic_write_bytes, atomic_write_text
from common.paths import report_dir, shards_dir
from common.progress import Progress
from preprocess.audit import gallery as gal
from preprocess.audit.backbones import identity
from preprocess.audit.charts import Series, chart, ecdf, step_hist
from preprocess.audit.distance import PAPER_TABLE1, StatsConfig, crop_pairs
from preprocess.audit.gather import SIZE_BINS, DatasetData, gather, json_text, summarise

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"]
MAX_FAILURES_SHOWN = 200
NOT_MEANINGFUL = "NOT MEANINGFUL: random weights (test run)"
TEMPLATES = Path(__file__).resolve().parent / "templates"
IMG = "img"


def environment():
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = num
    return env


def num(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


class Images:
    """Writes the page's images under <report>/img/ (atomically) and returns their relative
    paths; the folder is emptied first, so it holds only this report's files."""

    def __init__(self, out: Path):
        self.out = out
        shutil.rmtree(out / IMG, ignore_errors=True)
        self.count = self.bytes = 0

    def put(self, rel: str, img) -> str:
        data = gal.jpeg(img)
        atomic_write_bytes(self.out / IMG / rel, data)
        self.count += 1
        self.bytes += len(data)
        return f"{IMG}/{rel}"


# ---------------------------------------------------------------- context pieces
def comparisons(datasets: list[DatasetData], summaries: dict) -> list[dict]:
    """One comparison per backbone: the datasets whose distances came from it, never mixed."""
    groups: dict[str, dict] = {}
    for i, d in enumerate(datasets):
        for bid, fig in summaries[d.name]["distance_by_backbone"].items():
            if fig["n"] == 0:
                continue
            g = groups.setdefault(bid, {"id": bid, "backbone": fig["backbone"], "rows": [],
                                        "series": [], "warnings": []})
            p = fig["params"][0] if fig["params"] else {}
            g["rows"].append({"dataset": d.name, "fig": fig, "pairs": p.get("pairs", "n/a"),
                              "partial": fig["n"] < summaries[d.name]["ok"]})
            for other in fig["params"][1:]:
                g["warnings"].append((d.name, other))
            v = np.asarray(d.distance, float)[np.asarray(d.backbone) == d.backbones.index(fig["backbone"])]
            v = v[~np.isnan(v)]
            g["series"].append(Series(d.name, *ecdf(v), COLOURS[i % len(COLOURS)]))
    out = []
    for g in groups.values():
        meaningful = all(r["fig"]["meaningful"] for r in g["rows"])
        paper = g["backbone"]["kind"] in ("torchvision", "random")  # random: the tests' stand-in
        xmax = max(0.3 if (meaningful and paper) else 0.0,
                   float(max(np.max(s.xs) for s in g["series"])) * 1.05)
        vlines = ([(PAPER_TABLE1["ImageNet"], "IN mean (paper)"), (PAPER_TABLE1["COCO"], "COCO mean (paper)")]
                  if paper else [])
        g.update(meaningful=meaningful, paper=paper, chart=chart(
            g.pop("series"), "per-image distance", "fraction of images ≤ x",
            "ECDF of per-image distances", xlim=(0, xmax),
            ylim=(0, 1), vlines=vlines, note=None if meaningful else "NOT MEANINGFUL"))
        out.append(g)
    return out


def example_figure(images: Images, folder: str, d: DatasetData, j: int, p: dict | None,
                   meaningful: bool, thumb: int = 180) -> dict:
    """Thumbnail with the first crop pair outlined, plus the two views as the model saw them."""
    from PIL import Image, ImageDraw
    from preprocess.decode import load_rgb
    fig = {"key": d.keys[j], "d": d.distance[j], "meaningful": meaningful, "thumb": None,
           "views": [], "missing": None}
    if d.root is None or p is None:
        fig["missing"] = "no image root or stats parameters"
        return fig
    path = d.root / d.paths[j]
    try:
        rgb = load_rgb(path)
    except Exception as e:  # report is best effort: say what is missing, keep going
        fig["missing"] = f"cannot read {path}: {e}"
        return fig
    pair = crop_pairs(d.keys[j], rgb.shape[1], rgb.shape[0], StatsConfig.from_params(p))[0]
    img = Image.fromarray(rgb)
    small = img.resize(gal.thumb_size(img.width, img.height, thumb), Image.BILINEAR)
    s = small.width / img.width, small.height / img.height
    pen = ImageDraw.Draw(small)
    for b, colour in zip(pair, ("#00e5ff", "#ffea00")):
        pen.rectangle([b[0] * s[0], b[1] * s[1], b[2] * s[0] - 1, b[3] * s[1] - 1], outline=colour, width=2)
    fig["thumb"] = images.put(f"{folder}/{d.keys[j]}.crops.jpg", small)
    for i, b in enumerate(pair):
        view = img.resize((thumb // 2, thumb // 2), Image.BILINEAR, box=tuple(map(int, b)))
        fig["views"].append(images.put(f"{folder}/{d.keys[j]}.view{i + 1}.jpg", view))
    return fig


def examples(images: Images, datasets: list[DatasetData], summaries: dict, top: int) -> list[dict]:
    out = []
    for i, d in enumerate(datasets):
        figs = summaries[d.name]["distance_by_backbone"]
        if not any(f["n"] for f in figs.values()):
            out.append({"dataset": d.name, "backbone": None, "lists": []})
            continue
        for bid, f in figs.items():
            if f["backbone"] is None:
                continue
            b = d.backbones.index(f["backbone"])
            v = np.asarray(d.distance, float)
            idx = np.flatnonzero((np.asarray(d.backbone) == b) & ~np.isnan(v))
            if not len(idx):
                continue
            order = idx[np.argsort(v[idx], kind="stable")]
            k = min(top, max(1, len(order) // 2))  # small sets: no image in both lists
            p = f["params"][0] if f["params"] else None
            lists = [(title, [example_figure(images, f"ds{i}/b{b}", d, j, p, f["meaningful"]) for j in chosen])
                     for title, chosen in (("least consistent (largest d)", order[::-1][:k]),
                                           ("most consistent (smallest d)", order[:k]))]
            out.append({"dataset": d.name, "backbone": bid, "meaningful": f["meaningful"], "lists": lists})
    return out


def gallery_section(images: Images, i: int, d: DatasetData, work, n_sample: int, n_worst: int,
                    side: int, seed: int = 0) -> dict:
    """Chosen images of one dataset drawn as panels; from the shards when they exist."""
    chosen = gal.select(d.keys, d.num_boxes, d.num_segments, d.rules, n_sample, n_worst, seed)
    keys = sorted({d.keys[j] for idx in chosen.values() for j in idx})
    shards = shards_dir(d.name, work)
    section = {"dataset": d.name, "categories": [], "notes": []}
    if (shards / "manifest.json").is_file():
        section["source"] = f"shards ({shards}), read with shards.reader.ShardDataset"
        try:
            items = gal.items_from_shards(shards, keys)
        except Exception as e:  # stale or broken shards: say so, draw from the parts
            section["notes"].append(f"cannot read the shards ({type(e).__name__}: {e}); drawn from the parts")
            items = None
    else:
        items = None
    if items is None:
        if d.root is None:
            section["notes"].append("no dataset root in _job.json and no shards: nothing to draw")
            return section
        section.setdefault("source", f"proposals parts ({d.folder}; no shards yet) and the "
                                     f"source images under {d.root}")
        try:
            items = gal.items_from_parts(d.folder, keys, d.root)
        except Exception as e:  # unreadable source images: say which
            section["notes"].append(f"cannot draw from the parts: {type(e).__name__}: {e}")
            return section
    drawn = {}
    for key, item in items.items():
        gal.add_removed(item, d.root, d.proposal_params)
        panels = gal.draw(item, side)
        j = d.keys.index(key)
        drawn[key] = {"key": key, "rule": item.rule, "boxes": len(item.boxes),
                      "removed": len(item.removed), "segments": d.num_segments[j],
                      "masks": d.num_masks[j], "notes": item.notes,
                      "panels": [{"name": n, "title": gal.PANEL_TITLES[n],
                                  "src": images.put(f"ds{i}/gallery/{key}.{n}.jpg", img)}
                                 for n, img in panels.items()]}
    for title in gal.CATEGORIES:
        figs = [drawn[d.keys[j]] for j in chosen[title] if d.keys[j] in drawn]
        section["categories"].append({"title": title, "figures": figs})
    return section


def proposals_section(datasets: list[DatasetData], summaries: dict) -> dict:
    rows = []
    for d in datasets:
        s = summaries[d.name]
        for label, k in (("proposals", "proposals_per_image"), ("FH segments", "segments_per_image"),
                         ("MCG-style masks", "masks_per_image"), ("box side in px (n = boxes)", "box_side_px")):
            rows.append({"dataset": d.name, "what": label, "c": s[k]})
    rule_names = sorted({r for d in datasets for r in summaries[d.name]["filter_rules"]})
    rule_rows = []
    for d in datasets:
        used, ok = summaries[d.name]["filter_rules"], max(1, summaries[d.name]["ok"])
        rule_rows.append([d.name] + [f"{used.get(r, 0)} ({100 * used.get(r, 0) / ok:.1f}%)" for r in rule_names])
    hist_series, count_series = [], []
    for i, d in enumerate(datasets):
        colour = COLOURS[i % len(COLOURS)]
        hist_series.append(Series(d.name, *step_hist(d.size_hist, SIZE_BINS), colour))
        nb = np.asarray(d.num_boxes)
        if len(nb):
            top_count = max(1, int(nb.max()))
            bins = (np.arange(top_count + 2) - 0.5 if top_count <= 60
                    else np.linspace(0, top_count + 1, 31))
            count_series.append(Series(d.name, *step_hist(np.histogram(nb, bins)[0], bins), colour))
    charts = [chart(hist_series, "box side / image side, sqrt(area ratio)", "fraction of boxes",
                    "Proposal size distribution", xlim=(0, 1))]
    if count_series:
        charts.append(chart(count_series, "proposals per image", "fraction of images", "Proposals per image"))
    return {"rows": rows, "rule_names": rule_names, "rule_rows": rule_rows, "charts": charts}


# ---------------------------------------------------------------- build
def build_report(datasets: list[str], name: str, *, work=None, top: int = 6, reps: int = 2000,
                 seed: int = 0, gallery: bool = True, gallery_sample: int = 8,
                 gallery_worst: int = 3, gallery_side: int = 240) -> Path:
    """Write WORK_DIR/report/<name>/{index.html, summary.json, img/}; return the folder."""
    if not datasets:
        raise ValueError("no datasets given: pass --datasets \"coco imagenet\"")
    start = time.perf_counter()
    progress = Progress("report", len(datasets), unit="dataset", every_s=0)
    gathered, summaries = [], {}
    for ds in datasets:
        data = gather(ds, work)
        gathered.append(data)
        summaries[ds] = summarise(data, reps, seed)
        progress.update()
    out = report_dir(name, work)
    images = Images(out)
    meaningful = all(s["resnet_distance"]["meaningful"] for s in summaries.values())
    context = {
        "name": name, "datasets": gathered, "summaries": summaries, "meaningful": meaningful,
        "not_meaningful": NOT_MEANINGFUL, "paper": PAPER_TABLE1,
        "generated": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "comparisons": comparisons(gathered, summaries),
        "without_distances": [d.name for d in gathered if summaries[d.name]["resnet_distance"]["n"] == 0],
        "examples": examples(images, gathered, summaries, top),
        "gallery": ([gallery_section(images, i, d, work, gallery_sample, gallery_worst, gallery_side, seed)
                     for i, d in enumerate(gathered)] if gallery else None),
        "panel_titles": gal.PANEL_TITLES,
        "proposals": proposals_section(gathered, summaries),
        "failures": [(d.name, f) for d in gathered for f in d.failures[:MAX_FAILURES_SHOWN]],
        "failure_counts": [(d.name, len(d.failures), d.images) for d in gathered],
        "failures_cut": [d.name for d in gathered if len(d.failures) > MAX_FAILURES_SHOWN],
        "max_failures": MAX_FAILURES_SHOWN,
        "identity": identity,
    }
    atomic_write_text(out / "index.html", environment().get_template("report.html.j2").render(context))
    summary = {"name": name, "paper_table1": PAPER_TABLE1, "meaningful": meaningful,
               "datasets": summaries,
               "images": {"files": images.count, "bytes": images.bytes}}
    atomic_write_text(out / "summary.json", json_text(summary))
    for ds in datasets:
        r = summaries[ds]["resnet_distance"]
        flag = "" if r["meaningful"] else "  NOT MEANINGFUL"
        print(f"[report] {ds}: {summaries[ds]['ok']} ok, {summaries[ds]['failed']} failed, "
              f"distance {num(r['mean'])} 95% CI [{num(r['ci95'][0])}, {num(r['ci95'][1])}] "
              f"n={r['n']} ({r['backbone_id'] or 'no backbone'}){flag}", file=sys.stderr)
    print(f"[report] wrote {out / 'index.html'}, summary.json and {images.count} images "
          f"({images.bytes / 1e6:.2f} MB) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m preprocess.audit.report", description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", required=True, help='space-separated names, e.g. "coco imagenet"')
    ap.add_argument("--name", default=None, help="report name (default: datasets joined by '-')")
    ap.add_argument("--top", type=int, default=6, help="images shown per extreme of the distance")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--gallery-sample", type=int, default=8, help="gallery: images in the random sample")
    ap.add_argument("--gallery-worst", type=int, default=3, help="gallery: images per worst case")
    ap.add_argument("--no-gallery", action="store_true", help="leave the gallery out (faster)")
    args = ap.parse_args(argv)
    names = args.datasets.split()
    try:
        build_report(names, args.name or "-".join(names), top=args.top, reps=args.bootstrap,
                     gallery=not args.no_gallery, gallery_sample=args.gallery_sample,
                     gallery_worst=args.gallery_worst)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
