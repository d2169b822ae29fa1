"""The MLflow run of one ``python -m bake_ray.train``.

One run per training run: in the experiment ``train-<dataset>``, or nested under a search's
parent run (``--parent-run-id``, what the retrain hint a search prints passes), in that
run's experiment. The config is logged once as params; the epochs are mirrored from the run
folder's ``metrics.jsonl`` (what the engine wrote, the same file a resume continues) every
few seconds while training and once more at the end, so nothing is logged twice; the best
checkpoint is uploaded; the run ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED.
A tracking failure after the start is one warning: training never stops for MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from bake_ray import tracking
from bake_ray.core import checkpoint as ckpt
from bake_ray.core import config as cfg

if TYPE_CHECKING:  # MLflow is imported when a run opens: train.py is imported by Ray
    from mlflow.tracking import MlflowClient  # workers that never log (format_progress)

log = logging.getLogger("bake_ray.tracking")
SYNC_EVERY_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)",
    )
    parser.add_argument(
        "--parent-run-id",
        help="log this run as a child of that MLflow run (e.g. the search that chose it)",
    )
    parser.add_argument(
        "--no-register",
        dest="register",
        action="store_false",
        help="log the best checkpoint as an MLflow model on the run, but add no registry version",
    )


class TrainRun:
    """Use as ``with TrainRun.open(args, config, run_dir): history = train(...)``."""

    def __init__(
        self, client: MlflowClient, run_id: str, run_dir: Path, register: bool = True
    ) -> None:
        self.client, self.run_id, self.run_dir = client, run_id, run_dir
        self.register = register  # the best checkpoint as a new registered model version
        self._logged: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    @classmethod
    def open(cls, args: argparse.Namespace, config: cfg.Config, run_dir: Path) -> TrainRun:
        """Create the run (or raise :class:`~bake_ray.tracking.TrackingError`, before any
        compute) and log the config; a resumed run folder continues its own run."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        tracking.check_tracking_reachable(uri)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "creating tables"
        try:
            client = MlflowClient(uri)
            run_id = _existing_run(run_dir) or _create(
                client, uri, args.parent_run_id, config, run_dir
            )
            if client.get_run(run_id).info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            known = client.get_run(run_id).data.params
            params = tracking.config_params(cfg.to_dict(config)).items()
            new = [Param(k, v) for k, v in params if k not in known]
            for start in range(0, len(new), tracking.MAX_PARAMS_PER_BATCH):
                chunk = new[start : start + tracking.MAX_PARAMS_PER_BATCH]
                client.log_batch(run_id, params=chunk, synchronous=True)
            _log_lineage(client, run_id, config)
        except (MlflowException, OSError) as err:
            raise tracking.TrackingError(f"MLflow at {uri}: {tracking.first_line(err)}") from None
        (run_dir / RUN_ID_FILE).write_text(run_id + "\n")
        print(f"MLflow run {run_id} at {uri}", flush=True)
        return cls(client, run_id, run_dir, register=getattr(args, "register", True))

    def __enter__(self) -> TrainRun:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        """End the run FINISHED, KILLED (interrupted) or FAILED (any error, kept as a tag)."""
        self._stop.set()
        self._thread.join()
        status = "FINISHED" if kind is None else "FAILED"
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            status = "KILLED"
        try:
            self.sync()
            best = self.run_dir / "best"
            if best.is_dir():
                self.client.log_artifacts(self.run_id, str(best), "checkpoint")
            if status == "FINISHED" and (best / ckpt.CHECKPOINT_FILE).is_file():
                self._publish_model(best / ckpt.CHECKPOINT_FILE)
            if status == "FAILED":
                self.client.set_tag(self.run_id, tracking.TAG_ERROR, str(err)[:4000])
            self.client.set_terminated(self.run_id, status=status)
        except Exception as failure:  # the run's files are on disk; MLflow only mirrors them
            log.warning(
                "MLflow could not end run %s: %s", self.run_id, tracking.first_line(failure)
            )

    def _publish_model(self, checkpoint_file: Path) -> None:
        """The best checkpoint as an MLflow model, registered under the run's experiment
        without moving ``champion`` (see :mod:`bake_ray.tracking.model`); never raises."""
        from bake_ray.tracking.model import publish

        try:
            run = self.client.get_run(self.run_id)
            experiment = self.client.get_experiment(run.info.experiment_id).name
            config = cfg.load(self.run_dir / "config.yaml")
        except Exception as err:
            log.warning("MLflow model of run %s not logged: %s", self.run_id,
                        tracking.first_line(err))  # fmt: skip
            return
        publish(self.client.tracking_uri, self.run_id, checkpoint_file, config, experiment,
                register=self.register, champion=False)  # fmt: skip

    def _follow(self) -> None:
        warned = False  # one warning per outage
        while not self._stop.wait(SYNC_EVERY_S):
            try:
                self.sync()
                warned = False
            except Exception as err:
                if not warned:
                    log.warning("MLflow sync failed (retried): %s", tracking.first_line(err))
                warned = True

    def sync(self) -> None:
        """Log the epochs of ``metrics.jsonl`` the run does not hold yet (step = epoch)."""
        from mlflow.entities import Metric

        if not self._logged:
            run = self.client.get_run(self.run_id)
            for key in run.data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                self._logged |= {(key, m.step) for m in history}
        fresh, now = [], int(time.time() * 1000)
        for row in _rows(self.run_dir / "metrics.jsonl"):
            step = int(row.get("epoch", 0))
            for key, value in tracking.epoch_metrics(row).items():
                if (key, step) not in self._logged:
                    fresh.append(Metric(key, value, now, step))
        for start in range(0, len(fresh), tracking.MAX_METRICS_PER_BATCH):
            chunk = fresh[start : start + tracking.MAX_METRICS_PER_BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            except Exception:
                self._logged.clear()  # the server may hold it (a lost reply): read it again
                raise
            self._logged |= {(m.key, m.step) for m in chunk}


RUN_ID_FILE = "mlflow_run_id"  # in the run folder: a --resume continues the same run


def _log_lineage(client: MlflowClient, run_id: str, config: cfg.Config) -> None:
    """The run's data splits as dataset inputs (imported here: see the MLflow note above)."""
    from bake_ray.tracking import lineage

    lineage.log_split_inputs(client, run_id, cfg.to_dict(config))  # warns, never raises


def _existing_run(run_dir: Path) -> str | None:
    path = run_dir / RUN_ID_FILE
    return path.read_text().strip() or None if path.is_file() else None


def _create(
    client: MlflowClient, uri: str, parent: str | None, config: cfg.Config, run_dir: Path
) -> str:
    tags: dict[str, Any] = {tracking.TAG_ROLE: "train"}
    if parent:
        experiment_id = client.get_run(parent).info.experiment_id
        tags[tracking.TAG_PARENT] = parent
    else:
        name = f"train-{config.data.dataset}"
        found = client.get_experiment_by_name(name)
        experiment_id = (
            found.experiment_id
            if found
            else client.create_experiment(
                name, artifact_location=tracking.default_artifact_location(uri, name)
            )
        )
    return client.create_run(experiment_id, tags=tags, run_name=run_dir.name).info.run_id


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill
    return rows
