"""``python -m bake_ray.compare --recheck SEARCH --top N --seeds K``: does the winner stay?

A search ranks its trials by one run each; a lucky seed can crown a trial. Recheck reads
the finished search's trials from Tune's files, ranks them as the search did (best
validation accuracy first, :func:`bake_ray.tune.ranking.rank`), and turns its N best into arms
of a comparison: each is retrained with K seeds, and every runner-up is paired with the
winner, seed by seed, on best validation accuracy. The test split is never used to choose.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from bake_ray.compare.plan import ARMS, Arm
from bake_ray.core import config as cfg
from bake_ray.core.config import ConfigError
from bake_ray.tune import ranking
from bake_ray.tune.ranking import TrialRow
from bake_ray.tune.trial import resolved_trial_config


def trial_row(trial: Any) -> TrialRow:
    last = trial.last_result or {}
    status = "error" if trial.status == "ERROR" or "best_val_acc" not in last else "finished"
    return TrialRow(
        trial_id=str(trial.trial_id),
        params={},
        best_val_acc=float(last.get("best_val_acc", 0.0)),
        test_acc=float(last.get("test_acc_at_best_val", 0.0)),
        epochs=int(last.get("epoch", 0) or 0),
        status=status,
        val_n=int(last.get("val_n", 0) or 0),
        val_loss=float(last.get("val_loss_at_best_val", math.inf)),
    )


def load_trials(storage: str, search: str) -> list[tuple[TrialRow, Any]]:
    """The search's trials with their Tune records, in the search's ranking order."""
    path = f"{storage.rstrip('/')}/{search}"
    if "://" not in path and not Path(path).is_dir():
        raise ConfigError(f"--recheck {search}: no search folder {path} (see --storage)")
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(path)
    except (ValueError, OSError, RuntimeError) as err:
        raise ConfigError(f"--recheck {search}: cannot read its trials: {err}") from None
    pairs = {t.trial_id: (trial_row(t), t) for t in analysis.trials}
    ranked = ranking.rank([row for row, _ in pairs.values()])
    return [pairs[row.trial_id] for row in ranked if row.status != "error"]


def recheck_arms(args: argparse.Namespace, storage: str) -> tuple[list[Any], str, cfg.Config]:
    """Arms ``trial_<id>`` for the search's ``--top`` best trials, the winner first."""
    if args.top < 2:
        raise ConfigError(f"--top: must be >= 2 (the winner and a runner-up), got {args.top}")
    if args.arm_overrides or args.arms != _default_arms():
        raise ConfigError("--recheck: --arms/--arm-set do not apply (the arms are trials)")
    trials = load_trials(storage, args.recheck)[: args.top]
    search_base = _search_base(storage, args.recheck)
    if len(trials) < 2:
        raise ConfigError(f"--recheck {args.recheck}: fewer than 2 usable trials to recheck")
    arms = []
    for row, trial in trials:
        values = cfg.to_dict(resolved_trial_config(search_base, trial.config))
        for text in args.overrides:
            key, value = cfg.parse_override(text)
            cfg.set_dotted(values, key, value)
        try:
            config = cfg.from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"--set: {err}") from None
        note = f"search rank {len(arms) + 1}: best val {row.best_val_acc:.4f} with its one seed"
        arms.append(Arm(f"trial_{row.trial_id}", "trial", cfg.to_dict(config), note))
    base = cfg.from_dict(arms[0].values)
    return arms, f"top {len(arms)} trials of search {args.recheck}", base


def _search_base(storage: str, search: str) -> dict[str, Any]:
    """The config every trial of the search started from (its stored search record); a
    trial's Tune config holds only its sampled values."""
    from bake_ray.tune import record as rec
    from bake_ray.tune.trial import trial_base

    record = rec.load(f"{storage.rstrip('/')}/{search}")
    if record is None:
        raise ConfigError(f"--recheck {search}: no {rec.RECORD_FILE} beside its trials")
    return trial_base(record.search_space())


def _default_arms() -> str:
    return ",".join(ARMS)


def winner_line(summary: Any) -> str:
    """Whether the search's winner (the baseline arm) stays the winner after K seeds."""
    arms = summary.arms
    winner = arms[0]
    means = {a.label: _mean(a.values("best_val_acc")) for a in arms}
    leader = max(arms, key=lambda a: means[a.label])
    beaten = [a.label for a in arms[1:] if a.diff is not None and a.diff.low > 0]
    if beaten:
        return (
            f"the winner {winner.label} does NOT stay the winner: {', '.join(beaten)} "
            "is better on validation (paired 95% CI above 0)"
        )
    if leader is winner:
        return (
            f"the winner {winner.label} stays the winner: highest mean best val over the "
            "seeds, and no runner-up is detectably better"
        )
    return (
        f"the winner {winner.label} is not clearly the winner: {leader.label} has a higher "
        "mean best val, but the paired 95% CI includes 0 (more seeds would tell)"
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else -math.inf
