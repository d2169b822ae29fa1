"""Datasets, transforms and seeded splits; the batches are :mod:`bake_ray.sampler`'s.

All randomness that decides *which* images are used (test split of ``digits``, ``train_subset``,
the validation split, the batches) comes from ``torch.Generator`` objects seeded from the run
seed, never from the global RNG, so a run (and a resumed run, given the epoch) is reproducible.
Augmentation uses the loader's RNG as usual.

No Ray and no MLflow here.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from bake_ray.config import ConfigError, DataConfig

Transform = Callable[[Any], Any]

#: Where Debian's ``dataset-fashion-mnist`` package installs the raw IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The four IDX files torchvision's FashionMNIST reader expects (uncompressed names).
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
#: ``digits`` has no official test split: this fixed seed makes the same one for every run.
DIGITS_TEST_SEED = 0
DIGITS_TEST_FRACTION = 0.2
#: Default training resolution for ``imagefolder`` when the images are large enough.
IMAGEFOLDER_IMAGE_SIZE = 224
#: Below this size ``imagefolder`` uses CIFAR-style crops instead of RandomResizedCrop.
SMALL_IMAGE_SIZE = 128

_DIGITS_STATS = ((0.3053,), (0.3760,))
_FASHION_STATS = ((0.2860,), (0.3530,))
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


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
    image, at most :data:`IMAGEFOLDER_IMAGE_SIZE`); the other datasets have a fixed size.
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
    n_test = round(DIGITS_TEST_FRACTION * len(labels))
    test_idx = stratified_sample(labels, n_test, make_rng(DIGITS_TEST_SEED, "digits_test"))
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


def cache_dir() -> Path:
    """Private, writable cache for bake-ray (``$BAKE_RAY_CACHE``, else ``~/.cache/bake_ray``)."""
    if os.environ.get("BAKE_RAY_CACHE"):
        return Path(os.environ["BAKE_RAY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bake_ray"


def _default_root() -> Path:
    """Where torchvision downloads go when ``data.data_dir`` is null."""
    return cache_dir() / "datasets"


def _has_idx_files(folder: Path) -> bool:
    return all(
        (folder / name).is_file() or (folder / f"{name}.gz").is_file()
        for name in FASHION_MNIST_FILES
    )


def _fashion_source_dir(cfg: DataConfig) -> Path | None:
    """The folder holding the four IDX files (plain or .gz), or None."""
    if cfg.data_dir is None:
        candidates = [DEBIAN_FASHION_MNIST_DIR]
    else:
        root = Path(cfg.data_dir).expanduser()
        candidates = [root, root / "FashionMNIST" / "raw"]
    return next((c for c in candidates if _has_idx_files(c)), None)


def _materialise_file(src_dir: Path, raw: Path, name: str) -> None:
    """Make ``raw/name`` an uncompressed IDX file: a symlink, or a one-time decompression.

    torchvision reads the uncompressed names with plain ``open``; Debian ships .gz files in
    a read-only folder, hence the private copy. Written to a temporary name and renamed, so
    concurrent workers on one host never see a half-written file.
    """
    target = raw / name
    plain, packed = src_dir / name, src_dir / f"{name}.gz"
    if plain.is_file():
        if not target.exists():
            tmp = raw / f".{name}.{os.getpid()}.link"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(plain.resolve())
            os.replace(tmp, target)
        return
    if target.is_file() and target.stat().st_mtime >= packed.stat().st_mtime:
        return
    tmp = raw / f".{name}.{os.getpid()}.tmp"
    with gzip.open(packed, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, length=1 << 20)
    os.replace(tmp, target)


def fashion_mnist_root(cfg: DataConfig) -> Path:
    """A torchvision root (``<root>/FashionMNIST/raw/<idx files>``) for ``cfg``.

    A ``data_dir`` that already is a torchvision tree with uncompressed files is used as is;
    otherwise the files found (Debian's, by default) are linked or decompressed into a
    private root under :func:`cache_dir`, keyed by the source folder.
    """
    src = _fashion_source_dir(cfg)
    if src is None:
        if cfg.download:
            return Path(cfg.data_dir).expanduser() if cfg.data_dir else _default_root()
        raise ConfigError(_fashion_missing_message(cfg))
    if src.parent.name == "FashionMNIST" and all((src / n).is_file() for n in FASHION_MNIST_FILES):
        return src.parent.parent
    key = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:12]
    root = cache_dir() / "fashion_mnist" / key
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        _materialise_file(src, raw, name)
    return root


def _fashion_missing_message(cfg: DataConfig) -> str:
    where = (
        f"data.data_dir={cfg.data_dir} (nor in its FashionMNIST/raw)"
        if cfg.data_dir
        else str(DEBIAN_FASHION_MNIST_DIR)
    )
    return (
        f"data.dataset=fashion_mnist: IDX files not found in {where}; install the Debian "
        "package dataset-fashion-mnist, set data.data_dir, or set data.download=true"
    )


def _fashion_mnist(cfg: DataConfig) -> _Source:
    """Fashion-MNIST via torchvision's own reader; standard crop + flip augmentation."""
    root = str(fashion_mnist_root(cfg))
    pool = datasets.FashionMNIST(root, train=True, download=cfg.download)
    test = datasets.FashionMNIST(root, train=False, download=cfg.download)
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


def _cifar_root(cfg: DataConfig, cls: type[datasets.CIFAR10]) -> Path:
    """``data_dir`` (or the default root); the batches folder itself is accepted too."""
    root = Path(cfg.data_dir).expanduser() if cfg.data_dir else _default_root()
    return root.parent if root.name == cls.base_folder else root


def _cifar_files(cls: type[datasets.CIFAR10]) -> list[str]:
    return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _cifar(
    cfg: DataConfig,
    cls: type[datasets.CIFAR10],
    num_classes: int,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
) -> _Source:
    """CIFAR-10/100 via torchvision (which verifies the md5 of every batch file)."""
    root = str(_cifar_root(cfg, cls))
    pool = cls(root, train=True, download=cfg.download)
    test = cls(root, train=False, download=cfg.download)
    labels = torch.tensor(pool.targets, dtype=torch.long)
    return _crop_flip_source(pool, labels, test, stats, num_classes, in_channels=3, size=32, pad=4)


# --------------------------------------------------------------------------- ImageFolder


def _derive_image_size(folder: datasets.ImageFolder) -> int:
    """Never upsample by default: min(shorter side of the first image, 224)."""
    return _image_size_of(folder.samples[0][0])


def _image_size_of(path: str) -> int:
    with Image.open(path) as image:
        return min(IMAGEFOLDER_IMAGE_SIZE, *image.size)


def _first_image(train_dir: Path) -> str:
    """The file ``ImageFolder(train_dir).samples[0]`` names, without scanning every class."""
    classes, _ = datasets.folder.find_classes(str(train_dir))
    for name in classes:
        found = datasets.folder.make_dataset(
            str(train_dir), {name: 0}, extensions=datasets.folder.IMG_EXTENSIONS, allow_empty=True
        )
        if found:
            return found[0][0]
    raise ConfigError(f"data.data_dir: no images under {train_dir}")


_FIXED_INPUT_SHAPES = {
    "digits": (1, 8),
    "fashion_mnist": (1, 28),
    "cifar10": (3, 32),
    "cifar100": (3, 32),
}


def input_shape(cfg: DataConfig) -> tuple[int, int]:
    """(channels, side) of the images a model will see, for checks before any data loads
    (the model's input shape, a weights file against it). Equal to what
    :func:`build_splits` reports (tested); ImageFolder opens only its first image."""
    if cfg.dataset in _FIXED_INPUT_SHAPES:
        return _FIXED_INPUT_SHAPES[cfg.dataset]
    return 3, _image_size_of(_first_image(Path(str(cfg.data_dir)).expanduser() / "train"))


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


# --------------------------------------------------------------------------- availability


def check_data_available(cfg: DataConfig) -> None:
    """Raise a one-line :class:`ConfigError` if the data cannot be found; file checks only.

    Runs before any compute (and before Ray starts workers) so a missing dataset fails fast.
    With ``download=true`` missing torchvision files are fine: torchvision will fetch them.
    """
    checks: dict[str, Callable[[DataConfig], None]] = {
        "digits": lambda c: None,  # ships with scikit-learn; data_dir is ignored
        "fashion_mnist": _check_fashion_mnist,
        "cifar10": lambda c: _check_cifar(c, datasets.CIFAR10),
        "cifar100": lambda c: _check_cifar(c, datasets.CIFAR100),
        "imagefolder": _check_imagefolder,
    }
    if cfg.dataset not in checks:
        raise ConfigError(f"data.dataset: unknown {cfg.dataset!r}; one of {tuple(checks)}")
    if cfg.data_dir is not None and cfg.dataset != "digits":
        _check_data_dir(cfg.data_dir, may_be_created=cfg.download)
    checks[cfg.dataset](cfg)


def _check_data_dir(data_dir: str, may_be_created: bool) -> None:
    path = Path(data_dir).expanduser()
    if not path.exists() and not may_be_created:
        raise ConfigError(f"data.data_dir: {data_dir} does not exist")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"data.data_dir: {data_dir} is not a directory")


