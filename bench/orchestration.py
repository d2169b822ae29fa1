"""Orchestration overhead: what a search pays per trial on top of training itself.

Three ways to run the same short trials, each a real ``python -m bake_ray.tune`` search
(``bake_tune.main``: Ray Tune + Optuna + MLflow, nothing mocked), side by side in one run:

* ``in_trial``       bake-ray's one-worker trial: ``engine.fit`` runs inside the Tune trial.
* ``worker_group_2`` two Ray Train workers per trial (a ``TorchTrainer`` per trial, DDP).
* ``ray_pattern_1``  Ray's documented Tune + Train pattern: one worker, but still a
                     ``TorchTrainer`` worker group (``budget.always_use_worker_group: true``).

Why these measures. Trials run one at a time (``max_concurrent: 1``) so the search's wall
clock splits cleanly into per-trial *slots*: from the end of trial i-1 to the end of trial i,
as the driver recorded them (the MLflow child runs' end times: the driver's callback ends a
trial's run in ``on_trial_complete``). A slot holds everything a user waits for: the
searcher's suggestion, the trial actor's process start and imports, the worker group (if
any), data/model set-up, training, evaluation, checkpoints, reporting and the driver's
MLflow writes. ``on_trial_start`` (the child run's start time) comes only after the trial
actor is up, so the start-to-end span would hide the process start; the gap between the
previous trial's end and this trial's start is reported as *start-up*. The first trial's
slot also holds the search's one-off set-up, so per-trial figures use slots 2..K; the
one-off cost is in the "search wall / training" ratio.

"Training time" is the engine's ``train_time_s``: the training loops only (forward,
backward, optimizer steps, batch loading), summed over epochs; evaluation and checkpoints
are not in it. A plain ``engine.fit`` in this process (no Ray, 1 thread like a 1-CPU trial)
measures the engine's own non-training time (split/model set-up, val+test evaluation,
checkpoint writes); what a slot costs beyond that is orchestration.

Searches alternate between variants in rounds (order rotated) so that drift of a shared
machine hits every variant alike. ``python -m bench.orchestration`` (about 8 minutes on 2
busy cores); ``--smoke`` for CI (2 variants, 2 trials each, about 2 minutes on busy cores).
"""

from __future__ import annotations

import os

import bench.ray_env  # noqa: F401  (sets Ray/MLflow env before they are imported)

# isort: split

import argparse
import contextlib
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bake_ray.core import config as cfg
from bake_ray.core.engine import Context, fit
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

HEADING = "## 2. Orchestration overhead"
KEY = "orchestration"

#: variant -> (workers per trial, budget.always_use_worker_group, description)
VARIANTS: dict[str, tuple[int, bool, str]] = {
    "in_trial": (1, False, "(a) bake-ray, 1 worker: trains inside the Tune trial"),
    "worker_group_2": (2, False, "(b) bake-ray, 2 Ray Train workers per trial"),
    "ray_pattern_1": (1, True, "(c) Ray's pattern: 1 worker in a TorchTrainer per trial"),
}

#: The searched BAKE hyperparameters (their values do not change the cost of a trial).
BAKE_SPACE = {
    "bake.temperature": {"distribution": "uniform", "low": 1.0, "high": 8.0},
    "bake.omega": {"distribution": "uniform", "low": 0.0, "high": 0.9},
    "bake.loss_weight": {"distribution": "loguniform", "low": 0.1, "high": 10.0},
}


# --------------------------------------------------------------------------- running searches


@dataclass
class SearchRuns:
    """A finished product search as MLflow recorded it, plus the wall time of the call."""

    wall_s: float
    client: Any  # mlflow.MlflowClient
    parent: Any  # mlflow.entities.Run
    children: list[Any]  # trial runs, oldest start first


