"""The search: ``python -m bake_ray.tune [--config SPACE.yaml] [--set k=v ...] [--resume]``.

Ray Tune drives seeded Optuna TPE (the paper's T=4, omega=0.5, lambda=1 first when the
space file lists it) and ASHA over epochs. A one-worker trial trains inside its Tune trial
process (no Ray Train worker group: ~2 s of overhead instead of ~20 s); a trial with several
workers drives a ``TorchTrainer`` whose run name is the trial id, so a restarted trial
resumes from its own checkpoints. All MLflow writes happen on the driver, in
:class:`MlflowTrialCallback`, through :class:`bake_ray.tracking.SearchTracker`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs
from ray import tune

from bake_ray import config as cfg
from bake_ray import search_space as ss
from bake_ray import tracking
from bake_ray.checkpoint import CHECKPOINT_FILE, METRICS_FILE
from bake_ray.config import ConfigError
from bake_ray.data import check_data_available, input_shape
from bake_ray.models import check_model_available
from bake_ray.raytrain import absolute_paths
from bake_ray.trial import (
    BASE_KEY,
    TRAIN_STORAGE_KEY,
    WORKER_GROUP_KEY,
    WORKER_RESOURCES_KEY,
    resolved_trial_config,
    run_trial,
    trial_params,
)

DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "default.yaml"
EXIT_BAD_INPUT = 2
_TRACKERS: dict[str, tracking.SearchTracker] = {}  # Tune unpickles callbacks on restore


# --------------------------------------------------------------------------- MLflow callback


def _status_of(result: dict[str, Any], epochs: int) -> tuple[str, str | None]:
    """MLflow status of a trial that Tune completed: diverged, stopped early, or finished."""
    if result.get("diverged"):
        return "FAILED", str(result.get("error", "training loss became non-finite"))
    if int(result.get("epoch", 0)) < epochs:
        return "KILLED", None
    return "FINISHED", None


def _param_summary(trial_config: dict[str, Any]) -> str:
    params = trial_params(trial_config)
    return " ".join(
        f"{_short(k)}={v:.4g}" if isinstance(v, float) else f"{_short(k)}={v}"
        for k, v in params.items()
    )


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

    def __init__(self, search_id: str, epochs: int, storage: str) -> None:
        self.search_id = search_id
        self.epochs = epochs
        self.storage = storage

    @property
    def tracker(self) -> tracking.SearchTracker:
        return _TRACKERS[self.search_id]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        config = cfg.to_dict(resolved_trial_config(trial.config))
        self.tracker.start_trial(trial.trial_id, config, run_name=f"trial-{trial.trial_id}")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if "epoch" in result:
            self.tracker.log_trial_metrics(trial.trial_id, result, step=int(result["epoch"]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status, error = _status_of(trial.last_result or {}, self.epochs)
        self._upload_best_checkpoint(trial)
        self.tracker.end_trial(trial.trial_id, status, error)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._upload_best_checkpoint(trial)
        self.tracker.end_trial(trial.trial_id, "FAILED", _read_error(trial))

    def _upload_best_checkpoint(self, trial: Any) -> None:
        local = best_checkpoint_dir(trial_checkpoint_roots(trial, self.storage))
        if local is not None:
            self.tracker.log_trial_artifacts(trial.trial_id, local, "checkpoint")


# --------------------------------------------------------------------------- checkpoints


def trial_checkpoint_roots(trial: Any, storage: str) -> list[str]:
    """Where a trial's checkpoints live: its Tune dir, or its Ray Train run (multi-worker)."""
    scheme = storage.split("://")[0] + "://" if "://" in storage else ""
    tune_dir = trial.path if "://" in trial.path else f"{scheme}{trial.path}"
    return [tune_dir, f"{storage.rstrip('/')}/train_runs/{trial.trial_id}"]


def _filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if "://" in uri:
        return pyarrow.fs.FileSystem.from_uri(uri)
    return pyarrow.fs.LocalFileSystem(), uri


def best_checkpoint_dir(roots: list[str]) -> Path | None:
    """Download the kept checkpoint with the highest val_acc to a local temp dir."""
    import json

    best: tuple[float, pyarrow.fs.FileSystem, str] | None = None
    for root in roots:
        fs, path = _filesystem(root)
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        except OSError:
            continue
        for info in infos:
            if info.type != pyarrow.fs.FileType.Directory or "checkpoint_" not in info.base_name:
                continue
            try:
                with fs.open_input_stream(f"{info.path}/{METRICS_FILE}") as handle:
                    val = float(json.loads(handle.read())["val_acc"])
            except (OSError, ValueError, KeyError):
                continue
            if best is None or val > best[0]:
                best = (val, fs, info.path)
    if best is None:
        return None
    local = Path(tempfile.mkdtemp(prefix="bake_ray_best_"))
    for name in (CHECKPOINT_FILE, METRICS_FILE):
        pyarrow.fs.copy_files(
            f"{best[2]}/{name}",
            str(local / name),
            source_filesystem=best[1],
            destination_filesystem=pyarrow.fs.LocalFileSystem(),
        )
    return local


