"""Writing MLflow runs so that tracking never stops training: each write is tried once,
a failure costs one warning and marks the run for a re-sync, and writes are skipped for a
while after the server is seen away. Params are write-once and metrics are logged only for
the (metric, step) pairs a run lacks, so a repeated write (a lost reply, a resumed search)
logs nothing twice. :class:`bake_ray.tracking.search_runs.SearchTracker` builds a search's
runs on this.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bake_ray import tracking

log = logging.getLogger("bake_ray.tracking")

_CLEARED_ON_REOPEN = (
    tracking.TAG_ERROR,
    tracking.TAG_INTERRUPTED,
    tracking.TAG_STOPPED_EARLY,
    tracking.TAG_EPOCHS_RUN,
)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _is_transient(err: BaseException) -> bool:
    """The server is away or overloaded (as opposed to a write it refuses)."""
    if isinstance(err, MlflowException):
        code = err.get_http_status_code()
        return code >= 500 or code == 429
    return isinstance(err, (ConnectionError, TimeoutError, requests.RequestException))



class RunWriter:
    """One MLflow client and what its runs hold, with the write-once rules above.

    ``quiet_s``: after a write fails because the server is away, live writes are skipped
    for that long (each would wait for its own timeout); re-syncs always try.
    """

    def __init__(self, tracking_uri: str | None, quiet_s: float) -> None:
        self.tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
        if tracking.is_http(self.tracking_uri):
            tracking.limit_http_retries()
        self.quiet_s = quiet_s
        self._quiet_until = 0.0
        self._warned = False  # one warning per outage, not one per failed write
        self._params: dict[str, dict[str, str]] = {}  # run_id -> params it holds
        self._steps: dict[str, dict[str, set[int]]] = {}  # run_id -> metric -> logged steps
        self._unsynced: set[str] = set()  # runs a failed write left behind; a re-sync repairs
        self._lost: set[str] = set()  # runs missing a write that no re-sync repeats
        self.client = MlflowClient(tracking_uri=self.tracking_uri)

    def _reopen(self, run: Any) -> None:
        """A run that runs again: RUNNING, without the end tags of its previous attempt."""
        if run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")
        for tag in _CLEARED_ON_REOPEN:
            if tag in run.data.tags:
                self.client.delete_tag(run.info.run_id, tag)

    def _load(self, run: Any) -> None:
        """Read what a run holds (params, and every step of every metric) from the server."""
        run_id = run.info.run_id
        self._params[run_id] = dict(run.data.params)
        self._steps[run_id] = {
            key: {m.step for m in self.client.get_metric_history(run_id, key)}
            for key in run.data.metrics
        }

    # ------------------------------------------------------------------ one write, once

    def _write(
        self, label: str, what: str, fn: Callable[[], None], repairable: bool, live: bool = True
    ) -> bool:
        """Try a write once. On failure: one warning, the run is remembered as incomplete
        (``repairable``: until a re-sync of it succeeds), and the caller goes on. A ``live``
        write is skipped while the server is known to be away (re-syncs always try)."""
        if live and time.monotonic() < self._quiet_until:
            self._unsynced.add(label)
            return False
        try:
            fn()
        except Exception as err:  # tracking must never stop training
            (self._unsynced if repairable else self._lost).add(label)
            if _is_transient(err):
                self._quiet_until = time.monotonic() + self.quiet_s
            level = logging.DEBUG if self._warned else logging.WARNING
            reason = tracking.first_line(err)
            log.log(level, "MLflow write failed (%s): %s; it is re-synced from Ray Tune's "
                    "stored results when the trial ends", what, reason)  # fmt: skip
            self._warned = True
            return False
        self._warned = False
        return True

    def _log_params(self, run_id: str, label: str, params: Mapping[str, str]) -> None:
        """Log params not yet in the run; a changed value is reported, never raised (MLflow
        params are write-once)."""
        known = self._params.setdefault(run_id, {})
        conflicts = sorted(k for k, v in params.items() if k in known and known[k] != v)
        new = [Param(k, v) for k, v in params.items() if k not in known]
        for chunk in _chunks(new, tracking.MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk, synchronous=True)
            known.update({p.key: p.value for p in chunk})
        if conflicts:
            log.warning("run %s: params changed on resume, kept old values: %s", label, conflicts)
            text = tracking.truncate(",".join(conflicts), tracking.MAX_TAG_VALUE)
            self.client.set_tag(run_id, tracking.TAG_PARAM_CONFLICTS, text, synchronous=True)

    def _log_missing(self, run_id: str, by_step: Mapping[int, Mapping[str, float]]) -> None:
        """Log the (metric, step) pairs the run does not hold yet, in batches."""
        have = self._steps.setdefault(run_id, {})
        now = int(time.time() * 1000)
        fresh = [
            Metric(key, value, now, step)
            for step, metrics in sorted(by_step.items())
            for key, value in metrics.items()
            if step not in have.get(key, ())
        ]
        for chunk in _chunks(fresh, tracking.MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk, synchronous=True)
            for metric in chunk:
                have.setdefault(metric.key, set()).add(metric.step)

    def _set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [
            RunTag(tracking.clean_key(k), tracking.truncate(str(v), tracking.MAX_TAG_VALUE))
            for k, v in tags.items()
        ]
        for chunk in _chunks(items, tracking.MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk, synchronous=True)

    def _end(
        self,
        run_id: str,
        status: tracking.RunStatus,
        error: str | None,
        tags: Mapping[str, Any] | None,
    ) -> None:
        extra = dict(tags or {})
        if error:
            extra[tracking.TAG_ERROR] = tracking.truncate(error, tracking.MAX_ERROR_CHARS)
        if extra:
            self._set_tags(run_id, extra)
        self.client.set_terminated(run_id, status=status)
