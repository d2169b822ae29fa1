"""A real multi-node Ray cluster on one machine, for tests: one ``ray start`` per node.

Each node is a ``ray start --block`` process in its own session, so "this node's
processes" is exactly "the processes of that session": its raylet, its agents and every
worker the raylet spawned (Ray gives workers their own process group, never their own
session). Killing a node SIGKILLs its whole session, as if the machine had died, and
shutting the cluster down does the same for every node, so no orphaned
``DashboardAgent``/``RuntimeEnvAgent`` outlives the test (FINDINGS §6).

The cluster is separate from any in-process Ray of the pytest session: it has its own temp
dir and ports, and every process of it gets ``RAY_API_SERVER_ADDRESS`` pointing at its own
dashboard, so Ray Train's placement-group cleaner never has to guess among the Ray
instances on the host (FINDINGS §9).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # the minimum is 75 MiB; 30% of RAM per node is waste


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, interval_s: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


# --------------------------------------------------------------------------- processes


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, session id) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[3])


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session is ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == sid and stat[0] != "Z":
                pids.append(int(entry))
    return pids


def kill_session(sid: int, timeout_s: float = 30.0) -> None:
    """SIGKILL every process of a session, again and again until none is left.

    Repeated because a raylet can fork a worker between the scan and the kill.
    """
    deadline = time.monotonic() + timeout_s
    while pids := session_pids(sid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} of session {sid} survive SIGKILL")
        time.sleep(0.1)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


# --------------------------------------------------------------------------- the cluster


@dataclass
class Node:
    """One raylet of the cluster: its ``ray start`` process (a session leader) and node id."""

    name: str
    proc: subprocess.Popen
    node_id: str
    log: Path


class LocalCluster:
    """Head plus worker nodes, each a separate ``ray start`` on this machine."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        # Unix socket paths are limited to ~107 bytes: keep the temp dir short.
        self.root = Path(tempfile.mkdtemp(prefix="bkr", dir="/tmp"))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {
            **(env if env is not None else os.environ),
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
        }
        for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "BAKE_RAY_STORAGE"):
            self.env.pop(key, None)  # someone else's cluster, server or storage
        self.env["PYTHONUNBUFFERED"] = "1"
        self.nodes: list[Node] = []
        self.address = ""

    # -- starting

    def _node_ports(self) -> list[str]:
        """Explicit free ports: several raylets share one IP, Ray's defaults would clash."""
        ports = [
            "--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
        ]  # fmt: skip
        return [arg for flag in ports for arg in (flag, str(free_port()))]

    def _start(self, name: str, args: list[str]) -> Node:
        """Start one node and wait until the GCS lists its raylet ALIVE."""
        log = self.root.with_name(f"{self.root.name}.{name}.log")
        cmd = [
            *RAY, "start", "--block", "--disable-usage-stats",
            "--object-store-memory", str(OBJECT_STORE_BYTES), *self._node_ports(), *args,
        ]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = Node(name, proc, "", log)
        self.nodes.append(node)  # before waiting, so shutdown() kills it if start-up fails
        node.node_id = wait_for(f"the raylet of {name}", lambda: self._raylet_id(node), 90, 0.2)
        wait_for(f"{name} ALIVE", lambda: node.node_id in self.alive_node_ids(), 90, 0.3)
        return node

    def _raylet_id(self, node: Node) -> str | None:
        if node.proc.poll() is not None:
            raise RuntimeError(f"{node.name} exited early:\n{node.log.read_text()[-3000:]}")
        for pid in session_pids(node.proc.pid):
            for arg in _cmdline(pid):
                if arg.startswith("--node_id="):
                    return arg.split("=", 1)[1]
        return None

    def start_head(self, resources: dict[str, float]) -> Node:
        """A head that trains nothing (``num_cpus=0``) but hosts trial drivers."""
        head = self._start(
            "head",
            [
                "--head", "--port", str(self.gcs_port), "--temp-dir", str(self.root),
                "--num-cpus", "0", "--resources", json.dumps(resources),
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                "--ray-client-server-port", str(free_port()),
            ],
        )  # fmt: skip
        self.address = f"127.0.0.1:{self.gcs_port}"
        return head

    def add_worker(self, num_cpus: int = 1) -> Node:
        """A worker node; started one at a time (two raylets starting together pick the
        same socket name in the shared session dir and one of them never registers)."""
        name = f"worker{len(self.nodes)}"
        # One log monitor (the head's) for the shared logs dir, not one more per node.
        args = ["--address", self.address, "--num-cpus", str(num_cpus)]
        return self._start(name, [*args, "--include-log-monitor", "False"])

    # -- observing

    def state(self, kind: str) -> list[dict[str, Any]]:
        """All rows of the State API (``/api/v0/<kind>``: actors, nodes...), with details.

        Plain HTTP to this cluster's dashboard: Ray's Python State API client would obey a
        RAY_API_SERVER_ADDRESS of the test process instead of the address it is given.
        """
        url = f"{self.dashboard_url}/api/v0/{kind}?detail=1&limit=10000"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())["data"]["result"]["result"]

    def alive_node_ids(self) -> set[str]:
        try:
            return {n["node_id"] for n in self.state("nodes") if n["state"] == "ALIVE"}
        except OSError:
            return set()  # dashboard not up yet

    def live_workers(self) -> list[Node]:
        """Worker nodes whose processes run (a killed node may still look ALIVE to the GCS
        until its health checks time out)."""
        return [n for n in self.nodes[1:] if n.proc.poll() is None]

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)

    @property
    def session_logs(self) -> Path:
        return self.root / "session_latest" / "logs"

    # -- stopping

    def kill(self, node: Node) -> None:
        """The machine dies: SIGKILL every process of the node, no goodbye to the GCS."""
        kill_session(node.proc.pid)
        node.proc.wait(timeout=30)

    def shutdown(self) -> None:
        """``ray stop`` for this cluster only: kill every node's session, remove the temp dir."""
        for node in reversed(self.nodes):
            kill_session(node.proc.pid)
            node.proc.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)
        for node in self.nodes:
            node.log.unlink(missing_ok=True)


