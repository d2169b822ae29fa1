"""Malformed and hostile input to both entry points, ``python -m bake_ray.train`` and
``python -m bake_ray.tune``: each must exit 2 with exactly one line on stderr naming the
problem (no traceback) and write nothing, because every check runs before Ray, MLflow or
any training starts. Hostile files (a checkpoint that runs code when unpickled, YAML with
Python tags) must fail to load without running anything.

The table runs its subprocesses two at a time (each costs a few seconds of imports);
every case is still its own test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from reliability_helpers import child_env, free_port, tree_snapshot

from bake_ray.core import checkpoint as ckpt
from bake_ray.core import config as cfg
from bake_ray.core import search_space as ss
from bake_ray.core.config import ConfigError

#: A valid search file: cases that are not about the space itself start from it.
GOOD_SPACE = """
name: ok
base: {epochs: 2, data: {dataset: digits, batch_size: 32, train_subset: 256}}
space: {bake.omega: {distribution: uniform, low: 0.0, high: 0.9}}
budget: {num_samples: 2, max_concurrent: 1}
"""


def _space(**replace: str) -> str:
    """GOOD_SPACE with whole top-level sections replaced (YAML flow text)."""
    lines = [line for line in GOOD_SPACE.strip().splitlines() if line.split(":")[0] not in replace]
    return "\n".join([*lines, *(f"{k}: {v}" for k, v in replace.items())]) + "\n"


def _omega(low: float, high: float) -> str:
    return f"{{bake.omega: {{distribution: uniform, low: {low}, high: {high}}}}}"


#: ``!!python/object/apply`` runs a callable when an unsafe loader reads the file.
PYTHON_TAG = '!!python/object/apply:os.system ["touch @WORK@/pwned"]'


class RunsCode:
    """Pickles to ``os.system("touch <marker>")``: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@dataclass(frozen=True)
class Case:
    """One malformed input: the CLI, its arguments, the files it reads, the expected error.

    ``@IN@`` (the read-only inputs folder), ``@WORK@`` (the empty working directory) and
    ``@PORT@`` (a closed TCP port) are substituted in ``args`` and ``files``.
    """

    id: str
    entry: str
    args: tuple[str, ...]
    expect: str
    files: dict[str, str] = field(default_factory=dict)
    run_dir: str | None = None  # "corrupt" or "hostile": a run folder to --resume

    def __str__(self) -> str:
        return self.id


