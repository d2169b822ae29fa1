"""MLflow tracking for bake-ray: every line of MLflow code in the project lives here.

Why this module exists instead of Ray's ``MLflowLoggerCallback``: that callback logs noise
keys, opens a second run for a resumed trial and leaves the first RUNNING. Here one driver
process owns all writes through an explicit ``MlflowClient`` (no fluent, global active run),
and every write is idempotent, so a resumed search reopens its runs instead of duplicating
them. Writes that fail because the server is briefly unreachable are buffered and retried,
so tracking never crashes training.

This module must not import Ray: it is used by the CLI before Ray starts and is tested alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
DEFAULT_DB_NAME = "mlflow.db"

TAG_SEARCH_ID = "bake_ray.search_id"
TAG_TRIAL_ID = "bake_ray.trial_id"
TAG_ROLE = "bake_ray.role"
TAG_ERROR = "bake_ray.error"
TAG_INCOMPLETE = "bake_ray.incomplete"
TAG_PARAM_CONFLICTS = "bake_ray.param_conflicts"
TAG_ORPHANED = "bake_ray.orphaned"
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

# Keys Ray Tune adds to every result that say nothing about the model.
NOISE_KEYS = frozenset({
    "pid", "hostname", "node_ip", "timestamp", "date", "training_iteration", "trial_id",
    "done", "iterations_since_restore", "experiment_id", "experiment_tag", "timesteps_total",
    "timesteps_since_restore", "episodes_total", "checkpoint_dir_name", "should_checkpoint",
    "warmup_time", "config",
})  # fmt: skip
NOISE_PREFIXES = ("time_", "config/", "config.")

RunStatus = Literal["FINISHED", "KILLED", "FAILED"]
_END_STATUSES = ("FINISHED", "KILLED", "FAILED")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.:/@+=, -]+$")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


class TrackingError(RuntimeError):
    """Tracking is misconfigured or unreachable; the CLI turns it into exit code 2."""


# --------------------------------------------------------------------------- URIs


def _is_http(uri: str) -> bool:
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
    if _is_http(uri):
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
            if not _is_http(uri) or time.monotonic() + interval_s > deadline:
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
    if on_cluster and _is_http(uri):
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


def _clean_key(key: str) -> str:
    """MLflow accepts letters, digits, ``_ - . /`` and spaces in names, up to 250 chars."""
    return _BAD_KEY_CHARS.sub("_", key)[:MAX_KEY]


def _truncate(text: str, limit: int) -> str:
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
        _clean_key(BAKE_ALIASES.get(k, k)): _param_text(v)
        for k, v in flatten_config(config).items()
    }
    return {k: _truncate(v, MAX_PARAM_VALUE) for k, v in flat.items()}


def _is_noise(key: str) -> bool:
    return key in NOISE_KEYS or key.startswith(NOISE_PREFIXES)


def filter_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Keep the numeric, model-related entries of a result dict (e.g. a Ray Tune result).

    Drops Tune's bookkeeping (pid, hostname, time_*, config/*, training_iteration, ...),
    booleans and non-numbers; nested dicts are flattened with ``/`` first.
    """
    metrics: dict[str, float] = {}
    for key, value in _flatten_slash(result).items():
        if _is_noise(key) or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metrics[_clean_key(key)] = float(value)
    return metrics


