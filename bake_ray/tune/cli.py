"""The search: ``python -m bake_ray.tune [--config SPACE.yaml] [--set k=v ...] [--resume]``.

Ray Tune drives seeded Optuna TPE (the paper's T=4, omega=0.5, lambda=1 first when the
space file lists it) and ASHA over epochs. A one-worker trial trains inside its Tune trial
process (no Ray Train worker group: ~2 s of overhead instead of ~20 s); a trial with several
workers drives a ``TorchTrainer`` whose run name is the trial id, so a restarted trial
resumes from its own checkpoints. All MLflow writes happen on the driver, in
:class:`bake_ray.tune.callbacks.MlflowTrialCallback` and the summary, through
:class:`bake_ray.tracking.search_runs.SearchTracker`.

This module is the command line only: its flags are the keywords of
:func:`bake_ray.tune.command.tune` (the plan, the run, the result; also
``bake_ray.api.tune``), and it prints what that returns or raises.
:mod:`bake_ray.tune.search` runs the planned search.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bake_ray import tracking
from bake_ray.core import config as cfg
from bake_ray.core.config import ConfigError
from bake_ray.tune.command import DEFAULT_SPACE, tune
from bake_ray.tune.search import SearchInterrupted
from bake_ray.tune.summary import optuna_space

__all__ = ["DEFAULT_SPACE", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "main", "optuna_space"]
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd command

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
    parser.add_argument(
        "--no-register",
        dest="register",
        action="store_false",
        help="log the winner as an MLflow model on its run, but add no registry version",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own output (its experiment box, INFO lines) instead of writing it "
        "to ray.log beside the search",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, call :func:`~bake_ray.tune.command.tune` with them, print."""
    args = parse_args(argv)
    try:
        result = tune(**vars(args))
    except (ConfigError, tracking.TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SearchInterrupted as stop:
        print(f"interrupted; resume with: {stop.resume_command}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0 if (result.trials["status"] != "error").any() else 1
