"""bake_ray.tracking against a real MLflow server (the session's `mlflow_server`) and sqlite."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from reliability_helpers import TcpForwarder
from tracking_helpers import trial_run_id

from bake_ray import tracking
from bake_ray.tracking import (
    TrackingError,
    check_tracking_reachable,
    config_params,
    default_artifact_location,
    epoch_metrics,
    resolve_tracking_uri,
)
from bake_ray.tracking.search_runs import SearchTracker
from bake_ray.tune.summary import upload_study_plots, write_optuna_plots

CONFIG = {
    "seed": 0,
    "bake": {"temperature": 4.0, "omega": 0.5, "loss_weight": 1.0},
    "optim": {"lr": 0.05, "milestones": [0.5, 0.75]},
    "data": {"dataset": "digits", "data_dir": None},
}


@pytest.fixture(autouse=True)
def _fast_mlflow_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLflow-internal retries: a refused connection must fail at once in these tests."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _runs(client: MlflowClient, experiment_id: str) -> list:
    return client.search_runs([experiment_id], max_results=1000)


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# --------------------------------------------------------------------------- pure helpers


def test_resolve_tracking_uri_precedence_and_absolute_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_tracking_uri(None, cwd=tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///sub/env.db")
    assert resolve_tracking_uri(None, cwd=tmp_path) == f"sqlite:///{tmp_path}/sub/env.db"
    assert resolve_tracking_uri("http://h:5000", cwd=tmp_path) == "http://h:5000"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("runs/m.db", cwd=tmp_path) == f"sqlite:///{tmp_path}/runs/m.db"


def test_default_artifact_location() -> None:
    location = default_artifact_location("sqlite:////data/x/mlflow.db", "bake search/1")
    assert location == "file:///data/x/mlartifacts/bake_search_1"
    assert default_artifact_location("http://127.0.0.1:5000", "e") is None


def test_config_params_flatten_aliases_and_limits() -> None:
    params = config_params({**CONFIG, "note": "x" * 10_000, "we!rd": 1})
    assert params["T"] == "4.0" and "bake.temperature" not in params  # each param once
    assert params["omega"] == "0.5" and params["lambda"] == "1.0"
    assert params["optim.milestones"] == "[0.5, 0.75]"
    assert params["data.data_dir"] == "None"
    assert len(params["note"]) == tracking.MAX_PARAM_VALUE
    assert "we_rd" in params
    # an already-dotted config gives the same params
    assert config_params({"bake.temperature": 4.0})["T"] == "4.0"


def test_config_params_are_logged_once_with_readable_floats() -> None:
    params = config_params({"bake": {"temperature": 3.847291038472}, "optim": {"lr": 1e-6}})
    assert params == {"T": "3.847", "optim.lr": "1e-06"}
    assert config_params({"optim": {"milestones": [0.3333333333, 0.75]}}) == {
        "optim.milestones": "[0.3333, 0.75]"
    }


def test_epoch_metrics_keeps_only_the_engines_numbers() -> None:
    result = {
        "train_loss": 1.5, "val_acc": 0.9, "lr": 0.1, "images_per_s": 1e3, "epoch": 3,
        "pid": 123, "hostname": "h", "node_ip": "1.2.3.4", "time_this_iter_s": 1.0,
        "time_total_s": 2.0, "timestamp": 1, "date": "d", "training_iteration": 4,
        "trial_id": "t", "done": False, "iterations_since_restore": 1,
        "config": {"bake": {"omega": 0.5}}, "config/bake/omega": 0.5,
        "nested": {"acc": 0.5}, "flag": True, "text": "x",
    }  # fmt: skip
    assert epoch_metrics(result) == {
        "train_loss": 1.5, "val_acc": 0.9, "lr": 0.1, "images_per_s": 1e3, "epoch": 3.0,
    }  # fmt: skip
    assert epoch_metrics({"val_acc": True, "test_acc": "0.5"}) == {}


def test_compare_url() -> None:
    url = tracking.compare_runs_url("http://h:5000/", "7", ["b", "a"])
    assert url.startswith("http://h:5000/#/compare-runs?runs=")
    assert "%5B%22a%22%2C%20%22b%22%5D" in url and url.endswith("experiments=%5B%227%22%5D")


# --------------------------------------------------------------------------- reachability


def test_unreachable_server_fails_fast_with_one_line() -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError) as info:
        check_tracking_reachable(uri, timeout_s=2)
    assert uri in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TrackingError, match=r"127\.0\.0\.1"):
        SearchTracker("e", "s", uri)
    assert time.monotonic() - start < 10


def test_sqlite_reachability_creates_the_directory(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/new/dir/mlflow.db"
    check_tracking_reachable(uri)
    assert (tmp_path / "new" / "dir").is_dir()
    with pytest.raises(TrackingError, match="relative"):
        check_tracking_reachable("sqlite:///relative.db")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TrackingError, match="cannot create"):
        check_tracking_reachable(f"sqlite:///{blocker}/sub/mlflow.db")


@pytest.mark.slow
def test_running_server_is_reachable(mlflow_server: str) -> None:
    check_tracking_reachable(mlflow_server)


# --------------------------------------------------------------------------- sqlite default


def test_sqlite_default_uri_artifact_location_and_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(
        lambda t: t.suggest_float("T", 1, 8) - t.suggest_float("omega", 0, 0.9), n_trials=6
    )
    tracker = SearchTracker("sq", "search-1")
    assert tracker.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "plots").mkdir()
    names = upload_study_plots(tracker, study, tmp_path / "plots")
    run_id = tracker.parent_run_id
    assert tracker.close_all() == []
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "sq").as_uri()
    assert sorted(names) == [
        "optimization_history.png", "parallel_coordinate.png", "param_importances.png",
    ]  # fmt: skip
    listed = {Path(a.path).name for a in client.list_artifacts(run_id, "optuna")}
    assert set(names) <= listed
    pngs = list((tmp_path / "mlartifacts" / "sq").rglob("*.png"))
    assert len(pngs) == 3
    assert client.get_run(run_id).info.status == "FINISHED"


def test_optuna_plots_skip_gracefully(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    empty = optuna.create_study()
    written, notes = write_optuna_plots(empty, tmp_path)
    assert written == [] and len(notes) == 3
    one = optuna.create_study()
    one.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    written, notes = write_optuna_plots(one, tmp_path)
    assert [p.name for p in written] == ["optimization_history.png", "parallel_coordinate.png"]
    assert notes and "param_importances" in notes[0]
    multi = optuna.create_study(directions=["minimize", "minimize"])
    assert write_optuna_plots(multi, tmp_path)[0] == []


# --------------------------------------------------------------------------- real server


@pytest.mark.slow
def test_parent_child_nesting_params_metrics_and_statuses(
    mlflow_server: str, tmp_path: Path
) -> None:
    tracker = SearchTracker(_name(), "s1", mlflow_server, run_name="my search")
    tracker.log_search_params({"space": "search_spaces/digits.yaml", "num_samples": 3})
    statuses = {"a": "FINISHED", "b": "KILLED", "c": "FAILED"}
    for trial_id, status in statuses.items():
        tracker.start_trial(trial_id, CONFIG, run_name=f"trial_{trial_id}")
        for epoch in range(3):
            result = {"train_loss": 2.0 - epoch, "val_acc": 0.3 * epoch, "pid": 1, "done": False}
            tracker.log_trial_metrics(trial_id, result, step=epoch)
        error = "Traceback: boom\n" + "x" * 20_000 if status == "FAILED" else None
        tracker.end_trial(trial_id, status, error=error)  # type: ignore[arg-type]
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.pt").write_bytes(b"weights")
    tracker.log_trial_artifacts("a", checkpoint)
    summary = tmp_path / "summary.csv"
    summary.write_text("trial,val_acc\na,0.6\n")
    tracker.log_search_artifact(summary)
    tracker.log_best("a", CONFIG, {"val_acc": 0.6, "hostname": "h"})
    assert tracker.close_all() == []

    client = MlflowClient(mlflow_server)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "my search"
    assert parent.data.params["num_samples"] == "3"
    assert parent.data.metrics == {"best.val_acc": 0.6}
    assert parent.data.tags["best.T"] == "4.0" and parent.data.tags["best.trial_id"] == "a"
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["summary.csv"]
    for trial_id, status in statuses.items():
        run = client.get_run(trial_run_id(tracker, trial_id))
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["mlflow.runName"] == f"trial_{trial_id}"
        assert tags["bake_ray.trial_id"] == trial_id
        assert run.info.status == status
        assert run.data.params["omega"] == "0.5" and run.data.params["lambda"] == "1.0"
        assert "bake.omega" not in run.data.params
        assert set(run.data.metrics) == {"train_loss", "val_acc"}
        assert _steps(client, run.info.run_id, "val_acc") == [0, 1, 2]
    failed = client.get_run(trial_run_id(tracker, "c")).data.tags["bake_ray.error"]
    assert failed.startswith("Traceback: boom") and len(failed) <= tracking.MAX_ERROR_CHARS
    artifacts = client.list_artifacts(trial_run_id(tracker, "a"), "checkpoint")
    assert [a.path for a in artifacts] == ["checkpoint/model.pt"]


@pytest.mark.slow
def test_parent_description_and_winner_params(mlflow_server: str) -> None:
    tracker = SearchTracker(_name(), "s-desc", mlflow_server)
    tracker.log_search_params({"space": "digits", "epochs": 3})
    winner = {"bake.temperature": 2.718281828, "bake.omega": 0.5, "optim.lr": 0.0123456}
    tracker.describe_search("**Winner**: trial a", winner)
    assert tracker.close_all() == []
    parent = MlflowClient(mlflow_server).get_run(tracker.parent_run_id)
    assert parent.data.tags["mlflow.note.content"] == "**Winner**: trial a"
    params = parent.data.params
    assert params["T"] == "2.718" and params["omega"] == "0.5" and params["optim.lr"] == "0.01235"
    assert params["space"] == "digits"  # the search's own params stay beside them


@pytest.mark.slow
def test_resume_reopens_runs_without_duplicates(mlflow_server: str) -> None:
    experiment = _name()
    first = SearchTracker(experiment, "s-resume", mlflow_server)
    for trial_id in ("a", "stale"):
        first.start_trial(trial_id, CONFIG)
        for epoch in range(3):
            first.log_trial_metrics(trial_id, {"val_acc": 0.1 * epoch}, step=epoch)
    first.end_trial("a", "FAILED", error="node died")
    # the driver "crashes": no close_all, so the parent and "stale" stay RUNNING

    second = SearchTracker(experiment, "s-resume", mlflow_server)
    assert second.parent_run_id == first.parent_run_id  # the parent run was reopened
    changed = {**CONFIG, "optim": {"lr": 0.01, "milestones": [0.5, 0.75]}}
    second.start_trial("a", changed)  # a retried trial restarts from its epoch-1 checkpoint
    for epoch in range(1, 5):
        second.log_trial_metrics("a", {"val_acc": 0.1 * epoch, "train_loss": 1.0}, step=epoch)
    second.start_trial("new", CONFIG)
    second.end_trial("a", "FINISHED")
    second.end_trial("new", "KILLED")
    assert second.close_all() == []

    client = MlflowClient(mlflow_server)
    runs = _runs(client, second.experiment_id)
    assert len(runs) == 4  # one parent + a, stale, new: nothing duplicated
    assert not [r for r in runs if r.info.status == "RUNNING"]
    run_a = client.get_run(trial_run_id(second, "a"))
    assert run_a.info.run_id == trial_run_id(first, "a")
    assert _steps(client, run_a.info.run_id, "val_acc") == [0, 1, 2, 3, 4]
    assert _steps(client, run_a.info.run_id, "train_loss") == [1, 2, 3, 4]
    assert run_a.info.status == "FINISHED" and "bake_ray.error" not in run_a.data.tags
    assert run_a.data.params["optim.lr"] == "0.05"  # params are write-once in MLflow
    assert run_a.data.tags["bake_ray.param_conflicts"] == "optim.lr"
    stale = client.get_run(trial_run_id(first, "stale"))
    assert stale.info.status == "FINISHED"
    assert {r.data.tags.get("bake_ray.trial_id") for r in runs} == {None, "a", "stale", "new"}


# --------------------------------------------------------------------------- outages


@pytest.fixture
def proxy(mlflow_server: str) -> Iterator[TcpForwarder]:
    forwarder = TcpForwarder(int(mlflow_server.rsplit(":", 1)[1]))
    forwarder.start()
    yield forwarder
    forwarder.stop()


@pytest.mark.slow
def test_outage_loses_nothing_once_the_trials_are_resynced(
    proxy: TcpForwarder, tmp_path: Path
) -> None:
    uri = f"http://127.0.0.1:{proxy.port}"
    tracker = SearchTracker(_name(), "s-outage", uri, quiet_s=0)
    tracker.start_trial("a", CONFIG)
    tracker.log_trial_metrics("a", {"val_acc": 0.0}, step=0)

    proxy.stop()  # the server goes away mid-search: nothing raises, the search goes on
    tracker.log_trial_metrics("a", {"val_acc": 0.1}, step=1)
    tracker.start_trial("b", CONFIG)  # even a run that does not exist yet
    tracker.log_trial_metrics("b", {"val_acc": 0.5}, step=0)
    tracker.log_trial_metrics("a", {"val_acc": 0.2}, step=2)

    proxy.start()  # back: the live write goes through, the re-syncs fill in the rest
    assert trial_run_id(tracker, "b") is None  # its run was never created
    tracker.log_trial_metrics("a", {"val_acc": 0.3}, step=3)
    stored_a = [{"epoch": e, "val_acc": 0.1 * e, "pid": 1} for e in range(4)]  # Tune's copy
    assert tracker.sync_trial("a", CONFIG, stored_a)
    assert tracker.sync_trial("b", CONFIG, [{"epoch": 0, "val_acc": 0.5}])
    client = MlflowClient(uri)
    assert _steps(client, trial_run_id(tracker, "a"), "val_acc") == [0, 1, 2, 3]
    assert _steps(client, trial_run_id(tracker, "b"), "val_acc") == [0]
    assert client.get_run(trial_run_id(tracker, "b")).data.params["omega"] == "0.5"

    # a hopeless write (the checkpoint vanished) is reported, never retried
    assert not tracker.log_trial_artifacts("b", tmp_path / "missing")
    tracker.end_trial("a")
    assert tracker.close_all() == ["trial b"]
    assert client.get_run(trial_run_id(tracker, "b")).data.tags["bake_ray.incomplete"] == "true"
    assert client.get_run(trial_run_id(tracker, "a")).info.status == "FINISHED"
    assert "bake_ray.incomplete" not in client.get_run(trial_run_id(tracker, "a")).data.tags


@pytest.mark.slow
def test_resync_ends_a_trial_once_and_keeps_its_end_time(mlflow_server: str) -> None:
    """A trial whose end was lost ends at the re-sync; a second re-sync changes nothing."""
    tracker = SearchTracker(_name(), "s-resync", mlflow_server)
    tracker.start_trial("a", CONFIG)
    stored = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.6}]
    stopped = ("FINISHED", None, {"bake_ray.stopped_early": "asha"})
    assert tracker.sync_trial("a", CONFIG, stored, stopped)
    client = MlflowClient(mlflow_server)
    first = client.get_run(trial_run_id(tracker, "a"))
    assert first.info.status == "FINISHED" and first.data.tags["bake_ray.stopped_early"] == "asha"
    assert tracker.sync_trial("a", CONFIG, stored, stopped)
    again = client.get_run(trial_run_id(tracker, "a"))
    assert again.info.end_time == first.info.end_time
    assert _steps(client, again.info.run_id, "val_acc") == [1, 2]


@pytest.mark.slow
def test_outage_until_the_end_is_reported(proxy: TcpForwarder) -> None:
    uri = f"http://127.0.0.1:{proxy.port}"
    name = _name()
    tracker = SearchTracker(name, "s-down", uri, quiet_s=0)
    tracker.start_trial("a", CONFIG)
    proxy.stop()
    tracker.log_trial_metrics("a", {"val_acc": 0.5}, step=0)
    assert tracker.close_all() == ["search", "trial a"]

    # the next session of the same search (server back) closes what was left RUNNING
    proxy.start()
    again = SearchTracker(name, "s-down", uri)
    assert again.parent_run_id == tracker.parent_run_id
    assert again.close_all("KILLED") == []
    runs = _runs(MlflowClient(uri), again.experiment_id)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}


@pytest.mark.slow
def test_trials_the_resumed_search_no_longer_has_end_killed_and_tagged(mlflow_server: str) -> None:
    """A driver killed before Tune saved a trial leaves its run behind: it must not look done."""
    experiment = _name()
    first = SearchTracker(experiment, "s-orphan", mlflow_server)
    for trial_id in ("kept", "forgotten"):
        first.start_trial(trial_id, CONFIG)
        first.log_trial_metrics(trial_id, {"val_acc": 0.5}, step=1)
    # the driver dies here; the resumed search only knows "kept" (and a new "fresh" trial)
    second = SearchTracker(experiment, "s-orphan", mlflow_server)
    for trial_id in ("kept", "fresh"):
        second.start_trial(trial_id, CONFIG)
        second.end_trial(trial_id, "FINISHED")
    second.end_orphaned_trials(["kept", "fresh"])
    assert second.close_all() == []
    client = MlflowClient(mlflow_server)
    runs = {
        r.data.tags[tracking.TAG_TRIAL_ID]: r
        for r in _runs(client, second.experiment_id)
        if tracking.TAG_TRIAL_ID in r.data.tags
    }
    assert {t: r.info.status for t, r in runs.items()} == {
        "kept": "FINISHED",
        "fresh": "FINISHED",
        "forgotten": "KILLED",
    }
    assert "replaced it" in runs["forgotten"].data.tags[tracking.TAG_ORPHANED]
    assert _steps(client, runs["forgotten"].info.run_id, "val_acc") == [1]  # its data stay


# --------------------------------------------------------------------------- train CLI


def test_train_cli_logs_one_run_under_a_search(tmp_path: Path) -> None:
    """``python -m bake_ray.train --parent-run-id``: one child run in the search's
    experiment, its config as params, every epoch at step = epoch, the best checkpoint,
    FINISHED. Every number the engine reports is a logged metric (none silently dropped)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    search = SearchTracker("retrain", "s-retrain", uri)
    args = ["--set=epochs=2", "--set=optim.schedule=constant", "--set=data.train_subset=256",
            "--set=data.batch_size=32", "--set=runtime.output_dir=out", "--set=runtime.run_name=r",
            "--tracking-uri", uri, "--parent-run-id", search.parent_run_id]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [sys.executable, "-m", "bake_ray.train", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs(
        [search.experiment_id], f"tags.`mlflow.parentRunId` = '{search.parent_run_id}'"
    )
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params["T"] == "4.0" and run.data.params["epochs"] == "2"
    assert _steps(client, run.info.run_id, "val_acc") == [1, 2]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == [
        "checkpoint/checkpoint.pt"
    ]
    lines = (tmp_path / "out" / "r" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    reported = {k for row in rows for k, v in row.items() if isinstance(v, (int, float))}
    assert reported <= set(tracking.EPOCH_METRICS), reported - set(tracking.EPOCH_METRICS)
    assert set(run.data.metrics) == reported


def test_trial_callback_pickles_without_its_client(tmp_path: Path) -> None:
    """Tune stores callbacks in tuner.pkl: the MLflow callback travels as names and a URI,
    and after a restore its tracker finds the same parent run again."""
    import pickle

    from bake_ray.tune.callbacks import MlflowTrialCallback

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = {"epochs": 3}  # the trials' shared config travels with the callback
    callback = MlflowTrialCallback("pickled", "s-pickle", uri, 3, str(tmp_path / "storage"), base)
    first = callback.tracker
    assert first is not None
    restored = pickle.loads(pickle.dumps(callback))
    assert restored._tracker is None and restored.base == base
    assert restored.tracker is not None and restored.tracker is not first
    assert restored.tracker.parent_run_id == first.parent_run_id


def test_trial_outcomes_share_one_vocabulary() -> None:
    from bake_ray.tune.summary import trial_outcome

    done = trial_outcome({"epoch": 3}, 3)
    assert (done.word, done.status, done.tags) == ("finished", "FINISHED", None)
    stopped = trial_outcome({"epoch": 1}, 3)
    assert (stopped.word, stopped.status) == ("stopped", "FINISHED")
    assert stopped.tags == {"bake_ray.stopped_early": "asha", "bake_ray.epochs_run": "1"}
    assert stopped.label == "stopped early by ASHA after epoch 1/3"
    diverged = trial_outcome({"epoch": 1, "diverged": 1.0, "error": "nan"}, 3)
    assert (diverged.word, diverged.status, diverged.error) == ("diverged", "FAILED", "nan")
    error = trial_outcome({"epoch": 2}, 3, "boom")
    assert (error.word, error.status, error.label) == ("error", "FAILED", "error: boom")
