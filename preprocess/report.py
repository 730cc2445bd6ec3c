"""Semantic-consistency audit report: one self-contained HTML page (charts as inline SVG,
images as embedded JPEG) plus summary.json, comparing datasets before anyone spends
GPU-weeks pretraining on them.

    python -m preprocess.report --datasets "coco imagenet" --name NAME   (= make report)

Reads WORK_DIR/<ds>/proposals/part-*.parquet (+ _job.json for the dataset root, where the
thumbnails come from) and writes WORK_DIR/report/<name>/{index.html,summary.json}.
Sections: ResNet distance per dataset with a bootstrap 95% CI beside MaskCo's Table 1, ECDFs
of the per-image distances, the most and least consistent images with their crop pair,
proposal / segment / mask statistics, and the failure table. Distances computed with random
weights (tests) are flagged "not meaningful" in the data and on every figure.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import html
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.io import atomic_write_text
from common.paths import report_dir
from common.progress import Progress
from preprocess.stats import PAPER_TABLE1, StatsConfig, crop_pairs, dataset_root, read_job
from schemas import table_params, validate
from schemas.proposals import PROPOSALS

COLUMNS = ["key", "source_path", "status", "error", "width", "height", "boxes", "num_boxes",
           "filter_rule", "num_segments", "num_masks", "resnet_distance_mean",
           "resnet_distance_std", "resnet_distance_pairs", "stats_meaningful"]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"]
SIZE_BINS = np.linspace(0, 1, 21)  # sqrt(box area / image area)
MAX_FAILURES_SHOWN = 200
NOT_MEANINGFUL = "NOT MEANINGFUL: random weights (test run)"


# ---------------------------------------------------------------- gathering
@dataclass
class DatasetData:
    name: str
    root: Path | None
    parts: int = 0
    keys: list = field(default_factory=list)
    paths: list = field(default_factory=list)
    distance: list = field(default_factory=list)   # per-image mean (NaN when absent)
    meaningful: list = field(default_factory=list)
    num_boxes: list = field(default_factory=list)
    num_segments: list = field(default_factory=list)
    num_masks: list = field(default_factory=list)
    filter_rules: dict = field(default_factory=dict)
    size_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(SIZE_BINS) - 1))
    box_side_px: list = field(default_factory=list)  # per-part quantile inputs (subsampled)
    failures: list = field(default_factory=list)
    images: int = 0
    stats_params: list = field(default_factory=list)


def gather(dataset: str, work=None) -> DatasetData:
    """Stream the parts of one dataset, keeping per-image scalars and box histograms only."""
    folder, job = read_job(dataset, work)
    try:
        root = dataset_root(job, folder / "_job.json")
    except ValueError:
        root = None
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{folder} holds no part-*.parquet; run `make proposals "
                                f"DATASET={dataset}` first.")
    data = DatasetData(dataset, root, parts=len(parts))
    for path in parts:
        schema = pq.read_schema(path)
        table = validate(pq.read_table(path, columns=[c for c in COLUMNS if c in schema.names]),
                         PROPOSALS, str(path))
        sp = table_params(table.schema).get("stats")
        if sp and sp not in data.stats_params:
            data.stats_params.append(sp)
        _add_part(data, table)
    return data


def _add_part(data: DatasetData, t: pa.Table) -> None:
    col = {n: t.column(n).to_pylist() for n in COLUMNS if n != "boxes"}
    data.images += t.num_rows
    for i, status in enumerate(col["status"]):
        if status != "ok":
            data.failures.append({"key": col["key"][i], "source_path": col["source_path"][i],
                                  "error": col["error"][i] or "(no error text)"})
            continue
        data.keys.append(col["key"][i])
        data.paths.append(col["source_path"][i])
        d = col["resnet_distance_mean"][i]
        data.distance.append(math.nan if d is None else d)
        data.meaningful.append(col["stats_meaningful"][i])
        data.num_boxes.append(col["num_boxes"][i] or 0)
        data.num_segments.append(col["num_segments"][i] or 0)
        data.num_masks.append(col["num_masks"][i] or 0)
        rule = col["filter_rule"][i] or "(none)"
        data.filter_rules[rule] = data.filter_rules.get(rule, 0) + 1
    ok = pc.equal(t.column("status"), "ok")
    boxes = pc.filter(t.column("boxes"), ok).combine_chunks()
    if len(boxes) == 0:
        return
    counts = pc.fill_null(pc.list_value_length(boxes), 0).to_numpy()
    flat = boxes.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, 4)
    w = np.repeat(pc.filter(t.column("width"), ok).to_numpy(), counts)
    h = np.repeat(pc.filter(t.column("height"), ok).to_numpy(), counts)
    side = np.sqrt(np.clip(flat[:, 2] - flat[:, 0], 0, None) * np.clip(flat[:, 3] - flat[:, 1], 0, None))
    rel = np.clip(side / np.sqrt(w.astype(np.float64) * h), 0, 1)
    data.size_hist += np.histogram(rel, SIZE_BINS)[0]
    data.box_side_px.append(side[:: max(1, len(side) // 5000)])


# ---------------------------------------------------------------- statistics
def bootstrap_ci(values: np.ndarray, reps: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap CI of the mean; resamples in chunks to bound memory."""
    n = len(values)
    if n == 0:
        return None, None
    if n == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // n)
    means = []
    for start in range(0, reps, chunk):
        idx = rng.integers(0, n, size=(min(chunk, reps - start), n))
        means.append(values[idx].mean(axis=1))
    means = np.concatenate(means)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def describe_counts(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"n": 0}
    q = np.quantile(v, [0.05, 0.5, 0.95])
    return {"n": int(len(v)), "mean": float(v.mean()), "min": float(v.min()), "p5": float(q[0]),
            "median": float(q[1]), "p95": float(q[2]), "max": float(v.max())}


