"""A run's best checkpoint as an MLflow model, registered under the experiment's name.

**Format: the PyTorch flavor, exported with ``torch.export`` (MLflow's ``pt2``), not a
``PythonModel`` wrapper.** A pyfunc wrapper's class must be importable where the model is
loaded (bake-ray installed, or its code shipped with ``code_paths`` and kept compatible);
a pickled ``nn.Module`` has the same need and MLflow refuses to unpickle it by default.
An exported program is a graph of torch operations with its weights, pickle-free: loading
and serving need MLflow and torch only. The graph is :class:`bake_ray.core.serving.ServedModel`:
the dataset's eval transform (scale, channels, normalise), the network and a softmax, so
``mlflow.pyfunc.load_model(uri).predict(raw_images)`` gives class probabilities
``[batch, classes]`` and ``mlflow.pytorch.load_model(uri)`` the same as a torch module.
The batch dimension is dynamic; the signature holds the raw image shape and dtype.

**Registry.** Each logged model becomes a new version of the registered model named after
the run's MLflow experiment (a search's ``<space name>``, a train's ``train-<dataset>``).
A search moves the alias ``champion`` to its winner; ``train`` registers without moving
it: a single training run was selected against nothing, and an ad-hoc run must not replace
the model that is served; the line it prints says how to promote it. A store without a
registry gets one line and keeps the model on the run. Any other failure is one warning:
a model is never a reason to fail a search or a training run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bake_ray import tracking
from bake_ray.core import checkpoint as ckpt
from bake_ray.core import serving
from bake_ray.core.config import Config
from bake_ray.tracking.search_runs import SearchTracker

log = logging.getLogger("bake_ray.tracking")

ALIAS = "champion"
MODEL_NAME = "model"  # the logged model's name on its run
EXAMPLE_ROWS = 2  # > 1, so that torch.export keeps the batch dimension dynamic
_NO_REGISTRY_CODES = ("FEATURE_DISABLED", "ENDPOINT_NOT_FOUND", "NOT_IMPLEMENTED")
_NO_REGISTRY_TEXTS = ("registry functionality is unavailable", "Registry features are not")


def publish(
    uri: str,
    run_id: str,
    checkpoint_file: Path,
    config: Config,
    name: str,
    *,
    register: bool,
    champion: bool,
    tags: Mapping[str, str] | None = None,
) -> str | None:
    """Log, register and (``champion``) alias the model; print and return the line that
    says what happened, or warn once and return None. Never raises."""
    try:
        line = _publish(uri, run_id, checkpoint_file, config, name, register, champion, tags)
    except Exception as err:  # the run's result stands without its model
        log.warning("MLflow model of run %s not logged: %s", run_id, tracking.first_line(err))
        return None
    print(line, flush=True)
    return line


def publish_search_winner(
    tracker: SearchTracker, trial_id: str, config: Config, register: bool
) -> str | None:
    """The search's winner: its trial run's ``checkpoint/`` artifact (uploaded when the
    trial ended) as a model on that run, registered under the experiment's name, alias
    ``champion`` moved to it."""
    client, search_id = tracker.client, tracker.search_id
    # MLflow draws a progress bar for every download: noise between the table and the
    # winner's lines. A user who sets the variable keeps their choice.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tags = {tracking.TAG_SEARCH_ID: search_id, tracking.TAG_TRIAL_ID: trial_id}
    scratch = tempfile.mkdtemp(prefix="bake_ray_model_")
    try:
        try:
            experiment = client.get_experiment(tracker.experiment_id).name
            run_id = _trial_run_id(client, tracker.experiment_id, search_id, trial_id)
            local = client.download_artifacts(run_id, f"checkpoint/{ckpt.CHECKPOINT_FILE}", scratch)
        except Exception as err:
            log.warning("MLflow model of the winner not logged: %s", tracking.first_line(err))
            return None
        return publish(tracker.tracking_uri, run_id, Path(local), config, experiment,
                       register=register, champion=True, tags=tags)  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _trial_run_id(client: MlflowClient, experiment_id: str, search_id: str, trial_id: str) -> str:
    query = (
        f"tags.`{tracking.TAG_SEARCH_ID}` = '{search_id}' "
        f"and tags.`{tracking.TAG_TRIAL_ID}` = '{trial_id}'"
    )
    runs = client.search_runs([experiment_id], query, max_results=1)
    if not runs:
        raise LookupError(f"no MLflow run of trial {trial_id}")
    return runs[0].info.run_id


def _publish(
    uri: str, run_id: str, checkpoint_file: Path, config: Config, name: str,
    register: bool, champion: bool, tags: Mapping[str, str] | None,
) -> str:  # fmt: skip
    client = MlflowClient(uri)
    model_uri = _existing_model(client, run_id) or _log(uri, run_id, checkpoint_file, config)
    if not register:
        return f"MLflow model: logged on run {run_id} as {model_uri}; registration is off"
    try:
        version = _version_of(client, name, run_id) or _register(
            client, model_uri, name, run_id, tags
        )
    except MlflowException as err:
        if not _no_registry(err):
            raise
        return (
            f"MLflow model: the tracking store at {uri} has no model registry; the model is "
            f"logged on run {run_id} as {model_uri}, not registered"
        )
    load = f'mlflow.pyfunc.load_model("models:/{name}@{ALIAS}")'
    if champion:
        client.set_registered_model_alias(name, ALIAS, version)
        return f"MLflow model: {name} version {version}, alias {ALIAS}; load it: {load}"
    promote = f'MlflowClient("{uri}").set_registered_model_alias("{name}", "{ALIAS}", "{version}")'
    return f"MLflow model: {name} version {version} ({ALIAS} not moved; promote it: {promote})"


def _log(uri: str, run_id: str, checkpoint_file: Path, config: Config) -> str:
    """Export and log the served model on the run (step = the checkpoint's epoch, which
    links that epoch's metrics to the model); returns its ``models:/`` URI."""
    import mlflow.pytorch
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    state = ckpt.load(checkpoint_file)
    model, form = serving.served_model(state["model"], config)
    example = _example(config, form)
    with torch.no_grad():
        classes = int(model(torch.from_numpy(example)).shape[1])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(form.dtype, (-1, *form.shape))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]),
    )
    with _tracking_uri(uri):
        info = mlflow.pytorch.log_model(
            model, name=MODEL_NAME, run_id=run_id, signature=signature, input_example=example,
            serialization_format="pt2", pip_requirements=_requirements(),
            step=int(state["epoch"]), await_registration_for=0,
        )  # fmt: skip
    return info.model_uri


