"""Fault injection with real processes: a Ray Train worker SIGKILLed mid-run, the search
driver SIGKILLed mid-search and resumed, a trial whose loss turns NaN, the MLflow server
vanishing mid-search (or losing a reply), and a process SIGKILLed while it writes a
checkpoint. The claim under test is always the same: a fault never loses a result.

Each subprocess runs in its own session so that its Ray cluster (GCS, raylet, agents,
workers) can be found and killed by pid afterwards: see ``reliability_helpers``.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from reliability_helpers import (
    Cli,
    TcpForwarder,
    child_env,
    cli_session,
    cmdline,
    committed_epoch,
    kill_session,
    session_pids,
    table_rows,
    tree_snapshot,
    trial_dirs,
    trial_statuses,
    wait_for,
    write_space,
)
from tracking_helpers import trial_run_id

from bake_ray.core import checkpoint as ckpt
from bake_ray.tracking.search_runs import SearchTracker
from bake_ray.train import main as train_main

#: A quick trial: 3 epochs of 256 digits (~1-3 s of training on one core).
BASE = {
    "epochs": 3,
    "data": {"dataset": "digits", "batch_size": 32, "same_class": 1, "train_subset": 256},
    "optim": {"schedule": "constant"},
}
OMEGA = {"bake.omega": {"distribution": "uniform", "low": 0.0, "high": 0.9}}
SMALL_RUN = [
    "--set=optim.schedule=constant",
    "--set=data.train_subset=512",
    "--set=data.batch_size=32",
]


def _tune_args(space: Path, name: str, storage: Path, tracking_uri: str) -> list[str]:
    return [
        "--config", str(space), "--name", name,
        "--storage", str(storage), "--tracking-uri", tracking_uri,
    ]  # fmt: skip


def _alive(cli: Cli) -> None:
    """Inside a poll: stop waiting at once if the child already exited."""
    if cli.proc.poll() is not None:
        raise AssertionError(f"exited early with {cli.proc.returncode}\n{cli.describe()}")


def _children(client: MlflowClient, experiment: str) -> tuple[Any, list[Any]]:
    """(parent run, trial runs) of the one search logged in ``experiment``."""
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("bake_ray.role") == "search"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    trials = [r for r in runs if r.data.tags.get("bake_ray.role") == "trial"]
    assert len(runs) == 1 + len(trials), "a run that is neither the search nor a trial"
    return parents[0], trials


def _steps(client: MlflowClient, run_id: str, key: str = "val_acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _by_trial(runs: list[Any]) -> dict[str, Any]:
    """trial_id -> run, asserting there is one run per trial id (no duplicates)."""
    ids = [r.data.tags["bake_ray.trial_id"] for r in runs]
    assert len(ids) == len(set(ids)), f"duplicated trial runs: {sorted(ids)}"
    return {r.data.tags["bake_ray.trial_id"]: r for r in runs}


# --------------------------------------------------------------------------- worker death

_PROGRESS = re.compile(r"RayTrainWorker pid=(\d+)\)\S*\s+epoch\s+(\d+)/")
_TRAIN_WORKER = "ray::RayTrainWorker"


@pytest.mark.slow
def test_killed_ray_train_worker_restarts_the_group_from_the_last_checkpoint(
    tmp_path: Path,
) -> None:
    """SIGKILL one of two Ray Train workers once a checkpoint is committed: Train's
    FailureConfig restarts the worker group, which resumes from that checkpoint; the epoch
    history in the final checkpoint is complete, with no gap and no epoch twice."""
    epochs = 6
    run = tmp_path / "runs" / "w2"
    args = [
        "--workers", "2", f"--set=epochs={epochs}", "--set=data.train_subset=1024",
        "--set=data.batch_size=32", "--set=optim.schedule=constant",
        f"--set=runtime.output_dir={tmp_path / 'runs'}", "--set=runtime.run_name=w2",
    ]  # fmt: skip
    with cli_session("train", args, tmp_path, tmp_path / "logs", "train") as cli:

        def committed() -> int:
            _alive(cli)
            return committed_epoch(run)

        resume_epoch = wait_for(committed, 300, "the first committed Ray Train checkpoint")
        workers = [p for p in session_pids(cli.pid) if cmdline(p).startswith(_TRAIN_WORKER)]
        assert len(workers) == 2, [cmdline(p) for p in session_pids(cli.pid)]
        os.kill(workers[-1], signal.SIGKILL)
        code = cli.wait(300)
    logs = cli.stdout + cli.stderr
    assert code == 0, cli.describe()
    assert "[FailurePolicy] RETRY" in logs, "the worker group was not restarted"
    logs += (run / "ray_train.log").read_text()  # rank 0 logs its pid with each epoch there

    progress = [(int(pid), int(epoch)) for pid, epoch in _PROGRESS.findall(logs)]
    after = [epoch for pid, epoch in progress if pid not in workers]
    assert after and after[-1] == epochs, "a new worker group did not finish the run"
    assert after[0] > resume_epoch, f"restarted at epoch {after[0]}, not after {resume_epoch}"

    latest = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())[-1]
    state = ckpt.load(latest)
    assert state["epoch"] == epochs
    assert [int(h["epoch"]) for h in state["history"]] == list(range(1, epochs + 1))


# --------------------------------------------------------------------------- driver death


@pytest.mark.slow
def test_killed_search_driver_resumes_without_rerunning_or_duplicating(tmp_path: Path) -> None:
    """SIGKILL ``python -m bake_ray.tune`` once a trial has completed, clean up its orphaned
    Ray processes, then ``--resume``: the search finishes with every trial in the table,
    completed trials are not run again, and MLflow has one run per trial, none RUNNING,
    each epoch logged exactly once."""
    samples, name = 4, "crash-1"
    space = write_space(
        tmp_path / "space.yaml", name="crash", base=BASE, space=OMEGA,
        budget={"num_samples": samples, "max_concurrent": 2}, scheduler={"type": "none"},
    )  # fmt: skip
    storage, exp = tmp_path / "results", tmp_path / "results" / name
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _tune_args(space, name, storage, uri)

    with cli_session("tune", args, tmp_path, tmp_path / "logs", "first") as cli:

        def a_trial_done() -> bool:
            _alive(cli)
            return "TERMINATED" in trial_statuses(exp).values()

        wait_for(a_trial_done, 300, "a completed trial")
        os.kill(cli.pid, signal.SIGKILL)
        cli.proc.wait(timeout=30)
        kill_session(cli.pid)  # Ray's orphans (agents, raylet, GCS), by pid
    assert session_pids(cli.pid) == []

    at_kill = trial_statuses(exp)
    done = sorted(t for t, s in at_kill.items() if s == "TERMINATED")
    assert 1 <= len(done) < samples, at_kill
    dirs = trial_dirs(exp)
    before = {t: tree_snapshot(dirs[t]) for t in done}
    client = MlflowClient(uri)
    ended = {t: r.info.end_time for t, r in _by_trial(_children(client, "crash")[1]).items()}
    assert all(ended[t] for t in done), "a completed trial's MLflow run was not ended"

    with cli_session("tune", [*args, "--resume"], tmp_path, tmp_path / "logs", "resume") as cli:
        code = cli.wait(400)
    assert code == 0, cli.describe()
    assert f"resuming search {name}" in cli.stdout

    rows = table_rows(cli.stdout)
    final = trial_statuses(exp)
    assert len(rows) == samples and {r["trial"] for r in rows} == set(final)
    assert {r["status"] for r in rows} == {"finished"}
    assert set(final.values()) == {"TERMINATED"}
    for trial in done:  # not restarted: no epoch ran again, its files are untouched
        assert f"trial {trial}  epoch" not in cli.stdout, trial
        assert tree_snapshot(trial_dirs(exp)[trial]) == before[trial], trial

    parent, trials = _children(client, "crash")
    assert parent.info.status == "FINISHED"
    runs = _by_trial(trials)
    # A kill between a trial's on_trial_start and Tune's state save leaves a run for a trial
    # the resumed search replaces: it must end KILLED and say why, never look finished.
    orphans = set(runs) - set(final)
    assert set(final) <= set(runs)
    for trial in orphans:
        assert runs[trial].info.status == "KILLED", trial
        assert "bake_ray.orphaned" in runs[trial].data.tags, trial
    runs = {t: r for t, r in runs.items() if t in final}
    for trial, run in runs.items():
        assert run.info.status == "FINISHED", (trial, run.info.status)
        assert _steps(client, run.info.run_id) == [1, 2, 3], trial
        if trial in done:
            assert run.info.end_time == ended[trial], f"{trial} was reopened after the crash"


# --------------------------------------------------------------------------- divergence


@pytest.mark.slow
def test_diverged_trial_fails_cleanly_and_the_search_learns_from_it(tmp_path: Path) -> None:
    """A trial with lr=1e6 turns its loss NaN: its MLflow run is FAILED with the reason in
    ``bake_ray.error``, the table says 'diverged', Optuna records objective 0.0 for it, the
    other trials finish and the search exits 0."""
    space = write_space(
        tmp_path / "space.yaml",
        name="diverge",
        base={**BASE, "epochs": 2},
        space={"optim.lr": {"distribution": "loguniform", "low": 0.01, "high": 1.0e6}},
        initial_points=[{"optim.lr": 1.0e6}, {"optim.lr": 0.05}],
        budget={"num_samples": 3, "max_concurrent": 2},
        scheduler={"type": "none"},
    )
    exp = tmp_path / "results" / "diverge-1"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _tune_args(space, "diverge-1", tmp_path / "results", uri)
    with cli_session("tune", args, tmp_path, tmp_path / "logs", "tune") as cli:
        code = cli.wait(400)
    assert code == 0, cli.describe()

    rows = {r["trial"]: r for r in table_rows(cli.stdout)}
    assert len(rows) == 3
    huge = [t for t, r in rows.items() if r["middle"].startswith("1e+06")]
    assert len(huge) == 1 and rows[huge[0]]["status"] == "diverged", rows
    assert "finished" in {r["status"] for r in rows.values()}

    _, trials = _children(MlflowClient(uri), "diverge")
    for trial, run in _by_trial(trials).items():
        if rows[trial]["status"] == "diverged":
            assert run.info.status == "FAILED", trial
            assert "train loss became" in run.data.tags["bake_ray.error"]
        else:
            assert run.info.status == "FINISHED", trial
            assert "bake_ray.error" not in run.data.tags

    newest = sorted(exp.glob("searcher-state-*.pkl"))[-1]  # this test's own output
    with newest.open("rb") as handle:
        study = pickle.load(handle)["_ot_study"]
    told = {t.params["optim.lr"]: t for t in study.trials}
    assert told[1.0e6].state.name == "COMPLETE" and told[1.0e6].value == 0.0
    assert told[0.05].value > 0.0


@pytest.mark.slow
def test_train_cli_divergence_is_one_line_and_nonzero(tmp_path: Path) -> None:
    """``python -m bake_ray.train --set optim.lr=1e9``: exit 1, one ``error: diverged:`` line."""
    result = subprocess.run(
        [sys.executable, "-m", "bake_ray.train", "--set=optim.lr=1e9", "--set=epochs=2",
         *SMALL_RUN, f"--set=runtime.output_dir={tmp_path}"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: diverged: train loss became"), lines


# --------------------------------------------------------------------------- tracking outage


@pytest.fixture
def forwarder(mlflow_server: str) -> Iterator[TcpForwarder]:
    """A TCP forwarder in front of the session's MLflow server, up at the start."""
    fwd = TcpForwarder(int(mlflow_server.rsplit(":", 1)[1]))
    fwd.start()
    yield fwd
    fwd.stop()


