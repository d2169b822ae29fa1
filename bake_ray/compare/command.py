"""A comparison as a function: ``compare(config, arms=..., seeds=...)`` plans it (flags,
arms, compute matching, every check before compute), runs the arm x seed grid and returns
its :class:`~bake_ray.compare.result.CompareResult`.

``python -m bake_ray.compare`` (:mod:`bake_ray.compare.cli`) parses its flags into exactly
these keywords and prints what this raises; :mod:`bake_ray.api` exports it. The Tune grid
(:mod:`bake_ray.compare.run`) is imported only once the plan is checked, so a bad flag is
refused before Ray, MLflow or torch are imported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from bake_ray.compare.plan import ARMS, BASELINE, PLAN_FILE, Arm, Plan, plan_payload
from bake_ray.compare.result import CompareResult
from bake_ray.core import config as cfg
from bake_ray.core import storage as storage_fs
from bake_ray.core.config import ConfigError
from bake_ray.tune.record import BEST_CONFIG_FILE

HINT = "interrupted; rerun the same command to continue (finished arm x seed trials are kept)"


class CompareInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the grid; finished arm x seed trials are kept and the same call (or
    command) continues it. ``result`` holds the report of what finished (None when the
    stop came before Tune ran)."""

    def __init__(self, message: str, result: CompareResult | None = None) -> None:
        super().__init__(message)
        self.message, self.result = message, result


def compare(
    config: str | Path | Mapping[str, Any] | None = None,
    *,
    search: str | None = None,
    recheck: str | None = None,
    top: int = 3,
    arms: str | Sequence[str] = ",".join(ARMS),
    arm_overrides: Sequence[str] = (),
    seeds: int = 3,
    match: str = "images",
    overrides: Mapping[str, Any] | Sequence[str] = (),
    cpus_per_trial: float = 1.0,
    max_concurrent: int = 0,
    name: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    verbose: bool = False,
) -> CompareResult:
    """Train every arm with every seed and pair each arm with the baseline, seed by seed.

    ``config``: a training config file or URI, or its contents as a dict (or ``search``:
    a search's name in ``storage``, or ``recheck``: a search whose ``top`` trials become
    the arms); ``arms``: ``"bake,ce"`` or ``["bake", "ce"]``; ``arm_overrides``:
    ``["LABEL:key=value", ...]``; ``overrides``: dotted keys to values for every arm (what
    ``--set`` takes). The other keywords are the command line's flags. A bad input raises
    the one-line :class:`ConfigError` the command line prints; Ctrl-C raises
    :class:`CompareInterrupted` (a ``KeyboardInterrupt``) once the finished trials are kept.
    """
    # The flags by the names argparse gives them: one keyword here is one flag there.
    args = argparse.Namespace(**locals())
    _check_flags(args)
    args.overrides = cfg.override_texts(overrides)
    p = plan(args)
    from bake_ray.compare import run
    from bake_ray.compare.result import compare_result
    from bake_ray.scale.quiet import ray_output

    # a grid of short trials snapshots often by design; Tune would warn after every epoch
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with ray_output(p.exp_path, p.name, verbose):
        try:
            results = run.run(p, address)
        except KeyboardInterrupt:
            run.close_interrupted(p)
            raise CompareInterrupted(HINT) from None
        unfinished = run.unfinished(p, results)
        summary, parent_run_id = run.finish(p, results, bool(unfinished))
    result = compare_result(p, summary, results, parent_run_id, bool(unfinished))
    if unfinished:
        raise CompareInterrupted(f"{HINT}; unfinished: {', '.join(unfinished)}", result)
    return result


def _check_flags(args: argparse.Namespace) -> None:
    """What argparse checks on the command line, for a call from Python (same words)."""
    given = [f"--{k}" for k in ("config", "search", "recheck") if getattr(args, k) is not None]
    if len(given) > 1:
        raise ConfigError(f"argument {given[1]}: not allowed with argument {given[0]}")
    if args.match not in ("images", "epochs"):
        raise ConfigError(
            f"argument --match: invalid choice: {args.match!r} (choose from 'images', 'epochs')"
        )
    if not isinstance(args.arms, str):
        args.arms = ",".join(args.arms)
    args.arm_overrides = list(args.arm_overrides)


