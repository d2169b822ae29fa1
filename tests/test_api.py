"""``bake_ray.api``: the commands as Python functions returning DataFrames, validated and
recorded exactly as their command lines (which call them), and Ray's console output kept
off the terminal unless ``--verbose``."""

from __future__ import annotations

import inspect
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from bake_ray import api
from bake_ray import train as train_cli
from bake_ray.compare import cli as compare_cli
from bake_ray.core import config as cfg
from bake_ray.scale import quiet
from bake_ray.tune import cli as tune_cli

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPACE = str(REPO / "search_spaces" / "default.yaml")
#: The default search, small: 4 trials one at a time, 2 epochs on 200 digits.
SMALL = {
    "budget.num_samples": 4,
    "budget.max_concurrent": 1,
    "base.epochs": 2,
    "base.data.train_subset": 200,
    "scheduler.grace_period": 1,
}
_TABLE_LINE = re.compile(r"^\s+(\d+)\s+([0-9a-f]{8})\s", re.MULTILINE)


# --------------------------------------------------------------------------- no compute


@pytest.mark.parametrize(
    ("function", "parse_args"),
    [
        (api.tune, tune_cli.parse_args),
        (api.compare, compare_cli.parse_args),
        (api.train, train_cli.parse_args),
    ],
)
def test_every_flag_is_a_keyword_with_the_same_default(function, parse_args) -> None:
    """The command line calls the function with its flags as keywords: a flag without a
    keyword (or with another default) would be a drift between the two."""
    flags = vars(parse_args([]))
    params = inspect.signature(function).parameters
    assert set(flags) == set(params), set(flags) ^ set(params)
    for name, value in flags.items():
        default = params[name].default
        assert (list(default) if isinstance(default, tuple) else default) == value, name


def test_override_dicts_read_back_as_the_values_given() -> None:
    given = {
        "bake.omega": 0.7,
        "model.name": "small_cnn",
        "optim.milestones": [0.5, 0.75],
        "runtime.run_name": "4",  # a text that looks like a number stays a text
        "data.train_subset": None,
        "optim.nesterov": True,
    }
    texts = cfg.override_texts(given)
    assert dict(cfg.parse_override(t) for t in texts) == given
    assert cfg.override_texts(["a.b=1"]) == ["a.b=1"]  # --set texts pass through


_BAD = [
    (api.tune, {"config": DEFAULT_SPACE, "overrides": {"base.epochs": 0}},
     ["--config", DEFAULT_SPACE, "--set", "base.epochs=0"]),
    (api.tune, {"overrides": {"bake.omega": 0.3}}, ["--set", "bake.omega=0.3"]),
    (api.tune, {"resume": True, "storage": "/nonexistent/storage"},
     ["--resume", "--storage", "/nonexistent/storage"]),
    (api.train, {"overrides": {"bake.omega": 1.5}}, ["--set", "bake.omega=1.5"]),
    (api.train, {"config": DEFAULT_SPACE}, ["--config", DEFAULT_SPACE]),
    (api.compare, {"seeds": 1}, ["--seeds", "1"]),
    (api.compare, {"arms": "bake,nope"}, ["--arms", "bake,nope"]),
]  # fmt: skip
_MAIN = {api.tune: tune_cli.main, api.train: train_cli.main, api.compare: compare_cli.main}