def summarise(data: DatasetData, reps: int, seed: int) -> dict:
    d = np.asarray(data.distance, dtype=np.float64)
    has = ~np.isnan(d)
    meaningful_flags = {m for m, h in zip(data.meaningful, has) if h}
    meaningful = bool(has.any()) and meaningful_flags == {True}
    lo, hi = bootstrap_ci(d[has], reps, seed)
    px = np.concatenate(data.box_side_px) if data.box_side_px else np.zeros(0)
    return {
        "images": data.images, "ok": len(data.keys), "failed": len(data.failures),
        "parts": data.parts, "root": str(data.root) if data.root else None,
        "resnet_distance": {
            "n": int(has.sum()), "missing": int((~has).sum()),
            "mean": float(d[has].mean()) if has.any() else None,
            "ci95": [lo, hi], "median": float(np.median(d[has])) if has.any() else None,
            "std_between_images": float(d[has].std(ddof=1)) if has.sum() > 1 else None,
            "meaningful": meaningful, "bootstrap": {"reps": reps, "seed": seed, "method": "percentile"},
            "params": data.stats_params,
        },
        "proposals_per_image": describe_counts(data.num_boxes),
        "segments_per_image": describe_counts(data.num_segments),
        "masks_per_image": describe_counts(data.num_masks),
        "filter_rules": dict(sorted(data.filter_rules.items())),
        "box_relative_side_hist": {"bins": SIZE_BINS.round(3).tolist(),
                                   "counts": data.size_hist.astype(int).tolist()},
        "box_side_px": describe_counts(px),
        "failures": data.failures[:1000],
        "failures_truncated": len(data.failures) > 1000,
    }


