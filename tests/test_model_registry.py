"""The winner as an MLflow model, for real: a search against a real MLflow server registers
its winner under the experiment's name with alias ``champion``; ``mlflow.pyfunc`` loads it
and gives the test accuracy the search reported; ``mlflow models serve`` answers the same;
``train`` registers without moving ``champion``, or not at all with ``--no-register``; a
server without a registry gets one line; every run records its splits as dataset inputs."""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import servers
import yaml
from mlflow import MlflowClient

from bake_ray import train
from bake_ray.core import config as cfg
from bake_ray.core.serving import raw_test_split
from bake_ray.tracking import lineage
from bake_ray.tracking import model as tracked_model
from bake_ray.tune import cli as bake_tune

EXPERIMENT = "reg-digits"
TRAIN_SET = ["epochs=1", "data.train_subset=256", "data.batch_size=32", "optim.schedule=constant"]


def write_space(path: Path) -> Path:
    """Two trials of two epochs on 256 digits: enough for a winner, cheap on 2 cores."""
    space = {
        "name": EXPERIMENT,
        "base": {
            "epochs": 2,
            "data": {"dataset": "digits", "train_subset": 256, "batch_size": 32},
            "optim": {"schedule": "constant"},
        },
        "space": {"optim.lr": {"distribution": "loguniform", "low": 1e-3, "high": 0.1}},
        "initial_points": [{"optim.lr": 0.05}, {"optim.lr": 0.01}],
        "budget": {"num_samples": 2, "max_concurrent": 1},
        "scheduler": {"type": "none"},
        "seed": 0,
    }
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.fixture(scope="module")
def search(tmp_path_factory, ray_local, mlflow_server):
    """One finished search; its output, and the winner's trial run."""
    tmp = tmp_path_factory.mktemp("registry_search")
    space = write_space(tmp / "space.yaml")
    args = ["--config", str(space), "--storage", str(tmp / "storage"),
            "--tracking-uri", mlflow_server, "--name", "reg-1"]  # fmt: skip
    code, out = _captured(lambda: bake_tune.main(args))
    assert code == 0, out
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("bake_ray.role") == "search")
    winner_id = parent.data.tags["best.trial_id"]
    trials = [r for r in runs if r.data.tags.get("bake_ray.role") == "trial"]
    winner = next(r for r in trials if r.data.tags["bake_ray.trial_id"] == winner_id)
    return {"out": out, "winner": winner, "trials": trials, "client": client}


def _captured(fn):
    """Run ``fn`` and return (its result, what it printed): capsys is function-scoped."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = fn()
    return result, buffer.getvalue()


@pytest.fixture
def tracking_uri(mlflow_server):
    """``models:/`` URIs resolve through the global tracking URI: the server's, for a test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow_server
    mlflow.set_tracking_uri(before)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def _digits_test():
    return raw_test_split(cfg.load(None).data)


