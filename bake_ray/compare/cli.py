"""Does BAKE help on my data? ``python -m bake_ray.compare [--config FILE | --search NAME]``.

Trains every *arm* (a way to train) with every seed, as one Ray Tune trial each (a grid
over arm and seed, no search algorithm, run in parallel on this machine or a cluster), and
reports, per arm, test accuracy at the epoch that was best on the validation split and at
the last epoch, and its paired difference from ``ce`` with a 95% t interval and a verdict.

Arms (``--arms``, default all five): ``bake`` (the config's T/omega/lambda), ``bake_paper``
(T=4, omega=0.5, lambda=1), ``ce`` (cross-entropy, the same class-aware sampler),
``ce_standard`` (cross-entropy on plain shuffled batches, ``data.same_class=0``: the paper's
baseline) and ``label_smoothing``. ``LABEL=ARM`` adds a renamed copy of an arm, and
``--arm-set LABEL:key=value`` changes one arm only (e.g. ``--arms ce,ce_lr=ce --arm-set
ce_lr:optim.lr=0.01``).

Pairing: seed s of every arm uses the same data split and the same initial weights (both
derive from the config's ``seed``), so ``arm - ce`` is taken per seed and its mean gets a
Student t interval over the seeds (:mod:`bake_ray.compare.paired`).

Compute matching (``--match``). An epoch visits every training image once as an *anchor*;
with ``data.same_class = M`` each anchor brings M classmates, so a class-aware epoch holds
(M+1) x the training set in images and steps, and a plain epoch (M=0) holds 1 x.
``--match images`` (default) gives every arm the same number of training images (and so,
at the same batch size, the same optimizer steps): an arm with M_a gets
``epochs x (M+1) / (M_a+1)`` epochs, M being the config's (so ``ce_standard`` trains 2x the
epochs when M=1); warm-up epochs scale the same way and schedule milestones are fractions
of the run. ``--match epochs`` gives every arm the config's epochs, whatever they hold.

Rerunning the same command continues the same comparison (its name is a digest of what it
trains): finished arm x seed trials are restored, not retrained.

Recheck a finished search (``--recheck SEARCH --top N --seeds K``): retrain its N best
trials with K seeds each and say whether the winner stays the winner, on validation
accuracy only (the test split is never used to choose).

Modules: this one (flags, arms, checks before compute), :mod:`bake_ray.compare.run` (the
Tune grid, its trainable and MLflow), :mod:`bake_ray.compare.report` (table, verdicts,
plot), :mod:`bake_ray.compare.recheck` (--recheck) and :mod:`bake_ray.compare.paired` (statistics).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from bake_ray.compare.plan import ARMS, BASELINE, PLAN_FILE, Arm, Plan, plan_payload
from bake_ray.core import config as cfg
from bake_ray.core import storage as storage_fs
from bake_ray.core.config import ConfigError
from bake_ray.tune.record import BEST_CONFIG_FILE

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cfg.ArgumentParser(
        prog="python -m bake_ray.compare",
        description=__doc__.split("\nModules:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--config", type=cfg.config_location, help="training config YAML, a path or a "
        "storage URI (default: built-in)"
    )
    source.add_argument("--search", help="a search name in --storage: use its best_config.yaml")
    source.add_argument("--recheck", metavar="SEARCH", help="retrain a search's top trials")
    parser.add_argument("--top", type=int, default=3, help="with --recheck: trials to retrain")
    parser.add_argument(
        "--arms",
        default=",".join(ARMS),
        help=f"comma list of {', '.join(ARMS)} or LABEL=ARM (default: all)",
    )
    parser.add_argument(
        "--arm-set",
        dest="arm_overrides",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE",
        help="a config override for one arm only (repeatable)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (>= 2; default 3)")
    parser.add_argument("--match", default="images", choices=("images", "epochs"))
    cfg.add_override_argument(parser, "a training-config override for every arm")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument(
        "--max-concurrent", type=int, default=0, help="trials at a time (0: as resources allow)"
    )
    parser.add_argument("--name", help="comparison name (default: <dataset>-compare-<digest>)")
    parser.add_argument("--storage", help="checkpoints: path or URI (default ./ray_results)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS or local)")
    return parser.parse_args(argv)


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


def _base_config(args: argparse.Namespace, storage: str) -> tuple[cfg.Config, str]:
    if args.search:
        location = storage_fs.join(storage, args.search, BEST_CONFIG_FILE)
        if storage_fs.read_text(location) is None:
            raise ConfigError(
                f"--search {args.search}: no {location} (a search in --storage {storage} "
                "writes it when it finishes; a search elsewhere needs its --storage)"
            )
        return load_training_config(location, args.overrides, "--search"), location
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


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        p = plan(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from bake_ray import tracking
    from bake_ray.compare import run

    # a grid of short trials snapshots often by design; Tune would warn after every epoch
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    hint = "interrupted; rerun the same command to continue (finished arm x seed trials are kept)"
    try:
        results = run.run(p, args.address)
    except tracking.TrackingError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        run.close_interrupted(p)
        print(hint, file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    unfinished = run.unfinished(p, results)
    run.finish(p, results, bool(unfinished))
    if unfinished:
        print(f"{hint}; unfinished: {', '.join(unfinished)}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0 if any(r.status == "finished" for r in results) else 1