def _flatten_slash(result: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and key != "config":
            flat.update(_flatten_slash(value, prefix=f"{name}/"))
        else:
            flat[name] = value
    return flat


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _is_transient(err: BaseException) -> bool:
    """Worth retrying later: connection problems and server-side (5xx, 429) errors.

    Anything else (a 4xx MlflowException, a missing local file, a bug) would fail the same
    way again, so that write is dropped instead of blocking every write queued behind it.
    """
    if isinstance(err, MlflowException):
        code = err.get_http_status_code()
        return code >= 500 or code == 429
    return isinstance(err, (ConnectionError, TimeoutError, requests.RequestException))


def _limit_http_retries() -> None:
    """Shorten MLflow's own HTTP retries (default: 7 retries, ~4 minutes per failed call).

    Long blocking retries would stall the Tune driver; this module buffers and retries
    instead. Values set by the user in the environment win.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


# --------------------------------------------------------------------------- tracker


@dataclass
class _RunRef:
    """A run that may not exist on the server yet (its creation can sit in the buffer)."""

    label: str
    run_id: str | None = None


@dataclass
class _Op:
    ref: _RunRef
    what: str
    fn: Callable[[], None]
    failures: int = 0


@dataclass
class CloseReport:
    """What close_all could not write; ``ok`` is False when some data never reached MLflow."""

    pending_ops: int = 0
    incomplete_runs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.pending_ops == 0 and not self.incomplete_runs


class SearchTracker:
    """One parent run per search, one nested child run per trial, written from one process.

    Idempotent: the parent is found again by tag ``bake_ray.search_id``, children by
    ``bake_ray.trial_id`` under it; params already present are skipped; metric steps at or
    below the last step in a run's history are not logged again. Writes that fail on a
    transient error are buffered (FIFO) and retried on the next call and at close.
    """

    def __init__(
        self,
        experiment_name: str,
        search_id: str,
        tracking_uri: str | None = None,
        *,
        run_name: str | None = None,
        artifact_location: str | None = None,
        tags: Mapping[str, str] | None = None,
        retry_interval_s: float = 10.0,
        max_buffered: int = 10_000,
        close_retries: int = 3,
        close_retry_wait_s: float = 2.0,
    ) -> None:
        _check_id("search_id", search_id)
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        if _is_http(self.tracking_uri):
            _limit_http_retries()
        self.search_id = search_id
        self.retry_interval_s = retry_interval_s
        self.max_buffered = max_buffered
        self.close_retries = close_retries
        self.close_retry_wait_s = close_retry_wait_s
        self._lock = threading.RLock()
        self._buffer: deque[_Op] = deque()
        self._next_retry_at = 0.0
        self._incomplete: set[str] = set()  # labels of runs that lost data
        self._last_step: dict[tuple[str, str], int] = {}  # (run_id, metric) -> last step
        self._params: dict[str, dict[str, str]] = {}  # run_id -> params already logged
        self._trials: dict[str, _RunRef] = {}
        self._open: set[str] = set()  # labels of runs this tracker must end
        self._children: dict[str, str] = {}  # trial_id -> run_id found on the server
        self._temp_dirs: list[Path] = []  # removed by close_all, uploaded or not
        self.reopened = False  # True when the parent run of this search already existed
        try:
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            self.experiment_id = self._experiment(experiment_name, artifact_location)
            self.parent = self._open_parent(run_name or search_id, dict(tags or {}))
        except (MlflowException, OSError) as err:
            raise TrackingError(f"MLflow at {self.tracking_uri}: {_first_line(err)}") from None

    # ------------------------------------------------------------------ setup (must work)

    @property
    def parent_run_id(self) -> str:
        assert self.parent.run_id is not None
        return self.parent.run_id

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage != "active":
                raise TrackingError(f"experiment {name!r} is deleted; restore it or rename")
            return found.experiment_id
        location = artifact_location or default_artifact_location(self.tracking_uri, name)
        return self.client.create_experiment(name, artifact_location=location)

    def _open_parent(self, run_name: str, tags: dict[str, str]) -> _RunRef:
        """Find the search's parent run by tag and reopen it, or create it."""
        query = f"tags.`{TAG_SEARCH_ID}` = '{self.search_id}' and tags.`{TAG_ROLE}` = 'search'"
        runs = self.client.search_runs(
            [self.experiment_id], query, max_results=2, order_by=["attributes.start_time ASC"]
        )
        self.reopened = bool(runs)
        if runs:
            run = runs[0]
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            if TAG_INTERRUPTED in run.data.tags:  # it is running again
                self.client.delete_tag(run.info.run_id, TAG_INTERRUPTED)
            self._remember_run(run)
            self._children = self._find_children(run.info.run_id)
        else:
            all_tags = {**tags, TAG_SEARCH_ID: self.search_id, TAG_ROLE: ROLE_SEARCH}
            run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=run_name)
            self._params[run.info.run_id] = {}
        self._open.add("search")
        return _RunRef("search", run.info.run_id)

    def _find_children(self, parent_id: str) -> dict[str, str]:
        """trial_id -> run_id of the parent's children (the oldest wins if duplicated)."""
        query = f"tags.`{TAG_PARENT}` = '{parent_id}'"
        children: dict[str, str] = {}
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], query, max_results=1000,
                order_by=["attributes.start_time ASC"], page_token=token,
            )  # fmt: skip
            for run in page:
                trial_id = run.data.tags.get(TAG_TRIAL_ID)
                if trial_id is not None:
                    children.setdefault(trial_id, run.info.run_id)
            token = page.token
            if not token:
                return children

    def _remember_run(self, run: Any) -> None:
        """Load what a reopened run already holds, so nothing is logged twice."""
        run_id = run.info.run_id
        self._params[run_id] = dict(run.data.params)
        for key in run.data.metrics:
            steps = [m.step for m in self.client.get_metric_history(run_id, key)]
            if steps:
                self._last_step[(run_id, key)] = max(steps)

    # ------------------------------------------------------------------ buffered writes

    def _submit(self, ref: _RunRef, what: str, fn: Callable[[], None]) -> None:
        """Run a write now, or queue it behind earlier failed writes (order is kept)."""
        with self._lock:
            self._retry_buffer()
            op = _Op(ref, what, fn)
            if self._buffer or not self._try(op):
                self._enqueue(op)

    def _try(self, op: _Op) -> bool:
        """True when the op is done (written, or dropped as hopeless); False: retry later."""
        try:
            op.fn()
            return True
        except Exception as err:
            if _is_transient(err):
                self._next_retry_at = time.monotonic() + self.retry_interval_s
                op.failures += 1
                level = logging.WARNING if op.failures == 1 else logging.DEBUG
                log.log(level, "MLflow write %s buffered: %s", op.what, _first_line(err))
                return False
            self._incomplete.add(op.ref.label)
            log.warning("MLflow write %s dropped: %s", op.what, _first_line(err))
            return True

    def _enqueue(self, op: _Op) -> None:
        if len(self._buffer) >= self.max_buffered:
            dropped = self._buffer.popleft()
            self._incomplete.add(dropped.ref.label)
            log.warning("MLflow buffer full: dropped %s", dropped.what)
        self._buffer.append(op)

    def _retry_buffer(self, force: bool = False) -> None:
        """Replay buffered writes oldest first; stop at the first one that still fails."""
        if not self._buffer or (not force and time.monotonic() < self._next_retry_at):
            return
        while self._buffer:
            if not self._try(self._buffer[0]):
                return
            self._buffer.popleft()

    def flush(self) -> bool:
        """Retry every buffered write now; True when nothing is left in the buffer."""
        with self._lock:
            self._retry_buffer(force=True)
            return not self._buffer

    @property
    def pending(self) -> int:
        """Number of writes waiting in the buffer."""
        return len(self._buffer)

    # ------------------------------------------------------------------ primitive writes

    def _run_id(self, ref: _RunRef) -> str:
        if ref.run_id is None:
            raise MlflowException(f"run {ref.label} was never created", error_code="BAD_REQUEST")
        return ref.run_id

    def _log_params(self, ref: _RunRef, params: Mapping[str, str]) -> None:
        """Log params not yet in the run; a changed value is reported, never raised."""
        run_id = self._run_id(ref)
        known = self._params.setdefault(run_id, {})
        conflicts = sorted(k for k, v in params.items() if k in known and known[k] != v)
        new = [Param(k, v) for k, v in params.items() if k not in known]
        for chunk in _chunks(new, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk, synchronous=True)
            known.update({p.key: p.value for p in chunk})
        if conflicts:
            log.warning(
                "run %s: params changed on resume, kept old values: %s", ref.label, conflicts
            )
            text = _truncate(",".join(conflicts), MAX_TAG_VALUE)
            self.client.set_tag(run_id, TAG_PARAM_CONFLICTS, text, synchronous=True)

    def _log_metrics(
        self, ref: _RunRef, metrics: Mapping[str, float], step: int, at_ms: int | None = None
    ) -> None:
        """Log metrics at ``step``, skipping keys whose history already reaches that step.

        ``at_ms`` is fixed when the write is queued: a retry of a batch the server stored
        but whose reply was lost is then identical, and MLflow drops the duplicate rows.
        """
        run_id = self._run_id(ref)
        now = int(time.time() * 1000) if at_ms is None else at_ms
        fresh = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if step > self._last_step.get((run_id, k), -math.inf)
        ]
        for chunk in _chunks(fresh, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk, synchronous=True)
            for metric in chunk:
                self._last_step[(run_id, metric.key)] = step

    def _set_tags(self, ref: _RunRef, tags: Mapping[str, str]) -> None:
        run_id = self._run_id(ref)
        items = [RunTag(_clean_key(k), _truncate(str(v), MAX_TAG_VALUE)) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk, synchronous=True)

    def _terminate(self, ref: _RunRef, status: RunStatus) -> None:
        self.client.set_terminated(self._run_id(ref), status=status)

    # ------------------------------------------------------------------ trials

    def start_trial(
        self, trial_id: str, config: Mapping[str, Any], run_name: str | None = None
    ) -> None:
        """Open the trial's child run (reused if the trial ran before) and log its config.

        ``config`` may be nested or already dotted; it becomes params like ``bake.omega``
        plus ``T``, ``omega`` and ``lambda``. Starting an ended trial again (a retry after a
        failure) sets its run back to RUNNING.
        """
        with self._lock:
            ref = self._trial(trial_id, run_name)
            params = config_params(config)
            if params:
                self._submit(ref, f"params {ref.label}", lambda: self._log_params(ref, params))

    def _trial(self, trial_id: str, run_name: str | None = None) -> _RunRef:
        """The trial's run, opened (found again, created or reopened) on first use."""
        ref = self._trials.get(trial_id)
        if ref is None:
            _check_id("trial_id", trial_id)
            ref = _RunRef(f"trial {trial_id}")
            self._trials[trial_id] = ref
            name = run_name or trial_id
            self._submit(ref, f"open {ref.label}", lambda: self._open_child(ref, trial_id, name))
        elif ref.label not in self._open:
            self._submit(ref, f"reopen {ref.label}", lambda: self._reopen(self._run_id(ref)))
        self._open.add(ref.label)
        return ref

    def _open_child(self, ref: _RunRef, trial_id: str, run_name: str) -> None:
        existing = self._children.get(trial_id)
        if existing is not None:
            self._remember_run(self._reopen(existing))
            ref.run_id = existing
            return
        tags = {
            TAG_PARENT: self.parent_run_id,
            TAG_SEARCH_ID: self.search_id,
            TAG_TRIAL_ID: trial_id,
            TAG_ROLE: ROLE_TRIAL,
        }
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        self._params[run.info.run_id] = {}
        self._children[trial_id] = run.info.run_id
        ref.run_id = run.info.run_id

    def _reopen(self, run_id: str) -> Any:
        """Set an ended run RUNNING again and clear the error of a previous attempt."""
        run = self.client.get_run(run_id)
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        for tag in (TAG_ERROR, TAG_INTERRUPTED):
            if tag in run.data.tags:
                self.client.delete_tag(run_id, tag)
        return run

    def log_trial_metrics(self, trial_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Log one epoch of a trial (``step=epoch``); noise keys and non-numbers are dropped.

        Re-logging a step the run already has (a resumed trial replaying epochs) is a no-op.
        """
        clean = filter_metrics(metrics)
        step = int(step)
        at_ms = int(time.time() * 1000)
        with self._lock:
            ref = self._trial(trial_id)
            self._submit(
                ref,
                f"metrics {ref.label}@{step}",
                lambda: self._log_metrics(ref, clean, step, at_ms),
            )

    def log_trial_artifacts(
        self, trial_id: str, local_dir: str | Path, artifact_path: str = "checkpoint"
    ) -> None:
        """Upload a directory (the trial's best checkpoint) to the trial's run.

        The directory is read when the write runs: if it is retried later, it must still exist.
        """
        with self._lock:
            ref = self._trial(trial_id)
            self._submit(
                ref,
                f"artifacts {ref.label}",
                lambda: self._upload_dir(ref, local_dir, artifact_path),
            )

    def _upload_dir(self, ref: _RunRef, local_dir: str | Path, artifact_path: str) -> None:
        if not Path(local_dir).is_dir():  # MLflow would silently upload nothing
            raise FileNotFoundError(f"artifact directory {local_dir} does not exist")
        self.client.log_artifacts(self._run_id(ref), str(local_dir), artifact_path)

    def end_trial(
        self, trial_id: str, status: RunStatus = "FINISHED", error: str | None = None
    ) -> None:
        """End a trial's run: FINISHED, KILLED (stopped early by the scheduler) or FAILED.

        ``error`` (for FAILED) is stored, shortened, as tag ``bake_ray.error``.
        """
        _check_status(status)
        with self._lock:
            ref = self._trial(trial_id)
            if error:
                self._submit(
                    ref,
                    f"error {ref.label}",
                    lambda: self._set_tags(ref, {TAG_ERROR: _truncate(error, MAX_ERROR_CHARS)}),
                )
            self._submit(ref, f"end {ref.label}", lambda: self._terminate(ref, status))
            self._open.discard(ref.label)

    def trial_run_id(self, trial_id: str) -> str | None:
        """The MLflow run id of a trial, once its run exists on the server."""
        ref = self._trials.get(trial_id)
        return ref.run_id if ref else self._children.get(trial_id)

    # ------------------------------------------------------------------ the search (parent)

    def log_search_params(self, params: Mapping[str, Any]) -> None:
        """Params of the search itself (space file, budget, scheduler...), flattened."""
        clean = config_params(params)
        self._submit(self.parent, "params search", lambda: self._log_params(self.parent, clean))

    def log_search_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file (space YAML, summary CSV/markdown, plot) to the parent run."""
        self._submit(
            self.parent,
            f"artifact {Path(local_path).name}",
            lambda: self.client.log_artifact(self.parent_run_id, str(local_path), artifact_path),
        )

    def log_best(
        self,
        trial_id: str,
        config: Mapping[str, Any],
        metrics: Mapping[str, Any],
        step: int | None = None,
    ) -> None:
        """Record the best trial on the parent: metrics ``best.<name>``, config as tags.

        The config goes to tags ``best.<key>`` rather than params because MLflow params are
        write-once and the best trial can change when a search is resumed.
        """
        clean = {f"best.{k}": v for k, v in filter_metrics(metrics).items()}
        tags = {f"best.{k}": v for k, v in config_params(config).items()}
        tags["best.trial_id"] = trial_id
        with self._lock:
            self._submit(self.parent, "best tags", lambda: self._set_tags(self.parent, tags))
            self._submit(self.parent, "best metrics", lambda: self._log_best_metrics(clean, step))

    def describe_search(self, description: str, winner_params: Mapping[str, Any]) -> None:
        """The parent's MLflow description (tag ``mlflow.note.content``, shown on its page)
        and the winner's searched values as parent params, under the same names as in the
        trials' runs, so the parent lines up with its children in the runs table."""
        params = config_params(winner_params)
        tags = {TAG_NOTE: description}
        with self._lock:
            self._submit(self.parent, "description", lambda: self._set_tags(self.parent, tags))
            self._submit(
                self.parent, "winner params", lambda: self._log_params(self.parent, params)
            )

    def _log_best_metrics(self, metrics: Mapping[str, float], step: int | None) -> None:
        if step is None:  # one step after the furthest one, so an update is never skipped
            run_id = self.parent_run_id
            step = 1 + max((self._last_step.get((run_id, k), -1) for k in metrics), default=-1)
        self._log_metrics(self.parent, metrics, step)

    def log_study_plots(self, study: optuna.Study, artifact_path: str = "optuna") -> list[str]:
        """Write Optuna's history/importance/parallel-coordinate plots to the parent run.

        Returns the plot file names; skipped plots are explained in ``notes.txt``.
        """
        out_dir = Path(tempfile.mkdtemp(prefix="bake_ray_plots_"))
        self._temp_dirs.append(out_dir)
        try:
            from bake_ray.summary import write_optuna_plots

            written, notes = write_optuna_plots(study, out_dir)
        except Exception as err:  # never crash the search for a plot
            written, notes = [], [f"plots failed: {type(err).__name__}: {err}"]
        for note in notes:
            log.info("optuna plots: %s", note)
        if notes:
            (out_dir / "notes.txt").write_text("\n".join(notes) + "\n")

        def upload() -> None:
            self.client.log_artifacts(self.parent_run_id, str(out_dir), artifact_path)
            shutil.rmtree(out_dir, ignore_errors=True)

        self._submit(self.parent, "optuna plots", upload)
        return [p.name for p in written]

    def compare_url(self, ui_base: str | None = None) -> str:
        """Link to MLflow's compare view of every trial run known to this tracker."""
        base = ui_base or (
            self.tracking_uri if _is_http(self.tracking_uri) else "http://127.0.0.1:5000"
        )
        run_ids = [r for r in {*self._children.values()} if r]
        return compare_runs_url(base, self.experiment_id, run_ids)

    # ------------------------------------------------------------------ closing

    def close_all(self, status: RunStatus = "FINISHED") -> CloseReport:
        """End every run still open (children first, then the parent) and flush the buffer.

        Children left RUNNING by an earlier, crashed driver are ended too. Runs whose writes
        could not be delivered get tag ``bake_ray.incomplete=true`` when the server allows.
        """
        _check_status(status)
        with self._lock:
            for ref in self._trials.values():
                self._end_if_open(ref, status)
            self._submit(self.parent, "end stale trials", lambda: self._end_stale(status))
            self._end_if_open(self.parent, status)
            self._flush_for_close()
            report = self._report()
            for path in self._temp_dirs:  # a write still pending now is lost anyway
                shutil.rmtree(path, ignore_errors=True)
            self._temp_dirs.clear()
            return report

    def mark_interrupted(self, reason: str) -> None:
        """Tag the parent and every trial run still open with ``bake_ray.interrupted``
        (``reason`` says how to resume); ``close_all("KILLED")`` then ends them. A killed
        search must never look FINISHED. Resuming the search removes the tag again."""
        tags = {TAG_INTERRUPTED: reason}
        with self._lock:
            for ref in list(self._trials.values()):
                if ref.label in self._open:
                    self._submit(
                        ref, f"interrupted {ref.label}", lambda r=ref: self._set_tags(r, tags)
                    )
            parent = self.parent
            self._submit(parent, "interrupted search", lambda: self._set_tags(parent, tags))
            self._submit(self.parent, "interrupted stale", lambda: self._tag_running(tags))

    def _tag_running(self, tags: Mapping[str, str]) -> None:
        """Children still RUNNING on the server (left by an earlier driver) get the tag too."""
        query = f"tags.`{TAG_PARENT}` = '{self.parent_run_id}' and attributes.status = 'RUNNING'"
        for run in self.client.search_runs([self.experiment_id], query, max_results=1000):
            for key, value in tags.items():
                self.client.set_tag(run.info.run_id, key, value)

    def end_orphaned_trials(self, known_trial_ids: Iterable[str]) -> None:
        """End KILLED, with tag ``bake_ray.orphaned``, the runs of trials the search no longer has.

        A driver killed between opening a trial's run and Tune saving that trial leaves a
        run that ``--resume`` never continues. Its data stay; it must not look finished.
        """
        known = set(known_trial_ids)
        with self._lock:
            self._submit(self.parent, "end orphaned trials", lambda: self._end_orphans(known))

    def _end_orphans(self, known: set[str]) -> None:
        query = f"tags.`{TAG_PARENT}` = '{self.parent_run_id}'"
        for run in self.client.search_runs([self.experiment_id], query, max_results=1000):
            trial_id = run.data.tags.get(TAG_TRIAL_ID)
            if trial_id is None or trial_id in known:
                continue
            self.client.set_tag(run.info.run_id, TAG_ORPHANED, ORPHANED_REASON)
            self.client.set_terminated(run.info.run_id, status="KILLED")
            self._open.discard(f"trial {trial_id}")

    def _end_if_open(self, ref: _RunRef, status: RunStatus) -> None:
        if ref.label in self._open:
            self._submit(ref, f"end {ref.label}", lambda: self._terminate(ref, status))
            self._open.discard(ref.label)

    def _end_stale(self, status: RunStatus) -> None:
        """End children still RUNNING on the server, e.g. left by a driver that crashed."""
        query = f"tags.`{TAG_PARENT}` = '{self.parent_run_id}' and attributes.status = 'RUNNING'"
        for run in self.client.search_runs([self.experiment_id], query, max_results=1000):
            self.client.set_terminated(run.info.run_id, status=status)

    def _flush_for_close(self) -> None:
        for attempt in range(self.close_retries):
            if self.flush():
                return
            if attempt + 1 < self.close_retries:
                time.sleep(self.close_retry_wait_s)

    def _report(self) -> CloseReport:
        lost = {op.ref.label: op.ref for op in self._buffer}
        refs = {ref.label: ref for ref in [self.parent, *self._trials.values()]}
        labels = sorted(set(lost) | self._incomplete)
        for label in labels:
            ref = refs.get(label)
            if ref is not None and ref.run_id is not None:
                try:
                    self.client.set_tag(ref.run_id, TAG_INCOMPLETE, "true", synchronous=True)
                except Exception as err:
                    log.warning("could not tag %s incomplete: %s", label, _first_line(err))
        report = CloseReport(pending_ops=len(self._buffer), incomplete_runs=labels)
        if not report.ok:
            log.warning(
                "MLflow at %s missed %d write(s); incomplete runs: %s",
                self.tracking_uri, report.pending_ops, ", ".join(labels),
            )  # fmt: skip
        return report

    def __enter__(self) -> SearchTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """FINISHED on success, KILLED on Ctrl-C, FAILED on any other exception."""
        if exc_type is None:
            self.close_all("FINISHED")
        else:
            interrupted = issubclass(exc_type, KeyboardInterrupt)
            self.close_all("KILLED" if interrupted else "FAILED")


def _check_id(name: str, value: str) -> None:
    """Ids are quoted into MLflow search filters, so they must not contain quotes."""
    if not value or not _SAFE_ID.match(value):
        raise ValueError(f"{name} {value!r} must be non-empty, without quotes or backticks")


def _check_status(status: str) -> None:
    if status not in _END_STATUSES:
        raise ValueError(f"status must be one of {_END_STATUSES}, got {status!r}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
