"""What ``python -m bake_ray.compare`` reports: per-arm table, paired verdicts, plot, MLflow.

Reads Tune's results (one per arm x seed), groups them by arm, pairs each arm with the
baseline seed by seed, and writes the table that states its own rules (match, seeds,
selection on validation). No training here; no Ray calls beyond reading a result.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bake_ray.compare.paired import PairedDifference, mean_sd, paired_difference, verdict

METRIC_NAMES = {
    "test_acc_at_best_val": "test acc at the best-validation epoch",
    "best_val_acc": "best validation accuracy",
}


@dataclass
class TrialResult:
    """One arm x seed, as Tune left it."""

    arm: str
    seed: int
    status: str  # finished, unfinished, diverged, error
    planned_epochs: int
    metrics: dict[str, float] = field(default_factory=dict)  # last report
    images: int = 0  # training images processed (anchors and their classmates)
    steps: int = 0  # optimizer steps (per worker)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (images so far, val acc)

    @property
    def label(self) -> str:
        return f"{self.arm}-seed{self.seed}"


def _epoch_images(row: dict[str, Any]) -> int:
    """Images of one epoch: the engine reports images/s and the epoch's seconds."""
    try:
        return round(float(row["images_per_s"]) * float(row["epoch_time_s"]))
    except (KeyError, TypeError, ValueError):
        return 0


def trial_result(result: Any, arms: dict[str, dict[str, Any]]) -> TrialResult:
    """A Tune ``Result`` as a :class:`TrialResult` (history from its metrics dataframe);
    ``arms`` maps each arm's label to its full config."""
    config = result.config or {}
    values = arms[config["arm"]]
    out = TrialResult(config["arm"], int(config["seed"]), "finished", int(values["epochs"]))
    out.metrics = dict(result.metrics or {})
    frame = result.metrics_dataframe
    rows = [] if frame is None else frame.to_dict("records")
    by_epoch = {  # a resumed trial reports again the epochs after its last checkpoint
        int(r["epoch"]): r
        for r in rows
        if isinstance(r.get("epoch"), (int, float)) and r["epoch"] == r["epoch"]
    }
    rows = [by_epoch[e] for e in sorted(by_epoch)]
    seen = 0
    for row in rows:
        seen += _epoch_images(row)
        if "val_acc" in row:
            out.curve.append((seen, float(row["val_acc"])))
    out.images = seen
    workers = max(1, int(values["runtime"]["workers"]))
    out.steps = seen // (int(values["data"]["batch_size"]) * workers)
    if result.error is not None:
        out.status = "error"
    elif out.metrics.get("diverged"):
        out.status = "diverged"
    elif int(out.metrics.get("epoch", 0) or 0) < out.planned_epochs:
        out.status = "unfinished"
    return out


@dataclass
class ArmSummary:
    """One arm over its seeds."""

    label: str
    kind: str
    epochs: int
    note: str
    seeds: list[int]  # finished seeds
    by_seed: dict[str, dict[int, float]]  # metric -> seed -> value
    images: int
    steps: int
    diff: PairedDifference | None = None
    verdict: str = ""

    def values(self, metric: str) -> list[float]:
        return [self.by_seed[metric][s] for s in self.seeds]


@dataclass
class Summary:
    arms: list[ArmSummary]
    baseline: str
    metric: str
    problems: list[str]  # trials that did not finish, by label and status


