"""One search trial, as Ray Tune runs it: a BAKE training run in-process or on workers.

Kept apart from :mod:`bake_ray.tune` so a trial process imports only what training needs
(no MLflow, no Optuna): every trial process pays its imports, and Tune reuses a finished
trial's process for the next trial when it can.
"""

from __future__ import annotations

from typing import Any

from bake_ray import config as cfg
from bake_ray import search_space as ss

BASE_KEY = "_bake_ray_base"  # constant entries of every trial's Tune config
TRAIN_STORAGE_KEY = "_bake_ray_train_storage"
WORKER_GROUP_KEY = "_bake_ray_always_use_worker_group"
WORKER_RESOURCES_KEY = "_bake_ray_worker_resources"


def trial_params(trial_config: dict[str, Any]) -> dict[str, Any]:
    """The sampled parameters only (dotted config keys), without bake-ray's constants."""
    return {k: v for k, v in trial_config.items() if not k.startswith("_bake_ray")}


def resolved_trial_config(trial_config: dict[str, Any]) -> cfg.Config:
    """The full training config of a trial: the base with the sampled params applied."""
    return cfg.from_dict(ss.apply_params(trial_config[BASE_KEY], trial_params(trial_config)))


def run_trial(trial_config: dict[str, Any]) -> None:
    """Tune function trainable: one BAKE training run, in-process or on Ray Train workers."""
    config = resolved_trial_config(trial_config)
    if config.runtime.workers <= 1 and not trial_config.get(WORKER_GROUP_KEY, False):
        _train_in_trial(config)
    else:
        _train_on_workers(
            config, trial_config[TRAIN_STORAGE_KEY], trial_config[WORKER_RESOURCES_KEY]
        )


def _train_in_trial(config: cfg.Config) -> None:
    import torch
    from ray import tune

    from bake_ray.engine import Context, DivergenceError, diverged_metrics, fit
    from bake_ray.raytrain import TuneReporter, quiet_checkpoint_logs

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
