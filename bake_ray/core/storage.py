"""Where bake-ray keeps what outlives a process: a local folder or an object store URI.

A search's checkpoints, record, ASHA state, best config and summary all live under
``--storage``: ``./ray_results`` here, ``s3://bucket/prefix`` on a cluster. pyarrow's
filesystems read the standard cloud settings (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_DEFAULT_REGION``, an instance profile on EC2), the same ones Ray Tune and Ray Train
use for their own uploads, so one set of variables serves every writer.

No Ray, no MLflow: commands read stored files before Ray starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs


def is_remote(location: str | Path) -> bool:
    """True for a URI (``s3://``, ``gs://``, ...), False for a local path."""
    return "://" in str(location) and not str(location).startswith("file://")


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a local path or a URI alike."""
    return "/".join([str(location).rstrip("/"), *parts])


def filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path or a URI (s3://, gs://, file://)."""
    if "://" in uri:
        return pyarrow.fs.FileSystem.from_uri(uri)
    return pyarrow.fs.LocalFileSystem(), uri


def resolve_storage(arg: str | None) -> str:
    """Where searches and comparisons keep their experiments: ``--storage``, else
    ``$BAKE_RAY_STORAGE``, else ``./ray_results``; a local path is made absolute."""
    storage = arg or os.environ.get("BAKE_RAY_STORAGE") or "ray_results"
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def read_text(uri: str) -> str | None:
    """The text of a file, or None when it does not exist or cannot be read."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as handle:
            return handle.read().decode()
    except (OSError, FileNotFoundError):
        return None


def write_text(uri: str, text: str) -> None:
    """Write a small file (written whole, then renamed, where the filesystem allows)."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        partial = f"{path}.partial"
        with fs.open_output_stream(partial) as handle:
            handle.write(text.encode())
        fs.move(partial, path)
        return
    with fs.open_output_stream(path) as handle:
        handle.write(text.encode())
