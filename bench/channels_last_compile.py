"""What ``runtime.channels_last`` and ``torch.compile`` cost or gain per BAKE training step.

For each model, one engine training step (forward, BAKE loss, backward, SGD: the engine's
own ``train_one_epoch`` on one batch) is timed in up to four variants built from the same
seed and fed the same batch: eager NCHW (the baseline), eager NHWC (``channels_last``, the
run's own model set-up), ``torch.compile``d NCHW and compiled NHWC. Variants are interleaved
in rounds and reported as ratios over eager NCHW (below 1 = faster).

Compilation is paid once per process, and every trial and every Ray Train worker is a new
process, so its cost matters as much as its gain: the first compiled step is timed on the
wall clock (the compiler runs in worker processes, outside this process's CPU time) less an
eager step, once with an empty compiler cache (a fresh directory: what a new node pays) and
once more after ``torch._dynamo.reset()`` with the cache filled (what a later trial on the
same node pays); ``break-even steps`` is the cold cost over the per-step saving.

Clock: on CPU this process's CPU time on one intra-op thread, as in ``bench.bake_overhead``
(wall time on a shared machine measures the neighbours); GPUs use wall time.

``python -m bench.channels_last_compile`` (CPU default: about 10 minutes on 2 cores, most of
it compiling); GPU: ``--device cuda --image-size 224 --batch 64 --amp``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import torch

from bake_ray.core import config as cfg
from bake_ray.core.engine import Context, RunState, build_state, train_one_epoch
from bench.common import (
    CLOCKS,
    add_output_args,
    block_key,
    command_line,
    emit,
    format_table,
    interleaved_timings,
    median,
    paired_ratio,
    section_header,
    time_call,
    torch_threads,
)

HEADING = "## 6. channels_last and torch.compile"
KEY = "channels_last_compile"
DEFAULT_MODELS = "cifar_resnet18,timm/resnet18,timm/convnext_atto,timm/vit_tiny_patch16_224"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.channels_last_compile")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated model.name")
    parser.add_argument(
        "--compile-models",
        default="timm/resnet18",
        help="models also timed under torch.compile (comma-separated; 'none' for none)",
    )
    parser.add_argument("--batch", type=int, default=32, help="N images per step (M=1)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=8, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--amp", action="store_true", help="bf16/fp16 autocast (GPU only)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), help="default: cpu on CPU, else wall")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (cpu clock: 1)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    args.clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    if args.threads is None and args.clock == "cpu":
        args.threads = 1
    if args.smoke:  # seconds: tiny models, no compilation (that alone takes minutes on CPU)
        args.models, args.compile_models = "timm/test_resnet,timm/test_vit", "none"
        args.batch, args.image_size, args.repeats, args.warmup = 8, 32, 2, 1
    args.model_list = [m for m in args.models.split(",") if m]
    args.compile_list = [m for m in args.compile_models.split(",") if m and m != "none"]
    return args


def _state(args: argparse.Namespace, name: str, channels_last: bool, ctx: Context) -> RunState:
    config = cfg.from_dict(
        {
            "model": {"name": name},
            "data": {"batch_size": args.batch, "same_class": 1},
            "optim": {"lr": 0.01, "schedule": "constant"},
            "runtime": {"channels_last": channels_last, "amp": args.amp},
        }
    )
    torch.manual_seed(0)
    return build_state(config, ctx, args.classes, 3, args.image_size, steps_per_epoch=1)


def _step(state: RunState, batch: tuple[torch.Tensor, torch.Tensor], ctx: Context, amp: bool):
    return lambda: train_one_epoch(state, [batch], ctx, amp, max_steps=1)


def measure_model(args: argparse.Namespace, name: str, device: torch.device) -> dict[str, float]:
    """Step-time ratios of one model's variants, and its compile cost when compiled."""
    ctx = Context(device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator)
    labels = (torch.arange(args.batch) // 2) % args.classes  # anchor + one of its class
    batch = (images.to(device), labels.to(device))
    eager, nhwc = _state(args, name, False, ctx), _state(args, name, True, ctx)
    variants: dict[str, Callable[[], object]] = {
        "eager": _step(eager, batch, ctx, args.amp),
        "channels_last": _step(nhwc, batch, ctx, args.amp),
    }
    row: dict[str, float] = {"params_m": sum(p.numel() for p in eager.model.parameters()) / 1e6}
    if name in args.compile_list:
        for label, channels_last in (("compiled", False), ("compiled_channels_last", True)):
            for cache in ("cold", "warm"):  # a fresh process: empty, then filled, disk cache
                torch._dynamo.reset()
                state = _state(args, name, channels_last, ctx)
                state.model = torch.compile(state.model)
                first = time_call(_step(state, batch, ctx, args.amp), device)  # compiles: wall
                eager_step = time_call(variants["eager"], device)
                row[f"{label}_compile_{cache}_s"] = max(first - eager_step, 0.0)
            variants[label] = _step(state, batch, ctx, args.amp)
    times = interleaved_timings(variants, args.repeats, args.warmup, device, CLOCKS[args.clock])
    row["eager_step_s"] = median(times["eager"])
    for label in variants:
        if label != "eager":
            row[f"{label}_over_eager"] = paired_ratio(times[label], times["eager"])
    return row


def _break_even(row: dict[str, float], label: str) -> str:
    saving = row["eager_step_s"] * (1.0 - row[f"{label}_over_eager"])
    if saving <= 0:
        return "never"
    return f"{row[f'{label}_compile_cold_s'] / saving:,.0f}"


def _compile_cell(row: dict[str, float]) -> str:
    plain = f"{row['compiled_compile_cold_s']:.0f} / {row['compiled_compile_warm_s']:.0f}"
    nhwc = (
        f"{row['compiled_channels_last_compile_cold_s']:.0f} / "
        f"{row['compiled_channels_last_compile_warm_s']:.0f}"
    )
    return f"{plain} (NHWC: {nhwc})"


def build_report(
    args: argparse.Namespace, command: str, device: torch.device, rows: dict[str, dict]
) -> tuple[str, dict[str, float]]:
    headers = [
        "model", "params (M)", "eager step (s)", "channels_last / eager",
        "compiled / eager", "compiled + channels_last / eager",
        "compile cold / warm cache (s, wall)", "break-even steps (cold)",
    ]  # fmt: skip
    table, figures = [], {}
    for name, row in rows.items():
        compiled = "compiled_over_eager" in row
        table.append(
            [
                name,
                f"{row['params_m']:.2f}",
                f"{row['eager_step_s']:.4f}",
                f"{row['channels_last_over_eager']:.3f}",
                f"{row['compiled_over_eager']:.3f}" if compiled else "not run",
                f"{row['compiled_channels_last_over_eager']:.3f}" if compiled else "not run",
                _compile_cell(row) if compiled else "",
                _break_even(row, "compiled") if compiled else "",
            ]
        )
        for key, value in row.items():
            figures[f"{name}:{key}"] = value
    setup = (
        f"One BAKE training step (engine `train_one_epoch`, SGD), batch N={args.batch} with M=1, "
        f"{args.image_size}x{args.image_size} RGB, {args.classes} classes, amp "
        f"{'on' if args.amp else 'off'}; {args.repeats} interleaved rounds after "
        f"{args.warmup} warm-up rounds; ratios are medians of per-round ratios (< 1 = faster)."
    )
    body = "\n".join(
        [section_header(command, device, args.clock), setup, "", format_table(headers, table)]
    )
    return body, figures


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args, command_line("bench.channels_last_compile", argv))


def run(args: argparse.Namespace, command: str) -> int:
    device = torch.device(args.device)
    if args.compile_list:  # a compiler cache of earlier runs would hide the cold cost
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_inductor_")
    start = time.perf_counter()
    rows = {name: measure_model(args, name, device) for name in args.model_list}
    body, figures = build_report(args, command, device, rows)
    body += f"\n\nTotal wall time: {(time.perf_counter() - start) / 60:.1f} min."
    emit(args, HEADING, block_key(KEY, device), body, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
