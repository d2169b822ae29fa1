"""BAKE: Batch Knowledge Ensembling (Ge et al. 2021, arXiv 2104.13298), in plain PyTorch.

For a mini-batch of B images with pooled features f_i and logits z_i::

    A_ij = softmax_{j != i}( cos(f_i, f_j) / tau )      affinity, self excluded (A_ii = 0)
    P    = softmax(z / T)                                tempered class probabilities
    Q    = (1 - omega) (I - omega A)^-1 P                propagated soft targets
    KD   = T^2 * (1/B) sum_i KL(Q_i || softmax(z_i / T))
    loss = CE(z, y) + lambda * KD

Q is the fixed point of ``Q <- omega A Q + (1 - omega) P``; it is computed without gradient
from detached tensors, in float32 (or float64 if given), so gradients reach the network only
through ``softmax(z / T)`` inside KD and through CE. With several data-parallel workers the
features and P of the whole global batch are gathered first ("global knowledge
ensembling") and each worker keeps its own rows of Q.

Q is computed by one of three solvers (``bake.solver``): ``solve``, the closed form by an LU
solve, O(B^3); ``neumann``, a fixed number of rounds of the fixed-point iteration, O(k B^2 C),
with a proven error bound; and ``auto`` (the default), whichever of the two needs fewer
floating-point operations for this B, C, omega and tolerance. None of them reads a value
back to the host, so ensembling never stalls a GPU's queue.

The affinity temperature tau (``bake.affinity_temperature``) goes BEYOND the paper, whose
affinity is the plain softmax of cosines: tau = 1 (the default) is the paper exactly.
Cosines of post-ReLU features lie in [0, 1], so at tau = 1 every row of A is close to
uniform over the batch; tau < 1 sharpens it towards the nearest neighbours.

No Ray here: distribution goes through ``torch.distributed`` when it is initialised.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from bake_ray.core.config import METHODS, SOLVERS, BakeConfig
from bake_ray.core.schema import validated

#: Default ``tol`` of the ``neumann``/``auto`` solvers (``bake.tol``, 1e-6): the largest
#: row-L1 distance ``max_i ||Q~_i - Q_i||_1`` allowed from the exact closed form (each target
#: probability is then within tol/2 of the exact one). 1e-6 is the order of the float32
#: solve's own rounding error against float64 (2e-7 to 4e-7 row-L1 at B = 512-2048,
#: C = 100-1000), so ``auto`` is the paper's closed form to the precision the product
#: already works at.
DEFAULT_TOL: float = BakeConfig.tol


def _ensemble_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) is ensembled in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def affinity(features: Tensor, tau: float = 1.0) -> Tensor:
    """Row-stochastic affinity A: softmax over j != i of cos(f_i, f_j) / tau.

    tau = 1 is the paper's affinity (no temperature); dividing by 1.0 is exact, so the
    default reproduces it bit for bit.
    """
    normed = F.normalize(features, dim=1)
    cosine = normed @ normed.t()
    if tau != 1.0:
        cosine = cosine / tau
    self_mask = torch.eye(cosine.shape[0], dtype=torch.bool, device=cosine.device)
    return torch.softmax(cosine.masked_fill(self_mask, float("-inf")), dim=1)


def propagate(affinity_matrix: Tensor, probs: Tensor, omega: float) -> Tensor:
    """Q = (1 - omega) (I - omega A)^-1 P exactly, by an LU solve (never an explicit inverse).

    ``linalg.solve_ex`` rather than ``linalg.solve``: the latter copies its error code to the
    host to raise on a singular matrix, a sync per call on a GPU. ``I - omega A`` is strictly
    diagonally dominant (A is row-stochastic with a zero diagonal, omega < 1), hence never
    singular, so that check could never fire; non-finite inputs give non-finite targets,
    which the training loop's divergence check catches.
    """
    identity = torch.eye(affinity_matrix.shape[0], dtype=probs.dtype, device=probs.device)
    solution, _ = torch.linalg.solve_ex(identity - omega * affinity_matrix, probs)
    return (1.0 - omega) * solution


def neumann_steps(omega: float, tol: float) -> int:
    """The smallest k >= 0 with 2 omega^(k+1) <= tol: rounds that :func:`propagate_neumann`
    needs for a row-L1 error of at most ``tol`` (0 when omega = 0, where Q = P exactly).

    Known on the host before any tensor exists, so the iteration count never waits on the
    device. E.g. tol = 1e-6: 20 rounds at omega = 0.5, 137 at omega = 0.9.
    """
    validated(BakeConfig, {"omega": omega, "tol": tol}, "bake.")  # omega < 1: the series converges
    if omega == 0.0:
        return 0
    steps = max(math.ceil(math.log(tol / 2.0) / math.log(omega)) - 1, 0)
    while 2.0 * omega ** (steps + 1) > tol:  # guard the float rounding of the logarithms
        steps += 1
    while steps > 0 and 2.0 * omega**steps <= tol:
        steps -= 1
    return steps


def propagate_neumann(affinity_matrix: Tensor, probs: Tensor, omega: float, steps: int) -> Tensor:
    """``steps`` rounds of Q <- omega A Q + (1 - omega) P from Q_0 = P; matmuls only.

    Error bound. Write ||X|| = max_i sum_c |X_ic| (the largest row-L1 norm) and let Q be the
    exact solution, Q = omega A Q + (1 - omega) P. Subtracting, Q_k - Q = omega A (Q_{k-1} - Q),
    so Q_k - Q = (omega A)^k (Q_0 - Q). A is row-stochastic (non-negative, rows sum to 1), so
    is A^k, and each row of A^k E is a convex combination of rows of E: ||A^k E|| <= ||E||.
    Hence ||Q_k - Q|| <= omega^k ||P - Q||. From the fixed-point equation,
    P - Q = omega (P - A Q); the rows of P and of A Q are probability vectors (A Q's rows are
    convex combinations of Q's, which are probability vectors), and two probability vectors
    are at most 2 apart in L1. So ||P - Q|| <= 2 omega and

        ||Q_k - Q|| <= 2 omega^(k+1),

    which :func:`neumann_steps` makes <= tol; every entry is then off by at most tol / 2 (the
    entries of a difference of probability vectors are at most half its L1 norm). The bound
    uses nothing but row-stochasticity, so it holds for any affinity. Every Q_k row is itself
    a probability vector (a convex combination of P and rows of Q_{k-1}), unlike a truncated
    power series of (I - omega A)^-1, so the targets stay normalised at any k. In floating
    point each round adds rounding of the order of one matmul's, damped by omega per round.
    """
    scaled = omega * affinity_matrix
    base = (1.0 - omega) * probs
    targets = probs
    for _ in range(steps):
        targets = torch.addmm(base, scaled, targets)
    return targets


def choose_solver(batch: int, classes: int, omega: float, tol: float) -> str:
    """``auto``'s pick: ``neumann`` when its k rounds cost fewer flops than the exact solve.

    An LU solve of the B x B system with C right-hand sides costs about 2/3 B^3 + 2 B^2 C
    flops; k rounds of the iteration cost 2 k B^2 C. So the iteration wins when
    k C < B / 3 + C, i.e. when B > 3 C (k - 1). With the default tol = 1e-6 (k = 20 at
    omega = 0.5, 137 at omega = 0.9) that is B > 57 C at omega = 0.5 and B > 408 C at
    omega = 0.9: for CIFAR-100 (C = 100) from B = 5700 at omega = 0.5; for C = 1000 only past
    B = 57000. A larger tol switches earlier. Only shapes and constants enter, all known on
    the host, so the choice never reads the device. Matmuls run nearer peak speed than an
    LU factorisation, so the rule errs towards ``solve`` (measured in BENCHMARKS.md section 1).
    """
    steps = neumann_steps(omega, tol)
    return "neumann" if steps * classes < batch / 3.0 + classes else "solve"


def propagate_with(
    affinity_matrix: Tensor, probs: Tensor, omega: float, solver: str, tol: float
) -> Tensor:
    """Q by ``solver`` in {'auto', 'solve', 'neumann'}; see the module docstring."""
    if solver == "auto":
        solver = choose_solver(probs.shape[0], probs.shape[1], omega, tol)
    if solver == "solve":
        return propagate(affinity_matrix, probs, omega)
    if solver == "neumann":
        return propagate_neumann(affinity_matrix, probs, omega, neumann_steps(omega, tol))
    raise ValueError(f"unknown solver {solver!r}; one of {', '.join(SOLVERS)}")


def _check_hyperparameters(
    omega: float,
    temperature: float,
    solver: str = "auto",
    tol: float = DEFAULT_TOL,
    affinity_temperature: float = 1.0,
) -> None:
    """The ranges of :class:`BakeConfig` (the one place they are written), checked by its
    schema: a :class:`~bake_ray.core.errors.ConfigError` (a ValueError) names the bad value."""
    values = {"omega": omega, "temperature": temperature, "solver": solver, "tol": tol}
    validated(BakeConfig, {**values, "affinity_temperature": affinity_temperature}, "bake.")


@torch.no_grad()
def soft_targets_from_probs(
    features: Tensor,
    probs: Tensor,
    omega: float,
    solver: str = "auto",
    tol: float = DEFAULT_TOL,
    affinity_temperature: float = 1.0,
) -> Tensor:
    """Ensembled targets from already-tempered probabilities P (used after a global gather)."""
    dtype = _ensemble_dtype(probs.dtype)
    probs = probs.detach().to(dtype)
    if omega == 0.0 or probs.shape[0] < 2:
        return probs  # nothing to propagate: no other image, or no propagation at all
    matrix = affinity(features.detach().to(dtype), affinity_temperature)
    return propagate_with(matrix, probs, omega, solver, tol)


@torch.no_grad()
def soft_targets(
    features: Tensor,
    logits: Tensor,
    omega: float,
    temperature: float,
    solver: str = "auto",
    tol: float = DEFAULT_TOL,
    affinity_temperature: float = 1.0,
) -> Tensor:
    """The BAKE soft targets Q [B, C] of one batch; no gradient, float32 or better.

    ``solver``: 'solve' (exact), 'neumann' (row-L1 error <= ``tol``, proven in
    :func:`propagate_neumann`) or 'auto' (the cheaper of the two, so also within ``tol``).
    ``affinity_temperature``: tau of the affinity (1.0 = the paper; see the module doc).
    A batch of one image has no neighbour to ensemble from, so its target is softmax(z/T).
    """
    _check_hyperparameters(omega, temperature, solver, tol, affinity_temperature)
    probs = torch.softmax(logits.detach().to(_ensemble_dtype(logits.dtype)) / temperature, dim=1)
    return soft_targets_from_probs(features, probs, omega, solver, tol, affinity_temperature)


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
    features: Tensor,
    logits: Tensor,
    omega: float,
    temperature: float,
    solver: str = "auto",
    tol: float = DEFAULT_TOL,
    affinity_temperature: float = 1.0,
) -> Tensor:
    """BAKE targets over the global batch of all workers; returns this worker's rows.

    Every worker gathers all features and tempered probabilities, builds the same global
    affinity and solves the same system (``auto`` picks by the global batch B, the same on
    every worker), then keeps rows ``rank*B : (rank+1)*B``. Outside ``torch.distributed``
    this is exactly :func:`soft_targets`.
    """
    tau = affinity_temperature
    _check_hyperparameters(omega, temperature, solver, tol, tau)
    rank, world_size = _distributed_world()
    if world_size == 1:
        return soft_targets(features, logits, omega, temperature, solver, tol, tau)
    dtype = _ensemble_dtype(logits.dtype)
    probs = torch.softmax(logits.detach().to(dtype) / temperature, dim=1)
    all_features = gather_batches(features.detach().to(dtype))
    all_probs = gather_batches(probs)
    targets = soft_targets_from_probs(all_features, all_probs, omega, solver, tol, tau)
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
        solver: str = "auto",
        tol: float = DEFAULT_TOL,
        affinity_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        _check_hyperparameters(omega, temperature, solver, tol, affinity_temperature)
        self.temperature = temperature
        self.omega = omega
        self.loss_weight = loss_weight
        self.global_ensembling = global_ensembling
        self.solver = solver
        self.tol = tol
        self.affinity_temperature = affinity_temperature

    def forward(self, features: Tensor, logits: Tensor, labels: Tensor) -> LossParts:
        ensemble = global_soft_targets if self.global_ensembling else soft_targets
        targets = ensemble(
            features,
            logits,
            self.omega,
            self.temperature,
            self.solver,
            self.tol,
            self.affinity_temperature,
        )
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
    solver: str = "auto",
    tol: float = DEFAULT_TOL,
    affinity_temperature: float = 1.0,
) -> nn.Module:
    """The loss for ``method`` in {'bake', 'ce', 'label_smoothing'}; one interface for all."""
    if method == "bake":
        return BakeLoss(
            temperature, omega, loss_weight, global_ensembling, solver, tol, affinity_temperature
        )
    if method == "ce":
        return CrossEntropyBaseline()
    if method == "label_smoothing":
        return CrossEntropyBaseline(label_smoothing)
    raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
