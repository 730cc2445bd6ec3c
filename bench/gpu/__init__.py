"""`make gpu-check` (bench/gpu_check.py) in parts: `steps` runs each check as a subprocess
with its own time limit (stdlib only, so it runs before the venv exists), `env` probes the
machine and builds the venv, `compare` is the GPU-vs-CPU graph harness (tested on CPU),
`work` holds the checks that run inside the venv, one subcommand per step."""
