"""The search benchmarks (orchestration overhead, search efficiency) at their tiny size.

They run real ``bake_ray.tune`` searches, so they need Ray: the session's ``ray_local``
cluster is reused (one Ray per host). Only the output's shape is checked: the table was
printed and written, the plot exists, the key ratios are finite and positive. No timing is
ever asserted: the numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

# bench/ is not part of the installed package; make it importable as `python -m bench.X` does.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import orchestration, search_efficiency  # noqa: E402

pytestmark = pytest.mark.slow


def run_smoke(module, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, float]:
    """Run ``module.main`` at smoke size; return its key figures after checking the output."""
    out, figures = tmp_path / "BENCH.md", tmp_path / "figures.json"
    argv = ["--smoke", "--out", str(out), "--json", str(figures), "--plot-dir", str(tmp_path)]
    assert module.main(argv) == 0
    printed = capsys.readouterr().out
    for text in (printed, out.read_text()):
        assert module.HEADING in text and "|---" in text
    assert list(tmp_path.glob("*.png")), "no plot written"
    return json.loads(figures.read_text())


def finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_orchestration_smoke(tmp_path, capsys, ray_local):
    figures = run_smoke(orchestration, tmp_path, capsys)
    for key in (
        "in_trial_overhead_s",
        "ray_pattern_1_overhead_s",
        "ray_pattern_1_over_in_trial_overhead",
        "in_trial_wall_over_train",
        "ray_pattern_1_wall_over_train",
    ):
        assert finite_positive(figures[key]), (key, figures[key])


def test_search_efficiency_smoke(tmp_path, capsys, ray_local):
    figures = run_smoke(search_efficiency, tmp_path, capsys)
    for arm in search_efficiency.ARMS:
        assert finite_positive(figures[f"{arm}_wall_over_grid"]), arm
        assert finite_positive(figures[f"{arm}_epochs_spent"]), arm
        assert 0.0 < figures[f"{arm}_best_val_at_grid_budget"] <= 1.0, arm
    # At smoke size the grid is 2 values of T x 2 epochs; random search gets as many trials;
    # TPE twice as many, which ASHA may stop after their first epoch.
    epochs = 2
    assert figures["grid_epochs_spent"] == 2 * epochs
    assert figures["random_epochs_spent"] == 2 * epochs
    assert 4 <= figures["tpe_asha_epochs_spent"] <= 4 * epochs
    for arm in search_efficiency.ARMS:  # digits, 10 classes: each search learns something
        assert figures[f"{arm}_best_val_at_grid_budget"] > 0.2, (arm, figures)
