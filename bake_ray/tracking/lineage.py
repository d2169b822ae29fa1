"""Which data a run used, as MLflow dataset inputs: one per split, contexts ``training``,
``validation`` and ``test``.

A split is named ``<dataset>-<split>`` and its digest is a hash of the exact indices the
run draws (:func:`bake_ray.core.data.split_indices`: ``train_subset``, the seeded
validation hold-out, the test set), so two runs on the same split show the same digest in
the runs table and a different seed's split shows another. The indices are recomputed on
the process that writes the run (the search driver for a trial): the split is seeded and
deterministic, so this is the run's own split without asking the trial for it. Loading the
labels costs once per distinct (data config, seed) in a process: milliseconds for digits,
about a second for CIFAR, a folder scan for imagefolder.

Lineage is a record, never a reason to stop: a failure is one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient

from bake_ray import tracking
from bake_ray.core import config as cfg
from bake_ray.core.data import split_indices

log = logging.getLogger("bake_ray.tracking")

CONTEXT_TAG = "mlflow.data.context"  # MLflow's own tag for a dataset input's role
CONTEXTS = {"train": "training", "val": "validation", "test": "test"}
SOURCE_TYPE = "bake_ray"
DIGEST_CHARS = 16
_CACHE: dict[str, list[DatasetInput]] = {}


def digest(indices: Any) -> str:
    """The first hex digits of the SHA-256 of the indices as little-endian int64."""
    import numpy as np

    raw = np.asarray(indices, dtype="<i8").tobytes()
    return hashlib.sha256(raw).hexdigest()[:DIGEST_CHARS]


def split_inputs(config: Mapping[str, Any]) -> list[DatasetInput]:
    """The dataset inputs of a run with this resolved config (cached per split)."""
    run = cfg.from_dict(dict(config))
    data = run.data
    source = {
        "dataset": data.dataset,
        "data_dir": data.data_dir,
        "val_fraction": data.val_fraction,
        "train_subset": data.train_subset,
        "seed": run.seed,
    }
    key = json.dumps(source, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = [
            _input(data.dataset, split, indices, source)
            for split, indices in split_indices(data, run.seed).items()
        ]
    return _CACHE[key]


def _input(name: str, split: str, indices: Any, source: dict[str, Any]) -> DatasetInput:
    dataset = Dataset(
        name=f"{name}-{split}",
        digest=digest(indices),
        source_type=SOURCE_TYPE,
        source=json.dumps({**source, "split": split}, default=str),
        profile=json.dumps({"num_rows": len(indices)}),
    )
    return DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, CONTEXTS[split])])


def log_split_inputs(client: MlflowClient, run_id: str, config: Mapping[str, Any]) -> bool:
    """Record the run's splits on it; one warning and False when that fails (MLflow keeps
    a dataset input once, so a repeat, e.g. a resumed trial, adds nothing)."""
    try:
        client.log_inputs(run_id, datasets=split_inputs(config))
    except Exception as err:  # lineage must never stop a run
        log.warning("MLflow dataset inputs of run %s not logged: %s", run_id,
                    tracking.first_line(err))  # fmt: skip
        return False
    return True
