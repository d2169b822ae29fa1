"""One training run as plain PyTorch: epochs, evaluation, checkpoints. No Ray, no MLflow.

What one epoch does with its batches is :mod:`bake_ray.core.epoch`; this module builds the run
(model, optimizer, schedule, loaders), resumes it, and loops over epochs.

The same :func:`fit` runs in a plain process, in a Ray Tune trial and in every Ray Train
worker; what differs is only the :class:`Reporter` it is handed (where metrics and
checkpoints go, and where a resumed run starts from) and whether ``torch.distributed`` is
initialised (then the model is wrapped in DDP, BAKE ensembles over the global batch, and
metrics are summed over workers).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from bake_ray.core import checkpoint as ckpt
from bake_ray.core.bake import build_loss
from bake_ray.core.config import Config, OptimConfig, to_dict
from bake_ray.core.data import build_splits
from bake_ray.core.epoch import (
    Context,
    DivergenceError,
    RunState,
    evaluate,
    train_one_epoch,
    unwrapped,
    uses_fp16,
)
from bake_ray.core.models import build_model, to_channels_last, wants_channels_last
from bake_ray.core.sampler import build_loaders
from bake_ray.core.weights import load_weights


def diverged_metrics(error: DivergenceError) -> dict[str, float]:
    """The last report of a diverged run: worthless accuracy, so a search learns to avoid it."""
    return {"epoch": float(error.epoch), "val_acc": 0.0, "best_val_acc": 0.0, "diverged": 1.0}


class Reporter(Protocol):
    """Where a run's per-epoch metrics and checkpoints go, and where a resume starts from.

    A reporter may also define ``progress(metrics)``: it is then called every
    ``runtime.log_every`` steps with the epoch's running train metrics and ``step``.
    """

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        """Called once per epoch on every worker; ``checkpoint_dir`` is set on rank 0 only."""

    def resume_from(self) -> Path | None:
        """A checkpoint file to continue from, or None to start fresh."""


# --------------------------------------------------------------------------- schedule


def lr_factor(step: int, steps_per_epoch: int, epochs: int, cfg: OptimConfig) -> float:
    """Multiplier of the base LR at an optimizer step: linear warm-up, then step/cosine.

    The warm-up rises linearly from ``warmup_start_factor`` (s) to 1. With s > 0 (pycls,
    the official ImageNet code, uses 0.1) the first step takes exactly s * lr; with s = 0
    the ramp is shifted by one step, so the first step takes 1/(warm-up steps) of lr
    rather than a wasted step at lr 0.
    """
    progress_epochs = step / steps_per_epoch
    if cfg.warmup_epochs and progress_epochs < cfg.warmup_epochs:
        start = cfg.warmup_start_factor
        ramp = (step + (start == 0.0)) / (cfg.warmup_epochs * steps_per_epoch)
        return start + (1.0 - start) * ramp
    if cfg.schedule == "step":
        passed = sum(progress_epochs >= m * epochs for m in cfg.milestones)
        return cfg.gamma**passed
    if cfg.schedule == "cosine":
        span = max(epochs - cfg.warmup_epochs, 1e-9)
        done = min((progress_epochs - cfg.warmup_epochs) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * done))
    return 1.0


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """Fused SGD with weight decay on weights only (not on BN parameters or biases), or on
    every parameter with ``optim.decay_all_params`` (what the official BAKE code does)."""
    decay = [p for p in model.parameters() if p.ndim > 1 or cfg.decay_all_params]
    no_decay = [p for p in model.parameters() if p.ndim <= 1 and not cfg.decay_all_params]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel per step, and it can skip a step on the device (see _masked_step)
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True
    )


# --------------------------------------------------------------------------- checkpoints


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
        "model": unwrapped(state.model).state_dict(),
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
    unwrapped(state.model).load_state_dict(saved["model"])
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


def setup_model(
    config: Config, ctx: Context, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    """The run's model on its device: built, local weights loaded, memory format chosen.

    Every worker loads ``model.weights`` itself (like ``data.data_dir``, the file must be
    readable on every node); rank 0 prints what was loaded.
    """
    m = config.model
    model = build_model(m.name, num_classes, in_channels, image_size, pretrained=m.pretrained)
    if m.weights:
        summary = load_weights(model, m.weights, m.name, num_classes)
        if ctx.rank == 0:
            print(summary, flush=True)
    model = model.to(ctx.device)
    if wants_channels_last(config.runtime.channels_last, model, ctx.device):
        to_channels_last(model)
    return model


def build_state(
    config: Config,
    ctx: Context,
    num_classes: int,
    in_channels: int,
    image_size: int,
    steps_per_epoch: int,
) -> RunState:
    """Model, optimizer, per-step LR schedule, scaler and loss for this config."""
    model = setup_model(config, ctx, num_classes, in_channels, image_size)
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
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=uses_fp16(ctx, config.runtime.amp))
    b = config.bake
    loss_fn = build_loss(
        config.method,
        b.temperature,
        b.omega,
        b.loss_weight,
        b.global_ensembling,
        b.label_smoothing,
        b.solver,
        b.tol,
        b.affinity_temperature,
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
        train = train_one_epoch(
            state,
            loaders.train,
            ctx,
            config.runtime.amp,
            max_steps_per_epoch,
            config.runtime.log_every,
            getattr(reporter, "progress", None),
        )
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
