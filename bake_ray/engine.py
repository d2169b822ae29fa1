"""One training run as plain PyTorch: epochs, evaluation, checkpoints. No Ray, no MLflow.

The same :func:`fit` runs in a plain process, in a Ray Tune trial and in every Ray Train
worker; what differs is only the :class:`Reporter` it is handed (where metrics and
checkpoints go, and where a resumed run starts from) and whether ``torch.distributed`` is
initialised (then the model is wrapped in DDP, BAKE ensembles over the global batch, and
metrics are summed over workers).
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from bake_ray import checkpoint as ckpt
from bake_ray.bake import build_loss
from bake_ray.config import Config, OptimConfig, to_dict
from bake_ray.data import build_loaders, build_splits
from bake_ray.models import build_model


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite: the run cannot recover, stop it cleanly."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch


def diverged_metrics(error: DivergenceError) -> dict[str, float]:
    """The last report of a diverged run: worthless accuracy, so a search learns to avoid it."""
    return {"epoch": float(error.epoch), "val_acc": 0.0, "best_val_acc": 0.0, "diverged": 1.0}


class Reporter(Protocol):
    """Where a run's per-epoch metrics and checkpoints go, and where a resume starts from."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        """Called once per epoch on every worker; ``checkpoint_dir`` is set on rank 0 only."""

    def resume_from(self) -> Path | None:
        """A checkpoint file to continue from, or None to start fresh."""


@dataclass
class Context:
    """Where this process sits in a data-parallel run."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class RunState:
    """Everything a training epoch mutates, so checkpoints capture the whole run."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    epoch: int = 0
    best_val_acc: float = -1.0
    best_epoch: int = 0
    test_acc_at_best: float = 0.0
    train_time_s: float = 0.0


# --------------------------------------------------------------------------- schedule


def lr_factor(step: int, steps_per_epoch: int, epochs: int, cfg: OptimConfig) -> float:
    """Multiplier of the base LR at an optimizer step: linear warm-up, then step/cosine."""
    progress_epochs = step / steps_per_epoch
    if cfg.warmup_epochs and progress_epochs < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "step":
        passed = sum(progress_epochs >= m * epochs for m in cfg.milestones)
        return cfg.gamma**passed
    if cfg.schedule == "cosine":
        span = max(epochs - cfg.warmup_epochs, 1e-9)
        done = min((progress_epochs - cfg.warmup_epochs) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * done))
    return 1.0


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """SGD with weight decay on weights only (not on BN parameters or biases)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


# --------------------------------------------------------------------------- distributed helpers


def _all_sum(values: list[float], ctx: Context) -> list[float]:
    """Sum a few scalars over workers (identity in a single process)."""
    if not ctx.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _finite_everywhere(loss: torch.Tensor, ctx: Context) -> bool:
    """Whether the loss is finite on every worker, so all workers stop at the same step."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if ctx.distributed:
        dist.all_reduce(bad)
    return bad.item() == 0


