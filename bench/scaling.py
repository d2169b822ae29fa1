"""Training throughput: one plain process against 1 and 2 Ray Train workers.

Every variant runs the same ``engine.fit`` on the same model, data and epochs; only where
it runs differs. Throughput is the engine's own ``images_per_s`` (training images of all
workers over the epoch's training time; evaluation excluded), median over the epochs after
the first (warm-up). With two workers BAKE either ensembles over the global batch
(all-gather of features and probabilities, one 2N x 2N solve per worker) or over each
worker's own batch (``bake.global_ensembling=false``): the gap is the price of the gather.

Each worker has its own batch of ``data.batch_size`` images, so 2 workers process twice
the images per optimizer step (weak scaling). Ray Train gives each worker 1 CPU, and Ray
sets 1 intra-op thread in it; the single process uses torch's default, so a 1-thread local
row separates "fewer threads" from "Ray overhead".

``python -m bench.scaling`` (about 5 minutes on 2 cores); ``--dataset``, ``--subset``,
``--epochs``, ``--rounds`` for bigger runs.
"""

from __future__ import annotations

import bench.ray_env  # noqa: F401  (sets Ray/MLflow env before they are imported)

# isort: split

import argparse
import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import ray
import ray.train
import torch

from bake_ray.core import checkpoint as ckpt
from bake_ray.core.config import Config, from_dict
from bake_ray.core.engine import Context, fit
from bake_ray.scale.raystart import init_ray
from bake_ray.scale.raytrain import absolute_paths, build_trainer
from bench.common import (
    add_output_args,
    command_line,
    emit,
    format_table,
    median,
    relative_link,
    save_figure,
    section_header,
    torch_threads,
)

HEADING = "## 3. Scaling"
KEY = "scaling"
VARIANTS = ("local", "local_1thread", "ray_1", "ray_2_global", "ray_2_local")
DESCRIPTIONS = {
    "local": "1 process, no Ray (torch default threads)",
    "local_1thread": "1 process, no Ray, 1 thread",
    "ray_1": "Ray Train, 1 worker",
    "ray_2_global": "Ray Train, 2 workers, global ensembling",
    "ray_2_local": "Ray Train, 2 workers, per-worker ensembling",
}


class MemoryReporter:
    """Keeps the metric history in memory; checkpoints are ignored (nothing to resume)."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.history.append(dict(metrics))

    def resume_from(self) -> Path | None:
        return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    parser.add_argument("--dataset", default="fashion_mnist", choices=("digits", "fashion_mnist"))
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--subset", type=int, default=6000, help="data.train_subset (0 = all)")
    parser.add_argument("--batch", type=int, default=64, help="per-worker batch N")
    parser.add_argument("--epochs", type=int, default=3, help="epoch 1 is warm-up, not counted")
    parser.add_argument("--max-steps", type=int, help="cap steps per epoch")
    parser.add_argument("--rounds", type=int, default=1, help="times each variant runs")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs given to local Ray")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.dataset, args.subset, args.epochs, args.max_steps = "digits", 0, 2, 4
        args.variants = "local,ray_2_global"
    args.variant_list = args.variants.split(",")
    unknown = set(args.variant_list) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is warm-up)")
    return args


def base_config(args: argparse.Namespace) -> Config:
    return from_dict(
        {
            "method": "bake",
            "epochs": args.epochs,
            "data": {
                "dataset": args.dataset,
                "batch_size": args.batch,
                "train_subset": args.subset or None,
            },
            "model": {"name": args.model},
            "optim": {"schedule": "constant"},
        }
    )


def variant_config(config: Config, variant: str) -> Config:
    """The base config with this variant's worker count and ensembling scope."""
    workers = {"ray_1": 1, "ray_2_global": 2, "ray_2_local": 2}.get(variant, 0)
    bake = dataclasses.replace(config.bake, global_ensembling=variant != "ray_2_local")
    runtime = dataclasses.replace(config.runtime, workers=workers)
    return dataclasses.replace(config, bake=bake, runtime=runtime)


