"""BAKE: Batch Knowledge Ensembling (Ge et al. 2021, arXiv 2104.13298), in plain PyTorch.

For a mini-batch of B images with pooled features f_i and logits z_i::

    A_ij = softmax_{j != i}( cos(f_i, f_j) )            affinity, self excluded (A_ii = 0)
    P    = softmax(z / T)                                tempered class probabilities
    Q    = (1 - omega) (I - omega A)^-1 P                propagated soft targets
    KD   = T^2 * (1/B) sum_i KL(Q_i || softmax(z_i / T))
    loss = CE(z, y) + lambda * KD

Q is the fixed point of ``Q <- omega A Q + (1 - omega) P``; it is computed without gradient
from detached tensors, in float32 (or float64 if given), so gradients reach the network only
through ``softmax(z / T)`` inside KD and through CE. With several data-parallel workers the
features and P of the whole global batch are gathered first ("global knowledge
ensembling") and each worker keeps its own rows of Q.

No Ray here: distribution goes through ``torch.distributed`` when it is initialised.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _ensemble_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) is ensembled in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def affinity(features: Tensor) -> Tensor:
    """Row-stochastic affinity A: softmax over j != i of the cosine similarity (no temperature)."""
    normed = F.normalize(features, dim=1)
    cosine = normed @ normed.t()
    self_mask = torch.eye(cosine.shape[0], dtype=torch.bool, device=cosine.device)
    return torch.softmax(cosine.masked_fill(self_mask, float("-inf")), dim=1)


def propagate(affinity_matrix: Tensor, probs: Tensor, omega: float) -> Tensor:
    """Q = (1 - omega) (I - omega A)^-1 P, by a linear solve (never an explicit inverse)."""
    identity = torch.eye(affinity_matrix.shape[0], dtype=probs.dtype, device=probs.device)
    return (1.0 - omega) * torch.linalg.solve(identity - omega * affinity_matrix, probs)


def _check_hyperparameters(omega: float, temperature: float) -> None:
    if not 0.0 <= omega < 1.0:
        raise ValueError(f"omega must be in [0, 1), got {omega}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


@torch.no_grad()
def soft_targets_from_probs(features: Tensor, probs: Tensor, omega: float) -> Tensor:
    """Ensembled targets from already-tempered probabilities P (used after a global gather)."""
    dtype = _ensemble_dtype(probs.dtype)
    probs = probs.detach().to(dtype)
    if omega == 0.0 or probs.shape[0] < 2:
        return probs  # nothing to propagate: no other image, or no propagation at all
    return propagate(affinity(features.detach().to(dtype)), probs, omega)


@torch.no_grad()
def soft_targets(features: Tensor, logits: Tensor, omega: float, temperature: float) -> Tensor:
    """The BAKE soft targets Q [B, C] of one batch; no gradient, float32 or better.

    A batch of one image has no neighbour to ensemble from, so its target is softmax(z/T).
    """
    _check_hyperparameters(omega, temperature)
    probs = torch.softmax(logits.detach().to(_ensemble_dtype(logits.dtype)) / temperature, dim=1)
    return soft_targets_from_probs(features, probs, omega)


def distillation_loss(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """T^2 * mean_i KL(targets_i || softmax(logits_i / T)), computed in float32 or better."""
    dtype = _ensemble_dtype(logits.dtype)
    log_student = F.log_softmax(logits.to(dtype) / temperature, dim=1)
    kl = F.kl_div(log_student, targets.to(dtype), reduction="batchmean")
    return kl * temperature**2


# --------------------------------------------------------------------------- global ensembling


def _distributed_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_batches(tensor: Tensor) -> Tensor:
    """Concatenate every worker's tensor along dim 0 (equal batch sizes are required)."""
    _, world_size = _distributed_world()
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def global_soft_targets(
    features: Tensor, logits: Tensor, omega: float, temperature: float
) -> Tensor:
    """BAKE targets over the global batch of all workers; returns this worker's rows.

    Every worker gathers all features and tempered probabilities, builds the same global
    affinity and solves the same system, then keeps rows ``rank*B : (rank+1)*B``. Outside
    ``torch.distributed`` this is exactly :func:`soft_targets`.
    """
    _check_hyperparameters(omega, temperature)
    rank, world_size = _distributed_world()
    if world_size == 1:
        return soft_targets(features, logits, omega, temperature)
    dtype = _ensemble_dtype(logits.dtype)
    probs = torch.softmax(logits.detach().to(dtype) / temperature, dim=1)
    all_features = gather_batches(features.detach().to(dtype))
    all_probs = gather_batches(probs)
    targets = soft_targets_from_probs(all_features, all_probs, omega)
    batch = logits.shape[0]
    return targets[rank * batch : (rank + 1) * batch]


# --------------------------------------------------------------------------- loss modules


class LossParts(NamedTuple):
    """The total training loss and its parts, so every method logs the same metrics."""

    total: Tensor
    ce: Tensor
    kd: Tensor


class BakeLoss(nn.Module):
    """CE(z, y) + lambda * KD(Q || softmax(z/T)) with Q from batch knowledge ensembling."""

    def __init__(
        self,
        temperature: float = 4.0,
        omega: float = 0.5,
        loss_weight: float = 1.0,
        global_ensembling: bool = True,
    ) -> None:
        super().__init__()
        _check_hyperparameters(omega, temperature)
        self.temperature = temperature
        self.omega = omega
        self.loss_weight = loss_weight
        self.global_ensembling = global_ensembling

    def forward(self, features: Tensor, logits: Tensor, labels: Tensor) -> LossParts:
        ensemble = global_soft_targets if self.global_ensembling else soft_targets
        targets = ensemble(features, logits, self.omega, self.temperature)
        ce = F.cross_entropy(logits.float(), labels)
        kd = distillation_loss(logits, targets, self.temperature)
        return LossParts(ce + self.loss_weight * kd, ce, kd)


class CrossEntropyBaseline(nn.Module):
    """Plain cross-entropy with the same interface (kd is reported as 0)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, features: Tensor, logits: Tensor, labels: Tensor) -> LossParts:
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return LossParts(ce, ce, torch.zeros((), device=logits.device))


def build_loss(
    method: str,
    temperature: float = 4.0,
    omega: float = 0.5,
    loss_weight: float = 1.0,
    global_ensembling: bool = True,
    label_smoothing: float = 0.1,
) -> nn.Module:
    """The loss for ``method`` in {'bake', 'ce', 'label_smoothing'}; one interface for all."""
    if method == "bake":
        return BakeLoss(temperature, omega, loss_weight, global_ensembling)
    if method == "ce":
        return CrossEntropyBaseline()
    if method == "label_smoothing":
        return CrossEntropyBaseline(label_smoothing)
    raise ValueError(f"unknown method {method!r}; one of bake, ce, label_smoothing")