@pytest.mark.slow
def test_mlflow_outage_mid_search_loses_no_metric(
    tmp_path: Path, mlflow_server: str, forwarder: TcpForwarder
) -> None:
    """The tracking server becomes unreachable after the first metric and stays away while a
    trial completes: training goes on (one warning), and once the server is back the
    re-sync from Tune's stored results gives every trial its full metric history and
    final status in MLflow."""
    experiment = f"outage-{uuid.uuid4().hex[:8]}"
    space = write_space(
        tmp_path / "space.yaml", name=experiment, base=BASE, space=OMEGA,
        budget={"num_samples": 3, "max_concurrent": 2}, scheduler={"type": "none"},
    )  # fmt: skip
    exp = tmp_path / "results" / "out-1"
    args = _tune_args(space, "out-1", tmp_path / "results", forwarder.uri)
    direct = MlflowClient(mlflow_server)

    def a_metric_logged() -> bool:
        _alive(cli)
        found = direct.get_experiment_by_name(experiment)
        if found is None:
            return False
        runs = direct.search_runs([found.experiment_id], "tags.`bake_ray.role` = 'trial'")
        return any("val_acc" in r.data.metrics for r in runs)

    with cli_session("tune", args, tmp_path, tmp_path / "logs", "tune") as cli:
        wait_for(a_metric_logged, 300, "the first trial metric")
        forwarder.stop()
        done_online = {t for t, s in trial_statuses(exp).items() if s == "TERMINATED"}

        def trial_done_offline() -> list[str]:
            _alive(cli)
            statuses = trial_statuses(exp)
            return [t for t, s in statuses.items() if s == "TERMINATED" and t not in done_online]

        done_offline = wait_for(trial_done_offline, 300, "a trial completing during the outage")
        _, trials = _children(direct, experiment)
        offline = _by_trial(trials)[done_offline[0]]
        assert offline.info.status == "RUNNING"  # its last epochs and end are not in MLflow yet
        forwarder.start()
        code = cli.wait(400)
    assert code == 0, cli.describe()
    assert "MLflow write failed" in cli.stderr  # the driver saw the outage and went on

    rows = {r["trial"]: r for r in table_rows(cli.stdout)}
    parent, trials = _children(direct, experiment)
    runs = _by_trial(trials)
    assert parent.info.status == "FINISHED" and set(runs) == set(rows)
    for trial, run in runs.items():
        assert run.info.status == "FINISHED", trial
        assert "bake_ray.incomplete" not in run.data.tags, trial
        assert _steps(direct, run.info.run_id) == [1, 2, 3], trial
        assert _steps(direct, run.info.run_id, "train_loss") == [1, 2, 3], trial