CASES = [
    # ---------------------------------------------------------------- train
    Case("train-yaml-syntax", "train", ("--config", "@IN@/c.yaml"), "invalid YAML",
         {"c.yaml": "epochs: [1, 2\nseed: 0\n"}),
    Case("train-wrong-type", "train", ("--config", "@IN@/c.yaml"),
         "data.batch_size: expected int, got 'big'", {"c.yaml": "data: {batch_size: big}\n"}),
    Case("train-unknown-key", "train", ("--set", "optim.learning_rate=0.1"),
         "optim.learning_rate: unknown key"),
    Case("train-missing-data-dir", "train",
         ("--set", "data.dataset=cifar10", "--set", "data.data_dir=@IN@/nowhere"),
         "data.data_dir: @IN@/nowhere does not exist"),
    Case("train-unknown-model", "train", ("--set", "model.name=vit_h14"),
         "model.name: unknown 'vit_h14'"),
    Case("train-unknown-dataset", "train", ("--config", "@IN@/c.yaml"),
         "data.dataset: unknown 'imagenet22k'", {"c.yaml": "data: {dataset: imagenet22k}\n"}),
    Case("train-corrupt-checkpoint", "train", ("--resume", "@IN@/run"),
         "no loadable checkpoint", run_dir="corrupt"),
    Case("train-hostile-checkpoint", "train", ("--resume", "@IN@/run"),
         "no loadable checkpoint", run_dir="hostile"),
    Case("train-yaml-python-tag", "train", ("--config", "@IN@/c.yaml"),
         "could not determine a constructor for the tag",
         {"c.yaml": f"seed: {PYTHON_TAG}\n"}),
    Case("train-imagefolder-classes-differ", "train",
         ("--set", "data.dataset=imagefolder", "--set", "data.data_dir=@IN@/img"),
         "data.data_dir: class folders of @IN@/img/val differ from those of @IN@/img/train "
         "(only in train: bee; only in val: wasp)",
         {"img/train/ant/0.png": "x", "img/train/bee/0.png": "x", "img/val/ant/0.png": "x",
          "img/val/wasp/0.png": "x"}),
    Case("train-argument-type", "train", ("--workers", "two"),
         "error: argument --workers: invalid int value: 'two'"),
    # ---------------------------------------------------------------- tune
    Case("tune-yaml-syntax", "tune", ("--config", "@IN@/s.yaml"), "invalid YAML",
         {"s.yaml": "space: {bake.omega: {distribution: uniform, low: 0\n"}),
    Case("tune-not-a-config-key", "tune", ("--config", "@IN@/s.yaml"),
         "space.optim.learning_rate: not a config field",
         {"s.yaml": _space(space="{optim.learning_rate: {distribution: uniform, high: 1}}")}),
    Case("tune-empty-range", "tune", ("--config", "@IN@/s.yaml"),
         "space.bake.omega: empty or inverted range", {"s.yaml": _space(space=_omega(0.5, 0.5))}),
    Case("tune-inverted-range", "tune", ("--config", "@IN@/s.yaml"),
         "space.bake.omega: empty or inverted range", {"s.yaml": _space(space=_omega(0.8, 0.2))}),
    Case("tune-omega-reaches-1", "tune", ("--config", "@IN@/s.yaml"),
         "space.bake.omega: values must lie in [0, 1)", {"s.yaml": _space(space=_omega(0.0, 1.0))}),
    Case("tune-impossible-budget", "tune", ("--config", "@IN@/s.yaml"),
         "budget: one trial needs 64 CPUs",
         {"s.yaml": _space(budget="{num_samples: 2, workers_per_trial: 64}")}),
    Case("tune-wrong-type", "tune", ("--config", "@IN@/s.yaml"),
         "budget.num_samples: expected int, got 'many'",
         {"s.yaml": _space(budget="{num_samples: many}")}),
    Case("tune-unknown-section", "tune", ("--config", "@IN@/s.yaml"),
         "budgets: unknown key in a search file", {"s.yaml": _space(budgets="{num_samples: 2}")}),
    Case("tune-yaml-python-tag", "tune", ("--config", "@IN@/s.yaml"),
         "could not determine a constructor for the tag", {"s.yaml": _space(name=PYTHON_TAG)}),
    Case("tune-out-of-range", "tune",
         ("--config", "@IN@/s.yaml", "--set", "data.val_fraction=0.9"),
         "data.val_fraction: must be in (0, 0.5], got 0.9", {"s.yaml": GOOD_SPACE}),
    Case("tune-resume-nothing", "tune", ("--config", "@IN@/s.yaml", "--resume", "--name", "nope"),
         "--resume: @WORK@/ray_results/nope holds no restorable search", {"s.yaml": GOOD_SPACE}),
    Case("tune-set-searched-key", "tune",
         ("--config", "@IN@/s.yaml", "--set", "bake.omega=0.7"),
         "--set bake.omega: bake.omega is searched (space.bake.omega)", {"s.yaml": GOOD_SPACE}),
    Case("train-search-file", "train", ("--config", "@IN@/s.yaml"),
         "--config @IN@/s.yaml: this is a search-space file; run it with python -m bake_ray.tune",
         {"s.yaml": GOOD_SPACE}),
    Case("tune-resume-none-unfinished", "tune", ("--resume",),
         "--resume: no unfinished search under @WORK@/ray_results; name one with --name"),
    Case("tune-tracking-is-a-directory", "tune",
         ("--config", "@IN@/s.yaml", "--tracking-uri", "sqlite:///@IN@"),
         "is a directory, not an SQLite database file", {"s.yaml": GOOD_SPACE}),
    Case("tune-tracking-not-a-database", "tune",
         ("--config", "@IN@/s.yaml", "--tracking-uri", "sqlite:///@IN@/s.yaml"),
         "is not a usable SQLite database: file is not a database", {"s.yaml": GOOD_SPACE}),
    Case("tune-tracking-unreachable", "tune",
         ("--config", "@IN@/s.yaml", "--tracking-uri", "http://127.0.0.1:@PORT@"),
         "MLflow tracking server http://127.0.0.1:@PORT@ is unreachable", {"s.yaml": GOOD_SPACE}),
    Case("tune-argument-type", "tune", ("--config", "@IN@/s.yaml", "--num-samples", "many"),
         "error: argument --num-samples: invalid int value: 'many'", {"s.yaml": GOOD_SPACE}),
]  # fmt: skip


@dataclass
class Outcome:
    """What one case did: its process result and the folders it must have left alone."""

    case: Case
    result: subprocess.CompletedProcess[str]
    inputs: Path
    work: Path
    inputs_before: dict[str, tuple[int, int]]
    port: int

    def sub(self, text: str) -> str:
        return (
            text.replace("@IN@", str(self.inputs))
            .replace("@WORK@", str(self.work))
            .replace("@PORT@", str(self.port))
        )


def _make_run_dir(root: Path, kind: str, marker: Path) -> None:
    """A run folder with a valid config.yaml whose only checkpoint is unusable."""
    root.mkdir()
    cfg.save(cfg.load(), root / "config.yaml")
    target = root / "checkpoints" / "epoch_0001" / ckpt.CHECKPOINT_FILE
    target.parent.mkdir(parents=True)
    if kind == "corrupt":
        state = {"model": {"w": torch.zeros(1000)}, "epoch": 1}
        torch.save(state, target)
        target.write_bytes(target.read_bytes()[:900])  # cut short, as by a full disk
    else:
        torch.save({"model": RunsCode(marker), "epoch": 1}, target)