# --------------------------------------------------------------------------- the Tuner


def optuna_space(space: ss.SearchSpace) -> dict[str, optuna.distributions.BaseDistribution]:
    """The space as Optuna distributions, keyed by dotted config path."""
    dists = optuna.distributions
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for d in space.dimensions:
        if d.distribution == "choice":
            out[d.key] = dists.CategoricalDistribution(list(d.values))
        elif d.distribution == "int":
            out[d.key] = dists.IntDistribution(int(d.low), int(d.high))
        else:
            out[d.key] = dists.FloatDistribution(d.low, d.high, log=d.distribution == "loguniform")
    return out


def _trial_resources(space: ss.SearchSpace, has_driver_slot: bool) -> dict[str, float]:
    """A one-worker trial holds its worker's resources; a multi-worker trial only drives."""
    b = space.budget
    if b.workers_per_trial == 1 and not b.always_use_worker_group:
        return {"CPU": b.cpus_per_worker, "GPU": b.gpus_per_worker}
    return {"TRAIN_DRIVER": 1} if has_driver_slot else {"CPU": 0.01}


def build_tuner(
    space: ss.SearchSpace,
    storage: str,
    name: str,
    concurrency: int,
    callback: MlflowTrialCallback,
    has_driver_slot: bool,
) -> Any:
    """Tuner = OptunaSearch (seeded TPE, initial points first) + ASHA over epochs."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(
        optuna_space(space),
        metric=space.metric,
        mode=space.mode,
        points_to_evaluate=[dict(p) for p in space.initial_points] or None,
        sampler=optuna.samplers.TPESampler(seed=space.seed),
    )
    scheduler = None
    if space.scheduler.type == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=space.epochs,
            grace_period=space.scheduler.grace_period,
            reduction_factor=space.scheduler.reduction_factor,
        )
    # trials run in their own directories: data and weights paths must not be relative
    base = cfg.to_dict(absolute_paths(ss.trial_config(space, {})))
    trainable = tune.with_resources(run_trial, _trial_resources(space, has_driver_slot))
    return tune.Tuner(
        trainable,
        param_space={
            BASE_KEY: base,
            TRAIN_STORAGE_KEY: f"{storage.rstrip('/')}/{name}/train_runs",
            WORKER_GROUP_KEY: space.budget.always_use_worker_group,
            WORKER_RESOURCES_KEY: {
                "CPU": space.budget.cpus_per_worker,
                "GPU": space.budget.gpus_per_worker,
            },
        },
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            metric=space.metric,
            mode=space.mode,
            num_samples=space.budget.num_samples,
            max_concurrent_trials=concurrency,
            trial_dirname_creator=_trial_dirname,
            reuse_actors=True,  # a finished trial's process (imports done) runs the next one
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            verbose=0,
            callbacks=[callback, ProgressCallback(space.epochs)],
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_acc", checkpoint_score_order="max"
            ),
            failure_config=tune.FailureConfig(max_failures=space.budget.max_failures),
        ),
    )


# --------------------------------------------------------------------------- results


@dataclass
class TrialRow:
    """One line of the final table."""

    trial_id: str
    params: dict[str, Any]
    best_val_acc: float
    test_acc: float
    epochs: int
    status: str


def _row(result: Any, space: ss.SearchSpace) -> TrialRow:
    metrics = result.metrics or {}
    params = {d.key: result.config.get(d.key) for d in space.dimensions}
    epochs = int(metrics.get("epoch", 0))
    if result.error is not None:
        status = "error"
    elif metrics.get("diverged"):
        status = "diverged"
    else:
        status = "stopped" if epochs < space.epochs else "finished"
    return TrialRow(
        trial_id=str(metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")),
        params=params,
        best_val_acc=float(metrics.get("best_val_acc", 0.0)),
        test_acc=float(metrics.get("test_acc_at_best_val", float("nan"))),
        epochs=epochs,
        status=status,
    )


def _short(key: str) -> str:
    return {"bake.temperature": "T", "bake.omega": "omega", "bake.loss_weight": "lambda"}.get(
        key, key.split(".")[-1]
    )


def format_table(rows: list[TrialRow]) -> str:
    """Trials ranked by best validation accuracy (test accuracy is that epoch's, not the max)."""
    keys = list(rows[0].params) if rows else []
    header = [
        "rank",
        "trial",
        *(_short(k) for k in keys),
        "best val",
        "its test",
        "epochs",
        "status",
    ]
    lines = [header]
    for i, row in enumerate(rows, 1):
        values = [
            f"{row.params[k]:.4g}" if isinstance(row.params[k], float) else str(row.params[k])
            for k in keys
        ]
        lines.append(
            [
                str(i),
                row.trial_id,
                *values,
                f"{row.best_val_acc:.4f}",
                f"{row.test_acc:.4f}",
                str(row.epochs),
                row.status,
            ]
        )
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    return "\n".join(
        "  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in lines
    )


def study_from_rows(rows: list[TrialRow], space: ss.SearchSpace) -> optuna.Study:
    """An Optuna study rebuilt from the results (for plots), independent of Tune internals."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    dists = optuna_space(space)
    for row in rows:
        if row.status == "error":
            continue
        study.add_trial(
            optuna.trial.create_trial(
                params=row.params, distributions=dists, value=row.best_val_acc
            )
        )
    return study


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bake_ray.tune", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_SPACE, help="search-space YAML")
    cfg.add_override_argument(
        parser,
        "budget.*, scheduler.*, objective.*, seed (the sampler's) and name edit the "
        "search file; base.seed=N or any other config key (bake.omega=0.7) edits the base "
        "training config",
    )
    parser.add_argument("--num-samples", type=int, help="number of trials (budget.num_samples)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the latest (or --name) search"
    )
    parser.add_argument("--name", help="experiment name (default: <space name>-<timestamp>)")
    parser.add_argument(
        "--storage",
        help="checkpoint storage: a path or s3:// URI "
        "(default: $BAKE_RAY_STORAGE or ./ray_results)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)",
    )
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS or local)")
    return parser.parse_args(argv)


def resolve_storage(arg: str | None) -> str:
    storage = arg or os.environ.get("BAKE_RAY_STORAGE") or "ray_results"
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def find_experiment(storage: str, space: ss.SearchSpace, name: str | None, resume: bool) -> str:
    """The experiment name: given, the newest of this space when resuming, or a new one."""
    if name or not resume:
        return name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    fs, root = _filesystem(storage)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    mine = sorted(i.base_name for i in infos if i.base_name.startswith(f"{space.name}-"))
    if not mine:
        raise ConfigError(f"--resume: no earlier search named {space.name}-* under {storage}")
    return mine[-1]


def _can_restore(path: str) -> bool:
    return tune.Tuner.can_restore(path)


@dataclass
class Plan:
    """Everything checked before Ray starts."""

    space: ss.SearchSpace
    storage: str
    name: str
    tracking_uri: str


def plan(args: argparse.Namespace) -> Plan:
    """Validate the whole search before any Ray, MLflow run or training starts."""
    overrides = list(args.overrides)
    if args.num_samples is not None:
        overrides.append(f"budget.num_samples={args.num_samples}")
    space = ss.load(args.config, overrides)
    check_data_available(space.base.data)
    for model in ss.model_configs(space):
        check_model_available(model, *input_shape(space.base.data))
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        _check_fits_this_machine(space)
    storage = resolve_storage(args.storage)
    name = find_experiment(storage, space, args.name, args.resume)
    exp_path = f"{storage.rstrip('/')}/{name}"
    if args.resume and not _can_restore(exp_path):
        raise ConfigError(f"--resume: {exp_path} holds no restorable search")
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_tracking_reachable(uri)  # last: for sqlite it creates the database's folder
    return Plan(space, storage, name, uri)


def _check_fits_this_machine(space: ss.SearchSpace) -> None:
    """A local Ray gets this machine's CPUs and GPUs: refuse a budget that can never be
    placed before Ray starts, so nothing is written and no Ray log buries the error.
    A Ray already running in this process (tests, benchmarks) is checked after joining."""
    import ray
    import torch

    if not ray.is_initialized():
        ss.check_fits(space, float(os.cpu_count() or 1), float(torch.cuda.device_count()))


def _init_ray(address: str | None) -> tuple[float, float, bool]:
    """Join or start Ray; returns (CPUs, GPUs, whether a TRAIN_DRIVER slot exists)."""
    import ray

    from bake_ray.raytrain import init_ray

    init_ray(address)
    resources = ray.cluster_resources()
    return resources.get("CPU", 0.0), resources.get("GPU", 0.0), "TRAIN_DRIVER" in resources


def run_search(p: Plan, address: str | None, resume: bool) -> list[TrialRow]:
    """Run (or resume) the search and return its trials ranked by best validation accuracy."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")  # restorable state after each step
    cpus, gpus, driver_slot = _init_ray(address)
    concurrency = ss.check_fits(p.space, cpus, gpus)
    tracker = tracking.SearchTracker(p.space.name, p.name, p.tracking_uri, run_name=p.name)
    _TRACKERS[p.name] = tracker
    exp_path = f"{p.storage.rstrip('/')}/{p.name}"
    if resume and _can_restore(exp_path):
        print(f"resuming search {p.name} from {exp_path}", flush=True)
        tuner = tune.Tuner.restore(
            exp_path,
            trainable=tune.with_resources(run_trial, _trial_resources(p.space, driver_slot)),
            resume_unfinished=True,
            resume_errored=True,
        )
    else:
        if resume:
            raise ConfigError(f"--resume: {exp_path} holds no restorable search")
        _log_search_setup(tracker, p, concurrency)
        callback = MlflowTrialCallback(p.name, p.space.epochs, p.storage.rstrip("/") + "/" + p.name)
        tuner = build_tuner(p.space, p.storage, p.name, concurrency, callback, driver_slot)
    print(
        f"search {p.name}: {p.space.budget.num_samples} trials, {concurrency} at a time, "
        f"{p.space.epochs} epochs max; checkpoints in {exp_path}",
        flush=True,
    )
    results = tuner.fit()
    rows = sorted((_row(r, p.space) for r in results), key=lambda r: -r.best_val_acc)
    _finish(tracker, p, rows, exp_path)
    return rows


