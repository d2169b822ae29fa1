"""What a search says when it ends: the ranked trial table, the best config, the parent
run's summary artifacts, description and Optuna plots, and the command that trains the
winner."""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from bake_ray import tracking
from bake_ray.core import config as cfg
from bake_ray.core import search_space as ss
from bake_ray.core import storage
from bake_ray.tracking import RunStatus
from bake_ray.tracking.model import publish_search_winner
from bake_ray.tracking.search_runs import SearchTracker
from bake_ray.tune import ranking
from bake_ray.tune import record as rec
from bake_ray.tune.plan import Plan
from bake_ray.tune.ranking import TrialRow

SCRATCH_DIRS: dict[str, Path] = {}  # search id -> this driver's temporary folder (removed at exit)


def param_summary(params: dict[str, Any]) -> str:
    """A trial's sampled values in one line (Tune's trial config holds only those)."""
    return " ".join(
        f"{_short(k)}={v:.4g}" if isinstance(v, float) else f"{_short(k)}={v}"
        for k, v in params.items()
    )


def accuracy_interval(result: dict[str, Any]) -> dict[str, float]:
    """``best_val_acc_lo``/``_hi``: the 95% Wilson interval of the best validation accuracy
    so far, over the ``val_n`` validation images (nothing when the count is unknown)."""
    n = int(result.get("val_n", 0) or 0)
    if n <= 0 or "best_val_acc" not in result:
        return {}
    low, high = ranking.wilson_interval(round(float(result["best_val_acc"]) * n), n)
    return {"best_val_acc_lo": low, "best_val_acc_hi": high}


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


@dataclass(frozen=True)
class Outcome:
    """How a trial ended, in the one vocabulary the table, the progress lines and MLflow share.

    ``word``: the table's status (finished, stopped, diverged, error; a search interrupted
    mid-trial shows ``interrupted``); ``status``: its MLflow run status. A trial ASHA stopped
    early did nothing wrong: its run is FINISHED, tagged ``bake_ray.stopped_early=asha``
    with the epochs it ran. KILLED is kept for interrupted searches, FAILED for errors.
    """

    word: str
    status: RunStatus
    error: str | None = None
    tags: dict[str, str] | None = None
    label: str = "done"  # the driver's progress line


def trial_outcome(result: Mapping[str, Any], epochs: int, error: str | None = None) -> Outcome:
    """The outcome of a trial Tune ended, from its last result (``error``: Tune's, if any)."""
    if error is not None:
        return Outcome("error", "FAILED", error, label=f"error: {error}")
    if result.get("diverged"):
        reason = str(result.get("error", "training loss became non-finite"))
        return Outcome("diverged", "FAILED", reason, label=f"failed: {reason}")
    reached = int(result.get("epoch", 0))
    if reached < epochs:
        tags = {tracking.TAG_STOPPED_EARLY: "asha", tracking.TAG_EPOCHS_RUN: str(reached)}
        label = f"stopped early by ASHA after epoch {reached}/{epochs}"
        return Outcome("stopped", "FINISHED", None, tags, label)
    return Outcome("finished", "FINISHED")


