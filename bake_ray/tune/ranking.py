"""How a search ranks its trials, and how sure it can be of that ranking.

A search scores each trial by its best validation accuracy, measured on a finite
validation set: on 144 images one image is 0.7 points, and many trials tie. So each
accuracy carries its sample size and a 95% Wilson score interval, ties are broken by a
fixed rule that does not depend on the order in which trials reported, and the summary says
when the leader cannot be told apart from the trials behind it.

The ranking rule (documented in README.md, "How a search ranks its trials"):

1. higher best validation accuracy;
2. then lower validation loss at that trial's selected epoch;
3. then the trial id (Tune's ids are fixed for the life of a search), so a re-run or a
   resume of the same results always yields the same order.

No Ray and no MLflow here: the search driver and the tests both use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CONFIDENCE = 0.95


@dataclass
class TrialRow:
    """One line of the final table."""

    trial_id: str
    params: dict[str, Any]
    best_val_acc: float
    test_acc: float
    epochs: int
    status: str
    val_n: int = 0  # validation images behind best_val_acc (0: unknown, e.g. a crash)
    val_loss: float = math.inf  # validation loss at the selected epoch
    started: float = 0.0  # when the trial started (seconds since the epoch), for plots

    @property
    def val_correct(self) -> int:
        return round(self.best_val_acc * self.val_n)

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of the best validation accuracy (nan when n is unknown)."""
        return wilson_interval(self.val_correct, self.val_n)