def _log_search_setup(tracker: tracking.SearchTracker, p: Plan, concurrency: int) -> None:
    b, s = p.space.budget, p.space.scheduler
    tracker.log_search_params(
        {
            "space": p.space.name,
            "num_samples": b.num_samples,
            "concurrency": concurrency,
            "workers_per_trial": b.workers_per_trial,
            "gpus_per_worker": b.gpus_per_worker,
            "epochs": p.space.epochs,
            "scheduler": s.type,
            "asha.grace_period": s.grace_period,
            "asha.reduction_factor": s.reduction_factor,
            "sampler": "optuna.TPESampler",
            "seed": p.space.seed,
            "metric": p.space.metric,
            "storage": p.storage,
        }
    )
    if p.space.source is not None:
        tracker.log_search_artifact(p.space.source, "space")


def best_config(p: Plan, row: TrialRow) -> cfg.Config:
    """The winner as a training config: full epochs, and in-process when trials used 1 worker."""
    config = ss.trial_config(p.space, row.params)
    if p.space.budget.workers_per_trial == 1:
        values = cfg.to_dict(config)
        values["runtime"]["workers"] = 0
        config = cfg.from_dict(values)
    return config


def _finish(tracker: tracking.SearchTracker, p: Plan, rows: list[TrialRow], exp_path: str) -> None:
    """Table, best config, summary artifacts and plots on the parent run; close every run."""
    table = format_table(rows)
    print("\n" + table + "\n", flush=True)
    out = Path(tempfile.mkdtemp(prefix="bake_ray_summary_"))
    (out / "trials.txt").write_text(table + "\n")
    tracker.log_search_artifact(out / "trials.txt", "summary")
    usable = [r for r in rows if r.status != "error"]
    if usable:
        best = usable[0]
        config = best_config(p, best)
        best_path = _best_config_path(exp_path)
        cfg.save(config, best_path)
        tracker.log_search_artifact(best_path, "summary")
        tracker.log_best(
            best.trial_id,
            cfg.to_dict(config),
            {"val_acc": best.best_val_acc, "test_acc": best.test_acc},
        )
        tracker.log_study_plots(study_from_rows(rows, p.space))
        print(
            f"best trial {best.trial_id}: val {best.best_val_acc:.4f}, test {best.test_acc:.4f}; "
            f"config written to {best_path}\n"
            f"  train it: python -m bake_ray.train --config {best_path}"
        )
    tracker.end_orphaned_trials(row.trial_id for row in rows)
    report = tracker.close_all()
    if not report.ok:
        print(f"warning: MLflow is missing some writes: {report}", file=sys.stderr)
    print(
        f"MLflow: experiment '{p.space.name}', parent run '{p.name}' at {p.tracking_uri}\n"
        f"  open it: mlflow ui --backend-store-uri {p.tracking_uri}",
        flush=True,
    )


def _best_config_path(exp_path: str) -> Path:
    """Beside the experiment when it is local; in the working directory otherwise."""
    if "://" in exp_path:
        return Path.cwd() / f"best_config-{Path(exp_path).name}.yaml"
    return Path(exp_path) / "best_config.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        p = plan(args)
    except (ConfigError, tracking.TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        rows = run_search(p, args.address, args.resume)
    except (ConfigError, tracking.TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0 if any(r.status != "error" for r in rows) else 1


if __name__ == "__main__":
    # Run the importable module's main: Tune pickles trainables and callbacks, and objects
    # defined in __main__ would be pickled by value along with the driver's live state.
    from bake_ray.tune import main as _main

    sys.exit(_main())