def summarise(p: Any, results: list[TrialResult]) -> Summary:
    """Group by arm; pair each arm with the baseline over the seeds both finished."""
    metrics = ("test_acc_at_best_val", "test_acc", "best_val_acc")
    arms = []
    for arm in p.arms:
        done = sorted(
            (r for r in results if r.arm == arm.label and r.status == "finished"),
            key=lambda r: r.seed,
        )
        by_seed = {m: {r.seed: float(r.metrics.get(m, math.nan)) for r in done} for m in metrics}
        arms.append(
            ArmSummary(
                arm.label,
                arm.kind,
                int(arm.values["epochs"]),
                arm.note,
                [r.seed for r in done],
                by_seed,
                max((r.images for r in done), default=0),
                max((r.steps for r in done), default=0),
            )
        )
    base = next(a for a in arms if a.label == p.baseline)
    for arm in arms:
        if arm is base:
            continue
        seeds = [s for s in arm.seeds if s in base.seeds]
        if len(seeds) < 2:
            arm.verdict = f"not enough paired seeds ({len(seeds)} finished with {base.label})"
            continue
        arm.diff = paired_difference(
            [arm.by_seed[p.metric][s] for s in seeds], [base.by_seed[p.metric][s] for s in seeds]
        )
        arm.verdict = verdict(arm.diff)
    problems = [f"{r.label} {r.status}" for r in results if r.status != "finished"]
    return Summary(arms, p.baseline, p.metric, problems)


def _pm(values: list[float]) -> str:
    if not values:
        return "-"
    mean, sd = mean_sd([100 * v for v in values])
    return f"{mean:.2f} ± {sd:.2f}"


def _delta(arm: ArmSummary) -> str:
    if arm.diff is None:
        return "-"
    d = arm.diff
    return f"{100 * d.mean:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}]"


def match_line(p: Any) -> str:
    """The compute-matching rule, in words, with the config's M."""
    if getattr(p, "recheck_of", None):
        return "match: none (every trial keeps its own config, as the search trained it)"
    if p.match == "epochs":
        return (
            "match: epochs (every arm trains the config's epochs; images and steps differ, "
            "see the columns)"
        )
    m, epochs = p.extra.get("same_class", "M"), p.extra.get("epochs", "E")
    return (
        "match: images (every arm trains on the same number of images: an epoch with M "
        "same-class images per anchor holds (M+1) x the training set, so an arm with M_a "
        f"trains epochs x (M+1)/(M_a+1); here M={m} and epochs={epochs}, and ce_standard "
        "has M_a=0)"
    )