def trial_row(result: Any, space: ss.SearchSpace) -> TrialRow:
    metrics = result.metrics or {}
    params = {d.key: result.config.get(d.key) for d in space.dimensions}
    epochs = int(metrics.get("epoch", 0))
    error = None if result.error is None else str(result.error)
    status = trial_outcome(metrics, space.epochs, error).word
    return TrialRow(
        trial_id=str(metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")),
        params=params,
        best_val_acc=float(metrics.get("best_val_acc", 0.0)),
        test_acc=float(metrics.get("test_acc_at_best_val", float("nan"))),
        epochs=epochs,
        status=status,
        val_n=int(metrics.get("val_n", 0)),
        val_loss=float(metrics.get("val_loss_at_best_val", float("inf"))),
        started=_started(metrics),
    )


def _started(metrics: dict[str, Any]) -> float:
    """When the trial started, for the order of Optuna's history plot: its last report's
    time less the time it has run (a trial paused by an interrupt looks as late as the pause
    was long; Tune's own logs, which would say better, may be turned off)."""
    return float(metrics.get("timestamp", 0.0)) - float(metrics.get("time_total_s", 0.0))


def _short(key: str) -> str:
    return cfg.BAKE_ALIASES.get(key, key.split(".")[-1])


def format_table(rows: list[TrialRow]) -> str:
    """Trials in ranking order (:mod:`bake_ray.tune.ranking`): best validation accuracy with its
    count of correct images out of n and its 95% Wilson interval, the validation loss that
    breaks ties, and the test accuracy of that same epoch (not the best test accuracy)."""
    keys = list(rows[0].params) if rows else []
    header = [
        "rank",
        "trial",
        *(_short(k) for k in keys),
        "best val",
        "correct/n",
        "95% interval",
        "val loss",
        "its test",
        "epochs",
        "status",
    ]
    lines = [header, *(_table_line(i, row, keys) for i, row in enumerate(rows, 1))]
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    table = "\n".join(
        "  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in lines
    )
    return table + "\n" + TABLE_NOTE


TABLE_NOTE = (
    "ranked by best val, then lower val loss at that epoch, then trial id; "
    "95% interval: Wilson score interval of best val over its n validation images"
)


def _table_line(rank: int, row: TrialRow, keys: list[str]) -> list[str]:
    values = [
        f"{row.params[k]:.4g}" if isinstance(row.params[k], float) else str(row.params[k])
        for k in keys
    ]
    known = row.val_n > 0
    low, high = row.interval
    return [
        str(rank),
        row.trial_id,
        *values,
        f"{row.best_val_acc:.4f}",
        f"{row.val_correct}/{row.val_n}" if known else "-",
        f"{low:.4f}-{high:.4f}" if known else "-",
        f"{row.val_loss:.4f}" if math.isfinite(row.val_loss) else "-",
        f"{row.test_acc:.4f}",
        str(row.epochs),
        row.status,
    ]


def study_from_rows(rows: list[TrialRow], space: ss.SearchSpace) -> optuna.Study:
    """An Optuna study rebuilt from the results (for plots), independent of Tune internals.

    Trials are added in the order they started, so the history plot shows the search as it
    went (rows come in ranking order, which would draw a monotone curve)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    dists = optuna_space(space)
    for row in sorted(rows, key=lambda r: (r.started, r.trial_id)):
        if row.status == "error":
            continue
        study.add_trial(
            optuna.trial.create_trial(
                params=row.params, distributions=dists, value=row.best_val_acc
            )
        )
    return study


def _scratch_dir(search_id: str, name: str) -> Path:
    scratch = SCRATCH_DIRS.get(search_id)
    if scratch is None:  # called outside run_search (tests): the caller owns the folder
        return Path(tempfile.mkdtemp(prefix=f"bake_ray_{name}_"))
    path = scratch / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_search_setup(tracker: SearchTracker, p: Plan, concurrency: int) -> None:
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
    tracker.save_runs_view([d.key for d in p.space.dimensions])


def best_config(p: Plan, row: TrialRow) -> cfg.Config:
    """The winner as a training config: full epochs, and the trials' ``runtime.workers``
    (0, in-process, when trials used one worker: the meaning ``train`` gives it too)."""
    return ss.trial_config(p.space, row.params)


def finish_search(tracker: SearchTracker, p: Plan, rows: list[TrialRow], exp_path: str) -> None:
    """Table, best config, summary artifacts and plots on the parent run; close every run."""
    ui = tracking.ui_base(p.tracking_uri, p.joined)
    view = tracking.runs_view_url(ui, tracker.experiment_id, p.name)
    table = "\n".join(
        line for line in (format_table(rows), ranking.tie_note(rows)) if line is not None
    )
    if any(r.status != "error" for r in rows):
        table += "\n" + ranking.separability_line(rows)
    print("\n" + table + "\n", flush=True)
    out = _scratch_dir(p.name, "summary")
    (out / "trials.txt").write_text(table + "\n")
    storage.write_text(storage.join(exp_path, rec.SUMMARY_FILE), table + "\n")
    tracker.log_search_artifact(out / "trials.txt", "summary")
    usable = [r for r in rows if r.status != "error"]
    if usable:
        best = usable[0]
        config = best_config(p, best)
        best_path = store_best_config(config, exp_path, out)
        tracker.log_search_artifact(out / rec.BEST_CONFIG_FILE, "summary")
        tracker.log_best(
            best.trial_id,
            cfg.to_dict(config),
            {"val_acc": best.best_val_acc, "test_acc": best.test_acc, **_best_metrics(best)},
        )
        publish_search_winner(tracker, best.trial_id, config, p.register)
        description = ranking.describe(rows, _short)
        tracker.describe_search(f"{description}\n\n[The trials, best first]({view})", best.params)
        upload_study_plots(tracker, study_from_rows(rows, p.space), _scratch_dir(p.name, "optuna"))
        print(
            f"best trial {best.trial_id}: val {best.best_val_acc:.4f}"
            f"{_interval_text(best)}, test {best.test_acc:.4f}; "
            f"config written to {best_path}\n"
            f"  train it: {_train_hint(p, tracker, best_path, config.runtime.workers == 0)}"
        )
    tracker.end_orphaned_trials(row.trial_id for row in rows)
    missing = tracker.close_all()
    if missing:
        print(f"warning: MLflow is missing writes of: {', '.join(missing)}", file=sys.stderr)
    print(
        f"MLflow: experiment '{p.space.name}', parent run '{p.name}' at {p.tracking_uri}\n"
        f"  open it: {tracking.open_hint(p.tracking_uri, p.joined)}\n"
        f"  its trials, searched params vs best_val_acc: {view}",
        flush=True,
    )


def _interval_text(row: TrialRow) -> str:
    if row.val_n <= 0:
        return ""
    low, high = row.interval
    return f" ({row.val_correct}/{row.val_n}, 95% interval {low:.4f}-{high:.4f})"


def _best_metrics(row: TrialRow) -> dict[str, float]:
    """The winner's interval and n, logged on the parent as ``best.val_acc_lo`` etc."""
    if row.val_n <= 0:
        return {}
    low, high = row.interval
    return {"val_acc_lo": low, "val_acc_hi": high, "val_n": float(row.val_n)}


def store_best_config(config: cfg.Config, exp_path: str, scratch: Path) -> str:
    """Write the winner's config beside the search in its storage (local or ``s3://``),
    where ``compare --search`` and ``train --config`` find it from any folder or machine,
    and a copy in ``scratch`` for MLflow. Returns where it is stored."""
    text = cfg.dump(config)
    (scratch / rec.BEST_CONFIG_FILE).write_text(text)
    location = storage.join(exp_path, rec.BEST_CONFIG_FILE)
    storage.write_text(location, text)
    return location


def _train_hint(p: Plan, tracker: SearchTracker, best_path: str, in_process: bool) -> str:
    """How to train the winner from where the user is: on a cluster, a job that trains on a
    worker node (one Ray Train worker, not in the job's process on the head) and reads the
    config from the search's storage when that is an object store, else from MLflow (the
    head's disk is not the user's); here, this interpreter. Either way its MLflow run is a
    child of the search's parent run."""
    mlflow = f"--tracking-uri {p.tracking_uri} --parent-run-id {tracker.parent_run_id}"
    if not p.joined:
        return f"{_python()} -m bake_ray.train --config {best_path} {mlflow}"
    fetch = None
    if not storage.is_remote(best_path):
        local = Path(best_path)
        fetch = tracking.download_hint(p.tracking_uri, tracker.parent_run_id, "summary", local)
    config = Path(best_path).name if fetch else best_path  # else: the job can read it
    submit = (
        "ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
        f"python -m bake_ray.train --config {config}{' --workers 1' if in_process else ''} {mlflow}"
    )
    return f"{fetch}, then\n    {submit}" if fetch else submit


def _python() -> str:
    """This interpreter, as short as it can be said: ``python`` when that is the one on PATH.
    Paths are compared unresolved: a venv's python is a link to a python without bake-ray."""
    found = shutil.which("python")
    if found and Path(found).absolute() == Path(sys.executable).absolute():
        return "python"
    return sys.executable


def upload_study_plots(tracker: SearchTracker, study: optuna.Study, out_dir: Path) -> list[str]:
    """Optuna's plots of the search, written to ``out_dir`` and uploaded to the parent run
    under ``optuna/``; a plot skipped is explained there in ``notes.txt``. Returns the plot
    file names."""
    try:
        written, notes = write_optuna_plots(study, out_dir)
    except Exception as err:  # never crash the search for a plot
        written, notes = [], [f"plots failed: {type(err).__name__}: {err}"]
    if notes:
        (out_dir / "notes.txt").write_text("\n".join(notes) + "\n")
    tracker.log_search_artifacts(out_dir, "optuna")
    return [path.name for path in written]


def write_optuna_plots(study: optuna.Study, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Save optimisation history, parameter importances and parallel coordinates as PNGs.

    Returns the files written and notes on plots skipped (too few trials, multi-objective,
    plotting errors): a plot must never crash a search.
    """
    import matplotlib

    matplotlib.use("Agg")  # the driver has no display; must precede pyplot
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    plots = {
        "optimization_history": (ovm.plot_optimization_history, 1),
        "param_importances": (ovm.plot_param_importances, 2),
        "parallel_coordinate": (ovm.plot_parallel_coordinate, 1),
    }
    written: list[Path] = []
    notes: list[str] = []
    if len(study.directions) > 1:
        return written, ["multi-objective study: plots skipped"]
    for name, (plot, min_trials) in plots.items():
        if len(complete) < min_trials:
            notes.append(f"{name}: skipped, {len(complete)} complete trial(s) < {min_trials}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
            figure = _figure_of(axes)
            path = out_dir / f"{name}.png"
            figure.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(figure)
            written.append(path)
        except Exception as err:  # a plot is a nicety; the search goes on
            notes.append(f"{name}: skipped, {type(err).__name__}: {err}")
    return written, notes


def _figure_of(axes: Any) -> Any:
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure
