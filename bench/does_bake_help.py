"""Does BAKE help? bake vs ce vs label_smoothing, same sampler, epochs and seeds.

For your own data use ``python -m bake_ray.compare``: the same question as Ray Tune trials in
parallel (on a cluster too), with the paper's plain-batch baseline ``ce_standard``, compute
matched by images, paired t intervals and verdicts, and MLflow runs. This benchmark stays as
the in-process, Ray-free measurement that BENCHMARKS.md section 5 reproduces.

Every method trains with the same class-aware sampler, optimizer, schedule, epochs and
seeds (a fair baseline shares the sampler), through the engine's own ``fit``. The
reported accuracy is the test accuracy at the epoch that was best on the validation split
(held out of the training set), next to last-epoch test accuracy; the best *test* epoch
is never reported. Seeds are paired: seed s of every method sees the same data split and
initial weights, so per-seed differences are reported as well as per-method means.

``python -m bench.does_bake_help`` (Fashion-MNIST, 5000 images, small CNN, 9 runs of 8
epochs: about 7 minutes on a quiet 2-core machine, 26 on the loaded shared VM; with M=1
every image is an anchor once per epoch and a partner about once, so an epoch processes
about twice the training images). Full size: ``--subset 0 --epochs 30``. GPU:
``--device cuda --dataset cifar100 --model cifar_resnet18 --batch 128 --same-class 3
--lr 0.1 --weight-decay 1e-4 --epochs 200``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bake_ray.core.config import DATASETS, METHODS, MODELS, Config, from_dict
from bake_ray.core.engine import Context, fit
from bench.common import (
    add_output_args,
    block_key,
    command_line,
    emit,
    format_table,
    mean_std,
    median,
    relative_link,
    save_figure,
    section_header,
    torch_threads,
)

HEADING = "## 5. Does BAKE help?"
KEY = "does_bake_help"
History = list[dict[str, float]]


class MemoryReporter:
    """Keeps metrics in memory and ignores checkpoints: these runs are never resumed."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.history: History = []

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.history.append(dict(metrics))
        print(
            f"  {self.label} epoch {int(metrics['epoch'])}: val {metrics['val_acc']:.4f} "
            f"test {metrics['test_acc']:.4f}",
            flush=True,
        )

    def resume_from(self) -> Path | None:
        return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.does_bake_help", description=__doc__)
    parser.add_argument("--dataset", default="fashion_mnist", choices=DATASETS)
    parser.add_argument("--data-dir", help="data.data_dir (default: the dataset's own)")
    parser.add_argument("--model", default="small_cnn", choices=MODELS)
    parser.add_argument("--subset", type=int, default=3000, help="data.train_subset (0 = all)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch", type=int, default=64, help="N")
    parser.add_argument("--same-class", type=int, default=1, help="M")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--schedule", default="step", choices=("step", "cosine", "constant"))
    parser.add_argument("--omega", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--loss-weight", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0 = torch's default). On the quiet 2-core VM 2 threads "
        "trained the small CNN 1.8x faster than 1 (bench.scaling, 3 rounds); under heavy load "
        "1 thread can be several times faster, since idle OpenMP threads spin for a core",
    )
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.dataset, args.subset, args.epochs, args.seeds = "digits", 0, 2, 2
    args.method_list = args.methods.split(",")
    return args


def run_config(args: argparse.Namespace, method: str, seed: int) -> Config:
    return from_dict(
        {
            "seed": seed,
            "method": method,
            "epochs": args.epochs,
            "data": {
                "dataset": args.dataset,
                "data_dir": args.data_dir,
                "batch_size": args.batch,
                "same_class": args.same_class,
                "train_subset": args.subset or None,
            },
            "model": {"name": args.model},
            "bake": {
                "omega": args.omega,
                "temperature": args.temperature,
                "loss_weight": args.loss_weight,
            },
            "optim": {"lr": args.lr, "weight_decay": args.weight_decay, "schedule": args.schedule},
            "runtime": {"gpu": args.device.startswith("cuda")},
        }
    )


