"""The preprocessing job and the shard writer on a two-node Ray cluster on this machine (a
head and a second node started with `ray start`, each with its own CPU count, token
authentication on, on loopback): the same parts row for row and the same shard bytes as
on one node. Only the processes this test started are stopped (the nodes' own process
trees, under a temp dir of their own); other Ray clusters on the machine are untouched."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from common.paths import proposals_dir
from tests.test_job import rows_by_key
from tests.test_shards import files_of

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def node_args(cpus: int, ports: list[int]) -> list[str]:
    """Every port a node opens, chosen free, so two nodes (and anyone else's Ray) coexist."""
    manager, objects, agent, agent_grpc, runtime_env, metrics, low = ports
    return ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--object-store-memory",
            str(100 << 20), "--node-manager-port", str(manager), "--object-manager-port", str(objects),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
            "--min-worker-port", str(low), "--max-worker-port", str(low + 40), "--disable-usage-stats",
            "--block"]


def kill_tree(proc: subprocess.Popen) -> None:
    """The `ray start --block` process and everything it started, by pid."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=10)


def cluster_cpus(env: dict) -> tuple[int, float]:
    code = ("import ray; ray.init(); n = [x for x in ray.nodes() if x['Alive']]; "
            "print(len(n), ray.cluster_resources().get('CPU', 0))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    if out.returncode:
        return 0, 0.0
    nodes, cpus = out.stdout.split()[-2:]
    return int(nodes), float(cpus)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head with 1 CPU and a second node with 2 CPUs, token auth (our own token, by
    RAY_AUTH_TOKEN: ~/.ray/auth_token is left alone); yields the env that reaches it."""
    base = tmp_path_factory.mktemp("cluster")
    temp = Path("/tmp") / f"ray-i16-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths are bounded
    gcs, *ports = free_ports(15)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=uuid.uuid4().hex, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    logs = open(base / "ray.log", "w")
    nodes = [subprocess.Popen([RAY, "start", "--head", "--port", str(gcs), "--temp-dir", str(temp),
                               "--include-dashboard", "false", *node_args(1, ports[:7])],
                              env=env, stdout=logs, stderr=subprocess.STDOUT)]
    try:
        address = f"127.0.0.1:{gcs}"
        client = dict(env, RAY_ADDRESS=address)
        deadline = time.monotonic() + 60
        while cluster_cpus(client)[0] < 1:
            assert nodes[0].poll() is None and time.monotonic() < deadline, (base / "ray.log").read_text()
            time.sleep(1)
        nodes.append(subprocess.Popen([RAY, "start", "--address", address, *node_args(2, ports[7:14])],
                                      env=env, stdout=logs, stderr=subprocess.STDOUT))
        while cluster_cpus(client) != (2, 3.0):
            assert nodes[1].poll() is None and time.monotonic() < deadline, (base / "ray.log").read_text()
            time.sleep(1)
        yield client
    finally:
        for node in reversed(nodes):
            kill_tree(node)
        logs.close()


def test_two_nodes_give_the_single_node_parts_and_shard_bytes(cluster, sample_parts, sample_raw,
                                                              sample_shards, tmp_path):
    work, name = sample_parts
    job = subprocess.run([sys.executable, "-m", "preprocess.job", "--dataset", "sample", "--root",
                          str(sample_raw), "--work-dir", str(tmp_path / "work"), "--part-size", "4",
                          "--stats", "off"], env=cluster, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    assert rows_by_key(proposals_dir(name, tmp_path / "work")) == rows_by_key(proposals_dir(name, work))
    out = tmp_path / "shards"
    pack = subprocess.run([sys.executable, "-m", "shards.write", "--dataset", name, "--proposals",
                           str(proposals_dir(name, work)), "--out", str(out), "--max-samples", "4"],
                          env=cluster, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert pack.returncode == 0, pack.stderr[-3000:]
    single = {k: v for k, v in files_of(sample_shards).items() if k != "_rows/.lock"}
    two = {k: v for k, v in files_of(out).items() if k != "_rows/.lock"}
    assert two.keys() == single.keys() and two == single
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 14
