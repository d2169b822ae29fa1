"""Running a planned search: the Tuner (Optuna TPE + ASHA), Ctrl-C, the search record.

:mod:`bake_ray.tune` is the command line and the plan (everything checked before Ray
starts); this module starts or joins Ray, builds or restores the ``Tuner``, runs it, and on
SIGINT/SIGTERM stops it so that ``--resume`` continues it. All MLflow writes happen on the
driver, in :class:`bake_ray.tune.callbacks.MlflowTrialCallback`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from ray import tune

from bake_ray import tracking
from bake_ray.core import search_space as ss
from bake_ray.core.config import ConfigError
from bake_ray.scale import capacity, pending
from bake_ray.scale.raystart import TRAIN_DRIVER
from bake_ray.tracking.search_runs import SearchTracker
from bake_ray.tune import ranking
from bake_ray.tune import record as rec
from bake_ray.tune.callbacks import (
    TRIAL_STATUSES,
    MlflowTrialCallback,
    ProgressCallback,
    trial_dirname,
)
from bake_ray.tune.plan import Plan
from bake_ray.tune.ranking import TrialRow
from bake_ray.tune.summary import (
    SCRATCH_DIRS,
    finish_search,
    format_table,
    log_search_setup,
    optuna_space,
    trial_row,
)
from bake_ray.tune.trial import search_trainable, trial_base

# --------------------------------------------------------------------------- the Tuner


def can_restore(path: str) -> bool:
    """Whether ``path`` holds a Tune experiment that ``Tuner.restore`` can continue."""
    return tune.Tuner.can_restore(path)


def build_tuner(
    space: ss.SearchSpace,
    storage: str,
    name: str,
    concurrency: int,
    callback: MlflowTrialCallback,
    has_driver_slot: bool,
) -> Any:
    """Tuner = OptunaSearch (seeded TPE, initial points first) + ASHA over epochs."""
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    from bake_ray.tune.asha import STATE_FILE as ASHA_STATE_FILE
    from bake_ray.tune.asha import ResumableASHA

    searcher = OptunaSearch(
        optuna_space(space),
        metric=space.metric,
        mode=space.mode,
        points_to_evaluate=[dict(p) for p in space.initial_points] or None,
        sampler=optuna.samplers.TPESampler(seed=space.seed),
    )
    scheduler = None
    if space.scheduler.type == "asha":
        scheduler = ResumableASHA(
            f"{storage.rstrip('/')}/{name}/{ASHA_STATE_FILE}",
            time_attr="epoch",
            max_t=space.epochs,
            grace_period=space.scheduler.grace_period,
            reduction_factor=space.scheduler.reduction_factor,
        )
    return tune.Tuner(
        search_trainable(space, f"{storage.rstrip('/')}/{name}", has_driver_slot),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            metric=space.metric,
            mode=space.mode,
            num_samples=space.budget.num_samples,
            max_concurrent_trials=concurrency,
            trial_dirname_creator=trial_dirname,
            reuse_actors=True,  # a finished trial's process (imports done) runs the next one
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            verbose=0,
            # result.json is what MLflow is re-synced from: kept even when auto loggers are off
            callbacks=[callback, ProgressCallback(space.epochs), JsonLoggerCallback()],
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_acc", checkpoint_score_order="max"
            ),
            failure_config=tune.FailureConfig(max_failures=space.budget.max_failures),
        ),
    )


# --------------------------------------------------------------------------- running it


def _init_ray(address: str | None) -> tuple[capacity.Capacity, bool]:
    """Join or start Ray; returns its capacity (now, and at full scale when it autoscales)
    and whether a TRAIN_DRIVER slot exists."""
    cap = capacity.join(address)
    return cap, TRAIN_DRIVER in cap.now


def run_search(p: Plan, address: str | None, resume: bool) -> list[TrialRow]:
    """Run (or resume) the search and return its trials ranked by best validation accuracy.

    Raises :class:`SearchInterrupted` after SIGINT/SIGTERM, once the trials are stopped, the
    state is saved and MLflow says so.
    """
    with _scratch(p.name):
        return _run_search(p, address, resume)


def _run_search(p: Plan, address: str | None, resume: bool) -> list[TrialRow]:
    from bake_ray.scale.raystart import ray_keeps_its_temp_files

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")  # restorable state after each step
    with ray_keeps_its_temp_files():
        cap, driver_slot = _init_ray(address)
    concurrency = capacity.search_concurrency(p.space, cap, driver_slot)
    tracker = SearchTracker(p.space.name, p.name, p.tracking_uri, run_name=p.name)
    exp_path = p.exp_path
    record = _start_record(p, address, tracker.parent_run_id)
    if resume and can_restore(exp_path):
        print(f"resuming search {p.name} from {exp_path}", flush=True)
        tuner = tune.Tuner.restore(
            exp_path,
            trainable=search_trainable(p.space, exp_path, driver_slot),
            resume_unfinished=True,
            resume_errored=True,
        )
    else:
        if resume:
            raise ConfigError(f"--resume: {exp_path} holds no restorable search")
        log_search_setup(tracker, p, concurrency)
        callback = MlflowTrialCallback(
            p.space.name, p.name, p.tracking_uri, p.space.epochs, exp_path, trial_base(p.space)
        )
        tuner = build_tuner(p.space, p.storage, p.name, concurrency, callback, driver_slot)
    print(
        f"search {p.name}: {p.space.budget.num_samples} trials, {concurrency} at a time, "
        f"{p.space.epochs} epochs max; checkpoints in {exp_path}",
        flush=True,
    )
    with _interruptible() as stop, pending.watch_pending(cap.autoscaling):
        results = tuner.fit()
    if stop.is_set():
        _finish_interrupted(tracker, p, results, record)
    rows = ranking.rank([trial_row(r, p.space) for r in results])
    summary = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, summary)):
        finish_search(tracker, p, rows, exp_path)
    record.status = rec.FINISHED
    record.result = {"summary": summary.getvalue(), "trials": rec.rows_data(rows)}
    rec.save(exp_path, record)
    return rows


# --------------------------------------------------------------------------- interruption


class SearchInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the search; its state is saved and it can be resumed.

    A ``KeyboardInterrupt``, so that Ctrl-C in a notebook ends the call as Ctrl-C does;
    ``result`` (set by :func:`bake_ray.tune.command.tune`) holds the trials at the stop."""

    def __init__(self, resume_command: str) -> None:
        super().__init__(resume_command)
        self.resume_command = resume_command
        self.result: Any = None


