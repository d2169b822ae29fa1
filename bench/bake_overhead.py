"""What BAKE costs on top of cross-entropy, and when its O(B^3) ensembling starts to matter.

(a) Training step (forward + backward + SGD, the engine's own ``train_one_epoch`` on one
    batch) of ``bake`` over ``ce``: same model, optimizer, batch and data; interleaved.
(b) The ensembling alone (``bake.soft_targets``: affinity + targets) on a global batch of
    B images, per solver (``solve``, ``neumann``, ``auto``, and the bench-only a-posteriori
    stop), as a share of one ce step at the per-worker batch: with global ensembling every
    worker ensembles the whole global batch, so this is the part that grows with the
    number of workers. Errors are row-L1 distances from a float64 solve.
(c) Where ``auto`` switches (its flop rule, for several omega and C), and a numerical check
    of ``neumann``'s a-priori error bound.

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

from bake_ray.core.bake import (
    DEFAULT_TOL,
    affinity,
    build_loss,
    choose_solver,
    neumann_steps,
    propagate,
    propagate_neumann,
    soft_targets,
)
from bake_ray.core.config import OptimConfig
from bake_ray.core.engine import Context, RunState, build_optimizer, train_one_epoch
from bake_ray.core.models import MODEL_NAMES, build_model
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
    propagate_until,
    random_features,
    relative_link,
    save_figure,
    section_header,
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
        "--sizes", default="64,128,256,512,1024,2048,4096,8192", help="global batches B for (b)"
    )
    parser.add_argument("--feat-dim", type=int, default=512, help="D of the features in (b)")
    parser.add_argument(
        "--ens-classes", default="100,1000", help="C of the logits in (b), comma-separated"
    )
    parser.add_argument("--features", choices=("random", "clustered"), default="random")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per B in (b)")
    parser.add_argument("--ens-warmup", type=int, default=1, help="warm-up rounds per B in (b)")
    parser.add_argument("--omega", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument(
        "--tol", type=float, default=DEFAULT_TOL, help="solver tolerance (row-L1), as bake.tol"
    )
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
        args.sizes, args.ens_classes, args.repeats, args.bound_batch = "16,256", "2,100", 1, 32
    args.size_list = [int(s) for s in args.sizes.split(",")]
    args.class_list = [int(c) for c in args.ens_classes.split(",")]
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


SOLVER_VARIANTS = ("solve", "neumann", "auto", "adaptive")


@dataclass
class EnsembleRow:
    """Median timings (s), paired shares of a ce step and errors for one (C, B)."""

    classes: int
    batch: int
    times: dict[str, float]
    shares: dict[str, float]  # variant / ce step, median of per-round ratios
    auto_pick: str
    neumann_k: int
    adaptive_k: int
    errors: dict[str, float]  # max row-L1 distance from a float64 solve
    neumann_error_f64: float  # the same, neumann run in float64: the bound's exact-maths side


def ensemble_inputs(
    args: argparse.Namespace, batch: int, classes: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(batch + classes)
    if args.features == "random":
        features = random_features(batch, args.feat_dim, generator)
    else:
        features = clustered_features(batch, args.feat_dim, classes, generator)
    logits = 3.0 * torch.randn(batch, classes, generator=generator)
    return features.to(device), logits.to(device)


def _adaptive(features: Tensor, logits: Tensor, args: argparse.Namespace) -> tuple[Tensor, int]:
    """The a-posteriori stop at the same tolerance, affinity included like the others."""
    probs = torch.softmax(logits / args.temperature, dim=1)
    return propagate_until(affinity(features), probs, args.omega, args.tol)


def ensemble_row(
    args: argparse.Namespace,
    batch: int,
    classes: int,
    device: torch.device,
    step: Callable[[], object],
) -> EnsembleRow:
    """Time every solver side by side on the same inputs, with a ce step in every round.

    Each variant is the whole library call (affinity + targets), so its share of a step is
    what a training step pays; the ce step in every round makes each share a paired ratio.
    """
    features, logits = ensemble_inputs(args, batch, classes, device)
    omega, temperature, tol = args.omega, args.temperature, args.tol
    call = partial(soft_targets, features, logits, omega, temperature, tol=tol)
    f64, z64 = features.double(), logits.double()
    variants: dict[str, Callable[[], object]] = {
        "affinity": partial(affinity, features),
        **{name: partial(call, solver=name) for name in ("solve", "neumann", "auto")},
        "adaptive": partial(_adaptive, features, logits, args),
        "solve_f64": partial(soft_targets, f64, z64, omega, temperature, "solve"),
        "ce_step": step,
    }
    times = interleaved_timings(variants, args.repeats, args.ens_warmup, device, CLOCKS[args.clock])
    reference = soft_targets(f64, z64, omega, temperature, "solve")
    adaptive_q, adaptive_k = _adaptive(features, logits, args)
    results = {name: call(solver=name) for name in ("solve", "neumann", "auto")}
    errors = {name: max_row_l1(q.double() - reference) for name, q in results.items()}
    errors["adaptive"] = max_row_l1(adaptive_q.double() - reference)
    neumann_f64 = soft_targets(f64, z64, omega, temperature, "neumann", tol)
    return EnsembleRow(
        classes,
        batch,
        {n: median(t) for n, t in times.items()},
        {n: paired_ratio(times[n], times["ce_step"]) for n in (*SOLVER_VARIANTS, "affinity")},
        choose_solver(batch, classes, omega, tol),
        neumann_steps(omega, tol),
        adaptive_k,
        errors,
        max_row_l1(neumann_f64 - reference),
    )


# --------------------------------------------------------------------------- (c) bound, switch


def bound_curves(args: argparse.Namespace) -> dict[tuple[str, float], list[tuple[int, float]]]:
    """(k, row-L1 error of Q_k) in float64 for k up to tol 1e-6, per (feature kind, omega)."""
    curves: dict[tuple[str, float], list[tuple[int, float]]] = {}
    generator = torch.Generator().manual_seed(0)
    classes = args.class_list[-1]
    for kind in ("random", "clustered"):
        for omega in (0.5, 0.9):
            if kind == "random":
                features = random_features(args.bound_batch, args.feat_dim, generator)
            else:
                features = clustered_features(args.bound_batch, args.feat_dim, 10, generator)
            logits = 3.0 * torch.randn(args.bound_batch, classes, generator=generator)
            a = affinity(features.double())
            p = torch.softmax(logits.double() / args.temperature, dim=1)
            exact = propagate(a, p, omega)
            curves[(kind, omega)] = [
                (k, max_row_l1(propagate_neumann(a, p, omega, k) - exact))
                for k in _bound_ks(neumann_steps(omega, 1e-6))
            ]
    return curves


def _bound_ks(steps: int) -> list[int]:
    """k = 0..10, then about 20 more up to ``steps``: each Q_k is recomputed from P."""
    return sorted({*range(min(steps, 10) + 1), *range(0, steps + 1, max(steps // 20, 1)), steps})


def worst_bound_ratio(curves: dict[tuple[str, float], list[tuple[int, float]]]) -> float:
    """max over curves and k of error / (2 omega^(k+1)); <= 1 means the bound holds."""
    return max(
        err / (2 * omega ** (k + 1)) for (_, omega), errs in curves.items() for k, err in errs
    )


def switch_table() -> str:
    """k and the B above which ``auto`` takes ``neumann``, B > 3 C (k - 1), per omega, tol, C."""
    headers = ["omega", "tol", "neumann k", "C=10: B >", "C=100: B >", "C=1000: B >"]
    rows = []
    for omega in (0.3, 0.5, 0.7, 0.9):
        for tol in (1e-6, 1e-4, 1e-2):
            k = neumann_steps(omega, tol)
            rows.append([omega, f"{tol:g}", k, *[3 * c * (k - 1) for c in (10, 100, 1000)]])
    return format_table(headers, rows)


# --------------------------------------------------------------------------- report


def first_not_negligible(rows: list[EnsembleRow], variant: str) -> int | None:
    """Smallest B (largest C) where ``variant`` costs more than 5% of a ce step."""
    widest = [r for r in rows if r.classes == rows[-1].classes]
    return next((r.batch for r in widest if r.shares[variant] > NEGLIGIBLE), None)


def step_table(times: dict[str, list[float]], args: argparse.Namespace) -> str:
    ce, bake = median(times["ce"]), median(times["bake"])
    ratio = paired_ratio(times["bake"], times["ce"])
    rows = [[args.model, args.batch, f"{args.image_size}px", args.amp, ce * 1e3, bake * 1e3, ratio]]
    headers = ["model", "N", "input", "amp", "ce ms/step", "bake ms/step", "bake/ce (paired)"]
    return format_table(headers, rows)


def _pct(share: float) -> str:
    return f"{100 * share:.2g}%"


def ensemble_table(rows: list[EnsembleRow]) -> str:
    headers = ["C", "B", "affinity", "solve", "neumann (k)", "auto (pick)", "adaptive (k)",
               "solve ms", "neumann ms", "adaptive ms", "f64/f32 solve"]  # fmt: skip
    body = [
        [
            r.classes,
            r.batch,
            _pct(r.shares["affinity"]),
            _pct(r.shares["solve"]),
            f"{_pct(r.shares['neumann'])} ({r.neumann_k})",
            f"{_pct(r.shares['auto'])} ({r.auto_pick})",
            f"{_pct(r.shares['adaptive'])} ({r.adaptive_k})",
            r.times["solve"] * 1e3,
            r.times["neumann"] * 1e3,
            r.times["adaptive"] * 1e3,
            r.times["solve_f64"] / r.times["solve"],
        ]
        for r in rows
    ]
    return format_table(headers, body)


def error_table(rows: list[EnsembleRow], tol: float) -> str:
    headers = ["C", "B", "solve f32", "neumann f32", "neumann f64", "auto f32", "adaptive f32"]
    body = []
    for r in rows:
        errors = [r.errors["solve"], r.errors["neumann"], r.neumann_error_f64, r.errors["auto"]]
        body.append([r.classes, r.batch, *[f"{e:.1e}" for e in (*errors, r.errors["adaptive"])]])
    return format_table(headers, body) + f"\n\n(tol = {tol:g}.)"


def plot_ensembling(rows: list[EnsembleRow], args: argparse.Namespace) -> str:
    """Log-log share of a ce step vs B, per solver and C, with the 5%-of-a-step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {c: style for c, style in zip(args.class_list, ("-", "--", ":", "-."), strict=False)}
    for classes in args.class_list:
        mine = [r for r in rows if r.classes == classes]
        for name in SOLVER_VARIANTS:
            ax.plot(
                [r.batch for r in mine],
                [100 * r.shares[name] for r in mine],
                marker="o",
                ls=styles.get(classes, "-"),
                label=f"{name}, C={classes}",
            )
    ax.axhline(100 * NEGLIGIBLE, color="grey", ls="--", label="5% of a ce step")
    ax.set(xscale="log", yscale="log", xlabel="global batch B", ylabel="% of a ce step")
    ax.set_title(f"BAKE ensembling per solver, D={args.feat_dim}, tol={args.tol:g}, {args.device}")
    ax.legend(fontsize=6, ncol=2)
    path = save_figure(fig, args.plot_dir, f"bake_ensembling_{args.device}.png")
    plt.close(fig)
    return relative_link(path, args.out)


