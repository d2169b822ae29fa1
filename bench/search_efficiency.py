"""Search efficiency: TPE + ASHA against random search and a grid, per epoch spent.

All three arms are the real ``python -m bake_ray.tune`` (``bake_tune.main``: Ray Tune trials,
OptunaSearch, MLflow on the driver), on the same base config, same concurrency, same seeds;
only how points are chosen and whether weak trials stop early differ:

* ``tpe_asha`` the product's default: seeded Optuna TPE proposes, ASHA over epochs stops
               weak trials (grace 1 epoch, reduction factor 2). Twice the grid's trial count,
               so that it spends about the grid's epochs (most trials stop after 1-2 epochs).
               No paper-default first point (``default.yaml`` has one; here every arm starts
               blind). Optuna's TPE samples at random for its first 10 trials.
* ``random``   Optuna's ``RandomSampler`` (seeded) draws the points from the very same
               distributions (``bake_tune.optuna_space``); they are handed to the search as
               ``initial_points`` (``points_to_evaluate``), every trial runs all epochs.
* ``grid``     L levels per dimension (cell centres; geometric for log-uniform), all
               points as ``initial_points``, every trial runs all epochs.

Why per epoch spent: an epoch is the unit of compute a scheduler saves; "best validation
accuracy reached after E epochs" is read from the driver's MLflow metric history (each
reported epoch in arrival order, all trials of a search together). Wall time is shown too:
on small data a trial's fixed cost (process start, set-up, evaluation) is not small, and
ASHA's extra trials pay it again.

Seeds change both the searcher's seed and the training seed.
``python -m bench.search_efficiency`` (about 8 minutes on 2 busy cores); ``--seeds 5`` for
more; ``--smoke`` for CI (1 seed, only T, 2 epochs).
"""

from __future__ import annotations

import os

import bench.ray_env  # noqa: F401  (sets Ray/MLflow env before they are imported)

# isort: split

import argparse
import itertools
import math
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from bake_ray.core import search_space as ss
from bake_ray.tune import cli as bake_tune
from bench.common import (
    add_output_args,
    command_line,
    emit,
    format_table,
    median,
    relative_link,
    save_figure,
    section_header,
)
from bench.orchestration import SearchRuns, local_ray, run_product_search, warm_up

HEADING = "## 4. Search efficiency"
KEY = "search_efficiency"
ARMS = ("tpe_asha", "random", "grid")

#: Searchable dimensions: short name -> (config key, distribution spec).
DIMENSIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "T": ("bake.temperature", {"distribution": "uniform", "low": 1.0, "high": 8.0}),
    "omega": ("bake.omega", {"distribution": "uniform", "low": 0.0, "high": 0.9}),
    "lambda": ("bake.loss_weight", {"distribution": "loguniform", "low": 0.1, "high": 10.0}),
    "lr": ("optim.lr", {"distribution": "loguniform", "low": 0.005, "high": 0.2}),
}
#: How close to the grid's best counts as reaching it (accuracy, i.e. 0.5 points).
TOLERANCE = 0.005


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.search_efficiency", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seeds", type=int, default=2, help="repeats (search + training seed)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of a full trial (max_t)")
    parser.add_argument("--subset", type=int, default=800, help="digits data.train_subset")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="held out of subset")
    parser.add_argument("--dims", default="T,omega,lambda", help=f"from {list(DIMENSIONS)}")
    parser.add_argument("--levels", type=int, default=2, help="grid levels per dimension")
    parser.add_argument("--random-trials", type=int, help="default: as many as grid points")
    parser.add_argument("--tpe-trials", type=int, help="default: twice the grid points")
    parser.add_argument("--concurrency", type=int, default=2, help="budget.max_concurrent")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs given to local Ray")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs, args.subset, args.dims = 1, 2, 300, "T"
    args.dim_list = args.dims.split(",")
    unknown = set(args.dim_list) - set(DIMENSIONS)
    if unknown:
        parser.error(f"--dims: unknown {sorted(unknown)}; choose from {list(DIMENSIONS)}")
    grid_points = args.levels ** len(args.dim_list)
    args.random_trials = args.random_trials or grid_points
    args.tpe_trials = args.tpe_trials or 2 * grid_points
    return args


# --------------------------------------------------------------------------- the three searches


def base_space(args: argparse.Namespace, arm: str, seed: int) -> dict[str, Any]:
    """The search file shared by every arm; arms change points, trial count and scheduler."""
    return {
        "name": f"eff-{arm.replace('_', '-')}",
        "base": {
            "method": "bake",
            "epochs": args.epochs,
            "seed": seed,
            "data": {
                "dataset": "digits",
                "train_subset": args.subset,
                "val_fraction": args.val_fraction,
                "batch_size": 64,
            },
            "model": {"name": "small_cnn"},
            "optim": {"lr": 0.05, "schedule": "cosine"},
        },
        "space": {DIMENSIONS[d][0]: dict(DIMENSIONS[d][1]) for d in args.dim_list},
        "objective": {"metric": "val_acc", "mode": "max"},
        "budget": {"num_samples": 1, "max_concurrent": args.concurrency, "max_failures": 0},
        "scheduler": {"type": "none"},
        "seed": seed,
    }