def run_product_search(space: dict[str, Any], workdir: Path, name: str) -> SearchRuns:
    """Run ``python -m bake_ray.tune`` in-process on ``space``; read back its MLflow runs.

    The search writes to a sqlite MLflow store and a storage folder under ``workdir`` (both
    absolute, as Tune trials change directory). Ray must already be running.
    """
    from mlflow import MlflowClient

    workdir.mkdir(parents=True, exist_ok=True)
    space_file = workdir / f"{name}.yaml"
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    uri = f"sqlite:///{workdir.resolve()}/mlflow.db"
    argv = ["--config", str(space_file), "--storage", str(workdir.resolve() / "storage")]
    argv += ["--tracking-uri", uri, "--name", name]
    start = time.perf_counter()
    code = bake_tune.main(argv)
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"search {name} exited with {code}")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(space["name"])
    parents = client.search_runs(
        [experiment.experiment_id],
        f"tags.`bake_ray.search_id` = '{name}' and tags.`bake_ray.role` = 'search'",
    )
    if len(parents) != 1:
        raise RuntimeError(f"search {name}: expected one parent MLflow run, got {len(parents)}")
    children = client.search_runs(
        [experiment.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'",
        max_results=1000,
        order_by=["attributes.start_time ASC"],
    )
    print(f"--- search {name}: {wall:.1f} s", flush=True)
    return SearchRuns(wall, client, parents[0], list(children))


def warm_up(workdir: Path) -> None:
    """One throwaway 1-trial search: creates the sqlite MLflow schema (seconds) and warms
    Ray's worker pool and imports, so that the first measured search does not pay for them."""
    space = {
        "name": "warmup",
        "base": {"epochs": 1, "data": {"dataset": "digits", "train_subset": 200}},
        "space": {"bake.omega": {"distribution": "uniform", "low": 0.0, "high": 0.9}},
        "budget": {"num_samples": 1, "max_concurrent": 1},
        "scheduler": {"type": "none"},
    }
    run_product_search(space, workdir, "warmup")


# --------------------------------------------------------------------------- this benchmark


@dataclass
class TrialTiming:
    """One trial as the driver saw it (seconds)."""

    variant: str
    index: int  # position in its search, 0-based
    train_s: float  # engine train_time_s after the last epoch
    span_s: float  # on_trial_start -> on_trial_complete (child run start -> end)
    slot_s: float  # end of the previous trial (or search start) -> end of this one


@dataclass
class SearchTiming:
    """One search of one variant."""

    variant: str
    wall_s: float
    trials: list[TrialTiming]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.orchestration", description=__doc__)
    parser.add_argument("--trials", type=int, default=3, help="K trials per search")
    parser.add_argument("--rounds", type=int, default=2, help="searches per variant")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=600, help="digits data.train_subset")
    parser.add_argument("--batch", type=int, default=64, help="data.batch_size (per worker)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs given to local Ray")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.trials, args.rounds, args.epochs, args.subset = 2, 1, 1, 200
        args.variants = "in_trial,ray_pattern_1"  # (b) is the slowest; tests/test_tune has it
    args.variant_list = args.variants.split(",")
    unknown = set(args.variant_list) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    if "in_trial" not in args.variant_list:
        parser.error("--variants must include in_trial (the reference of the ratios)")
    if args.trials < 2:
        parser.error("--trials must be >= 2 (the first slot holds the search's set-up)")
    return args


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    """The training config every trial starts from (nested, as in a search file's ``base``)."""
    return {
        "method": "bake",
        "epochs": args.epochs,
        "seed": 0,
        "data": {"dataset": "digits", "train_subset": args.subset, "batch_size": args.batch},
        "model": {"name": "small_cnn"},
        "optim": {"lr": 0.05, "schedule": "cosine"},
    }


