"""What a search is, stored beside its checkpoints so ``--resume`` never has to guess.

``bake_ray_search.yaml`` in the experiment folder holds the resolved search file (base
config expanded, ``--set`` applied), the space file it came from, the MLflow experiment and
tracking URI, and the search's state: ``running`` (a driver is on it, or was killed),
``interrupted`` (stopped by SIGINT/SIGTERM, restorable) or ``finished`` (with its result).
A resumed search is rebuilt from this record, not from whatever ``--config`` defaults to.

No Ray here: the CLI reads records before Ray starts.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs
import yaml

from bake_ray.core import config as cfg
from bake_ray.core import search_space as ss
from bake_ray.core.config import ConfigError
from bake_ray.core.storage import filesystem, read_text, write_text
from bake_ray.tune.ranking import TrialRow

# Not .json/.pkl: Tune's restore copies those into its staging folder and uploads them back
# at its next sync, which would put an old copy over a newer one.
RECORD_FILE = "bake_ray_search.yaml"
# A finished search's result, beside it in its storage (local or s3://), where a later
# `compare --search` or `train --config` finds it from any machine and folder.
BEST_CONFIG_FILE = "best_config.yaml"
SUMMARY_FILE = "summary.txt"
RUNNING, INTERRUPTED, FINISHED = "running", "interrupted", "finished"


@dataclass
class SearchRecord:
    """The stored identity and state of one search."""

    name: str  # the experiment folder (and MLflow parent run name)
    experiment: str  # the MLflow experiment (the space's name)
    tracking_uri: str
    space_file: str | None
    space: dict[str, Any]  # resolved search file: parse(space) rebuilds the SearchSpace
    status: str = RUNNING
    created: float = field(default_factory=time.time)
    resume_command: str = ""
    # finished: the summary text and the ranked trials; interrupted: the trials at the stop
    result: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str = ""  # the search's MLflow parent run

    def search_space(self, overrides: list[str] = ()) -> ss.SearchSpace:
        return ss.parse(self.space, None, list(overrides))

    def to_yaml(self) -> str:
        # The file's own key order: the space's dimensions (and the table's columns) keep it.
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def resolved_raw(space: ss.SearchSpace) -> dict[str, Any]:
    """The search file with its base config expanded: parsing it gives the same space."""
    raw = copy.deepcopy(space.raw)
    raw.pop("base_config", None)
    raw["base"] = cfg.to_dict(space.base)
    raw["name"] = space.name
    return raw


def rows_data(rows: list[TrialRow]) -> list[dict[str, Any]]:
    """The ranked trials as plain data for the record (``load_search`` reads them back)."""
    return [dataclasses.asdict(row) for row in rows]


def rows_from_data(data: list[dict[str, Any]]) -> list[TrialRow]:
    return [TrialRow(**row) for row in data]


def record_uri(exp_path: str) -> str:
    return f"{exp_path.rstrip('/')}/{RECORD_FILE}"


def load(exp_path: str) -> SearchRecord | None:
    """The record of the search at ``exp_path``; None for a search made before records."""
    text = read_text(record_uri(exp_path))
    if text is None:
        return None
    try:
        return SearchRecord(**yaml.safe_load(text))
    except (yaml.YAMLError, ValueError, TypeError) as err:
        raise ConfigError(f"{record_uri(exp_path)}: unreadable search record: {err}") from None


def save(exp_path: str, record: SearchRecord) -> None:
    write_text(record_uri(exp_path), record.to_yaml())


def newest_unfinished(storage: str) -> tuple[str, SearchRecord] | None:
    """(experiment name, record) of the newest search under ``storage`` not yet finished."""
    fs, root = filesystem(storage)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    found = []
    for info in infos:
        if info.type != pyarrow.fs.FileType.Directory:
            continue
        record = load(f"{storage.rstrip('/')}/{info.base_name}")
        if record is not None and record.status != FINISHED:
            found.append((record.created, info.base_name, record))
    if not found:
        return None
    _, name, record = max(found, key=lambda item: (item[0], item[1]))
    return name, record


def first_difference(a: ss.SearchSpace, b: ss.SearchSpace) -> str | None:
    """The first setting in which two searches differ (None when they are the same search)."""
    for f in dataclasses.fields(ss.SearchSpace):
        if f.name in ("source", "raw"):
            continue
        left, right = getattr(a, f.name), getattr(b, f.name)
        if f.name == "base" and left != right:
            flat_a, flat_b = cfg.flatten(cfg.to_dict(left)), cfg.flatten(cfg.to_dict(right))
            key = next(k for k in flat_a if flat_a[k] != flat_b.get(k))
            return f"base {key}: stored {flat_a[key]!r}, given {flat_b.get(key)!r}"
        if left != right and dataclasses.is_dataclass(left):  # budget, scheduler: the field
            key = next(
                g.name
                for g in dataclasses.fields(left)
                if getattr(left, g.name) != getattr(right, g.name)
            )
            return f"{f.name}.{key}: stored {getattr(left, key)!r}, given {getattr(right, key)!r}"
        if left != right:
            return f"{f.name}: stored {_short(left)}, given {_short(right)}"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
