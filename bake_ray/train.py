"""One BAKE training run: ``python -m bake_ray.train [--config FILE] [--set k=v ...]``.

``--workers 0`` (the default) trains in this process with no Ray at all; ``--workers N``
runs N Ray Train workers (DDP over gloo on CPU, NCCL on GPU) with the class-aware sampler
sharded by rank and BAKE ensembling over the global batch. Every input is checked before
any compute starts; a bad one exits with code 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bake_ray.core import checkpoint as ckpt
from bake_ray.core import config as cfg
from bake_ray.core.config import Config, ConfigError
from bake_ray.core.datafiles import check_data_available, input_shape
from bake_ray.core.engine import Context, DivergenceError, fit, lr_factor
from bake_ray.core.models import check_model_available
from bake_ray.core.rundir import (
    append_metrics,
    atomic_copy,
    epochs_done,
    format_progress,
    save_best,
)
from bake_ray.tracking import TrackingError, train_run

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd command


@dataclass
class LocalReporter:
    """Writes checkpoints and metrics under the run directory and prints progress.

    Layout: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/epoch_NNNN/checkpoint.pt``
    (the newest ``keep`` epochs) and ``best/checkpoint.pt`` (the best validation epoch).
    """

    run_dir: Path
    epochs: int
    resume: Path | None = None
    keep: int = 2

    def progress(self, metrics: dict[str, float]) -> None:
        """Intra-epoch progress, every ``runtime.log_every`` steps when that is set."""
        print(
            f"  step {int(metrics['step'])}  loss {metrics['train_loss']:.4f}  "
            f"train acc {metrics['train_acc']:.4f}  {metrics['images_per_s']:.0f} img/s",
            flush=True,
        )

    def resume_from(self) -> Path | None:
        return self.resume

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        print(format_progress(metrics, self.epochs), flush=True)
        append_metrics(self.run_dir, metrics)
        if checkpoint_dir is None:
            return
        epoch = int(metrics["epoch"])
        source = checkpoint_dir / ckpt.CHECKPOINT_FILE
        target = ckpt.epoch_dir(self.run_dir / "checkpoints", epoch) / ckpt.CHECKPOINT_FILE
        atomic_copy(source, target)
        if metrics["best_epoch"] == epoch:
            save_best(source, self.run_dir)
        ckpt.prune(self.run_dir / "checkpoints", self.keep)


def summary_line(history: list[dict[str, float]]) -> str:
    """The run's result, selected on validation (never on test)."""
    if not history:
        return "done: no epoch completed"
    last = history[-1]
    return (
        f"done: best val {last['best_val_acc']:.4f} at epoch {int(last['best_epoch'])} "
        f"(test {last['test_acc_at_best_val']:.4f}); last epoch test {last['test_acc']:.4f}"
    )


def default_run_name(config: Config) -> str:
    return (
        config.runtime.run_name
        or f"{config.data.dataset}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cfg.ArgumentParser(
        prog="python -m bake_ray.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--config",
        type=cfg.config_location,
        help="YAML config, a path or a storage URI such as a search's "
        "s3://.../best_config.yaml (default: digits, small CNN)",
    )
    cfg.add_override_argument(parser, "override a config value by dotted key, e.g. bake.omega=0.7")
    parser.add_argument("--workers", type=int, help="0 = this process; N = N Ray Train workers")
    parser.add_argument("--gpu", action="store_true", help="train on GPUs (one per worker)")
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last good checkpoint",
    )
    parser.add_argument(
        "--extend-schedule",
        action="store_true",
        help="with --resume and a new epochs: keep the run's lr schedule as it was and train "
        "the extra epochs at its final lr (otherwise a changed epochs is refused)",
    )
    parser.add_argument("--address", help="Ray cluster address for --workers N (default: local)")
    train_run.add_arguments(parser)
    return parser.parse_args(argv)


def _refuse_search_file(path: str | Path | Mapping[str, Any] | None) -> None:
    """A search-space file has ``space:``; ``cfg.load`` would only say 'unknown key'."""
    if path is None:
        return
    try:
        raw = path if isinstance(path, Mapping) else cfg.read_yaml(path)
    except ConfigError:
        return  # cfg.load reports what is wrong with it, as for any config
    if isinstance(path, Mapping) and "space" in path:
        raise ConfigError("config: this dict is a search space (it has 'space'); run it with tune")
    if isinstance(raw, Mapping) and "space" in raw:
        raise ConfigError(
            f"--config {path}: this is a search-space file; run it with "
            f"python -m bake_ray.tune --config {path}"
        )


