"""BAKE's class-aware (distributed) batch sampler, and the loaders built on it.

BAKE only works if every mini-batch holds several images of the same class: an anchor image is
followed by ``M = same_class`` other images of its class, so a batch of ``N = batch_size`` images
holds ``N / (M + 1)`` anchors, as in the paper. :class:`ClassAwareBatchSampler` builds such
batches, makes every training image an anchor once per epoch, and shards the anchors across
data-parallel ranks with equal, full batches (the all-gather of global ensembling needs them).
Its randomness comes from generators seeded from the run seed (:func:`bake_ray.core.data.
derive_seed`), so a run and a resumed run draw the same batches.

No Ray and no MLflow here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from bake_ray.core.config import ConfigError, DataConfig
from bake_ray.core.data import DataSplits, derive_seed, make_rng

# --------------------------------------------------------------------------- sampler


def check_batch_shape(batch_size: int, same_class: int) -> int:
    """Anchors per batch, ``N / (M + 1)``; a ConfigError if N is not a multiple of M + 1."""
    if same_class < 0:
        raise ConfigError(f"data.same_class: must be >= 0, got {same_class}")
    if batch_size < 1 or batch_size % (same_class + 1):
        raise ConfigError(
            f"data.batch_size: {batch_size} must be a positive multiple of data.same_class + 1 "
            f"= {same_class + 1}"
        )
    return batch_size // (same_class + 1)


class ClassAwareBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices: each anchor followed by ``same_class`` classmates.

    Per epoch, all indices are shuffled with a generator seeded from (seed, epoch); this one
    permutation (identical on every rank) is padded by wrapping around to its start, like
    ``DistributedSampler``, until it fills ``world_size * len(self)`` full batches; rank ``r``
    takes the ``r``-th contiguous slice. So ranks get disjoint anchors (apart from the
    wrap-around padding), equal batch counts, and full batches; every image is an anchor at
    least once per epoch, exactly once when the sizes divide.

    The ``same_class`` partners of an anchor are drawn uniformly without replacement from the
    other images of its class; from a class with too few others, all of them are used and
    then repeated; an image alone in its class is repeated itself. ``same_class=0`` gives
    plain shuffled batches.
    """

    def __init__(
        self,
        labels: Sequence[int] | Tensor,
        batch_size: int,
        same_class: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.anchors_per_batch = check_batch_shape(batch_size, same_class)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if self.labels.numel() == 0:
            raise ValueError("ClassAwareBatchSampler needs at least one training image")
        self.batch_size = batch_size
        self.same_class = same_class
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._by_class = torch.sort(self.labels, stable=True).indices
        self._count = torch.bincount(self.labels)
        self._start = torch.cumsum(self._count, 0) - self._count
        position = torch.empty_like(self.labels)
        position[self._by_class] = (
            torch.arange(len(self.labels)) - self._start[self.labels[self._by_class]]
        )
        self._position = position  # rank of each image within its class

    def __len__(self) -> int:
        """Batches per rank per epoch (the same on every rank)."""
        return math.ceil(len(self.labels) / (self.world_size * self.anchors_per_batch))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle; call before iterating, on every rank, with the same value."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = make_rng(self.seed, "batches", self.epoch)
        anchors = self._padded_permutation(generator)
        partners = self._partners(anchors, generator)  # for all ranks: same RNG use everywhere
        per_rank = len(anchors) // self.world_size
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        rows = torch.cat([anchors[mine, None], partners[mine]], dim=1)
        yield from rows.reshape(-1, self.batch_size).tolist()

    def _padded_permutation(self, generator: torch.Generator) -> Tensor:
        n = len(self.labels)
        perm = torch.randperm(n, generator=generator)
        total = len(self) * self.world_size * self.anchors_per_batch
        return perm.repeat(math.ceil(total / n))[:total]

    def _partners(self, anchors: Tensor, generator: torch.Generator) -> Tensor:
        """``[A, same_class]`` dataset indices of each anchor's classmates."""
        m = self.same_class
        cls = self.labels[anchors]
        size = self._count[cls]
        own = self._position[anchors]
        offsets = own[:, None].repeat(1, m)  # singleton classes: the anchor itself
        roomy = size - 1 >= m
        if m and roomy.any():
            offsets[roomy] = _distinct_offsets(own[roomy], size[roomy], m, generator)
        for i in torch.nonzero(~roomy & (size > 1)).flatten().tolist():
            offsets[i] = _cycled_offsets(int(own[i]), int(size[i]), m, generator)
        return self._by_class[self._start[cls][:, None] + offsets]


def _distinct_offsets(exclude: Tensor, size: Tensor, m: int, generator: torch.Generator) -> Tensor:
    """Per row, ``m`` distinct uniform offsets in ``[0, size)`` avoiding ``exclude``.

    Vectorised sequential sampling: the k-th draw picks the j-th value not yet taken, found by
    stepping j over the taken values in ascending order. O(A * m^2), no per-class loops, so
    it stays cheap for ImageNet-sized classes.
    """
    taken = exclude[:, None]
    for k in range(m):
        free = (size - 1 - k).double()
        pick = (torch.rand(len(size), generator=generator, dtype=torch.float64) * free).long()
        for column in torch.sort(taken, dim=1).values.unbind(1):
            pick = pick + (pick >= column).long()
        taken = torch.cat([taken, pick[:, None]], dim=1)
    return taken[:, 1:]


def _cycled_offsets(own: int, size: int, m: int, generator: torch.Generator) -> Tensor:
    """All ``size - 1`` classmates in random order, repeated to length ``m`` (small classes)."""
    others = torch.tensor([j for j in range(size) if j != own])
    order = others[torch.randperm(len(others), generator=generator)]
    return order.repeat(math.ceil(m / len(order)))[:m]


# --------------------------------------------------------------------------- loaders


@dataclass(frozen=True)
class Loaders:
    """The three loaders of a run; call :meth:`set_epoch` before each training epoch."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    train_sampler: ClassAwareBatchSampler

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's batches and its augmentation seeds, from (seed, rank, epoch).

        Loader worker processes seed their augmentation RNG from the loader's generator
        when an epoch's iterator starts; reseeding it per epoch makes an epoch's
        augmentations the same whether the run got there straight or through a resume.
        Without worker processes augmentation uses this process's RNG instead, which
        checkpoints save and restore.
        """
        self.train_sampler.set_epoch(epoch)
        sampler = self.train_sampler
        self.train.generator.manual_seed(derive_seed(sampler.seed, "loader", sampler.rank, epoch))


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Rank ``r``'s strided share ``r, r + W, ...`` of an eval set, without padding.

    No padding, so summing (correct, count) over ranks gives the exact full-set accuracy.
    """
    if world_size == 1:
        return dataset
    return Subset(dataset, range(rank, len(dataset), world_size))


def build_loaders(
    splits: DataSplits,
    cfg: DataConfig,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    eval_shard: bool = False,
) -> Loaders:
    """Training loader with the class-aware sampler (sharded by rank), and eval loaders.

    By default every rank evaluates the full val and test sets (simple, and identical numbers
    on every rank). With ``eval_shard=True`` each rank gets a disjoint strided share and the
    caller must sum (correct, count) across ranks.
    """
    sampler = ClassAwareBatchSampler(
        splits.train_labels, cfg.batch_size, cfg.same_class, seed, rank, world_size
    )
    options: dict[str, Any] = {
        "num_workers": cfg.loader_workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": cfg.loader_workers > 0,
    }
    # Training workers start afresh each epoch, seeded by Loaders.set_epoch: persistent ones
    # would carry their RNG across epochs, which a resumed run cannot reproduce.
    train = DataLoader(
        splits.train,
        batch_sampler=sampler,
        generator=make_rng(seed, "loader", rank),
        **{**options, "persistent_workers": False},
    )

    def evaluation(dataset: Dataset, name: str) -> DataLoader:
        part = shard(dataset, rank, world_size) if eval_shard else dataset
        return DataLoader(
            part,
            batch_size=cfg.batch_size,
            shuffle=False,
            generator=make_rng(seed, name, rank),
            **options,
        )

    return Loaders(train, evaluation(splits.val, "val"), evaluation(splits.test, "test"), sampler)