# ---------------------------------------------------------------- SVG charts
def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo or 1.0
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def svg_chart(series, xlabel: str, ylabel: str, title: str, xlim=None, ylim=None,
              vlines=(), note: str | None = None, w: int = 560, h: int = 300) -> str:
    """Line chart: series = [(label, xs, ys, colour, dashed)]; vlines = [(x, label)]."""
    ml, mr, mt, mb = 56, 16, 28, 44
    xs_all = np.concatenate([np.asarray(s[1], float) for s in series]) if series else np.zeros(1)
    ys_all = np.concatenate([np.asarray(s[2], float) for s in series]) if series else np.zeros(1)
    x0, x1 = xlim or (float(np.nanmin(xs_all)), float(np.nanmax(xs_all)))
    y0, y1 = ylim or (0.0, 1.1 * float(np.nanmax(ys_all)) or 1.0)
    x1 = x1 if x1 > x0 else x0 + 1e-3
    y1 = y1 if y1 > y0 else y0 + 1
    sx = lambda x: ml + (x - x0) / (x1 - x0) * (w - ml - mr)  # noqa: E731
    sy = lambda y: h - mb - (y - y0) / (y1 - y0) * (h - mt - mb)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" class="chart" role="img" aria-label="{html.escape(title)}">',
           f'<text x="8" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
           f'<rect x="{ml}" y="{mt}" width="{w - ml - mr}" height="{h - mt - mb}" fill="none" stroke="#999"/>']
    for t in _ticks(x0, x1):
        out.append(f'<line x1="{sx(t):.1f}" y1="{h - mb}" x2="{sx(t):.1f}" y2="{h - mb + 4}" stroke="#666"/>'
                   f'<text x="{sx(t):.1f}" y="{h - mb + 16}" font-size="11" text-anchor="middle">{t:g}</text>')
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{ml - 4}" y1="{sy(t):.1f}" x2="{w - mr}" y2="{sy(t):.1f}" stroke="#eee"/>'
                   f'<text x="{ml - 6}" y="{sy(t) + 4:.1f}" font-size="11" text-anchor="end">{t:g}</text>')
    out.append(f'<text x="{(ml + w - mr) / 2}" y="{h - 8}" font-size="12" text-anchor="middle">{html.escape(xlabel)}</text>'
               f'<text x="14" y="{(mt + h - mb) / 2}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 14 {(mt + h - mb) / 2})">{html.escape(ylabel)}</text>')
    for x, label in vlines:
        if x0 <= x <= x1:
            out.append(f'<line x1="{sx(x):.1f}" y1="{mt}" x2="{sx(x):.1f}" y2="{h - mb}" stroke="#555" '
                       f'stroke-dasharray="4 3"/><text x="{sx(x) + 3:.1f}" y="{mt + 4}" font-size="10" '
                       f'fill="#555" transform="rotate(90 {sx(x) + 3:.1f} {mt + 4})">{html.escape(label)}</text>')
    for i, (label, xs, ys, colour, dashed) in enumerate(series):
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
        dash = ' stroke-dasharray="6 3"' if dashed else ""
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        lx = w - mr - 110 * (len(series) - i)  # legend in the top margin, clear of the data
        out.append(f'<line x1="{lx}" y1="12" x2="{lx + 18}" y2="12" stroke="{colour}" '
                   f'stroke-width="2"{dash}/><text x="{lx + 22}" y="16" font-size="11">'
                   f'{html.escape(label[:14])}</text>')
    if note:
        out.append(f'<text x="{(ml + w - mr) / 2}" y="{(mt + h - mb) / 2}" font-size="18" fill="#c00" '
                   f'fill-opacity="0.55" text-anchor="middle" font-weight="bold">{html.escape(note)}</text>')
    out.append("</svg>")
    return "".join(out)


def ecdf(values: np.ndarray, max_points: int = 400):
    v = np.sort(values)
    y = np.arange(1, len(v) + 1) / len(v)
    if len(v) > max_points:
        idx = np.linspace(0, len(v) - 1, max_points).round().astype(int)
        v, y = v[idx], y[idx]
    return np.concatenate([[v[0]], v]), np.concatenate([[0.0], y])


def step_hist(counts: np.ndarray, bins: np.ndarray):
    """Histogram as a step line, normalised to the fraction per bin."""
    frac = counts / max(1, counts.sum())
    xs = np.repeat(bins, 2)[1:-1]
    return xs, np.repeat(frac, 2)


