"""The search on a real multi-node Ray cluster: placement, shared storage, MLflow, node loss.

The cluster (``multinode_helpers.LocalCluster``) is a head with ``num_cpus=0`` and a
``TRAIN_DRIVER`` resource, as in cluster.yaml, plus worker nodes with 1 CPU each, every node
a separate ``ray start`` on this machine. The search runs as ``python -m bake_ray.tune
--address ...`` in a subprocess (this pytest process may hold its own in-process Ray), with
a temp dir as the cluster's shared storage and the session's MLflow server as the head's.
What these tests observe is what Ray itself records: the State API (which node each actor
ran on, in which placement group) and Ray Train's structured worker logs (which trial,
rank and epoch each worker reported).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from multinode_helpers import (
    LocalCluster,
    Node,
    TrainReport,
    train_reports,
    wait_for,
    write_digits_space,
)

from bake_ray.core import checkpoint as ckpt

SEARCH_TIMEOUT_S = 600  # two 2-worker trials take ~1 min alone, several on a loaded 2-core box
DRIVER_CLASSES = ("ImplicitFunc", "TrainController")  # a Tune trial and its Train controller


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Head (no CPU, 8 driver slots) + two 1-CPU worker nodes; Ray's logs are kept on exit."""
    local = LocalCluster()
    try:
        local.start_head({"TRAIN_DRIVER": 8})
        local.add_worker(num_cpus=1)
        local.add_worker(num_cpus=1)
        yield local
    finally:
        with contextlib.suppress(OSError, shutil.Error):
            logs = tmp_path_factory.mktemp("multinode_ray_logs")
            shutil.copytree(local.session_logs, logs, dirs_exist_ok=True)
        local.shutdown()


# --------------------------------------------------------------------------- the search


def write_space(path: Path, name: str, epochs: int, train_subset: int, samples: int) -> Path:
    """A small BAKE search on digits: 2 Ray Train workers per trial, no early stopping."""
    budget = {
        "num_samples": samples,
        "max_concurrent": 1,
        "workers_per_trial": 2,
        "cpus_per_worker": 1,
        "max_failures": 1,
    }
    return write_digits_space(path, name, epochs, train_subset, budget)


def start_search(
    cluster: LocalCluster, space: Path, storage: Path, tracking_uri: str, name: str, log: Path
) -> subprocess.Popen:
    """``python -m bake_ray.tune --address <the cluster>`` as its own process."""
    cmd = [
        sys.executable, "-m", "bake_ray.tune", "--address", cluster.address,
        "--config", str(space), "--storage", str(storage), "--tracking-uri", tracking_uri,
        "--name", name,
    ]  # fmt: skip
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, cwd=log.parent, env=cluster.env, stdout=out, stderr=subprocess.STDOUT
        )


def finish(proc: subprocess.Popen, log: Path, timeout_s: float = SEARCH_TIMEOUT_S) -> None:
    """Wait for the search; it must exit 0 (the driver's output tail explains a failure)."""
    try:
        code = proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, f"search exited {code}:\n{log.read_text()[-6000:]}"


# --------------------------------------------------------------------------- what Ray recorded


def train_workers(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    """Every RayTrainWorker actor the cluster ever had (dead ones too), by actor id."""
    return {
        a["actor_id"]: a for a in cluster.state("actors") if a["class_name"] == "RayTrainWorker"
    }


def worker_groups(
    reports: list[TrainReport], workers: dict[str, dict[str, Any]]
) -> list[list[TrainReport]]:
    """A trial's reports split by worker group (placement group), oldest group first."""
    groups: dict[str, list[TrainReport]] = {}
    for report in reports:
        groups.setdefault(workers[report.actor_id]["placement_group_id"], []).append(report)
    return list(groups.values())


def group_nodes(group: list[TrainReport], workers: dict[str, dict[str, Any]]) -> set[str]:
    """Node ids of a worker group's actors, as the State API saw them."""
    return {workers[r.actor_id]["node_id"] for r in group}


def rank0_epochs(group: list[TrainReport]) -> list[int]:
    return [r.epoch for r in group if r.rank == 0]


def registered_epoch(train_runs: Path) -> float | None:
    """The newest epoch whose checkpoint Ray Train has registered (persisted and recorded
    in its run's checkpoint-manager snapshot, which is what a restart resumes from)."""
    for snapshot in train_runs.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):
            return None  # being written
        if latest:
            return latest["metrics"]["epoch"]
    return None


