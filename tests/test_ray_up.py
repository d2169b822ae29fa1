"""`ray up` of cluster-onprem.yaml on real hosts, the way docs/CLUSTER.md tells a user.

The hosts are Linux namespaces on this machine (tests/nshosts.py): a head, a worker and the
client the user types on, each with its own address, home, /tmp and processes, sshd on the
head and the worker, pip pointed at a local wheelhouse. The cluster's login (`ssh_user`) is
an ordinary user with no sudo (none is installed) and sshd refuses root. The shared
directory is what an NFS admin hands out: owned by another account, writable by a group
`ssh_user` is in, and nothing more than docs/CLUSTER.md asks of it. The cluster file is the
shipped one with only its CHANGE lines edited. Then, as documented: token, `ray up` (first
refused in one line while the directory is not writable), the readiness check,
`ray dashboard`, `ray job submit` of a tiny search, MLflow through `ray attach -p 5000`,
`ray down`.

Needs root, sshd, rsync and iproute2: without them it skips on a developer's machine and
fails where CI is true (tests/system_packages.py) or BAKE_RAY_TEST_RAY_UP=1 (`.ci/run`
sets both).
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
from system_packages import missing

# `ray up` installs a venv on every fresh host: longer than the suite's 900 s per test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[1]
# The client uses the environment running this test (the repository's .venv, or whichever
# venv a worktree borrows): its `ray` is the user's laptop's.
CLIENT_BIN = Path(sys.executable).parent
SHARED = "/mnt/bake-ray"  # BAKE_RAY_SHARED on every host (tests/nshosts.py mounts /mnt)
# What cluster-onprem.yaml's setup prints, and `ray up` shows, when ssh_user cannot write there.
NOT_WRITABLE = f"error: BAKE_RAY_SHARED={SHARED}: user {nshosts.USER} cannot create files there"
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
        (r"ssh_user: \S+", f"ssh_user: {nshosts.USER}"),
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

    def wait_port(self, port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
        """Until the client's `port` answers; fails at once if `proc`, who should open it, ends."""
        deadline = time.monotonic() + timeout
        while not self.port_open("127.0.0.1", port):
            assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"nothing listens on the client's {port}"
            time.sleep(1)

    def wait_port_closed(self, port: int, timeout: float) -> None:
        """Until nothing listens on the client's `port`. It asks `ss`, not connect(): each
        connection through a forwarded port is an ssh channel, which keeps Ray's shared ssh
        connection, and so the forward, alive for 10 s more (ControlPersist)."""
        deadline = time.monotonic() + timeout
        while self.run(["ss", "-Hltn", f"sport = :{port}"], timeout=30).stdout.strip():
            assert time.monotonic() < deadline, f"the client's {port} is still forwarded"
            time.sleep(1)

    @staticmethod
    def stop(proc: subprocess.Popen) -> None:
        """End a background command and what it started (its own session) by its PID."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop_background(self) -> None:
        for proc in self.background:
            self.stop(proc)


def mlflow_runs(client: Client) -> list[dict]:
    """Every run on the head's MLflow server, read through the client's forwarded port."""
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


def root_processes(hosts: nshosts.Hosts) -> dict[str, list[str]]:
    """Processes on the head or the worker that run as root, sshd aside (the host's init and
    its per-login monitors): the cluster must need no root anywhere."""
    found: dict[str, list[str]] = {}
    for name in ("head", "worker"):
        for pid, cmd in hosts.hosts[name].processes().items():
            try:
                uid = os.stat(f"/proc/{pid}").st_uid
            except OSError:  # ended meanwhile
                continue
            if uid == 0 and not cmd.startswith("sshd"):
                found.setdefault(name, []).append(cmd)
    return found


def foreign_files(share: Path) -> list[str]:
    """Files under the shared directory that ssh_user did not create."""
    return [str(p) for p in share.rglob("*") if p.lstat().st_uid != nshosts.USER_UID]


def nfs_export(shared: Path, writable: bool) -> Path:
    """BAKE_RAY_SHARED as an NFS admin makes it: owned by the admin's account, group
    SHARE_GROUP (ssh_user is in it), setgid; group-writable only when `writable`."""
    share = shared / Path(SHARED).name
    share.mkdir(exist_ok=True)
    os.chown(share, nshosts.NFS_OWNER_UID, nshosts.SHARE_GID)
    share.chmod(0o2775 if writable else 0o2755)
    return share


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
    lacking = nshosts.missing_tools()
    if lacking:
        reason = missing("openssh-server, rsync, iproute2, util-linux, procps, or root",
                         f"namespace hosts need {', '.join(lacking)}")
        if os.environ.get("BAKE_RAY_TEST_RAY_UP") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
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

            # The admin forgot the group's write bit: `ray up` stops, in one line, before the
            # venv (so in seconds), and says which directory, which user and where to read.
            share = nfs_export(hosts.shared, writable=False)
            refused = client.run(["ray", "up", "-y", cfg], timeout=600, check=False)
            out = refused.stdout + refused.stderr
            (tmp_path / "refused.log").write_text(out)
            assert refused.returncode != 0, out[-3000:]
            assert NOT_WRITABLE in out, out[-3000:]
            assert not (head.home / "bake-ray-venv").exists()

            nfs_export(hosts.shared, writable=True)
            t = time.monotonic()
            client.run(["ray", "up", "-y", cfg], timeout=1200)
            timings["ray_up_s"] = time.monotonic() - t

            t = time.monotonic()
            ready = client.run(["ray", "exec", cfg, "python -m bake_ray.ready --timeout 900"],
                               timeout=1000)
            timings["ready_after_up_s"] = time.monotonic() - t
            assert "ready: 1 worker(s) joined" in ready.stdout + ready.stderr

            log = tmp_path / "dashboard.log"
            dashboard = client.start(["ray", "dashboard", cfg], log)
            client.wait_port(8265, 120, dashboard, log)

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

            # Everything ran as ssh_user: no process of the cluster as root, no file in the
            # shared directory by anyone else.
            assert not root_processes(hosts), root_processes(hosts)
            assert not foreign_files(share), foreign_files(share)[:10]

            # Nothing but SSH is reachable on the head's address; no token, no job.
            assert client.port_open(head.ip, 22)
            assert not client.port_open(head.ip, 8265)
            assert not client.port_open(head.ip, 5000)
            assert job_refused_without_token(client) in (401, 403)
            client.stop(dashboard)

            # MLflow on the head, through README's `ray attach -p 5000` (an interactive shell
            # on the head, kept open by a stdin nobody writes to), ended by its PID. Ray's ssh
            # shares one background connection per host (ControlMaster) that holds the
            # forwarded ports until 10 s after its last session (ControlPersist=10s): the
            # client's 5000 closes then, with nothing of ours left to end.
            log = tmp_path / "attach.log"
            attach = client.start(["ray", "attach", cfg, "-p", "5000"], log)
            client.wait_port(5000, 120, attach, log)
            runs = mlflow_runs(client)
            client.stop(attach)
            client.wait_port_closed(5000, 60)
            tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
            parents = [r["info"]["run_id"] for r, tg in zip(runs, tags, strict=True)
                       if "mlflow.parentRunId" not in tg]
            children = [tg["mlflow.parentRunId"] for tg in tags if "mlflow.parentRunId" in tg]
            assert len(parents) == 1 and children == parents * 2, (parents, children)

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
