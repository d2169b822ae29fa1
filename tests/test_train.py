"""Real training runs: local digits accuracy, exact resume, checkpoints, CLI errors, Ray Train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bake_ray.core import checkpoint as ckpt
from bake_ray.core import config as cfg
from bake_ray.core.engine import Context, fit, lr_factor
from bake_ray.train import LocalReporter, main

SMALL = ["epochs=3", "optim.schedule=constant", "data.train_subset=512", "data.batch_size=32"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bake_ray.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_local_digits_run_reaches_90_percent_test_accuracy(tmp_path, capsys):
    code = main(
        [
            "--set",
            "epochs=6",
            "--set",
            f"runtime.output_dir={tmp_path}",
            "--set",
            "runtime.run_name=digits",
        ]
    )
    assert code == 0
    run = tmp_path / "digits"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["test_acc_at_best_val"] >= 0.90
    assert history[-1]["train_kd"] > 0  # BAKE's distillation term is really in the loss
    assert cfg.load(run / "config.yaml").epochs == 6  # resolved config saved with the run
    assert (run / "best" / "checkpoint.pt").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0005", "epoch_0006"]
    out = capsys.readouterr().out
    assert "epoch   6/6" in out and "img/s" in out and "done: best val" in out


class CrashAfter(LocalReporter):
    """A LocalReporter whose process 'dies' right after saving a given epoch."""

    crash_epoch: int = 0

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if int(metrics["epoch"]) == self.crash_epoch:
            raise KeyboardInterrupt


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(path)["model"]


def test_resume_after_a_crash_is_exact(tmp_path):
    config = cfg.load(overrides=[*SMALL, "optim.schedule=step", "epochs=4"])
    straight = tmp_path / "straight"
    straight.mkdir()
    fit(config, LocalReporter(straight, config.epochs), Context(torch.device("cpu")))

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    reporter = CrashAfter(crashed, config.epochs)
    reporter.crash_epoch = 2
    with pytest.raises(KeyboardInterrupt):
        fit(config, reporter, Context(torch.device("cpu")))
    resume = ckpt.latest_good(crashed)
    assert resume is not None and resume.parent.name == "epoch_0002"
    history = fit(
        config, LocalReporter(crashed, config.epochs, resume), Context(torch.device("cpu"))
    )

    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    a = _weights(straight / "checkpoints" / "epoch_0004")
    b = _weights(crashed / "checkpoints" / "epoch_0004")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["train_loss"] for x in lines] == [h["train_loss"] for h in history]


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path):
    code = main(
        [
            "--set",
            "epochs=2",
            "--set",
            f"runtime.output_dir={tmp_path}",
            "--set",
            "runtime.run_name=r",
            *[f"--set={s}" for s in SMALL[1:]],
        ]
    )
    assert code == 0
    newest = tmp_path / "r" / "checkpoints" / "epoch_0002" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a save cut short by a crash
    found = ckpt.latest_good(tmp_path / "r")
    assert found is not None and found.parent.name == "epoch_0001"
    assert main(["--resume", str(tmp_path / "r"), "--set", "epochs=3"]) == 0
    assert ckpt.load(tmp_path / "r" / "checkpoints" / "epoch_0003")["epoch"] == 3


def test_lr_schedules():
    c = cfg.load(overrides=["epochs=10", "optim.warmup_epochs=2", "optim.schedule=cosine"]).optim
    assert lr_factor(0, 10, 10, c) == pytest.approx(1 / 20)
    assert lr_factor(19, 10, 10, c) == pytest.approx(1.0)
    assert lr_factor(20, 10, 10, c) == pytest.approx(1.0)
    assert lr_factor(60, 10, 10, c) == pytest.approx(0.5)
    assert lr_factor(100, 10, 10, c) == pytest.approx(0.0, abs=1e-12)
    step = cfg.load(overrides=["epochs=10"]).optim
    assert [lr_factor(s * 10, 10, 10, step) for s in (0, 4, 5, 7, 8)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "bake.omega=1.5"], "error: bake.omega: must be in [0, 1), got 1.5"),
        (
            ["--set", "data.batch_size=30", "--set", "data.same_class=3"],
            "error: data.batch_size: 30 must be divisible by data.same_class + 1 = 4",
        ),
        (
            ["--set", "data.dataset=imagefolder", "--set", "data.data_dir=/nonexistent"],
            "error: data.data_dir: /nonexistent does not exist",
        ),
        (["--config", "missing.yaml"], "error: missing.yaml: cannot read"),
        (["--resume", "nowhere"], "error: --resume nowhere: no config.yaml there"),
        (["--workers", "64"], "error: runtime.workers: 64 workers need 64 CPUs"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, message):
    result = run_cli(*args, "--set", "runtime.output_dir=out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_corrupt_checkpoint_is_rejected_before_training(tmp_path):
    assert (
        main(
            [
                "--set",
                "epochs=1",
                "--set",
                f"runtime.output_dir={tmp_path}",
                "--set",
                "runtime.run_name=r",
                *[f"--set={s}" for s in SMALL[1:]],
            ]
        )
        == 0
    )
    only = tmp_path / "r" / "checkpoints" / "epoch_0001" / "checkpoint.pt"
    only.write_bytes(b"not a checkpoint")
    before = sorted(p.name for p in (tmp_path / "r").rglob("*"))
    result = run_cli("--resume", str(tmp_path / "r"), cwd=tmp_path)
    assert result.returncode == 2
    assert "no loadable checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (tmp_path / "r").rglob("*")) == before


@pytest.mark.slow
def test_two_ray_train_workers_checkpoint_and_resume(tmp_path, ray_local):
    args = [
        "--workers",
        "2",
        "--set",
        f"runtime.output_dir={tmp_path}",
        "--set",
        "runtime.run_name=ddp",
        *[f"--set={s}" for s in SMALL],
    ]
    assert main([*args[:-3], "--set=epochs=2", *args[-2:]]) == 0
    run = tmp_path / "ddp"
    first = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())
    assert first, "Ray Train wrote no checkpoint"
    state = ckpt.load(run / first[-1])
    assert state["epoch"] == 2 and len(state["history"]) == 2

    # The first part ran a step schedule over 2 epochs: a longer run must say how it goes on.
    assert main(["--resume", str(run), "--set", "epochs=3", "--extend-schedule"]) == 0
    latest = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())[-1]
    resumed = ckpt.load(latest)
    assert resumed["epoch"] == 3
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]  # continued, not restarted
    # The same run folder as a local run: metrics.jsonl (once per epoch) and best/.
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    best = ckpt.load(run / "best" / ckpt.CHECKPOINT_FILE)
    assert best["epoch"] == int(resumed["history"][-1]["best_epoch"])
    assert "Reporting training result" in (run / "ray_train.log").read_text()


@pytest.mark.slow
def test_cifar100_recipe_trains_with_three_classmates_per_anchor(tmp_path, monkeypatch):
    """The shipped CIFAR-100 recipe (N=128, M=3, its optimizer and loader workers) through
    a real one-epoch run on small fake CIFAR-100 files in the real format. Only what the
    CPU budget needs changes: one epoch, 256 images, and the small CNN for the ResNet-18."""
    from test_data import _trust_fake_cifar, _write_cifar
    from torchvision import datasets

    from bake_ray.core import search_space as ss

    _write_cifar(tmp_path / "data", datasets.CIFAR100, 100, per_file=400)
    _trust_fake_cifar(tmp_path / "data", datasets.CIFAR100, monkeypatch)
    recipe = ss.load(Path(__file__).resolve().parents[1] / "search_spaces" / "cifar100.yaml")
    assert (recipe.base.data.batch_size, recipe.base.data.same_class) == (128, 3)
    cfg.save(recipe.base, tmp_path / "recipe.yaml")
    changes = ["epochs=1", "data.train_subset=256", "model.name=small_cnn", "data.download=false",
               f"data.data_dir={tmp_path / 'data'}", f"runtime.output_dir={tmp_path / 'runs'}",
               "runtime.run_name=c100"]  # fmt: skip
    assert main(["--config", str(tmp_path / "recipe.yaml"), *[f"--set={c}" for c in changes]]) == 0
    run = tmp_path / "runs" / "c100"
    saved = cfg.load(run / "config.yaml")
    data = saved.data
    assert (data.dataset, data.batch_size, data.same_class) == ("cifar100", 128, 3)
    (metrics,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics["train_kd"] > 0 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert ckpt.load(run / "checkpoints" / "epoch_0001")["config"]["data"]["same_class"] == 3


def test_best_config_of_a_one_worker_search_trains_in_process(tmp_path, monkeypatch):
    """``runtime.workers`` has one meaning: a one-worker search's trials train in their own
    process (workers 0), its best_config.yaml says so unchanged, and ``train --config`` of
    it trains here, without Ray."""
    from types import SimpleNamespace

    from bake_ray.core import search_space as ss
    from bake_ray.scale import raytrain
    from bake_ray.tune.cli import DEFAULT_SPACE
    from bake_ray.tune.plan import Plan
    from bake_ray.tune.summary import best_config

    space = ss.load(DEFAULT_SPACE)
    assert space.budget.workers_per_trial == 1
    params = dict(space.initial_points[0])
    assert ss.trial_config(space, params).runtime.workers == 0  # what every trial ran with
    best = best_config(
        Plan(space, str(tmp_path), "s", "sqlite:///x.db"), SimpleNamespace(params=params)
    )
    assert best == ss.trial_config(space, params)  # written as the trials ran, no rewrite
    cfg.save(best, tmp_path / "best_config.yaml")

    def no_ray(*args, **kwargs):
        raise AssertionError("a one-worker search's best config started Ray Train workers")

    monkeypatch.setattr(raytrain, "run_workers", no_ray)
    args = [
        "epochs=1",
        "data.train_subset=256",
        f"runtime.output_dir={tmp_path}",
        "runtime.run_name=b",
    ]
    assert (
        main(["--config", str(tmp_path / "best_config.yaml"), *[f"--set={a}" for a in args]]) == 0
    )
    assert (tmp_path / "b" / "checkpoints" / "epoch_0001").is_dir()  # a local run's layout
