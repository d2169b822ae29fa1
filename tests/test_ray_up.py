"""`ray up` of cluster-onprem.yaml on real hosts, the way docs/CLUSTER.md tells a user.

The hosts are Linux namespaces on this machine (tests/nshosts.py): a head, a worker and the
client the user types on, each with its own address, home, /tmp and processes, sshd on the
head and the worker, pip pointed at a local wheelhouse. The cluster file is the shipped one
with only its CHANGE lines edited. Then, as documented: token, `ray up`, the readiness check,
`ray dashboard`, `ray job submit` of a tiny search, MLflow through an SSH tunnel, `ray down`.

Needs root, sshd, rsync and iproute2 (`.ci/run` installs them and sets
BAKE_RAY_TEST_RAY_UP=1, which turns a missing tool into a failure instead of a skip).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import nshosts
import wheelhouse

# `ray up` installs a venv on every fresh host: longer than the suite's 900 s per test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[1]
# The client uses the environment running this test (the repository's .venv, or whichever
# venv a worktree borrows): its `ray` is the user's laptop's.
CLIENT_BIN = Path(sys.executable).parent
SHARED = "/mnt/bake-ray"  # BAKE_RAY_SHARED on every host (tests/nshosts.py mounts /mnt)
RAY_OR_MLFLOW = re.compile(r"ray|mlflow|gcs_server|raylet|uvicorn|gunicorn|huey", re.IGNORECASE)
SEARCH = ["--name", "rayup", "--set", "budget.num_samples=2", "--set", "budget.max_concurrent=2",
          "--set", "base.epochs=1", "--set", "base.data.train_subset=256",
          "--set", "scheduler.grace_period=1"]


def onprem_config(head: str, worker: str, key: str) -> str:
    """cluster-onprem.yaml with its CHANGE lines edited, and nothing else."""
    lines = (ROOT / "cluster-onprem.yaml").read_text().splitlines(keepends=True)
    edits = [
        (r"head_ip: \S+", f"head_ip: {head}"),
        (r"worker_ips: \[[^]]*\]", f"worker_ips: [{worker}]"),
        (r"ssh_user: \S+", "ssh_user: root"),
        (r"ssh_private_key: \S+", f"ssh_private_key: {key}"),
        (r"BAKE_RAY_SHARED=[^']+", f"BAKE_RAY_SHARED={SHARED}"),
    ]
    done = 0
    for i, line in enumerate(lines):
        if "# CHANGE" not in line:
            continue
        for pattern, new in edits:
            edited = re.sub(pattern, new, line)
            if edited != line:
                lines[i], done = edited, done + 1
    assert done == len(edits), "a CHANGE line of cluster-onprem.yaml is missing"
    return "".join(lines)


class Client:
    """The user's machine: commands run inside the client namespace, from the repo root."""

    def __init__(self, hosts: nshosts.Hosts) -> None:
        self.host = hosts.hosts["client"]
        self.env = {
            "PATH": f"{CLIENT_BIN}:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/opt/ci/hosts/client/home", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
            "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        self.background: list[subprocess.Popen] = []

    def cmd(self, args: list[str]) -> list[str]:
        enter = [*self.host.enter()[:-1], f"--wd={ROOT}", "--"]
        return [*enter, "env", "-i", *(f"{k}={v}" for k, v in self.env.items()), *args]

    def run(self, args: list[str], timeout: float, check: bool = True,
            **env: str) -> subprocess.CompletedProcess:
        cmd = self.cmd(["env", *(f"{k}={v}" for k, v in env.items()), *args])
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} -> {done.returncode}\n"
                                 f"{done.stdout[-6000:]}\n{done.stderr[-6000:]}")
        return done

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        proc = subprocess.Popen(self.cmd(args), cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.background.append(proc)
        return proc

    def python(self, code: str, timeout: float = 60) -> str:
        return self.run([str(CLIENT_BIN / "python"), "-c", code], timeout).stdout

    def port_open(self, ip: str, port: int) -> bool:
        code = ("import socket,sys\ns=socket.socket()\ns.settimeout(3)\n"
                f"sys.stdout.write(str(s.connect_ex(({ip!r},{port}))))")
        return self.python(code).strip() == "0"

    def wait_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.port_open("127.0.0.1", port):
            assert time.monotonic() < deadline, f"nothing listens on the client's {port}"
            time.sleep(1)

    def stop_background(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def mlflow_runs(client: Client) -> list[dict]:
    """Every run on the head's MLflow server, read through the client's tunnel."""
    code = """
import json, urllib.request
def post(path, body):
    req = urllib.request.Request("http://127.0.0.1:5000/api/2.0/mlflow/" + path,
        data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=30))
exps = post("experiments/search", {"max_results": 100})["experiments"]
ids = [e["experiment_id"] for e in exps]
print(json.dumps(post("runs/search", {"experiment_ids": ids, "max_results": 1000}).get("runs", [])))
"""
    return json.loads(client.python(code))


def job_refused_without_token(client: Client) -> int:
    """HTTP status of a job submitted to the jobs API with no token at all."""
    code = """
import json, urllib.request, urllib.error
req = urllib.request.Request("http://127.0.0.1:8265/api/jobs/",
    data=json.dumps({"entrypoint": "echo pwned"}).encode(),
    headers={"Content-Type": "application/json"})
try:
    print(urllib.request.urlopen(req, timeout=30).status)
except urllib.error.HTTPError as err:
    print(err.code)
"""
    return int(client.python(code).strip())


def trial_nodes(shared: Path) -> dict[str, set[str]]:
    """Trial directory -> the node IPs its results were reported from (Tune's result.json)."""
    nodes: dict[str, set[str]] = {}
    for result in (shared / "bake-ray/experiments/rayup").glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        nodes[result.parent.name] = {r["node_ip"] for r in lines}
    return nodes


def leftovers(hosts: nshosts.Hosts) -> dict[str, list[str]]:
    """Ray or MLflow processes still running on the head or the worker."""
    left = {}
    for name in ("head", "worker"):
        procs = [cmd for cmd in hosts.hosts[name].processes().values()
                 if not cmd.startswith("sshd") and RAY_OR_MLFLOW.search(cmd)]
        if procs:
            left[name] = procs
    return left


def wait_no_leftovers(hosts: nshosts.Hosts, timeout: float) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout
    while (left := leftovers(hosts)) and time.monotonic() < deadline:
        time.sleep(2)
    return left


def test_ray_up_job_mlflow_down_on_namespace_hosts(tmp_path: Path) -> None:
    missing = nshosts.missing_tools()
    if missing:
        if os.environ.get("BAKE_RAY_TEST_RAY_UP") == "1":
            pytest.fail(f"cannot build namespace hosts, missing: {missing}")
        pytest.skip(f"namespace hosts need {missing}")
    t_start = time.monotonic()
    wheels = wheelhouse.build()
    timings: dict[str, float] = {}
    with nshosts.namespace_hosts(tmp_path, wheels, ["head", "worker", "client"]) as hosts:
        client = Client(hosts)
        head, worker = hosts.hosts["head"], hosts.hosts["worker"]
        cfg = "/opt/ci/cluster-onprem.yaml"
        (tmp_path / "cluster-onprem.yaml").write_text(
            onprem_config(head.ip, worker.ip, "/opt/ci/client_key"))
        try:
            client.run(["ray", "get-auth-token", "--generate"], timeout=120)
            client.run(["chmod", "600", "/opt/ci/hosts/client/home/.ray/auth_token"], timeout=30)

            t = time.monotonic()
            client.run(["ray", "up", "-y", cfg], timeout=1200)
            timings["ray_up_s"] = time.monotonic() - t

            t = time.monotonic()
            ready = client.run(["ray", "exec", cfg, "python -m bake_ray.ready --timeout 900"],
                               timeout=1000)
            timings["ready_after_up_s"] = time.monotonic() - t
            assert "ready: 1 worker(s) joined" in ready.stdout + ready.stderr

            client.start(["ray", "dashboard", cfg], tmp_path / "dashboard.log")
            client.wait_port(8265, timeout=120)

            t = time.monotonic()
            job = client.run(["ray", "job", "submit", "--address", "http://127.0.0.1:8265",
                              "--working-dir", ".", "--", "python", "-m", "bake_ray.tune",
                              *SEARCH], timeout=1200, RAY_AUTH_MODE="token")
            timings["job_s"] = time.monotonic() - t
            (tmp_path / "job.log").write_text(job.stdout + job.stderr)
            assert "succeeded" in (job.stdout + job.stderr).lower()

            # The trials ran on the worker (the head offers no CPU).
            nodes = trial_nodes(hosts.shared)
            assert len(nodes) == 2, nodes
            assert all(ips == {worker.ip} for ips in nodes.values()), nodes

            # MLflow on the head, through the documented SSH tunnel.
            client.start(["ssh", "-i", "/opt/ci/client_key", "-o", "StrictHostKeyChecking=no",
                          "-o", "UserKnownHostsFile=/dev/null", "-N", "-L",
                          "5000:127.0.0.1:5000", f"root@{head.ip}"], tmp_path / "tunnel.log")
            client.wait_port(5000, timeout=60)
            runs = mlflow_runs(client)
            tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
            parents = [r["info"]["run_id"] for r, tg in zip(runs, tags, strict=True)
                       if "mlflow.parentRunId" not in tg]
            children = [tg["mlflow.parentRunId"] for tg in tags if "mlflow.parentRunId" in tg]
            assert len(parents) == 1 and children == parents * 2, (parents, children)

            # Nothing but SSH is reachable on the head's address; no token, no job.
            assert client.port_open(head.ip, 22)
            assert not client.port_open(head.ip, 8265)
            assert not client.port_open(head.ip, 5000)
            assert job_refused_without_token(client) in (401, 403)

            client.stop_background()
            t = time.monotonic()
            client.run(["ray", "down", "-y", cfg], timeout=600)
            timings["ray_down_s"] = time.monotonic() - t
            left = wait_no_leftovers(hosts, timeout=180)
            timings["down_to_nothing_left_s"] = time.monotonic() - t
            assert not left, f"left running after `ray down`: {left}"
        except BaseException:
            for name in ("head", "worker"):
                print(f"--- {name} processes:", *hosts.hosts[name].processes().values(), sep="\n")
                logs = hosts.hosts[name].dir / "tmp/ray/session_latest/logs"
                for log in ("monitor.log", "monitor.out", "monitor.err"):
                    if (logs / log).exists():
                        print(f"--- {name} {log}:\n{(logs / log).read_text()[-4000:]}")
            raise
        finally:
            client.stop_background()
    timings["whole_test_s"] = time.monotonic() - t_start
    print("ray_up timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    out = ROOT / "tests/artifacts"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_up_timings.json").write_text(json.dumps(timings, indent=1))