def checkpoint_dirs(run: Path) -> list[Path]:
    """A Train run's checkpoint dirs, oldest first (their names are timestamps)."""
    return sorted(p for p in run.glob("checkpoint_*") if p.is_dir())


# --------------------------------------------------------------------------- MLflow


def search_runs(client: MlflowClient, experiment: str, search_id: str) -> tuple[Run, list[Run]]:
    """The search's parent run and its child runs on the MLflow server."""
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    exp = found.experiment_id
    query = f"tags.`bake_ray.search_id` = '{search_id}' and tags.`bake_ray.role` = 'search'"
    [parent] = client.search_runs([exp], query)
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, children


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """Every step logged for a metric, duplicates included."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def check_trial_run(client: MlflowClient, run: Run, epochs: int) -> None:
    """A complete trial run: FINISHED, BAKE's resolved config, one point per epoch, checkpoint."""
    assert run.info.status == "FINISHED"
    assert run.data.params["bake.global_ensembling"] == "True"
    assert run.data.params["method"] == "bake"
    assert run.data.params["runtime.workers"] == "2"
    for key in ("val_acc", "train_loss", "train_kd"):
        assert steps(client, run.info.run_id, key) == list(range(1, epochs + 1)), key
    kd = [m.value for m in client.get_metric_history(run.info.run_id, "train_kd")]
    assert all(v > 0 for v in kd), f"train_kd {kd}: the distillation term is not in the loss"
    files = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert {ckpt.CHECKPOINT_FILE, ckpt.METRICS_FILE} <= files


def check_placement(cluster: LocalCluster, trial_ids: list[str], epochs: int) -> None:
    """Trial drivers on the head; each worker group on two different worker nodes."""
    head, worker_nodes = cluster.nodes[0], {n.node_id for n in cluster.nodes[1:]}
    [head_row] = [n for n in cluster.state("nodes") if n["node_id"] == head.node_id]
    assert head_row["is_head_node"] and not head_row["resources_total"].get("CPU")
    drivers = [a for a in cluster.state("actors") if a["class_name"] in DRIVER_CLASSES]
    assert drivers and {a["node_id"] for a in drivers} == {head.node_id}
    workers = train_workers(cluster)
    reports = train_reports(cluster.session_logs)
    for trial in trial_ids:
        mine = [r for r in reports if r.trial_id == trial]
        assert all(workers[r.actor_id]["node_id"] == r.node_id for r in mine)  # logs agree
        for group in worker_groups(mine, workers):
            assert len({r.actor_id for r in group}) == 2
            assert len(group_nodes(group, workers)) == 2, "the two workers share a node"
            assert group_nodes(group, workers) <= worker_nodes, "a worker ran on the head"
        assert rank0_epochs(mine)[-1] == epochs


def check_shared_checkpoints(run: Path, epochs: int) -> None:
    """Ray Train kept the trial's checkpoints in the shared storage, the last one complete."""
    kept = checkpoint_dirs(run)
    assert kept, f"no checkpoint in the shared storage at {run}"
    for path in kept:
        assert (path / ckpt.CHECKPOINT_FILE).is_file() and (path / ckpt.METRICS_FILE).is_file()
    state = ckpt.load(kept[-1])
    assert state["epoch"] == epochs
    assert [h["epoch"] for h in state["history"]] == list(range(1, epochs + 1))
    assert state["config"]["bake"]["global_ensembling"] is True


