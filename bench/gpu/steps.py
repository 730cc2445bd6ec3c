"""Run one check as a subprocess under its own time limit and record how it went.

Standard library only: the orchestrator (bench/gpu_check.py) runs these before the venv
exists. A step is a command that writes its figures as JSON to the file named by its
`--result` argument; its record is {status: ok|failed|skipped|timeout, seconds, error
(the output's tail when not ok), result (that JSON, when written)}. A step that hangs is
stopped (SIGTERM to its process group, SIGKILL 5 s later), so one hang costs at most its
own limit."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

STATUSES = ("ok", "failed", "skipped", "timeout")
TAIL_CHARS = 2000


def tail(text: str, n: int = TAIL_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """End the step's own process group (it was started in a new session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def skipped(reason: str) -> dict:
    return {"status": "skipped", "seconds": 0.0, "error": reason, "result": None}


def run_step(name: str, cmd: list[str], limit_s: float, env: dict | None = None,
             cwd: str | os.PathLike | None = None, log=None) -> dict:
    """Run `cmd` + ["--result", FILE] for at most `limit_s` seconds. The command's result
    JSON may set "status" to "skipped" or "failed" itself (with "error")."""
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        result_path = Path(tmp) / "result.json"
        out_path = Path(tmp) / "output.txt"
        t0 = time.perf_counter()
        with open(out_path, "w") as out:
            try:
                proc = subprocess.Popen(cmd + ["--result", str(result_path)], stdout=out,
                                        stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                        start_new_session=True)
            except OSError as e:
                return {"status": "failed", "seconds": 0.0, "result": None,
                        "error": f"{name}: could not start {cmd[0]}: {e}"}
            try:
                rc = proc.wait(timeout=max(limit_s, 1))
                status = "ok" if rc == 0 else "failed"
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # whatever the step left running
            except subprocess.TimeoutExpired:
                stop_group(proc)
                rc, status = None, "timeout"
        seconds = time.perf_counter() - t0
        output = out_path.read_text(errors="replace")
        if log is not None:
            log.write(output)
            log.flush()
        result = None
        if result_path.is_file():
            try:
                result = json.loads(result_path.read_text())
            except json.JSONDecodeError as e:
                result, status = None, "failed"
                output += f"\n{name}: its result file is not JSON ({e})"
    error = None
    if status == "ok" and isinstance(result, dict) and result.get("status") in ("skipped", "failed"):
        status, error = result["status"], result.get("error")
    elif status == "timeout":
        error = f"stopped after its {limit_s:.0f} s limit; output tail:\n{tail(output)}"
    elif status == "failed":
        error = f"exit code {rc}; output tail:\n{tail(output)}"
    return {"status": status, "seconds": round(seconds, 2), "error": error, "result": result}
