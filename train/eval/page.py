"""The evaluation page: one self-contained HTML file (no scripts, no external files) with
the pretrained-vs-random tables, a bar chart of every accuracy with its 95% CI, and the
online-eval curve of the run (metrics.jsonl), all as inline SVG. Every number cell
carries `data-cell="scope/level/probe/column"` so a test can read it back."""
from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, select_autoescape

from common.io import atomic_write_text
from train.eval.probes import find

COLOURS = {"pretrained": "#1f77b4", "random": "#aaaaaa", "target": "#ff7f0e"}
CYCLE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>eval {{ s.name }}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:8px 0 20px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td.l{text-align:left}
.pos{color:#0a7a0a}.neg{color:#b00}.ci{color:#777;font-size:12px}
</style></head><body>
<h1>Evaluation of {{ s.name }}</h1>
<p>Method <b>{{ s.method }}</b>; weights {{ s.weights }}; random-init baseline: the same
architecture built with seed {{ s.random_seed }}. Train: {{ s.data.train }} ({{ s.train.images }}
images, {{ s.train.objects }} objects); test: {{ s.data.test }} ({{ s.test.images }} images,
{{ s.test.objects }} objects); {{ s.data.split }}. Letterboxed to {{ s.settings.image_size }} px;
kNN k={{ s.settings.k }}, T={{ s.settings.temperature }}; linear: logistic regression, L-BFGS,
L2 fixed. Brackets: 95% bootstrap CI (paired for the difference). Dropped:
train {{ s.train.dropped }}, test {{ s.test.dropped }}.</p>
{% for scope in scopes %}
<h2>{{ scope.title }}</h2>
<table id="table-{{ scope.name }}">
<tr><th>level</th><th>probe</th>{% for n in networks %}<th>{{ n }}</th>{% endfor %}{% for n in compared %}<th>{{ n }} &minus; random</th>{% endfor %}</tr>
{% for r in scope.rows %}<tr><td class="l">{{ r.level_label }}</td><td class="l">{{ r.probe }}</td>
{% for n in networks %}<td><span data-cell="{{ r.key }}/{{ n }}">{{ '%.3f'|format(r.acc[n].acc) }}</span>
<span class="ci">[{{ '%.3f'|format(r.acc[n].lo) }}, {{ '%.3f'|format(r.acc[n].hi) }}]</span></td>{% endfor %}
{% for n in compared %}{% set d = r.diff[n] %}<td class="{{ 'pos' if d.lo > 0 else ('neg' if d.hi < 0 else '') }}"><span data-cell="{{ r.key }}/{{ n }}-random">{{ '%+.3f'|format(d.diff) }}</span>
<span class="ci">[{{ '%+.3f'|format(d.lo) }}, {{ '%+.3f'|format(d.hi) }}]</span></td>{% endfor %}</tr>
{% endfor %}</table>
{{ scope.svg|safe }}
{% endfor %}
<h2>Online evaluation while pretraining</h2>
{% if curve %}{{ curve|safe }}
<p>Object-crop kNN logged by the trainer (eval.every); cost per evaluation: {{ online_cost }}.</p>
{% else %}<p>No online-eval records in the run's metrics.jsonl (set eval.every &gt; 0 to log them).</p>{% endif %}
<p class="ci">Seconds: {{ s.seconds }}</p>
</body></html>
"""


def _bars(rows: list[dict], networks: list[str], title: str) -> str:
    """Grouped bars (one group per level/probe) with CI whiskers, y from 0 to 1."""
    w, h, left, bottom, top = 40 + 70 * max(1, len(rows)), 240, 40, 50, 20
    bw = 56 / max(1, len(networks))
    y = lambda v: top + (h - top - bottom) * (1 - max(0.0, min(1.0, v)))  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + left}" height="{h}" role="img">',
             f'<title>{title}</title>']
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{w + left}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{y(t) + 4:.1f}" font-size="10" text-anchor="end">{t:.2f}</text>')
    for i, r in enumerate(rows):
        x0 = left + 10 + 70 * i
        for j, n in enumerate(networks):
            a = r["acc"][n]
            x = x0 + j * bw
            parts.append(f'<rect x="{x:.1f}" y="{y(a["acc"]):.1f}" width="{bw - 2:.1f}" '
                         f'height="{y(0) - y(a["acc"]):.1f}" fill="{COLOURS.get(n, "#2ca02c")}"><title>{n} '
                         f'{a["acc"]:.3f}</title></rect>')
            cx = x + (bw - 2) / 2
            parts.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(a["lo"]):.1f}" y2="{y(a["hi"]):.1f}" stroke="#000"/>')
        parts.append(f'<text x="{x0 + 28}" y="{h - bottom + 14}" font-size="10" text-anchor="middle">{r["level"]}</text>'
                     f'<text x="{x0 + 28}" y="{h - bottom + 26}" font-size="10" text-anchor="middle">{r["probe"]}</text>')
    for j, n in enumerate(networks):
        parts.append(f'<rect x="{left + 10 + 110 * j}" y="{h - 14}" width="10" height="10" fill="{COLOURS.get(n, "#2ca02c")}"/>'
                     f'<text x="{left + 24 + 110 * j}" y="{h - 5}" font-size="11">{n}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _curve(records: list[dict]) -> str:
    """Lines of every numeric accuracy field of the online-eval records against step."""
    keys = sorted({k for r in records for k, v in r.items()
                   if k.startswith(("knn", "acc")) and isinstance(v, (int, float))})
    if not records or not keys:
        return ""
    w, h, left, bottom, top = 640, 260, 50, 40, 20
    steps = [r["step"] for r in records]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    x = lambda s: left + (w - left - 20) * (s - s0) / (s1 - s0)  # noqa: E731
    y = lambda v: top + (h - top - bottom) * (1 - max(0.0, min(1.0, v)))  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img"><title>online eval</title>']
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{w - 20}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{y(t) + 4:.1f}" font-size="10" text-anchor="end">{t:.2f}</text>')
    parts.append(f'<text x="{left}" y="{h - 20}" font-size="10">step {s0}</text>'
                 f'<text x="{w - 20}" y="{h - 20}" font-size="10" text-anchor="end">step {s1}</text>')
    for i, k in enumerate(keys):
        pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
        colour = CYCLE[i % len(CYCLE)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                     + " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts) + '"/>')
        parts.extend(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"><title>{k} step {s}: {v:.3f}</title></circle>'
                     for s, v in pts)
        parts.append(f'<text x="{left + 10 + 150 * i}" y="{h - 5}" font-size="11" fill="{colour}">{k}</text>')
    parts.append("</svg>")
    return "".join(parts)


def page_rows(summary: dict, scope: str) -> tuple[list[dict], list[str], list[str]]:
    """Rows of one scope's table: level, probe, accuracy per network, difference per network."""
    networks = list(dict.fromkeys(r["network"] for r in summary["results"]))
    compared = [n for n in networks if n != "random"]
    rows = []
    seen = []
    for r in summary["results"]:
        key = (r["level"], r["probe"])
        if r["scope"] == scope and key not in seen:
            seen.append(key)
    for level, probe in seen:
        m = dict(scope=scope, level=level, probe=probe)
        alias = {"res4": "res4 (C4)", "res5": "res5 (C5)"}.get(level, level)
        rows.append(dict(level=level, level_label=alias, probe=probe, key=f"{scope}/{level}/{probe}",
                         acc={n: find(summary["results"], network=n, **m) for n in networks},
                         diff={n: find(summary["differences"], network=n, **m) for n in compared}))
    return rows, networks, compared


def render(summary: dict) -> str:
    env = Environment(autoescape=select_autoescape(default=True))
    scopes = []
    networks, compared = [], []
    for scope, title in (("crop", "Object crops: each ground-truth box cut out and resized, through the network, "
                                  "label = category"),
                         ("object", "Object level: RoIAlign over ground-truth boxes, label = category"),
                         ("image", "Image level: pooled feature maps, label = image class")):
        rows, networks_, compared_ = page_rows(summary, scope)
        if rows:
            networks, compared = networks_, compared_
            scopes.append(dict(name=scope, title=title, rows=rows, svg=_bars(rows, networks, title)))
    online = summary.get("online") or []
    costs = [r["seconds"] for r in online if isinstance(r.get("seconds"), (int, float))]
    cost = f"{sum(costs) / len(costs):.2f} s on average over {len(costs)}" if costs else "not recorded"
    return env.from_string(TEMPLATE).render(s=summary, scopes=scopes, networks=networks, compared=compared,
                                            curve=_curve(online), online_cost=cost)


def write_page(summary: dict, path) -> Path:
    path = Path(path)
    atomic_write_text(path, render(summary))
    return path
