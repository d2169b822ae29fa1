"""Checkpoints that survive a kill mid-save and never execute code when loaded.

A checkpoint is written to a temporary file in the same directory, flushed to disk and then
renamed over the final name, so a reader sees either the old file or the complete new one.
Loading always uses ``torch.load(weights_only=True)``: a hostile file can fail to load, but
it cannot run code. Resume walks epochs from newest to oldest and takes the first that loads.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"  # the epoch's metrics, beside its checkpoint
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")
_BLOCKED_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, or not a bake-ray checkpoint."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` such that a crash never leaves a partial file there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain data only); one-line error otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/hostile files
        raise CheckpointError(f"{path}: cannot load checkpoint: {load_error_reason(exc)}") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"{path}: not a bake-ray checkpoint (no model/epoch entries)")
    return state


def load_error_reason(exc: Exception) -> str:
    """Why a load failed, in one short line. For a file that is not plain data, name the
    blocked global instead of torch's advice to retry with ``weights_only=False``."""
    text = " ".join(str(exc).split())
    blocked = _BLOCKED_GLOBAL.search(text)
    if blocked:
        return f"refused: it holds code, not plain data (global {blocked.group(1)})"
    return text[:200]


def epoch_dir(root: str | Path, epoch: int) -> Path:
    """Where the checkpoint after ``epoch`` completed epochs lives in a local run."""
    return Path(root) / f"epoch_{epoch:04d}"


def _epoch_dirs_newest_first(root: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _EPOCH_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_good(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that loads, skipping corrupt ones; None if none.

    ``root`` may be a run directory (its ``checkpoints/`` is searched), a checkpoints
    directory with ``epoch_NNNN`` folders, or a single checkpoint folder or file.
    """
    root = Path(root)
    if root.is_file() or (root / CHECKPOINT_FILE).is_file():
        single = root if root.is_file() else root / CHECKPOINT_FILE
        try:
            load(single)
        except CheckpointError:
            return None
        return single
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        return None
    for candidate in _epoch_dirs_newest_first(root):
        try:
            load(candidate)
        except CheckpointError:
            continue
        return candidate / CHECKPOINT_FILE
    return None


def prune(root: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest epoch folders (the best model lives elsewhere)."""
    for old in _epoch_dirs_newest_first(Path(root))[keep:]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from, in types ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every RNG back where :func:`rng_state` found it, for an exact resume."""
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
