"""MLflow for bake-ray, the parts every command needs before a run exists: where the
tracking store is (URI resolution, reachability, the hints that open it), what a run's
params and metrics are called, and the tags bake-ray sets. Writing runs is
:mod:`bake_ray.mlflow_runs`; the two are apart because this half is used by every CLI
before Ray or a run starts, and is tested without a server.

This module must not import Ray.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
DEFAULT_DB_NAME = "mlflow.db"

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

# Short, easy-to-find names for BAKE's three hyperparameters (config path -> alias).
BAKE_ALIASES = {"bake.temperature": "T", "bake.omega": "omega", "bake.loss_weight": "lambda"}

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


class TrackingError(RuntimeError):
    """Tracking is misconfigured or unreachable; the CLI turns it into exit code 2."""


# --------------------------------------------------------------------------- URIs


def is_http(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI, or None for other URIs and in-memory sqlite."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(raw) if raw and raw != ":memory:" else None


def _absolute_uri(uri: str, cwd: Path) -> str:
    """Make a sqlite path absolute: Tune trials change directory, a relative DB would move."""
    path = _sqlite_path(uri)
    if path is None:
        if "://" not in uri and uri.endswith(".db"):  # a bare path to a database file
            return f"sqlite:///{(cwd / uri).resolve()}"
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else ""
    absolute = f"sqlite:///{(cwd / path).resolve() if not path.is_absolute() else path}"
    return f"{absolute}?{query}" if query else absolute


def resolve_tracking_uri(cli_uri: str | None = None, cwd: Path | None = None) -> str:
    """The tracking URI: the CLI flag, else $MLFLOW_TRACKING_URI, else ./mlflow.db as sqlite.

    The result is always absolute for sqlite, so it means the same file from any directory.
    """
    base = Path.cwd() if cwd is None else Path(cwd)
    uri = cli_uri or os.environ.get(ENV_TRACKING_URI) or DEFAULT_DB_NAME
    return _absolute_uri(uri.strip(), base)


def _safe_dir_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


def default_artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """Where a new experiment stores artifacts: next to a sqlite DB, else the server's choice.

    MLflow's own default for sqlite is ``./mlruns`` relative to whatever the current directory
    is at creation time; an explicit absolute location avoids artifacts scattered by Tune.
    """
    path = _sqlite_path(tracking_uri)
    if path is None:
        return None
    return (path.parent / "mlartifacts" / _safe_dir_name(experiment_name)).as_uri()


def check_tracking_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any training, if runs could not be recorded at ``uri``.

    http(s): the server must answer ``GET /health`` (any answer below 500 counts: a server that
    replies exists). sqlite: the database's directory must exist (it is created) and be
    writable. Other URIs are left to MLflow.
    """
    if is_http(uri):
        _check_http(uri, timeout_s)
        return
    path = _sqlite_path(uri)
    if path is not None:
        _check_sqlite_dir(uri, path)


ENV_TRACKING_WAIT_S = "BAKE_RAY_TRACKING_WAIT_S"
DEFAULT_TRACKING_WAIT_S = 120.0


def tracking_wait_s() -> float:
    """How long a search on a cluster waits for the tracking server ($BAKE_RAY_TRACKING_WAIT_S)."""
    raw = os.environ.get(ENV_TRACKING_WAIT_S, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_TRACKING_WAIT_S
    except ValueError:
        raise TrackingError(f"{ENV_TRACKING_WAIT_S}={raw!r}: expected seconds") from None


def wait_for_tracking(
    uri: str, wait_s: float, say: Callable[[str], None] = print, interval_s: float = 2.0
) -> None:
    """:func:`check_tracking_reachable`, retried for up to ``wait_s`` for an HTTP server
    that does not answer yet (a job submitted right after ``ray up`` starts before the head's
    MLflow server listens). One line says it waits; the last error is raised after."""
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            check_tracking_reachable(uri)
            return
        except TrackingError:
            if not is_http(uri) or time.monotonic() + interval_s > deadline:
                raise
        if not said:
            say(f"waiting up to {wait_s:.0f} s for the MLflow tracking server at {uri}")
            said = True
        time.sleep(interval_s)


def _loopback_port(uri: str) -> int | None:
    """The port of an http(s) URI on this host's loopback, else None."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https") or parsed.hostname not in ("127.0.0.1", "localhost"):
        return None
    return parsed.port or (443 if parsed.scheme == "https" else 80)


def open_hint(uri: str, on_cluster: bool) -> str:
    """How the user opens the MLflow UI of ``uri`` from where they are.

    On a cluster, a server on the head's loopback is reached through SSH (``ray attach
    -p``) and any other server is its own UI; on this machine, ``mlflow ui`` as before.
    """
    port = _loopback_port(uri)
    if on_cluster and port is not None:
        return (
            f"ray attach <your cluster yaml> -p {port} (it keeps a tunnel open), "
            f"then browse http://127.0.0.1:{port}"
        )
    if on_cluster and is_http(uri):
        return f"browse {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def artifact_url(uri: str, run_id: str, path: str) -> str:
    """The server route that returns one artifact file of a run (any artifact store)."""
    query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
    return f"{uri.rstrip('/')}/get-artifact?{query}"


def download_hint(uri: str, run_id: str, artifact_dir: str, local: Path) -> str | None:
    """A ``curl`` line that saves ``artifact_dir/<local.name>`` of a run, through the same
    tunnel as :func:`open_hint`; None when ``uri`` is not a server on the head's loopback."""
    port = _loopback_port(uri)
    if port is None:
        return None
    url = artifact_url(f"http://127.0.0.1:{port}", run_id, f"{artifact_dir}/{local.name}")
    return f"curl -fo {local.name} '{url}' (through that tunnel)"


