"""A training step never waits on the host, and divergence still stops every worker together.

Host reads are counted on CPU with a ``TorchDispatchMode`` over pre-loaded batches: every
``.item()``/``bool()``/``float()`` of a tensor dispatches ``aten._local_scalar_dense``, and
``torch.linalg.solve`` dispatches ``aten._linalg_check_errors`` (its error code is copied to
the host on a GPU). On a GPU each of those would stall the queue once per step.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from bake_ray.core.bake import build_loss
from bake_ray.core.config import OptimConfig
from bake_ray.core.engine import (
    Context,
    DivergenceError,
    RunState,
    build_optimizer,
    train_one_epoch,
)

HOST_READS = ("aten._local_scalar_dense.default", "aten._linalg_check_errors.default")
CPU = Context(torch.device("cpu"))


class HostReads(TorchDispatchMode):
    """Counts the ops that read a device value back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_READS:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def make_state(method: str, solver: str = "auto", seed: int = 0) -> RunState:
    from bake_ray.core.models import build_model

    torch.manual_seed(seed)
    model = build_model("small_cnn", 10, 1, 8)
    optimizer = build_optimizer(model, OptimConfig(lr=0.05, weight_decay=5e-4))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return RunState(model, optimizer, scheduler, scaler, build_loss(method, solver=solver))


def make_batches(steps: int, seed: int = 1, nan_at: int | None = None) -> list:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(steps):
        images = torch.randn(16, 1, 8, 8, generator=generator)
        if step == nan_at:
            images[3, 0, 0, 0] = float("nan")
        batches.append((images, torch.randint(10, (16,), generator=generator)))
    return batches


def host_reads(method: str, steps: int, solver: str = "auto") -> Counter[str]:
    state, batches = make_state(method, solver), make_batches(steps)
    with HostReads() as counter:
        train_one_epoch(state, batches, CPU, amp=False)
    return counter.counts


def test_the_counter_sees_host_reads():
    """The instrument works: the reads the old step made are counted."""
    with HostReads() as counter:
        torch.ones(()).item()
        bool(torch.isfinite(torch.ones(())))
        torch.linalg.solve(torch.eye(3), torch.ones(3, 2))
    assert counter.total == 3, counter.counts


@pytest.mark.parametrize(
    ("method", "solver"), [("bake", "auto"), ("bake", "solve"), ("bake", "neumann"), ("ce", "auto")]
)
def test_a_training_step_makes_no_host_read(method, solver):
    """Two epochs of 2 and 5 steps: the 3 extra steps add no read (a per-step count of 0)."""
    short, long = host_reads(method, 2, solver), host_reads(method, 5, solver)
    per_step = {op: (long[op] - short[op]) / 3 for op in HOST_READS}
    assert per_step == {op: 0 for op in HOST_READS}, (short, long)
    assert long.total() == 0  # and nothing else reads per epoch on one CPU worker (tolist)


@pytest.mark.parametrize("method", ["bake", "ce"])
def test_divergence_names_the_first_bad_step_and_keeps_the_last_finite_weights(method):
    """A NaN input at step 2: the epoch raises naming step 2; steps 2.. are not applied."""
    diverged = make_state(method)
    with pytest.raises(DivergenceError, match=r"^train loss became nan at epoch 1 step 2$"):
        train_one_epoch(diverged, make_batches(5, nan_at=2), CPU, amp=False)

    reference = make_state(method)
    train_one_epoch(reference, make_batches(5)[:2], CPU, amp=False)
    pairs = list(zip(diverged.model.parameters(), reference.model.parameters(), strict=True))
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in pairs:
        buf_a = diverged.optimizer.state[a]["momentum_buffer"]
        buf_b = reference.optimizer.state[b]["momentum_buffer"]
        torch.testing.assert_close(buf_a, buf_b, rtol=0, atol=0)


class CountingLoader:
    """Pre-loaded batches that count how many were taken."""

    def __init__(self, batches: list) -> None:
        self.batches, self.taken = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.taken += 1
            yield batch


def test_log_every_reads_progress_and_stops_a_diverged_epoch_early():
    state, seen = make_state("bake"), []
    train_one_epoch(state, make_batches(4), CPU, False, log_every=2, progress=seen.append)
    assert [m["step"] for m in seen] == [2.0, 4.0]
    assert all(0.0 < m["train_loss"] < 10.0 for m in seen)

    loader = CountingLoader(make_batches(8, nan_at=2))
    with pytest.raises(DivergenceError, match="step 2"):
        train_one_epoch(make_state("bake"), loader, CPU, False, log_every=2)
    assert loader.taken == 4  # stopped at the read after step index 3, not at the epoch's end


# --------------------------------------------------------------------------- two workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        state = make_state("ce")  # bake would see the NaN in its gathered features anyway
        state.model = torch.nn.parallel.DistributedDataParallel(state.model)
        batches = make_batches(5, seed=10 + rank, nan_at=2 if rank == 1 else None)
        try:
            train_one_epoch(state, batches, Context(torch.device("cpu"), rank, world), False)
            message = "no error"
        except DivergenceError as err:
            message = str(err)
        weights = {k: v.clone() for k, v in state.model.module.state_dict().items()}
        torch.save({"message": message, "weights": weights}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_nan_on_one_worker_stops_both_at_the_same_step_with_equal_weights(tmp_path):
    """Only worker 1 sees a NaN (step 2): both raise naming step 2, and their weights agree.

    Worker 0's own loss stays finite; it learns of the NaN only through the all-reduced
    gradients, the one collective a DDP step already makes.
    """
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert results[1]["message"] == "train loss became nan at epoch 1 step 2"
    assert results[0]["message"].startswith("train loss became non-finite in its gradients")
    assert results[0]["message"].endswith("at epoch 1 step 2")
    for name, value in results[0]["weights"].items():
        if value.is_floating_point() and "running" not in name:  # BN stats are per worker
            torch.testing.assert_close(value, results[1]["weights"][name], rtol=0, atol=0)


class RecordingReporter:
    """A Reporter that keeps what it is given, progress lines included."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.steps: list[dict[str, float]] = []

    def resume_from(self):
        return None

    def report(self, metrics, checkpoint_dir) -> None:
        self.epochs.append(metrics)

    def progress(self, metrics) -> None:
        self.steps.append(metrics)


def test_fit_passes_intra_epoch_progress_to_the_reporter_when_asked():
    from bake_ray.core import config as cfg
    from bake_ray.core.engine import fit

    overrides = ["epochs=1", "data.train_subset=128", "data.batch_size=16"]
    quiet, chatty = RecordingReporter(), RecordingReporter()
    fit(cfg.load(overrides=overrides), quiet, CPU)
    fit(cfg.load(overrides=[*overrides, "runtime.log_every=3"]), chatty, CPU)
    assert quiet.steps == [] and len(quiet.epochs) == 1
    steps = [int(m["step"]) for m in chatty.steps]
    assert len(steps) >= 2 and steps == [3 * (i + 1) for i in range(len(steps))]
    # reading the sums early changes nothing in the training itself
    assert chatty.epochs[0]["train_loss"] == quiet.epochs[0]["train_loss"]