def run_variant(config: Config, variant: str, max_steps: int | None) -> list[dict[str, float]]:
    """One training run; returns its per-epoch metric history."""
    if config.runtime.workers == 0:
        reporter = MemoryReporter()
        with torch_threads(1 if variant == "local_1thread" else None):
            fit(config, reporter, Context(torch.device("cpu")), max_steps)
        return reporter.history
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as storage:
        trainer = build_trainer(
            absolute_paths(config), variant, storage, max_steps_per_epoch=max_steps
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        return checkpoint_history(result.checkpoint)


def checkpoint_history(checkpoint: ray.train.Checkpoint) -> list[dict[str, float]]:
    """All epochs' metrics, from the last checkpoint (Ray's own result keeps only the epochs
    of the checkpoints it retained, here the last two)."""
    with tempfile.TemporaryDirectory(prefix="bench_scaling_ckpt_") as local:
        checkpoint.to_directory(local)
        return list(ckpt.load(Path(local) / ckpt.CHECKPOINT_FILE)["history"])


def steady_throughput(history: list[dict[str, float]]) -> float:
    """Median images/s over the epochs after the first (warm-up)."""
    return median([float(h["images_per_s"]) for h in history if h["epoch"] > 1])


def ray_worker_threads() -> int:
    """torch's intra-op threads inside a 1-CPU Ray task (what a Train worker gets)."""

    @ray.remote(num_cpus=1)
    def threads() -> int:
        import torch as worker_torch

        return worker_torch.get_num_threads()

    return int(ray.get(threads.remote()))


@contextlib.contextmanager
def local_ray(num_cpus: int, needed: bool) -> Iterator[None]:
    """Start a local Ray (``raystart.init_ray``) unless one runs already (tests' fixture)."""
    if not needed:
        yield
        return
    started = not ray.is_initialized()
    if started:
        # The project's own start-up: TRAIN_DRIVER resource, and a private dashboard port
        # so Ray Train's cleaner works when another Ray runs on the host.
        init_ray(None, num_cpus=num_cpus, log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def measure(args: argparse.Namespace) -> tuple[dict[str, list[list[dict]]], int | None]:
    """Run the variants ``rounds`` times, rotating the order each round.

    Ray runs only while a Ray variant trains: its daemons take CPU, and the local variants
    must measure the plain process path, not a process sharing two cores with Ray.
    """
    config = base_config(args)
    names = args.variant_list
    runs: dict[str, list[list[dict]]] = {name: [] for name in names}
    worker_threads = None
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            uses_ray = name.startswith("ray")
            with local_ray(args.num_cpus, uses_ray):
                if uses_ray and worker_threads is None:
                    worker_threads = ray_worker_threads()
                history = run_variant(variant_config(config, name), name, args.max_steps)
            runs[name].append(history)
    return runs, worker_threads


def plot_epochs(runs: dict[str, list[list[dict]]], args: argparse.Namespace) -> str:
    """Images/s per epoch for every variant (first round): shows the warm-up epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, histories in runs.items():
        epochs = [int(h["epoch"]) for h in histories[0]]
        ax.plot(epochs, [h["images_per_s"] for h in histories[0]], marker="o", label=name)
    ax.set(xlabel="epoch", ylabel="training images/s (all workers)")
    ax.set_title(f"{args.model} on {args.dataset}, per-worker batch {args.batch}")
    ax.legend(fontsize=7)
    path = save_figure(fig, args.plot_dir, "scaling_images_per_s.png")
    plt.close(fig)
    return relative_link(path, args.out)


def _spread(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


def build_report(
    args: argparse.Namespace,
    command: str,
    runs: dict[str, list[list[dict]]],
    worker_threads: int | None,
) -> tuple[str, dict[str, float]]:
    per_round = {name: [steady_throughput(h) for h in hs] for name, hs in runs.items()}
    speed = {name: median(values) for name, values in per_round.items()}
    base = speed.get("local") or next(iter(speed.values()))
    rows = [
        [name, DESCRIPTIONS[name], speed[name], _spread(per_round[name]), speed[name] / base]
        for name in runs
    ]
    figures = {f"{name}_over_local": speed[name] / base for name in runs}
    figures.update({f"{name}_images_per_s": speed[name] for name in runs})
    if "ray_2_global" in speed and "ray_2_local" in speed:
        figures["global_over_local_ensembling"] = speed["ray_2_global"] / speed["ray_2_local"]
    threads = f"{worker_threads}" if worker_threads is not None else "n/a (no Ray variant)"
    subset = f"train_subset={args.subset}" if args.subset else "full training set"
    body = "\n".join(
        [
            section_header(command, torch.device("cpu")),
            f"`{args.model}` on `{args.dataset}` ({subset}), method bake, per-worker batch "
            f"{args.batch}, {args.epochs} epochs (first excluded), "
            f"{args.max_steps or 'all'} steps/epoch, {args.rounds} round(s), variants run in "
            f"rotating order. Ray: local, {args.num_cpus} CPUs (`raystart.init_ray`); torch "
            f"threads in a 1-CPU Ray worker: {threads}.\n",
            format_table(
                ["variant", "what", "images/s", "rounds (min-max)", "ratio to local"], rows
            ),
            "",
            f"![images/s per epoch]({plot_epochs(runs, args)})",
        ]
    )
    return body, figures


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line("bench.scaling", argv)
    runs, worker_threads = measure(args)
    body, figures = build_report(args, command, runs, worker_threads)
    emit(args, HEADING, KEY, body, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