@pytest.mark.slow
def test_champion_predicts_the_test_accuracy_the_search_reported(search, tracking_uri):
    client = search["client"]
    version = client.get_model_version_by_alias(EXPERIMENT, "champion")
    assert version.run_id == search["winner"].info.run_id
    # the model links its epoch's metrics without logging them twice
    assert len(client.get_metric_history(version.run_id, "val_acc")) == 2
    assert f'load_model("models:/{EXPERIMENT}@champion")' in search["out"]

    model = mlflow.pyfunc.load_model(f"models:/{EXPERIMENT}@champion")
    images, labels = _digits_test()
    probs = model.predict(images)
    assert probs.shape == (len(labels), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    reported = search["winner"].data.metrics["test_acc_at_best_val"]
    assert int((probs.argmax(axis=1) == labels).sum()) == round(reported * len(labels))


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_same_predictions(search, tracking_uri, tmp_path):
    images, _ = _digits_test()
    batch = images[:16]
    expected = mlflow.pyfunc.load_model(f"models:/{EXPERIMENT}@champion").predict(batch)
    port = servers.free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m",
           f"models:/{EXPERIMENT}@champion", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    # The scoring server execs `uvicorn` from PATH: this venv's, as an activated venv has it.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}
    with servers.serving(cmd, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", env):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": batch.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    np.testing.assert_allclose(np.array(answer["predictions"]), expected, atol=1e-6)


@pytest.mark.slow
def test_trials_of_one_split_share_their_dataset_digests(search):
    digests = [_inputs(t) for t in search["trials"]]
    assert len(digests) == 2 and digests[0] == digests[1]
    train_input = digests[0]["digits-train"]
    assert train_input == ("training", 230)  # 256 less the 10% validation hold-out


@pytest.mark.slow
def test_train_registers_without_moving_champion_and_its_seed_changes_the_digest(
    search, mlflow_server, tmp_path, capsys
):
    client = search["client"]
    champion = client.get_model_version_by_alias(EXPERIMENT, "champion").version
    parent = search["winner"].data.tags["mlflow.parentRunId"]
    run = _train(tmp_path, mlflow_server, "seed1", ["seed=1"], ["--parent-run-id", parent])
    out = capsys.readouterr().out
    assert "champion not moved" in out
    assert client.get_model_version_by_alias(EXPERIMENT, "champion").version == champion
    versions = client.search_model_versions(f"name = '{EXPERIMENT}' and run_id = '{run}'")
    assert len(versions) == 1
    trial, seed1 = _digests(search["trials"][0]), _digests(client.get_run(run))
    assert seed1["digits-test"] == trial["digits-test"]  # the fixed digits test split
    assert seed1["digits-train"] != trial["digits-train"]
    assert seed1["digits-val"] != trial["digits-val"]


@pytest.mark.slow
def test_no_register_logs_the_model_but_adds_no_version(mlflow_server, tmp_path, capsys):
    client = MlflowClient(mlflow_server)
    name = "train-digits"
    before = len(client.search_model_versions(f"name = '{name}'"))
    run = _train(tmp_path, mlflow_server, "noreg", [], ["--no-register"])
    assert "registration is off" in capsys.readouterr().out
    assert len(client.search_model_versions(f"name = '{name}'")) == before
    assert client.get_run(run).outputs.model_outputs  # still logged on the run


@pytest.mark.slow
def test_a_server_without_registry_gets_one_line(tmp_path, capsys):
    root = tmp_path / "server"
    root.mkdir()
    port = servers.free_port()
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--registry-store-uri", "none:///",  # a scheme with no registry store
           "--artifacts-destination", str(root / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    uri = f"http://127.0.0.1:{port}"
    with servers.serving(cmd, f"{uri}/health", root / "server.log", env):
        run = _train(tmp_path, uri, "noregistry", [], [])
        out = capsys.readouterr().out
        lines = [line for line in out.splitlines() if line.startswith("MLflow model:")]
        assert len(lines) == 1 and "has no model registry" in lines[0], out
        assert "Traceback" not in out
        assert MlflowClient(uri).get_run(run).outputs.model_outputs


def test_a_model_that_cannot_be_logged_is_one_warning(tmp_path, caplog):
    broken = tmp_path / "checkpoint.pt"
    broken.write_bytes(b"not a checkpoint")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("broken")).info.run_id
    with caplog.at_level(logging.WARNING, logger="bake_ray.tracking"):
        line = tracked_model.publish(uri, run, broken, cfg.load(None), "broken",
                                     register=True, champion=True)  # fmt: skip
    assert line is None
    messages = [r.getMessage() for r in caplog.records if r.name == "bake_ray.tracking"]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"MLflow model of run {run} not logged: ")
    assert "cannot load checkpoint" in messages[0]


def test_digests_follow_the_split_indices():
    base = cfg.to_dict(cfg.load(None, ["data.train_subset=256"]))
    same = lineage.split_inputs(base)
    again = lineage.split_inputs(json.loads(json.dumps(base)))  # an equal config, not the object
    other = lineage.split_inputs({**base, "seed": 1})
    digest = {i.dataset.name: i.dataset.digest for i in same}
    assert digest == {i.dataset.name: i.dataset.digest for i in again}
    assert digest["digits-val"] != {i.dataset.name: i.dataset.digest for i in other}["digits-val"]
    assert lineage.digest([1, 2, 3]) != lineage.digest([1, 2, 4])


# --------------------------------------------------------------------------- helpers


def _train(tmp: Path, uri: str, name: str, sets: list[str], flags: list[str]) -> str:
    """One ``python -m bake_ray.train`` (in this process); its MLflow run id."""
    overrides = [*TRAIN_SET, f"runtime.output_dir={tmp}", f"runtime.run_name={name}", *sets]
    args = [arg for item in overrides for arg in ("--set", item)]
    assert train.main([*args, "--tracking-uri", uri, *flags]) == 0
    return (tmp / name / "mlflow_run_id").read_text().strip()


def _inputs(run) -> dict[str, tuple[str, int]]:
    """Dataset name -> (context, rows) of a run's dataset inputs."""
    out = {}
    for item in run.inputs.dataset_inputs:
        context = {t.key: t.value for t in item.tags}["mlflow.data.context"]
        out[item.dataset.name] = (context, json.loads(item.dataset.profile)["num_rows"])
    return out


def _digests(run) -> dict[str, str]:
    return {item.dataset.name: item.dataset.digest for item in run.inputs.dataset_inputs}
