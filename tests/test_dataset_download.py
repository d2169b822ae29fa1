"""First download of a torchvision dataset on a host: once, complete, whatever raced or crashed.

A ``gpu8`` node starts eight trials together with ``data.download=true`` (search_spaces/
cifar100.yaml). Here real processes race through bake-ray's own ``build_splits`` against a
slow local server of a tiny CIFAR-100 archive (tests/download_helpers.py), and the states a
crashed download leaves behind are loaded again.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from download_helpers import (
    ARCHIVE,
    FOLDER,
    FakeCifar,
    make_fake_cifar100,
    md5_of,
    point_torchvision_at,
    serve_slowly,
    splits_digest,
)
from torchvision import datasets

from bake_ray.core import datafiles
from bake_ray.core.config import DataConfig
from bake_ray.core.data import build_splits
from bake_ray.core.fetch import idx_complete

HELPER = Path(__file__).with_name("download_helpers.py")
REPO = Path(__file__).resolve().parents[1]
RACERS = 4
READY_WAIT_S = 300.0
RUN_WAIT_S = 300.0


def _assert_root_complete(root: Path, fake: FakeCifar) -> None:
    """Exactly the archive and the three extracted files, all complete (and the lock file,
    which filelock may leave behind or remove)."""
    found = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    wanted = {ARCHIVE} | {f"{FOLDER}/{n}" for n in ("train", "test", "meta")}
    assert found - {f".bake_ray-{FOLDER}.lock"} == wanted
    assert md5_of((root / ARCHIVE).read_bytes()) == fake.md5[ARCHIVE]
    for name in ("train", "test", "meta"):
        assert md5_of((root / FOLDER / name).read_bytes()) == fake.md5[name], name


def _start_racers(spec: Path, root: Path, work: Path) -> list[tuple[subprocess.Popen, Path]]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1"
    racers = []
    for i in range(RACERS):
        args = [
            sys.executable,
            str(HELPER),
            str(spec),
            str(root),
            str(work / f"ready{i}"),
            str(work / "go"),
        ]
        log = work / f"racer{i}.err"
        with open(log, "wb") as err:
            racers.append(
                (subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=err), log)
            )
    return racers


def _wait_ready(racers: list[tuple[subprocess.Popen, Path]], work: Path) -> None:
    """Until every racer has imported everything (a dead one fails the test at once)."""
    deadline = time.monotonic() + READY_WAIT_S
    while not all((work / f"ready{i}").exists() for i in range(RACERS)):
        for proc, log in racers:
            assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "racers never got ready"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_racing_processes_download_cifar100_once(tmp_path: Path) -> None:
    fake = make_fake_cifar100(tmp_path / "src")
    root, spec = tmp_path / "data", tmp_path / "spec.json"
    with serve_slowly(fake.archive) as server:
        spec.write_text(json.dumps(fake.spec(server.url)))
        racers = _start_racers(spec, root, tmp_path)
        try:
            _wait_ready(racers, tmp_path)
            (tmp_path / "go").touch()
            results = [
                (proc.communicate(timeout=RUN_WAIT_S)[0], proc.returncode, log)
                for proc, log in racers
            ]
        finally:
            for proc, _ in racers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
    for out, rc, log in results:
        assert rc == 0, log.read_text()[-3000:]
        assert json.loads(out.splitlines()[-1])["digest"] == fake.digest
    assert server.settled().completed == 1, (
        f"{server.completed} whole downloads ({server.started} requests)"
    )
    _assert_root_complete(root, fake)


@pytest.fixture()
def fake_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = make_fake_cifar100(tmp_path / "src")
    with serve_slowly(fake.archive) as server:
        for attr in ("url", "tgz_md5", "train_list", "test_list", "meta"):  # restored after
            monkeypatch.setattr(datasets.CIFAR100, attr, getattr(datasets.CIFAR100, attr))
        point_torchvision_at(fake.spec(server.url))
        yield fake, server, tmp_path / "src" / FOLDER


#: What a killed downloader leaves: file -> "whole" or "short" (its first half, which only
#: an md5 check tells from a whole file), and how many downloads the repair needs.
CRASHES = {
    "archive cut short": ({ARCHIVE: "short"}, 1),
    "archive whole, train whole, test cut short": (
        {ARCHIVE: "whole", "train": "whole", "test": "short"},
        0,
    ),
    "batches whole, meta cut short": (
        {ARCHIVE: "whole", "train": "whole", "test": "whole", "meta": "short"},
        0,
    ),
    "archive and train cut short": ({ARCHIVE: "short", "train": "short"}, 1),
}


@pytest.mark.parametrize("crash", list(CRASHES))
def test_a_crashed_download_is_repaired(fake_cifar, tmp_path: Path, crash: str) -> None:
    """torchvision's own download() skips when the batches pass md5, without checking meta:
    with it alone the third case fails to load ("Dataset metadata file ... corrupted")."""
    fake, server, extracted = fake_cifar
    left, downloads = CRASHES[crash]
    root = tmp_path / "data"
    (root / FOLDER).mkdir(parents=True)
    for name, state in left.items():
        path = root / name if name == ARCHIVE else root / FOLDER / name
        blob = fake.archive if name == ARCHIVE else (extracted / name).read_bytes()
        path.write_bytes(blob if state == "whole" else blob[: len(blob) // 2])
    cfg = DataConfig(
        dataset="cifar100", data_dir=str(root), download=True, batch_size=4, val_fraction=0.25
    )
    assert splits_digest(build_splits(cfg, seed=0)) == fake.digest
    assert server.settled().completed == downloads
    _assert_root_complete(root, fake)


def _idx(shape: tuple[int, ...], fill: int) -> bytes:
    header = bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
    count = 1
    for d in shape:
        count *= d
    return header + bytes([fill % 256]) * count


def test_fashion_mnist_file_cut_short_is_decompressed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision trusts Fashion-MNIST's files if they exist: a crash while it decompressed
    the last one leaves a short file it would load (and fail on) forever."""
    monkeypatch.setenv("BAKE_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datafiles, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    raw = datafiles.default_root() / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    files = {
        "train-images-idx3-ubyte": _idx((8, 28, 28), 7),
        "train-labels-idx1-ubyte": bytes([0, 0, 8, 1, 0, 0, 0, 8, *[i % 10 for i in range(8)]]),
        "t10k-images-idx3-ubyte": _idx((4, 28, 28), 9),
        "t10k-labels-idx1-ubyte": bytes([0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3, 4]),
    }
    resources = []
    for name, blob in files.items():
        packed = gzip.compress(blob)
        (raw / f"{name}.gz").write_bytes(packed)
        (raw / name).write_bytes(blob)
        resources.append((f"{name}.gz", md5_of(packed)))
    last = raw / "t10k-labels-idx1-ubyte"
    last.write_bytes(files[last.name][:-2])
    assert not idx_complete(last) and idx_complete(raw / "t10k-images-idx3-ubyte")
    monkeypatch.setattr(datasets.FashionMNIST, "resources", resources)
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])  # never used
    cfg = DataConfig(dataset="fashion_mnist", download=True, batch_size=4, val_fraction=0.25)
    splits = build_splits(cfg, seed=0)
    assert splits.test.dataset.targets.tolist() == [1, 2, 3, 4]
    assert last.read_bytes() == files[last.name]