def _prepare(case: Case, root: Path) -> Outcome:
    inputs, work = root / "inputs", root / "work"
    inputs.mkdir(parents=True)
    work.mkdir()
    out = Outcome(case, None, inputs, work, {}, free_port())  # type: ignore[arg-type]
    for name, text in case.files.items():
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        (inputs / name).write_text(out.sub(text))
    if case.run_dir:
        _make_run_dir(inputs / "run", case.run_dir, work / "pwned")
    out.inputs_before = tree_snapshot(inputs)
    return out


def _run(out: Outcome) -> Outcome:
    args = [out.sub(a) for a in out.case.args]
    if out.case.entry == "tune":  # everything the search could write goes inside work/
        args += ["--storage", str(out.work / "ray_results")]
        if "--tracking-uri" not in args:
            args += ["--tracking-uri", f"sqlite:///{out.work}/db/mlflow.db"]
    else:
        args += ["--set", f"runtime.output_dir={out.work}/runs"]
    out.result = subprocess.run(
        [sys.executable, "-m", f"bake_ray.{out.case.entry}", *args],
        cwd=out.work, env=child_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the selected cases, two subprocesses at a time (the CLIs are import-bound)."""
    selected = {
        item.callspec.params["case"].id
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_bad_input_exits_2_with_one_line"
    }
    todo = [
        _prepare(c, tmp_path_factory.mktemp(c.id, numbered=True)) for c in CASES if c.id in selected
    ]
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return {o.case.id: o for o in pool.map(_run, todo)}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_exits_2_with_one_line(case: Case, outcomes: dict[str, Outcome]) -> None:
    """Exit 2, one stderr line that names the problem, no traceback, nothing written."""
    out = outcomes[case.id]
    stderr = out.result.stderr
    assert out.result.returncode == 2, f"rc={out.result.returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert out.sub(case.expect) in lines[0], lines[0]
    assert out.result.stdout == ""
    assert sorted(out.work.iterdir()) == [], "bad input wrote files"  # no ray_results, no db
    assert tree_snapshot(out.inputs) == out.inputs_before, "bad input changed its inputs"


# --------------------------------------------------------------------------- untrusted files


def test_hostile_checkpoint_fails_to_load_without_running_code(tmp_path: Path) -> None:
    """A checkpoint that runs a shell command when unpickled: ``weights_only=True`` loading
    refuses it with one line and the command never runs (checked against a control load
    with full pickle, which does run it)."""
    control, marker = tmp_path / "control-ran", tmp_path / "pwned"
    torch.save({"model": RunsCode(control), "epoch": 1}, tmp_path / "control.pt")
    with (tmp_path / "control.pt").open("rb") as handle:
        torch.load(handle, weights_only=False)  # the unsafe way, on purpose
    assert control.exists(), "control: the file does not run code, the test proves nothing"

    path = tmp_path / "checkpoint.pt"
    torch.save({"model": RunsCode(marker), "epoch": 1}, path)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: cannot load checkpoint")
    assert message.endswith("refused: it holds code, not plain data (global posix.system)")
    assert not marker.exists()


def test_yaml_python_tags_are_rejected_everywhere(tmp_path: Path) -> None:
    """Config files, search files and ``--set`` values are parsed with a safe loader: a
    ``!!python/object/apply`` tag is an error, never a call (control: PyYAML's unsafe
    loader would run it)."""
    marker = tmp_path / "pwned"
    tag = PYTHON_TAG.replace("@WORK@", str(tmp_path))
    yaml.unsafe_load(f"seed: {tag.replace('pwned', 'control-ran')}")
    assert (tmp_path / "control-ran").exists(), "control: the tag does not run code"

    config = tmp_path / "c.yaml"
    config.write_text(f"seed: {tag}\n")
    space = tmp_path / "s.yaml"
    space.write_text(_space(name=tag))
    for load in (lambda: cfg.load(config), lambda: ss.load(space)):
        with pytest.raises(ConfigError, match="could not determine a constructor"):
            load()
    with pytest.raises(ConfigError, match="--set seed: cannot parse value"):
        cfg.load(overrides=[f"seed={tag}"])
    assert not marker.exists()


def test_config_names_are_choices_never_imports() -> None:
    """Every config value that selects code is one of a fixed set of names: a dotted path to
    a Python callable is rejected like any unknown name."""
    for key in ("model.name", "method", "data.dataset", "optim.schedule"):
        with pytest.raises(ConfigError, match=f"{key}: unknown 'os.system'"):
            cfg.load(overrides=[f"{key}=os.system"])


def test_checkpoints_hold_only_plain_types(tmp_path: Path) -> None:
    """What the engine saves loads back under ``weights_only=True`` (so the safe loader is
    not a burden): a real checkpoint round-trips through :func:`ckpt.load`."""
    from bake_ray.train import main

    args = ["--set=epochs=1", "--set=data.train_subset=256", "--set=data.batch_size=32"]
    assert main([*args, f"--set=runtime.output_dir={tmp_path}", "--set=runtime.run_name=r"]) == 0
    state = ckpt.load(tmp_path / "r" / "checkpoints" / "epoch_0001")
    assert state["epoch"] == 1 and state["config"]["seed"] == 0
