"""One search trial, as Ray Tune runs it: a BAKE training run in-process or on workers.

``runtime.workers`` means what it means for ``train``: 0 trains in the trial's own process
(a one-worker budget), N drives N Ray Train workers.

Kept apart from :mod:`bake_ray.tune` so a trial process imports only what training needs
(no MLflow, no Optuna): every trial process pays its imports, and Tune reuses a finished
trial's process for the next trial when it can.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bake_ray import config as cfg
from bake_ray import search_space as ss
from bake_ray.raytrain import ResumeScratch, local_checkpoint_file

BASE_KEY = "_bake_ray_base"  # constant entries of every trial's Tune config
TRAIN_STORAGE_KEY = "_bake_ray_train_storage"
WORKER_GROUP_KEY = "_bake_ray_always_use_worker_group"  # read from runtime.workers now
WORKER_RESOURCES_KEY = "_bake_ray_worker_resources"


def trial_params(trial_config: dict[str, Any]) -> dict[str, Any]:
    """The sampled parameters only (dotted config keys), without bake-ray's constants."""
    return {k: v for k, v in trial_config.items() if not k.startswith("_bake_ray")}


def resolved_trial_config(trial_config: dict[str, Any]) -> cfg.Config:
    """The full training config of a trial: the base with the sampled params applied."""
    return cfg.from_dict(ss.apply_params(trial_config[BASE_KEY], trial_params(trial_config)))


class TuneReporter(ResumeScratch):
    """Reporter for a trial that trains in its own process: ``tune.report`` each epoch, and
    resume from the checkpoint Tune hands a restarted trial."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        from ray import tune

        self._done_loading()
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    def resume_from(self) -> Path | None:
        from ray import tune

        return local_checkpoint_file(tune.get_checkpoint(), self._scratch)


def run_trial(trial_config: dict[str, Any]) -> None:
    """Tune function trainable: one BAKE training run, in-process or on Ray Train workers."""
    config = resolved_trial_config(trial_config)
    if config.runtime.workers == 0:
        _train_in_trial(config)
    else:
        _train_on_workers(
            config, trial_config[TRAIN_STORAGE_KEY], trial_config[WORKER_RESOURCES_KEY]
        )


def _train_in_trial(config: cfg.Config) -> None:
    import torch
    from ray import tune

    from bake_ray.engine import Context, DivergenceError, diverged_metrics, fit
    from bake_ray.raytrain import quiet_checkpoint_logs

    quiet_checkpoint_logs()
    device = torch.device("cuda" if config.runtime.gpu else "cpu")
    try:
        fit(config, TuneReporter(), Context(device))
    except DivergenceError as err:
        tune.report({**diverged_metrics(err), "error": str(err)})


def _train_on_workers(
    config: cfg.Config, train_storage: str, resources_per_worker: dict[str, float]
) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from bake_ray.raytrain import build_trainer

    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(
        config,
        trial_id,
        train_storage,
        callbacks=[TuneReportCallback()],
        resources_per_worker=resources_per_worker,
    )
    trainer.fit()
