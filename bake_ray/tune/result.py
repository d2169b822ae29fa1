"""A search's result as Python objects: the ranked trials as a pandas DataFrame, the winner
and its config, the separability sentence, the MLflow parent run.

Read back from what the search stored beside its checkpoints (its record, which holds the
ranked trials, and ``best_config.yaml``), so ``tune(...)`` and a later
``load_search(name, storage)`` give the same object. A search stopped before it recorded
its trials (a second Ctrl-C, a killed driver) is read from Tune's own files instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from bake_ray.core import config as cfg
from bake_ray.core import search_space as ss
from bake_ray.core import storage as storage_fs
from bake_ray.core.config import ConfigError
from bake_ray.tune import ranking
from bake_ray.tune import record as rec
from bake_ray.tune.ranking import TrialRow
from bake_ray.tune.summary import trial_row

#: Trial statuses Tune ends with; any other status at a stop is shown as ``interrupted``.
ENDED = ("TERMINATED", "ERROR")


@dataclass
class SearchResult:
    """One search. ``trials`` is ranked exactly as the printed table: one row per trial
    with its sampled values (by dotted key), ``best_val_acc`` with ``val_correct`` of
    ``val_n`` images and its 95% Wilson interval ``val_lo``-``val_hi``, the validation loss
    that breaks ties, ``test_acc_at_best_val``, ``epochs`` and ``status``."""

    name: str
    path: str  # the experiment folder in its storage (local or s3://)
    experiment: str  # the MLflow experiment
    tracking_uri: str
    parent_run_id: str | None
    status: str  # finished, interrupted, running (a driver is on it, or was killed)
    trials: Any  # pandas.DataFrame
    best_trial: str | None  # the winner's trial id (None until the search finished)
    best_config: dict[str, Any] | None  # the winner as a training config (best_config.yaml)
    best_config_path: str | None
    separability: str  # can the search tell its leader from the trials behind it?
    summary: str = ""  # what the search printed when it finished

    @property
    def interrupted(self) -> bool:
        return self.status != rec.FINISHED


def trials_frame(rows: list[TrialRow], keys: list[str]) -> Any:
    """The ranked rows as a DataFrame, the table's columns with numbers, not text."""
    import pandas as pd

    columns = ["rank", "trial_id", *keys, "best_val_acc", "val_correct", "val_n", "val_lo",
               "val_hi", "val_loss", "test_acc_at_best_val", "epochs", "status"]  # fmt: skip
    records = []
    for rank, row in enumerate(rows, 1):
        low, high = row.interval
        params = [row.params.get(k) for k in keys]
        numbers = [row.best_val_acc, row.val_correct, row.val_n, low, high, row.val_loss]
        records.append([rank, row.trial_id, *params, *numbers, row.test_acc, row.epochs,
                        row.status])  # fmt: skip
    return pd.DataFrame(records, columns=columns)


def load_search(name: str, storage: str | None = None) -> SearchResult:
    """The search ``name`` in ``storage`` (default: ``$BAKE_RAY_STORAGE`` or
    ``./ray_results``), finished, interrupted or still running. Reads files only: starts no
    Ray and writes nothing."""
    root = storage_fs.resolve_storage(storage)
    path = storage_fs.join(root, name)
    record = rec.load(path)
    if record is None:
        raise ConfigError(f"load_search: no search record {rec.record_uri(path)} (see storage)")
    space = record.search_space()
    if record.status in (rec.FINISHED, rec.INTERRUPTED) and "trials" in record.result:
        rows = rec.rows_from_data(record.result["trials"])
    else:
        rows = _rows_from_tune(path, space, record.status)
    return _result(record, path, space, rows)


def _result(
    record: rec.SearchRecord, path: str, space: ss.SearchSpace, rows: list[TrialRow]
) -> SearchResult:
    finished = record.status == rec.FINISHED
    usable = [r for r in rows if r.status != "error"]
    best_path = storage_fs.join(path, rec.BEST_CONFIG_FILE) if finished and usable else None
    best = cfg.read_yaml(best_path) if best_path else None
    return SearchResult(
        name=record.name,
        path=path,
        experiment=record.experiment,
        tracking_uri=record.tracking_uri,
        parent_run_id=record.parent_run_id or None,
        status=record.status,
        trials=trials_frame(rows, [d.key for d in space.dimensions]),
        best_trial=usable[0].trial_id if best_path else None,
        best_config=best,
        best_config_path=best_path,
        separability=ranking.separability_line(rows) if usable else "",
        summary=record.result.get("summary", "") if finished else "",
    )


def _rows_from_tune(path: str, space: ss.SearchSpace, status: str) -> list[TrialRow]:
    """The trials as Tune last stored them; those Tune had not ended are ``interrupted``."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(path)
    except (ValueError, OSError, RuntimeError) as err:
        raise ConfigError(f"load_search: cannot read the trials in {path}: {err}") from None
    rows = []
    for trial in analysis.trials:
        error = "error" if trial.status == "ERROR" else None
        result = SimpleNamespace(
            metrics=trial.last_result or {}, config=trial.config, error=error, path=trial.path
        )
        row = trial_row(result, space)
        if trial.status not in ENDED and status != rec.FINISHED:
            row.status = "interrupted"
        rows.append(row)
    return ranking.rank(rows)
