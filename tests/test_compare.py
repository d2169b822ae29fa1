"""``python -m bake_ray.compare``: paired statistics, compute matching, bad input, and one real
comparison on digits (real CLI in a subprocess, real local Ray, real sqlite MLflow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from bake_ray.compare import cli as compare
from bake_ray.compare import paired
from bake_ray.core import config as cfg
from bake_ray.core.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- statistics


def test_paired_difference_is_scipys_one_sample_t_interval() -> None:
    a, b = [0.91, 0.93, 0.90, 0.94], [0.90, 0.90, 0.91, 0.91]
    diff = paired.paired_difference(a, b)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    expected = stats.t.interval(0.95, len(diffs) - 1, loc=diff.mean, scale=stats.sem(diffs))
    assert diff.mean == pytest.approx(sum(diffs) / 4)
    assert (diff.low, diff.high) == pytest.approx(expected)
    assert diff.n == 4


def test_verdicts_follow_the_interval() -> None:
    assert paired.verdict(paired.paired_difference([0.9, 0.8], [0.5, 0.45])).startswith("better")
    assert paired.verdict(paired.paired_difference([0.1, 0.25], [0.5, 0.6])).startswith("worse")
    unclear = paired.verdict(paired.paired_difference([0.5, 0.6, 0.4], [0.55, 0.5, 0.45]))
    assert unclear.startswith("no detectable difference at 3 seeds (95% CI [")
    assert paired.verdict(paired.paired_difference([0.5, 0.6], [0.5, 0.6])).startswith("no ")
    # Two seeds that differ by the same two test images: zero spread is called out.
    same = paired.verdict(paired.paired_difference([0.9903, 0.9847], [0.9847, 0.9791]))
    assert same.startswith("no detectable difference at 2 seeds (every seed differs by +0.56")
    assert "the spread is unknown: add seeds" in same
    assert "add seeds" not in paired.verdict(paired.paired_difference([0.9, 0.8], [0.5, 0.45]))


def test_paired_difference_needs_two_pairs() -> None:
    with pytest.raises(ValueError):
        paired.paired_difference([0.5], [0.4])
    with pytest.raises(ValueError):
        paired.paired_difference([0.5, 0.6], [0.4])


def test_seeds_for_half_width() -> None:
    n = paired.seeds_for_half_width(0.004, 0.003)
    assert n is not None and n >= 2
    assert paired.t_quantile(n) * 0.004 / math.sqrt(n) <= 0.003
    assert paired.t_quantile(n - 1) * 0.004 / math.sqrt(n - 1) > 0.003 or n == 2


def test_cannot_tell_verdict_says_how_many_seeds_would_resolve_a_third_of_a_point() -> None:
    # differences of sd 0.35 points over 3 seeds: +-0.3 needs about 8 seeds
    diff = paired.paired_difference([0.870, 0.866, 0.875], [0.869, 0.868, 0.870])
    text = paired.verdict(diff)
    needed = paired.seeds_for_half_width(diff.sd, paired.RESOLVE)
    assert text.startswith("no detectable difference at 3 seeds")
    assert f"+-0.3 points would need about {needed} seeds at this spread" in text
    assert needed is not None and needed > 3


# --------------------------------------------------------------------------- arms and matching


def test_bake_paper_is_the_paper_even_from_a_config_with_a_tuned_tau() -> None:
    base = cfg.load(None, ["bake.temperature=2", "bake.affinity_temperature=0.1"])
    paper = compare.arm_values(base, "bake_paper", "bake_paper", [], "images").values["bake"]
    assert (paper["temperature"], paper["omega"], paper["loss_weight"]) == (4.0, 0.5, 1.0)
    assert paper["affinity_temperature"] == 1.0
    tuned = compare.arm_values(base, "bake", "bake", [], "images").values["bake"]
    assert tuned["affinity_temperature"] == 0.1 and tuned["temperature"] == 2.0


def test_ce_standard_trains_m_plus_one_times_the_epochs_under_images_matching() -> None:
    base = cfg.load(None, ["epochs=6", "data.same_class=1", "optim.warmup_epochs=1"])
    arm = compare.arm_values(base, "ce_standard", "ce_standard", [], "images")
    assert arm.values["data"]["same_class"] == 0 and arm.values["method"] == "ce"
    assert arm.values["epochs"] == 12 and arm.values["optim"]["warmup_epochs"] == 2
    assert "x2" in arm.note
    same = compare.arm_values(base, "ce_standard", "ce_standard", [], "epochs")
    assert same.values["epochs"] == 6 and same.note == ""
    four = cfg.load(None, ["epochs=5", "data.same_class=3"])
    assert compare.arm_values(four, "s", "ce_standard", [], "images").values["epochs"] == 20
    assert compare.arm_values(four, "c", "ce", [], "images").values["epochs"] == 5


def test_builtin_arms_and_arm_overrides() -> None:
    base = cfg.load(None, ["bake.temperature=2.0", "bake.omega=0.1"])
    paper = compare.arm_values(base, "bake_paper", "bake_paper", [], "images").values["bake"]
    assert (paper["temperature"], paper["omega"], paper["loss_weight"]) == (4.0, 0.5, 1.0)
    given = compare.arm_values(base, "bake", "bake", [], "images").values
    assert (given["method"], given["bake"]["temperature"]) == ("bake", 2.0)
    slow = compare.arm_values(base, "slow", "ce", ["optim.lr=1e-6"], "images").values
    assert slow["optim"]["lr"] == 1e-6 and slow["method"] == "ce"
    assert compare.parse_arms("ce,twin=ce") == [("ce", "ce"), ("twin", "ce")]
    with pytest.raises(ConfigError, match="twice"):
        compare.parse_arms("ce,ce")
    with pytest.raises(ConfigError, match="--arm-set"):
        compare.parse_arm_overrides(["ce-optim.lr=1"], ["ce"])


# --------------------------------------------------------------------------- the CLI


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        # Ray's default place, not tmp_path: its socket paths must stay under 108 bytes.
        RAY_TMPDIR=os.environ.get("RAY_TMPDIR", "/tmp/ray"),
        OMP_NUM_THREADS="1",
        RAY_ADDRESS="",
    )
    env.pop("RAY_ADDRESS")
    return env


def _cli(tmp_path: Path, *args: str, timeout: int = 420) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bake_ray.compare", *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


BAD_INPUT = [
    (["--seeds", "1"], "--seeds"),
    (["--arms", "ce,boost"], "--arms"),
    (["--arms", "ce"], "--arms"),
    (["--config", str(REPO / "search_spaces" / "default.yaml")], "search-space file"),
    (["--config", "missing.yaml"], "--config"),
    (["--match", "steps"], "--match"),
    (["--arm-set", "nobody:optim.lr=0.1"], "--arm-set"),
    (["--arms", "ce,bake", "--arm-set", "bake:optim.lr=-1"], "optim.lr"),
    (["--search", "no-such-search"], "--search no-such-search"),
    (["--recheck", "no-such-search"], "--recheck no-such-search"),
]


def test_bad_input_is_one_line_and_exit_2_before_ray(tmp_path: Path) -> None:
    """Each case in its own process, three at a time (each pays its imports)."""
    from concurrent.futures import ThreadPoolExecutor

    def case(i: int) -> tuple[list[str], str, subprocess.CompletedProcess[str]]:
        args, names = BAD_INPUT[i]
        where = tmp_path / str(i)
        where.mkdir()
        return args, names, _cli(where, *args, "--storage", str(where / "rr"), timeout=180)

    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(case, range(len(BAD_INPUT))))
    for i, (args, names, out) in enumerate(outcomes):
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2, (args, out.stderr)
        assert len(lines) == 1 and names in lines[0], (args, out.stderr)
        assert not (tmp_path / str(i) / "rr").exists()  # nothing ran


ARGS = [
    "--arms", "ce,twin=ce,crippled=ce,ce_standard",
    "--arm-set", "crippled:optim.lr=1e-6",
    "--seeds", "3",
    "--set", "epochs=4",
    "--set", "data.train_subset=400",
    "--max-concurrent", "2",
]  # fmt: skip


def test_compare_on_digits_verdicts_mlflow_and_rerun(tmp_path: Path) -> None:
    """Identical arms: no detectable difference; an arm that cannot learn: worse; images
    matched; MLflow holds the parent, one child per arm x seed, the table and the plot; the
    same command again restores the finished trials instead of training them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    where = ["--storage", str(tmp_path / "rr"), "--tracking-uri", uri]
    out = _cli(tmp_path, *ARGS, *where)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "twin vs ce: no detectable difference at 3 seeds" in text
    assert "crippled vs ce: worse" in text
    assert "match: images" in text and "3 seeds (0, 1, 2)" in text
    exp_dir = next(p for p in (tmp_path / "rr").iterdir() if p.name.startswith("digits-compare"))

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("digits-compare")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4 * 3
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {(r.data.params["arm"], r.data.params["seed"]) for r in children} == {
        (a, str(s)) for a in ("ce", "twin", "crippled", "ce_standard") for s in range(3)
    }
    standard = next(r for r in children if r.data.params["arm"] == "ce_standard")
    assert standard.data.params["data.same_class"] == "0" and standard.data.params["epochs"] == "8"
    assert len(client.get_metric_history(standard.info.run_id, "val_acc")) == 8
    parent = parents[0]
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/compare.txt", "summary/compare.png", "summary/compare.json"} <= names
    assert parent.data.params["match"] == "images"
    assert parent.data.params["crippled.verdict"].startswith("worse")
    assert parent.data.metrics["crippled.diff_ci_high"] < 0

    local = Path(client.download_artifacts(parent.info.run_id, "summary", str(tmp_path)))
    result = json.loads((local / "compare.json").read_text())
    twin = result["arms"]["twin"]["diff"]
    assert twin["low"] <= 0 <= twin["high"]
    arms = result["arms"]
    assert arms["ce_standard"]["images"] == arms["ce"]["images"]  # ceil(n/32) = 2 ceil(n/64) here
    assert arms["ce_standard"]["steps"] == arms["ce"]["steps"]
    assert (local / "compare.png").stat().st_size > 10_000

    again = _cli(tmp_path, *ARGS, *where)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"continuing {exp_dir.name}" in again.stdout
    assert "epoch 1/" not in again.stdout  # nothing retrained
    assert "crippled vs ce: worse" in again.stdout
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 + 4 * 3