def _final_lr(config: Config, schedule_epochs: int) -> float:
    """The learning rate at the end of a schedule laid out over ``schedule_epochs``."""
    return config.optim.lr * lr_factor(schedule_epochs, 1, schedule_epochs, config.optim)


def _lr_at(config: Config, epoch: int) -> float:
    """The learning rate ``config``'s schedule gives after ``epoch`` completed epochs."""
    span = config.optim.schedule_epochs or config.epochs
    return config.optim.lr * lr_factor(epoch, 1, span, config.optim)


def keep_schedule(saved: Config, config: Config, extend: bool) -> Config:
    """A resumed run whose ``epochs`` changed keeps the schedule it was trained on.

    Step and cosine schedules are laid out over the epochs, so a new ``epochs`` would move
    every milestone (a 15-epoch step run resumed to 40 jumps from lr/100 back to lr). That is
    refused unless ``--extend-schedule`` says to keep the old layout and hold its final lr.
    """
    span = saved.optim.schedule_epochs or saved.epochs
    if config.epochs == saved.epochs or config.optim.schedule == "constant":
        return config
    if (config.optim.schedule_epochs or config.epochs) == span:
        return config  # the user set optim.schedule_epochs to the old layout already
    name = config.optim.schedule
    if not extend:
        raise ConfigError(
            f"epochs: {saved.epochs} -> {config.epochs} on --resume would re-lay the {name} "
            f"schedule over {config.epochs} epochs (lr from {_final_lr(saved, span):.4g} to "
            f"{_lr_at(config, saved.epochs):.4g} at epoch {saved.epochs + 1}); add "
            f"--extend-schedule to keep it and train the extra epochs at its final lr"
        )
    if name == "cosine":
        raise ConfigError(
            f"--extend-schedule: the cosine schedule ended at lr 0 after {span} epochs, so "
            f"extra epochs would not train; start a new run with epochs={config.epochs}"
        )
    optim = dataclasses.replace(config.optim, schedule_epochs=span)
    extended = dataclasses.replace(config, optim=optim)
    print(
        f"epochs {saved.epochs} -> {config.epochs}: the {name} schedule keeps its {span}-epoch "
        f"layout; epochs {span + 1}-{config.epochs} train at its final lr "
        f"{_final_lr(saved, span):.4g} (saved as optim.schedule_epochs={span})",
        flush=True,
    )
    return extended


def resolve_config(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """The run's config and, when resuming, the checkpoint file to continue from.

    A resumed run uses the config saved in its directory (so it continues exactly), with
    any ``--set`` applied on top (e.g. ``epochs=30`` to train longer).
    """
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"runtime.workers={args.workers}")
    if args.gpu:
        overrides.append("runtime.gpu=true")
    if args.resume is None:
        _refuse_search_file(args.config)
        return _load(args.config, overrides), None
    saved = args.resume / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"--resume {args.resume}: no config.yaml there; not a bake-ray run directory"
        )
    config = keep_schedule(cfg.load(saved), cfg.load(saved, overrides), args.extend_schedule)
    if config.runtime.workers > 0:
        return config, None  # Ray Train finds its own checkpoint in the run's storage
    latest = ckpt.latest_good(args.resume)
    if latest is None:
        raise ConfigError(f"--resume {args.resume}: no loadable checkpoint under checkpoints/")
    return config, latest


def _load(config: str | Path | Mapping[str, Any] | None, overrides: list[str]) -> Config:
    """A config file or URI, or a config's contents as a dict (the Python API)."""
    if not isinstance(config, Mapping):
        return cfg.load(config, overrides)
    values = json.loads(json.dumps(dict(config)))  # a copy: the caller's dict is left alone
    for text in overrides:
        cfg.set_dotted(values, *cfg.parse_override(text))
    return cfg.from_dict(values)


def preflight(config: Config, resume: Path | None) -> None:
    """Every check that can fail before compute: data present, model and its weights usable,
    GPU present, checkpoint loads."""
    check_data_available(config.data)
    check_model_available(config.model, *input_shape(config.data))
    if config.runtime.gpu and config.runtime.workers == 0 and not torch.cuda.is_available():
        raise ConfigError("runtime.gpu: true but no CUDA device is visible to this process")
    if resume is not None:
        ckpt.load(resume)


def run_local(config: Config, run_dir: Path, resume: Path | None) -> list[dict[str, float]]:
    """Train in this process (no Ray)."""
    device = torch.device("cuda" if config.runtime.gpu else "cpu")
    reporter = LocalReporter(run_dir, config.epochs, resume)
    return fit(config, reporter, Context(device))


