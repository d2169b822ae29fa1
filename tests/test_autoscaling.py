"""Searches and runs on a cluster that autoscales from zero, with Ray's real autoscaler.

The cluster is shaped like the shipped ``cluster.yaml``: a head with ``CPU: 0`` and
``TRAIN_DRIVER``, and one worker type ``cpu2`` (2 CPUs, up to 2 nodes) from zero, on Ray's
``fake_multinode`` provider (``multinode_helpers.AutoscalingCluster``): the autoscaler
starts real raylets on this machine when placement groups wait, and removes them after a
few idle seconds. Every test begins with no worker node and ends when the added nodes are
gone again. The search and the run go through the real CLIs (``--address`` and ``ray job
submit``) and a real MLflow server.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from multinode_helpers import RAY, AutoscalingCluster, wait_for, write_digits_space
from test_multinode import search_runs

from bake_ray.core import config as cfg

RUN_TIMEOUT_S = 480
IDLE_REMOVAL_TIMEOUT_S = 120  # idle_timeout_minutes=0.1 and a 1 s autoscaler loop
WORKER_TYPE = {"cpu2": {"resources": {"CPU": 2}, "max_workers": 2}}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AutoscalingCluster]:
    """The autoscaling cluster, once per module; every process of it is gone afterwards."""
    local = AutoscalingCluster()
    try:
        local.start_autoscaling_head({"CPU": 0, "TRAIN_DRIVER": 8}, WORKER_TYPE)
        yield local
    finally:
        with contextlib.suppress(OSError, shutil.Error):
            logs = tmp_path_factory.mktemp("autoscaling_ray_logs")
            shutil.copytree(local.session_logs, logs, dirs_exist_ok=True)
        local.shutdown()


@pytest.fixture
def from_zero(cluster: AutoscalingCluster) -> Iterator[set[str]]:
    """No worker node before the test; yields the ids of worker nodes that ever existed.
    After the test, the nodes it added must be removed by the autoscaler (idle)."""
    wait_for("no worker node", lambda: not cluster.worker_node_ids(True), IDLE_REMOVAL_TIMEOUT_S)
    yield cluster.worker_node_ids(alive_only=False)
    wait_for(
        "the autoscaler to remove the idle nodes",
        lambda: not cluster.worker_node_ids(True),
        IDLE_REMOVAL_TIMEOUT_S,
        1.0,
    )


def write_space(path: Path, name: str, samples: int, gpus_per_worker: float = 0) -> Path:
    """A tiny BAKE search on digits: one-worker trials of 1 CPU, as many at once as fit."""
    budget = {
        "num_samples": samples,
        "max_concurrent": 0,  # fill the cluster: at full scale, not the 0 CPUs up now
        "cpus_per_worker": 1,
        "gpus_per_worker": gpus_per_worker,
    }
    return write_digits_space(path, name, epochs=2, train_subset=200, budget=budget)


def run(cmd: list[str], cluster: AutoscalingCluster, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=cwd, env=cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    (cwd / "output.log").write_text(proc.stdout + proc.stderr)  # kept for a failure's story
    return proc


def tune_args(space: Path, storage: Path, tracking_uri: str, name: str) -> list[str]:
    return [
        sys.executable, "-m", "bake_ray.tune", "--config", str(space),
        "--storage", str(storage), "--tracking-uri", tracking_uri, "--name", name,
    ]  # fmt: skip


def check_scaled_search(
    proc: subprocess.CompletedProcess,
    cluster: AutoscalingCluster,
    workers_before: set[str],
    tracking_uri: str,
    experiment: str,
    name: str,
) -> list[str]:
    """The search judged the budget at full scale, waited for the autoscaler, got a new
    node, finished, and MLflow holds its parent run and every trial, FINISHED; returns
    the output lines."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    lines = out.splitlines()
    assert any(line.startswith("autoscaling cluster: node types ") for line in lines), out
    assert f"search {name}: 2 trials, 2 at a time," in out  # 2 nodes x 2 CPUs, 2 trials
    waiting = [line for line in lines if line.startswith("waiting for the autoscaler: ")]
    assert waiting, out[-6000:]
    assert waiting[0].endswith("pending (need CPU: 1 each)"), waiting
    assert sum(" epoch 2/2 " in line for line in lines) == 2, out[-6000:]
    assert cluster.worker_node_ids(alive_only=False) - workers_before, "no node was added"

    client = MlflowClient(tracking_uri=tracking_uri)
    parent, children = search_runs(client, experiment, name)
    assert parent.info.status == "FINISHED"
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")] == [1, 2]
    return lines


def test_search_via_address_scales_up_from_zero_and_records_every_trial(
    cluster: AutoscalingCluster, from_zero: set[str], mlflow_server: str, tmp_path: Path
) -> None:
    """`tune --address` on a cluster that has 0 CPUs now: it starts, the autoscaler adds a
    node for the waiting trials, and both trials finish into MLflow."""
    space = write_space(tmp_path / "space.yaml", "autoscale-cli", samples=2)
    name = "autoscale-cli-search"
    args = tune_args(space, tmp_path / "shared", mlflow_server, name)
    proc = run([*args, "--address", cluster.address], cluster, tmp_path)
    check_scaled_search(proc, cluster, from_zero, mlflow_server, "autoscale-cli", name)