def wilson_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion (scipy's implementation).

    Wilson rather than the normal approximation because search accuracies sit near 1, where
    the normal interval overshoots 1 and collapses to a point at 142/142.
    """
    if n <= 0:
        return math.nan, math.nan
    from scipy.stats import binomtest

    ci = binomtest(int(correct), int(n)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def difference_interval(a: TrialRow, b: TrialRow) -> tuple[float, float]:
    """95% interval of ``a.best_val_acc - b.best_val_acc`` (Newcombe's hybrid Wilson score).

    It treats the two accuracies as independent samples. Both trials are scored on the same
    images, whose per-image results are not recorded; their errors are positively
    correlated, so this interval is wider (more cautious) than a paired one would be.
    """
    (l1, u1), (l2, u2) = a.interval, b.interval
    p1, p2 = a.best_val_acc, b.best_val_acc
    d = p1 - p2
    return d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def rank_key(row: TrialRow) -> tuple[float, float, str]:
    """Sort key: accuracy desc, validation loss at the selected epoch asc, trial id asc."""
    loss = row.val_loss if math.isfinite(row.val_loss) else math.inf
    return (-row.best_val_acc, loss, row.trial_id)


def rank(rows: list[TrialRow]) -> list[TrialRow]:
    """The rows in ranking order; crashed trials ("error") last, whatever their accuracy."""
    return sorted(rows, key=lambda r: (r.status == "error", *rank_key(r)))


def indistinguishable(rows: list[TrialRow]) -> list[TrialRow]:
    """The ranked usable trials whose accuracy lies inside the leader's 95% interval.

    "Inside" means at or above the interval's lower bound: the leader's own interval is the
    range of accuracies its validation score cannot rule out, so a trial scoring inside it
    could be as good as the leader. The leader itself is the first element.
    """
    usable = [r for r in rows if r.status != "error"]
    if not usable or usable[0].val_n <= 0:
        return usable[:1]
    low = usable[0].interval[0]
    return [r for r in usable if r.best_val_acc >= low]


def separability_line(rows: list[TrialRow]) -> str:
    """One plain sentence: can the search tell its leader from the trials behind it?"""
    usable = [r for r in rows if r.status != "error"]
    if len(usable) < 2:
        return "only one usable trial: nothing to compare the leader with"
    leader = usable[0]
    if leader.val_n <= 0:
        return "the validation-set size is unknown: no interval on the ranking"
    low, high = leader.interval
    close = indistinguishable(usable)
    if len(close) > 1:
        return (
            f"top {len(close)} trials are within the leader's 95% interval "
            f"[{low:.4f}, {high:.4f}]: the search cannot tell them apart on "
            f"{leader.val_n} validation images"
        )
    line = (
        f"the runner-up ({usable[1].best_val_acc:.4f}) is below the leader's 95% interval "
        f"[{low:.4f}, {high:.4f}] on {leader.val_n} validation images"
    )
    if usable[1].val_n > 0:
        d_low, d_high = difference_interval(leader, usable[1])
        verdict = "excludes 0" if d_low > 0 else "still includes 0"
        line += f"; the margin's 95% interval [{d_low:+.4f}, {d_high:+.4f}] {verdict}"
    return line + stopped_early_note(usable)


def stopped_early_note(usable: list[TrialRow]) -> str:
    """Says when the trials behind the leader trained fewer epochs than it did.

    An early-stopped trial's best accuracy comes from its last rung, so the margin above
    compares unequal training: it shows the trial was behind at that epoch, not that it
    would have stayed behind.
    """
    leader = usable[0]
    if not 0 < usable[1].epochs < leader.epochs:
        return ""
    shorter = [r for r in usable[1:] if 0 < r.epochs < leader.epochs]
    most = max(r.epochs for r in shorter)
    who = "the runner-up" if len(shorter) == 1 else f"the runner-up and {len(shorter) - 1} more"
    return (
        f"; but {who} stopped early (at most {most} of the leader's {leader.epochs} epochs): "
        "behind at that epoch, which is not a comparison of finished trials"
    )


def tie_note(rows: list[TrialRow]) -> str | None:
    """Names the trials tied with the leader on accuracy and how the tie was broken."""
    usable = [r for r in rows if r.status != "error"]
    if len(usable) < 2:
        return None
    tied = [r for r in usable if r.best_val_acc == usable[0].best_val_acc]
    if len(tied) < 2:
        return None
    names = ", ".join(r.trial_id for r in tied)
    return (
        f"{len(tied)} trials tie at val {usable[0].best_val_acc:.4f} ({names}): "
        "ranked by lower validation loss at the selected epoch, then trial id"
    )


def describe(rows: list[TrialRow], short: Any = str) -> str:
    """The search's result in a few lines of markdown (the parent run's MLflow description):
    winner, runner-up, the margin with its 95% interval, and whether it is separable."""
    usable = [r for r in rows if r.status != "error"]
    if not usable:
        return "No trial finished without an error."
    best = usable[0]
    lines = [f"**Winner**: trial {best.trial_id} ({_params_text(best, short)}), {_acc(best)}"]
    if len(usable) > 1:
        second = usable[1]
        lines.append(
            f"**Runner-up**: trial {second.trial_id} ({_params_text(second, short)}), "
            f"{_acc(second)}"
        )
        margin = best.best_val_acc - second.best_val_acc
        if best.val_n > 0 and second.val_n > 0:
            lo, hi = difference_interval(best, second)
            lines.append(f"**Margin**: {margin:+.4f} (95% interval {lo:+.4f} to {hi:+.4f})")
        else:
            lines.append(f"**Margin**: {margin:+.4f} (no interval: validation size unknown)")
    lines.append(separability_line(rows))
    lines.append(
        "Ranking: best validation accuracy, then lower validation loss at the selected epoch, "
        "then trial id. Intervals: Wilson score, 95%."
    )
    return "\n\n".join(lines)


def _acc(row: TrialRow) -> str:
    if row.val_n <= 0:
        return f"val {row.best_val_acc:.4f}, test {row.test_acc:.4f}"
    low, high = row.interval
    return (
        f"val {row.best_val_acc:.4f} ({row.val_correct}/{row.val_n}, 95% interval "
        f"{low:.4f}-{high:.4f}), test {row.test_acc:.4f}"
    )


def _params_text(row: TrialRow, short: Any) -> str:
    return ", ".join(
        f"{short(k)}={v:.4g}" if isinstance(v, float) else f"{short(k)}={v}"
        for k, v in row.params.items()
    )
