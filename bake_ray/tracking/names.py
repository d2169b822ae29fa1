"""What bake-ray's MLflow runs hold, by name: the tags it sets, MLflow's size limits, the
per-epoch metrics a run keeps, and how a resolved config becomes params. Kept apart from
the writers (:mod:`bake_ray.tracking.search_runs`, :mod:`bake_ray.tracking.train_run`) so
that the commands and tests can name them without importing MLflow.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any, Literal

from bake_ray.core.config import BAKE_ALIASES  # short param names: T, omega, lambda, tau

TAG_SEARCH_ID = "bake_ray.search_id"
TAG_TRIAL_ID = "bake_ray.trial_id"
TAG_ROLE = "bake_ray.role"
TAG_ERROR = "bake_ray.error"
TAG_INCOMPLETE = "bake_ray.incomplete"
TAG_PARAM_CONFLICTS = "bake_ray.param_conflicts"
TAG_ORPHANED = "bake_ray.orphaned"
TAG_STOPPED_EARLY = "bake_ray.stopped_early"  # a FINISHED run the scheduler stopped early
TAG_EPOCHS_RUN = "bake_ray.epochs_run"
TAG_INTERRUPTED = "bake_ray.interrupted"  # why a run is KILLED, and the command that resumes it
ORPHANED_REASON = (
    "the search driver stopped after this trial started but before Ray Tune recorded it; "
    "the resumed search replaced it with a new trial"
)
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"  # a run's description in the MLflow UI
TAG_RUN_NAME = "mlflow.runName"
ROLE_SEARCH = "search"
ROLE_TRIAL = "trial"

# MLflow's server-side limits (mlflow/utils/validation.py in 3.17).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_ERROR_CHARS = 4000


# The per-epoch metrics a trial's run holds: what the engine reports each epoch (its
# train, validation and test numbers), the divergence flag, and the Wilson interval of the
# best validation accuracy that a search adds. Anything else in a result (Ray's own
# keys, config values) is not a metric of the model and is not logged.
EPOCH_METRICS = (
    "epoch", "train_loss", "train_ce", "train_kd", "train_acc", "images_per_s", "epoch_time_s",
    "lr", "val_acc", "val_loss", "val_n", "val_loss_at_best_val", "test_acc", "test_loss",
    "best_val_acc", "best_epoch", "test_acc_at_best_val", "train_time_s", "diverged",
    "best_val_acc_lo", "best_val_acc_hi",
)  # fmt: skip

RunStatus = Literal["FINISHED", "KILLED", "FAILED"]
END_STATUSES = ("FINISHED", "KILLED", "FAILED")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.:/@+=, -]+$")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


# --------------------------------------------------------------------------- params, metrics


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys (``{"bake": {"omega": .5}}`` -> ``{"bake.omega": .5}``)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def clean_key(key: str) -> str:
    """MLflow accepts letters, digits, ``_ - . /`` and spaces in names, up to 250 chars."""
    return _BAD_KEY_CHARS.sub("_", key)[:MAX_KEY]


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps([_readable(v) for v in value], default=str)
    return str(_readable(value))


def _readable(value: Any) -> Any:
    """A float rounded to 4 significant digits (4.0 stays 4.0, 1e-06 stays 1e-06)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.4g}")
    return value


def config_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Every resolved config value as an MLflow param, each once, floats to 4 significant
    digits (an Optuna sample such as 3.847291038 reads as 3.847; best_config.yaml keeps
    every digit). BAKE's three hyperparameters go by the paper's names ``T``, ``omega`` and
    ``lambda`` instead of their config paths.

    Values are cut to MLflow's length limit so a long value never makes the batch fail.
    """
    flat = {
        clean_key(BAKE_ALIASES.get(k, k)): _param_text(v) for k, v in flatten_config(config).items()
    }
    return {k: truncate(v, MAX_PARAM_VALUE) for k, v in flat.items()}


def epoch_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The :data:`EPOCH_METRICS` of one epoch's result that are numbers (booleans are not)."""
    return {
        key: float(value)
        for key in EPOCH_METRICS
        if isinstance(value := result.get(key), (int, float)) and not isinstance(value, bool)
    }


def numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``values`` that are numbers, under MLflow-safe names."""
    return {
        clean_key(k): float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def limit_http_retries() -> None:
    """Shorten MLflow's own HTTP retries (default: 7 retries, ~4 minutes per failed call):
    a write that fails is not retried by bake-ray either, it is re-synced from Tune's stored
    results later, so a long blocking retry would only stall the Tune driver. Values set by
    the user in the environment win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def check_id(name: str, value: str) -> None:
    """Ids are quoted into MLflow search filters, so they must not contain quotes."""
    if not value or not _SAFE_ID.match(value):
        raise ValueError(f"{name} {value!r} must be non-empty, without quotes or backticks")


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