def format_report(p: Any, s: Summary) -> str:
    """The table, its rules, and one verdict line per arm."""
    name = METRIC_NAMES[s.metric]
    header = [
        "arm",
        "epochs",
        "images/run",
        "steps/run",
        "test @ best val (%)",
        "last-epoch test (%)",
        "best val (%)",
        f"Δ vs {s.baseline} (pp) [95% CI]",
    ]
    rows = [header] + [
        [
            a.label,
            str(a.epochs),
            f"{a.images:,}",
            f"{a.steps:,}",
            _pm(a.values("test_acc_at_best_val")),
            _pm(a.values("test_acc")),
            _pm(a.values("best_val_acc")),
            _delta(a),
        ]
        for a in s.arms
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    table = "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows)
    seeds = ", ".join(str(x) for x in p.seeds)
    lines = [
        f"compare {p.name} ({p.source}): {len(p.seeds)} seeds ({seeds}), paired by seed "
        "(same data split and initial weights in every arm); mean ± sd over seeds",
        f"model selection on validation: 'test @ best val' is the test accuracy at the epoch "
        f"with the best validation accuracy; verdicts compare {name}",
        match_line(p),
        "",
        table,
        "",
        f"verdicts: arm - {s.baseline} per seed, mean and 95% Student t interval over the "
        "paired seeds; better/worse only when the interval excludes 0",
    ]
    lines += [f"  {a.label} vs {s.baseline}: {a.verdict}" for a in s.arms if a.verdict]
    lines += [f"  {a.label}: {a.note}" for a in s.arms if a.note]
    if getattr(p, "recheck_of", None):
        from bake_ray.compare.recheck import winner_line

        lines.append(winner_line(s))
    if s.problems:
        lines.append("not finished (left out of the table): " + ", ".join(s.problems))
    return "\n".join(lines)


def as_json(p: Any, s: Summary) -> dict[str, Any]:
    """The same numbers, machine-readable (fractions, not points)."""
    return {
        "name": p.name,
        "match": p.match,
        "seeds": p.seeds,
        "baseline": s.baseline,
        "metric": s.metric,
        "arms": {
            a.label: {
                "kind": a.kind,
                "epochs": a.epochs,
                "images": a.images,
                "steps": a.steps,
                "seeds": a.seeds,
                "by_seed": a.by_seed,
                "diff": None if a.diff is None else vars(a.diff),
                "verdict": a.verdict,
            }
            for a in s.arms
        },
    }


def parent_params(p: Any, s: Summary) -> dict[str, Any]:
    """The comparison's settings and verdicts as parent-run params."""
    params: dict[str, Any] = {
        "match": p.match,
        "seeds": len(p.seeds),
        "arms": ",".join(a.label for a in s.arms),
        "baseline": s.baseline,
        "metric": s.metric,
        "config_source": p.source,
    }
    for a in s.arms:
        params[f"{a.label}.epochs"] = a.epochs
        if a.verdict:
            params[f"{a.label}.verdict"] = a.verdict
    return params


def parent_metrics(s: Summary) -> dict[str, float]:
    """Per arm: means (fractions), images, steps, and the paired difference with its CI."""
    out: dict[str, float] = {}
    for a in s.arms:
        for metric in ("test_acc_at_best_val", "test_acc", "best_val_acc"):
            values = a.values(metric)
            if values:
                out[f"{a.label}.{metric}_mean"], out[f"{a.label}.{metric}_sd"] = mean_sd(values)
        out[f"{a.label}.images"], out[f"{a.label}.steps"] = float(a.images), float(a.steps)
        if a.diff is not None:
            out[f"{a.label}.diff_vs_{s.baseline}"] = a.diff.mean
            out[f"{a.label}.diff_ci_low"], out[f"{a.label}.diff_ci_high"] = a.diff.low, a.diff.high
    return {k: v for k, v in out.items() if math.isfinite(v)}


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bake_ray_compare_") as tmp:
        yield Path(tmp)


def plot(p: Any, s: Summary, results: list[TrialResult], path: Path) -> Path | None:
    """Left: per-seed test acc at best val per arm (dots) and its mean (bar). Right: mean
    validation accuracy against images seen per arm, ± one sd over seeds (band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, arm in enumerate(s.arms):
        values = [100 * v for v in arm.values(s.metric)]
        if not values:
            continue
        xs = [i + 0.08 * (k - (len(values) - 1) / 2) for k in range(len(values))]
        left.scatter(xs, values, s=18, zorder=3)
        mean = sum(values) / len(values)
        left.hlines(mean, i - 0.3, i + 0.3, colors="black", zorder=4)
        _curve(
            right, arm.label, [r for r in results if r.arm == arm.label and r.status == "finished"]
        )
    left.set_xticks(range(len(s.arms)), [a.label for a in s.arms], rotation=20)
    left.set(
        ylabel=f"{METRIC_NAMES[s.metric]} (%)",
        title=f"per seed (dots) and mean, {len(p.seeds)} seeds",
    )
    right.set(
        xlabel="training images seen (thousands)",
        ylabel="validation accuracy (%)",
        title=f"mean ± sd over seeds ({p.match} matched)",
    )
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curve(ax: Any, label: str, runs: list[TrialResult]) -> None:
    if not runs:
        return
    length = min(len(r.curve) for r in runs)
    if length == 0:
        return
    xs = [runs[0].curve[i][0] / 1000 for i in range(length)]
    stats = [mean_sd([100 * r.curve[i][1] for r in runs]) for i in range(length)]
    means = [m for m, _ in stats]
    ax.plot(xs, means, marker="o", markersize=3, label=label)
    ax.fill_between(xs, [m - sd for m, sd in stats], [m + sd for m, sd in stats], alpha=0.2)
