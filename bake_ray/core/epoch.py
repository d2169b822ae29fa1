"""One training epoch and one evaluation pass, as plain PyTorch. No Ray, no MLflow.

:func:`bake_ray.core.engine.fit` runs the epochs (schedule, checkpoints, reports); this module is
what one epoch does with a batch: the BAKE loss step under autocast, the divergence guard
that skips a non-finite step on every worker alike, and the sums that are reduced over
workers once per epoch (not per step: no host sync in the loop).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite: the run cannot recover, stop it cleanly."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch


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


def uses_fp16(ctx: Context, amp: bool) -> bool:
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


# --------------------------------------------------------------------------- DDP


def unwrapped(model: nn.Module) -> nn.Module:
    """The model itself, whether or not DDP wraps it (state dicts, BatchNorm checks)."""
    return model.module if hasattr(model, "module") else model
