"""A tiny CIFAR-100 archive, a slow local HTTP server for it, and a racing loader process.

torchvision downloads from the URL and checks the md5 sums stored as class attributes of
``CIFAR100``; pointing those at the test's archive is the only way to redirect it. The
server sends the archive in small chunks with short sleeps so that processes started
together really overlap, and counts how many times the whole archive was sent.

Run as a script (``python download_helpers.py SPEC ROOT READY GO``) it is one racer: it
imports everything, says it is ready, waits for the go file, then loads the data through
bake-ray's own :func:`bake_ray.core.data.build_splits` and prints a digest of what it saw.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import pickle
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FOLDER = "cifar-100-python"
ARCHIVE = "cifar-100-python.tar.gz"
CHUNK_BYTES = 4096
CHUNK_PAUSE_S = 0.02  # ~110 kB archive: about half a second per transfer
GO_WAIT_S = 600.0


@dataclass(frozen=True)
class FakeCifar:
    """The archive's bytes, the md5 sums torchvision must be told, and the expected digest."""

    archive: bytes
    md5: dict[str, str]
    digest: str

    def spec(self, url: str) -> dict[str, Any]:
        return {"url": url, "md5": self.md5}


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def data_digest(train: np.ndarray, train_y: list[int], test: np.ndarray, test_y: list[int]) -> str:
    """One hash of the images (HWC uint8, as torchvision holds them) and labels of both sets."""
    h = hashlib.sha256()
    for images, labels in ((train, train_y), (test, test_y)):
        h.update(np.ascontiguousarray(images).tobytes())
        h.update(json.dumps([int(y) for y in labels]).encode())
    return h.hexdigest()


def make_fake_cifar100(work: Path, n_train: int = 24, n_test: int = 12) -> FakeCifar:
    """Random images in CIFAR-100's pickle layout, packed as torchvision expects."""
    rng = np.random.default_rng(0)
    rows = {
        n: rng.integers(0, 256, (k, 3072), dtype=np.uint8)
        for n, k in (("train", n_train), ("test", n_test))
    }
    labels = {n: [int(y) for y in rng.integers(0, 100, len(r))] for n, r in rows.items()}
    files = {n: pickle.dumps({"data": rows[n], "fine_labels": labels[n]}) for n in rows}
    files["meta"] = pickle.dumps({"fine_label_names": [f"class{c}" for c in range(100)]})
    (work / FOLDER).mkdir(parents=True)
    for name, blob in files.items():
        (work / FOLDER / name).write_bytes(blob)
    with tarfile.open(work / ARCHIVE, "w:gz") as tar:
        tar.add(work / FOLDER, arcname=FOLDER)
    archive = (work / ARCHIVE).read_bytes()
    hwc = {n: r.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) for n, r in rows.items()}
    md5 = {name: md5_of(blob) for name, blob in files.items()} | {ARCHIVE: md5_of(archive)}
    digest = data_digest(hwc["train"], labels["train"], hwc["test"], labels["test"])
    return FakeCifar(archive, md5, digest)


def point_torchvision_at(spec: dict[str, Any]) -> None:
    """Make torchvision's CIFAR100 download ``spec['url']`` and trust the fake files' md5."""
    from torchvision import datasets

    cls, md5 = datasets.CIFAR100, spec["md5"]
    cls.url, cls.tgz_md5 = spec["url"], md5[ARCHIVE]
    cls.train_list, cls.test_list = [["train", md5["train"]]], [["test", md5["test"]]]
    cls.meta = {**cls.meta, "md5": md5["meta"]}


@dataclass
class SlowServer:
    """Counts archive requests (``started``) and archives sent to the end (``completed``);
    torchvision opens the URL once more to follow redirects and closes it unread."""

    url: str
    started: int = 0
    completed: int = 0
    active: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    def add(self, what: str, step: int = 1) -> None:
        with self.changed:
            setattr(self, what, getattr(self, what) + step)
            self.changed.notify_all()

    def settled(self, timeout_s: float = 60.0) -> SlowServer:
        """Itself once no request is being served (a client may return before the server
        has finished counting its transfer)."""
        with self.changed:
            assert self.changed.wait_for(lambda: self.active == 0, timeout_s), "server busy"
        return self


@contextlib.contextmanager
def serve_slowly(archive: bytes) -> Iterator[SlowServer]:
    """An HTTP server on 127.0.0.1 (a free port) sending ``archive`` at /ARCHIVE, slowly."""
    state = SlowServer(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != f"/{ARCHIVE}":
                self.send_error(404)
                return
            state.add("started")
            state.add("active")
            try:
                self._send()
            finally:
                state.add("active", -1)

        def _send(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(archive)))
            self.end_headers()
            try:
                for start in range(0, len(archive), CHUNK_BYTES):
                    self.wfile.write(archive[start : start + CHUNK_BYTES])
                    self.wfile.flush()
                    time.sleep(CHUNK_PAUSE_S)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client stopped reading: not a download
            state.add("completed")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/{ARCHIVE}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def splits_digest(splits: Any) -> str:
    """The digest of what bake-ray loaded: the whole train pool and the test set."""
    pool, test = splits.train.dataset, splits.test.dataset
    return data_digest(pool.data, pool.targets, test.data, test.targets)


def _race(spec_path: str, root: str, ready: str, go: str) -> None:
    point_torchvision_at(json.loads(Path(spec_path).read_text()))
    from bake_ray.core.config import DataConfig
    from bake_ray.core.data import build_splits

    cfg = DataConfig(
        dataset="cifar100", data_dir=root, download=True, batch_size=4, val_fraction=0.25
    )
    Path(ready).touch()
    deadline = time.monotonic() + GO_WAIT_S
    while not Path(go).exists():
        if time.monotonic() > deadline:
            sys.exit("no go file")
        time.sleep(0.002)
    print(json.dumps({"digest": splits_digest(build_splits(cfg, seed=0))}))


if __name__ == "__main__":
    _race(*sys.argv[1:5])
