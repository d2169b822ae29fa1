"""A search's MLflow runs: one parent run per search, one nested child run per trial.

MLflow mirrors what Ray Tune stores; it is never the only copy of a result. Each write is
tried once, live (an epoch's metrics as Tune reports them); when it fails, one warning is
logged and the search goes on, with no buffer. When a trial ends, and for every trial when
the search ends, its run is re-synced from Tune's stored results: the run's metric
history is read back and only the (metric, step) pairs it lacks are logged, so an outage
loses nothing and a write whose reply was lost is not logged twice. Runs are found by
their tags (``bake_ray.search_id``, ``bake_ray.trial_id``), so a resumed search, or a
second tracker of the same search in another object, reopens them instead of duplicating.

All writes go through an explicit ``MlflowClient`` (no fluent, global active run), under
the write-once rules of :class:`bake_ray.tracking.run_writes.RunWriter`, which this class
extends with finding, reopening and ending a search's runs by tag. This module must not
import Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import requests
from mlflow.exceptions import MlflowException

from bake_ray import tracking
from bake_ray.tracking import lineage
from bake_ray.tracking.run_writes import RunWriter

log = logging.getLogger("bake_ray.tracking")

SEARCH = "search"  # the parent's label in warnings and in :meth:`SearchTracker.incomplete`


def _label(trial_id: str) -> str:
    return f"trial {trial_id}"


class SearchTracker(RunWriter):
    """The parent run of one search and its trials' child runs, written from one process.

    ``quiet_s``: after a write fails because the server is away, live writes are skipped
    for that long (each would wait for its own timeout); re-syncs always try.
    """

    def __init__(
        self,
        experiment_name: str,
        search_id: str,
        tracking_uri: str | None = None,
        *,
        run_name: str | None = None,
        artifact_location: str | None = None,
        quiet_s: float = 10.0,
    ) -> None:
        tracking.check_id("search_id", search_id)
        self.search_id = search_id
        self._children: dict[str, str] = {}  # trial_id -> run_id
        try:
            super().__init__(tracking_uri, quiet_s)
            self.experiment_id = self._experiment(experiment_name, artifact_location)
            self.parent_run_id = self._open_parent(run_name or search_id)
        except (MlflowException, OSError, requests.RequestException) as err:
            raise tracking.TrackingError(
                f"MLflow at {self.tracking_uri}: {tracking.first_line(err)}"
            ) from None

    # ------------------------------------------------------------------ setup (must work)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage != "active":
                raise tracking.TrackingError(
                    f"experiment {name!r} is deleted; restore it or rename"
                )
            return found.experiment_id
        location = artifact_location or tracking.default_artifact_location(self.tracking_uri, name)
        return self.client.create_experiment(name, artifact_location=location)

    def _open_parent(self, run_name: str) -> str:
        """Find the search's parent run by tag and set it RUNNING again, or create it."""
        query = (
            f"tags.`{tracking.TAG_SEARCH_ID}` = '{self.search_id}' "
            f"and tags.`{tracking.TAG_ROLE}` = 'search'"
        )
        runs = self.client.search_runs(
            [self.experiment_id], query, max_results=1, order_by=["attributes.start_time ASC"]
        )
        if not runs:
            tags = {tracking.TAG_SEARCH_ID: self.search_id, tracking.TAG_ROLE: tracking.ROLE_SEARCH}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
            self._params[run.info.run_id], self._steps[run.info.run_id] = {}, {}
            return run.info.run_id
        self._reopen(runs[0])
        self._load(runs[0])
        self.parent_run_id = runs[0].info.run_id
        for child in self._search_children():
            self._children.setdefault(
                child.data.tags.get(tracking.TAG_TRIAL_ID, ""), child.info.run_id
            )
        return runs[0].info.run_id

    def _search_children(self, extra: str = "") -> Iterator[Any]:
        """The parent's child runs on the server, oldest first (``extra``: more filter)."""
        query = f"tags.`{tracking.TAG_PARENT}` = '{self.parent_run_id}'{extra}"
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], query, max_results=1000,
                order_by=["attributes.start_time ASC"], page_token=token,
            )  # fmt: skip
            yield from page
            token = page.token
            if not token:
                return

    # ------------------------------------------------------------------ trials

    def _run_of(self, trial_id: str, run_name: str | None = None) -> str:
        """The trial's run: known, found on the server by tag, or created."""
        run_id = self._children.get(trial_id)
        if run_id is None:
            tracking.check_id("trial_id", trial_id)
            extra = f" and tags.`{tracking.TAG_TRIAL_ID}` = '{trial_id}'"
            found = next(iter(self._search_children(extra)), None)
            if found is not None:
                self._load(found)
                run_id = found.info.run_id
            else:
                tags = {
                    tracking.TAG_PARENT: self.parent_run_id, tracking.TAG_SEARCH_ID: self.search_id,
                    tracking.TAG_TRIAL_ID: trial_id, tracking.TAG_ROLE: tracking.ROLE_TRIAL,
                }  # fmt: skip
                run = self.client.create_run(
                    self.experiment_id, tags=tags, run_name=run_name or trial_id
                )
                run_id = run.info.run_id
                self._params[run_id], self._steps[run_id] = {}, {}
            self._children[trial_id] = run_id
        elif run_id not in self._steps:
            self._load(self.client.get_run(run_id))
        return run_id

    def start_trial(
        self, trial_id: str, config: Mapping[str, Any], run_name: str | None = None
    ) -> None:
        """Open the trial's child run (the same run if the trial ran before, set RUNNING
        again) and log its config as params (``bake.omega`` ..., BAKE's three as ``T``,
        ``omega``, ``lambda``)."""

        def start() -> None:
            run_id = self._run_of(trial_id, run_name)
            self._reopen(self.client.get_run(run_id))
            self._log_params(run_id, _label(trial_id), tracking.config_params(config))
            lineage.log_split_inputs(self.client, run_id, config)  # warns itself, never raises

        self._write(_label(trial_id), f"start {_label(trial_id)}", start, repairable=True)

    def log_trial_metrics(self, trial_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Log one epoch (``step=epoch``): the :data:`~bake_ray.tracking.EPOCH_METRICS` in
        ``metrics``; a step the run already holds (a resumed trial replaying it) is skipped."""
        clean = tracking.epoch_metrics(metrics)
        label = _label(trial_id)

        def write() -> None:
            self._log_missing(self._run_of(trial_id), {int(step): clean})

        self._write(label, f"metrics {label}@{int(step)}", write, repairable=True)

    def sync_trial(
        self,
        trial_id: str,
        config: Mapping[str, Any],
        history: Iterable[Mapping[str, Any]],
        end: tuple[tracking.RunStatus, str | None, Mapping[str, Any] | None] | None = None,
    ) -> bool:
        """Make the trial's run hold everything in ``history`` (its results, each with an
        ``epoch``) and, with ``end`` = (status, error, tags), that end. Idempotent: the run
        is read back first and only what it lacks is written; an ended run whose status is
        already right keeps its end time."""
        by_step = {int(r["epoch"]): tracking.epoch_metrics(r) for r in history if "epoch" in r}
        label = _label(trial_id)

        def sync() -> None:
            run_id = self._run_of(trial_id)
            run = self.client.get_run(run_id)
            self._load(run)
            self._log_params(run_id, label, tracking.config_params(config))
            self._log_missing(run_id, by_step)
            if end is not None and run.info.status != end[0]:
                self._end(run_id, *end)

        ok = self._write(label, f"re-sync {label}", sync, repairable=True, live=False)
        if ok:
            self._unsynced.discard(label)
        return ok

    def log_trial_artifacts(
        self, trial_id: str, local_dir: str | Path, artifact_path: str = "checkpoint"
    ) -> bool:
        """Upload a directory (the trial's best checkpoint) to the trial's run; True if done."""

        def upload() -> None:
            if not Path(local_dir).is_dir():  # MLflow would silently upload nothing
                raise FileNotFoundError(f"artifact directory {local_dir} does not exist")
            self.client.log_artifacts(self._run_of(trial_id), str(local_dir), artifact_path)

        label = _label(trial_id)
        done = self._write(label, f"artifacts {label}", upload, repairable=False, live=False)
        if done:  # an earlier, failed upload of the same files is made good
            self._lost.discard(label)
        return done

    def end_trial(
        self,
        trial_id: str,
        status: tracking.RunStatus = "FINISHED",
        error: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        """End a trial's run FINISHED, KILLED or FAILED; ``error`` is kept, shortened, as tag
        ``bake_ray.error``, and ``tags`` say more (e.g. that ASHA stopped it early)."""
        _check_status(status)
        label = _label(trial_id)

        def end() -> None:
            self._end(self._run_of(trial_id), status, error, tags)

        self._write(label, f"end {label}", end, repairable=True)

    # ------------------------------------------------------------------ the search (parent)

    def _parent_write(self, what: str, fn: Callable[[], None]) -> bool:
        return self._write(SEARCH, what, fn, repairable=False, live=False)

    def log_search_params(self, params: Mapping[str, Any]) -> None:
        """Params of the search itself (space file, budget, scheduler...), flattened."""
        clean = tracking.config_params(params)
        run_id = self.parent_run_id
        self._parent_write("params search", lambda: self._log_params(run_id, SEARCH, clean))

    def log_search_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file (space YAML, summary table, best config) to the parent run."""
        self._parent_write(
            f"artifact {Path(local_path).name}",
            lambda: self.client.log_artifact(self.parent_run_id, str(local_path), artifact_path),
        )

    def log_search_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        """Upload a directory's files (the Optuna plots) to the parent run."""
        self._parent_write(
            f"artifacts {artifact_path}",
            lambda: self.client.log_artifacts(self.parent_run_id, str(local_dir), artifact_path),
        )

    def log_best(
        self, trial_id: str, config: Mapping[str, Any], metrics: Mapping[str, Any]
    ) -> None:
        """The best trial on the parent: metrics ``best.<name>`` (one step past any earlier
        value, so a resumed search's new winner is the latest) and its config as tags
        ``best.<key>``: MLflow params are write-once and the winner can change on resume."""
        clean = {f"best.{k}": v for k, v in tracking.numbers(metrics).items()}
        tags = {f"best.{k}": v for k, v in tracking.config_params(config).items()}
        tags["best.trial_id"] = trial_id
        run_id = self.parent_run_id

        def write() -> None:
            self._set_tags(run_id, tags)
            held = self._steps.get(run_id, {})
            step = 1 + max((max(held.get(k) or {-1}) for k in clean), default=-1)
            self._log_missing(run_id, {step: clean})

        self._parent_write("best trial", write)

    def describe_search(self, description: str, winner_params: Mapping[str, Any]) -> None:
        """The parent's MLflow description (shown on its page) and the winner's searched
        values as parent params, named as in the trials' runs, so the parent lines up with
        its children in the runs table."""
        params, run_id = tracking.config_params(winner_params), self.parent_run_id

        def write() -> None:
            self._set_tags(run_id, {tracking.TAG_NOTE: description})
            self._log_params(run_id, SEARCH, params)

        self._parent_write("description", write)

    def save_runs_view(self, searched_keys: list[str]) -> None:
        """Store the runs-table view of this search's trials on the experiment (see
        :func:`bake_ray.tracking.runs_view`), and lay the experiment out for model training
        unless the user chose otherwise; :func:`~bake_ray.tracking.runs_view_url` opens it."""
        key, value = tracking.runs_view(self.search_id, searched_keys, int(time.time() * 1000))
        exp = self.experiment_id

        def write() -> None:
            if tracking.EXPERIMENT_KIND_TAG not in self.client.get_experiment(exp).tags:
                self.client.set_experiment_tag(
                    exp, tracking.EXPERIMENT_KIND_TAG, tracking.EXPERIMENT_KIND
                )
            self.client.set_experiment_tag(exp, key, value)

        self._parent_write("runs view", write)

    # ------------------------------------------------------------------ closing

    def mark_interrupted(self, reason: str) -> None:
        """Tag the parent and every trial run still RUNNING with ``bake_ray.interrupted``
        (``reason`` says how to resume); ``close_all("KILLED")`` then ends them. Resuming
        the search removes the tag again."""

        def tag() -> None:
            for run in self._search_children(" and attributes.status = 'RUNNING'"):
                self.client.set_tag(run.info.run_id, tracking.TAG_INTERRUPTED, reason)
            self.client.set_tag(self.parent_run_id, tracking.TAG_INTERRUPTED, reason)

        self._parent_write("interrupted tags", tag)

    def end_orphaned_trials(self, known_trial_ids: Iterable[str]) -> None:
        """End KILLED, tagged ``bake_ray.orphaned``, the runs of trials the search no longer
        has: a driver killed between opening a trial's run and Tune saving that trial leaves
        a run that ``--resume`` never continues. Its data stay; it must not look finished."""
        known = set(known_trial_ids)

        def end() -> None:
            for run in list(self._search_children()):
                if run.data.tags.get(tracking.TAG_TRIAL_ID, "") not in known:
                    self.client.set_tag(
                        run.info.run_id, tracking.TAG_ORPHANED, tracking.ORPHANED_REASON
                    )
                    self.client.set_terminated(run.info.run_id, status="KILLED")

        self._parent_write("orphaned trials", end)

    def close_all(self, status: tracking.RunStatus = "FINISHED") -> list[str]:
        """End the children still RUNNING (a crashed driver's too) and then the parent with
        ``status``; returns :meth:`incomplete` (empty when MLflow holds everything)."""
        _check_status(status)

        def end() -> None:
            for run in list(self._search_children(" and attributes.status = 'RUNNING'")):
                self.client.set_terminated(run.info.run_id, status=status)
            self.client.set_terminated(self.parent_run_id, status=status)

        self._parent_write(f"end the search {status}", end)
        return self.incomplete()

    def incomplete(self) -> list[str]:
        """The runs a failed write left incomplete (``search``, ``trial <id>``), tagged
        ``bake_ray.incomplete=true`` where the server allows, with one warning."""
        labels = sorted(self._unsynced | self._lost)
        for label in labels:
            run_id = self.parent_run_id if label == SEARCH else self._children.get(label[6:])
            if run_id is not None:
                try:
                    self.client.set_tag(run_id, tracking.TAG_INCOMPLETE, "true", synchronous=True)
                except Exception as err:
                    log.debug("could not tag %s incomplete: %s", label, tracking.first_line(err))
        if labels:
            log.warning("MLflow at %s is missing writes of: %s", self.tracking_uri,
                        ", ".join(labels))  # fmt: skip
        return labels


def _check_status(status: str) -> None:
    if status not in tracking.END_STATUSES:
        raise ValueError(f"status must be one of {tracking.END_STATUSES}, got {status!r}")
