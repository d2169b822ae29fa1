"""Paired comparisons over seeds: is arm A's accuracy really different from arm B's?

Seed s of every arm trains on the same data split from the same initial weights, so the
per-seed difference ``a_s - b_s`` cancels what the seed alone decides (which images are
held out, where training starts). The mean of those differences gets a Student t interval
with n - 1 degrees of freedom; the verdict only says ``better`` or ``worse`` when that
interval excludes zero. With few seeds the interval is wide, and "no detectable
difference" is the honest answer, not a failure.

No Ray, no MLflow: the compare driver and the tests both use it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
#: The difference (a fraction: 0.003 = 0.3 points) a "cannot tell" verdict says how many seeds
#: would resolve: about what separates the methods compared in the BAKE paper's tables.
RESOLVE = 0.003
NO_SPREAD = 1e-9  # below this, a spread (or a mean) of accuracy differences is float noise


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-seed differences (fractions, not points) and its t interval."""

    n: int
    mean: float
    sd: float  # sample standard deviation of the per-seed differences
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student t critical value for a mean of ``n`` paired differences."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, n - 1))


def paired_difference(
    a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE
) -> PairedDifference:
    """``mean(a_s - b_s)`` with its t interval; ``a`` and ``b`` are ordered by seed.

    Needs two pairs at least: one difference has no spread, so no interval.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError("a paired interval needs at least 2 seeds")
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    mean, sd = mean_sd(diffs)
    half = t_quantile(len(diffs), confidence) * sd / math.sqrt(len(diffs))
    return PairedDifference(len(diffs), mean, sd, mean - half, mean + half)


def verdict(diff: PairedDifference) -> str:
    """``better`` / ``worse`` when the interval excludes 0, else an honest "cannot tell"."""
    interval = f"95% CI [{100 * diff.low:+.2f}, {100 * diff.high:+.2f}] points"
    if diff.sd < NO_SPREAD and abs(diff.mean) >= NO_SPREAD:
        # Accuracies are counts over a finite test set: with few seeds every seed can move
        # by the same few images, and zero spread gives a zero-width interval that excludes
        # 0 without telling anything about seed-to-seed noise. No verdict on it.
        return (
            f"no detectable difference at {diff.n} seeds (every seed differs by "
            f"{100 * diff.mean:+.2f} points, so the spread is unknown: add seeds)"
        )
    if diff.low > 0:
        return f"better ({interval})"
    if diff.high < 0:
        return f"worse ({interval})"
    return f"no detectable difference at {diff.n} seeds ({interval}{seeds_needed_note(diff)})"


def seeds_needed_note(diff: PairedDifference) -> str:
    """How many seeds this spread would need for a +-RESOLVE interval (empty when unknown)."""
    if diff.sd < NO_SPREAD:
        return ""
    needed = seeds_for_half_width(diff.sd, RESOLVE)
    points = f"+-{100 * RESOLVE:.1f} points"
    if needed is None:
        return f"; {points} would need over 1000 seeds at this spread"
    if needed <= diff.n:
        return ""
    return f"; {points} would need about {needed} seeds at this spread"


def seeds_for_half_width(sd: float, target: float, confidence: float = CONFIDENCE) -> int | None:
    """Fewest seeds whose t interval half-width would be <= ``target`` for differences of
    standard deviation ``sd`` (None beyond 1000): how many seeds a pilot says a real answer
    needs."""
    for n in range(2, 1001):
        if t_quantile(n, confidence) * sd / math.sqrt(n) <= target:
            return n
    return None