def variant_space(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """A search file: K trials, one at a time, no early stopping, this variant's workers."""
    workers, worker_group, _ = VARIANTS[variant]
    return {
        "name": f"orch-{variant.replace('_', '-')}",
        "base": base_config(args),
        "space": BAKE_SPACE,
        "objective": {"metric": "val_acc", "mode": "max"},
        "budget": {
            "num_samples": args.trials,
            "max_concurrent": 1,
            "workers_per_trial": workers,
            "always_use_worker_group": worker_group,
            "max_failures": 0,
        },
        "scheduler": {"type": "none"},
        "seed": 0,
    }


def _ms(value: int | None) -> float:
    return (value or 0) / 1000.0


def trial_timings(variant: str, runs: SearchRuns) -> list[TrialTiming]:
    """Per-trial times from the driver's MLflow records, in the order trials finished."""
    ordered = sorted(runs.children, key=lambda r: r.info.end_time or 0)
    previous_end = _ms(runs.parent.info.start_time)
    timings = []
    for index, run in enumerate(ordered):
        if run.info.status != "FINISHED":
            raise RuntimeError(f"{variant}: trial run {run.info.run_name} is {run.info.status}")
        start, end = _ms(run.info.start_time), _ms(run.info.end_time)
        train = float(run.data.metrics["train_time_s"])
        timing = TrialTiming(variant, index, train, end - start, end - previous_end)
        print(
            f"--- trial {index + 1}: slot {timing.slot_s:.2f} s, start-up "
            f"{timing.slot_s - timing.span_s:.2f} s, train {train:.2f} s",
            flush=True,
        )
        timings.append(timing)
        previous_end = end
    return timings


def plain_fit_overheads(args: argparse.Namespace, count: int) -> list[float]:
    """fit() wall minus train_time_s in this process, 1 thread, after one warm-up run."""
    config = cfg.from_dict(base_config(args))
    overheads = []
    with torch_threads(1):
        for attempt in range(count + 1):
            reporter = _LastMetrics()
            start = time.perf_counter()
            fit(config, reporter, Context(torch.device("cpu")))
            wall = time.perf_counter() - start
            if attempt:  # the first run warms imports and caches: discarded
                overheads.append(wall - reporter.last["train_time_s"])
    return overheads


class _LastMetrics:
    """Reporter that keeps only the last epoch's metrics (checkpoints are still written)."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.last = dict(metrics)

    def resume_from(self) -> Path | None:
        return None


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Temporarily use ``count`` intra-op threads (a 1-CPU Ray trial gets 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """Start bake-ray's local Ray unless one is running already (the tests' fixture)."""
    import ray

    from bake_ray.scale.raystart import init_ray

    started = not ray.is_initialized()
    if started:
        init_ray(None, num_cpus=num_cpus, log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def measure(args: argparse.Namespace) -> tuple[list[SearchTiming], list[float]]:
    """All searches, in rounds with the variant order rotated; then the plain-process runs."""
    names = args.variant_list
    searches: list[SearchTiming] = []
    with tempfile.TemporaryDirectory(prefix="bench_orch_") as tmp, local_ray(args.num_cpus):
        if not args.smoke:  # no timing claims at smoke size
            warm_up(Path(tmp))
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for variant in names[shift:] + names[:shift]:
                name = f"orch-{variant.replace('_', '-')}-r{round_index}"
                print(f"--- round {round_index}: {variant}", flush=True)
                runs = run_product_search(variant_space(args, variant), Path(tmp), name)
                searches.append(SearchTiming(variant, runs.wall_s, trial_timings(variant, runs)))
        plain = plain_fit_overheads(args, max(args.trials - 1, 1) * args.rounds)
    return searches, plain


# --------------------------------------------------------------------------- report


@dataclass
class VariantSummary:
    """Medians over a variant's steady-state trials (slots 2..K of every search)."""

    variant: str
    trials: int
    train_s: float
    slot_s: float
    startup_s: float  # slot - span: previous trial's end -> on_trial_start
    overhead_s: float  # slot - train
    wall_over_train: float  # all searches' wall / all trials' training time


def summarise(variant: str, searches: list[SearchTiming]) -> VariantSummary:
    mine = [s for s in searches if s.variant == variant]
    steady = [t for s in mine for t in s.trials[1:]]
    total_train = sum(t.train_s for s in mine for t in s.trials)
    return VariantSummary(
        variant=variant,
        trials=len(steady),
        train_s=median([t.train_s for t in steady]),
        slot_s=median([t.slot_s for t in steady]),
        startup_s=median([t.slot_s - t.span_s for t in steady]),
        overhead_s=median([t.slot_s - t.train_s for t in steady]),
        wall_over_train=sum(s.wall_s for s in mine) / total_train,
    )


