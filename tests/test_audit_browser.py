"""The audit page in a real browser: headless Chromium (Debian's `chromium`) driven over the
DevTools protocol on a pipe (--remote-debugging-pipe: no websocket library needed). Checks
the DOM (sections, every image loaded and decoded, nothing fetched from outside the folder)
and the pixels: a screenshot of the ground-truth panel of a built-in sample image holds the
overlay colour inside the instance's known box. Skipped, saying so, without chromium."""
from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from common.paths import proposals_dir, shards_dir
from preprocess.audit import distance, gallery, report
from preprocess.audit import stats as make_stats
from shards.reader import ShardDataset

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get "
                                "install chromium): the browser check of the audit page is skipped")


class DevTools:
    """Minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3 in, fd 4
    out, messages are JSON terminated by NUL)."""

    def __init__(self, profile):
        cmd_r, self.cmd_w = os.pipe()
        self.out_r, out_w = os.pipe()
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "--no-first-run",
                "--disable-extensions", "about:blank"]
        shell = " ".join(f"'{a}'" for a in args) + f" 3<&{cmd_r} 4>&{out_w}"
        self.proc = subprocess.Popen(["bash", "-c", "exec " + shell], pass_fds=(cmd_r, out_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self.buf, self.next_id, self.events, self.session = b"", 0, [], None

    def _read(self, deadline) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, "chromium did not answer in time"
            ready, _, _ = select.select([self.out_r], [], [], left)
            if ready:
                chunk = os.read(self.out_r, 1 << 20)
                assert chunk, "chromium closed the pipe"
                self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method, timeout=60, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, name, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == name:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def evaluate(self, expression):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r
        return r["result"]["value"]

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.cmd_w)
        os.close(self.out_r)


@pytest.fixture(scope="module")
def page(sample_parts, sample_shards, tmp_path_factory):
    src_work, name = sample_parts
    work = tmp_path_factory.mktemp("browser_work")
    shutil.copytree(proposals_dir(name, src_work), proposals_dir("sample", work))
    shutil.copytree(sample_shards, shards_dir("sample", work))
    make_stats.run_stats("sample", distance.StatsConfig(seed=1, pairs=1, size=64), random_weights=True,
                         use_ray=False, work=work)
    out = report.build_report(["sample"], "browser", work=work, reps=50, top=2,
                              gallery_sample=3, gallery_worst=1)
    # Copied elsewhere, as a user would: the page must not depend on where it was written.
    copy = tmp_path_factory.mktemp("copied") / "report"
    shutil.copytree(out, copy)
    tools = DevTools(tmp_path_factory.mktemp("chromium_profile"))
    try:
        target = tools.send("Target.createTarget", url="about:blank")["targetId"]
        tools.session = tools.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        tools.send("Page.enable")
        tools.send("Emulation.setDeviceMetricsOverride", width=1200, height=900, deviceScaleFactor=1, mobile=False)
        tools.send("Page.navigate", url=(copy / "index.html").as_uri())
        tools.wait_event("Page.loadEventFired")
        yield tools, copy, ShardDataset(shards_dir("sample", work))
    finally:
        tools.close()


def test_the_page_loads_with_every_section_and_every_image_decoded(page):
    tools, out, _ = page
    dom = tools.evaluate("""(() => ({
        ids: [...document.querySelectorAll('[id]')].map(e => e.id),
        images: [...document.images].map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0})),
        resources: performance.getEntriesByType('resource').map(r => r.name),
        banner: document.querySelector('.warn') ? document.querySelector('.warn').textContent : '',
        svgs: document.querySelectorAll('svg polyline').length,
        panels: [...new Set([...document.querySelectorAll('img[data-panel]')].map(i => i.dataset.panel))],
    }))()""")
    assert dom["ids"] == ["distance", "distribution", "examples", "gallery", "proposals", "failures"]
    assert len(dom["images"]) > 10
    broken = [i["src"] for i in dom["images"] if not i["ok"]]
    assert not broken, f"images the browser could not show: {broken[:5]}"
    assert all(i["src"].startswith("img/") for i in dom["images"])
    assert all(r.startswith(out.as_uri()) for r in dom["resources"])  # only the copied folder
    assert "NOT MEANINGFUL" in dom["banner"] and dom["svgs"] >= 3
    assert sorted(dom["panels"]) == ["boxes", "gt", "masks", "segments"]
    shot = base64.b64decode(tools.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])
    (out / "screenshot.png").write_bytes(shot)  # kept beside the page for a look when it fails
    assert Image.open(io.BytesIO(shot)).size[0] == 1200


def test_the_screenshot_shows_the_overlay_colour_inside_the_known_box(page):
    tools, out, shards = page
    key = tools.evaluate("document.querySelector('img[data-panel=gt]').dataset.key")
    rect = tools.evaluate(f"""(() => {{ const i = document.querySelector('img[data-key="{key}"][data-panel=gt]');
        i.scrollIntoView(); const r = i.getBoundingClientRect();
        return {{x: r.left + window.scrollX, y: r.top + window.scrollY, w: r.width, h: r.height,
                 nw: i.naturalWidth, nh: i.naturalHeight}}; }})()""")
    assert (rect["w"], rect["h"]) == (rect["nw"], rect["nh"])  # shown at 1:1
    data = tools.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                      clip={"x": rect["x"], "y": rect["y"], "width": rect["w"], "height": rect["h"], "scale": 1})
    shot = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["data"]))).convert("RGB")).astype(float)
    s = shards.get(key)
    h, w = s.image.shape[:2]
    th, tw = shot.shape[:2]
    x, y, bw, bh = s.gt["annotations"][0]["bbox"]
    # Pixel centres of the thumbnail, mapped back to the stored image (nearest).
    ys = np.minimum(((np.arange(th) + 0.5) * h / th).astype(int), h - 1)
    xs = np.minimum(((np.arange(tw) + 0.5) * w / tw).astype(int), w - 1)
    ids = s.gt_labels[ys[:, None], xs[None, :]]
    inside_box = ((xs[None, :] >= x + 2) & (xs[None, :] < x + bw - 2)) & ((ys[:, None] >= y + 2) & (ys[:, None] < y + bh - 2))
    core = ids == 1
    for dy in (-2, 0, 2):
        for dx in (-2, 0, 2):
            core &= np.roll(np.roll(ids == 1, dy, 0), dx, 1)
    region = core & inside_box
    assert region.sum() > 20
    base = np.asarray(Image.fromarray(s.image).resize((tw, th), Image.BILINEAR)).astype(float)
    tinted = 0.5 * base[region] + 0.5 * np.array(gallery.PALETTE[0], float)
    assert np.abs(shot[region] - tinted).mean() < 14
    assert np.abs(shot[region] - base[region]).mean() > 28  # the overlay is really there
