"""Helpers for the fault-injection tests: CLI subprocesses in their own sessions, killing
exactly the processes of one Ray cluster, polling with timeouts, a TCP forwarder that can
take an MLflow server away, and readers for Tune's experiment state and the final table.

Every process a test starts runs in a new session (``start_new_session=True``). Ray's
GCS, raylet, dashboard, agents and workers all inherit that session id, so "the processes
of that driver's cluster" are exactly those whose session id is the driver's pid: they can
be found and killed by pid even after the driver died and they were re-parented to init.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

#: Keys that would point a child at someone else's Ray cluster or MLflow server.
_FOREIGN_ENV = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "BAKE_RAY_STORAGE")


def child_env(**extra: str) -> dict[str, str]:
    """The test session's environment (quiet, fast Ray/MLflow settings from conftest), minus
    anything that would make a child join another cluster or tracking server."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    env.update({"PYTHONUNBUFFERED": "1", "TUNE_GLOBAL_CHECKPOINT_S": "0", **extra})
    return env


# --------------------------------------------------------------------------- polling


def wait_for(
    probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.1
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` on timeout.

    Tests never sleep for a fixed time: they wait for the event they need, bounded.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


# --------------------------------------------------------------------------- processes


def _session_of(pid: int) -> int | None:
    """Session id of a live process from /proc (None if it is gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return None if fields[0] == "Z" else int(fields[3])


def session_pids(sid: int) -> list[int]:
    """Live processes in session ``sid`` (the driver and every Ray process it started)."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    return sorted(p for p in pids if _session_of(p) == sid)


def cmdline(pid: int) -> str:
    """The process title (Ray renames its workers, e.g. ``ray::RayTrainWorker``)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def kill_session(sid: int, timeout_s: float = 30) -> None:
    """SIGKILL every process of one session, by pid, until none is left.

    After a driver is SIGKILLed, Ray's DashboardAgent and RuntimeEnvAgent survive as
    orphans (and ignore SIGTERM): they would hold ports and CPU in later tests.
    """

    def gone() -> bool:
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not session_pids(sid)

    wait_for(gone, timeout_s, f"the processes of session {sid} to exit", interval_s=0.2)


@dataclass
class Cli:
    """A ``python -m bake_ray.<entry>`` child in its own session, output in files."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.proc.args} still running after {timeout_s:.0f} s;"
                f" stderr tail:\n{self.stderr[-3000:]}"
            ) from None

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def describe(self) -> str:
        return f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-5000:]}"


def start_cli(entry: str, args: Sequence[str], cwd: Path, logs: Path, tag: str, **env: str) -> Cli:
    """Start ``python -m bake_ray.<entry> args`` in ``cwd``; logs go to ``logs/<tag>.*``.

    ``env`` adds to the child's environment. Unless it says otherwise, the child's
    ``TMPDIR`` is ``logs/tmp``: a child SIGKILLed mid-run leaves its scratch folders
    (``bake_ray_search_*``) in the test's own folder, not in /tmp. Ray's session files stay
    where they were (``RAY_TMPDIR``): its socket paths must stay short."""
    logs.mkdir(parents=True, exist_ok=True)
    if "TMPDIR" not in env:
        (logs / "tmp").mkdir(exist_ok=True)
        env = {"TMPDIR": str(logs / "tmp"), **env}
    env.setdefault("RAY_TMPDIR", os.environ.get("RAY_TMPDIR", "/tmp/ray"))
    out, err = logs / f"{tag}.out", logs / f"{tag}.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"bake_ray.{entry}", *args],
            cwd=cwd, env=child_env(**env), stdout=o, stderr=e, start_new_session=True,
        )  # fmt: skip
    return Cli(proc, out, err)


@contextlib.contextmanager
def cli_session(
    entry: str, args: Sequence[str], cwd: Path, logs: Path, tag: str, **env: str
) -> Iterator[Cli]:
    """A CLI child whose whole session (its Ray cluster included) is killed on the way out,
    also when the test fails half-way."""
    cli = start_cli(entry, args, cwd, logs, tag, **env)
    try:
        yield cli
    finally:
        if cli.proc.poll() is None:
            cli.proc.kill()
            cli.proc.wait(timeout=30)
        kill_session(cli.pid)


# --------------------------------------------------------------------------- Tune state


def trial_statuses(exp_dir: Path) -> dict[str, str]:
    """trial_id -> Tune status from the newest experiment snapshot ({} while none is readable).

    With TUNE_GLOBAL_CHECKPOINT_S=0 the snapshot is rewritten after every step, so this is
    also exactly what a restore after a driver crash would start from.
    """
    snapshots = sorted(exp_dir.glob("experiment_state-*.json"))
    if not snapshots:
        return {}
    try:
        data = json.loads(snapshots[-1].read_text())
        trials = [json.loads(t[0]) for t in data["trial_data"]]
    except (OSError, ValueError, KeyError, IndexError):
        return {}  # caught mid-write: the next poll reads the complete file
    return {t["trial_id"]: t["status"] for t in trials}


def trial_dirs(exp_dir: Path) -> dict[str, Path]:
    """trial_id -> the trial's directory under the experiment (``trial_<id>``)."""
    return {p.name.removeprefix("trial_"): p for p in exp_dir.glob("trial_*") if p.is_dir()}


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file below ``root``."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


_ROW = re.compile(r"^\s*(\d+)\s+([0-9a-f]{8}(?:_\d+)?)\s+(.*\S)\s+(\w+)\s*$")


def table_rows(stdout: str) -> list[dict[str, str]]:
    """The rows of the search's final table: rank, trial id, the rest, status."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "trial"])
    rows = []
    for line in lines[start + 1 :]:
        match = _ROW.match(line)
        if not match:
            break
        rank, trial, middle, status = match.groups()
        rows.append({"rank": rank, "trial": trial, "middle": middle, "status": status})
    return rows


def write_space(path: Path, **sections: Any) -> Path:
    """Write a search-space YAML file from plain data."""
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


# --------------------------------------------------------------------------- TCP forwarder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TcpForwarder:
    """Forwards a local port to the MLflow server; ``stop`` makes the server unreachable.

    Stopping closes the listener and every open connection (what a client sees when the
    tracking server goes down); ``start`` listens again on the same port. With
    ``cut_replies`` set, requests still reach the server but each reply is dropped and the
    connection closed: the write happened, yet the client sees a connection error.
    """

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.cut_replies = False
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._listener: socket.socket | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._stop.clear()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        for sock in [*self._sockets, self._listener]:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            client.settimeout(None)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            for src, dst, reply in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, reply), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, reply: bool) -> None:
        try:
            while data := src.recv(65536):
                if reply and self.cut_replies:
                    break  # the server answered; the client never hears it
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def committed_epoch(run: Path) -> int:
    """The epoch of the newest checkpoint Ray Train has committed (0 if none yet).

    A ``checkpoint_*`` folder appears while rank 0's report is still being persisted; only
    once the controller registers it (and rewrites this snapshot) will a restarted worker
    group resume from it. Before that, a restart rightly begins from the previous one.
    """
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("epoch", 0))
