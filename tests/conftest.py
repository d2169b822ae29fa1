"""Shared test setup: real Ray, real MLflow, quiet and fast settings for both."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import servers
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

    from bake_ray.scale.raystart import init_ray, ray_keeps_its_temp_files

    with ray_keeps_its_temp_files():  # Ray's own pymp-* folders: in Ray's temp dir, not /tmp
        init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------- MLflow server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` (sqlite backend, proxied artifacts) for the session: its URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    with servers.mlflow_server(root, str(root / "artifacts")) as uri:
        yield uri