def _check_http(uri: str, timeout_s: float) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable: {reason}") from None
    if status >= 500:
        raise TrackingError(f"MLflow tracking server {uri} is unhealthy: HTTP {status}")


def _check_sqlite_dir(uri: str, path: Path) -> None:
    if not path.is_absolute():
        raise TrackingError(f"sqlite tracking URI {uri} is relative; use resolve_tracking_uri")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrackingError(f"cannot create the directory of {uri}: {err}") from None
    if not os.access(path.parent, os.W_OK):
        raise TrackingError(f"the directory of {uri} is not writable")
    if path.exists():
        _check_sqlite_file(uri, path)


def _check_sqlite_file(uri: str, path: Path) -> None:
    """An existing path must be an SQLite database: MLflow would otherwise retry for about
    two minutes and end in a long traceback. Opened read-only; nothing is written."""
    import sqlite3

    if not path.is_file():
        raise TrackingError(f"{uri}: {path} is a directory, not an SQLite database file")
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5)
        ) as conn:
            conn.execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error as err:
        raise TrackingError(f"{uri}: {path} is not a usable SQLite database: {err}") from None


def compare_runs_url(ui_base: str, experiment_id: str, run_ids: list[str]) -> str:
    """A link to MLflow's compare view of ``run_ids`` (the UI route of MLflow 3)."""
    runs = urllib.parse.quote(json.dumps(sorted(run_ids)), safe="")
    experiments = urllib.parse.quote(json.dumps([experiment_id]), safe="")
    return f"{ui_base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


# The MLflow UI (3.x) opens its runs table on a saved view when its URL names one
# (``?viewStateShareKey=KEY``): the view is the experiment tag ``mlflow.sharedViewState.KEY``,
# a JSON envelope whose ``state`` holds the search filter, sort and selected columns, the
# same tag the UI's own "Share" button writes. The compare view has no such state.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
# The UI lays an experiment out for model training (runs first), not for GenAI traces.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
VIEW_METRICS = ("best_val_acc", "best_val_acc_lo", "best_val_acc_hi", "test_acc_at_best_val")


def view_key(search_id: str) -> str:
    return "bake-ray-" + re.sub(r"[^A-Za-z0-9_.-]", "_", search_id)


def runs_view(search_id: str, searched_keys: list[str], now_ms: int) -> tuple[str, str]:
    """(tag key, tag value) of the runs-table view of one search's trials: its searched
    params (``T``, ``omega``... as logged) beside the best validation accuracy and its
    interval, best first."""
    params = [clean_key(BAKE_ALIASES.get(k, k)) for k in searched_keys]
    state = {
        "searchFilter": f"tags.`{TAG_SEARCH_ID}` = '{search_id}' and tags.`{TAG_ROLE}` = 'trial'",
        "orderByKey": "metrics.`best_val_acc`",
        "orderByAsc": False,
        "selectedColumns": [f"params.`{k}`" for k in params]
        + [f"metrics.`{m}`" for m in VIEW_METRICS],
    }
    envelope = {
        "name": f"bake-ray {search_id}: searched params vs best_val_acc",
        "createdAt": now_ms,
        "updatedAt": now_ms,
        "state": json.dumps(state),
    }
    return VIEW_TAG_PREFIX + view_key(search_id), json.dumps(envelope)


def runs_view_url(ui_base: str, experiment_id: str, search_id: str) -> str:
    """The link that opens the runs table on :func:`runs_view`."""
    key = urllib.parse.quote(view_key(search_id))
    return f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={key}"


def ui_base(uri: str, on_cluster: bool) -> str:
    """Where the user's browser reaches the MLflow UI of ``uri`` (see :func:`open_hint`)."""
    port = _loopback_port(uri)
    if on_cluster and port is not None:
        return f"http://127.0.0.1:{port}"
    return uri.rstrip("/") if is_http(uri) else "http://127.0.0.1:5000"


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
