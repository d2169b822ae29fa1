"""What BAKE costs on top of cross-entropy, and when its O(B^3) ensembling starts to matter.

(a) Training step (forward + backward + SGD, the engine's own ``train_one_epoch`` on one
    batch) of ``bake`` over ``ce``: same model, optimizer, batch and data; interleaved.
(b) The ensembling alone (affinity + linear solve, ``bake.soft_targets``) on a global batch
    of B images, as a share of one step at the per-worker batch: with global ensembling
    every worker solves the B x B system of the whole global batch, so this is the part
    that grows with the number of workers.
(c) A prototype iterative solver (``bench.common.propagate_iterative``): time and error
    against the exact solve, and a numerical check of its error bound.

Clock: on CPU the default is this process's CPU time on one intra-op thread. On a shared
machine wall time mostly measures the neighbours (a 2-thread step on a loaded 2-core VM
took 3-10x its CPU time), while CPU time of a single thread stays within a few percent;
``--clock wall --threads N`` measures elapsed time on a dedicated machine. GPUs use wall
time with CUDA synchronisation.

``python -m bench.bake_overhead`` (CPU default, a few minutes); GPU:
``python -m bench.bake_overhead --device cuda --model resnet50 --image-size 224 --batch 64
--classes 1000 --amp bf16 --sizes 64,...,16384``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from bake_ray.bake import affinity, build_loss, propagate, soft_targets
from bake_ray.config import OptimConfig
from bake_ray.engine import Context, RunState, build_optimizer, train_one_epoch
from bake_ray.models import MODEL_NAMES, build_model
from bench.common import (
    CLOCKS,
    add_output_args,
    block_key,
    clustered_features,
    command_line,
    emit,
    format_table,
    interleaved_timings,
    max_row_l1,
    median,
    paired_ratio,
    propagate_iterative,
    propagate_until,
    random_features,
    relative_link,
    save_figure,
    section_header,
    steps_for_tolerance,
    torch_threads,
)

HEADING = "## 1. BAKE overhead"
KEY = "bake_overhead"
NEGLIGIBLE = 0.05  # the ensembling "stops being negligible" above 5% of a training step


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bake_overhead", description=__doc__)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default="cifar_resnet18", choices=MODEL_NAMES)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128, help="per-worker batch N")
    parser.add_argument("--same-class", type=int, default=3, help="M (label layout only)")
    parser.add_argument("--classes", type=int, default=100, help="classes of the model")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none", help="GPU only")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per method")
    parser.add_argument(
        "--sizes", default="64,128,256,512,1024,2048,4096", help="global batches B for (b)"
    )
    parser.add_argument("--feat-dim", type=int, default=512, help="D of the features in (b)")
    parser.add_argument("--ens-classes", type=int, default=1000, help="C of the logits in (b)")
    parser.add_argument("--features", choices=("random", "clustered"), default="random")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per B in (b)")
    parser.add_argument("--omega", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--tol", type=float, default=1e-4, help="iterative: omega^k < tol")
    parser.add_argument("--bound-batch", type=int, default=512, help="B of the bound check")
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        help="default: cpu (this process's CPU time) on CPU, wall on GPU",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (cpu clock: 1)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    args.clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    if args.threads is None and args.clock == "cpu":
        args.threads = 1
    if args.smoke:
        args.batch, args.image_size, args.steps, args.warmup = 8, 16, 2, 1
        args.sizes, args.ens_classes, args.repeats, args.bound_batch = "16,64", 100, 1, 32
    args.size_list = [int(s) for s in args.sizes.split(",")]
    return args


# --------------------------------------------------------------------------- (a) step time


def class_aware_labels(batch: int, same_class: int, classes: int) -> Tensor:
    """Labels laid out like the class-aware sampler's: anchor, then M of its class."""
    anchors = torch.arange(batch // (same_class + 1)) % classes
    return anchors.repeat_interleave(same_class + 1)[:batch]


def step_variants(
    args: argparse.Namespace, device: torch.device
) -> dict[str, Callable[[], object]]:
    """One engine training step with ``ce`` and with ``bake``, sharing model and optimizer.

    Two RunStates differ only in their loss, so weights, optimizer state and the batch are
    the same; what differs is exactly what BAKE adds (affinity, solve, KL term).
    """
    model = build_model(args.model, args.classes, 3, args.image_size).to(device)
    optimizer = build_optimizer(model, OptimConfig(lr=0.01))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no scaling
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    labels = class_aware_labels(args.batch, args.same_class, args.classes).to(device)
    ctx, amp = Context(device), args.amp == "bf16"
    variants: dict[str, Callable[[], object]] = {}
    for method in ("ce", "bake"):
        loss = build_loss(method, args.temperature, args.omega, global_ensembling=False)
        state = RunState(model, optimizer, scheduler, scaler, loss)
        variants[method] = partial(train_one_epoch, state, [(images, labels)], ctx, amp)
    return variants


# --------------------------------------------------------------------------- (b) ensembling


@dataclass
class EnsembleRow:
    """Median timings (s) and errors for one global batch size B."""

    batch: int
    times: dict[str, float]
    share: float  # soft_targets / ce step, median of per-round ratios
    iter_steps: int
    adaptive_steps: int
    errors: dict[str, float]


def ensemble_inputs(
    args: argparse.Namespace, batch: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(batch)
    if args.features == "random":
        features = random_features(batch, args.feat_dim, generator)
    else:
        features = clustered_features(batch, args.feat_dim, args.ens_classes, generator)
    logits = 3.0 * torch.randn(batch, args.ens_classes, generator=generator)
    return features.to(device), logits.to(device)


def ensemble_row(
    args: argparse.Namespace, batch: int, device: torch.device, step: Callable[[], object]
) -> EnsembleRow:
    """Time the library call, its parts and the solvers side by side, on the same inputs.

    A ce training step at the per-worker batch runs in every round too, so the share of a
    step is a paired ratio like the others.
    """
    features, logits = ensemble_inputs(args, batch, device)
    omega, k = args.omega, steps_for_tolerance(args.omega, args.tol)
    a32 = affinity(features)
    p32 = torch.softmax(logits / args.temperature, dim=1)
    a64, p64 = a32.double(), p32.double()
    adaptive = partial(propagate_until, a32, p32, omega, 2 * args.tol)
    variants: dict[str, Callable[[], object]] = {
        "soft_targets": partial(soft_targets, features, logits, omega, args.temperature),
        "affinity": partial(affinity, features),
        "solve_f32": partial(propagate, a32, p32, omega),
        "solve_f64": partial(propagate, a64, p64, omega),
        "iterative": partial(propagate_iterative, a32, p32, omega, k),
        "adaptive": adaptive,
        "ce_step": step,
    }
    times = interleaved_timings(variants, args.repeats, 1, device, CLOCKS[args.clock])
    reference = propagate(a64, p64, omega)
    adaptive_q, adaptive_steps = adaptive()
    errors = {
        "solve_f32": _max_abs(propagate(a32, p32, omega), reference),
        "iterative": _max_abs(propagate_iterative(a32, p32, omega, k), reference),
        "adaptive": _max_abs(adaptive_q, reference),
    }
    share = paired_ratio(times["soft_targets"], times["ce_step"])
    medians = {n: median(t) for n, t in times.items()}
    return EnsembleRow(batch, medians, share, k, adaptive_steps, errors)


def _max_abs(approx: Tensor, reference: Tensor) -> float:
    return float((approx.double() - reference).abs().max())


# --------------------------------------------------------------------------- (c) error bound


def bound_curves(args: argparse.Namespace) -> dict[tuple[str, float], list[float]]:
    """Row-L1 error of Q_k (float64) for k = 0..K, per (feature kind, omega)."""
    curves: dict[tuple[str, float], list[float]] = {}
    generator = torch.Generator().manual_seed(0)
    for kind in ("random", "clustered"):
        for omega in (0.5, 0.9):
            if kind == "random":
                features = random_features(args.bound_batch, args.feat_dim, generator)
            else:
                features = clustered_features(args.bound_batch, args.feat_dim, 10, generator)
            logits = 3.0 * torch.randn(args.bound_batch, args.ens_classes, generator=generator)
            a = affinity(features.double())
            p = torch.softmax(logits.double() / args.temperature, dim=1)
            exact = propagate(a, p, omega)
            steps = steps_for_tolerance(omega, 1e-6)
            curves[(kind, omega)] = [
                max_row_l1(propagate_iterative(a, p, omega, k) - exact) for k in range(steps + 1)
            ]
    return curves


def worst_bound_ratio(curves: dict[tuple[str, float], list[float]]) -> float:
    """max over curves and k of error / (2 omega^(k+1)); <= 1 means the bound holds."""
    return max(
        err / (2 * omega ** (k + 1))
        for (_, omega), errs in curves.items()
        for k, err in enumerate(errs)
    )


# --------------------------------------------------------------------------- report


def first_not_negligible(rows: list[EnsembleRow]) -> int | None:
    return next((r.batch for r in rows if r.share > NEGLIGIBLE), None)


def step_table(times: dict[str, list[float]], args: argparse.Namespace) -> str:
    ce, bake = median(times["ce"]), median(times["bake"])
    ratio = paired_ratio(times["bake"], times["ce"])
    rows = [[args.model, args.batch, f"{args.image_size}px", args.amp, ce * 1e3, bake * 1e3, ratio]]
    headers = ["model", "N", "input", "amp", "ce ms/step", "bake ms/step", "bake/ce (paired)"]
    return format_table(headers, rows)


def ensemble_table(rows: list[EnsembleRow]) -> str:
    headers = ["B", "soft_targets ms", "% of ce step (paired)", "affinity ms", "solve f32 ms",
               "solve f64 ms", "f64/f32"]  # fmt: skip
    body = [
        [
            r.batch,
            r.times["soft_targets"] * 1e3,
            f"{100 * r.share:.2g}%",
            r.times["affinity"] * 1e3,
            r.times["solve_f32"] * 1e3,
            r.times["solve_f64"] * 1e3,
            r.times["solve_f64"] / r.times["solve_f32"],
        ]
        for r in rows
    ]
    return format_table(headers, body)


def solver_table(rows: list[EnsembleRow]) -> str:
    headers = ["B", "solve f32 ms", "max err f32 solve", "iterative k", "iterative ms",
               "iter/solve", "max err iter", "adaptive k", "adaptive ms", "adaptive/solve",
               "max err adaptive"]  # fmt: skip
    body = [
        [
            r.batch,
            r.times["solve_f32"] * 1e3,
            f"{r.errors['solve_f32']:.1e}",
            r.iter_steps,
            r.times["iterative"] * 1e3,
            r.times["iterative"] / r.times["solve_f32"],
            f"{r.errors['iterative']:.1e}",
            r.adaptive_steps,
            r.times["adaptive"] * 1e3,
            r.times["adaptive"] / r.times["solve_f32"],
            f"{r.errors['adaptive']:.1e}",
        ]
        for r in rows
    ]
    return format_table(headers, body)


def plot_ensembling(rows: list[EnsembleRow], args: argparse.Namespace) -> str:
    """Log-log time vs B of the exact and iterative solvers, with the 5%-of-a-step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    batches = [r.batch for r in rows]
    labels = {
        "soft_targets": "soft_targets (affinity + f32 solve)",
        "solve_f32": "solve f32",
        "solve_f64": "solve f64",
        "iterative": f"iterative, k={rows[0].iter_steps} (omega^k<{args.tol:g})",
        "adaptive": "iterative, a-posteriori stop",
    }
    for name, label in labels.items():
        ax.plot(batches, [r.times[name] * 1e3 for r in rows], marker="o", label=label)
    step_s = median([r.times["ce_step"] for r in rows])
    ax.axhline(NEGLIGIBLE * step_s * 1e3, color="grey", ls="--", label="5% of a ce step")
    ax.set(
        xscale="log", yscale="log", xlabel="global batch B", ylabel=f"ms per call ({args.clock})"
    )
    ax.set_title(f"BAKE ensembling, D={args.feat_dim}, C={args.ens_classes}, {args.device}")
    ax.legend(fontsize=7)
    path = save_figure(fig, args.plot_dir, f"bake_ensembling_{args.device}.png")
    plt.close(fig)
    return relative_link(path, args.out)


def plot_bound(curves: dict[tuple[str, float], list[float]], args: argparse.Namespace) -> str:
    """Measured row-L1 error of the iteration against the a-priori bound 2 omega^(k+1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (kind, omega), errs in curves.items():
        ks = range(len(errs))
        ax.plot(ks, [max(e, 1e-17) for e in errs], label=f"measured, {kind}, omega={omega}")
        if kind == "random":
            ax.plot(ks, [2 * omega ** (k + 1) for k in ks], ls="--", label=f"bound, omega={omega}")
    ax.set(yscale="log", xlabel="iterations k", ylabel="max_i ||Q_k,i - Q_i||_1")
    ax.set_title(f"Iterative BAKE propagation vs exact solve (B={args.bound_batch}, float64)")
    ax.legend(fontsize=7)
    path = save_figure(fig, args.plot_dir, "bake_iterative_bound.png")
    plt.close(fig)
    return relative_link(path, args.out)


def build_report(
    args: argparse.Namespace,
    command: str,
    device: torch.device,
    step_times: dict[str, list[float]],
    rows: list[EnsembleRow],
    curves: dict[tuple[str, float], list[float]],
) -> tuple[str, dict[str, float]]:
    step_s = median(step_times["ce"])
    ratio = paired_ratio(step_times["bake"], step_times["ce"])
    threshold = first_not_negligible(rows)
    largest = rows[-1]
    figures = {
        "bake_over_ce_step": ratio,
        "ce_step_s": step_s,
        "ensemble_share_at_largest_b": largest.share,
        "iterative_over_solve_at_largest_b": largest.times["iterative"]
        / largest.times["solve_f32"],
        "adaptive_over_solve_at_largest_b": largest.times["adaptive"] / largest.times["solve_f32"],
        "f64_over_f32_solve_at_largest_b": largest.times["solve_f64"] / largest.times["solve_f32"],
        "worst_error_over_bound": worst_bound_ratio(curves),
        "first_b_above_5pct": float(threshold or 0),
    }
    where = f"from B = {threshold}" if threshold else f"nowhere up to B = {largest.batch}"
    body = "\n".join(
        [
            section_header(command, device, f"{args.clock}, {torch.get_num_threads()} thread(s)"),
            f"**(a) Step time, bake over ce: {ratio:.3f}x** (median of {args.steps} paired, "
            f"interleaved steps after {args.warmup} warm-up; random {args.image_size}px inputs, "
            f"{args.classes} classes, engine `train_one_epoch` on one batch).\n",
            step_table(step_times, args),
            "",
            f"**(b) Ensembling alone** (`soft_targets`, float32, D={args.feat_dim}, "
            f"C={args.ens_classes}, {args.features} features; median of {args.repeats}) as a share "
            f"of one ce step at the per-worker batch N={args.batch}: above 5% {where}.\n",
            ensemble_table(rows),
            "",
            f"**(c) Iterative prototype** (`bench.common.propagate_iterative`, omega={args.omega}; "
            f"k = smallest with omega^k < {args.tol:g}; adaptive stops when "
            f"omega/(1-omega)*||Q_k - Q_k-1||_rows <= {2 * args.tol:g}); errors are max |entry| "
            "against a float64 solve.\n",
            solver_table(rows),
            "",
            f"Bound check (B={args.bound_batch}, C={args.ens_classes}, float64, random and "
            "clustered features, omega 0.5 and 0.9): worst measured row-L1 error / bound "
            f"2*omega^(k+1) = {figures['worst_error_over_bound']:.3g} (<= 1: the bound holds).\n",
            f"![ensembling time vs B]({plot_ensembling(rows, args)})",
            f"![iteration error vs bound]({plot_bound(curves, args)})",
        ]
    )
    return body, figures


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args, command_line("bench.bake_overhead", argv))


def run(args: argparse.Namespace, command: str) -> int:
    device = torch.device(args.device)
    if args.amp == "bf16" and (device.type != "cuda" or not torch.cuda.is_bf16_supported()):
        raise SystemExit("--amp bf16 needs a CUDA device with bf16 support")
    steps = step_variants(args, device)
    clock = CLOCKS[args.clock]
    step_times = interleaved_timings(steps, args.steps, args.warmup, device, clock)
    rows = [ensemble_row(args, batch, device, steps["ce"]) for batch in args.size_list]
    curves = bound_curves(args)
    body, figures = build_report(args, command, device, step_times, rows, curves)
    emit(args, HEADING, block_key(KEY, device), body, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
