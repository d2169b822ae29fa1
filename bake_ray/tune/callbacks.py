"""Ray Tune callbacks of a search (driver side): one progress line per trial epoch, and the
MLflow mirror of each trial; plus where a trial's checkpoints live and how its best one is
fetched (the callback uploads it when the trial ends)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray import tune
from ray.air.constants import EXPR_RESULT_FILE as RESULT_FILE

from bake_ray import tracking
from bake_ray.core import config as cfg
from bake_ray.core.checkpoint import CHECKPOINT_FILE, METRICS_FILE
from bake_ray.core.storage import filesystem
from bake_ray.tracking.search_runs import SearchTracker
from bake_ray.tune.summary import (
    SCRATCH_DIRS,
    Outcome,
    accuracy_interval,
    param_summary,
    trial_outcome,
)
from bake_ray.tune.trial import resolved_trial_config

TRIAL_STATUSES: dict[str, dict[str, str]] = {}  # search id -> Tune status of each trial, last step
log = logging.getLogger("bake_ray.tracking")


class ProgressCallback(tune.Callback):
    """One line per trial epoch on the driver, instead of Ray's per-checkpoint log lines."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if "val_acc" not in result or result.get("diverged"):
            return
        print(
            f"trial {trial.trial_id}  epoch {int(result['epoch'])}/{self.epochs}  "
            f"val {result['val_acc']:.4f}  loss {result.get('train_loss', float('nan')):.4f}  "
            f"[{param_summary(trial.config)}]",
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        outcome = trial_outcome(trial.last_result or {}, self.epochs)
        print(f"trial {trial.trial_id}  {outcome.label}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        outcome = trial_outcome(trial.last_result or {}, self.epochs, _read_error(trial))
        print(f"trial {trial.trial_id}  {outcome.label}", flush=True)


def trial_dirname(trial: Any) -> str:
    """Short trial folder names (Tune's default embeds every config value)."""
    return f"trial_{trial.trial_id}"


def _read_error(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    try:
        lines = Path(path).read_text().strip().splitlines() if path else []
    except OSError:
        lines = []
    return lines[-1] if lines else "trial failed"


def stored_results(trial: Any) -> list[dict[str, Any]]:
    """Every result Tune stored for a trial (its ``result.json``, one JSON line per report,
    kept across a driver restart): on the driver while the trial runs, in the experiment's
    storage once synced. Unreadable lines are skipped."""
    storage = getattr(trial, "storage", None)
    places = [(pyarrow.fs.LocalFileSystem(), trial.local_path)]
    if storage is not None:
        places.append((storage.storage_filesystem, trial.path))
    for fs, root in places:
        try:
            with fs.open_input_stream(f"{root}/{RESULT_FILE}") as handle:
                text = handle.read().decode()
        except (OSError, TypeError):
            continue
        rows = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
        return rows
    return []


class MlflowTrialCallback(tune.Callback):
    """Mirrors every trial into a nested MLflow run, from the driver only.

    Live: each epoch's metrics (step = epoch) as Tune reports them. When a trial ends, and
    for every trial when the search ends: the run is re-synced from Tune's stored results
    (:func:`stored_results`), so what a failed live write missed is filled in. The run ends
    FINISHED (tagged ``bake_ray.stopped_early`` when ASHA stopped it) or FAILED (error or
    divergence); the best checkpoint is uploaded when the trial ends.

    Picklable on its own (Tune stores callbacks in ``tuner.pkl`` and a restore unpickles
    them): it holds names and the URI, and builds its MLflow tracker on first use.
    """

    def __init__(
        self,
        experiment: str,
        search_id: str,
        tracking_uri: str,
        epochs: int,
        storage: str,
        base: dict[str, Any],
    ) -> None:
        self.experiment = experiment
        self.search_id = search_id
        self.tracking_uri = tracking_uri
        self.epochs = epochs
        self.storage = storage
        self.base = base  # the trials' shared config (Tune's trial config holds the params)
        self._tracker: SearchTracker | None = None
        self._ends: dict[str, Outcome] = {}  # how each trial ended, as this driver saw it
        self._uploaded: set[str] = set()  # trials whose best checkpoint is in MLflow

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tracker": None, "_ends": {}, "_uploaded": set()}

    @property
    def tracker(self) -> SearchTracker | None:
        """The search's tracker (its runs found again by tag); None while MLflow is away."""
        if self._tracker is None:
            try:
                self._tracker = SearchTracker(self.experiment, self.search_id, self.tracking_uri)
            except tracking.TrackingError as err:
                log.warning("MLflow unavailable (%s); the runs are synced later", err)
        return self._tracker

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """Remember each trial's status: on an interrupt Tune stops the running trials and
        marks them TERMINATED after its final snapshot (which still says RUNNING)."""
        TRIAL_STATUSES[self.search_id] = {t.trial_id: t.status for t in trials}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.tracker is not None:
            config = cfg.to_dict(resolved_trial_config(self.base, trial.config))
            self.tracker.start_trial(trial.trial_id, config, run_name=f"trial-{trial.trial_id}")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if "epoch" in result and self.tracker is not None:
            metrics = {**result, **accuracy_interval(result)}
            self.tracker.log_trial_metrics(trial.trial_id, metrics, step=int(result["epoch"]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, trial_outcome(trial.last_result or {}, self.epochs))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, trial_outcome(trial.last_result or {}, self.epochs, _read_error(trial)))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Re-sync every trial that reported (those of an earlier driver too) and report
        what MLflow still lacks."""
        for trial in trials:
            if trial.last_result or trial.trial_id in self._ends:
                self._sync(trial)
            if trial.trial_id in self._ends and trial.trial_id not in self._uploaded:
                self._upload_best_checkpoint(trial)  # its upload failed when it ended
        if self.tracker is not None:
            self.tracker.incomplete()

    def _end(self, trial: Any, outcome: Outcome) -> None:
        self._ends[trial.trial_id] = outcome
        self._sync(trial)
        self._upload_best_checkpoint(trial)

    def _sync(self, trial: Any) -> None:
        if self.tracker is None:
            return
        outcome = self._ends.get(trial.trial_id)
        end = None if outcome is None else (outcome.status, outcome.error, outcome.tags)
        history = [{**r, **accuracy_interval(r)} for r in stored_results(trial)]
        config = cfg.to_dict(resolved_trial_config(self.base, trial.config))
        self.tracker.sync_trial(trial.trial_id, config, history, end)

    def _upload_best_checkpoint(self, trial: Any) -> None:
        if self.tracker is None:
            return
        scratch = SCRATCH_DIRS.get(self.search_id)
        dest = None if scratch is None else scratch / f"best_{trial.trial_id}"
        local = best_checkpoint_dir(trial_checkpoint_roots(trial, self.storage), dest)
        if local is not None:
            if self.tracker.log_trial_artifacts(trial.trial_id, local, "checkpoint"):
                self._uploaded.add(trial.trial_id)
            shutil.rmtree(local, ignore_errors=True)  # a checkpoint copy per trial adds up


def trial_checkpoint_roots(trial: Any, storage: str) -> list[str]:
    """Where a trial's checkpoints live: its Tune dir, or its Ray Train run (multi-worker)."""
    scheme = storage.split("://")[0] + "://" if "://" in storage else ""
    tune_dir = trial.path if "://" in trial.path else f"{scheme}{trial.path}"
    return [tune_dir, f"{storage.rstrip('/')}/train_runs/{trial.trial_id}"]


def best_checkpoint_dir(roots: list[str], dest: Path | None = None) -> Path | None:
    """Download the kept checkpoint with the highest val_acc (on a tie, the later one: the
    engine's selected epoch) to ``dest`` (default: a new temporary folder, which the caller
    must remove)."""
    import json

    best: tuple[float, pyarrow.fs.FileSystem, str] | None = None
    for root in roots:
        fs, path = filesystem(root)
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        except OSError:
            continue
        for info in sorted(infos, key=lambda i: i.base_name):  # checkpoint_000001, ... in order
            if info.type != pyarrow.fs.FileType.Directory or "checkpoint_" not in info.base_name:
                continue
            try:
                with fs.open_input_stream(f"{info.path}/{METRICS_FILE}") as handle:
                    val = float(json.loads(handle.read())["val_acc"])
            except (OSError, ValueError, KeyError):
                continue
            if best is None or val >= best[0]:  # a tie goes to the later epoch, as in training
                best = (val, fs, info.path)
    if best is None:
        return None
    local = dest or Path(tempfile.mkdtemp(prefix="bake_ray_best_"))
    local.mkdir(parents=True, exist_ok=True)
    for name in (CHECKPOINT_FILE, METRICS_FILE):
        pyarrow.fs.copy_files(
            f"{best[2]}/{name}",
            str(local / name),
            source_filesystem=best[1],
            destination_filesystem=pyarrow.fs.LocalFileSystem(),
        )
    return local