def run_all(args: argparse.Namespace) -> dict[str, list[History]]:
    """Every (seed, method) run; the method order rotates with the seed."""
    device = torch.device(args.device)
    histories: dict[str, list[History]] = {m: [] for m in args.method_list}
    names = args.method_list
    for seed in range(args.seeds):
        shift = seed % len(names)
        for method in names[shift:] + names[:shift]:
            reporter = MemoryReporter(f"{method} seed {seed}")
            fit(run_config(args, method, seed), reporter, Context(device))
            histories[method].append(reporter.history)
    return histories


def _pm(values: Sequence[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.2f} ± {std:.2f}"


def summary_rows(histories: dict[str, list[History]]) -> tuple[list[list], dict[str, float]]:
    """Per method: test at best val, last test, best epoch; and paired deltas vs ce."""
    rows, figures = [], {}
    baseline = histories.get("ce")
    for method, runs in histories.items():
        at_best = [h[-1]["test_acc_at_best_val"] for h in runs]
        last = [h[-1]["test_acc"] for h in runs]
        delta = "n/a"
        if baseline is not None and method != "ce":
            base = [h[-1]["test_acc_at_best_val"] for h in baseline]
            delta = _pm([a - b for a, b in zip(at_best, base, strict=True)])
            figures[f"{method}_minus_ce_at_best_val"] = mean_std(
                [a - b for a, b in zip(at_best, base, strict=True)]
            )[0]
        best_epoch = median([h[-1]["best_epoch"] for h in runs])
        rows.append([method, _pm(at_best), _pm(last), f"{best_epoch:g}", delta])
        figures[f"{method}_test_at_best_val"] = mean_std(at_best)[0]
        figures[f"{method}_last_test"] = mean_std(last)[0]
    return rows, figures


def plot_curves(histories: dict[str, list[History]], args: argparse.Namespace) -> str:
    """Mean test accuracy per epoch (band: ± one std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method, runs in histories.items():
        epochs = [int(h["epoch"]) for h in runs[0]]
        stats = [mean_std([100 * run[i]["test_acc"] for run in runs]) for i in range(len(epochs))]
        means = [m for m, _ in stats]
        ax.plot(epochs, means, marker="o", label=method)
        ax.fill_between(epochs, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)")
    ax.set_title(f"{args.model} on {args.dataset}, {args.seeds} seeds")
    ax.legend()
    path = save_figure(fig, args.plot_dir, f"does_bake_help_{args.dataset}.png")
    plt.close(fig)
    return relative_link(path, args.out)


def build_report(
    args: argparse.Namespace, command: str, histories: dict[str, list[History]], wall_s: float
) -> tuple[str, dict[str, float]]:
    rows, figures = summary_rows(histories)
    figures["wall_s"] = wall_s
    subset = f"train_subset={args.subset}" if args.subset else "full training set"
    headers = ["method", "test acc @ best val (%)", "last-epoch test acc (%)",
               "best epoch (median)", "Δ vs ce @ best val (paired, pp)"]  # fmt: skip
    body = "\n".join(
        [
            section_header(command, torch.device(args.device)),
            f"`{args.model}` on `{args.dataset}` ({subset}, 10% of it held out for validation), "
            f"{args.epochs} epochs, batch N={args.batch} with M={args.same_class}, SGD lr "
            f"{args.lr} ({args.schedule}), wd {args.weight_decay}; BAKE T={args.temperature}, "
            f"omega={args.omega}, lambda={args.loss_weight}; label smoothing 0.1; seeds "
            f"0..{args.seeds - 1}; mean ± std over seeds; {wall_s / 60:.1f} min in all.\n",
            format_table(headers, rows),
            "",
            f"![test accuracy per epoch]({plot_curves(histories, args)})",
        ]
    )
    return body, figures


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line("bench.does_bake_help", argv)
    start = time.perf_counter()
    with torch_threads(args.threads):
        histories = run_all(args)
    wall_s = time.perf_counter() - start
    body, figures = build_report(args, command, histories, wall_s)
    if not all(math.isfinite(v) for v in figures.values()):
        raise SystemExit("non-finite result: see the runs above")
    emit(args, HEADING, block_key(KEY, torch.device(args.device)), body, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