def load_training_config(
    path: str | Path, overrides: list[str], flag: str = "--config"
) -> cfg.Config:
    """A training config; a search-space file (or a missing one) is refused by name."""
    try:
        raw = cfg.read_yaml(path)
    except ConfigError as err:
        raise ConfigError(f"{flag}: {err}") from None
    if {"space", "budget", "base"} & set(raw):
        raise ConfigError(
            f"{flag} {path}: is a search-space file (it has 'space'/'budget'/'base'); give a "
            "training config, e.g. a search's best_config.yaml, or use --search NAME"
        )
    try:
        return cfg.load(path, overrides)
    except ConfigError as err:
        raise ConfigError(f"{flag} {path}: {err}") from None


def _config_from_dict(values: Mapping[str, Any], overrides: list[str]) -> cfg.Config:
    """A training config given as a dict; refused like a file when it is a search space."""
    if {"space", "budget", "base"} & set(values):
        raise ConfigError(
            "--config: is a search-space file (it has 'space'/'budget'/'base'); give a "
            "training config, e.g. a search's best_config.yaml, or use --search NAME"
        )
    merged = json.loads(json.dumps(dict(values)))  # a copy: the caller's dict is left alone
    for text in overrides:
        key, value = cfg.parse_override(text)
        cfg.set_dotted(merged, key, value)
    try:
        return cfg.from_dict(merged)
    except ConfigError as err:
        raise ConfigError(f"--config: {err}") from None


def _base_config(args: argparse.Namespace, storage: str) -> tuple[cfg.Config, str]:
    if args.search:
        location = storage_fs.join(storage, args.search, BEST_CONFIG_FILE)
        if storage_fs.read_text(location) is None:
            raise ConfigError(
                f"--search {args.search}: no {location} (a search in --storage {storage} "
                "writes it when it finishes; a search elsewhere needs its --storage)"
            )
        return load_training_config(location, args.overrides, "--search"), location
    if isinstance(args.config, Mapping):  # the Python API: a config's contents
        return _config_from_dict(args.config, args.overrides), "config given as a dict"
    if args.config:
        return load_training_config(args.config, args.overrides), str(args.config)
    try:
        return cfg.load(None, args.overrides), "built-in default config"
    except ConfigError as err:
        raise ConfigError(f"--set: {err}") from None


def parse_arms(text: str) -> list[tuple[str, str]]:
    """``bake,ce,twin=ce`` -> [(label, built-in arm)], labels unique."""
    allowed = f"allowed: {', '.join(ARMS)} or LABEL=ARM"
    arms: list[tuple[str, str]] = []
    for item in (part.strip() for part in text.split(",")):
        label, _, kind = item.partition("=")
        label, kind = label.strip(), (kind or label).strip()
        if kind not in ARMS:
            raise ConfigError(f"--arms: unknown arm {kind!r}; {allowed}")
        if not label.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"--arms: label {label!r} must be letters, digits, _ or -")
        if label in {a for a, _ in arms}:
            raise ConfigError(f"--arms: {label} is listed twice")
        arms.append((label, kind))
    if len(arms) < 2:
        raise ConfigError(f"--arms: give at least 2 arms to compare; {allowed}")
    return arms


def parse_arm_overrides(items: list[str], labels: list[str]) -> dict[str, list[str]]:
    """``LABEL:key=value`` -> {label: [key=value, ...]}; the label must be an arm."""
    out: dict[str, list[str]] = {label: [] for label in labels}
    for item in items:
        label, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise ConfigError(f"--arm-set {item!r}: expected LABEL:KEY=VALUE")
        if label not in out:
            raise ConfigError(f"--arm-set {item!r}: {label} is not an arm; arms: {labels}")
        out[label].append(override)
    return out


def matched_epochs(base: cfg.Config, values: dict[str, Any], match: str) -> tuple[int, str]:
    """The arm's epochs under ``match``, and a note when they differ from the config's."""
    if match == "epochs":
        return base.epochs, ""
    m_ref, m_arm = base.data.same_class, int(values["data"]["same_class"])
    factor = Fraction(m_ref + 1, m_arm + 1)
    epochs = max(1, round(base.epochs * factor))
    if factor == 1:
        return epochs, ""
    exact = "" if epochs == base.epochs * factor else " (rounded: images differ slightly)"
    return epochs, f"epochs x{float(factor):g} (M={m_arm} vs {m_ref}) to match images{exact}"