class _Tee(io.TextIOBase):
    """Writes to two streams: the terminal, and the copy kept as the search's result."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def _scratch(search_id: str) -> Iterator[Path]:
    """This driver's temporary folder (best-checkpoint copies, summary files), always removed."""
    with tempfile.TemporaryDirectory(prefix="bake_ray_search_") as tmp:
        SCRATCH_DIRS[search_id] = Path(tmp)
        try:
            yield Path(tmp)
        finally:
            SCRATCH_DIRS.pop(search_id, None)


class _DropTuneResumeHint(logging.Filter):
    """Ray's own interrupt messages name ``Tuner.restore(...)``: bake-ray prints its command."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("Resume experiment with" in text or "Trials did not complete" in text)


@contextlib.contextmanager
def _interruptible() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM once: ask Tune to stop gracefully (it saves the experiment state).
    Twice: stop at once (KeyboardInterrupt); the state of the last step is on disk anyway.

    Tune's graceful stop is wired to SIGUSR1 for as long as ``fit`` runs; before Tune has
    installed it, a signal interrupts at once.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals reach the main thread only: a search run from a thread (an
        return  # API call) is stopped by its caller
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune would print Python, not bake-ray

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() or signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            stop.set()
            raise KeyboardInterrupt
        stop.set()
        print(
            f"\n{signal.Signals(signum).name}: stopping the trials and saving the search "
            "state (again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGUSR1)

    tune_log = logging.getLogger("ray.tune.tune")
    hint = _DropTuneResumeHint()
    tune_log.addFilter(hint)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        tune_log.removeFilter(hint)


def resume_command(p: Plan, address: str | None) -> str:
    """The bake-ray command that continues this search (the record holds everything else)."""
    parts = ["python", "-m", "bake_ray.tune", "--resume", "--name", p.name, "--storage", p.storage]
    if address:
        parts += ["--address", address]
    return shlex.join(parts)


def _start_record(p: Plan, address: str | None, parent_run_id: str) -> rec.SearchRecord:
    """Store what this search is before it runs, so any later ``--resume`` can rebuild it.
    A previous stop's trials are dropped: they are Tune's again until this run ends."""
    record = p.record or rec.SearchRecord(
        name=p.name,
        experiment=p.space.name,
        tracking_uri=p.tracking_uri,
        space_file=str(p.space.source.resolve()) if p.space.source else None,
        space=rec.resolved_raw(p.space),
    )
    record.status, record.resume_command = rec.RUNNING, resume_command(p, address)
    record.parent_run_id, record.result = parent_run_id, {}
    rec.save(p.exp_path, record)
    p.record = record
    return record


def _unfinished_trials(search_id: str) -> set[str]:
    """Trials Tune had not ended at its last step before the stop."""
    statuses = TRIAL_STATUSES.get(search_id, {})
    return {t for t, status in statuses.items() if status not in ("TERMINATED", "ERROR")}


def _finish_interrupted(
    tracker: SearchTracker, p: Plan, results: Any, record: rec.SearchRecord
) -> None:
    """Table with the unfinished trials marked ``interrupted``; MLflow runs KILLED and tagged
    with the resume command; no best config (the search is not over)."""
    unfinished = _unfinished_trials(p.name)
    rows = ranking.rank([trial_row(r, p.space) for r in results])
    for row in rows:
        if row.trial_id in unfinished:
            row.status = "interrupted"
    if rows:
        print("\n" + format_table(rows) + "\n", flush=True)
    command = record.resume_command
    tracker.mark_interrupted(f"interrupted before the search finished; resume: {command}")
    missing = tracker.close_all("KILLED")
    if missing:
        print(f"warning: MLflow is missing writes of: {', '.join(missing)}", file=sys.stderr)
    record.status, record.result = rec.INTERRUPTED, {"trials": rec.rows_data(rows)}
    rec.save(p.exp_path, record)
    not_started = p.space.budget.num_samples - len(rows)
    print(
        f"search {p.name} interrupted: {len(unfinished)} trial(s) unfinished, "
        f"{not_started} not started; no best config written; state saved in {p.exp_path}",
        flush=True,
    )
    raise SearchInterrupted(command)


def hard_stop(p: Plan, address: str | None) -> str:
    """A second Ctrl-C (or one before Tune ran): Tune's last per-step snapshot is what a
    resume starts from; MLflow and the record still say the search was interrupted."""
    command = p.record.resume_command if p.record else resume_command(p, address)
    with contextlib.suppress(tracking.TrackingError):  # the runs are found by their tags
        tracker = SearchTracker(p.space.name, p.name, p.tracking_uri)
        tracker.mark_interrupted(f"interrupted before the search finished; resume: {command}")
        tracker.close_all("KILLED")
    if p.record is not None and p.record.status == rec.RUNNING:
        p.record.status = rec.INTERRUPTED
        rec.save(p.exp_path, p.record)
    return command