# --------------------------------------------------------------------------- Ray Train's logs


@dataclass(frozen=True)
class TrainReport:
    """One ``ray.train.report`` of one worker, as Ray Train's structured worker log has it."""

    trial_id: str  # the Train run name, which bake-ray sets to the Tune trial id
    actor_id: str
    node_id: str
    rank: int
    epoch: int
    time_ns: int


_EPOCH = re.compile(r"'epoch': ([0-9.]+)")


def train_reports(logs: Path) -> list[TrainReport]:
    """Every report of every Ray Train worker of the cluster, oldest first.

    Ray Train writes JSON lines per worker under ``<session>/logs/train``; each line carries
    the run name, actor, node and rank of the worker, whichever node it ran on (the nodes
    of this cluster share one session dir).
    """
    reports = []
    for path in sorted((logs / "train").glob("ray-train-app-worker-*.log")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            message = str(record.get("message", ""))
            match = _EPOCH.search(message)
            if message.startswith("Reporting training result") and match:
                reports.append(
                    TrainReport(
                        trial_id=record["run_name"],
                        actor_id=record["actor_id"],
                        node_id=record["node_id"],
                        rank=int(record["world_rank"]),
                        epoch=int(float(match.group(1))),
                        time_ns=int(record["timestamp_ns"]),
                    )
                )
    return sorted(reports, key=lambda r: r.time_ns)


# --------------------------------------------------------------------------- autoscaling


_EMPTY_LISTS = (
    "cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
    "setup_commands", "head_setup_commands", "worker_setup_commands",
    "head_start_ray_commands", "worker_start_ray_commands",
)  # fmt: skip


class AutoscalingCluster(LocalCluster):
    """A head with Ray's real autoscaler and its ``fake_multinode`` provider: worker nodes
    are real raylets on this machine that the autoscaler starts and stops itself.

    The autoscaler runs as the head's monitor process and starts each node in it, so every
    node lives in the head's ``ray start`` session and :meth:`shutdown` ends them all. The
    v1 autoscaler: the v2 one needs ``fake_multi_node/example.yaml``, which the wheel lacks.
    """

    HEAD_TYPE = "ray.head.default"  # the node type the fake provider gives the head

    def start_autoscaling_head(
        self,
        head_resources: dict[str, float],
        worker_types: dict[str, dict[str, Any]],
        idle_timeout_minutes: float = 0.1,
    ) -> Node:
        """The head offers ``head_resources`` (no CPU) and may add nodes of ``worker_types``
        (``{name: {"resources": ..., "max_workers": N}}``), each from zero."""
        config = {
            "cluster_name": "bake-ray-fake",
            "max_workers": sum(t["max_workers"] for t in worker_types.values()),
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_minutes,
            "provider": {
                "type": "fake_multinode",
                "gcs_address": f"127.0.0.1:{self.gcs_port}",  # fake nodes dial 6379 otherwise
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "auth": {"ssh_user": "ray"},
            "head_node_type": self.HEAD_TYPE,
            "available_node_types": {
                self.HEAD_TYPE: {"resources": head_resources, "node_config": {}, "max_workers": 0},
                **{
                    name: {
                        # each fake node's object store: the minimum, not 30% of RAM
                        "resources": {"object_store_memory": OBJECT_STORE_BYTES, **t["resources"]},
                        "node_config": {},
                        "min_workers": 0,
                        "max_workers": t["max_workers"],
                    }
                    for name, t in worker_types.items()
                },
            },
            **{key: {} for key in ("file_mounts", "docker")},
            **{key: [] for key in _EMPTY_LISTS},  # the monitor reads them, nothing runs them
            "file_mounts_sync_continuously": False,
        }
        self.config_path = self.root.with_name(f"{self.root.name}.autoscaling.yaml")
        self.config_path.write_text(json.dumps(config))
        self.env.update(
            {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
             "RAY_enable_autoscaler_v2": "0"}
        )  # fmt: skip
        head = self._start(
            "head",
            [
                "--head", "--port", str(self.gcs_port), "--temp-dir", str(self.root),
                "--node-ip-address", "127.0.0.1",
                "--autoscaling-config", str(self.config_path),
                "--num-cpus", "0",
                "--resources", json.dumps({k: v for k, v in head_resources.items() if k != "CPU"}),
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                "--ray-client-server-port", str(free_port()),
            ],
        )  # fmt: skip
        self.address = f"127.0.0.1:{self.gcs_port}"
        return head

    def worker_node_ids(self, alive_only: bool) -> set[str]:
        """Ids of the nodes the autoscaler added (dead ones too unless ``alive_only``)."""
        return {
            n["node_id"]
            for n in self.state("nodes")
            if not n["is_head_node"] and (n["state"] == "ALIVE" or not alive_only)
        }

    def shutdown(self) -> None:
        super().shutdown()
        if hasattr(self, "config_path"):
            self.config_path.unlink(missing_ok=True)


def write_digits_space(
    path: Path, name: str, epochs: int, train_subset: int, budget: dict[str, Any]
) -> Path:
    """A small BAKE search on digits for the cluster tests: temperature searched, seeded,
    no early stopping; ``budget`` decides how trials are placed."""
    space = {
        "name": name,
        "base": {
            "method": "bake",
            "epochs": epochs,
            "seed": 0,
            "data": {
                "dataset": "digits",
                "batch_size": 32,
                "same_class": 1,
                "train_subset": train_subset,
            },
            "model": {"name": "small_cnn"},
            "optim": {"lr": 0.05, "schedule": "constant"},
        },
        "space": {"bake.temperature": {"distribution": "uniform", "low": 2.0, "high": 6.0}},
        "objective": {"metric": "val_acc", "mode": "max"},
        "budget": budget,
        "scheduler": {"type": "none"},
        "seed": 0,
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path
