"""A comparison's result as Python objects: one DataFrame row per arm (means and sds over
seeds, the paired difference from the baseline with its 95% interval, the verdict) and
one per arm x seed. The numbers are the ones the printed table and ``compare.json`` show,
as fractions (0.981), not points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bake_ray.compare.paired import mean_sd
from bake_ray.compare.report import Summary, TrialResult, format_report

METRICS = ("test_acc_at_best_val", "test_acc", "best_val_acc")


@dataclass
class CompareResult:
    """One comparison. ``table``: per arm, ``epochs``, ``images``, ``steps``, the seeds it
    finished (``n_seeds``), ``<metric>_mean``/``_sd`` for test at best val, last-epoch test
    and best val, then the paired difference from ``baseline`` on ``metric``
    (``diff_mean``, ``diff_low``, ``diff_high``: 95% Student t over ``diff_n`` seeds) and the
    ``verdict``. ``trials``: arm, seed, status and the last reported metrics of each."""

    name: str
    path: str
    experiment: str
    tracking_uri: str
    parent_run_id: str | None
    baseline: str
    metric: str  # what the verdicts compare
    table: Any  # pandas.DataFrame
    trials: Any  # pandas.DataFrame
    report: str  # the printed table, rules and verdicts
    problems: list[str]  # trials that did not finish
    interrupted: bool


def arms_frame(summary: Summary) -> Any:
    import pandas as pd

    rows = []
    for arm in summary.arms:
        row: dict[str, Any] = {"arm": arm.label, "kind": arm.kind, "epochs": arm.epochs,
                               "images": arm.images, "steps": arm.steps,
                               "n_seeds": len(arm.seeds)}  # fmt: skip
        for metric in METRICS:
            values = arm.values(metric)
            mean, sd = mean_sd(values) if values else (float("nan"), float("nan"))
            row[f"{metric}_mean"], row[f"{metric}_sd"] = mean, sd
        diff = arm.diff
        row["diff_n"] = diff.n if diff else 0
        for key in ("mean", "sd", "low", "high"):
            row[f"diff_{key}"] = getattr(diff, key) if diff else float("nan")
        row["verdict"], row["note"] = arm.verdict, arm.note
        rows.append(row)
    return pd.DataFrame(rows)


def trials_frame(results: list[TrialResult]) -> Any:
    import pandas as pd

    rows = []
    for r in sorted(results, key=lambda r: (r.arm, r.seed)):
        rows.append({"arm": r.arm, "seed": r.seed, "status": r.status,
                     "planned_epochs": r.planned_epochs,
                     "epochs": int(r.metrics.get("epoch", 0) or 0), "images": r.images,
                     "steps": r.steps})  # fmt: skip
        rows[-1].update({m: float(r.metrics.get(m, float("nan"))) for m in METRICS})
    return pd.DataFrame(rows)


def compare_result(
    p: Any, summary: Summary, results: list[TrialResult], parent_run_id: str, interrupted: bool
) -> CompareResult:
    return CompareResult(
        name=p.name,
        path=p.exp_path,
        experiment=p.experiment,
        tracking_uri=p.tracking_uri,
        parent_run_id=parent_run_id or None,
        baseline=summary.baseline,
        metric=summary.metric,
        table=arms_frame(summary),
        trials=trials_frame(results),
        report=format_report(p, summary),
        problems=list(summary.problems),
        interrupted=interrupted,
    )
