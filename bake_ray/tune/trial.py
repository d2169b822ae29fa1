"""One search trial, as Ray Tune runs it: a BAKE training run in-process or on workers.

``runtime.workers`` means what it means for ``train``: 0 trains in the trial's own process
(a one-worker budget), N drives N Ray Train workers. A trial's Tune config holds only the
sampled parameters; what every trial shares (the base config, where Ray Train runs are
stored, a worker's resources) reaches it through ``tune.with_parameters``.

Kept apart from :mod:`bake_ray.tune` so a trial process imports only what training needs
(no MLflow, no Optuna): every trial process pays its imports, and Tune reuses a finished
trial's process for the next trial when it can.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune

from bake_ray.core import config as cfg
from bake_ray.core import search_space as ss
from bake_ray.scale.raystart import TRAIN_DRIVER
from bake_ray.scale.raytrain import ResumeScratch, absolute_paths, local_checkpoint_file


def trial_base(space: ss.SearchSpace) -> dict[str, Any]:
    """The config every trial starts from, as a plain dict. Trials run in their own
    directories: data and weights paths are made absolute here."""
    return cfg.to_dict(absolute_paths(ss.trial_config(space, {})))


def resolved_trial_config(base: dict[str, Any], params: dict[str, Any]) -> cfg.Config:
    """The full training config of a trial: the base with the sampled params applied."""
    return cfg.from_dict(ss.apply_params(base, params))


def trial_resources(space: ss.SearchSpace, has_driver_slot: bool) -> dict[str, float]:
    """A one-worker trial holds its worker's resources; a multi-worker trial only drives."""
    b = space.budget
    if ss.trains_in_trial(b):
        return {"CPU": b.cpus_per_worker, "GPU": b.gpus_per_worker}
    return {TRAIN_DRIVER: 1} if has_driver_slot else {"CPU": 0.01}


def search_trainable(space: ss.SearchSpace, exp_path: str, has_driver_slot: bool) -> Any:
    """``run_trial`` with the search's constants and a trial's resources.

    ``Tuner.restore`` must be handed the same trainable again: this one function builds it
    for a new search and for a resumed one, from the stored space.
    """
    b = space.budget
    trainable = tune.with_parameters(
        run_trial,
        base=trial_base(space),
        train_storage=f"{exp_path.rstrip('/')}/train_runs",
        worker_resources={"CPU": b.cpus_per_worker, "GPU": b.gpus_per_worker},
    )
    return tune.with_resources(trainable, trial_resources(space, has_driver_slot))


class TuneReporter(ResumeScratch):
    """Reporter for a trial that trains in its own process: ``tune.report`` each epoch, and
    resume from the checkpoint Tune hands a restarted trial."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self._done_loading()
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    def resume_from(self) -> Path | None:
        return local_checkpoint_file(tune.get_checkpoint(), self._scratch)


def run_trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    train_storage: str,
    worker_resources: dict[str, float],
) -> None:
    """Tune function trainable: one BAKE training run, in-process or on Ray Train workers."""
    config = resolved_trial_config(base, params)
    if config.runtime.workers == 0:
        _train_in_trial(config)
    else:
        _train_on_workers(config, train_storage, worker_resources)


def _train_in_trial(config: cfg.Config) -> None:
    import torch

    from bake_ray.core.engine import Context, DivergenceError, diverged_metrics, fit
    from bake_ray.scale.raytrain import quiet_checkpoint_logs

    quiet_checkpoint_logs()
    device = torch.device("cuda" if config.runtime.gpu else "cpu")
    try:
        fit(config, TuneReporter(), Context(device))
    except DivergenceError as err:
        tune.report({**diverged_metrics(err), "error": str(err)})


def _train_on_workers(
    config: cfg.Config, train_storage: str, resources_per_worker: dict[str, float]
) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from bake_ray.scale.raytrain import build_trainer

    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(
        config,
        trial_id,
        train_storage,
        callbacks=[TuneReportCallback()],
        resources_per_worker=resources_per_worker,
    )
    trainer.fit()
