"""The benchmarks at a tiny size, so they cannot rot; no timing is ever asserted.

Each test runs a benchmark's ``main(["--smoke", ...])`` in-process and checks that its table
was printed and written, and that its key figures are finite positive numbers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from bake_ray.core.bake import affinity, propagate

# bench/ is not part of the installed package (only bake_ray is); make it importable the
# way `python -m bench.NAME` from the repository root does, whatever runs pytest.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bake_overhead, does_bake_help, scaling  # noqa: E402
from bench.common import max_row_l1, propagate_until, write_section  # noqa: E402


def run_smoke(module, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, float]:
    """Run ``module.main`` at smoke size; return its key figures after checking the output."""
    out, figures = tmp_path / "BENCH.md", tmp_path / "figures.json"
    argv = ["--smoke", "--out", str(out), "--json", str(figures), "--plot-dir", str(tmp_path)]
    assert module.main(argv) == 0
    printed = capsys.readouterr().out
    assert module.HEADING in printed and "|---" in printed
    assert module.HEADING in out.read_text() and "|---" in out.read_text()
    assert list(tmp_path.glob("*.png")), "no plot written"
    return json.loads(figures.read_text())


def finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_bake_overhead_smoke(tmp_path, capsys):
    threads = torch.get_num_threads()
    figures = run_smoke(bake_overhead, tmp_path, capsys)
    assert torch.get_num_threads() == threads  # its 1-thread CPU clock is undone afterwards
    for key in ("bake_over_ce_step", "iterative_over_solve_at_largest_b", "ce_step_s"):
        assert finite_positive(figures[key]), (key, figures[key])
    assert figures["worst_error_over_bound"] <= 1.0  # maths, not timing
    assert figures["worst_neumann_f64_error_over_tol"] <= 1.0  # the solver meets bake.tol
    assert finite_positive(figures["neumann_share_at_largest_b"])


def test_does_bake_help_smoke(tmp_path, capsys):
    figures = run_smoke(does_bake_help, tmp_path, capsys)
    for method in ("bake", "ce", "label_smoothing"):
        # Two epochs on digits: every method must be far above chance (0.1), or a run broke.
        assert 0.5 < figures[f"{method}_test_at_best_val"] <= 1.0, figures
        assert 0.5 < figures[f"{method}_last_test"] <= 1.0, figures
        if method != "ce":  # the paired delta is the difference of the two means
            delta = figures[f"{method}_test_at_best_val"] - figures["ce_test_at_best_val"]
            assert figures[f"{method}_minus_ce_at_best_val"] == pytest.approx(delta, abs=1e-12)


@pytest.mark.slow
def test_scaling_smoke(tmp_path, capsys, ray_local):
    figures = run_smoke(scaling, tmp_path, capsys)
    assert finite_positive(figures["ray_2_global_over_local"])


# --------------------------------------------------------------------------- helpers


def test_a_posteriori_stop_meets_its_tolerance():
    """The bench-only adaptive stop (bake.propagate_neumann's bound is tested in test_bake)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 8, generator=generator, dtype=torch.float64)
    probs = torch.softmax(torch.randn(40, 5, generator=generator, dtype=torch.float64), dim=1)
    a, omega = affinity(features), 0.7
    exact = propagate(a, probs, omega)
    targets, steps = propagate_until(a, probs, omega, tol=1e-9)
    assert max_row_l1(targets - exact) <= 1e-9 and steps >= 1


def test_write_section_replaces_only_its_own_block(tmp_path):
    report = tmp_path / "BENCH.md"
    report.write_text("# Title\n\n## 1. A\n\nhand-written note\n\n## 2. B\n\npending\n")
    write_section(report, "## 1. A", "a", "first run")
    write_section(report, "## 1. A", "a", "second run")
    write_section(report, "## 3. C", "c", "new section")
    text = report.read_text()
    assert "second run" in text and "first run" not in text
    assert "hand-written note" in text and "pending" in text
    assert text.index("## 1. A") < text.index("second run") < text.index("## 2. B")
    assert text.rstrip().endswith("<!-- /bench:c -->")
