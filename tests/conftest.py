"""Shared test setup: real Ray, real MLflow, quiet and fast settings for both."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
from system_packages import pytest_runtest_makereport  # noqa: F401  (the CI skip hook)

# Set before Ray or MLflow are imported anywhere in the test session.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# `python -m bake_ray.train` logs to MLflow (default ./mlflow.db): runs made in the test
# process write to a scratch database instead of the checkout.
if "MLFLOW_TRACKING_URI" not in os.environ:
    _SCRATCH_MLFLOW = tempfile.mkdtemp(prefix="bake_ray_mlflow_")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SCRATCH_MLFLOW}/mlflow.db"
    atexit.register(shutil.rmtree, _SCRATCH_MLFLOW, ignore_errors=True)  # leave /tmp as found


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the session (Ray allows one per host): 2 CPUs, and a
    TRAIN_DRIVER resource for trials that only drive a Ray Train worker group."""
    import ray

    from bake_ray.raystart import init_ray, ray_keeps_its_temp_files

    with ray_keeps_its_temp_files():  # Ray's own pymp-* folders: in Ray's temp dir, not /tmp
        init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------- MLflow server


def _free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` (sqlite backend, proxied artifacts) for the session; yields its URI.

    It runs in its own process group so that its uvicorn worker and job runner end with it.
    """
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner
    log_path = root / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited early:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