def plot_slots(summaries: list[VariantSummary], engine_s: float, args: argparse.Namespace) -> str:
    """Median trial slot: training, the engine's own extras, start-up, other orchestration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    labels = [s.variant for s in summaries]
    parts = {
        "training (train_time_s)": [s.train_s for s in summaries],
        "eval, set-up, checkpoints (as in a plain process)": [
            min(engine_s, s.overhead_s) for s in summaries
        ],
        "trial start-up (scheduling, process, imports)": [s.startup_s for s in summaries],
        "in-trial orchestration (worker group, reports, MLflow)": [
            max(s.overhead_s - engine_s - s.startup_s, 0.0) for s in summaries
        ],
    }
    left = [0.0] * len(summaries)
    for label, widths in parts.items():
        ax.barh(labels, widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set(xlabel="seconds per trial (medians of steady-state slots)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    path = save_figure(fig, args.plot_dir, "orchestration_trial_slot.png")
    plt.close(fig)
    return relative_link(path, args.out)


def build_report(
    args: argparse.Namespace,
    command: str,
    searches: list[SearchTiming],
    plain: list[float],
    load: tuple[float, float],
) -> tuple[str, dict[str, float]]:
    summaries = [summarise(v, searches) for v in args.variant_list]
    engine_s = median(plain)
    ref = next(s for s in summaries if s.variant == "in_trial")
    reference = "plain `engine.fit`, no Ray (reference)"
    rows: list[list[Any]] = [[reference, len(plain), "-", "-", "-", f"{engine_s:.2f}", "-", "-"]]
    figures: dict[str, float] = {"plain_fit_non_training_s": engine_s}
    for s in summaries:
        ratio = s.overhead_s / ref.overhead_s
        rows.append(
            [
                VARIANTS[s.variant][2],
                s.trials,
                f"{s.train_s:.2f}",
                f"{s.slot_s:.2f}",
                f"{s.startup_s:.2f}",
                f"{s.overhead_s:.2f}",
                f"{s.wall_over_train:.1f}",
                f"{ratio:.2f}",
            ]
        )
        figures[f"{s.variant}_overhead_s"] = s.overhead_s
        figures[f"{s.variant}_startup_s"] = s.startup_s
        figures[f"{s.variant}_wall_over_train"] = s.wall_over_train
        figures[f"{s.variant}_over_in_trial_overhead"] = ratio
    table = format_table(
        [
            "variant",
            "trials",
            "train s",
            "slot s",
            "of which start-up s",
            "overhead s (slot - train)",
            "search wall / Σ train",
            "overhead vs (a)",
        ],
        rows,
    )
    key = ""
    if "ray_pattern_1_over_in_trial_overhead" in figures:
        key = (
            "**Per-trial overhead, Ray's pattern (c) over bake-ray's in-trial (a): "
            f"{figures['ray_pattern_1_over_in_trial_overhead']:.1f}x** "
            f"({figures['ray_pattern_1_overhead_s']:.1f} s against "
            f"{figures['in_trial_overhead_s']:.1f} s per trial).\n"
        )
    body = "\n".join(
        [
            section_header(command, torch.device("cpu")),
            f"Each search: {args.trials} trials of BAKE on digits (train_subset={args.subset}, "
            f"small_cnn, batch {args.batch} per worker, {args.epochs} epochs), "
            "`max_concurrent: 1`, `scheduler.type: none`, sqlite MLflow, product defaults "
            f"otherwise; {args.rounds} round(s) of searches, variant order rotated, after one "
            f"throwaway warm-up search; `init_ray(None, num_cpus={args.num_cpus})`. 1-minute "
            f"load average at start / end: {load[0]:.1f} / {load[1]:.1f}.\n",
            key,
            table,
            "",
            "Notes: per-trial columns are medians over trials 2..K of every search (trial 1's "
            "slot also holds the search's set-up). *slot* = end of the previous trial to end "
            "of this one, read from the driver's MLflow end times (one trial at a time): "
            "what a user waits per trial. *start-up* = previous trial's end to this trial's "
            "`on_trial_start` (its MLflow start time): scheduling, the actor's process start "
            "and imports. *train* = the engine's `train_time_s`: the training loops only, "
            "evaluation and checkpoints excluded. *overhead* = slot - train. The reference row "
            "runs `engine.fit` in this already-warm process with 1 thread: its fit wall - "
            "train_time_s (split and model set-up, val+test evaluation, checkpoint writes) is "
            "the part of every overhead that is not orchestration. *search wall* = the whole "
            "`bake_ray.tune` call (set-up, all trials, summary, plots) over the sum of its "
            "trials' training time. Tune's `time_total_s` is not used: it is measured inside "
            "the trial and misses the start-up.\n",
            f"![median trial slot]({plot_slots(summaries, engine_s, args)})",
        ]
    )
    return body, figures


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line("bench.orchestration", argv)
    load_start = os.getloadavg()[0]
    searches, plain = measure(args)
    load = (load_start, os.getloadavg()[0])
    body, figures = build_report(args, command, searches, plain, load)
    if not all(math.isfinite(v) for v in figures.values()):
        raise RuntimeError(f"non-finite figures: {figures}")
    emit(args, HEADING, KEY, body, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
