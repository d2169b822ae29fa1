"""The ranking rule, intervals and the separability sentence, on hand-built rows."""

from __future__ import annotations

import random

import pytest

from bake_ray.core import search_space as ss
from bake_ray.tune import ranking
from bake_ray.tune.cli import DEFAULT_SPACE
from bake_ray.tune.ranking import TrialRow
from bake_ray.tune.summary import format_table, study_from_rows


def row(trial_id: str, acc: float, loss: float, n: int = 144, **kw: object) -> TrialRow:
    values = {"params": {"bake.temperature": 4.0}, "test_acc": 0.9, "epochs": 3}
    values.update({"status": "finished", "val_n": n, "val_loss": loss, **kw})
    return TrialRow(trial_id=trial_id, best_val_acc=acc, **values)  # type: ignore[arg-type]


def test_ties_are_broken_by_val_loss_then_trial_id_whatever_the_report_order() -> None:
    rows = [
        row("t3", 142 / 144, 0.20),
        row("t1", 142 / 144, 0.05),
        row("t4", 142 / 144, 0.05),
        row("t2", 141 / 144, 0.01),
        row("t0", 143 / 144, 0.90, status="error"),  # a crash never wins
    ]
    expected = ["t1", "t4", "t3", "t2", "t0"]
    for seed in range(20):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        assert [r.trial_id for r in ranking.rank(shuffled)] == expected


def test_wilson_interval_known_values() -> None:
    assert ranking.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    low, high = ranking.wilson_interval(142, 144)
    assert low < 142 / 144 < high < 1.0


def test_the_summary_says_when_the_leader_is_not_separable() -> None:
    close = ranking.rank([row(f"t{i}", (142 - i) / 144, 0.1) for i in range(5)])
    line = ranking.separability_line(close)
    low = ranking.wilson_interval(142, 144)[0]
    inside = sum(r.best_val_acc >= low for r in close)
    assert inside > 1
    assert line.startswith(f"top {inside} trials are within the leader's 95% interval")
    assert line.endswith("the search cannot tell them apart on 144 validation images")
    apart = ranking.rank([row("a", 0.99, 0.1, n=10_000), row("b", 0.90, 0.1, n=10_000)])
    line = ranking.separability_line(apart)
    assert "is below the leader's 95% interval" in line and line.endswith("excludes 0")
    near = ranking.rank([row("a", 34 / 40, 0.1, n=40), row("b", 28 / 40, 0.1, n=40)])
    assert ranking.separability_line(near).endswith("still includes 0")  # below, yet unsure


def test_the_summary_says_when_the_trials_behind_were_stopped_early() -> None:
    # ASHA stopped everyone behind the leader at epoch 2 of 8: the margin is not between
    # finished trials, and the sentence says so.
    rows = ranking.rank(
        [row("lead", 0.88, 0.5, n=4000, epochs=8)]
        + [row(f"s{i}", 0.80 - i / 100, 0.9, n=4000, epochs=2, status="stopped") for i in range(3)]
    )
    line = ranking.separability_line(rows)
    assert "excludes 0; but the runner-up and 2 more stopped early" in line
    assert line.endswith(
        "(at most 2 of the leader's 8 epochs): behind at that epoch, "
        "which is not a comparison of finished trials"
    )
    finished = ranking.rank([row("a", 0.88, 0.5, n=4000), row("b", 0.80, 0.5, n=4000)])
    assert "stopped early" not in ranking.separability_line(finished)


def test_description_names_winner_runner_up_and_margin_interval() -> None:
    rows = ranking.rank([row("a", 140 / 144, 0.1), row("b", 130 / 144, 0.1)])
    text = ranking.describe(rows)
    assert "**Winner**: trial a" in text and "**Runner-up**: trial b" in text
    low, high = ranking.difference_interval(rows[0], rows[1])
    assert low < 10 / 144 < high
    assert f"**Margin**: {10 / 144:+.4f} (95% interval {low:+.4f} to {high:+.4f})" in text


def test_table_shows_counts_and_intervals() -> None:
    table = format_table(ranking.rank([row("a", 142 / 144, 0.1), row("b", 0.5, 0.2, n=0)]))
    low, high = ranking.wilson_interval(142, 144)
    assert "142/144" in table and f"{low:.4f}-{high:.4f}" in table
    assert "correct/n" in table and "95% interval" in table


def test_optuna_history_follows_the_order_trials_started() -> None:
    space = ss.load(DEFAULT_SPACE)
    key = space.dimensions[0].key
    point = dict(space.initial_points[0]) if space.initial_points else {}
    rows = ranking.rank(
        [
            row(f"t{i}", acc, 0.1, params={**point, key: point.get(key)}, started=start)
            for i, (acc, start) in enumerate([(0.9, 3.0), (0.8, 1.0), (0.95, 2.0)])
        ]
    )
    study = study_from_rows(rows, space)
    assert [t.value for t in study.trials] == [0.8, 0.95, 0.9]
