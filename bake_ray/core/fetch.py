"""torchvision downloads made safe when several processes on one host start at once.

A ``gpu8`` node starts eight trials together, each with ``data.download=true`` and the same
dataset root. torchvision takes no lock: all eight see the files missing, write the same
archive (each ``open(..., "wb")`` truncates the others' bytes) and extract it over files
another one is already reading. Here the existence check, the download and the extraction
run under one inter-process lock per dataset, ``<root>/.bake_ray-<folder>.lock``: the first
process downloads, the others wait and then find the files complete.

The lock is ``fcntl.flock`` (the ``filelock`` package): the kernel releases it when its
holder dies, so a crashed download never blocks the next process. What a crash leaves on
disk is judged by content, never by existence (:func:`cifar_complete`, :func:`idx_complete`).
"""

from __future__ import annotations

import math
from pathlib import Path

from filelock import FileLock
from torchvision import datasets
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from bake_ray.core.datafiles import FASHION_MNIST_FILES


def download_lock(root: Path, folder: str) -> FileLock:
    """The lock every process fetching ``folder`` into ``root`` holds while it checks,
    downloads and extracts (a file beside the data, so only processes sharing it wait)."""
    root.mkdir(parents=True, exist_ok=True)
    return FileLock(root / f".bake_ray-{folder}.lock")


def cifar_complete(root: Path, cls: type[datasets.CIFAR10]) -> bool:
    """Every batch file *and* the meta file match their published md5.

    torchvision's own ``download()`` checks the batches only: a crash while ``meta`` was
    being extracted leaves a dataset it skips re-extracting and then refuses to load.
    """
    folder = root / cls.base_folder
    files = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    return all(check_integrity(folder / name, md5) for name, md5 in files)


def fetch_cifar(root: Path, cls: type[datasets.CIFAR10]) -> None:
    """Download and extract CIFAR into ``root`` once per host, however many processes ask.

    The check without the lock only reads (a complete, read-only root needs no lock file);
    under the lock it is repeated, because the holder before may have just finished. A
    partial archive fails its md5 and is downloaded again; a half-extracted file fails its
    md5 and the (verified) archive is extracted again.
    """
    if cifar_complete(root, cls):
        return
    with download_lock(root, cls.base_folder):
        if not cifar_complete(root, cls):
            download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)


def idx_complete(path: Path) -> bool:
    """An unsigned-byte IDX file exactly as long as its header says.

    torchvision trusts Fashion-MNIST's decompressed files if they merely exist, and writes
    them in place: a crash mid-write leaves a short file that it would never replace.
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            dims = f.read(4 * magic[3]) if len(magic) == 4 else b""
    except OSError:
        return False
    if len(magic) != 4 or magic[:3] != b"\0\0\x08" or len(dims) != 4 * magic[3]:
        return False
    shape = [int.from_bytes(dims[i : i + 4], "big") for i in range(0, len(dims), 4)]
    return path.stat().st_size == len(magic) + len(dims) + math.prod(shape)


def fetch_fashion_mnist(root: Path) -> None:
    """Fashion-MNIST's four files into ``<root>/FashionMNIST/raw``, once per host.

    Short files are removed under the lock so torchvision decompresses them again from its
    md5-checked ``.gz`` files (downloading those only if they are missing or partial).
    """
    raw = root / "FashionMNIST" / "raw"
    if all(idx_complete(raw / name) for name in FASHION_MNIST_FILES):
        return
    with download_lock(root, "FashionMNIST"):
        for name in FASHION_MNIST_FILES:
            if not idx_complete(raw / name):
                (raw / name).unlink(missing_ok=True)
        datasets.FashionMNIST(root, train=False, download=True)  # fetches all four files