def arm_values(base: cfg.Config, label: str, kind: str, overrides: list[str], match: str) -> Arm:
    """Base config + the arm's own settings + ``--arm-set``, then the epochs rule."""
    values = cfg.to_dict(base)
    for key, value in ARMS[kind].items():
        cfg.set_dotted(values, key, value)
    for text in overrides:
        key, value = cfg.parse_override(text)
        cfg.set_dotted(values, key, value)
    epochs, note = matched_epochs(base, values, match)
    if epochs != values["epochs"]:
        scale = Fraction(epochs, base.epochs)
        values["epochs"] = epochs
        values["optim"]["warmup_epochs"] = round(base.optim.warmup_epochs * scale)
        values["optim"]["schedule_epochs"] = round(base.optim.schedule_epochs * scale)
    try:
        checked = cfg.from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"--arms {label}: {err}") from None
    return Arm(label, kind, cfg.to_dict(checked), note)


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def plan(args: argparse.Namespace) -> Plan:
    """Validate everything before any Ray, MLflow run or training starts."""
    if args.seeds < 2:
        raise ConfigError(f"--seeds: must be >= 2 (a paired interval needs 2), got {args.seeds}")
    if args.cpus_per_trial <= 0 or args.max_concurrent < 0:
        raise ConfigError("--cpus-per-trial must be > 0 and --max-concurrent >= 0")
    from bake_ray.core.storage import resolve_storage

    storage = resolve_storage(args.storage)
    if args.recheck:
        from bake_ray.compare.recheck import recheck_arms

        arms, source, base = recheck_arms(args, storage)
        baseline, metric = arms[0].label, "best_val_acc"
    else:
        kinds = parse_arms(args.arms)
        per_arm = parse_arm_overrides(args.arm_overrides, [label for label, _ in kinds])
        from bake_ray.scale.raytrain import absolute_paths  # imports Ray: after the flags' checks

        base, source = _base_config(args, storage)
        base = absolute_paths(base)
        arms = [arm_values(base, lb, kd, per_arm[lb], args.match) for lb, kd in kinds]
        labels = [arm.label for arm in arms]
        baseline = BASELINE if BASELINE in labels else labels[0]
        metric = "test_acc_at_best_val"
    from bake_ray.core.datafiles import check_data_available, input_shape
    from bake_ray.core.models import check_model_available

    for arm in arms:
        config = cfg.from_dict(arm.values)
        check_data_available(config.data)
        check_model_available(config.model, *input_shape(config.data))
    seeds = [base.seed + i for i in range(args.seeds)]
    digest = _digest([[a.label, a.values] for a in arms] + [seeds, args.match])
    prefix = f"{args.recheck}-recheck" if args.recheck else f"{base.data.dataset}-compare"
    name = args.name or f"{prefix}-{digest}"
    joined = bool(args.address or os.environ.get("RAY_ADDRESS"))
    from bake_ray import tracking

    try:
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        if not joined and args.cpus_per_trial > (os.cpu_count() or 1):
            raise ConfigError(f"--cpus-per-trial: {args.cpus_per_trial} > this machine's CPUs")
        tracking.wait_for_tracking(uri, tracking.tracking_wait_s() if joined else 0.0)
    except tracking.TrackingError as err:
        raise ConfigError(f"--tracking-uri: {err}") from None
    p = Plan(
        arms, seeds, args.match, storage, name, uri, f"{base.data.dataset}-compare", source,
        baseline, metric, args.cpus_per_trial, args.max_concurrent, joined, args.recheck,
        {"same_class": base.data.same_class, "epochs": base.epochs},
    )  # fmt: skip
    _check_same_plan(p)
    return p


def _check_same_plan(p: Plan) -> None:
    """A ``--name`` reused for a different comparison would mix two experiments' trials."""
    from bake_ray.core.storage import read_text

    stored = read_text(f"{p.exp_path}/{PLAN_FILE}")
    if stored is not None and json.loads(stored) != json.loads(json.dumps(plan_payload(p))):
        raise ConfigError(
            f"--name {p.name}: {p.exp_path} holds a different comparison; pick another name"
        )