def _level(spec: dict[str, Any], index: int, levels: int) -> float:
    """Centre of cell ``index`` of ``levels`` equal cells (in log space for log-uniform)."""
    frac = (index + 0.5) / levels
    low, high = spec["low"], spec["high"]
    if spec["distribution"] == "loguniform":
        value = math.exp(math.log(low) + frac * (math.log(high) - math.log(low)))
    else:
        value = low + frac * (high - low)
    return float(f"{value:.3g}")


def grid_points(args: argparse.Namespace) -> list[dict[str, float]]:
    """Every combination of the per-dimension levels, first dimension slowest."""
    axes = [
        [(DIMENSIONS[d][0], _level(DIMENSIONS[d][1], i, args.levels)) for i in range(args.levels)]
        for d in args.dim_list
    ]
    return [dict(combo) for combo in itertools.product(*axes)]


def random_points(space: dict[str, Any], count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` draws of Optuna's RandomSampler from the product's own distributions."""
    dists = bake_tune.optuna_space(ss.parse(space))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(count):
        trial = study.ask(dists)
        points.append(dict(trial.params))
        study.tell(trial, 0.0)
    return points


def arm_space(args: argparse.Namespace, arm: str, seed: int) -> dict[str, Any]:
    """The search file of one arm for one seed."""
    space = base_space(args, arm, seed)
    if arm == "tpe_asha":
        space["budget"]["num_samples"] = args.tpe_trials
        space["scheduler"] = {"type": "asha", "grace_period": 1, "reduction_factor": 2}
    elif arm == "random":
        points = random_points(space, args.random_trials, seed)
        space["initial_points"] = points
        space["budget"]["num_samples"] = len(points)
    else:
        points = grid_points(args)
        space["initial_points"] = points
        space["budget"]["num_samples"] = len(points)
    return space


# --------------------------------------------------------------------------- curves


@dataclass
class Curve:
    """One search: every reported epoch in the order the driver received it."""

    arm: str
    seed: int
    trials: int
    wall_s: float  # the whole bake_ray.tune call
    seconds: list[float]  # since the search's start, per reported epoch
    val: list[float]  # val_acc of each reported epoch
    test: list[float]  # test_acc of the same epoch

    @property
    def epochs(self) -> int:
        return len(self.val)

    def best_after(self, epochs: int) -> tuple[float, float]:
        """(best val, its test) among the first ``epochs`` reported epochs."""
        pairs = list(zip(self.val[:epochs], self.test[:epochs], strict=True))
        return max(pairs, key=lambda p: p[0]) if pairs else (float("nan"), float("nan"))

    def running_best(self) -> list[float]:
        return list(itertools.accumulate(self.val, max))

    def epochs_to(self, target: float) -> int | None:
        """Epochs spent when the best val first reached ``target``; None if never."""
        for spent, best in enumerate(self.running_best(), 1):
            if best >= target - 1e-9:
                return spent
        return None


def curve_of(arm: str, seed: int, runs: SearchRuns) -> Curve:
    """Merge all trials' val/test histories (MLflow, driver timestamps) into one sequence."""
    events = []
    for run in runs.children:
        vals = runs.client.get_metric_history(run.info.run_id, "val_acc")
        tests = {
            m.step: m.value for m in runs.client.get_metric_history(run.info.run_id, "test_acc")
        }
        for metric in vals:
            events.append(
                (
                    metric.timestamp,
                    run.info.start_time,
                    metric.step,
                    metric.value,
                    tests[metric.step],
                )
            )
    events.sort()
    start = runs.parent.info.start_time
    return Curve(
        arm=arm,
        seed=seed,
        trials=len(runs.children),
        wall_s=runs.wall_s,
        seconds=[(e[0] - start) / 1000.0 for e in events],
        val=[e[3] for e in events],
        test=[e[4] for e in events],
    )


def measure(args: argparse.Namespace) -> list[Curve]:
    """Every (seed, arm) search; the arm order rotates with the seed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    curves = []
    with tempfile.TemporaryDirectory(prefix="bench_eff_") as tmp, local_ray(args.num_cpus):
        if not args.smoke:  # no timing claims at smoke size
            warm_up(Path(tmp))
        for seed in range(args.seeds):
            shift = seed % len(ARMS)
            for arm in ARMS[shift:] + ARMS[:shift]:
                name = f"eff-{arm.replace('_', '-')}-s{seed}"
                print(f"--- seed {seed}: {arm}", flush=True)
                runs = run_product_search(arm_space(args, arm, seed), Path(tmp), name)
                curves.append(curve_of(arm, seed, runs))
    return curves


# --------------------------------------------------------------------------- report


def _pm(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def plot_curves(curves: list[Curve], args: argparse.Namespace) -> str:
    """Best val so far against epochs spent and against wall seconds, one line per search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"tpe_asha": "tab:blue", "random": "tab:orange", "grid": "tab:green"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for curve in curves:
        best = [100 * v for v in curve.running_best()]
        label = curve.arm if curve.seed == 0 else None
        style = {"color": colours[curve.arm], "alpha": 0.8, "drawstyle": "steps-post"}
        left.plot(range(1, curve.epochs + 1), best, label=label, **style)
        right.plot(curve.seconds, best, **style)
    floor = min(100 * c.best_after(c.epochs)[0] for c in curves) - 10.0
    left.set_ylim(bottom=max(floor, 0.0), top=100.0)  # the race is near the top
    left.set(xlabel="epochs spent (all trials)", ylabel="best val accuracy so far (%)")
    right.set(xlabel="seconds since the search started")
    left.legend(fontsize=8)
    fig.suptitle(
        f"digits (train_subset {args.subset}), {args.epochs} epochs/trial, "
        f"{args.seeds} seed(s), one line per seed"
    )
    path = save_figure(fig, args.plot_dir, "search_efficiency.png")
    plt.close(fig)
    return relative_link(path, args.out)


def build_report(
    args: argparse.Namespace, command: str, curves: list[Curve], load: tuple[float, float]
) -> tuple[str, dict[str, float]]:
    by = {(c.arm, c.seed): c for c in curves}
    seeds = range(args.seeds)
    grid_budget = {s: by["grid", s].epochs for s in seeds}
    targets = {s: by["grid", s].best_after(grid_budget[s])[0] - TOLERANCE for s in seeds}
    figures: dict[str, float] = {}
    rows = []
    for arm in ARMS:
        mine = [by[arm, s] for s in seeds]
        at_budget = [by[arm, s].best_after(grid_budget[s]) for s in seeds]
        final = [c.best_after(c.epochs) for c in mine]
        needed = [by[arm, s].epochs_to(targets[s]) for s in seeds]
        needed_text = ", ".join(str(n) if n is not None else f">{by[arm, s].epochs}"
                                for n, s in zip(needed, seeds, strict=True))  # fmt: skip
        wall_ratio = median([by[arm, s].wall_s / by["grid", s].wall_s for s in seeds])
        rows.append(
            [
                arm,
                median([c.trials for c in mine]),
                median([c.epochs for c in mine]),
                _pm([v for v, _ in at_budget]),
                _pm([v for v, _ in final]),
                _pm([t for _, t in final]),
                needed_text,
                f"{wall_ratio:.2f}",
            ]
        )
        figures[f"{arm}_epochs_spent"] = float(median([c.epochs for c in mine]))
        figures[f"{arm}_wall_over_grid"] = wall_ratio
        figures[f"{arm}_best_val_at_grid_budget"] = statistics.fmean(v for v, _ in at_budget)
        figures[f"{arm}_seeds_reaching_grid_best"] = float(sum(n is not None for n in needed))
        if all(n is not None for n in needed):
            figures[f"{arm}_epochs_to_grid_best_over_grid_budget"] = median(
                [n / grid_budget[s] for n, s in zip(needed, seeds, strict=True)]
            )
    table = format_table(
        [
            "arm",
            "trials",
            "epochs spent",
            "best val @ grid's epochs (%)",
            "best val, all (%)",
            "its test (%)",
            "epochs to grid best - 0.5 (per seed)",
            "search wall / grid's",
        ],
        rows,
    )
    dims = ", ".join(f"{d} ({DIMENSIONS[d][0]})" for d in args.dim_list)
    grid_text = ", ".join(
        f"{k.split('.')[-1]} {sorted({p[k] for p in grid_points(args)})}"
        for k in (DIMENSIONS[d][0] for d in args.dim_list)
    )
    body = "\n".join(
        [
            section_header(command, torch.device("cpu")),
            f"BAKE on digits (train_subset={args.subset}, val_fraction={args.val_fraction}, "
            f"small_cnn, lr 0.05 cosine, {args.epochs} epochs per full trial), searching {dims}; "
            f"grid {args.levels} levels per dimension ({grid_text}); random "
            f"{args.random_trials} trials; TPE+ASHA {args.tpe_trials} trials (grace 1, "
            f"reduction 2). {args.concurrency} trials at a time, {args.seeds} seed(s), arm order "
            "rotated per seed, after one throwaway warm-up search. 1-minute load average at "
            f"start / end: {load[0]:.1f} / {load[1]:.1f}.\n",
            table,
            "",
            'Notes: "best val" is the highest val_acc of any reported epoch of any trial so '
            'far; "its test" is the test accuracy of that same epoch (selected on val, not '
            "on test). Epochs are reported epochs, counted in the order the driver received "
            "them (MLflow timestamps); an ASHA-stopped trial counts the epochs it reported. "
            '"epochs to grid best - 0.5": epochs spent until the best val came within 0.5 '
            'points of the grid\'s best of the same seed (">n": never, n spent). Mean ± sd '
            "over seeds; the wall ratio is the median over seeds of this arm's "
            "`bake_ray.tune` wall time over the grid's.\n",
            f"![best val so far]({plot_curves(curves, args)})",
        ]
    )
    return body, figures


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line("bench.search_efficiency", argv)
    load_start = os.getloadavg()[0]
    curves = measure(args)
    body, figures = build_report(args, command, curves, (load_start, os.getloadavg()[0]))
    emit(args, HEADING, KEY, body, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