@pytest.mark.slow
def test_mlflow_reply_lost_after_a_write_is_not_logged_twice(
    mlflow_server: str, forwarder: TcpForwarder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stores a metric batch but its reply is lost (connection dropped): the
    re-sync from the trial's stored results must not add the epoch a second time."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    tracker = SearchTracker(
        f"lost-reply-{uuid.uuid4().hex[:8]}", "s-lost", forwarder.uri, quiet_s=0
    )
    tracker.start_trial("a", {"bake": {"omega": 0.5}})
    tracker.log_trial_metrics("a", {"val_acc": 0.1}, step=1)
    forwarder.cut_replies = True
    tracker.log_trial_metrics("a", {"val_acc": 0.2}, step=2)  # stored, but no reply
    forwarder.cut_replies = False
    time.sleep(0.01)  # a later write happens at a later millisecond; that must not matter
    tracker.log_trial_metrics("a", {"val_acc": 0.3}, step=3)
    stored = [{"epoch": e, "val_acc": 0.1 * e} for e in (1, 2, 3)]  # Tune's copy
    assert tracker.sync_trial("a", {"bake": {"omega": 0.5}}, stored, ("FINISHED", None, None))
    assert tracker.close_all() == []
    client = MlflowClient(mlflow_server)
    assert _steps(client, trial_run_id(tracker, "a")) == [1, 2, 3]