@pytest.mark.parametrize(("function", "keywords", "argv"), _BAD)
def test_bad_input_raises_the_line_the_command_line_prints(function, keywords, argv, capsys):
    """Raised, not printed, and never ``sys.exit``: the same one line as the CLI's error."""
    with pytest.raises(api.ConfigError) as raised:
        function(**keywords)
    assert _MAIN[function](argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {raised.value}"


def test_dict_configs_are_validated_like_files(tmp_path) -> None:
    with pytest.raises(api.ConfigError, match=r"^bake\.omega: must be in \[0, 1\), got 1\.5$"):
        api.train({"bake": {"omega": 1.5}})
    with pytest.raises(api.ConfigError, match="search space"):
        api.train({"space": {"bake.omega": {"distribution": "uniform", "low": 0, "high": 1}}})
    with pytest.raises(api.ConfigError, match="argument --search: not allowed with argument"):
        api.compare({"epochs": 1}, search="s")


def test_load_search_of_nothing_says_where_it_looked(tmp_path) -> None:
    with pytest.raises(api.ConfigError, match=f"no search record {tmp_path}/nope/"):
        api.load_search("nope", str(tmp_path))


def test_ray_output_goes_to_the_log_file_and_warnings_to_the_terminal(tmp_path, capsys):
    ray_log = logging.getLogger("ray.tune.tune")
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    with quiet.ray_output(str(tmp_path / "refused"), "refused"):  # no search, no folder
        ray_log.info("Started a local Ray instance")
    assert not (tmp_path / "refused").exists()
    with quiet.ray_output(str(tmp_path / "exp"), "exp") as path:
        ray_log.info("Started a local Ray instance")  # before the search made its folder
        (tmp_path / "exp").mkdir()
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"  # Ray's switch: no box, no hints
        ray_log.info("Wrote the latest version of all result files")
        token = "Token authentication is enabled for this Ray cluster"
        logging.getLogger("ray._private.x").warning(token)
        ray_log.warning("a trial could not be placed")
        logging.getLogger("optuna.storages").info("A new study created in memory")
    assert path == tmp_path / "exp" / "ray.log"
    text, err = path.read_text(), capsys.readouterr().err
    for line in ("Started a local", "Wrote the latest", "Token authentication",
                 "could not be placed", "new study"):
        assert line in text, line
    assert "could not be placed" in err
    assert "Wrote the latest" not in err and "Token" not in err and "new study" not in err
    assert os.environ.get("RAY_AIR_NEW_OUTPUT") == before
    with quiet.ray_output(str(tmp_path / "v"), "v", verbose=True) as none:
        assert none is None and os.environ.get("RAY_AIR_NEW_OUTPUT") == before
    assert not (tmp_path / "v").exists()


def test_remote_storage_logs_to_a_local_file_named_once(capsys) -> None:
    path = quiet.log_file_for("s3://bucket/searches/s1", "s1")
    assert path.parent.is_dir() and path.name == "s1.ray.log"


# --------------------------------------------------------------------------- real runs


def _table_order(out: str) -> list[str]:
    return [trial for _, trial in _TABLE_LINE.findall(out)]


def _search_runs(client: MlflowClient, name: str) -> tuple[object, list]:
    exp = client.get_experiment_by_name("digits-bake")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("bake_ray.role") == "search"]
    parent = next(r for r in parents if r.data.tags.get("mlflow.runName") == name)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


@pytest.mark.slow
def test_tune_returns_the_ranked_table_and_mlflow_holds_what_the_cli_writes(
    tmp_path, ray_local, mlflow_server, capsys, monkeypatch
):
    """The done-when of issue 21: ``tune(...).trials`` is the ranked DataFrame, and the
    same search run by the command line leaves the same runs in MLflow. Ray's box and
    TensorBoard hint are off the terminal (auto loggers on, as for a user)."""
    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    storage = str(tmp_path / "storage")
    r = api.tune(DEFAULT_SPACE, overrides=SMALL, storage=storage, tracking_uri=mlflow_server,
                 name="api-search")  # fmt: skip
    api_out = capsys.readouterr()
    argv = ["--config", DEFAULT_SPACE, "--storage", storage, "--tracking-uri", mlflow_server,
            "--name", "cli-search", *(f"--set={k}={v}" for k, v in SMALL.items())]  # fmt: skip
    assert tune_cli.main(argv) == 0
    cli_out = capsys.readouterr()

    trials = r.trials
    assert list(trials["rank"]) == [1, 2, 3, 4]
    assert list(trials["trial_id"]) == _table_order(api_out.out)  # as the printed table
    assert trials["best_val_acc"].is_monotonic_decreasing
    assert {"bake.temperature", "bake.omega", "bake.loss_weight", "optim.lr", "val_correct",
            "val_n", "val_lo", "val_hi", "status"} <= set(trials.columns)  # fmt: skip
    assert (trials["val_lo"] <= trials["best_val_acc"]).all()
    assert (trials["best_val_acc"] <= trials["val_hi"]).all()
    assert (trials["val_correct"] == (trials["best_val_acc"] * trials["val_n"]).round()).all()
    assert r.best_trial == trials["trial_id"][0] and not r.interrupted
    assert r.best_config == cfg.read_yaml(r.best_config_path)
    assert r.separability and r.separability in api_out.out
    loaded = api.load_search("api-search", storage)
    assert loaded.trials.equals(trials) and loaded.best_config == r.best_config

    client = MlflowClient(mlflow_server)
    api_parent, api_children = _search_runs(client, "api-search")
    cli_parent, cli_children = _search_runs(client, "cli-search")
    assert api_parent.info.run_id == r.parent_run_id
    assert api_parent.data.params == cli_parent.data.params
    assert set(api_parent.data.metrics) == set(cli_parent.data.metrics)
    assert {k for k in api_parent.data.tags if k.startswith("bake_ray.")} == {
        k for k in cli_parent.data.tags if k.startswith("bake_ray.")}  # fmt: skip
    sampled = sorted(c.data.params["T"] for c in api_children)
    assert sampled == sorted(c.data.params["T"] for c in cli_children)  # the same trials
    assert len(api_children) == 4 and {c.info.status for c in api_children} == {"FINISHED"}

    for out in (api_out, cli_out):
        text = out.out + out.err
        assert "Configuration for experiment" not in text and "TensorBoard" not in text
        assert "Wrote the latest version" not in text and "rank" in text
    assert "Wrote the latest version" in (Path(storage) / "api-search" / "ray.log").read_text()