def _autocast(ctx: Context, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 (or fp16) autocast on GPU; a no-op on CPU where it would only slow things down."""
    if not enabled or ctx.device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _uses_fp16(ctx: Context, amp: bool) -> bool:
    return amp and ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported()


# --------------------------------------------------------------------------- epochs


def train_one_epoch(
    state: RunState, loader: DataLoader, ctx: Context, amp: bool, max_steps: int | None = None
) -> dict[str, float]:
    """One pass over the class-aware batches; returns loss parts, accuracy and throughput."""
    state.model.train()
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, ce, kd, correct, images
    start = time.perf_counter()
    for step, (images, labels) in enumerate(_take(loader, max_steps)):
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        with _autocast(ctx, amp):
            features, logits = state.model(images)
        parts = state.loss_fn(features, logits, labels)
        if not _finite_everywhere(parts.total, ctx):
            raise DivergenceError(
                f"train loss became {parts.total.item()} at epoch {state.epoch + 1} step {step}",
                state.epoch + 1,
            )
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(parts.total).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        n = labels.shape[0]
        sums[0] += parts.total.item() * n
        sums[1] += parts.ce.item() * n
        sums[2] += parts.kd.item() * n
        sums[3] += (logits.argmax(dim=1) == labels).sum().item()
        sums[4] += n
    elapsed = time.perf_counter() - start
    loss, ce, kd, correct, images = _all_sum(sums, ctx)
    images = max(images, 1.0)
    return {
        "train_loss": loss / images,
        "train_ce": ce / images,
        "train_kd": kd / images,
        "train_acc": correct / images,
        "images_per_s": images / max(elapsed, 1e-9),
        "epoch_time_s": elapsed,
        "lr": state.optimizer.param_groups[0]["lr"],
    }


def _take(loader: DataLoader, max_steps: int | None) -> Iterator[Any]:
    for step, batch in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            return
        yield batch


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, ctx: Context) -> tuple[float, float, float]:
    """(accuracy, mean cross-entropy, number of images); with several workers each holds a
    shard, summed here. The count is exact so a search can put an interval on accuracy."""
    model.eval()
    correct, loss_sum, count = 0.0, 0.0, 0.0
    for images, labels in loader:
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        _, logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        count += labels.shape[0]
    correct, loss_sum, count = _all_sum([correct, loss_sum, count], ctx)
    return correct / max(count, 1.0), loss_sum / max(count, 1.0), count


# --------------------------------------------------------------------------- checkpoints


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def rng_states_of_all_ranks(ctx: Context) -> list[dict[str, Any]]:
    """Every worker's RNG state, in rank order (a collective: call it on every rank).

    Each worker draws its own augmentation from its own RNG, so an exact resume needs each
    rank's state back on that rank, not rank 0's everywhere.
    """
    mine = ckpt.rng_state()
    if not ctx.distributed:
        return [mine]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, mine)
    return states


def checkpoint_state(
    state: RunState,
    config: Config,
    history: list[dict[str, float]],
    rng_by_rank: list[dict[str, Any]] | None = None,
) -> dict:
    """All that an exact resume needs, in plain types that ``weights_only`` loading accepts.

    ``rng_by_rank`` holds every worker's RNG state (from :func:`rng_states_of_all_ranks`);
    without it, this process's state stands for a one-worker run. ``rng`` keeps rank 0's
    state for checkpoints read by older code.
    """
    rng_by_rank = rng_by_rank or [ckpt.rng_state()]
    return {
        "model": _unwrapped(state.model).state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "epoch": state.epoch,
        "best_val_acc": state.best_val_acc,
        "best_epoch": state.best_epoch,
        "test_acc_at_best": state.test_acc_at_best,
        "train_time_s": state.train_time_s,
        "rng": rng_by_rank[0],
        "rng_by_rank": rng_by_rank,
        "history": history,
        "config": to_dict(config),
    }


def restore(state: RunState, saved: dict[str, Any], rank: int = 0) -> list[dict[str, float]]:
    """Load a checkpoint into the run on worker ``rank``; returns the metric history so far.

    Each rank gets its own saved RNG state back. A rank the checkpoint has no state for (the
    run was saved with fewer workers) keeps its fresh seed: it cannot continue exactly, and
    copying another rank's state would make two workers draw identical augmentations.
    """
    _unwrapped(state.model).load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    state.epoch = int(saved["epoch"])
    state.best_val_acc = float(saved["best_val_acc"])
    state.best_epoch = int(saved["best_epoch"])
    state.test_acc_at_best = float(saved["test_acc_at_best"])
    state.train_time_s = float(saved.get("train_time_s", 0.0))
    by_rank = saved.get("rng_by_rank") or [saved["rng"]]  # older checkpoints: rank 0 only
    if rank < len(by_rank):
        ckpt.restore_rng_state(by_rank[rank])
    return list(saved.get("history", []))


# --------------------------------------------------------------------------- the run


def build_state(
    config: Config,
    ctx: Context,
    num_classes: int,
    in_channels: int,
    image_size: int,
    steps_per_epoch: int,
) -> RunState:
    """Model, optimizer, per-step LR schedule, scaler and loss for this config."""
    model = build_model(config.model.name, num_classes, in_channels, image_size).to(ctx.device)
    if ctx.distributed:
        if config.runtime.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    optimizer = build_optimizer(model, config.optim)
    schedule_epochs = config.optim.schedule_epochs or config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, schedule_epochs, config.optim)
    )
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=_uses_fp16(ctx, config.runtime.amp))
    b = config.bake
    loss_fn = build_loss(
        config.method,
        b.temperature,
        b.omega,
        b.loss_weight,
        b.global_ensembling,
        b.label_smoothing,
    )
    return RunState(model, optimizer, scheduler, scaler, loss_fn)


def _record_best(state: RunState, val_acc: float, test_acc: float) -> None:
    """Model selection on validation: remember the test accuracy of the best-val epoch.

    Ties go to the later epoch: small validation sets tie often, and a later epoch has seen
    more of the schedule. The rule never looks at test accuracy.
    """
    if val_acc >= state.best_val_acc:
        state.best_val_acc, state.best_epoch, state.test_acc_at_best = (
            val_acc,
            state.epoch,
            test_acc,
        )


def _epoch_metrics(
    state: RunState,
    train: dict[str, float],
    val: tuple[float, float, float],
    test: tuple[float, float, float],
    history: list[dict[str, float]],
) -> dict[str, float]:
    """One epoch's report. ``val_n`` (validation images) and the validation loss at the
    selected epoch let a search put intervals on accuracy and break accuracy ties."""
    return {
        "epoch": float(state.epoch),
        **train,
        "val_acc": val[0],
        "val_loss": val[1],
        "val_n": val[2],
        "val_loss_at_best_val": _val_loss_at_best(state, val[1], history),
        "test_acc": test[0],
        "test_loss": test[1],
        "best_val_acc": state.best_val_acc,
        "best_epoch": float(state.best_epoch),
        "test_acc_at_best_val": state.test_acc_at_best,
        "train_time_s": state.train_time_s,
    }


def _val_loss_at_best(state: RunState, val_loss: float, history: list[dict[str, float]]) -> float:
    """Validation loss of the selected (best-val) epoch: this one, or an earlier report's."""
    if state.best_epoch == state.epoch:
        return val_loss
    for past in reversed(history):
        if int(past.get("epoch", -1)) == state.best_epoch:
            return float(past.get("val_loss", math.inf))
    return math.inf


def fit(
    config: Config, reporter: Reporter, ctx: Context, max_steps_per_epoch: int | None = None
) -> list[dict[str, float]]:
    """Train ``config`` to its last epoch, reporting and checkpointing after each one.

    Resumes from ``reporter.resume_from()`` when it names a checkpoint. Returns the metric
    history of all epochs, those before a resume included.
    """
    torch.manual_seed(config.seed + ctx.rank)
    splits = build_splits(config.data, config.seed)
    loaders = build_loaders(
        splits, config.data, config.seed, ctx.rank, ctx.world_size, eval_shard=ctx.distributed
    )
    steps = (
        len(loaders.train)
        if max_steps_per_epoch is None
        else min(len(loaders.train), max_steps_per_epoch)
    )
    state = build_state(
        config, ctx, splits.num_classes, splits.in_channels, splits.image_size, max(steps, 1)
    )
    history: list[dict[str, float]] = []
    resume = reporter.resume_from()
    if resume is not None:
        history = restore(state, ckpt.load(resume), ctx.rank)
    while state.epoch < config.epochs:
        loaders.set_epoch(state.epoch)
        train = train_one_epoch(state, loaders.train, ctx, config.runtime.amp, max_steps_per_epoch)
        state.epoch += 1
        state.train_time_s += train["epoch_time_s"]
        val = evaluate(state.model, loaders.val, ctx)
        test = evaluate(state.model, loaders.test, ctx)
        _record_best(state, val[0], test[0])
        metrics = _epoch_metrics(state, train, val, test, history)
        history.append(metrics)
        _report_with_checkpoint(reporter, state, config, history, ctx)
    return history


def _report_with_checkpoint(
    reporter: Reporter,
    state: RunState,
    config: Config,
    history: list[dict[str, float]],
    ctx: Context,
) -> None:
    """Rank 0 writes the checkpoint into a temporary folder that the reporter persists."""
    rng_by_rank = rng_states_of_all_ranks(ctx)
    with tempfile.TemporaryDirectory(prefix="bake_ray_ckpt_") as tmp:
        checkpoint_dir = None
        if ctx.rank == 0:
            checkpoint_dir = Path(tmp)
            ckpt.atomic_save(
                checkpoint_state(state, config, history, rng_by_rank),
                checkpoint_dir / ckpt.CHECKPOINT_FILE,
            )
            (checkpoint_dir / ckpt.METRICS_FILE).write_text(json.dumps(history[-1]))
        reporter.report(history[-1], checkpoint_dir)
