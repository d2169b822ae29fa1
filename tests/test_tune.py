"""Real searches: local Ray, real Optuna, a real MLflow server, checked through MlflowClient."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from bake_ray.core import config as cfg
from bake_ray.core.data import build_splits
from bake_ray.tune import cli as bake_tune

pytestmark = pytest.mark.slow

SMALL_BASE = {
    "epochs": 3,
    "data": {"dataset": "digits", "train_subset": 400, "batch_size": 32},
    "optim": {"schedule": "constant"},
}


def write_space(path: Path, **changes: object) -> Path:
    """A tiny search: a good paper-default point, then a hopeless one ASHA must stop."""
    space = {
        "name": "tiny",
        "base": SMALL_BASE,
        "space": {
            "bake.temperature": {"distribution": "uniform", "low": 1.0, "high": 8.0},
            "bake.omega": {"distribution": "uniform", "low": 0.0, "high": 0.9},
            "bake.loss_weight": {"distribution": "loguniform", "low": 0.1, "high": 10.0},
            "optim.lr": {"distribution": "loguniform", "low": 1e-6, "high": 0.1},
        },
        "initial_points": [
            {"bake.temperature": 4.0, "bake.omega": 0.5, "bake.loss_weight": 1.0, "optim.lr": 0.05},
            {"bake.temperature": 2.0, "bake.omega": 0.1, "bake.loss_weight": 1.0, "optim.lr": 1e-6},
        ],
        "budget": {"num_samples": 3, "max_concurrent": 1},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "seed": 0,
    }
    space.update(changes)
    path.write_text(yaml.safe_dump(space))
    return path


def run_search(tmp_path: Path, space: Path, uri: str, name: str) -> int:
    return bake_tune.main(
        [
            "--config",
            str(space),
            "--storage",
            str(tmp_path / "storage"),
            "--tracking-uri",
            uri,
            "--name",
            name,
        ]
    )


def runs_of(client: MlflowClient, experiment: str) -> tuple[object, list]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("bake_ray.role") == "search"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def test_search_records_everything_in_mlflow(tmp_path, ray_local, mlflow_server, capsys):
    space = write_space(tmp_path / "space.yaml")
    assert run_search(tmp_path, space, mlflow_server, "tiny-1") == 0
    out = capsys.readouterr().out

    client = MlflowClient(mlflow_server)
    parent, children = runs_of(client, "tiny")
    assert parent.info.status == "FINISHED"
    assert len(children) == 3
    assert {c.info.status for c in children} == {"FINISHED"}  # stopped early is no failure
    assert all(c.info.status != "RUNNING" for c in children)

    by_lr = {float(c.data.params["optim.lr"]): c for c in children}
    good, hopeless = by_lr[0.05], by_lr[1e-6]
    assert good.data.params["T"] == "4.0" and good.data.params["omega"] == "0.5"
    assert good.data.params["lambda"] == "1.0" and "bake.omega" not in good.data.params
    assert good.data.params["data.train_subset"] == "400"  # every resolved value is a param
    assert good.info.status == "FINISHED"
    assert hopeless.info.status == "FINISHED"  # ASHA stopped it at the first rung: tagged
    assert hopeless.data.tags["bake_ray.stopped_early"] == "asha"
    assert hopeless.data.tags["bake_ray.epochs_run"] == "1"
    assert "bake_ray.stopped_early" not in good.data.tags

    history = client.get_metric_history(good.info.run_id, "val_acc")
    assert sorted(m.step for m in history) == [1, 2, 3]
    for key in ("train_loss", "train_ce", "train_kd", "test_acc", "lr", "images_per_s"):
        assert len(client.get_metric_history(good.info.run_id, key)) == 3, key
    assert not any(k.startswith(("time_", "config/")) or k == "pid" for k in good.data.metrics)
    killed_steps = [m.step for m in client.get_metric_history(hopeless.info.run_id, "val_acc")]
    assert killed_steps == [1]

    artifacts = [a.path for a in client.list_artifacts(good.info.run_id, "checkpoint")]
    assert "checkpoint/checkpoint.pt" in artifacts
    plots = [a.path for a in client.list_artifacts(parent.info.run_id, "optuna")]
    assert {"optuna/optimization_history.png", "optuna/parallel_coordinate.png"} <= set(plots)
    assert parent.data.metrics["best.val_acc"] > 0.5

    best = tmp_path / "storage" / "tiny-1" / "best_config.yaml"
    loaded = cfg.load(best)
    assert loaded.optim.lr == 0.05 and loaded.runtime.workers == 0 and loaded.epochs == 3
    assert "rank" in out and "stopped" in out and "mlflow ui --backend-store-uri" in out
    check_honest_ranking(client, parent, children, loaded, out)


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval, written out here to check bake-ray's (scipy's) values."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return centre - half, centre + half


def check_honest_ranking(client, parent, children, best_config, out: str) -> None:
    """Every accuracy with its n and 95% interval, in the table, MLflow and the summary; the
    parent describes the winner and holds its searched values; each param once, 4 digits."""
    n = len(build_splits(best_config.data, best_config.seed).val)
    for child in children:
        run = child.info.run_id
        steps = [m.step for m in client.get_metric_history(run, "val_acc")]
        for key in ("val_n", "val_loss", "best_val_acc_lo", "best_val_acc_hi"):
            assert [m.step for m in client.get_metric_history(run, key)] == steps, key
        assert child.data.metrics["val_n"] == n
        correct = round(child.data.metrics["best_val_acc"] * n)
        low, high = wilson(correct, n)
        assert child.data.metrics["best_val_acc_lo"] == pytest.approx(low, abs=1e-6)
        assert child.data.metrics["best_val_acc_hi"] == pytest.approx(high, abs=1e-6)
        assert f"{correct}/{n}" in out and f"{low:.4f}-{high:.4f}" in out
        for key in ("T", "omega", "lambda", "optim.lr"):
            value = float(child.data.params[key])
            assert value == float(f"{value:.4g}"), (key, child.data.params[key])
        assert not {"bake.temperature", "bake.omega", "bake.loss_weight"} & set(child.data.params)
    winner = parent.data.tags["best.trial_id"]
    best = next(c for c in children if c.data.tags["bake_ray.trial_id"] == winner)
    for key in ("T", "omega", "lambda", "optim.lr"):
        assert parent.data.params[key] == best.data.params[key], key
    assert parent.data.metrics["best.val_n"] == n
    assert parent.data.metrics["best.val_acc_lo"] == best.data.metrics["best_val_acc_lo"]
    note = parent.data.tags["mlflow.note.content"]
    assert f"**Winner**: trial {winner}" in note and "**Runner-up**" in note
    assert "**Margin**" in note and "95% interval" in note
    assert "95% interval" in out and "correct/n" in out
    assert "the leader's 95% interval" in out and f"{n} validation images" in out


def test_search_with_two_ray_train_workers_per_trial(tmp_path, ray_local, mlflow_server):
    space = write_space(
        tmp_path / "space.yaml",
        name="ddp",
        base={**SMALL_BASE, "epochs": 2},
        initial_points=[],
        budget={"num_samples": 2, "max_concurrent": 1, "workers_per_trial": 2},
        scheduler={"type": "none"},
    )
    assert run_search(tmp_path, space, mlflow_server, "ddp-1") == 0
    client = MlflowClient(mlflow_server)
    _, children = runs_of(client, "ddp")
    assert len(children) == 2
    best = cfg.load(tmp_path / "storage" / "ddp-1" / "best_config.yaml")
    val_n = len(build_splits(best.data, best.seed).val)  # every shard counted once
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["runtime.workers"] == "2"
        assert child.data.params["bake.global_ensembling"] == "True"
        assert child.data.metrics["val_n"] == val_n
        assert [m.step for m in client.get_metric_history(child.info.run_id, "epoch")] == [1, 2]
        assert "checkpoint/checkpoint.pt" in [
            a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")
        ]
    train_runs = list((tmp_path / "storage" / "ddp-1" / "train_runs").iterdir())
    assert len(train_runs) == 2  # one Ray Train run per trial, named by trial id
