"""Where each dataset's files are, and whether they are there, before any compute.

:mod:`bake_ray.core.data` builds datasets from these files; the command lines call
:func:`check_data_available` and :func:`input_shape` first, so a missing dataset or an
unusable folder fails in one line before Ray starts or a model is built. Only file checks
here (ImageFolder opens one image): nothing is loaded.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torchvision import datasets

from bake_ray.core.config import ConfigError, DataConfig

#: Where Debian's ``dataset-fashion-mnist`` package installs the raw IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The four IDX files torchvision's FashionMNIST reader expects (uncompressed names).
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
#: Default training resolution for ``imagefolder`` when the images are large enough.
IMAGEFOLDER_IMAGE_SIZE = 224


def cache_dir() -> Path:
    """Private, writable cache for bake-ray (``$BAKE_RAY_CACHE``, else ``~/.cache/bake_ray``)."""
    if os.environ.get("BAKE_RAY_CACHE"):
        return Path(os.environ["BAKE_RAY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bake_ray"


def default_root() -> Path:
    """Where torchvision downloads go when ``data.data_dir`` is null."""
    return cache_dir() / "datasets"


def has_idx_files(folder: Path) -> bool:
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
    return next((c for c in candidates if has_idx_files(c)), None)


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
            return Path(cfg.data_dir).expanduser() if cfg.data_dir else default_root()
        raise ConfigError(fashion_missing_message(cfg))
    if src.parent.name == "FashionMNIST" and all((src / n).is_file() for n in FASHION_MNIST_FILES):
        return src.parent.parent
    key = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:12]
    root = cache_dir() / "fashion_mnist" / key
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        _materialise_file(src, raw, name)
    return root


def fashion_missing_message(cfg: DataConfig) -> str:
    where = (
        f"data.data_dir={cfg.data_dir} (nor in its FashionMNIST/raw)"
        if cfg.data_dir
        else str(DEBIAN_FASHION_MNIST_DIR)
    )
    return (
        f"data.dataset=fashion_mnist: IDX files not found in {where}; install the Debian "
        "package dataset-fashion-mnist, set data.data_dir, or set data.download=true"
    )


def cifar_root(cfg: DataConfig, cls: type[datasets.CIFAR10]) -> Path:
    """``data_dir`` (or the default root); the batches folder itself is accepted too."""
    root = Path(cfg.data_dir).expanduser() if cfg.data_dir else default_root()
    return root.parent if root.name == cls.base_folder else root


def cifar_files(cls: type[datasets.CIFAR10]) -> list[str]:
    return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def image_size_of(path: str) -> int:
    with Image.open(path) as image:
        return min(IMAGEFOLDER_IMAGE_SIZE, *image.size)


def first_image(train_dir: Path) -> str:
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
    return 3, image_size_of(first_image(Path(str(cfg.data_dir)).expanduser() / "train"))


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
        raise ConfigError(fashion_missing_message(cfg))


def _check_cifar(cfg: DataConfig, cls: type[datasets.CIFAR10]) -> None:
    if cfg.download:
        return
    folder = cifar_root(cfg, cls) / cls.base_folder
    missing = [name for name in cifar_files(cls) if not (folder / name).is_file()]
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
