"""The search as a function: ``tune(config, overrides=..., ...)`` plans it (every check
before Ray starts), runs it and returns its :class:`~bake_ray.tune.result.SearchResult`.

``python -m bake_ray.tune`` (:mod:`bake_ray.tune.cli`) parses its flags into exactly these
keywords and prints what this raises; :mod:`bake_ray.api` exports it as ``tune``. So the
command line and the Python API validate, run and record a search the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs

from bake_ray import tracking
from bake_ray.core import config as cfg
from bake_ray.core import search_space as ss
from bake_ray.core import storage as storage_fs
from bake_ray.core.config import ConfigError
from bake_ray.core.datafiles import check_data_available, input_shape
from bake_ray.core.models import check_model_available
from bake_ray.scale.quiet import ray_output
from bake_ray.tune import record as rec
from bake_ray.tune.plan import Plan
from bake_ray.tune.result import SearchResult, load_search
from bake_ray.tune.search import SearchInterrupted, can_restore, hard_stop, run_search

DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "default.yaml"


def tune(
    config: str | Path | Mapping[str, Any] | None = None,
    *,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    num_samples: int | None = None,
    resume: bool = False,
    name: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    register: bool = True,
    verbose: bool = False,
) -> SearchResult:
    """Run (or ``resume``) a search and return its ranked trials and winner.

    ``config``: a search-space file or its contents as a dict (default:
    ``search_spaces/default.yaml``); ``overrides``: dotted keys to values, what ``--set``
    takes (``{"budget.num_samples": 4, "base.epochs": 2}``); the other keywords are the
    command line's flags (``register=False`` is ``--no-register``). A bad input raises the
    one-line :class:`ConfigError` the command line prints (or
    :class:`~bake_ray.tracking.TrackingError`). Ctrl-C (SIGINT/SIGTERM) saves the search
    and raises :class:`SearchInterrupted`, a ``KeyboardInterrupt`` whose ``result`` holds
    the trials so far; ``resume=True`` continues it.
    """
    # The flags by the names argparse gives them: one keyword here is one flag there.
    args = argparse.Namespace(**locals())
    args.overrides = cfg.override_texts(overrides)
    p = plan(args)
    if p.record is not None and p.record.status == rec.FINISHED:
        return _show_finished(p)
    try:
        with ray_output(p.exp_path, p.name, verbose):
            run_search(p, address, resume)
    except SearchInterrupted as stop:
        with contextlib.suppress(ConfigError):  # the record and trials at the stop
            stop.result = load_search(p.name, p.storage)
        raise
    except KeyboardInterrupt:
        raise SearchInterrupted(hard_stop(p, address)) from None
    return load_search(p.name, p.storage)


def _show_finished(p: Plan) -> SearchResult:
    """A finished search is only shown: no Ray, no MLflow write, no file touched."""
    assert p.record is not None
    print(f"search {p.name} already finished; nothing to resume. Its result:", flush=True)
    print(p.record.result.get("summary", "").rstrip("\n"), flush=True)
    return load_search(p.name, p.storage)


def _load_space(config: Any, overrides: list[str]) -> ss.SearchSpace:
    """A search file, or a search file's contents given as a dict (the Python API)."""
    if isinstance(config, Mapping):
        return ss.parse(dict(config), None, overrides)
    return ss.load(config or DEFAULT_SPACE, overrides)


def find_experiment(storage: str, space: ss.SearchSpace, name: str | None, resume: bool) -> str:
    """The experiment name: given, the newest of this space when resuming, or a new one."""
    if name or not resume:
        return name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    fs, root = storage_fs.filesystem(storage)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    mine = sorted(i.base_name for i in infos if i.base_name.startswith(f"{space.name}-"))
    if not mine:
        raise ConfigError(f"--resume: no earlier search named {space.name}-* under {storage}")
    return mine[-1]


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.num_samples is not None:
        overrides.append(f"budget.num_samples={args.num_samples}")
    return overrides


def _check_no_searched_override(space: ss.SearchSpace, overrides: list[str]) -> None:
    """A ``--set`` on a key the search samples would be overwritten by every trial."""
    searched = {d.key for d in space.dimensions}
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key.removeprefix("base.") in searched:
            raise ConfigError(
                f"--set {key}: {key.removeprefix('base.')} is searched (space."
                f"{key.removeprefix('base.')}); change its range in the space file instead"
            )


