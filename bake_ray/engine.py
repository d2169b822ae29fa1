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
from collections.abc import Callable, Iterable, Iterator
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
from bake_ray.data import build_splits
from bake_ray.models import build_model, to_channels_last, wants_channels_last
from bake_ray.sampler import build_loaders
from bake_ray.weights import load_weights


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite: the run cannot recover, stop it cleanly."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch


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
    """Fused SGD with weight decay on weights only (not on BN parameters or biases)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel per step, and it can skip a step on the device (see _masked_step)
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True
    )


# --------------------------------------------------------------------------- device-side steps


def _read_sums(sums: torch.Tensor, ctx: Context) -> list[float]:
    """Sum a vector over workers (when distributed) and copy it to the host.

    The one place where a loop waits for the device: once per epoch (and every
    ``runtime.log_every`` steps when asked). Every worker calls it at the same step.
    """
    if ctx.distributed:
        dist.all_reduce(sums)
    return sums.tolist()


def _autocast(ctx: Context, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 (or fp16) autocast on GPU; a no-op on CPU where it would only slow things down."""
    if not enabled or ctx.device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _uses_fp16(ctx: Context, amp: bool) -> bool:
    return amp and ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported()


class _DivergenceGuard:
    """Device-side record of the first non-finite step of an epoch; read only at a sync point.

    ``stopped`` is sticky: from the first bad step on, every optimizer update is masked.
    """

    def __init__(self, device: torch.device) -> None:
        self.stopped = torch.zeros((), dtype=torch.bool, device=device)
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.finite_loss = torch.ones((), dtype=torch.bool, device=device)

    def record(self, step: int, bad: torch.Tensor, loss: torch.Tensor) -> None:
        first = bad & ~self.stopped
        self.first_step = torch.where(first, step, self.first_step)
        self.first_loss = torch.where(first, loss.detach().double(), self.first_loss)
        self.finite_loss = torch.where(first, torch.isfinite(loss.detach()), self.finite_loss)
        self.stopped = self.stopped | bad

    def error(self, epoch: int) -> DivergenceError:
        """The exception to raise once a read showed a bad step (on any worker)."""
        step, loss = int(self.first_step.item()), float(self.first_loss.item())
        if step < 0:  # only with fp16 loss scaling, where the flag is per worker
            message = f"train loss became non-finite on another worker in epoch {epoch}"
        elif bool(self.finite_loss.item()):
            message = (
                f"train loss became non-finite in its gradients (loss {loss:.6g}) "
                f"at epoch {epoch} step {step}"
            )
        else:
            message = f"train loss became {loss} at epoch {epoch} step {step}"
        return DivergenceError(message, epoch)


def _poisoned(loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, loss is finite): a non-finite loss makes every gradient NaN.

    Multiplying by 1 changes nothing when the loss is finite; otherwise the factor is NaN, so
    the gradients of this worker are NaN, and after DDP's all-reduce so are every worker's.
    That carries one worker's bad loss to all of them without an extra collective.
    """
    finite = torch.isfinite(loss.detach())
    factor = torch.where(finite, 1.0, math.nan).to(loss.dtype)
    return loss * factor, finite


def _nonfinite_gradients(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Device flag: some gradient entry is inf or NaN (the max-abs norm is not finite).

    Under DDP every worker holds the same all-reduced gradients, so every worker computes
    the same flag: no collective is needed to agree on it.
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
    grads = [g for g in grads if g is not None]
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    return ~torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf))


def _masked_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()``, skipped on the device when ``skip`` is true (no host read).

    Fused optimizers (``build_optimizer`` makes one) honour a ``found_inf`` tensor, the
    mechanism ``torch.amp.GradScaler`` uses: the kernel leaves parameters and momentum
    untouched when it is non-zero. Any other optimizer steps unmasked; divergence is then
    still detected at the next read, its weights just turn non-finite first.
    """
    if not all(group.get("fused") for group in optimizer.param_groups):
        optimizer.step()
        return
    optimizer.found_inf = skip.to(torch.float32).reshape(1)  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]


def _train_step(
    state: RunState, loss: torch.Tensor, guard: _DivergenceGuard, step: int
) -> torch.Tensor:
    """Backward and update without waiting on the host; returns the step's bad flag.

    A step is bad when its gradients are not finite (which a non-finite loss on any worker
    forces, see :func:`_poisoned`); it and every later step of the run are not applied.
    With fp16 loss scaling GradScaler owns skipping (an overflow is not a divergence), and
    a step is bad when this worker's loss is not finite.
    """
    backward_loss, finite_loss = _poisoned(loss)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(backward_loss).backward()
    if state.scaler.is_enabled():
        bad = ~finite_loss
        guard.record(step, bad, loss)
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        bad = _nonfinite_gradients(state.optimizer).to(loss.device)
        guard.record(step, bad, loss)
        _masked_step(state.optimizer, guard.stopped)
    state.scheduler.step()
    return bad