# --------------------------------------------------------------------------- disk

_SAVE_BIG = """
import sys, torch
from bake_ray.core import checkpoint as ckpt
state = ckpt.load(sys.argv[1])
state["epoch"] = 3
state["model"]["zz_padding"] = torch.randn(96 * 1024 * 1024)  # ~400 MB: a slow save
print("saving", flush=True)
ckpt.atomic_save(state, sys.argv[2])
print("saved", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("target", ["new_epoch", "overwrite"])
def test_kill_during_checkpoint_save_keeps_the_last_good_one(tmp_path: Path, target: str) -> None:
    """SIGKILL a process while ``atomic_save`` writes a big checkpoint, either a new epoch's
    or over an existing one: no checkpoint file is ever partial (the old one stays, the
    temp file is ignored), and ``--resume`` continues from the last good epoch."""
    assert train_main(
        ["--set=epochs=2", *SMALL_RUN, f"--set=runtime.output_dir={tmp_path}",
         "--set=runtime.run_name=r"]
    ) == 0  # fmt: skip
    run = tmp_path / "r"
    epochs = run / "checkpoints"
    victim = epochs / ("epoch_0003" if target == "new_epoch" else "epoch_0002") / "checkpoint.pt"
    old = victim.read_bytes() if victim.exists() else None

    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVE_BIG, str(epochs / "epoch_0002"), str(victim)],
        cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "saving"
        temps = wait_for(
            lambda: [p for p in victim.parent.glob(".checkpoint.pt.*.tmp") if p.stat().st_size],
            120, "the temporary checkpoint file", interval_s=0.002,
        )  # fmt: skip
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert temps[0].exists(), "the save had finished: the kill did not land mid-save"

    if old is None:
        assert not victim.exists()
    else:
        assert victim.read_bytes() == old  # the previous checkpoint is intact
    assert ckpt.load(epochs / "epoch_0002")["epoch"] == 2
    assert ckpt.latest_good(run) == epochs / "epoch_0002" / "checkpoint.pt"

    assert train_main(["--resume", str(run), "--set=epochs=3"]) == 0
    final = ckpt.load(epochs / "epoch_0003")
    assert final["epoch"] == 3 and "zz_padding" not in final["model"]
    assert [int(h["epoch"]) for h in final["history"]] == [1, 2, 3]