@pytest.mark.slow
def test_recheck_retrains_a_searchs_top_trials_on_validation(tmp_path: Path) -> None:
    """A finished 3-trial search; --recheck retrains its 2 best with 2 seeds each, pairs the
    runner-up with the winner on validation accuracy and says whether the winner stays."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    where = ["--storage", str(tmp_path / "rr"), "--tracking-uri", uri]
    search = subprocess.run(
        [sys.executable, "-m", "bake_ray.tune", "--num-samples", "3", "--name", "s1",
         "--set", "epochs=2", "--set", "base.data.train_subset=400",
         "--set", "scheduler.type=none", *where],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert search.returncode == 0, search.stderr[-3000:]
    out = _cli(tmp_path, "--recheck", "s1", "--top", "2", "--seeds", "2", *where)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "verdicts compare best validation accuracy" in out.stdout
    assert "search rank 1" in out.stdout and "search rank 2" in out.stdout
    assert "the winner trial_" in out.stdout
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("digits-compare")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 + 2 * 2
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["metric"] == "best_val_acc"


def test_ctrl_c_exits_130_and_the_same_command_continues(tmp_path: Path) -> None:
    """SIGINT mid-grid: exit 130, one line saying to rerun, runs KILLED; the rerun keeps the
    finished trials and trains only the rest."""
    import signal
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--arms", "ce,bake", "--seeds", "2", "--set", "epochs=3",
            "--set", "data.train_subset=400", "--max-concurrent", "1",
            "--storage", str(tmp_path / "rr"), "--tracking-uri", uri]  # fmt: skip
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bake_ray.compare", *args],
            cwd=tmp_path, env=_env(tmp_path), stdout=out, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while "epoch 1/3" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "rerun the same command to continue" in err.strip().splitlines()[-1]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("digits-compare")
    parent = next(
        r
        for r in client.search_runs([experiment.experiment_id])
        if "mlflow.parentRunId" not in r.data.tags
    )
    assert parent.info.status == "KILLED"

    again = _cli(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing" in again.stdout and "bake vs ce:" in again.stdout
    assert "ce-seed0  epoch 1/3" not in again.stdout  # resumed from its checkpoint
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 + 2 * 2
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_report_pairs_by_seed_and_states_its_rules() -> None:
    """Synthetic results: the table names the match rule, seeds and selection; a seed that
    did not finish is left out of the pairing and listed."""
    from types import SimpleNamespace

    from bake_ray.compare import report

    base = cfg.load(None, ["epochs=3"])
    arms = [compare.arm_values(base, k, k, [], "images") for k in ("ce", "ce_standard")]
    p = SimpleNamespace(
        arms=arms, seeds=[0, 1, 2], match="images", name="x", source="test", baseline="ce",
        metric="test_acc_at_best_val", extra={"same_class": 1, "epochs": 3}, recheck_of=None,
    )  # fmt: skip
    results = []
    for arm, accs in (("ce", [0.80, 0.82, 0.81]), ("ce_standard", [0.70, 0.71, 0.0])):
        for seed, acc in enumerate(accs):
            metrics = {"test_acc_at_best_val": acc, "test_acc": acc, "best_val_acc": acc}
            status = "unfinished" if acc == 0.0 else "finished"
            results.append(report.TrialResult(arm, seed, status, 3, metrics, 100, 10))
    summary = report.summarise(p, results)
    standard = summary.arms[1]
    assert standard.seeds == [0, 1] and standard.diff is not None and standard.diff.n == 2
    assert standard.diff.mean == pytest.approx(-0.105)
    text = report.format_report(p, summary)
    assert "match: images" in text and "here M=1 and epochs=3" in text
    assert "3 seeds (0, 1, 2)" in text and "best-validation epoch" in text
    assert "ce_standard vs ce: " in text and "ce_standard-seed2 unfinished" in text
    assert report.parent_metrics(summary)["ce_standard.diff_vs_ce"] == pytest.approx(-0.105)
