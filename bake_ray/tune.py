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
import contextlib
import io
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs
from ray import tune

from bake_ray import capacity, ranking, tracking
from bake_ray import config as cfg
from bake_ray import search_record as rec
from bake_ray import search_space as ss
from bake_ray.config import ConfigError
from bake_ray.data import check_data_available, input_shape
from bake_ray.models import check_model_available
from bake_ray.ranking import TrialRow
from bake_ray.raystart import TRAIN_DRIVER
from bake_ray.summary import (
    _SCRATCH,
    _finish,
    _log_search_setup,
    _row,
    format_table,
    optuna_space,
)
from bake_ray.trial import search_trainable, trial_base
from bake_ray.tune_callbacks import (
    _STATUSES,
    _TRACKERS,
    MlflowTrialCallback,
    ProgressCallback,
    _filesystem,
    _trial_dirname,
)

DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "default.yaml"
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd command


# --------------------------------------------------------------------------- the Tuner


def build_tuner(
    space: ss.SearchSpace,
    storage: str,
    name: str,
    concurrency: int,
    callback: MlflowTrialCallback,
    has_driver_slot: bool,
) -> Any:
    """Tuner = OptunaSearch (seeded TPE, initial points first) + ASHA over epochs."""
    from ray.tune.search.optuna import OptunaSearch

    from bake_ray.asha import STATE_FILE as ASHA_STATE_FILE
    from bake_ray.asha import ResumableASHA

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


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cfg.ArgumentParser(
        prog="python -m bake_ray.tune", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="search-space YAML (default: search_spaces/default.yaml; "
        "with --resume: the resumed search's own stored settings)",
    )
    cfg.add_override_argument(
        parser,
        "budget.*, scheduler.*, objective.*, seed (the sampler's) and name edit the "
        "search file; base.seed=N or any other config key (data.train_subset=800) edits the "
        "base training config; a key the space searches is refused",
    )
    parser.add_argument("--num-samples", type=int, help="number of trials (budget.num_samples)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the newest unfinished search in --storage (or the one named by --name)",
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
    joined: bool = False  # joined an existing cluster (--address / RAY_ADDRESS)
    record: rec.SearchRecord | None = None  # the stored search, when resuming one

    @property
    def exp_path(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.num_samples is not None:
        overrides.append(f"budget.num_samples={args.num_samples}")
    return overrides


def _check_no_searched_override(space: ss.SearchSpace, overrides: list[str]) -> None:
    """A ``--set`` on a key the search samples would be overwritten by every trial."""
    searched = {d.key for d in space.dimensions}
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key.removeprefix("base.") in searched:
            raise ConfigError(
                f"--set {key}: {key.removeprefix('base.')} is searched (space."
                f"{key.removeprefix('base.')}); change its range in the space file instead"
            )


def plan(args: argparse.Namespace) -> Plan:
    """Validate the whole search before any Ray, MLflow run or training starts."""
    storage = resolve_storage(args.storage)
    overrides = _overrides(args)
    if args.resume:
        p = _plan_resume(args, storage, overrides)
        if p.record is not None and p.record.status == rec.FINISHED:
            return p  # nothing will run: no data, cluster or tracking check needed
        space = p.space
    else:
        space = ss.load(args.config or DEFAULT_SPACE, overrides)
        _check_no_searched_override(space, list(args.overrides))
    check_data_available(space.base.data)
    for model in ss.model_configs(space):
        check_model_available(model, *input_shape(space.base.data))
    joined = bool(args.address or os.environ.get("RAY_ADDRESS"))
    if not joined:
        _check_fits_this_machine(space)
    if args.resume:
        uri = p.tracking_uri
        p.joined = joined
    else:
        name = find_experiment(storage, space, args.name, False)
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        p = Plan(space, storage, name, uri, joined)
    # Last: for sqlite it creates the database's folder. On a cluster the server may still
    # be starting (a job submitted right after `ray up`): wait for it, boundedly.
    wait_s = tracking.tracking_wait_s() if joined else 0.0
    tracking.wait_for_tracking(uri, wait_s, say=lambda line: print(line, flush=True))
    return p


def _plan_resume(args: argparse.Namespace, storage: str, overrides: list[str]) -> Plan:
    """The search to resume, rebuilt from its stored record; conflicting flags refused."""
    if args.name:
        name = args.name
        if not _can_restore(f"{storage.rstrip('/')}/{name}"):
            raise ConfigError(f"--resume: {storage.rstrip('/')}/{name} holds no restorable search")
        record = rec.load(f"{storage.rstrip('/')}/{name}")
    else:
        found = rec.newest_unfinished(storage)
        if found is None:
            raise ConfigError(
                f"--resume: no unfinished search under {storage}; name one with --name"
            )
        name, record = found
        if not _can_restore(f"{storage.rstrip('/')}/{name}"):
            raise ConfigError(f"--resume: {storage.rstrip('/')}/{name} holds no restorable search")
        print(
            f"resuming the newest unfinished search in {storage}: {name} "
            f"({record.status}; space {record.space_file or 'from the record'})",
            flush=True,
        )
    if record is None:  # a search saved before bake-ray stored records: trust the flags
        space = ss.load(args.config or DEFAULT_SPACE, overrides)
        _check_no_searched_override(space, list(args.overrides))
        return Plan(space, storage, name, tracking.resolve_tracking_uri(args.tracking_uri))
    space = _stored_space(record, args, overrides)
    if args.tracking_uri is not None:
        given = tracking.resolve_tracking_uri(args.tracking_uri)
        if given != record.tracking_uri:
            raise ConfigError(
                f"--resume: --tracking-uri {given} conflicts with the search's own "
                f"{record.tracking_uri}; drop --tracking-uri to keep its runs together"
            )
    return Plan(space, storage, name, record.tracking_uri, record=record)


def _stored_space(
    record: rec.SearchRecord, args: argparse.Namespace, overrides: list[str]
) -> ss.SearchSpace:
    """The stored search; a ``--config``/``--set`` may only repeat it, never change it."""
    stored = record.search_space()
    if args.config is None and not overrides:
        return stored
    _check_no_searched_override(stored, list(args.overrides))
    if args.config is not None:
        given, what = ss.load(args.config, overrides), f"--config {args.config}"
    else:
        given, what = record.search_space(overrides), "--set " + " ".join(overrides)
    diff = rec.first_difference(stored, given)
    if diff is not None:
        raise ConfigError(
            f"--resume: {what} conflicts with the stored search {record.name} ({diff}); "
            f"resume without it, or start a new search"
        )
    return stored


def _check_fits_this_machine(space: ss.SearchSpace) -> None:
    """A local Ray gets this machine's CPUs and GPUs: refuse a budget that can never be
    placed before Ray starts, so nothing is written and no Ray log buries the error.
    A Ray already running in this process (tests, benchmarks) is checked after joining."""
    import ray
    import torch

    if not ray.is_initialized():
        ss.check_fits(space, float(os.cpu_count() or 1), float(torch.cuda.device_count()))


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
    from bake_ray.raystart import ray_keeps_its_temp_files

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")  # restorable state after each step
    with ray_keeps_its_temp_files():
        cap, driver_slot = _init_ray(address)
    concurrency = capacity.search_concurrency(p.space, cap, driver_slot)
    tracker = tracking.SearchTracker(p.space.name, p.name, p.tracking_uri, run_name=p.name)
    _TRACKERS[p.name] = tracker
    exp_path = p.exp_path
    record = _start_record(p, address)
    if resume and _can_restore(exp_path):
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
        _log_search_setup(tracker, p, concurrency)
        callback = MlflowTrialCallback(p.name, p.space.epochs, exp_path, trial_base(p.space))
        tuner = build_tuner(p.space, p.storage, p.name, concurrency, callback, driver_slot)
    print(
        f"search {p.name}: {p.space.budget.num_samples} trials, {concurrency} at a time, "
        f"{p.space.epochs} epochs max; checkpoints in {exp_path}",
        flush=True,
    )
    with _interruptible() as stop, capacity.watch_pending(cap.autoscaling):
        results = tuner.fit()
    if stop.is_set():
        _finish_interrupted(tracker, p, results, record)
    rows = ranking.rank([_row(r, p.space) for r in results])
    summary = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, summary)):
        _finish(tracker, p, rows, exp_path)
    record.status, record.result = rec.FINISHED, {"summary": summary.getvalue()}
    rec.save(exp_path, record)
    return rows