def prepare_run_dir(config: Config, resume_dir: Path | None) -> Path:
    """Create the run directory (or reuse it when resuming) and save the resolved config."""
    run_dir = resume_dir or Path(config.runtime.output_dir) / default_run_name(config)
    if resume_dir is None and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"runtime.run_name: {run_dir} already exists; pick another or --resume it"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(config, run_dir / "config.yaml")
    return run_dir.resolve()


def _run(config: Config, run_dir: Path, resume: Path | None, address: str | None) -> list[dict]:
    if config.runtime.workers == 0:
        return run_local(config, run_dir, resume)
    from bake_ray.scale.raytrain import run_workers

    history = run_workers(config, run_dir, address)
    if history and history[-1].get("diverged"):
        raise DivergenceError(str(history[-1].get("error", "loss became non-finite")), 0)
    return history


@dataclass
class TrainResult:
    """One run: ``metrics`` has a row per epoch (what ``metrics.jsonl`` holds), selection
    on validation: ``best_epoch``, ``best_val_acc`` and the test accuracy of that epoch."""

    run_dir: Path
    config: dict[str, Any]
    metrics: Any  # pandas.DataFrame
    best_epoch: int | None
    best_val_acc: float | None
    test_acc_at_best_val: float | None
    mlflow_run_id: str


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the run's checkpoints are kept; ``resume=run_dir`` continues it.
    Its text is the line the command line prints."""


def train(
    config: str | Path | Mapping[str, Any] | None = None,
    *,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    workers: int | None = None,
    gpu: bool = False,
    resume: str | Path | None = None,
    extend_schedule: bool = False,
    address: str | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    register: bool = True,
) -> TrainResult:
    """Train one run and return its per-epoch metrics and best epoch.

    ``config``: a config file or URI, or its contents as a dict (default: digits, small
    CNN); ``overrides``: dotted keys to values, what ``--set`` takes; the other keywords are
    the command line's flags (``register=False`` is ``--no-register``). A bad input raises
    the one-line :class:`ConfigError` the command line prints; a diverged run raises
    :class:`DivergenceError`; Ctrl-C raises :class:`TrainInterrupted` (a
    ``KeyboardInterrupt``) with the checkpoints kept.
    """
    # The flags by the names argparse gives them: one keyword here is one flag there.
    args = argparse.Namespace(**locals())
    args.overrides = cfg.override_texts(overrides)
    args.resume = None if resume is None else Path(resume)
    config, checkpoint = resolve_config(args)
    preflight(config, checkpoint)
    if config.runtime.workers > 0:
        from bake_ray.scale.raytrain import check_cluster_fits

        check_cluster_fits(config, args.address)
    run_dir = prepare_run_dir(config, args.resume)
    mlflow_run = train_run.TrainRun.open(args, config, run_dir)
    print(f"run directory: {run_dir}", flush=True)
    in_main = threading.current_thread() is threading.main_thread()  # signals reach it only
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
    try:
        with mlflow_run:  # ends the MLflow run FINISHED, KILLED or FAILED
            history = _run(config, run_dir, checkpoint, args.address)
    except KeyboardInterrupt:
        raise TrainInterrupted(_interrupted_line(run_dir, config.epochs)) from None
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    print(summary_line(history), flush=True)
    return _result(config, run_dir, history, mlflow_run.run_id)


def _result(config: Config, run_dir: Path, history: list[dict], run_id: str) -> TrainResult:
    import pandas as pd

    last = history[-1] if history else {}
    best = last.get("best_epoch")
    return TrainResult(
        run_dir=run_dir,
        config=cfg.to_dict(config),
        metrics=pd.DataFrame(history),
        best_epoch=None if best is None else int(best),
        best_val_acc=last.get("best_val_acc"),
        test_acc_at_best_val=last.get("test_acc_at_best_val"),
        mlflow_run_id=run_id,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, call :func:`train` with them, print."""
    args = parse_args(argv)
    try:
        train(**vars(args))
    except (ConfigError, ckpt.CheckpointError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DivergenceError as err:
        print(f"error: diverged: {err}; lower optim.lr or check the data", file=sys.stderr)
        return 1
    except TrainInterrupted as stop:
        print(stop, file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a stopped job) ends the run like Ctrl-C: checkpoints on disk are kept."""
    raise KeyboardInterrupt


def _interrupted_line(run_dir: Path, epochs: int) -> str:
    """One line: how far the run got and the command that continues it."""
    return (
        f"interrupted after epoch {epochs_done(run_dir)}/{epochs}; resume with: "
        f"python -m bake_ray.train --resume {run_dir}"
    )


if __name__ == "__main__":
    # Nothing defined here is handed to Ray (worker loop and callbacks live in raytrain),
    # so running this file as __main__ pickles no object by value.
    sys.exit(main())
