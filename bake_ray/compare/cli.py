"""Does BAKE help on my data? ``python -m bake_ray.compare [--config FILE | --search NAME]``.

Trains every *arm* (a way to train) with every seed, as one Ray Tune trial each (a grid
over arm and seed, no search algorithm, run in parallel on this machine or a cluster), and
reports, per arm, test accuracy at the epoch that was best on the validation split and at
the last epoch, and its paired difference from ``ce`` with a 95% t interval and a verdict.

Arms (``--arms``, default all five): ``bake`` (the config's T/omega/lambda), ``bake_paper``
(T=4, omega=0.5, lambda=1), ``ce`` (cross-entropy, the same class-aware sampler),
``ce_standard`` (cross-entropy on plain shuffled batches, ``data.same_class=0``: the paper's
baseline) and ``label_smoothing``. ``LABEL=ARM`` adds a renamed copy of an arm, and
``--arm-set LABEL:key=value`` changes one arm only (e.g. ``--arms ce,ce_lr=ce --arm-set
ce_lr:optim.lr=0.01``).

Pairing: seed s of every arm uses the same data split and the same initial weights (both
derive from the config's ``seed``), so ``arm - ce`` is taken per seed and its mean gets a
Student t interval over the seeds (:mod:`bake_ray.compare.paired`).

Compute matching (``--match``). An epoch visits every training image once as an *anchor*;
with ``data.same_class = M`` each anchor brings M classmates, so a class-aware epoch holds
(M+1) x the training set in images and steps, and a plain epoch (M=0) holds 1 x.
``--match images`` (default) gives every arm the same number of training images (and so,
at the same batch size, the same optimizer steps): an arm with M_a gets
``epochs x (M+1) / (M_a+1)`` epochs, M being the config's (so ``ce_standard`` trains 2x the
epochs when M=1); warm-up epochs scale the same way and schedule milestones are fractions
of the run. ``--match epochs`` gives every arm the config's epochs, whatever they hold.

Rerunning the same command continues the same comparison (its name is a digest of what it
trains): finished arm x seed trials are restored, not retrained.

Recheck a finished search (``--recheck SEARCH --top N --seeds K``): retrain its N best
trials with K seeds each and say whether the winner stays the winner, on validation
accuracy only (the test split is never used to choose).

Modules: this one (the flags), :mod:`bake_ray.compare.command` (``compare()``: arms,
checks before compute, the run and its result; also ``bake_ray.api.compare``),
:mod:`bake_ray.compare.run` (the
Tune grid, its trainable and MLflow), :mod:`bake_ray.compare.report` (table, verdicts,
plot), :mod:`bake_ray.compare.recheck` (--recheck) and :mod:`bake_ray.compare.paired` (statistics).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bake_ray.compare.command import (
    CompareInterrupted,
    arm_values,
    compare,
    load_training_config,
    matched_epochs,
    parse_arm_overrides,
    parse_arms,
    plan,
)
from bake_ray.compare.plan import ARMS
from bake_ray.core import config as cfg
from bake_ray.core.config import ConfigError

__all__ = [
    "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "arm_values", "load_training_config", "main",
    "matched_epochs", "parse_arm_overrides", "parse_arms", "plan",
]  # fmt: skip
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cfg.ArgumentParser(
        prog="python -m bake_ray.compare",
        description=__doc__.split("\nModules:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--config", type=cfg.config_location, help="training config YAML, a path or a "
        "storage URI (default: built-in)"
    )
    source.add_argument("--search", help="a search name in --storage: use its best_config.yaml")
    source.add_argument("--recheck", metavar="SEARCH", help="retrain a search's top trials")
    parser.add_argument("--top", type=int, default=3, help="with --recheck: trials to retrain")
    parser.add_argument(
        "--arms",
        default=",".join(ARMS),
        help=f"comma list of {', '.join(ARMS)} or LABEL=ARM (default: all)",
    )
    parser.add_argument(
        "--arm-set",
        dest="arm_overrides",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE",
        help="a config override for one arm only (repeatable)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (>= 2; default 3)")
    parser.add_argument("--match", default="images", choices=("images", "epochs"))
    cfg.add_override_argument(parser, "a training-config override for every arm")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument(
        "--max-concurrent", type=int, default=0, help="trials at a time (0: as resources allow)"
    )
    parser.add_argument("--name", help="comparison name (default: <dataset>-compare-<digest>)")
    parser.add_argument("--storage", help="checkpoints: path or URI (default ./ray_results)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS or local)")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own output (its experiment box, INFO lines) instead of writing it "
        "to ray.log beside the comparison",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, call :func:`~bake_ray.compare.command.compare` with them, print."""
    args = parse_args(argv)
    from bake_ray.tracking import TrackingError

    try:
        result = compare(**vars(args))
    except (ConfigError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CompareInterrupted as stop:
        print(stop.message, file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0 if (result.trials["status"] == "finished").any() else 1