# ---------------------------------------------------------------- thumbnails
def _jpeg_uri(img) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def example_figure(root: Path | None, key: str, relpath: str, distance: float,
                   stats_params: dict | None, meaningful: bool, thumb: int = 180) -> str:
    """Thumbnail with the first crop pair outlined, plus the two views as the model saw them."""
    from PIL import Image, ImageDraw
    from preprocess.decode import load_rgb
    caption = f"{html.escape(key)}<br>d = {distance:.4f}" + ("" if meaningful else " (not meaningful)")
    if root is None or stats_params is None:
        return f'<figure class="ex missing">{caption}<br>no image root or stats parameters</figure>'
    path = root / relpath
    try:
        rgb = load_rgb(path)
    except Exception as e:  # report is best effort: say what is missing, keep going
        return (f'<figure class="ex missing">{caption}<br>cannot read {html.escape(str(path))}: '
                f'{html.escape(str(e))}</figure>')
    cfg = StatsConfig.from_params(stats_params)
    pair = crop_pairs(key, rgb.shape[1], rgb.shape[0], cfg)[0]
    img = Image.fromarray(rgb)
    views = [img.resize((thumb // 2, thumb // 2), Image.BILINEAR, box=tuple(map(int, b))) for b in pair]
    s = thumb / max(img.size)
    small = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
    draw = ImageDraw.Draw(small)
    for b, colour in zip(pair, ("#00e5ff", "#ffea00")):
        draw.rectangle([b[0] * s, b[1] * s, b[2] * s - 1, b[3] * s - 1], outline=colour, width=2)
    tiles = "".join(f'<img src="{_jpeg_uri(v)}" alt="view {i + 1}" class="view v{i + 1}">'
                    for i, v in enumerate(views))
    return (f'<figure class="ex"><img src="{_jpeg_uri(small)}" alt="{html.escape(key)}" '
            f'class="thumb"><div class="views">{tiles}</div><figcaption>{caption}</figcaption></figure>')


# ---------------------------------------------------------------- page
def _fmt(x, digits=4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1150px;color:#222}
h1{margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:4px 8px;
font-size:13px;text-align:left;vertical-align:top}th{background:#f3f3f3}
.warn{background:#fff0f0;border:2px solid #c00;color:#a00;padding:8px 12px;font-weight:bold}
.nm{color:#c00;font-weight:bold}.charts{display:flex;flex-wrap:wrap;gap:16px}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.ex{margin:0;width:180px;font-size:12px}
.ex .thumb{display:block;max-width:180px;max-height:180px}.views{display:flex;gap:4px;margin-top:3px}
.views img{width:82px;height:82px;border:3px solid}.views .v1{border-color:#00e5ff}.views .v2{border-color:#ffea00}
.missing{border:1px dashed #c00;padding:6px;color:#a00}.muted{color:#777;font-size:13px}"""


def render(name: str, datasets: list[DatasetData], summaries: dict, top: int) -> str:
    all_meaningful = all(summaries[d.name]["resnet_distance"]["meaningful"] for d in datasets)
    note = None if all_meaningful else "NOT MEANINGFUL"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Audit: "
             f"{html.escape(name)}</title><style>{CSS}</style></head><body>",
             f"<h1>Semantic-consistency audit: {html.escape(name)}</h1>",
             f"<p class='muted'>Datasets: {html.escape(', '.join(d.name for d in datasets))}. "
             f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by "
             f"preprocess.report.</p>"]
    if not all_meaningful:
        parts.append(f"<p class='warn'>{NOT_MEANINGFUL}, or distances missing: the ResNet "
                     "distances below come from a randomly initialised ResNet-50 (or were never "
                     "computed) and say nothing about the data. Run `make stats` with the "
                     "IMAGENET1K_V1 weights for real figures.</p>")

    # --- distance table
    rows = []
    for d in datasets:
        r = summaries[d.name]["resnet_distance"]
        flag = "" if r["meaningful"] else f" <span class='nm'>not meaningful</span>"
        ci = "n/a" if r["ci95"][0] is None else f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]"
        p = r["params"][0] if r["params"] else {}
        rows.append([f"<b>{html.escape(d.name)}</b>", _fmt(r["mean"]) + flag, ci, r["n"],
                     r["missing"], p.get("pairs", "n/a"), html.escape(str(p.get("weights", "n/a")))])
    for label, value in PAPER_TABLE1.items():
        rows.append([f"paper: {html.escape(label)}", f"{value:.4f}", "not reported", "", "", "", "MaskCo Table 1"])
    parts.append("<h2 id='distance'>ResNet distance per dataset</h2>"
                 "<p class='muted'>Per image: mean over P crop pairs of ||y1 - y2||² with y the "
                 "unit-normalised, globally pooled conv5 feature of torchvision's supervised "
                 "ResNet-50 (2 - 2 cos; 0 = same meaning, larger = less consistent). Dataset "
                 "value: mean over images, percentile bootstrap 95% CI. The paper's values "
                 "(MaskCo Table 1) are references computed on the full datasets.</p>"
                 + _table(["dataset", "mean distance", "95% CI", "n images", "no distance",
                           "pairs/image", "weights"], rows))
    for d in datasets:
        for p in summaries[d.name]["resnet_distance"]["params"][1:]:
            parts.append(f"<p class='warn'>{html.escape(d.name)}: parts were computed with "
                         f"different settings ({html.escape(json.dumps(p))}); run `make stats "
                         f"DATASET={html.escape(d.name)}` to make them agree.</p>")

    # --- ECDF
    series = []
    for i, d in enumerate(datasets):
        v = np.asarray(d.distance, float)
        v = v[~np.isnan(v)]
        if len(v):
            series.append((d.name, *ecdf(v), COLOURS[i % len(COLOURS)], False))
    vlines = [(PAPER_TABLE1["ImageNet"], "IN mean (paper)"), (PAPER_TABLE1["COCO"], "COCO mean (paper)")]
    if series:
        # Real distances are shown on a scale that includes the paper's means; random-weight
        # ones are tiny, so zoom to them rather than draw flat lines.
        xmax = max(0.3 if all_meaningful else 0.0, float(max(np.max(s[1]) for s in series)) * 1.05)
        chart = svg_chart(series, "per-image ResNet distance", "fraction of images ≤ x",
                          "ECDF of per-image distances", xlim=(0, xmax), ylim=(0, 1),
                          vlines=vlines, note=note)
    else:
        chart = "<p class='warn'>No distances computed yet: run `make stats`.</p>"
    parts.append("<h2 id='distribution'>Distribution of per-image distances</h2>"
                 "<p class='muted'>A curve further right = more images whose two crops disagree. "
                 "Dashed lines: the paper's dataset means.</p>" + chart)

    # --- examples
    parts.append(f"<h2 id='examples'>Most and least consistent images</h2><p class='muted'>"
                 f"Thumbnail with the first crop pair outlined (cyan = view 1, yellow = view 2) "
                 f"and the two views, regenerated from the recorded seed; d is the image's mean "
                 f"over all its pairs.</p>")
    for d in datasets:
        r = summaries[d.name]["resnet_distance"]
        v = np.asarray(d.distance, float)
        idx = np.flatnonzero(~np.isnan(v))
        if not len(idx):
            parts.append(f"<h3>{html.escape(d.name)}</h3><p class='warn'>no distances</p>")
            continue
        order = idx[np.argsort(v[idx], kind="stable")]
        k = min(top, max(1, len(order) // 2))  # small sets: no image in both galleries
        p = r["params"][0] if r["params"] else None
        nm = "" if r["meaningful"] else " <span class='nm'>(not meaningful)</span>"
        for title, chosen in (("least consistent (largest d)", order[::-1][:k]),
                              ("most consistent (smallest d)", order[:k])):
            figs = "".join(example_figure(d.root, d.keys[j], d.paths[j], v[j], p, r["meaningful"])
                           for j in chosen)
            parts.append(f"<h3>{html.escape(d.name)}: {title}{nm}</h3><div class='gallery'>{figs}</div>")

    # --- proposals
    rows = []
    for d in datasets:
        s = summaries[d.name]
        for label, k in (("proposals", "proposals_per_image"), ("FH segments", "segments_per_image"),
                         ("MCG-style masks", "masks_per_image"), ("box side in px (n = boxes)", "box_side_px")):
            c = s[k]
            rows.append([html.escape(d.name), label, c["n"]] + [_fmt(c.get(q), 1) for q in
                                                                ("mean", "min", "p5", "median", "p95", "max")])
    rule_names = sorted({r for d in datasets for r in summaries[d.name]["filter_rules"]})
    rule_rows = []
    for d in datasets:
        used, ok = summaries[d.name]["filter_rules"], max(1, summaries[d.name]["ok"])
        rule_rows.append([html.escape(d.name)] + [f"{used.get(r, 0)} ({100 * used.get(r, 0) / ok:.1f}%)"
                                                  for r in rule_names])
    hist_series, count_series = [], []
    for i, d in enumerate(datasets):
        colour = COLOURS[i % len(COLOURS)]
        hist_series.append((d.name, *step_hist(d.size_hist, SIZE_BINS), colour, False))
        nb = np.asarray(d.num_boxes)
        if len(nb):
            top_count = max(1, int(nb.max()))
            bins = (np.arange(top_count + 2) - 0.5 if top_count <= 60
                    else np.linspace(0, top_count + 1, 31))
            count_series.append((d.name, *step_hist(np.histogram(nb, bins)[0], bins), colour, False))
    charts = svg_chart(hist_series, "box side / image side, sqrt(area ratio)", "fraction of boxes",
                       "Proposal size distribution", xlim=(0, 1))
    if count_series:
        charts += svg_chart(count_series, "proposals per image", "fraction of images",
                            "Proposals per image")
    parts.append("<h2 id='proposals'>Proposals, segments and masks</h2>"
                 + _table(["dataset", "what", "n", "mean", "min", "p5", "median", "p95", "max"], rows)
                 + "<h3>Filter rule used (fallbacks when the SoCo filter leaves nothing)</h3>"
                 + _table(["dataset"] + rule_names, rule_rows)
                 + f"<div class='charts'>{charts}</div>")

    # --- failures
    rows = []
    for d in datasets:
        for f in d.failures[:MAX_FAILURES_SHOWN]:
            rows.append([html.escape(d.name), html.escape(f["key"]), html.escape(f["source_path"]),
                         html.escape(f["error"])])
    counts = ", ".join(f"{html.escape(d.name)}: {len(d.failures)} of {d.images}" for d in datasets)
    more = [d.name for d in datasets if len(d.failures) > MAX_FAILURES_SHOWN]
    parts.append(f"<h2 id='failures'>Failures</h2><p>Images that could not be processed "
                 f"({counts}). They are in the parts with status 'failed' and are left out of "
                 f"every figure above.</p>"
                 + (_table(["dataset", "key", "source path", "error"], rows) if rows else
                    "<p>None.</p>")
                 + (f"<p class='muted'>Only the first {MAX_FAILURES_SHOWN} shown for "
                    f"{html.escape(', '.join(more))}; summary.json lists up to 1000.</p>" if more else ""))
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(datasets: list[str], name: str, *, work=None, top: int = 6,
                 reps: int = 2000, seed: int = 0) -> Path:
    """Write WORK_DIR/report/<name>/index.html and summary.json; return the folder."""
    if not datasets:
        raise ValueError("no datasets given: pass --datasets \"coco imagenet\"")
    progress = Progress("report", len(datasets), unit="dataset", every_s=0)
    gathered, summaries = [], {}
    for ds in datasets:
        data = gather(ds, work)
        gathered.append(data)
        summaries[ds] = summarise(data, reps, seed)
        progress.update()
    out = report_dir(name, work)
    atomic_write_text(out / "index.html", render(name, gathered, summaries, top))
    summary = {"name": name, "paper_table1": PAPER_TABLE1,
               "meaningful": all(s["resnet_distance"]["meaningful"] for s in summaries.values()),
               "datasets": summaries}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    for ds in datasets:
        r = summaries[ds]["resnet_distance"]
        flag = "" if r["meaningful"] else "  NOT MEANINGFUL"
        print(f"[report] {ds}: {summaries[ds]['ok']} ok, {summaries[ds]['failed']} failed, "
              f"distance {_fmt(r['mean'])} 95% CI [{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}] "
              f"n={r['n']}{flag}", file=sys.stderr)
    print(f"[report] wrote {out / 'index.html'} and summary.json", file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m preprocess.report", description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", required=True, help='space-separated names, e.g. "coco imagenet"')
    ap.add_argument("--name", default=None, help="report name (default: datasets joined by '-')")
    ap.add_argument("--top", type=int, default=6, help="images shown per extreme")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    args = ap.parse_args(argv)
    names = args.datasets.split()
    try:
        build_report(names, args.name or "-".join(names), top=args.top, reps=args.bootstrap)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
