"""Shared helpers for the benchmarks: interleaved timing, tables, report sections, and the
a-posteriori stopping rule that the BAKE solver benchmark compares against.

Why interleaved timing: the benchmarks run on shared machines whose speed drifts (other
processes, thermal state, allocator warm-up). Timing variant A for a minute and then
variant B for a minute folds that drift into the A/B ratio. Running A and B alternately
(rotating who goes first), after a warm-up, and taking the median of the per-round ratios
cancels most of it; only ratios measured that way are reported as key figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers the work it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: ``wall``: elapsed time (dedicated machines, GPUs). ``cpu``: CPU time of this process, which
#: other jobs on a shared machine do not inflate (use it with one intra-op thread: idle
#: OpenMP threads spin and bill CPU time while they wait for a busy core).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_call(
    fn: Callable[[], object], device: torch.device, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Seconds taken by one call of ``fn`` on ``clock``, device work included."""
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def interleaved_timings(
    variants: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Per-variant lists of ``repeats`` timings, taken in rounds that run every variant once.

    Warm-up calls (caches, allocator, lazy init) are made for every variant first and
    discarded; the order inside a round is rotated so no variant always follows another.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(variants[name], device, clock))
    return times


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for a block, then restore it (None: leave it).

    Restoring matters when benchmarks run inside a test session that shares the process.
    """
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of per-round ratios: robust to drift that affects both variants of a round."""
    return median([a / b for a, b in zip(numerator, denominator, strict=True)])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return float(statistics.fmean(values)), float(std)


# --------------------------------------------------------------------------- a-posteriori BAKE stop


def max_row_l1(difference: Tensor) -> float:
    """max_i sum_c |x_ic|: the norm in which the solvers' error bounds hold."""
    return float(difference.abs().sum(dim=1).max())


@torch.no_grad()
def propagate_until(
    affinity_matrix: Tensor, probs: Tensor, omega: float, tol: float, max_steps: int = 1000
) -> tuple[Tensor, int]:
    """Iterate until an a-posteriori bound guarantees ||Q_k - Q||_rows <= tol; (Q_k, k).

    The same rounds as ``bake.propagate_neumann`` (whose docstring proves
    ||e_k|| <= omega ||e_{k-1}||), with a data-dependent stop: with e_k = Q_k - Q and
    d_k = Q_k - Q_{k-1}, ||e_k|| <= omega ||e_{k-1}|| <= omega (||e_k|| + ||d_k||), hence
    ||e_k|| <= omega / (1 - omega) ||d_k||. Real affinities are far from the worst case, so
    this stops long before the a-priori k. It reads the norm on the host every round (a sync
    per round on a GPU), which is why the product's solvers do not use it; it is measured
    here as the alternative.
    """
    scaled = omega * affinity_matrix
    base = (1.0 - omega) * probs
    targets = probs
    factor = omega / (1.0 - omega)
    for step in range(1, max_steps + 1):
        updated = torch.addmm(base, scaled, targets)
        change = max_row_l1(updated - targets)
        targets = updated
        if factor * change <= tol:
            return targets, step
    return targets, max_steps


# --------------------------------------------------------------------------- synthetic inputs


def random_features(batch: int, dim: int, generator: torch.Generator) -> Tensor:
    """Gaussian features: cosines near 0, so the affinity is close to uniform."""
    return torch.randn(batch, dim, generator=generator)


def clustered_features(batch: int, dim: int, clusters: int, generator: torch.Generator) -> Tensor:
    """Non-negative, class-clustered features like a trained network's pooled ReLU output.

    Cosines range from about 0 (other cluster) to near 1 (same cluster): the affinity is as
    far from uniform as BAKE's temperature-free softmax allows, the hard case for iteration.
    """
    centres = torch.rand(clusters, dim, generator=generator) ** 4
    labels = torch.randint(clusters, (batch,), generator=generator)
    noise = 0.05 * torch.rand(batch, dim, generator=generator)
    return torch.relu(centres[labels] + noise)


# --------------------------------------------------------------------------- reporting


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (also readable in a terminal)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in cells]  # fmt: skip
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def machine_description(device: torch.device) -> str:
    """Where the numbers were taken: CPU count, torch build, threads, accelerator."""
    accel = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU used"
    return (
        f"{platform.machine()} {os.cpu_count()} CPU cores, {accel}, torch {torch.__version__} "
        f"(intra-op threads: {torch.get_num_threads()}), Python {platform.python_version()}"
    )


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", module, *args])


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """Flags every benchmark shares: tiny CI size, report file, figures file, plot folder."""
    parser.add_argument("--smoke", action="store_true", help="tiny size (seconds), for CI")
    parser.add_argument("--out", type=Path, help="write/replace this benchmark's markdown here")
    parser.add_argument("--json", type=Path, help="write the key figures as JSON here")
    parser.add_argument(
        "--plot-dir", type=Path, default=RESULTS_DIR, help="where PNG plots go (bench/results)"
    )


def load_average() -> str:
    """The 1-minute load average: how busy the (possibly shared) machine was."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def section_header(command: str, device: torch.device, clock: str = "wall") -> str:
    """Date, machine, clock, load and exact command: the first lines of every section."""
    today = datetime.date.today().isoformat()
    return (
        f"Measured {today} on {machine_description(device)}; clock: {clock}; 1-min load "
        f"average at the end: {load_average()}.\n\nCommand: `{command}`\n"
    )


def write_section(path: Path, heading: str, key: str, body: str) -> None:
    """Put ``body`` under ``heading`` in ``path``, replacing the previous run's output only.

    The generated text sits between ``<!-- bench:KEY -->`` markers, so hand-written text
    around it (interpretation, notes) survives a rerun.
    """
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    elif f"\n{heading}\n" in f"\n{text}":
        head, tail = f"\n{text}".split(f"\n{heading}\n", 1)
        text = f"{head}\n{heading}\n\n{block}\n{tail}"[1:]
    else:
        text = f"{text.rstrip()}\n\n{heading}\n\n{block}\n".lstrip()
    path.write_text(text)


def emit(
    args: argparse.Namespace, heading: str, key: str, body: str, figures: Mapping[str, float]
) -> None:
    """Print the section, and write it (``--out``) and the key figures (``--json``)."""
    print(f"{heading}\n\n{body.strip()}\n", flush=True)
    if args.out is not None:
        write_section(args.out, heading, key, body)
    if args.json is not None:
        args.json.write_text(json.dumps(dict(figures), indent=2, sort_keys=True) + "\n")


def block_key(name: str, device: torch.device) -> str:
    """The report block's key: GPU runs get their own block next to the CPU one."""
    return name if device.type == "cpu" else f"{name}_{device.type}"


def save_figure(figure: Any, plot_dir: Path, name: str) -> Path:
    """Save a matplotlib figure as PNG under ``plot_dir``; returns its path."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    path = plot_dir / name
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def relative_link(path: Path, out: Path | None) -> str:
    """``path`` relative to the report's folder (for a markdown image link)."""
    base = out.resolve().parent if out is not None else Path.cwd()
    try:
        return str(path.resolve().relative_to(base))
    except ValueError:
        return str(path.resolve())