def plan(args: argparse.Namespace) -> Plan:
    """Validate the whole search before any Ray, MLflow run or training starts."""
    storage = storage_fs.resolve_storage(args.storage)
    overrides = _overrides(args)
    if args.resume:
        p = _plan_resume(args, storage, overrides)
        if p.record is not None and p.record.status == rec.FINISHED:
            return p  # nothing will run: no data, cluster or tracking check needed
        space = p.space
    else:
        space = _load_space(args.config, overrides)
        _check_no_searched_override(space, list(args.overrides))
    check_data_available(space.base.data)
    for model in ss.model_configs(space):
        check_model_available(model, *input_shape(space.base.data))
    joined = bool(args.address or os.environ.get("RAY_ADDRESS"))
    if not joined:
        _check_fits_this_machine(space)
    if args.resume:
        uri = p.tracking_uri
        p.joined = joined
    else:
        name = find_experiment(storage, space, args.name, False)
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        p = Plan(space, storage, name, uri, joined)
    # Last: for sqlite it creates the database's folder. On a cluster the server may still
    # be starting (a job submitted right after `ray up`): wait for it, boundedly.
    wait_s = tracking.tracking_wait_s() if joined else 0.0
    tracking.wait_for_tracking(uri, wait_s, say=lambda line: print(line, flush=True))
    p.register = args.register
    return p


def _plan_resume(args: argparse.Namespace, storage: str, overrides: list[str]) -> Plan:
    """The search to resume, rebuilt from its stored record; conflicting flags refused."""
    if args.name:
        name = args.name
        if not can_restore(f"{storage.rstrip('/')}/{name}"):
            raise ConfigError(f"--resume: {storage.rstrip('/')}/{name} holds no restorable search")
        record = rec.load(f"{storage.rstrip('/')}/{name}")
    else:
        found = rec.newest_unfinished(storage)
        if found is None:
            raise ConfigError(
                f"--resume: no unfinished search under {storage}; name one with --name"
            )
        name, record = found
        if not can_restore(f"{storage.rstrip('/')}/{name}"):
            raise ConfigError(f"--resume: {storage.rstrip('/')}/{name} holds no restorable search")
        print(
            f"resuming the newest unfinished search in {storage}: {name} "
            f"({record.status}; space {record.space_file or 'from the record'})",
            flush=True,
        )
    if record is None:  # a search saved before bake-ray stored records: trust the flags
        space = _load_space(args.config, overrides)
        _check_no_searched_override(space, list(args.overrides))
        return Plan(space, storage, name, tracking.resolve_tracking_uri(args.tracking_uri))
    space = _stored_space(record, args, overrides)
    if args.tracking_uri is not None:
        given = tracking.resolve_tracking_uri(args.tracking_uri)
        if given != record.tracking_uri:
            raise ConfigError(
                f"--resume: --tracking-uri {given} conflicts with the search's own "
                f"{record.tracking_uri}; drop --tracking-uri to keep its runs together"
            )
    return Plan(space, storage, name, record.tracking_uri, record=record)


def _stored_space(
    record: rec.SearchRecord, args: argparse.Namespace, overrides: list[str]
) -> ss.SearchSpace:
    """The stored search; a ``--config``/``--set`` may only repeat it, never change it."""
    stored = record.search_space()
    if args.config is None and not overrides:
        return stored
    _check_no_searched_override(stored, list(args.overrides))
    if args.config is not None:
        given, what = _load_space(args.config, overrides), f"--config {args.config}"
    else:
        given, what = record.search_space(overrides), "--set " + " ".join(overrides)
    diff = rec.first_difference(stored, given)
    if diff is not None:
        raise ConfigError(
            f"--resume: {what} conflicts with the stored search {record.name} ({diff}); "
            f"resume without it, or start a new search"
        )
    return stored


def _check_fits_this_machine(space: ss.SearchSpace) -> None:
    """A local Ray gets this machine's CPUs and GPUs: refuse a budget that can never be
    placed before Ray starts, so nothing is written and no Ray log buries the error.
    A Ray already running in this process (tests, benchmarks) is checked after joining."""
    import ray
    import torch

    if not ray.is_initialized():
        ss.check_fits(space, float(os.cpu_count() or 1), float(torch.cuda.device_count()))