# --------------------------------------------------------------------------- interruption


class SearchInterrupted(Exception):
    """SIGINT/SIGTERM stopped the search; its state is saved and it can be resumed."""

    def __init__(self, resume_command: str) -> None:
        super().__init__(resume_command)
        self.resume_command = resume_command


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
        _SCRATCH[search_id] = Path(tmp)
        try:
            yield Path(tmp)
        finally:
            _SCRATCH.pop(search_id, None)


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


def _start_record(p: Plan, address: str | None) -> rec.SearchRecord:
    """Store what this search is before it runs, so any later ``--resume`` can rebuild it."""
    record = p.record or rec.SearchRecord(
        name=p.name,
        experiment=p.space.name,
        tracking_uri=p.tracking_uri,
        space_file=str(p.space.source.resolve()) if p.space.source else None,
        space=rec.resolved_raw(p.space),
    )
    record.status, record.resume_command = rec.RUNNING, resume_command(p, address)
    rec.save(p.exp_path, record)
    p.record = record
    return record


def _unfinished_trials(search_id: str) -> set[str]:
    """Trials Tune had not ended at its last step before the stop."""
    statuses = _STATUSES.get(search_id, {})
    return {t for t, status in statuses.items() if status not in ("TERMINATED", "ERROR")}


def _finish_interrupted(
    tracker: tracking.SearchTracker, p: Plan, results: Any, record: rec.SearchRecord
) -> None:
    """Table with the unfinished trials marked ``interrupted``; MLflow runs KILLED and tagged
    with the resume command; no best config (the search is not over)."""
    unfinished = _unfinished_trials(p.name)
    rows = ranking.rank([_row(r, p.space) for r in results])
    for row in rows:
        if row.trial_id in unfinished:
            row.status = "interrupted"
    if rows:
        print("\n" + format_table(rows) + "\n", flush=True)
    command = record.resume_command
    tracker.mark_interrupted(f"interrupted before the search finished; resume: {command}")
    report = tracker.close_all("KILLED")
    if not report.ok:
        print(f"warning: MLflow is missing some writes: {report}", file=sys.stderr)
    record.status = rec.INTERRUPTED
    rec.save(p.exp_path, record)
    not_started = p.space.budget.num_samples - len(rows)
    print(
        f"search {p.name} interrupted: {len(unfinished)} trial(s) unfinished, "
        f"{not_started} not started; no best config written; state saved in {p.exp_path}",
        flush=True,
    )
    raise SearchInterrupted(command)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        p = plan(args)
    except (ConfigError, tracking.TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if p.record is not None and p.record.status == rec.FINISHED:
        return _show_finished(p)
    try:
        rows = run_search(p, args.address, args.resume)
    except (ConfigError, tracking.TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SearchInterrupted as stop:
        print(f"interrupted; resume with: {stop.resume_command}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        command = _hard_stop(p, args.address)
        print(f"interrupted; resume with: {command}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0 if any(r.status != "error" for r in rows) else 1


def _hard_stop(p: Plan, address: str | None) -> str:
    """A second Ctrl-C (or one before Tune ran): Tune's last per-step snapshot is what a
    resume starts from; MLflow and the record still say the search was interrupted."""
    command = p.record.resume_command if p.record else resume_command(p, address)
    tracker = _TRACKERS.get(p.name)
    if tracker is not None:
        tracker.mark_interrupted(f"interrupted before the search finished; resume: {command}")
        tracker.close_all("KILLED")
    if p.record is not None and p.record.status == rec.RUNNING:
        p.record.status = rec.INTERRUPTED
        rec.save(p.exp_path, p.record)
    return command


def _show_finished(p: Plan) -> int:
    """A finished search is only shown: no Ray, no MLflow write, no file touched."""
    assert p.record is not None
    print(f"search {p.name} already finished; nothing to resume. Its result:", flush=True)
    print(p.record.result.get("summary", "").rstrip("\n"), flush=True)
    return 0


if __name__ == "__main__":
    # Nothing this file defines is handed to Ray: the trainable (trial.py), the callbacks
    # (tune_callbacks.py) and the scheduler (asha.py) are importable by module name, so
    # running this file as __main__ pickles no object of it by value.
    sys.exit(main())