def _example(config: Config, form: serving.RawForm) -> np.ndarray:
    """A few real test images where the raw test split has one shape, else zeros."""
    if config.data.dataset != "imagefolder":
        with contextlib.suppress(Exception):
            return serving.raw_test_split(config.data)[0][:EXAMPLE_ROWS].astype(form.dtype)
    return np.zeros((EXAMPLE_ROWS, *form.shape), dtype=form.dtype)


def _requirements() -> list[str]:
    """What loading needs, pinned to what exported it (no inference run in a subprocess)."""
    import torch

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
    ]


def _existing_model(client: MlflowClient, run_id: str) -> str | None:
    """The model this run already holds (a finish repeated after a crash logs no second)."""
    outputs = client.get_run(run_id).outputs
    models = [] if outputs is None else outputs.model_outputs
    return f"models:/{models[-1].model_id}" if models else None


def _version_of(client: MlflowClient, name: str, run_id: str) -> str | None:
    """The version already registered from this run, if any."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return str(max(int(v.version) for v in found)) if found else None


def _register(
    client: MlflowClient, model_uri: str, name: str, run_id: str, tags: Mapping[str, str] | None
) -> str:
    """A new version of ``name`` (created if new) from the logged model, through the
    explicit client (MLflow's fluent ``register_model`` reads the global URI and prints)."""
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = model_uri.removeprefix("models:/")
    version = client.create_model_version(
        name, source=model_uri, run_id=run_id, tags=dict(tags or {}), await_creation_for=0,
        model_id=model_id,
    )  # fmt: skip
    return str(version.version)


def _no_registry(err: MlflowException) -> bool:
    """The store has no model registry (as opposed to a registry refusing a write)."""
    text = str(err)
    return err.error_code in _NO_REGISTRY_CODES or any(t in text for t in _NO_REGISTRY_TEXTS)


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent model logging reads the global tracking URI (and sets the
    environment variable): set it for the call, then put both back."""
    before, env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env
