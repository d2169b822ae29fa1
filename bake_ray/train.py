"""One BAKE training run: ``python -m bake_ray.train [--config FILE] [--set k=v ...]``.

``--workers 0`` (the default) trains in this process with no Ray at all; ``--workers N``
runs N Ray Train workers (DDP over gloo on CPU, NCCL on GPU) with the class-aware sampler
sharded by rank and BAKE ensembling over the global batch. Every input is checked before
any compute starts; a bad one exits with code 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bake_ray import checkpoint as ckpt
from bake_ray import config as cfg
from bake_ray.config import Config, ConfigError
from bake_ray.data import check_data_available
from bake_ray.engine import Context, DivergenceError, fit

EXIT_BAD_INPUT = 2


def format_progress(metrics: dict[str, float], epochs: int) -> str:
    """One human line per epoch: loss parts, accuracies, learning rate, throughput."""
    return (
        f"epoch {int(metrics['epoch']):>3}/{epochs}  "
        f"loss {metrics['train_loss']:.4f} (ce {metrics['train_ce']:.4f} "
        f"kd {metrics['train_kd']:.4f})  val {metrics['val_acc']:.4f}  "
        f"test {metrics['test_acc']:.4f}  lr {metrics['lr']:.4g}  "
        f"{metrics['images_per_s']:.0f} img/s  {metrics['epoch_time_s']:.1f}s"
    )


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
        with (self.run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if checkpoint_dir is None:
            return
        epoch = int(metrics["epoch"])
        source = checkpoint_dir / ckpt.CHECKPOINT_FILE
        target = ckpt.epoch_dir(self.run_dir / "checkpoints", epoch) / ckpt.CHECKPOINT_FILE
        _atomic_copy(source, target)
        if metrics["best_epoch"] == epoch:
            _atomic_copy(source, self.run_dir / "best" / ckpt.CHECKPOINT_FILE)
        ckpt.prune(self.run_dir / "checkpoints", self.keep)


def _atomic_copy(source: Path, target: Path) -> None:
    """Copy next to the target, then rename: a kill mid-copy leaves the old file intact."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    partial.replace(target)


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
    parser = argparse.ArgumentParser(
        prog="python -m bake_ray.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", type=Path, help="YAML config (defaults: digits, small CNN)")
    cfg.add_override_argument(parser, "override a config value by dotted key, e.g. bake.omega=0.7")
    parser.add_argument("--workers", type=int, help="0 = this process; N = N Ray Train workers")
    parser.add_argument("--gpu", action="store_true", help="train on GPUs (one per worker)")
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last good checkpoint",
    )
    parser.add_argument("--address", help="Ray cluster address for --workers N (default: local)")
    return parser.parse_args(argv)


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
        return cfg.load(args.config, overrides), None
    saved = args.resume / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"--resume {args.resume}: no config.yaml there; not a bake-ray run directory"
        )
    config = cfg.load(saved, overrides)
    if config.runtime.workers > 0:
        return config, None  # Ray Train finds its own checkpoint in the run's storage
    latest = ckpt.latest_good(args.resume)
    if latest is None:
        raise ConfigError(f"--resume {args.resume}: no loadable checkpoint under checkpoints/")
    return config, latest


def preflight(config: Config, resume: Path | None) -> None:
    """Every check that can fail before compute: data present, GPU present, checkpoint loads."""
    check_data_available(config.data)
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
    from bake_ray.raytrain import run_workers

    history = run_workers(config, run_dir, address)
    if history and history[-1].get("diverged"):
        raise DivergenceError(str(history[-1].get("error", "loss became non-finite")), 0)
    return history


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, resume = resolve_config(args)
        preflight(config, resume)
        if config.runtime.workers > 0:
            from bake_ray.raytrain import check_cluster_fits

            check_cluster_fits(config, args.address)
        run_dir = prepare_run_dir(config, args.resume)
    except (ConfigError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"run directory: {run_dir}", flush=True)
    try:
        history = _run(config, run_dir, resume, args.address)
    except DivergenceError as err:
        print(f"error: diverged: {err}; lower optim.lr or check the data", file=sys.stderr)
        return 1
    print(summary_line(history), flush=True)
    return 0


if __name__ == "__main__":
    from bake_ray.train import main as _main  # importable objects, for Ray's pickling

    sys.exit(_main())
