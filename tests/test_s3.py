"""The AWS storage path, end to end, against a local S3 server (moto on 127.0.0.1).

Every command runs as the README and docs/CLUSTER.md give it, with ``--storage s3://...``
and only the standard AWS variables (``AWS_ENDPOINT_URL``, keys, region): the same commands
work on AWS unchanged. The MLflow server runs as cluster.yaml runs it on the head, its
artifacts proxied to the same bucket. Each later command runs from a folder of its own, as a
later ``ray job submit`` does (its working directory is new every time): what it needs must
come from the bucket, never from the folder the search ran in.
"""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import servers
import yaml
from mlflow.tracking import MlflowClient
from reliability_helpers import cli_session, table_rows, wait_for

from bake_ray import tracking
from bake_ray.core import config as cfg

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

BUCKET = "bake-ray-test"
ARTIFACTS = f"s3://{BUCKET}/mlflow-artifacts"
#: The default search (search_spaces/default.yaml), small: 3 trials one at a time.
SMALL = [
    "--set", "budget.num_samples=3", "--set", "budget.max_concurrent=1",
    "--set", "base.epochs=2", "--set", "base.data.train_subset=256",
    "--set", "scheduler.grace_period=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """moto's S3 server with one empty bucket; yields the AWS variables that reach it."""
    with servers.moto_server(tmp_path_factory.mktemp("moto")) as env:
        _s3(env).create_bucket(Bucket=BUCKET)
        yield env


@pytest.fixture(scope="module")
def mlflow_s3(aws: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server --artifacts-destination s3://...``, as on the cluster's head."""
    with servers.mlflow_server(tmp_path_factory.mktemp("mlflow_s3"), ARTIFACTS, aws) as uri:
        yield uri


def _s3(env: dict[str, str]):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def keys(env: dict[str, str], prefix: str) -> list[str]:
    """Every object key under ``prefix`` in the bucket."""
    pages = _s3(env).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def read(env: dict[str, str], key: str) -> bytes:
    return _s3(env).get_object(Bucket=BUCKET, Key=key)["Body"].read()


def folder(tmp_path: Path, name: str) -> Path:
    """A new working folder, as each `ray job submit` gets."""
    path = tmp_path / name
    path.mkdir()
    return path


def run_cli(entry: str, args: list[str], cwd: Path, tmp_path: Path, tag: str,
            env: dict[str, str], timeout_s: float = 600) -> str:
    """Run ``python -m bake_ray.<entry>`` to the end; its stdout, asserting exit 0."""
    with cli_session(entry, args, cwd, tmp_path / "logs", tag, **env) as cli:
        code = cli.wait(timeout_s)
    assert code == 0, f"{entry} {args}: exit {code}\n{cli.describe()}"
    return cli.stdout


def _mid_search(stdout: str) -> bool:
    """The first trial is done and the second has reported an epoch."""
    return "done" in stdout and stdout.count("  epoch ") >= 3


def test_search_on_s3_survives_ctrl_c_and_serves_compare_train_and_mlflow_from_anywhere(
    aws: dict[str, str], mlflow_s3: str, tmp_path: Path
) -> None:
    """The default search on ``s3://``: Ctrl-C, ``--resume`` from another folder, its best
    config and summary in the bucket beside it (nothing in any working folder), then
    ``compare --search``, ``compare --recheck`` and ``train --config s3://...`` each from a
    new folder, and the best checkpoint in the bucket through MLflow, downloadable by the
    route the UI's download button takes."""
    storage = f"s3://{BUCKET}/searches"
    name = "s3search"
    search = f"searches/{name}"
    job = folder(tmp_path, "job")
    args = ["--storage", storage, "--tracking-uri", mlflow_s3, "--name", name, *SMALL]
    with cli_session("tune", args, job, tmp_path / "logs", "cut", **aws) as cli:
        wait_for(lambda: cli.proc.poll() is not None or _mid_search(cli.stdout), 600, "trial 2")
        os.kill(cli.pid, signal.SIGINT)
        assert cli.wait(300) == 130, cli.describe()
    command = f"python -m bake_ray.tune --resume --name {name} --storage {storage}"
    assert cli.stderr.strip().splitlines()[-1] == f"interrupted; resume with: {command}"
    assert f"{search}/bake_ray_search.yaml" in keys(aws, search)
    assert f"{search}/best_config.yaml" not in keys(aws, search)

    elsewhere = folder(tmp_path, "resume")
    out = run_cli("tune", ["--resume", "--name", name, "--storage", storage], elsewhere,
                  tmp_path, "resume", aws)
    assert f"resuming search {name} from {storage}/{name}" in out
    assert len(table_rows(out)) == 3, out
    best_uri = f"{storage}/{name}/best_config.yaml"
    assert f"config written to {best_uri}" in out, out
    assert f"-m bake_ray.train --config {best_uri} --tracking-uri {mlflow_s3}" in out, out
    stored = keys(aws, search)
    assert {f"{search}/best_config.yaml", f"{search}/summary.txt"} <= set(stored), stored
    summary = read(aws, f"{search}/summary.txt").decode()
    assert summary.splitlines()[0].split()[:2] == ["rank", "trial"], summary
    best = cfg.from_dict(yaml.safe_load(read(aws, f"{search}/best_config.yaml")))
    assert best.epochs == 2 and best.data.train_subset == 256
    record = yaml.safe_load(read(aws, f"{search}/bake_ray_search.yaml"))
    assert record["status"] == "finished"
    for place in (job, elsewhere):  # no copy left where the commands ran
        assert not list(place.glob("best_config*")), list(place.iterdir())

    _check_best_checkpoint_in_bucket_through_mlflow(aws, mlflow_s3, name)

    out = run_cli(
        "compare",
        ["--search", name, "--storage", storage, "--tracking-uri", mlflow_s3,
         "--arms", "bake,ce", "--seeds", "2", "--set", "epochs=1", "--max-concurrent", "2"],
        folder(tmp_path, "compare"), tmp_path, "compare", aws,
    )  # fmt: skip
    assert best_uri in out, out
    assert "Δ vs ce" in out, out

    out = run_cli(
        "compare",
        ["--recheck", name, "--top", "2", "--seeds", "2", "--storage", storage,
         "--tracking-uri", mlflow_s3, "--max-concurrent", "2"],
        folder(tmp_path, "recheck"), tmp_path, "recheck", aws,
    )  # fmt: skip
    assert "the winner trial_" in out, out

    train_dir = folder(tmp_path, "train")
    out = run_cli(
        "train",
        ["--config", best_uri, "--tracking-uri", mlflow_s3, "--set", "epochs=1",
         "--set", f"runtime.output_dir={train_dir / 'runs'}"],
        train_dir, tmp_path, "train", aws,
    )  # fmt: skip
    (run_dir,) = (train_dir / "runs").iterdir()
    trained = cfg.to_dict(cfg.load(run_dir / "config.yaml"))
    expected = cfg.to_dict(best)
    for values in (trained, expected):  # what the command line changed
        values["epochs"] = 1
        del values["runtime"]["output_dir"], values["runtime"]["run_name"]
    assert trained == expected


def _check_best_checkpoint_in_bucket_through_mlflow(
    aws: dict[str, str], uri: str, search: str
) -> None:
    """The search's trials logged their best checkpoints through the server into the
    bucket, and the UI's download route returns the same bytes as the bucket holds."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("digits-bake")
    parent = next(
        r for r in client.search_runs([experiment.experiment_id])
        if r.info.run_name == search
    )  # fmt: skip
    trials = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    logged = [
        (run, item.path)
        for run in trials
        for item in client.list_artifacts(run.info.run_id, "checkpoint")
        if not item.is_dir
    ]
    assert logged, "no trial logged a best checkpoint"
    run, path = logged[0]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri  # proxied
    suffix = f"{run.info.run_id}/artifacts/{path}"
    in_bucket = [k for k in keys(aws, "mlflow-artifacts/") if k.endswith(suffix)]
    assert len(in_bucket) == 1, keys(aws, "mlflow-artifacts/")
    url = tracking.artifact_url(uri, run.info.run_id, path)
    with urllib.request.urlopen(url, timeout=60) as response:
        assert response.read() == read(aws, in_bucket[0])


def test_two_worker_trial_checkpoints_through_ray_train_to_s3(
    aws: dict[str, str], mlflow_s3: str, tmp_path: Path
) -> None:
    """A trial with ``budget.workers_per_trial: 2`` drives a Ray Train worker group whose own
    checkpoint upload writes to the bucket; the search finishes and ranks it."""
    storage = f"s3://{BUCKET}/workers"
    args = [
        "--storage", storage, "--tracking-uri", mlflow_s3, "--name", "s3workers",
        "--set", "budget.workers_per_trial=2", "--set", "budget.num_samples=1",
        "--set", "base.epochs=2", "--set", "base.data.train_subset=256",
    ]  # fmt: skip
    out = run_cli("tune", args, folder(tmp_path, "job"), tmp_path, "workers", aws)
    rows = table_rows(out)
    assert [r["status"] for r in rows] == ["finished"], out
    stored = keys(aws, "workers/s3workers/train_runs/")
    checkpoints = [k for k in stored if "/checkpoint_" in k]
    assert checkpoints, stored
    assert "workers/s3workers/best_config.yaml" in keys(aws, "workers/s3workers/")
