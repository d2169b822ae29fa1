"""Interrupt and resume as a user meets them, with real processes, Ray, Optuna and MLflow:
Ctrl-C (SIGINT) on ``python -m bake_ray.tune`` and ``python -m bake_ray.train``, ``--resume``
without ``--config`` or ``--name``, resuming a finished search, ASHA's decisions across a
driver restart, ``train --resume`` with more epochs, and no temporary folder left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from reliability_helpers import (
    cli_session,
    table_rows,
    tree_snapshot,
    trial_statuses,
    wait_for,
    write_space,
)

from bake_ray.core import config as cfg
from bake_ray.core.engine import lr_factor

EPOCHS = 4
#: Four trials one after the other (so ASHA sees results in one order), ASHA from epoch 1.
SPACE = {
    "name": "irsearch",
    "base": {
        "epochs": EPOCHS,
        "data": {"dataset": "digits", "batch_size": 32, "same_class": 1, "train_subset": 256},
        "optim": {"schedule": "constant"},
    },
    "space": {"bake.omega": {"distribution": "uniform", "low": 0.0, "high": 0.9}},
    "budget": {"num_samples": 4, "max_concurrent": 1},
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "seed": 0,
}
_EPOCH_LINE = re.compile(r"^trial (\w+)  epoch (\d+)/", re.MULTILINE)
_ENDED_LINE = re.compile(r"^trial (\w+)  (done|stopped early by ASHA)", re.MULTILINE)


def _outcome(stdout: str) -> list[tuple[str, str, str]]:
    """(omega, epochs, status) per trial, in sampling order (trial ids differ per search)."""
    rows = table_rows(stdout)
    return sorted((r["middle"].split()[0], r["middle"].split()[-1], r["status"]) for r in rows)


def _runs(client: MlflowClient, experiment: str) -> tuple[Any, list[Any]]:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, experiment
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("bake_ray.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("bake_ray.role") == "trial"]
    return parents, trials


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mid_trial(stdout: str) -> bool:
    """A trial has ended and a later one has reported an epoch without ending yet."""
    ended = [m.group(1) for m in _ENDED_LINE.finditer(stdout)]
    started = [m.group(1) for m in _EPOCH_LINE.finditer(stdout)]
    return bool(ended) and bool(started) and started[-1] not in ended


@pytest.mark.slow
def test_sigint_mid_search_then_resume_matches_the_uninterrupted_search(tmp_path: Path) -> None:
    """SIGINT mid-search: exit 130, the bake-ray resume command, unfinished trials and the
    parent KILLED in MLflow with a resume tag, no best config. ``--resume`` with neither
    ``--config`` nor ``--name`` (from another folder) finds it, logs into its own experiment,
    and ends with the same trials stopped by ASHA at the same epochs as the same search run
    without interruption. Resuming the finished search changes no byte. No temporary folder
    is left in TMPDIR by any of the four commands."""
    space = write_space(tmp_path / "space.yaml", **SPACE)
    storage, db = tmp_path / "results", tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    tmp = tmp_path / "tmp"  # TMPDIR of every command: must end as empty as it started
    tmp.mkdir()
    env = {"TMPDIR": str(tmp), "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp/ray")}
    logs = tmp_path / "logs"
    base = ["--config", str(space), "--storage", str(storage), "--tracking-uri", uri]

    with cli_session("tune", [*base, "--name", "whole"], tmp_path, logs, "whole", **env) as cli:
        assert cli.wait(600) == 0, cli.describe()
    whole = _outcome(cli.stdout)
    assert {status for *_, status in whole} >= {"finished", "stopped"}, cli.stdout

    with cli_session("tune", [*base, "--name", "cut"], tmp_path, logs, "cut", **env) as cli:
        wait_for(lambda: cli.proc.poll() is not None or _mid_trial(cli.stdout), 600, "a trial")
        os.kill(cli.pid, signal.SIGINT)
        code = cli.wait(300)
    assert code == 130, cli.describe()
    command = f"python -m bake_ray.tune --resume --name cut --storage {storage}"
    assert cli.stderr.strip().splitlines()[-1] == f"interrupted; resume with: {command}"
    assert "Tuner.restore" not in cli.stdout + cli.stderr
    assert not (storage / "cut" / "best_config.yaml").exists()
    interrupted = {r["trial"] for r in table_rows(cli.stdout) if r["status"] == "interrupted"}
    client = MlflowClient(uri)
    parents, trials = _runs(client, "irsearch")
    cut = next(p for p in parents if p.info.run_name == "cut")
    assert cut.info.status == "KILLED"
    assert command in cut.data.tags["bake_ray.interrupted"]
    cut_trials = {
        t.data.tags["bake_ray.trial_id"]: t
        for t in trials
        if t.data.tags.get("mlflow.parentRunId") == cut.info.run_id
    }
    assert interrupted <= set(cut_trials)
    for trial_id in interrupted:
        assert cut_trials[trial_id].info.status == "KILLED", trial_id
        assert command in cut_trials[trial_id].data.tags["bake_ray.interrupted"]
    for run in cut_trials.values():  # FINISHED short of the last epoch: only if ASHA stopped it
        if run.info.status == "FINISHED" and run.data.metrics["epoch"] != EPOCHS:
            assert run.data.tags.get("bake_ray.stopped_early") == "asha", run.info.run_name
    assert len(table_rows(cli.stdout)) < SPACE["budget"]["num_samples"] or interrupted

    elsewhere = tmp_path / "elsewhere"  # no space file, no default experiment here
    elsewhere.mkdir()
    resume = ["--resume", "--storage", str(storage)]
    with cli_session("tune", resume, elsewhere, logs, "resume", **env) as cli:
        code = cli.wait(600)
    assert code == 0, cli.describe()
    assert "resuming the newest unfinished search" in cli.stdout and ": cut (" in cli.stdout
    assert "4 trials, 1 at a time, 4 epochs max" in cli.stdout
    assert _outcome(cli.stdout) == whole, "ASHA stopped other trials after the resume"
    assert (storage / "cut" / "best_config.yaml").is_file()
    assert client.get_experiment_by_name("digits-bake") is None
    parents, trials = _runs(client, "irsearch")
    assert len(parents) == 2
    for run in [*parents, *trials]:
        assert run.info.status in ("FINISHED", "KILLED"), run.info
        assert "bake_ray.interrupted" not in run.data.tags, run.info.run_name

    before = (tree_snapshot(storage), _digest(db), trial_statuses(storage / "whole"))
    again = ["--resume", "--name", "whole", *base]
    with cli_session("tune", again, tmp_path, logs, "again", **env) as cli:
        code = cli.wait(300)
    assert code == 0, cli.describe()
    assert "search whole already finished; nothing to resume" in cli.stdout
    assert _outcome(cli.stdout) == whole
    assert (tree_snapshot(storage), _digest(db), trial_statuses(storage / "whole")) == before

    with cli_session(
        "tune", [*base, "--resume", "--name", "cut", "--set", "budget.num_samples=9"],
        tmp_path, logs, "conflict", **env,
    ) as cli:  # fmt: skip
        code = cli.wait(300)
    assert code == 2, cli.describe()
    assert cli.stderr.strip().startswith("error: --resume: --config")
    assert "conflicts with the stored search cut (budget" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1
    assert sorted(tmp.iterdir()) == [], "a command left temporary folders behind"


@pytest.mark.slow
def test_ctrl_c_in_train_then_resume_with_more_epochs_keeps_the_schedule(tmp_path: Path) -> None:
    """SIGINT mid-run: exit 130 and one line with the resume command. ``--resume`` with a
    new ``epochs`` is refused in one line naming ``--extend-schedule``; with it, one line says
    how the schedule is extended, and the extra epochs train at the old schedule's final lr
    (no jump back up)."""
    runs, name, epochs = tmp_path / "runs", "r1", 6
    args = [
        f"--set=epochs={epochs}", "--set=optim.schedule=step", "--set=data.train_subset=1024",
        "--set=data.batch_size=32", f"--set=runtime.output_dir={runs}",
        f"--set=runtime.run_name={name}",
    ]  # fmt: skip
    run_dir = runs / name
    logs = tmp_path / "logs"
    with cli_session("train", args, tmp_path, logs, "first") as cli:
        wait_for(lambda: cli.proc.poll() is not None or "epoch   2/" in cli.stdout, 300, "epoch 2")
        os.kill(cli.pid, signal.SIGINT)
        code = cli.wait(120)
    assert code == 130, cli.describe()
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1, cli.stderr
    assert re.fullmatch(
        rf"interrupted after epoch \d/{epochs}; resume with: "
        rf"python -m bake_ray.train --resume {re.escape(str(run_dir))}",
        lines[0],
    ), lines[0]

    more = ["--resume", str(run_dir), "--set=epochs=9"]
    with cli_session("train", more, tmp_path, logs, "refused") as cli:
        assert cli.wait(120) == 2, cli.describe()
    assert len(cli.stderr.strip().splitlines()) == 1
    assert "--extend-schedule" in cli.stderr and cli.stderr.startswith("error: epochs: 6 -> 9")

    with cli_session("train", [*more, "--extend-schedule"], tmp_path, logs, "extend") as cli:
        assert cli.wait(300) == 0, cli.describe()
    assert "epochs 6 -> 9: the step schedule keeps its 6-epoch layout; epochs 7-9" in cli.stdout
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {int(h["epoch"]) for h in history} == set(range(1, 10))
    optim = cfg.load(run_dir / "config.yaml").optim
    assert optim.schedule_epochs == epochs
    last_step = {int(h["epoch"]): h["lr"] for h in history}  # lr of each epoch's last step
    final = optim.lr * lr_factor(epochs, 1, epochs, optim)
    for epoch in (7, 8, 9):
        assert last_step[epoch] == pytest.approx(final), (epoch, last_step)
    assert last_step[epochs] == pytest.approx(final)


# --------------------------------------------------------------------------- fast checks


def test_resume_picks_the_newest_unfinished_search_whatever_its_space(tmp_path: Path) -> None:
    """Beside the real runs above: which stored search ``--resume`` takes, and the one-line
    reason a differing setting is refused."""
    from bake_ray.core import search_space as ss
    from bake_ray.tune import record as rec

    space = ss.parse(SPACE)
    other = ss.parse({**SPACE, "name": "other", "seed": 3})
    storage = str(tmp_path)
    for name, sp, status, created in [
        ("a", space, rec.INTERRUPTED, 1.0),
        ("b", other, rec.RUNNING, 2.0),  # a driver killed without a word
        ("c", space, rec.FINISHED, 3.0),
    ]:
        record = rec.SearchRecord(name, sp.name, "sqlite:////x.db", None, rec.resolved_raw(sp))
        record.status, record.created = status, created
        rec.save(f"{storage}/{name}", record)
    (tmp_path / "not-a-search").mkdir()
    name, record = rec.newest_unfinished(storage)
    assert (name, record.experiment, record.status) == ("b", "other", rec.RUNNING)
    assert record.search_space() == other  # rebuilt from the record alone
    assert rec.first_difference(space, other) == "name: stored 'irsearch', given 'other'"
    changed = ss.parse(SPACE, overrides=["optim.lr=0.1"])
    assert rec.first_difference(space, changed) == "base optim.lr: stored 0.05, given 0.1"
    more = ss.parse(SPACE, overrides=["budget.num_samples=9"])
    assert rec.first_difference(space, more) == "budget.num_samples: stored 4, given 9"
    assert rec.first_difference(space, ss.parse(SPACE)) is None


def test_asha_rungs_and_decisions_survive_unpickling(tmp_path: Path) -> None:
    """Beside the real search above: a ResumableASHA restored the way Tune restores it
    (unpickled from the state it had when the search started) decides like one that never
    stopped."""
    import pickle
    from types import SimpleNamespace

    from bake_ray.tune.asha import ResumableASHA

    def make() -> ResumableASHA:
        return ResumableASHA(
            str(tmp_path / "asha.state"), time_attr="epoch", max_t=4, grace_period=1,
            reduction_factor=2, metric="val_acc", mode="max",
        )  # fmt: skip

    live = make()
    pickled = pickle.dumps(live)  # what tuner.pkl holds: the scheduler before any result
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(4)]
    for trial in trials:
        live.on_trial_add(None, trial)
    results = [(trials[0], 1, 0.5), (trials[1], 1, 0.2), (trials[0], 2, 0.7)]
    for trial, epoch, acc in results:
        live.on_trial_result(None, trial, {"epoch": epoch, "val_acc": acc})
    restored = pickle.loads(pickled)
    reference = make()  # a fresh scheduler, as Ray's own restore gives
    reference._loaded = True  # (it never reads the state file)
    for trial in trials[2:]:
        restored.on_trial_add(None, trial)
    assert restored.rungs() == live.rungs()
    assert restored.on_trial_result(None, trials[2], {"epoch": 1, "val_acc": 0.1}) == "STOP"
    assert restored._stopped == {"t1": 1.0, "t2": 1.0}
    # Against a scheduler with no memory: it would let the weak trial run on.
    reference.on_trial_add(None, trials[2])
    assert reference.on_trial_result(None, trials[2], {"epoch": 1, "val_acc": 0.1}) == "CONTINUE"
