"""Everything that touches Ray Train: reporters for workers and trials, and the worker group.

The training loop itself is :func:`bake_ray.engine.fit`; this module only adapts where its
metrics and checkpoints go. Ray must not replace the class-aware sampler, so loaders are
built by bake-ray with the worker's rank and world size (``prepare_data_loader`` is never
called), and the engine wraps the model in DDP itself over the process group Ray Train
initialised.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, get_device

from bake_ray import checkpoint as ckpt
from bake_ray.config import Config, ConfigError, from_dict, to_dict
from bake_ray.engine import Context, DivergenceError, diverged_metrics, fit

_TRAIN_DRIVER = "TRAIN_DRIVER"


def absolute_paths(config: Config) -> Config:
    """Workers and trials run in other directories: make every path in the config absolute."""
    data = config.data
    if data.data_dir is not None and "://" not in data.data_dir:
        data = dataclasses.replace(data, data_dir=str(Path(data.data_dir).expanduser().resolve()))
    model = config.model
    if model.weights is not None:
        model = dataclasses.replace(model, weights=str(Path(model.weights).expanduser().resolve()))
    runtime = dataclasses.replace(
        config.runtime, output_dir=str(Path(config.runtime.output_dir).expanduser().resolve())
    )
    return dataclasses.replace(config, data=data, model=model, runtime=runtime)


def _download(checkpoint: Checkpoint | None) -> Path | None:
    """Materialise a (possibly remote) Ray checkpoint locally; returns its checkpoint file."""
    if checkpoint is None:
        return None
    local = Path(tempfile.mkdtemp(prefix="bake_ray_resume_"))
    checkpoint.to_directory(str(local))
    return local / ckpt.CHECKPOINT_FILE


class RayTrainReporter:
    """Reporter for a Ray Train worker: ``ray.train.report`` each epoch, resume from Ray."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        if checkpoint_dir is not None:
            from bake_ray.train import format_progress

            print(format_progress(metrics, self.epochs), flush=True)
        ray.train.report(metrics, checkpoint=checkpoint)

    def resume_from(self) -> Path | None:
        return _download(ray.train.get_checkpoint())


class TuneReporter:
    """Reporter for a one-worker Tune trial that trains in the trial's own process."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    def resume_from(self) -> Path | None:
        from ray import tune

        return _download(tune.get_checkpoint())


def quiet_checkpoint_logs() -> None:
    """Ray logs a line per persisted checkpoint; bake-ray prints its own progress instead."""
    for name in ("ray.train.v2._internal.execution.storage", "ray.train._internal.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)


def worker_loop(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: rebuild the config and run the shared engine."""
    quiet_checkpoint_logs()
    context = ray.train.get_context()
    config = from_dict(loop_config["config"])
    ctx = Context(get_device(), context.get_world_rank(), context.get_world_size())
    try:
        fit(config, RayTrainReporter(config.epochs), ctx, loop_config.get("max_steps_per_epoch"))
    except DivergenceError as err:  # every worker agrees on the step, so all report this
        ray.train.report({**diverged_metrics(err), "error": str(err)})


def _nonzero(resources: dict[str, float] | None) -> dict[str, float] | None:
    """Ray rejects zero-valued entries; None keeps Ray Train's default (1 CPU, 1 GPU if used)."""
    if not resources:
        return None
    return {k: v for k, v in resources.items() if v > 0} or None


def build_trainer(
    config: Config,
    name: str,
    storage_path: str,
    callbacks: list[Any] | None = None,
    max_failures: int = 1,
    max_steps_per_epoch: int | None = None,
    resources_per_worker: dict[str, float] | None = None,
) -> TorchTrainer:
    """A TorchTrainer whose run name is stable, so a rerun resumes from its checkpoints."""
    return TorchTrainer(
        worker_loop,
        train_loop_config={
            "config": to_dict(config),
            "max_steps_per_epoch": max_steps_per_epoch,
        },
        scaling_config=ScalingConfig(
            num_workers=config.runtime.workers,
            use_gpu=config.runtime.gpu,
            resources_per_worker=_nonzero(resources_per_worker),
            placement_strategy="SPREAD" if config.runtime.workers > 1 else "PACK",
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks or [],
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_ray(address: str | None, **kwargs: Any) -> None:
    """Join ``address``/``RAY_ADDRESS`` if given, else start a local Ray with a driver slot.

    A local Ray gets its own dashboard port, and its actors are told where that dashboard
    is: otherwise Ray Train's placement-group cleaner fails with "multiple active Ray
    instances" whenever another Ray runs on the host, and later trials wait for ever.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    port = _free_port()
    env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    ray.init(
        resources={_TRAIN_DRIVER: 64},
        dashboard_port=port,
        runtime_env={"env_vars": env},
        **kwargs,
    )


def check_cluster_fits(config: Config, address: str | None) -> None:
    """Fail before compute if the worker group can never be placed (it would wait forever)."""
    need = config.runtime.workers
    if address or os.environ.get("RAY_ADDRESS"):
        init_ray(address)
        available = ray.cluster_resources().get("GPU" if config.runtime.gpu else "CPU", 0)
    elif config.runtime.gpu:
        import torch

        available = torch.cuda.device_count()
    else:
        available = os.cpu_count() or 1
    kind = "GPUs" if config.runtime.gpu else "CPUs"
    if need > available:
        raise ConfigError(
            f"runtime.workers: {need} workers need {need} {kind}, the cluster has {available:g}"
        )


def run_workers(config: Config, run_dir: Path, address: str | None) -> list[dict[str, float]]:
    """Train with ``config.runtime.workers`` Ray Train workers; checkpoints land in run_dir."""
    init_ray(address)
    config = absolute_paths(config)
    trainer = build_trainer(config, run_dir.name, str(run_dir.parent))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None or (result.metrics or {}).get("diverged"):
        return [result.metrics] if result.metrics else []
    return list(ckpt.load(_download(result.checkpoint)).get("history", []))
