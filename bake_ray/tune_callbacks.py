"""Ray Tune callbacks of a search (driver side): one progress line per trial epoch, and the
MLflow mirror of each trial; plus where a trial's checkpoints live and how its best one is
fetched (the callback uploads it when the trial ends)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray import tune

from bake_ray import config as cfg
from bake_ray import tracking
from bake_ray.checkpoint import CHECKPOINT_FILE, METRICS_FILE
from bake_ray.summary import _SCRATCH, _param_summary, accuracy_interval
from bake_ray.trial import resolved_trial_config

_TRACKERS: dict[str, tracking.SearchTracker] = {}  # Tune unpickles callbacks on restore


_STATUSES: dict[str, dict[str, str]] = {}  # search id -> Tune status of each trial, last step


def _status_of(result: dict[str, Any], epochs: int) -> tuple[str, str | None]:
    """MLflow status of a trial that Tune completed: diverged, stopped early, or finished."""
    if result.get("diverged"):
        return "FAILED", str(result.get("error", "training loss became non-finite"))
    if int(result.get("epoch", 0)) < epochs:
        return "KILLED", None
    return "FINISHED", None


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
            f"[{_param_summary(trial.config)}]",
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status, error = _status_of(trial.last_result or {}, self.epochs)
        label = {"KILLED": "stopped early by ASHA", "FAILED": f"failed: {error}"}.get(
            status, "done"
        )
        print(f"trial {trial.trial_id}  {label}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"trial {trial.trial_id}  error: {_read_error(trial)}", flush=True)


def _trial_dirname(trial: Any) -> str:
    """Short trial folder names (Tune's default embeds every config value)."""
    return f"trial_{trial.trial_id}"


def _read_error(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    try:
        lines = Path(path).read_text().strip().splitlines() if path else []
    except OSError:
        lines = []
    return lines[-1] if lines else "trial failed"


class MlflowTrialCallback(tune.Callback):
    """Mirrors every trial into a nested MLflow run, from the driver only.

    Metrics are logged with step = epoch; the run ends FINISHED, KILLED (ASHA stopped it)
    or FAILED (error or divergence); the best checkpoint is uploaded when the trial ends.
    The tracker is not pickled with the callback (Tune stores callbacks in tuner.pkl):
    after a restore it is found again by search id in this process.
    """

    def __init__(self, search_id: str, epochs: int, storage: str, base: dict[str, Any]) -> None:
        self.search_id = search_id
        self.epochs = epochs
        self.storage = storage
        self.base = base  # the trials' shared config (Tune's trial config holds the params)

    @property
    def tracker(self) -> tracking.SearchTracker:
        return _TRACKERS[self.search_id]

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """Remember each trial's status: on an interrupt Tune stops the running trials and
        marks them TERMINATED after its final snapshot (which still says RUNNING)."""
        _STATUSES[self.search_id] = {t.trial_id: t.status for t in trials}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        config = cfg.to_dict(resolved_trial_config(self.base, trial.config))
        self.tracker.start_trial(trial.trial_id, config, run_name=f"trial-{trial.trial_id}")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if "epoch" in result:
            metrics = {**result, **accuracy_interval(result)}
            self.tracker.log_trial_metrics(trial.trial_id, metrics, step=int(result["epoch"]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status, error = _status_of(trial.last_result or {}, self.epochs)
        self._upload_best_checkpoint(trial)
        self.tracker.end_trial(trial.trial_id, status, error)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._upload_best_checkpoint(trial)
        self.tracker.end_trial(trial.trial_id, "FAILED", _read_error(trial))

    def _upload_best_checkpoint(self, trial: Any) -> None:
        scratch = _SCRATCH.get(self.search_id)
        dest = None if scratch is None else scratch / f"best_{trial.trial_id}"
        local = best_checkpoint_dir(trial_checkpoint_roots(trial, self.storage), dest)
        if local is not None:
            self.tracker.log_trial_artifacts(trial.trial_id, local, "checkpoint")
            if self.tracker.pending == 0:  # uploaded: a checkpoint copy per trial adds up
                shutil.rmtree(local, ignore_errors=True)


def trial_checkpoint_roots(trial: Any, storage: str) -> list[str]:
    """Where a trial's checkpoints live: its Tune dir, or its Ray Train run (multi-worker)."""
    scheme = storage.split("://")[0] + "://" if "://" in storage else ""
    tune_dir = trial.path if "://" in trial.path else f"{scheme}{trial.path}"
    return [tune_dir, f"{storage.rstrip('/')}/train_runs/{trial.trial_id}"]


def _filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if "://" in uri:
        return pyarrow.fs.FileSystem.from_uri(uri)
    return pyarrow.fs.LocalFileSystem(), uri


def best_checkpoint_dir(roots: list[str], dest: Path | None = None) -> Path | None:
    """Download the kept checkpoint with the highest val_acc (on a tie, the later one: the
    engine's selected epoch) to ``dest`` (default: a new temporary folder, which the caller
    must remove)."""
    import json

    best: tuple[float, pyarrow.fs.FileSystem, str] | None = None
    for root in roots:
        fs, path = _filesystem(root)
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
