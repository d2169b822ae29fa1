"""Datasets, transforms and seeded splits; the batches are :mod:`bake_ray.core.sampler`'s.

All randomness that decides *which* images are used (test split of ``digits``, ``train_subset``,
the validation split, the batches) comes from ``torch.Generator`` objects seeded from the run
seed, never from the global RNG, so a run (and a resumed run, given the epoch) is reproducible.
Augmentation uses the loader's RNG as usual.

No Ray and no MLflow here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from bake_ray.core.config import ConfigError, DataConfig
from bake_ray.core.datafiles import (
    check_data_available,
    cifar_root,
    fashion_mnist_root,
    image_size_of,
)
from bake_ray.core.fetch import fetch_cifar, fetch_fashion_mnist

Transform = Callable[[Any], Any]

#: ``digits`` has no official test split: this fixed seed makes the same one for every run.
DIGITS_TEST_SEED = 0
DIGITS_TEST_FRACTION = 0.2
#: Below this size ``imagefolder`` uses CIFAR-style crops instead of RandomResizedCrop.
SMALL_IMAGE_SIZE = 128

_DIGITS_STATS = ((0.3053,), (0.3760,))
_FASHION_STATS = ((0.2860,), (0.3530,))
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: Each dataset's normalisation (mean, std), for models served without this package.
EVAL_STATS = {
    "digits": _DIGITS_STATS, "fashion_mnist": _FASHION_STATS, "cifar10": _CIFAR10_STATS,
    "cifar100": _CIFAR100_STATS, "imagefolder": _IMAGENET_STATS,
}  # fmt: skip


# --------------------------------------------------------------------------- seeds


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from (run seed, purpose, epoch...): distinct streams never collide.

    ``seed + epoch`` would make (seed=0, epoch=1) and (seed=1, epoch=0) share batches, so
    the parts are hashed instead.
    """
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_rng(*parts: object) -> torch.Generator:
    """A generator of its own for one purpose (a split, an epoch's batches, a loader)."""
    return torch.Generator().manual_seed(derive_seed(*parts))


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class DataSplits:
    """The three datasets of a run plus what the sampler and the model need to know."""

    train: Dataset  # training transforms (augmentation)
    val: Dataset  # held out of the training set, eval transforms
    test: Dataset  # eval transforms
    train_labels: list[int]  # labels of `train`, in index order (for the sampler)
    num_classes: int
    in_channels: int
    image_size: int


class TransformedSubset(Dataset):
    """``Subset`` that applies its own transform to the untransformed base items.

    The training and validation splits share one base dataset (loaded once, kept in memory
    once) but need different transforms: augmentation for training, none for validation.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Transform) -> None:
        self.dataset = base
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.dataset[self.indices[i]]
        return self.transform(image), int(label)


class TensorImages(Dataset):
    """In-memory images ``[N, C, H, W]`` (float) with integer labels; no transform of its own."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.targets = labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.targets[i])