@pytest.mark.slow
def test_verbose_brings_rays_box_back(tmp_path, ray_local, mlflow_server, capsys):
    argv = ["--storage", str(tmp_path / "s"), "--tracking-uri", mlflow_server, "--verbose",
            "--name", "verbose-search", "--num-samples", "1", "--set", "base.epochs=1",
            "--set", "scheduler.grace_period=1", "--set", "base.data.train_subset=150"]  # fmt: skip
    assert tune_cli.main(argv) == 0
    out = capsys.readouterr()
    assert "Configuration for experiment" in out.out + out.err
    assert not (tmp_path / "s" / "verbose-search" / "ray.log").exists()


@pytest.mark.slow
def test_train_returns_its_epochs_and_its_mlflow_run(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = {"runtime.output_dir": str(tmp_path), "runtime.run_name": "api-run"}
    r = api.train(overrides={"epochs": 2, "data.train_subset": 200, **run}, tracking_uri=uri)
    assert r.run_dir == (tmp_path / "api-run").resolve()
    assert list(r.metrics["epoch"]) == [1, 2]
    assert r.best_val_acc == r.metrics["val_acc"].max()
    assert r.best_epoch in (1, 2)
    best = r.metrics.set_index("epoch").loc[r.best_epoch]
    assert r.test_acc_at_best_val == best["test_acc"]
    run = MlflowClient(uri).get_run(r.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "api-run"


@pytest.mark.slow
def test_compare_returns_one_row_per_arm_with_its_paired_verdict(
    tmp_path, ray_local, mlflow_server, capsys
):
    r = api.compare(
        arms=["bake", "ce"], seeds=2, storage=str(tmp_path / "s"), tracking_uri=mlflow_server,
        overrides={"epochs": 1, "data.train_subset": 150}, name="api-compare",
    )  # fmt: skip
    out = capsys.readouterr().out
    table = r.table.set_index("arm")
    assert list(table.index) == ["bake", "ce"] and r.baseline == "ce"
    assert table.loc["bake", "diff_n"] == 2 and table.loc["bake", "verdict"] in out
    low, mean, high = table.loc["bake", ["diff_low", "diff_mean", "diff_high"]]
    assert low <= mean <= high
    bake_trials = r.trials[r.trials["arm"] == "bake"]
    ce_trials = r.trials[r.trials["arm"] == "ce"]
    metric = "test_acc_at_best_val"
    paired = bake_trials[metric].to_numpy() - ce_trials[metric].to_numpy()  # by seed
    assert mean == pytest.approx(paired.mean())
    assert len(r.trials) == 4 and set(r.trials["status"]) == {"finished"}
    assert MlflowClient(mlflow_server).get_run(r.parent_run_id).info.run_name == "api-compare"


@pytest.mark.slow
def test_the_example_runs_as_a_user_runs_it(tmp_path) -> None:
    """``python examples/search_api.py OUT``: its own Ray, its table of the 4 trials, the
    figure; and none of Ray's start-up lines on the terminal."""
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "search_api.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert (tmp_path / "val_acc_vs_bake.png").stat().st_size > 10_000
    row = re.compile(r"^\s*[1-4]\s+[0-9a-f]{8}\s")
    table = [line for line in done.stdout.splitlines() if row.match(line)]
    assert len(table) == 8  # the search's printed table, then the DataFrame the example prints
    for noise in ("Configuration for experiment", "TensorBoard", "Started a local Ray",
                  "Wrote the latest version"):  # fmt: skip
        assert noise not in text, noise
    log = tmp_path / "ray_results" / "search-api-example" / "ray.log"
    assert "Started a local Ray instance" in log.read_text()


_INTERRUPTED_SCRIPT = """
import sys
from bake_ray.api import SearchInterrupted, tune
try:
    tune(sys.argv[1], overrides={"budget.num_samples": 6, "budget.max_concurrent": 1,
         "base.epochs": 6, "base.data.train_subset": 200}, storage=sys.argv[2],
         tracking_uri=sys.argv[3], name="stopped")
except KeyboardInterrupt as stop:
    print("caught", type(stop).__name__, isinstance(stop, SearchInterrupted), flush=True)
    print("status", stop.result.status, len(stop.result.trials), flush=True)
print("after the call", flush=True)
"""


@pytest.mark.slow
def test_ctrl_c_saves_the_search_and_raises_keyboard_interrupt(tmp_path) -> None:
    """In a script (or notebook), Ctrl-C ends ``tune`` with a ``KeyboardInterrupt`` that
    holds the stopped search; the interpreter goes on (no ``sys.exit``)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_SCRIPT, DEFAULT_SPACE, str(tmp_path / "s"), uri],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        lines = []
        for line in proc.stdout:  # bounded: the search ends by itself after 6 trials
            lines.append(line)
            if re.match(r"^trial \w+  epoch 2/", line):
                proc.send_signal(signal.SIGINT)
                break
        out = "".join(lines) + proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "caught SearchInterrupted True" in out and "after the call" in out
    assert "status interrupted" in out
    assert api.load_search("stopped", str(tmp_path / "s")).status == "interrupted"
