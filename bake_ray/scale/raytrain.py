"""Everything that touches Ray Train: the worker reporter and loop, and the worker group.

The training loop itself is :func:`bake_ray.core.engine.fit`; this module only adapts where its
metrics and checkpoints go. Ray must not replace the class-aware sampler, so loaders are
built by bake-ray with the worker's rank and world size (``prepare_data_loader`` is never
called), and the engine wraps the model in DDP itself over the process group Ray Train
initialised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.train.torch import TorchTrainer, get_device

from bake_ray.core import checkpoint as ckpt
from bake_ray.core.config import Config, ConfigError, from_dict, to_dict
from bake_ray.core.engine import Context, DivergenceError, diverged_metrics, fit
from bake_ray.core.rundir import append_metrics, format_progress, save_best
from bake_ray.scale.raystart import init_ray, ray_keeps_its_temp_files

_WORKER_LOG = logging.getLogger("bake_ray.worker")  # to the run's ray_train.log only


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


def local_checkpoint_file(
    checkpoint: Checkpoint | None, scratch: contextlib.ExitStack
) -> Path | None:
    """The checkpoint file of a Ray checkpoint, readable locally until ``scratch`` closes.

    ``Checkpoint.as_directory`` reads a checkpoint on this machine's disk where it is and
    downloads a remote one into a temporary folder that it removes when the context ends.
    """
    if checkpoint is None:
        return None
    return Path(scratch.enter_context(checkpoint.as_directory())) / ckpt.CHECKPOINT_FILE


class ResumeScratch:
    """Holds a downloaded resume checkpoint until the first report (the engine has loaded
    it by then), so no copy outlives the process that needed it."""

    def __init__(self) -> None:
        self._scratch = contextlib.ExitStack()

    def _done_loading(self) -> None:
        self._scratch.close()


class RayTrainReporter(ResumeScratch):
    """Reporter for a Ray Train worker: ``ray.train.report`` each epoch, resume from Ray.

    Progress lines, ``metrics.jsonl`` and ``best/`` are written once, on the controller, by
    :class:`RunDirCallback` (every worker printing gave each line once per worker).
    """

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self._done_loading()
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        if checkpoint_dir is not None:  # rank 0: which worker trained which epoch, in the log
            _WORKER_LOG.info(
                "(RayTrainWorker pid=%d) %s", os.getpid(), format_progress(metrics, self.epochs)
            )
        ray.train.report(metrics, checkpoint=checkpoint)

    def resume_from(self) -> Path | None:
        return local_checkpoint_file(ray.train.get_checkpoint(), self._scratch)


class RunDirCallback(UserCallback):
    """On the Train controller, after each report: one progress line, ``metrics.jsonl`` and
    ``best/checkpoint.pt``, the same run folder a local run writes."""

    def __init__(self, run_dir: str, epochs: int) -> None:
        self.run_dir = run_dir
        self.epochs = epochs

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None
    ) -> None:
        rank0 = metrics[0] if metrics else {}
        if "val_acc" not in rank0 or rank0.get("diverged"):
            return
        print(format_progress(rank0, self.epochs), flush=True)
        run_dir = Path(self.run_dir)
        append_metrics(run_dir, rank0)
        if checkpoint is not None and rank0.get("best_epoch") == rank0.get("epoch"):
            with checkpoint.as_directory() as local:
                save_best(Path(local) / ckpt.CHECKPOINT_FILE, run_dir)


def quiet_checkpoint_logs() -> None:
    """Ray logs a line per persisted checkpoint; bake-ray prints its own progress instead."""
    for name in ("ray.train.v2._internal.execution.storage", "ray.train._internal.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _report_log_to_file(log_file: str | None) -> None:
    """Ray Train logs every report (``Reporting training result N: TrainingReport(...)``) at
    INFO from each worker; that goes to ``log_file`` in the run folder, not the terminal."""
    if not log_file:
        return
    from ray.train.v2._internal.execution import context as train_context

    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    # Ray names its logger by file path.
    for logger in (logging.getLogger(train_context.__file__), _WORKER_LOG):
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def worker_loop(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: rebuild the config and run the shared engine."""
    quiet_checkpoint_logs()
    _report_log_to_file(loop_config.get("log_file"))
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
    log_file: str | None = None,
) -> TorchTrainer:
    """A TorchTrainer whose run name is stable, so a rerun resumes from its checkpoints."""
    return TorchTrainer(
        worker_loop,
        train_loop_config={
            "config": to_dict(config),
            "max_steps_per_epoch": max_steps_per_epoch,
            "log_file": log_file,
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


def check_cluster_fits(config: Config, address: str | None) -> None:
    """Fail before compute if the worker group can never be placed (it would wait forever).

    A joined cluster is judged by :mod:`bake_ray.scale.capacity`: at full scale when it has an
    autoscaler (the run then waits for nodes), as it is now otherwise.
    """
    need = config.runtime.workers
    if address or os.environ.get("RAY_ADDRESS"):
        from bake_ray.scale import capacity

        capacity.check_run_fits(need, config.runtime.gpu, capacity.join(address))
        return
    if config.runtime.gpu:
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
    from bake_ray.scale import capacity, pending

    with ray_keeps_its_temp_files():
        init_ray(address)
    config = absolute_paths(config)
    trainer = build_trainer(
        config,
        run_dir.name,
        str(run_dir.parent),
        callbacks=[RunDirCallback(str(run_dir), config.epochs)],
        log_file=str(run_dir / "ray_train.log"),
    )
    with pending.watch_pending(capacity.last_read_autoscales(), "worker group"):
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None or (result.metrics or {}).get("diverged"):
        return [result.metrics] if result.metrics else []
    with contextlib.ExitStack() as scratch:
        return list(ckpt.load(local_checkpoint_file(result.checkpoint, scratch)).get("history", []))