def stratified_sample(labels: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Sorted indices of ``count`` items drawn so that every class keeps its share.

    Each class gets ``floor(count * n_c / n)`` items; the few left over go to the classes with
    the largest remainders (ties broken at random). Unlike scikit-learn's splitter this works
    for any ``count`` (even fewer than the number of classes), which tiny test data needs.
    """
    n = labels.numel()
    if not 0 <= count <= n:
        raise ValueError(f"cannot draw {count} of {n} items")
    counts = torch.bincount(labels)
    quota = count * counts // n
    remainder = count * counts % n
    missing = count - int(quota.sum())
    if missing:
        order = torch.randperm(len(counts), generator=generator)
        by_remainder = torch.sort(remainder[order], descending=True, stable=True).indices
        quota[order[by_remainder[:missing]]] += 1
    by_class = torch.sort(labels, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    chosen = []
    for cls in torch.nonzero(quota).flatten().tolist():
        members = by_class[starts[cls] : starts[cls] + counts[cls]]
        pick = torch.randperm(len(members), generator=generator)[: int(quota[cls])]
        chosen.append(members[pick])
    if not chosen:
        return torch.empty(0, dtype=torch.long)
    return torch.sort(torch.cat(chosen)).values


def _complement(n: int, taken: Tensor) -> Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[taken] = False
    return torch.nonzero(keep).flatten()


@dataclass(frozen=True)
class _Source:
    """One dataset before splitting: untransformed train pool, test set, and transforms."""

    pool: Dataset
    pool_labels: Tensor
    test: Dataset
    train_tf: Transform
    eval_tf: Transform
    num_classes: int
    in_channels: int
    image_size: int


def _train_val_indices(labels: Tensor, cfg: DataConfig, seed: int) -> tuple[Tensor, Tensor]:
    """Apply ``train_subset`` (a cap), then hold out ``val_fraction`` of what is left.

    Both draws are stratified and seeded by the run seed (separate streams).
    """
    pool = torch.arange(labels.numel())
    if cfg.train_subset is not None and cfg.train_subset < len(pool):
        pool = stratified_sample(labels, cfg.train_subset, make_rng(seed, "train_subset"))
    n_val = round(cfg.val_fraction * len(pool))
    if n_val >= len(pool):
        raise ConfigError(
            f"data.val_fraction: {cfg.val_fraction} leaves no training images out of {len(pool)}"
        )
    val_pos = stratified_sample(labels[pool], n_val, make_rng(seed, "val_split"))
    return pool[_complement(len(pool), val_pos)], pool[val_pos]


def build_splits(cfg: DataConfig, seed: int, *, image_size: int | None = None) -> DataSplits:
    """Load ``cfg.dataset`` and split it into train / val (held out of train) / test.

    ``image_size`` only matters for ``imagefolder`` (default: derived from the first training
    image, at most :data:`bake_ray.core.datafiles.IMAGEFOLDER_IMAGE_SIZE`); the other datasets
    have a fixed size.
    """
    check_data_available(cfg)
    source = _load_source(cfg, image_size)
    train_idx, val_idx = _train_val_indices(source.pool_labels, cfg, seed)
    return DataSplits(
        train=TransformedSubset(source.pool, train_idx.tolist(), source.train_tf),
        val=TransformedSubset(source.pool, val_idx.tolist(), source.eval_tf),
        test=source.test,
        train_labels=source.pool_labels[train_idx].tolist(),
        num_classes=source.num_classes,
        in_channels=source.in_channels,
        image_size=source.image_size,
    )


def split_indices(cfg: DataConfig, seed: int) -> dict[str, Tensor]:
    """The indices each split of a run uses (train and val: into the training pool; test:
    into the test set), for lineage: equal indices, equal data. Loads the dataset's labels."""
    source = _load_source(cfg, None)
    train_idx, val_idx = _train_val_indices(source.pool_labels, cfg, seed)
    return {"train": train_idx, "val": val_idx, "test": torch.arange(len(source.test))}


def raw_test_dataset(cfg: DataConfig) -> Dataset:
    """The untransformed torchvision test set of fashion_mnist / cifar10 / cifar100."""
    if cfg.dataset == "fashion_mnist":
        return datasets.FashionMNIST(fashion_mnist_root(cfg), train=False)
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[cfg.dataset]
    return cls(cifar_root(cfg, cls), train=False)


def digits_test_indices(labels: Tensor) -> Tensor:
    """The fixed test split of ``digits`` (the same for every run and seed)."""
    n_test = round(DIGITS_TEST_FRACTION * len(labels))
    return stratified_sample(labels, n_test, make_rng(DIGITS_TEST_SEED, "digits_test"))


def _load_source(cfg: DataConfig, image_size: int | None) -> _Source:
    loaders: dict[str, Callable[[], _Source]] = {
        "digits": _digits,
        "fashion_mnist": lambda: _fashion_mnist(cfg),
        "cifar10": lambda: _cifar(cfg, datasets.CIFAR10, 10, _CIFAR10_STATS),
        "cifar100": lambda: _cifar(cfg, datasets.CIFAR100, 100, _CIFAR100_STATS),
        "imagefolder": lambda: _imagefolder(cfg, image_size),
    }
    if cfg.dataset not in loaders:
        raise ConfigError(f"data.dataset: unknown {cfg.dataset!r}; one of {tuple(loaders)}")
    return loaders[cfg.dataset]()


def _whole(dataset: Dataset, transform: Transform) -> TransformedSubset:
    return TransformedSubset(dataset, range(len(dataset)), transform)


# --------------------------------------------------------------------------- digits


def _digits() -> _Source:
    """scikit-learn's 8x8 digits (1797 images), with a fixed stratified 20% test split."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(raw.target, dtype=torch.long)
    test_idx = digits_test_indices(labels)
    pool_idx = _complement(len(labels), test_idx)
    normalize = transforms.Normalize(*_DIGITS_STATS)
    # A one-pixel shift is the only augmentation that suits 8x8 digits (no flips).
    train_tf = transforms.Compose([transforms.RandomCrop(8, padding=1), normalize])
    test = TensorImages(images[test_idx], labels[test_idx])
    return _Source(
        pool=TensorImages(images[pool_idx], labels[pool_idx]),
        pool_labels=labels[pool_idx],
        test=_whole(test, normalize),
        train_tf=train_tf,
        eval_tf=normalize,
        num_classes=10,
        in_channels=1,
        image_size=8,
    )


# --------------------------------------------------------------------------- Fashion-MNIST


def _fashion_mnist(cfg: DataConfig) -> _Source:
    """Fashion-MNIST via torchvision's own reader; standard crop + flip augmentation."""
    root = fashion_mnist_root(cfg)
    if cfg.download:
        fetch_fashion_mnist(root)
    pool = datasets.FashionMNIST(root, train=True)
    test = datasets.FashionMNIST(root, train=False)
    labels = pool.targets.clone().long()
    return _crop_flip_source(pool, labels, test, _FASHION_STATS, 10, in_channels=1, size=28, pad=2)


def _crop_flip_source(
    pool: Dataset,
    labels: Tensor,
    test: Dataset,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    num_classes: int,
    in_channels: int,
    size: int,
    pad: int,
) -> _Source:
    """Small-image sources: padded random crop + flip for training, normalisation for both."""
    normalize = [transforms.ToTensor(), transforms.Normalize(*stats)]
    train_tf = transforms.Compose(
        [transforms.RandomCrop(size, padding=pad), transforms.RandomHorizontalFlip(), *normalize]
    )
    eval_tf = transforms.Compose(normalize)
    return _Source(
        pool,
        labels,
        _whole(test, eval_tf),
        train_tf,
        eval_tf,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=size,
    )


# --------------------------------------------------------------------------- CIFAR


def _cifar(
    cfg: DataConfig,
    cls: type[datasets.CIFAR10],
    num_classes: int,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
) -> _Source:
    """CIFAR-10/100 via torchvision (which verifies the md5 of every batch file)."""
    root = cifar_root(cfg, cls)
    if cfg.download:
        fetch_cifar(root, cls)
    pool = cls(root, train=True)
    test = cls(root, train=False)
    labels = torch.tensor(pool.targets, dtype=torch.long)
    return _crop_flip_source(pool, labels, test, stats, num_classes, in_channels=3, size=32, pad=4)


# --------------------------------------------------------------------------- ImageFolder


def _derive_image_size(folder: datasets.ImageFolder) -> int:
    """Never upsample by default: min(shorter side of the first image, 224)."""
    return image_size_of(folder.samples[0][0])


def imagefolder_transforms(size: int) -> tuple[Transform, Transform]:
    """(train, eval) transforms: ImageNet-style for large images, CIFAR-style for small ones.

    RandomResizedCrop's 8%-area crops destroy 64x64 images (TinyImageNet), so below
    :data:`SMALL_IMAGE_SIZE` training uses a padded random crop instead.
    """
    normalize = [transforms.ToTensor(), transforms.Normalize(*_IMAGENET_STATS)]
    resize = round(size * 256 / 224)
    eval_tf = transforms.Compose(
        [transforms.Resize(resize), transforms.CenterCrop(size), *normalize]
    )
    if size >= SMALL_IMAGE_SIZE:
        crop = [transforms.RandomResizedCrop(size)]
    else:
        crop = [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.RandomCrop(size, padding=size // 8),
        ]
    train_tf = transforms.Compose([*crop, transforms.RandomHorizontalFlip(), *normalize])
    return train_tf, eval_tf


def _imagefolder(cfg: DataConfig, image_size: int | None) -> _Source:
    """``<data_dir>/train/<class>/*`` (train and val split), ``<data_dir>/val/<class>/*`` (test)."""
    root = Path(str(cfg.data_dir)).expanduser()
    pool = datasets.ImageFolder(str(root / "train"))
    test = datasets.ImageFolder(str(root / "val"))
    if test.classes != pool.classes:
        raise ConfigError(
            f"data.data_dir: class folders of {root / 'val'} differ from those of {root / 'train'}"
        )
    size = image_size or _derive_image_size(pool)
    train_tf, eval_tf = imagefolder_transforms(size)
    return _Source(
        pool,
        torch.tensor(pool.targets, dtype=torch.long),
        _whole(test, eval_tf),
        train_tf,
        eval_tf,
        num_classes=len(pool.classes),
        in_channels=3,
        image_size=size,
    )


