"""Real servers for the tests, each in its own process group on 127.0.0.1: an MLflow
tracking server (sqlite backend, artifacts proxied to a folder or a bucket) and moto's S3
server, which stands in for AWS S3 and is reached only through the standard AWS variables.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serving(cmd: list[str], health_url: str, log_path: Path, env: Mapping[str, str],
            timeout_s: float = 120) -> Iterator[None]:
    """Run ``cmd`` until the block ends, once ``health_url`` answers 200; stop its whole
    process group by pid afterwards (uvicorn workers included)."""
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=log_path.parent, env=dict(env), stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers(health_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{cmd[2]} did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.25)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def mlflow_server(root: Path, artifacts: str, env: Mapping[str, str] | None = None
                  ) -> Iterator[str]:
    """``mlflow server`` as cluster.yaml runs it on the head (sqlite backend store, artifacts
    proxied to ``artifacts``: a folder, or ``s3://...`` under ``env``'s AWS settings);
    yields its URI."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", artifacts,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    uri = f"http://127.0.0.1:{port}"
    with serving(cmd, f"{uri}/health", root / "server.log", env):
        yield uri


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point every client (boto3, pyarrow, MLflow, Ray's
    uploads) at ``endpoint``; nothing bake-ray-specific. The instance metadata service is
    off: with keys in the environment nothing needs it, and it is not on loopback."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextlib.contextmanager
def moto_server(root: Path) -> Iterator[dict[str, str]]:
    """moto's AWS emulator (S3, EC2, IAM, ...) on 127.0.0.1; yields the AWS variables that
    reach it."""
    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    endpoint = f"http://127.0.0.1:{port}"
    with serving(cmd, f"{endpoint}/moto-api/", root / "moto.log", os.environ):
        yield aws_env(endpoint)
