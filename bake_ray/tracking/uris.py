"""Where the MLflow tracking store is: URI resolution, reachability checks before any
training, the hints and links that open the UI (through the head's tunnel on a cluster),
and the runs-table view a search stores. Used by every command before a run exists, so it
imports neither MLflow nor Ray, and is tested without a server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bake_ray.core.config import BAKE_ALIASES  # short param names: T, omega, lambda, tau
from bake_ray.tracking.names import TAG_ROLE, TAG_SEARCH_ID, clean_key

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
DEFAULT_DB_NAME = "mlflow.db"

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
