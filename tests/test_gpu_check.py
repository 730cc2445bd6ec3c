"""`make gpu-check` on a machine without a GPU: the GPU-vs-CPU graph harness runs here
CPU-vs-CPU through the GPU graph's plan path (DALI decodes the JPEG bytes, windows in
stored pixels), and must find equal batches equal and perturbed ones different, naming
the recipe and key; the check itself says it has no GPU in one line and does nothing."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.gpu.compare import BIG_DIFF, MEAN_ABS_TOL, compare_batches, compare_graphs, first_batch

from train.loader import dali_available

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed: the graphs need it")

# The batch contract (docs/interfaces.md, "Loader"): what a plan decides, per recipe.
PLAN_KEYS = {
    "soco": {"boxes1_2", "ids1_2", "valid1_2", "boxes2", "ids2", "valid2", "boxes1_3", "ids1_3",
             "valid1_3", "boxes3", "ids3", "valid3", "views", "index"},
    "detcon": {"mask1", "mask2", "views", "index"},
    "maskco": {"query_box", "key_boxes", "views", "index"},
    "mocov2": {"views", "index"},
}
PLAN_KEYS["soco_star"] = PLAN_KEYS["soco"] | {"boxes4", "ids4", "valid4"}
PLAN_KEYS["soco_c4"] = PLAN_KEYS["soco"] - {"boxes1_3", "ids1_3", "valid1_3", "boxes3", "ids3", "valid3"}
VIEWS = {"soco": {"view1", "view2", "view3"}, "soco_star": {"view1", "view2", "view3", "view4"},
         "soco_c4": {"view1", "view2"},
         "detcon": {"view1", "view2"}, "maskco": {"query", "key"}, "mocov2": {"query", "key"}}
BATCH = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def soco_batch(sample_shards):
    return first_batch("soco", sample_shards, BATCH, 0, None, "dali")


@needs_dali
@pytest.mark.parametrize("recipe", sorted(VIEWS))
def test_the_cpu_graph_fed_the_gpu_graphs_plans_twice_agrees_exactly_on_every_key(recipe, sample_shards):
    report = compare_graphs(recipe, sample_shards, plans_seed=0, device_a=None, device_b=None,
                            batch_size=BATCH, decode="dali")
    assert report["ok"], report["problems"]
    assert set(report["exact"]) == PLAN_KEYS[recipe]
    assert set(report["pixels"]) == VIEWS[recipe]
    assert all(s["max_abs"] == 0.0 for s in report["pixels"].values()), report["pixels"]
    assert report["devices"] == ["cpu", "cpu"] and report["decode"] == "dali"


@needs_dali
def test_a_different_plan_through_the_graph_is_caught_on_the_boxes_and_windows(sample_shards, soco_batch):
    other = first_batch("soco", sample_shards, BATCH, 1, None, "dali")  # plans drawn from seed 1
    report = compare_batches("soco", soco_batch, other, ("seed0", "seed1"))
    assert not report["ok"]
    named = " ".join(report["problems"])
    assert "soco: views differs (seed0 vs seed1; must be equal)" in named
    assert "soco: boxes2 differs" in named


@needs_dali
def test_one_moved_crop_window_is_named_with_its_recipe_key_and_sample(soco_batch):
    moved = copy.deepcopy(soco_batch)
    moved["views"][2, 1, 0] += 1.0  # sample 2, view2's x0 one pixel to the right
    report = compare_batches("soco", soco_batch, moved, ("gpu", "cpu"))
    assert report["problems"] == [
        f"soco: views differs (gpu vs cpu; must be equal): 1 of {moved['views'].numel()} values differ, "
        f"first sample 2 (shard index {int(soco_batch['index'][2])}) at [2, 1, 0]: "
        f"{soco_batch['views'][2, 1, 0].item()} vs {moved['views'][2, 1, 0].item()}"]


@needs_dali
def test_one_changed_mask_label_is_caught_exactly(sample_shards):
    batch = first_batch("detcon", sample_shards, BATCH, 0, None, "dali")
    changed = copy.deepcopy(batch)
    changed["mask2"][1, 5, 7] += 1
    report = compare_batches("detcon", batch, changed)
    assert len(report["problems"]) == 1
    assert report["problems"][0].startswith("detcon: mask2 differs (a vs b; must be equal): 1 of ")
    assert "mask2" not in report["exact"] and "mask1" in report["exact"]


def add_levels(view: torch.Tensor, delta) -> torch.Tensor:
    """`view` (one normalised [3,H,W] view) with `delta` added on the 0-255 scale."""
    from train.loader.collate import STD
    return view + torch.as_tensor(delta, dtype=view.dtype) / 255.0 / torch.tensor(STD).view(3, 1, 1)


@needs_dali
def test_one_samples_view_off_by_more_than_the_tolerance_is_caught_naming_the_sample(soco_batch):
    off = copy.deepcopy(soco_batch)
    off["view3"][3] = add_levels(off["view3"][3], 2 * MEAN_ABS_TOL)  # as a colour op skipped
    report = compare_batches("soco", soco_batch, off, ("gpu", "cpu"))
    assert len(report["problems"]) == 1, report["problems"]
    assert report["problems"][0].startswith(
        "soco: view3 pixels differ beyond tolerance (gpu vs cpu, 0-255 scale), worst sample 3 ")
    stats = report["pixels"]["view3"]
    assert stats["worst_sample_mean_abs"] == pytest.approx(2 * MEAN_ABS_TOL, rel=1e-4)
    # averaged over the batch of 4 it would have passed: the bound is per sample
    assert stats["mean_abs"] < MEAN_ABS_TOL


@needs_dali
def test_a_patch_of_badly_wrong_pixels_is_caught_but_decoder_sized_noise_is_not(soco_batch):
    noisy = copy.deepcopy(soco_batch)
    gen = torch.Generator().manual_seed(0)
    for i in range(BATCH):  # uniform noise of +-1 level on every value
        noisy["view1"][i] = add_levels(noisy["view1"][i], torch.rand((3, 224, 224), generator=gen) * 2 - 1)
    assert compare_batches("soco", soco_batch, noisy)["ok"]
    patch = copy.deepcopy(soco_batch)
    delta = torch.zeros(3, 224, 224)
    delta[:, :40, :40] = 60.0  # 40x40 px (3% of the view) of sample 0, 60 levels off
    patch["view2"][0] = add_levels(patch["view2"][0], delta)
    report = compare_batches("soco", soco_batch, patch)
    assert len(report["problems"]) == 1, report["problems"]
    assert report["problems"][0].startswith(
        f"soco: view2 pixels differ beyond tolerance (a vs b, 0-255 scale), worst sample 0 "
        f"(shard index {int(soco_batch['index'][0])}): ")
    stats = report["pixels"]["view2"]
    assert stats["worst_sample_big_share"] == pytest.approx(40 * 40 / 224 ** 2, rel=1e-3)
    assert stats["max_abs"] == pytest.approx(60, abs=1e-3) and BIG_DIFF < 60


# ------------------------------------------------------------------ the command itself
REPO = Path(__file__).resolve().parents[1]


def no_gpu_here() -> bool:
    from bench.gpu.env import probe
    return probe() is None


@pytest.mark.skipif(not no_gpu_here(), reason="this machine has an NVIDIA GPU: the no-GPU path does not apply")
def test_make_gpu_check_without_a_gpu_says_so_in_one_line_and_does_nothing(tmp_path):
    out, venv, work = tmp_path / "gpu.json", tmp_path / "venv", tmp_path / "work"
    p = subprocess.run(["make", "--no-print-directory", "gpu-check", f"GPU_CHECK_ARGS=--out {out} --venv {venv} --work {work}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["gpu-check: no NVIDIA GPU on this machine (nvidia-smi missing or "
                                     "lists none): nothing checked, nothing written"]
    assert not out.exists() and not venv.exists() and not work.exists()


ONE_GPU = {"gpus": [{"index": 0, "name": "stand-in for the probe", "memory_mib": 1.0, "compute_cap": "9.0"}],
           "driver": "580.0", "cuda": "13.0"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here: the no-CUDA venv path does not apply")
def test_an_interpreter_whose_torch_sees_no_gpu_stops_the_check_and_says_why_in_gpu_json(tmp_path):
    """The orchestrator as on a GPU machine (only nvidia-smi's answer is given), with this
    CPU venv as --python: the venv step verifies it for real, finds no CUDA device, and
    every later step is recorded as skipped with that reason."""
    from bench.gpu_check import FORMAT_VERSION, main
    out = tmp_path / "gpu.json"
    rc = main(["--python", sys.executable, "--out", str(out), "--work", str(tmp_path / "w")], machine=ONE_GPU)
    assert rc == 1
    report = json.loads(out.read_text())
    assert report["format"] == FORMAT_VERSION and report["machine"]["driver"] == "580.0"
    venv = report["steps"]["venv"]
    assert venv["status"] == "failed" and "sees no CUDA device" in venv["error"]
    assert report["versions"]["torch"] == torch.__version__
    assert report["pinned"]["torch"] == "torch==2.14.1"
    assert report["versions_match_pins"]["torch"] == torch.__version__.startswith("2.14.1")
    later = {n: r for n, r in report["steps"].items() if n != "venv"}
    assert set(later) == {"demo", "train", "compare", "timing", "nccl"}
    assert all(r["status"] == "skipped" and r["error"].startswith("no usable venv: ") for r in later.values())
    assert report["failed"] == ["venv"]


def test_a_step_that_hangs_is_stopped_at_its_limit_with_its_whole_process_group(tmp_path):
    from bench.gpu.steps import run_step
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "
              f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(60)")
    t0 = time.perf_counter()
    rec = run_step("hang", [sys.executable, "-c", script, "--"], limit_s=3)
    assert time.perf_counter() - t0 < 20
    assert rec["status"] == "timeout" and rec["result"] is None
    assert rec["error"].startswith("stopped after its 3 s limit; output tail:\nstarted")
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if not running(grandchild):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child {grandchild} outlived the timeout")


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_step_reports_its_result_its_own_skip_or_its_failure_with_the_output_tail(tmp_path):
    from bench.gpu.steps import run_step
    write = "import json, sys; json.dump({}, open(sys.argv[sys.argv.index('--result') + 1], 'w'))"
    ok = run_step("ok", [sys.executable, "-c", write.format('{"images_per_s": 12.5}')], 30)
    assert ok["status"] == "ok" and ok["result"] == {"images_per_s": 12.5} and ok["error"] is None
    skip = run_step("skip", [sys.executable, "-c", write.format('{"status": "skipped", "error": "1 GPU"}')], 30)
    assert skip["status"] == "skipped" and skip["error"] == "1 GPU"
    bad = run_step("bad", [sys.executable, "-c", "import sys; print('boom: the reason'); sys.exit(3)"], 30)
    assert bad["status"] == "failed" and bad["error"] == "exit code 3; output tail:\nboom: the reason"


@pytest.mark.parametrize("driver_cuda, want", [
    ("13.0", "nvidia-dali-cuda120==2.4.0"), ("12.2", "nvidia-dali-cuda120==2.4.0"),
    ("11.8", "nvidia-dali-cuda110==2.4.0"), ("10.2", None), (None, None)])
def test_the_dali_wheel_follows_the_cuda_version_the_driver_supports(driver_cuda, want):
    from bench.gpu.env import choose_dali
    assert choose_dali(driver_cuda, "nvidia-dali-cuda120==2.4.0")[0] == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine: the offline-build path is exercised there for real")
def test_a_venv_that_cannot_be_installed_offline_stops_the_check_naming_the_missing_wheel(tmp_path):
    """As on a GPU machine without a package index: --wheels points at an empty folder, so
    pip (run for real, offline) finds no torch; the check stops and says how to go on."""
    from bench.gpu_check import main
    (tmp_path / "wheels").mkdir()
    out = tmp_path / "gpu.json"
    rc = main(["--venv", str(tmp_path / "venv"), "--wheels", str(tmp_path / "wheels"), "--out", str(out),
               "--work", str(tmp_path / "w")], machine=ONE_GPU)
    assert rc == 1
    venv = json.loads(out.read_text())["steps"]["venv"]
    assert venv["status"] == "failed"
    assert venv["error"].startswith("the venv could not be built: install requirements.txt failed")
    assert "torch==2.14.1" in venv["error"].split(" -- ")[0]  # pip's own words about the missing wheel
    assert venv["error"].endswith(f"-- {tmp_path / 'wheels'} lacks wheels it needs: fill it with `pip download "
                                  "-r requirements.txt -d DIR` for this machine's Python and platform, or run "
                                  "the checks with an interpreter that has torch with CUDA: --python /path/to/python")
    assert venv["result"]["dali_choice"] == "nvidia-dali-cuda120==2.4.0"