def check_resumed_elsewhere(cluster: LocalCluster, trial: str, victim: Node, epochs: int) -> None:
    """The trial's first worker group used the dead node; every later group ran on the
    nodes left and began after epoch 1 (from the checkpoint); the last one finished."""
    workers = train_workers(cluster)
    mine = [r for r in train_reports(cluster.session_logs) if r.trial_id == trial]
    first, *restarted = worker_groups(mine, workers)
    assert restarted, "no worker group was started after the node died"
    assert victim.node_id in group_nodes(first, workers)
    assert rank0_epochs(first)[0] == 1
    for group in restarted:
        assert victim.node_id not in group_nodes(group, workers)
        assert rank0_epochs(group)[0] > 1, "the restarted workers began again at epoch 1"
    assert group_nodes(restarted[-1], workers) == {n.node_id for n in cluster.live_workers()}
    assert rank0_epochs(restarted[-1])[-1] == epochs


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_search_places_trials_on_worker_nodes_and_records_everything(
    cluster: LocalCluster, mlflow_server: str, tmp_path: Path
) -> None:
    """Trials train only on worker nodes, a 2-worker trial spans two of them, checkpoints
    go to the shared storage and the MLflow server gets every run, complete."""
    epochs, name = 2, "multinode-search"
    space = write_space(tmp_path / "space.yaml", "multinode", epochs, 400, samples=2)
    storage, log = tmp_path / "shared", tmp_path / "driver.log"
    finish(start_search(cluster, space, storage, mlflow_server, name, log), log)

    train_runs = storage / name / "train_runs"
    trial_ids = sorted(p.name for p in train_runs.iterdir() if p.is_dir())
    assert len(trial_ids) == 2
    check_placement(cluster, trial_ids, epochs)
    for trial in trial_ids:
        check_shared_checkpoints(train_runs / trial, epochs)

    client = MlflowClient(tracking_uri=mlflow_server)
    parent, children = search_runs(client, "multinode", name)
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.tags["bake_ray.trial_id"] for c in children) == trial_ids
    for child in children:
        check_trial_run(client, child, epochs)


def kill_rank0_node_after_first_checkpoint(
    cluster: LocalCluster, train_runs: Path, proc: subprocess.Popen
) -> tuple[Node, float]:
    """Once Ray Train has registered the trial's first checkpoint, SIGKILL the node of its
    rank-0 worker (the one that writes checkpoints); returns it and the registered epoch."""

    def registered() -> float | None:
        assert proc.poll() is None, "the search ended before a checkpoint was registered"
        return registered_epoch(train_runs)

    epoch = wait_for("a registered checkpoint", registered, 300, 0.05)
    [trial] = [p.name for p in train_runs.iterdir() if p.is_dir()]

    def rank0_reports() -> list[TrainReport]:
        reports = train_reports(cluster.session_logs)
        return [r for r in reports if r.trial_id == trial and r.rank == 0]

    rank0 = wait_for("rank 0's report in Ray Train's log", rank0_reports, 30, 0.05)
    victim = cluster.node(rank0[-1].node_id)
    cluster.kill(victim)
    return victim, epoch


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trial_resumes_from_its_checkpoint_when_a_worker_node_dies(
    cluster: LocalCluster, mlflow_server: str, tmp_path: Path
) -> None:
    """SIGKILL the rank-0 node of a running 2-worker trial: the worker group restarts on the
    nodes left, from the last checkpoint (not from epoch 1), and the trial finishes complete."""
    epochs, name = 4, "multinode-node-loss"
    cluster.add_worker(num_cpus=1)  # 3 worker nodes: room for the worker group after a loss
    space = write_space(tmp_path / "space.yaml", "multinode-kill", epochs, 1000, samples=1)
    storage, log = tmp_path / "shared", tmp_path / "driver.log"
    train_runs = storage / name / "train_runs"
    proc = start_search(cluster, space, storage, mlflow_server, name, log)
    try:
        victim, killed_at = kill_rank0_node_after_first_checkpoint(cluster, train_runs, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finish(proc, log)
    assert 1 <= killed_at < epochs, f"the node died at epoch {killed_at}, not mid-trial"

    [trial] = [p.name for p in train_runs.iterdir() if p.is_dir()]
    check_resumed_elsewhere(cluster, trial, victim, epochs)
    check_shared_checkpoints(train_runs / trial, epochs)  # history 1..N, no epoch twice

    client = MlflowClient(tracking_uri=mlflow_server)
    parent, [child] = search_runs(client, "multinode-kill", name)
    assert parent.info.status == "FINISHED"
    assert child.data.tags["bake_ray.trial_id"] == trial
    check_trial_run(client, child, epochs)
