"""The machine (nvidia-smi) and the venv for `make gpu-check`. Standard library only.

`probe()` reads the GPUs, the driver and the CUDA version the driver supports, or returns
None where there is no usable NVIDIA GPU. `python -m bench.gpu.env --venv DIR --result F`
builds the venv from requirements.txt with the DALI wheel chosen for that driver
(`choose_dali`), then has the venv's Python verify torch + CUDA + DALI
(`bench.gpu.work env`) and writes what it found to F."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements.txt"
TORCH_CUDA_MAJOR = 13      # torch==2.14.1 on PyPI is the +cu130 build: needs a CUDA 13 driver
DALI_PACKAGES = {12: "nvidia-dali-cuda120", 11: "nvidia-dali-cuda110"}


def probe(smi: str = "nvidia-smi") -> dict | None:
    """{gpus: [{index, name, memory_mib, compute_cap}], driver, cuda} or None (no
    nvidia-smi, or it fails, or lists no GPU)."""
    path = shutil.which(smi)
    if path is None:
        return None
    try:
        rows = subprocess.run([path, "--query-gpu=index,name,memory.total,driver_version,compute_cap",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True,
                              timeout=30)
        head = subprocess.run([path], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rows.returncode != 0:
        return None
    gpus, driver = [], None
    for line in rows.stdout.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 5:
            continue
        gpus.append({"index": int(cells[0]), "name": cells[1], "memory_mib": float(cells[2]),
                     "compute_cap": cells[4]})
        driver = cells[3]
    if not gpus:
        return None
    m = re.search(r"CUDA Version:\s*([0-9.]+)", head.stdout)
    return {"gpus": gpus, "driver": driver, "cuda": m.group(1) if m else None}


def pinned(name: str, requirements: Path = REQUIREMENTS) -> str | None:
    """The pinned `name==version` line of requirements.txt (name matched by prefix)."""
    for line in requirements.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.lower().startswith(name.lower()):
            return line
    return None


def choose_dali(driver_cuda: str | None, pin: str) -> tuple[str | None, str]:
    """(requirement, why) for the DALI wheel: the pinned one (`pin`, a CUDA 12 build, which
    runs on any driver that supports CUDA 12.0 or later) when the driver allows it, the
    CUDA 11 build of the same version on an older driver, None when unknown or too old."""
    if not driver_cuda:
        return None, "nvidia-smi did not say which CUDA version the driver supports"
    major = int(driver_cuda.split(".")[0])
    version = pin.split("==")[1] if "==" in pin else None
    if major >= 12:
        return pin, (f"driver supports CUDA {driver_cuda}; the pinned CUDA 12 build runs on drivers "
                     "for CUDA 12.0 and later")
    if major == 11 and version:
        return f"{DALI_PACKAGES[11]}=={version}", f"driver supports CUDA {driver_cuda} only: CUDA 11 build"
    return None, f"driver supports CUDA {driver_cuda}: too old for any DALI wheel we pin"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def requirements_for(dali: str, out: Path) -> Path:
    """requirements.txt with its DALI line replaced by `dali`."""
    lines = [dali if line.strip().lower().startswith("nvidia-dali") else line
             for line in REQUIREMENTS.read_text().splitlines()]
    out.write_text("\n".join(lines) + "\n")
    return out


def run(cmd: list, what: str) -> str | None:
    """None when `cmd` succeeds, else its output's tail under `what`."""
    print(f"[gpu-check] {what}: {' '.join(map(str, cmd))}", flush=True)
    p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(p.stdout[-4000:], flush=True)
    if p.returncode == 0:
        return None
    return f"{what} failed (exit {p.returncode}): {p.stdout.strip()[:1500]}"


def build(venv: Path, dali: str, wheels: str | None, base_python: str) -> str | None:
    """Create `venv` and install the pinned requirements (+ `dali`); None or why it failed."""
    if not venv_python(venv).exists():
        err = run([base_python, "-m", "venv", venv], "create the venv")
        if err:
            return err
    req = requirements_for(dali, venv / "requirements-gpu.txt")
    index = ["--no-index", "--find-links", wheels] if wheels else ["--retries", "1", "--timeout", "20"]
    err = run([venv_python(venv), "-m", "pip", "install", "-q", "--disable-pip-version-check",
               *index, "-r", req], "install requirements.txt")
    if err:
        err += (f" -- {wheels} lacks wheels it needs: fill it with `pip download -r requirements.txt -d DIR` "
                "for this machine's Python and platform" if wheels else
                " -- without a package index, pre-download the wheels (pip download -r "
                "requirements.txt -d DIR) and pass --wheels DIR")
        err += ", or run the checks with an interpreter that has torch with CUDA: --python /path/to/python"
    return err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--driver-cuda", default=None, help="CUDA version the driver supports (nvidia-smi)")
    ap.add_argument("--wheels", default=None, help="install offline from this folder of wheels")
    ap.add_argument("--python", default=None, help="use this interpreter as is: build no venv")
    ap.add_argument("--base-python", default=sys.executable, help="interpreter that creates the venv")
    a = ap.parse_args(argv)
    out = {"requirements": {"torch": pinned("torch=="), "dali": pinned("nvidia-dali")}}
    if a.python:
        py = Path(a.python)
        out.update(venv=None, interpreter=str(py), built=False,
                   note="--python given: no venv built; the pinned versions may not be those installed")
    else:
        venv = Path(a.venv).resolve()
        dali, why = choose_dali(a.driver_cuda, out["requirements"]["dali"])
        out.update(venv=str(venv), interpreter=str(venv_python(venv)), dali_choice=dali, dali_why=why)
        if dali is None:
            out.update(status="failed", error=f"no DALI wheel for this driver: {why}")
            Path(a.result).write_text(json.dumps(out))
            return 0
        err = build(venv, dali, a.wheels, a.base_python)
        out["built"] = err is None
        if err:
            out.update(status="failed", error=f"the venv could not be built: {err}")
            Path(a.result).write_text(json.dumps(out))
            return 0
        py = venv_python(venv)
    verify = Path(a.result).with_name("verify.json")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([str(py), "-m", "bench.gpu.work", "env", "--result", str(verify)], cwd=REPO, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(p.stdout[-4000:], flush=True)
    if verify.is_file():
        found = json.loads(verify.read_text())
        out.update({k: v for k, v in found.items() if k not in ("status", "error")})
        if found.get("status") in ("failed", "skipped"):
            out.update(status="failed", error=found.get("error"))
    else:
        out.update(status="failed", error=f"{py} could not run the verification (exit {p.returncode}): "
                                          f"{p.stdout.strip()[-1500:]}")
    Path(a.result).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
