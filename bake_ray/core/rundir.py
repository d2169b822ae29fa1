"""The run folder every training run writes, and the line it prints per epoch.

A local run (``LocalReporter`` in :mod:`bake_ray.train`) and a Ray Train run (the
controller's ``RunDirCallback`` in :mod:`bake_ray.scale.raytrain`) write the same layout:
``config.yaml``, ``metrics.jsonl`` (one line per epoch) and ``best/checkpoint.pt`` (the best
validation epoch). Both import this module; it imports neither, so neither imports the other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bake_ray.core.checkpoint import CHECKPOINT_FILE

METRICS_LOG = "metrics.jsonl"
BEST_DIR = "best"


def format_progress(metrics: dict[str, float], epochs: int) -> str:
    """One human line per epoch: loss parts, accuracies, learning rate, throughput."""
    return (
        f"epoch {int(metrics['epoch']):>3}/{epochs}  "
        f"loss {metrics['train_loss']:.4f} (ce {metrics['train_ce']:.4f} "
        f"kd {metrics['train_kd']:.4f})  val {metrics['val_acc']:.4f}  "
        f"test {metrics['test_acc']:.4f}  lr {metrics['lr']:.4g}  "
        f"{metrics['images_per_s']:.0f} img/s  {metrics['epoch_time_s']:.1f}s"
    )


def append_metrics(run_dir: Path, metrics: dict[str, float]) -> None:
    """One JSON line per epoch in ``metrics.jsonl`` (what an interrupted run reads back)."""
    with (run_dir / METRICS_LOG).open("a") as handle:
        handle.write(json.dumps(metrics) + "\n")


def atomic_copy(source: Path, target: Path) -> None:
    """Copy next to the target, then rename: a kill mid-copy leaves the old file intact."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    partial.replace(target)


def save_best(checkpoint_file: Path, run_dir: Path) -> None:
    """The best validation epoch's checkpoint, as ``best/checkpoint.pt``."""
    atomic_copy(checkpoint_file, run_dir / BEST_DIR / CHECKPOINT_FILE)


def epochs_done(run_dir: Path) -> int:
    """The last epoch ``metrics.jsonl`` records (0 when there is none)."""
    metrics = run_dir / METRICS_LOG
    if not metrics.is_file():
        return 0
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    return int(json.loads(lines[-1])["epoch"]) if lines else 0