def _check_fashion_mnist(cfg: DataConfig) -> None:
    if not cfg.download and _fashion_source_dir(cfg) is None:
        raise ConfigError(_fashion_missing_message(cfg))


def _check_cifar(cfg: DataConfig, cls: type[datasets.CIFAR10]) -> None:
    if cfg.download:
        return
    folder = _cifar_root(cfg, cls) / cls.base_folder
    missing = [name for name in _cifar_files(cls) if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"data.dataset={cfg.dataset}: {', '.join(missing)} not found in {folder}; set "
            f"data.data_dir to the folder that contains {cls.base_folder}/ or data.download=true"
        )


def _check_imagefolder(cfg: DataConfig) -> None:
    if cfg.data_dir is None:
        raise ConfigError("data.data_dir: required for data.dataset=imagefolder")
    root = Path(cfg.data_dir).expanduser()
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise ConfigError(
                f"data.data_dir: {root / part} not found; imagefolder needs "
                "<data_dir>/train/<class>/... and <data_dir>/val/<class>/..."
            )
    train, val = _class_folders(root / "train"), _class_folders(root / "val")
    if train != val:
        only = f"only in train: {_few(train - val)}; only in val: {_few(val - train)}"
        raise ConfigError(
            f"data.data_dir: class folders of {root / 'val'} differ from those of "
            f"{root / 'train'} ({only})"
        )


def _class_folders(folder: Path) -> set[str]:
    """Class names as ``ImageFolder`` finds them: the sub-folders (label i = i-th sorted)."""
    return {entry.name for entry in os.scandir(folder) if entry.is_dir()}


def _few(names: set[str], shown: int = 3) -> str:
    """Up to ``shown`` names for a one-line message, then how many more."""
    if not names:
        return "none"
    ordered = sorted(names)
    more = f" and {len(ordered) - shown} more" if len(ordered) > shown else ""
    return ", ".join(ordered[:shown]) + more