# --------------------------------------------------------------------------- epochs

#: Device-side running sums of an epoch, in this order; images are counted on the host.
TRAIN_SUMS = ("loss", "ce", "kd", "correct", "bad_steps")

ProgressFn = Callable[[dict[str, float]], None]


def train_one_epoch(
    state: RunState,
    loader: Iterable[Any],
    ctx: Context,
    amp: bool,
    max_steps: int | None = None,
    log_every: int = 0,
    progress: ProgressFn | None = None,
) -> dict[str, float]:
    """One pass over the class-aware batches; returns loss parts, accuracy and throughput.

    No step waits on the host: loss parts, correct counts and the divergence flag stay on
    the device and are read once, at the end of the epoch (and every ``log_every`` steps
    when > 0, then also passed to ``progress``).

    Divergence: the first step whose loss (on any worker) or gradients are not finite is
    not applied, nor is any later step of the epoch, so parameters and optimizer state stay
    those of the last finite step (batch-norm running statistics are updated in the forward
    pass and may not). Every worker decides from the same all-reduced gradients, and every
    read sums the flag over workers, so all workers raise :class:`DivergenceError` at the
    same read, naming the first bad step. The run is never checkpointed after it.
    """
    state.model.train()
    sums = torch.zeros(len(TRAIN_SUMS), dtype=torch.float64, device=ctx.device)
    guard = _DivergenceGuard(ctx.device)
    images, start = 0, time.perf_counter()
    for step, (inputs, labels) in enumerate(_take(loader, max_steps)):
        inputs = inputs.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        with _autocast(ctx, amp):
            features, logits = state.model(inputs)
        parts = state.loss_fn(features, logits, labels)
        bad = _train_step(state, parts.total, guard, step)
        sums += _step_sums(parts, logits, labels, bad)
        images += labels.shape[0]
        if log_every > 0 and (step + 1) % log_every == 0:
            partial = _train_metrics(state, sums, images, start, ctx, guard)
            if progress is not None:
                progress({**partial, "step": float(step + 1)})
    return _train_metrics(state, sums, images, start, ctx, guard)


def _step_sums(
    parts: Any, logits: torch.Tensor, labels: torch.Tensor, bad: torch.Tensor
) -> torch.Tensor:
    """This step's contribution to :data:`TRAIN_SUMS`, as one device vector."""
    n = labels.shape[0]
    losses = torch.stack([parts.total.detach(), parts.ce.detach(), parts.kd.detach()])
    correct = (logits.detach().argmax(dim=1) == labels).sum()
    return torch.cat([losses.double() * n, torch.stack([correct.double(), bad.double()])])


def _train_metrics(
    state: RunState,
    sums: torch.Tensor,
    images: int,
    start: float,
    ctx: Context,
    guard: _DivergenceGuard,
) -> dict[str, float]:
    """Read the sums (the sync point), raise on divergence, turn sums into means."""
    values = _read_sums(torch.cat([sums, sums.new_full((1,), images)]), ctx)
    totals = dict(zip((*TRAIN_SUMS, "images"), values, strict=True))
    if totals["bad_steps"] > 0:
        raise guard.error(state.epoch + 1)
    elapsed = time.perf_counter() - start
    count = max(totals["images"], 1.0)
    return {
        "train_loss": totals["loss"] / count,
        "train_ce": totals["ce"] / count,
        "train_kd": totals["kd"] / count,
        "train_acc": totals["correct"] / count,
        "images_per_s": count / max(elapsed, 1e-9),
        "epoch_time_s": elapsed,
        "lr": state.optimizer.param_groups[0]["lr"],
    }


def _take(loader: Iterable[Any], max_steps: int | None) -> Iterator[Any]:
    for step, batch in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            return
        yield batch


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, ctx: Context) -> tuple[float, float, float]:
    """(accuracy, mean cross-entropy, number of images); with several workers each holds a
    shard, summed here. The count is exact so a search can put an interval on accuracy.

    Sums stay on the device and are read once at the end, like training's.
    """
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # correct, loss, count
    for images, labels in loader:
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        _, logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        correct = (logits.argmax(dim=1) == labels).sum()
        sums[:2] += torch.stack([correct.double(), loss.double()])
        sums[2] += labels.shape[0]
    correct, loss_sum, count = _read_sums(sums, ctx)
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
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=_uses_fp16(ctx, config.runtime.amp))
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