def plot_bound(
    curves: dict[tuple[str, float], list[tuple[int, float]]], args: argparse.Namespace
) -> str:
    """Measured row-L1 error of the iteration against the a-priori bound 2 omega^(k+1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (kind, omega), points in curves.items():
        ks, errs = [k for k, _ in points], [e for _, e in points]
        ax.plot(ks, [max(e, 1e-17) for e in errs], label=f"measured, {kind}, omega={omega}")
        if kind == "random":
            ax.plot(ks, [2 * omega ** (k + 1) for k in ks], ls="--", label=f"bound, omega={omega}")
    ax.set(yscale="log", xlabel="iterations k", ylabel="max_i ||Q_k,i - Q_i||_1")
    ax.set_title(f"neumann vs exact solve (B={args.bound_batch}, float64)")
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
    curves: dict[tuple[str, float], list[tuple[int, float]]],
) -> tuple[str, dict[str, float]]:
    step_s = median(step_times["ce"])
    ratio = paired_ratio(step_times["bake"], step_times["ce"])
    largest = rows[-1]
    figures = {
        "bake_over_ce_step": ratio,
        "ce_step_s": step_s,
        "ensemble_share_at_largest_b": largest.shares["auto"],
        "solve_share_at_largest_b": largest.shares["solve"],
        "neumann_share_at_largest_b": largest.shares["neumann"],
        "iterative_over_solve_at_largest_b": largest.times["neumann"] / largest.times["solve"],
        "adaptive_over_solve_at_largest_b": largest.times["adaptive"] / largest.times["solve"],
        "f64_over_f32_solve_at_largest_b": largest.times["solve_f64"] / largest.times["solve"],
        "worst_error_over_bound": worst_bound_ratio(curves),
        "worst_neumann_f64_error_over_tol": max(r.neumann_error_f64 for r in rows) / args.tol,
        "first_b_above_5pct": float(first_not_negligible(rows, "auto") or 0),
    }
    threshold = first_not_negligible(rows, "auto")
    where = f"from B = {threshold}" if threshold else f"nowhere up to B = {largest.batch}"
    body = "\n".join(
        [
            section_header(command, device, f"{args.clock}, {torch.get_num_threads()} thread(s)"),
            f"**(a) Step time, bake over ce: {ratio:.3f}x** (median of {args.steps} paired, "
            f"interleaved steps after {args.warmup} warm-up; random {args.image_size}px inputs, "
            f"{args.classes} classes, engine `train_one_epoch` on one batch).\n",
            step_table(step_times, args),
            "",
            f"**(b) Ensembling per solver as a share of one ce step** (N={args.batch}, "
            f"{step_s * 1e3:.0f} ms): `soft_targets` (affinity + targets), float32, "
            f"D={args.feat_dim}, {args.features} features, omega={args.omega}, tol={args.tol:g} "
            f"(row-L1); median of {args.repeats} paired rounds after {args.ens_warmup} warm-up. "
            "neumann runs the a-priori k; auto is the library default (its pick in brackets); "
            "adaptive is the bench-only a-posteriori stop (one host read per round). With the "
            f"largest C, auto passes 5% of a step {where}.\n",
            ensemble_table(rows),
            "",
            "Errors: max_i ||Q~_i - Q_i||_1 against a float64 solve of the same inputs "
            "(neumann f64: the iteration in float64, where the proven bound is the whole "
            "error).\n",
            error_table(rows, args.tol),
            "",
            "**(c) Where auto switches.** k = smallest with 2 omega^(k+1) <= tol; auto takes "
            "neumann when its 2 k B^2 C flops are fewer than the solve's 2/3 B^3 + 2 B^2 C, "
            "i.e. B > 3 C (k - 1):\n",
            switch_table(),
            "",
            f"Bound check (B={args.bound_batch}, C={args.class_list[-1]}, float64, random and "
            "clustered features, omega 0.5 and 0.9, k = 0..10 and ~20 more up to tol 1e-6): "
            "worst measured row-L1 error / bound 2*omega^(k+1) = "
            f"{figures['worst_error_over_bound']:.3g} (<= 1: the bound holds).\n",
            f"![ensembling share vs B]({plot_ensembling(rows, args)})",
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
    rows = [
        ensemble_row(args, batch, classes, device, steps["ce"])
        for classes in args.class_list
        for batch in args.size_list
    ]
    curves = bound_curves(args)
    body, figures = build_report(args, command, device, step_times, rows, curves)
    emit(args, HEADING, block_key(KEY, device), body, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
