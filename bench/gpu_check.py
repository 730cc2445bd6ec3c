"""`make gpu-check`: everything a short GPU lease can prove about the GPU code paths, in one
command of at most about 8 minutes, each step a subprocess under its own time limit:

  1. venv     build the venv: requirements.txt (torch==2.14.1, the +cu130 build on PyPI) with
              the DALI wheel for this driver; then verify torch sees the GPU, bf16 works and
              DALI's mixed (nvJPEG) decoder runs
  2. demo     the demo pipeline on the built-in sample: sample, proposals, shards, verify
  3. train    one step of every method's small recipe (train/pretrain.py), loader on the GPU,
              bf16, channels_last: finite losses
  4. compare  one batch of every recipe from the GPU graph and the CPU graph fed the same
              plans: boxes, ids, masks equal, pixels within bench/gpu/compare.py's tolerance
  5. timing   loader img/s per recipe (GPU decode); ResNet-50 SoCo FPN at batch 64, 224 px
              (img/s, peak memory, data-wait share); make stats's forward at batch 256
  6. nccl     with 2+ GPUs: 2 ranks (NCCL, SyncBN) equal to 1 rank on the same global batch

Writes bench/results/gpu.json (atomically): machine, versions, every figure, and per step
status ok|failed|skipped|timeout, seconds and the error. On a machine without an NVIDIA GPU
it prints one line and exits 0 having done nothing. Standard library only up to the venv."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench.gpu import env as genv
from bench.gpu.steps import run_step, skipped

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "gpu.json"
FORMAT_VERSION = 1
BUDGET_S = 470          # the whole check, leaving margin in 8 minutes
# (step, its own limit in seconds); expected times on one H200 with the venv's wheels cached
# in pip's cache: venv 60-150 (a fresh download of torch + CUDA libraries + DALI is ~4 GB),
# demo 20, train 30, compare 35 (photo-like shards built here), timing 60, nccl 40
LIMITS = {"venv": 200, "demo": 60, "train": 110, "compare": 70, "timing": 110, "nccl": 70}


def write_results(path: Path, report: dict) -> None:
    from common.io import atomic_write_text
    atomic_write_text(path, json.dumps(report, indent=1, default=str) + "\n")


def say(line: str) -> None:
    print(f"[gpu-check] {line}", flush=True)


def summary_line(name: str, rec: dict) -> str:
    err = f": {rec['error'].splitlines()[0][:200]}" if rec.get("error") else ""
    return f"{name}: {rec['status']} in {rec['seconds']:.0f} s{err}"


def main(argv=None, machine: dict | None = None) -> int:
    """`machine`: nvidia-smi's answer as `bench.gpu.env.probe` gives it (None = ask it)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=str(REPO / ".venv"), help="venv to build or reuse")
    ap.add_argument("--python", default=None,
                    help="run the checks with this interpreter as it is (build no venv): e.g. a machine's "
                         "own python3 with torch + CUDA when no package index is reachable")
    ap.add_argument("--wheels", default=None, help="install the venv offline from this folder of wheels")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--work", default=None, help="scratch folder (default WORK_DIR/gpu-check)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps together")
    ap.add_argument("--only", default=None, help="comma-separated steps to run (others: skipped)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: run every step's code on the CPU with small sizes, as a smoke test of "
                         "this script on a machine without a GPU (needs --python; figures mean nothing)")
    a = ap.parse_args(argv)

    smoke = a.device == "cpu"
    if smoke:
        if not a.python or a.out == str(RESULTS):
            ap.error("--device cpu needs --python and an --out other than bench/results/gpu.json")
        machine = {"gpus": [{"index": 0, "name": "none (--device cpu smoke test)", "memory_mib": 0,
                             "compute_cap": None}], "driver": None, "cuda": None}
    machine = machine or genv.probe()
    if machine is None:
        print("gpu-check: no NVIDIA GPU on this machine (nvidia-smi missing or lists none): "
              "nothing checked, nothing written")
        return 0

    start = time.perf_counter()
    deadline = start + a.budget
    work = Path(a.work or Path(os.environ.get("WORK_DIR", REPO / "work")) / "gpu-check").resolve()
    work.mkdir(parents=True, exist_ok=True)
    only = set(a.only.split(",")) if a.only else None
    log = open(work / "gpu-check.log", "w")
    report = {"format": FORMAT_VERSION, "what": "make gpu-check (bench/gpu_check.py)",
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {**machine, "host_python": platform.python_version(), "cpus": os.cpu_count()},
              "budget_s": a.budget, "limits_s": LIMITS, "steps": {}}
    say(f"{len(machine['gpus'])} x {machine['gpus'][0]['name']}, driver {machine['driver']}, CUDA "
        f"{machine['cuda']}; budget {a.budget:.0f} s; log {work / 'gpu-check.log'}")

    def step(name: str, cmd: list[str]) -> dict:
        left = deadline - time.perf_counter()
        if only is not None and name not in only and name != "venv":  # the venv is always needed
            rec = skipped("not in --only")
        elif left < 5:
            rec = skipped(f"the {a.budget:.0f} s budget was spent before this step")
        else:
            limit = min(LIMITS[name], left)
            say(f"{name}: running (limit {limit:.0f} s)")
            rec = run_step(name, cmd + ["--limit", str(limit)] if name != "venv" else cmd, limit,
                           cwd=REPO, log=log, env={**os.environ, "PYTHONPATH": str(REPO)})
        report["steps"][name] = rec
        say(summary_line(name, rec))
        write_results(Path(a.out), report)  # a later hang or kill still leaves what was learnt
        return rec

    venv_cmd = [sys.executable, "-m", "bench.gpu.env", "--venv", a.venv]
    venv_cmd += ["--driver-cuda", machine["cuda"]] if machine.get("cuda") else []
    venv_cmd += ["--python", a.python] if a.python else []
    venv_cmd += ["--wheels", a.wheels] if a.wheels else []
    v = step("venv", venv_cmd)
    found = v.get("result") or {}
    report["versions"] = {k: found.get(k) for k in ("python", "torch", "torch_cuda", "cudnn", "nccl", "dali")}
    report["devices"] = found.get("devices")
    pins = found.get("requirements") or {}
    report["pinned"] = {k: pins.get(k) for k in ("torch", "dali")}
    report["versions_match_pins"] = {
        k: bool(pins.get(k) and found.get(k) and found[k].split("+")[0] == pins[k].split("==")[-1])
        for k in ("torch", "dali")}
    if not found.get("cuda_available") and not smoke:
        why = v.get("error") or "torch sees no CUDA device"
        for name in LIMITS:
            if name != "venv":
                report["steps"][name] = skipped("no usable venv: " + why.splitlines()[0][:300])
        report["seconds"] = round(time.perf_counter() - start, 1)
        report["failed"] = ["venv"]
        write_results(Path(a.out), report)
        log.close()
        say(f"stopped: the venv is not usable ({why.splitlines()[0][:300]}); wrote {a.out}")
        return 1
    py = found.get("executable") or found["interpreter"]
    work_cmd = lambda check, *extra: [py, "-m", "bench.gpu.work", check, "--work", str(work),  # noqa: E731
                                      "--device", a.device, *extra]

    d = step("demo", work_cmd("demo"))
    shards = ["--shards", d["result"]["shards"]] if d["status"] == "ok" else []
    step("train", work_cmd("train", *shards))
    if found.get("dali"):
        step("compare", work_cmd("compare", *shards))
    else:
        report["steps"]["compare"] = skipped("nvidia-dali is not installed in the venv")
    step("timing", work_cmd("timing"))
    if len(machine["gpus"]) >= 2 or smoke:
        step("nccl", work_cmd("nccl", *shards))
    else:
        report["steps"]["nccl"] = skipped(f"{len(machine['gpus'])} GPU: the 2-rank check needs 2 or more")
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["failed"] = [n for n, r in report["steps"].items() if r["status"] in ("failed", "timeout")]
    write_results(Path(a.out), report)
    log.close()
    say(f"done in {report['seconds']:.0f} s: " + ", ".join(f"{n} {r['status']}" for n, r in report["steps"].items())
        + f"; wrote {a.out}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