def test_search_via_ray_job_submit_scales_up_and_its_hints_work(
    cluster: AutoscalingCluster, from_zero: set[str], mlflow_server: str, tmp_path: Path
) -> None:
    """`ray job submit -- python -m bake_ray.tune` to the head's jobs API: the search runs
    as a job on the head, the closing hints are the cluster ones, and the retrain hint's
    download works.

    Without `--working-dir`: every fake node shares this machine's disk, and a node that
    starts re-extracts the job's working dir at the same path (Ray overwrites it), deleting
    the driver's current directory under it. Real nodes each have their own disk.
    """
    space = write_space(tmp_path / "space.yaml", "autoscale-job", samples=2)
    name = "autoscale-job-search"
    submit = [*RAY, "job", "submit", "--address", cluster.dashboard_url]
    tune = tune_args(space, tmp_path / "shared", mlflow_server, name)
    proc = run([*submit, "--", *tune], cluster, tmp_path)
    lines = check_scaled_search(proc, cluster, from_zero, mlflow_server, "autoscale-job", name)
    assert any("succeeded" in line for line in lines), "\n".join(lines[-20:])

    port = mlflow_server.rsplit(":", 1)[1]
    open_hint = next(line for line in lines if "open it:" in line)
    assert f"open it: ray attach <your cluster yaml> -p {port} " in open_hint
    train_hint = lines[next(i for i, line in enumerate(lines) if "train it:" in line) + 1]
    assert train_hint.strip() == (
        "ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
        "python -m bake_ray.train --config best_config.yaml --workers 1 "
        f"--tracking-uri {mlflow_server} --parent-run-id "
    ) + train_hint.strip().rsplit(" ", 1)[1]
    fetch = next(line for line in lines if "train it: curl -fo best_config.yaml " in line)
    url = fetch.split("'")[1]  # the user's tunnel is this test's direct route to the server
    local = tmp_path / "best_config.yaml"
    with urllib.request.urlopen(url, timeout=30) as response:
        local.write_bytes(response.read())
    best = cfg.load(local)
    assert best.method == "bake" and best.runtime.workers == 0


def test_two_worker_train_run_scales_up_and_finishes(
    cluster: AutoscalingCluster, from_zero: set[str], tmp_path: Path
) -> None:
    """`train --workers 2 --address`: the worker group waits for a node, then trains."""
    cmd = [
        sys.executable, "-m", "bake_ray.train", "--workers", "2", "--address", cluster.address,
        "--set", "epochs=2", "--set", "data.dataset=digits", "--set", "data.train_subset=200",
        "--set", f"runtime.output_dir={tmp_path / 'runs'}",
        "--set", "runtime.run_name=autoscale-train",
    ]  # fmt: skip
    proc = run(cmd, cluster, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "autoscaling cluster: node types " in out
    assert "waiting for the autoscaler: 1 worker group pending (need 2 x CPU: 1 each)" in out, out
    assert cluster.worker_node_ids(alive_only=False) - from_zero, "no node was added"
    assert list((tmp_path / "runs" / "autoscale-train").glob("checkpoint_*")), out[-3000:]


def test_a_budget_no_node_type_can_hold_is_refused_in_one_line(
    cluster: AutoscalingCluster, from_zero: set[str], mlflow_server: str, tmp_path: Path
) -> None:
    """A GPU per trial, and no node type has one: exit 2, one line, before anything runs;
    the same for a train run wider than the cluster at full scale."""
    space = write_space(tmp_path / "space.yaml", "autoscale-impossible", 2, gpus_per_worker=1)
    args = tune_args(space, tmp_path / "shared", mlflow_server, "never")
    proc = run([*args, "--address", cluster.address], cluster, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        "error: budget: one trial needs CPU: 1, GPU: 1; no node type can hold one worker; "
        "the largest node type 'cpu2' has CPU: 2 (up to 2 nodes)"
    )
    assert not (tmp_path / "shared").exists()
    assert MlflowClient(mlflow_server).get_experiment_by_name("autoscale-impossible") is None

    cmd = [
        sys.executable, "-m", "bake_ray.train", "--workers", "5", "--address", cluster.address,
        "--set", "data.dataset=digits", "--set", f"runtime.output_dir={tmp_path / 'runs'}",
    ]  # fmt: skip
    proc = run(cmd, cluster, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        "error: runtime.workers: the run needs 5 workers of CPU: 1; 4 such workers fit the "
        "whole cluster at full scale; the largest node type 'cpu2' has CPU: 2 (up to 2 nodes)"
    )
    assert not (tmp_path / "runs").exists()
    assert cluster.worker_node_ids(alive_only=False) == from_zero, "a node was started"
