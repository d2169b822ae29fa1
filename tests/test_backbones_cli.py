"""timm models and local weights as a user meets them: the real CLIs, real Ray Train workers,
a real search on an ImageFolder tree with the shipped fine-tuning space."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from safetensors.torch import load_file, save_file

from bake_ray import train as bake_train
from bake_ray.core import checkpoint as ckpt
from bake_ray.core import config as cfg
from bake_ray.tune import cli as bake_tune

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
CLASSES = ("circle", "square", "stripes")


def make_imagefolder(root: Path, per_class: int = 16, size: int = 32) -> Path:
    """train/ and val/ class folders of small PNGs whose class shows in their colour."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("val", per_class // 4)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.rand(size, size, 3, generator=generator) * 0.5
                pixels[..., c] += 0.5
                array = (pixels * 255).to(torch.uint8).numpy()
                Image.fromarray(array).save(folder / f"{i:03d}.png")
    return root


def timm_weights(path: Path, arch: str, classes: int = 1000, channels: int = 3) -> Path:
    """A state dict exactly as timm saves it (what a user brings), with ImageNet's classes."""
    import timm

    torch.manual_seed(1)
    state = timm.create_model(arch, num_classes=classes, in_chans=channels).state_dict()
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def run_train_cli(*args: str, cwd: Path, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "bake_ray.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


# --------------------------------------------------------------------------- bad input


def _bad_cases(tmp: Path) -> list[tuple[list[str], str, dict[str, str]]]:
    corrupt = tmp / "corrupt.pt"
    corrupt.write_bytes(b"not a weights file")
    other = timm_weights(tmp / "convnext.pt", "test_convnext", channels=1)
    rgb = timm_weights(tmp / "rgb.safetensors", "test_resnet", channels=3)
    resnet = ["--set", "model.name=timm/test_resnet"]
    return [
        (
            ["--set", "model.name=timm/resnet_18"],
            "error: model.name: unknown timm model 'resnet_18'; close matches: timm/resnet18",
            {},
        ),
        (
            ["--set", "model.name=torchvision/squeezenet1_1"],
            "error: model.name: torchvision/squeezenet1_1 cannot give pooled features for BAKE",
            {},
        ),
        (
            ["--set", "model.name=timm/test_vit"],  # digits are 8x8, the ViT's patches 16x16
            "error: model.name: timm/test_vit does not run on 1x8x8 inputs",
            {},
        ),
        (
            [*resnet, "--set", f"model.weights={tmp / 'nowhere.pt'}"],
            f"error: model.weights: {tmp / 'nowhere.pt'} not found",
            {},
        ),
        (
            [*resnet, "--set", f"model.weights={corrupt}"],
            f"error: model.weights: {corrupt}: cannot load:",
            {},
        ),
        (
            [*resnet, "--set", f"model.weights={other}"],
            "error: model.weights: none of the ",
            {},
        ),
        (
            [*resnet, "--set", f"model.weights={rgb}"],  # an RGB stem for 1-channel digits
            f"error: model.weights: {rgb} does not fit timm/test_resnet: net.conv1.0.weight",
            {},
        ),
        (
            ["--set", "model.pretrained=true"],
            "error: model.pretrained: the built-in small_cnn has no pretrained weights",
            {},
        ),
        (
            [*resnet, "--set", "model.pretrained=true"],  # timm's own download, offline
            "error: model.pretrained: cannot get the pretrained weights of timm/test_resnet",
            {"HF_HUB_OFFLINE": "1"},
        ),
    ]


@pytest.mark.slow
def test_bad_models_and_weights_exit_2_with_one_line_and_write_nothing(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cases = _bad_cases(inputs)

    def run(case: tuple[list[str], str, dict[str, str]]) -> tuple[str, object]:
        args, _, env = case
        out = tmp_path / f"out{cases.index(case)}"
        result = run_train_cli(*args, "--set", f"runtime.output_dir={out}", cwd=tmp_path, env=env)
        return str(out), result

    with ThreadPoolExecutor(max_workers=2) as pool:  # two CLI processes at a time: 2 cores
        results = list(pool.map(run, cases))
    for (args, message, _), (out, result) in zip(cases, results, strict=True):
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert result.stderr.startswith(message), (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert not Path(out).exists(), args  # refused before the run directory was made


# --------------------------------------------------------------------------- real runs


def _close_to_file(model_state: dict, file_state: dict, prefix: str = "net.") -> bool:
    """Backbone weights equal to the file's up to what a 1e-9 learning rate can move them."""
    convs = [k for k, v in file_state.items() if v.ndim == 4]
    return bool(convs) and all(
        torch.allclose(model_state[prefix + k], file_state[k], atol=1e-6) for k in convs
    )


@pytest.mark.slow
def test_local_run_fine_tunes_from_a_weights_file_with_another_class_count(tmp_path: Path):
    """A 1000-class timm file into a 3-class ImageFolder run: backbone loaded, head reset."""
    tree = make_imagefolder(tmp_path / "tree")
    weights = timm_weights(tmp_path / "w.safetensors", "test_resnet")
    result = run_train_cli(
        "--set", "data.dataset=imagefolder", "--set", f"data.data_dir={tree}",
        "--set", "data.batch_size=8", "--set", "model.name=timm/test_resnet",
        "--set", f"model.weights={weights}", "--set", "epochs=1", "--set", "optim.lr=1e-9",
        "--set", "optim.weight_decay=0", "--set", "runtime.output_dir=out",
        "--set", "runtime.run_name=ft", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    file_state = load_file(str(weights))
    n_backbone = sum(not k.startswith("fc.") for k in file_state)
    assert (
        f"model.weights: loaded {n_backbone} tensors from {weights}; skipped 0 not in the model; "
        "reinitialised 2 classifier tensors (the file has 1000 classes, this run 3)"
    ) in result.stdout
    saved = ckpt.load(tmp_path / "out" / "ft" / "checkpoints" / "epoch_0001")
    assert saved["model"]["net.fc.weight"].shape[0] == 3
    assert _close_to_file(saved["model"], file_state)


@pytest.mark.slow
def test_two_ray_train_workers_train_a_timm_model_from_weights(
    tmp_path: Path, ray_local, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m bake_ray.train --workers 2` with a timm model: DDP, global BAKE, weights
    given as a relative path (workers run elsewhere: it is made absolute for them)."""
    monkeypatch.chdir(tmp_path)
    weights = timm_weights(tmp_path / "w.pt", "test_resnet", classes=1000, channels=1)
    code = bake_train.main(
        [
            "--workers", "2", "--set", "model.name=timm/test_resnet",
            "--set", "model.weights=w.pt", "--set", "epochs=1", "--set", "optim.lr=1e-9",
            "--set", "optim.weight_decay=0", "--set", "data.train_subset=128",
            "--set", "data.batch_size=16", "--set", f"runtime.output_dir={tmp_path}",
            "--set", "runtime.run_name=ddp",
        ]
    )  # fmt: skip
    assert code == 0
    run = tmp_path / "ddp"
    last = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())[-1]
    state = ckpt.load(last)
    assert state["epoch"] == 1 and state["config"]["runtime"]["workers"] == 2
    assert state["config"]["model"]["weights"] == str(weights)  # made absolute for workers
    assert state["model"]["net.fc.weight"].shape[0] == 10
    assert _close_to_file(state["model"], torch.load(weights, weights_only=True))


@pytest.mark.slow
def test_shipped_fine_tuning_space_searches_an_imagefolder(tmp_path, ray_local, mlflow_server):
    """search_spaces/timm_finetune.yaml as shipped, pointed at a tree and a weights file."""
    tree = make_imagefolder(tmp_path / "tree")
    weights = timm_weights(tmp_path / "resnet18.safetensors", "resnet18")
    code = bake_tune.main(
        [
            "--config", str(SPACES_DIR / "timm_finetune.yaml"),
            "--set", f"data.data_dir={tree}", "--set", f"model.weights={weights}",
            "--set", "epochs=2", "--set", "data.batch_size=16", "--set", "data.loader_workers=0",
            "--set", "budget.num_samples=2", "--set", "budget.max_concurrent=1",
            "--set", "budget.gpus_per_worker=0", "--set", "budget.cpus_per_worker=1",
            "--set", "scheduler.grace_period=1",
            "--storage", str(tmp_path / "storage"), "--tracking-uri", mlflow_server,
            "--name", "ft-1",
        ]
    )  # fmt: skip
    assert code == 0
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("timm-finetune")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    for child in children:
        assert child.data.params["model.name"] == "timm/resnet18"
        assert child.data.params["model.weights"] == str(weights)
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")][:1] == [1]
    best = cfg.load(tmp_path / "storage" / "ft-1" / "best_config.yaml")
    assert best.model.weights == str(weights) and best.data.dataset == "imagefolder"
