"""A resumed run is the uninterrupted run: proven on every path a user can take.

Each test trains the same config twice: once straight through, once interrupted after some
epoch and resumed. The final weights must be bit-identical (``torch.equal``): on CPU every
path is deterministic, augmentation included, so any difference is a resume bug.

Equal weights alone cannot tell a resume from a silent restart: retraining from scratch with
the same seed reproduces them too. So every test also checks that the resumed run *continued*:
the history in its final checkpoint starts with the interrupted run's epochs as they were
measured then (their wall-clock timings cannot be reproduced by a rerun), and the resumed
process trained only the epochs after the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reliability_helpers import (
    cli_session,
    kill_session,
    trial_dirs,
    trial_statuses,
    wait_for,
    write_space,
)

from bake_ray import checkpoint as ckpt
from bake_ray import config as cfg
from bake_ray.engine import Context, fit

#: Small, quick, and with augmentation on (digits: a random one-pixel shift), so the RNG
#: state matters; the step schedule makes the LR depend on the epoch too.
SMALL = {
    "epochs": 4,
    "data": {"dataset": "digits", "train_subset": 384, "batch_size": 32, "same_class": 1},
    "optim": {"schedule": "step", "milestones": [0.5, 0.75]},
}


def _overrides(values: dict, prefix: str = "") -> list[str]:
    """``--set`` strings for a nested dict of config values."""
    flat = cfg.flatten(values)
    return [f"{prefix}{key}={json.dumps(value)}" for key, value in flat.items()]


def _assert_same_weights(a: dict, b: dict) -> None:
    """Model and optimizer state bit-identical (momentum buffers included)."""
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"model.{name} differs"
    for key, buffers in a["optimizer"]["state"].items():
        for name, value in buffers.items():
            other = b["optimizer"]["state"][key][name]
            assert torch.equal(value, other), f"optimizer state {key}.{name} differs"


def _assert_continued(final: dict, interrupted_history: list[dict]) -> None:
    """The resumed run kept the interrupted run's epochs (timings and all), not new ones."""
    k = len(interrupted_history)
    assert 0 < k < len(final["history"]), "the run was not interrupted before its end"
    assert final["history"][:k] == interrupted_history, "resumed run retrained from scratch"
    assert [int(h["epoch"]) for h in final["history"]] == list(range(1, final["epoch"] + 1))


# --------------------------------------------------------------------------- 2 gloo workers


class _Stop(Exception):
    """Raised by the reporter to end a worker after a given epoch, like a crash would."""


class _DirReporter:
    """Rank 0 keeps every epoch's checkpoint as ``epoch_N.pt``; all ranks stop after
    ``stop_after`` epochs; all ranks resume from ``resume`` if given."""

    def __init__(self, out: Path, resume: Path | None, stop_after: int | None) -> None:
        self.out, self.resume, self.stop_after = out, resume, stop_after

    def resume_from(self) -> Path | None:
        return self.resume

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            source = checkpoint_dir / ckpt.CHECKPOINT_FILE
            (self.out / f"epoch_{int(metrics['epoch'])}.pt").write_bytes(source.read_bytes())
        if self.stop_after is not None and int(metrics["epoch"]) == self.stop_after:
            raise _Stop


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_fit(rank: int, world: int, port: int, config: dict, out: str, resume, stop) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        reporter = _DirReporter(Path(out), Path(resume) if resume else None, stop)
        fit(cfg.from_dict(config), reporter, Context(torch.device("cpu"), rank, world))
    except _Stop:
        pass
    finally:
        dist.destroy_process_group()


def _spawn_fit(config: dict, out: Path, resume: Path | None = None, stop: int | None = None):
    out.mkdir(exist_ok=True)
    args = (2, _free_port(), config, str(out), str(resume) if resume else None, stop)
    mp.spawn(_gloo_fit, args=args, nprocs=2)


def test_two_gloo_workers_resume_bit_exact_with_augmentation(tmp_path: Path) -> None:
    """``fit`` in 2 gloo processes: 4 epochs straight == crash after epoch 2, then resume.

    Every rank draws its own augmentation, so this holds only if each rank gets its own RNG
    state back (restoring rank 0's everywhere was off by up to 0.024 in the weights).
    """
    config = cfg.to_dict(cfg.from_dict(SMALL))
    _spawn_fit(config, tmp_path / "straight")
    _spawn_fit(config, tmp_path / "crashed", stop=2)
    at_crash = ckpt.load(tmp_path / "crashed" / "epoch_2.pt")
    assert len(at_crash["rng_by_rank"]) == 2
    assert not torch.equal(at_crash["rng_by_rank"][0]["torch"], at_crash["rng_by_rank"][1]["torch"])
    assert not (tmp_path / "crashed" / "epoch_3.pt").exists()
    _spawn_fit(config, tmp_path / "crashed", resume=tmp_path / "crashed" / "epoch_2.pt")

    straight = ckpt.load(tmp_path / "straight" / "epoch_4.pt")
    resumed = ckpt.load(tmp_path / "crashed" / "epoch_4.pt")
    _assert_same_weights(straight, resumed)
    _assert_continued(resumed, at_crash["history"])
    for a, b in zip(straight["rng_by_rank"], resumed["rng_by_rank"], strict=True):
        assert torch.equal(a["torch"], b["torch"])  # every rank's RNG ends where it would have
