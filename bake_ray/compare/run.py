"""The Tune side of :mod:`bake_ray.compare`: the arm x seed grid, its trainable, the MLflow
callback, and the final report on the parent run.

Kept apart from the CLI so that a bad flag is refused before Ray, MLflow or torch are
imported (seconds on a loaded machine), and so that trial processes import only this.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

from ray import tune

from bake_ray import tracking
from bake_ray.compare import report
from bake_ray.compare.plan import PLAN_FILE, Plan, plan_payload
from bake_ray.scale.raystart import TRAIN_DRIVER
from bake_ray.tracking.search_runs import SearchTracker
from bake_ray.tune.trial import run_trial

log = logging.getLogger(__name__)


def run_arm_trial(
    trial_config: dict[str, Any],
    *,
    arms: dict[str, dict[str, Any]],
    train_storage: str,
    worker_resources: dict[str, float],
) -> None:
    """Tune trainable: the arm's config with this trial's seed, trained as a search trial.
    The arms' configs reach it through ``tune.with_parameters``; the trial's own Tune
    config holds only its arm and seed."""
    values = copy.deepcopy(arms[trial_config["arm"]])
    values["seed"] = int(trial_config["seed"])
    run_trial(
        {}, base=values, train_storage=train_storage, worker_resources=worker_resources
    )


def _trial_label(trial: Any) -> str:
    return f"{trial.config['arm']}-seed{trial.config['seed']}"


class CompareCallback(tune.Callback):
    """One progress line per epoch, and each trial mirrored into a child MLflow run.

    Picklable on its own (a restore unpickles it): it holds names, the URI and the arms,
    and builds its tracker on first use."""

    def __init__(
        self, experiment: str, name: str, tracking_uri: str, arms: dict[str, dict[str, Any]]
    ) -> None:
        self.experiment, self.name, self.tracking_uri = experiment, name, tracking_uri
        self.arms = arms
        self._tracker: SearchTracker | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self) -> SearchTracker | None:
        if self._tracker is None:
            try:
                self._tracker = SearchTracker(
                    self.experiment, self.name, self.tracking_uri, run_name=self.name
                )
            except tracking.TrackingError as err:
                log.warning("MLflow unavailable (%s); runs are closed at the end", err)
        return self._tracker

    def _epochs_of(self, trial: Any) -> int:
        return int(self.arms[trial.config["arm"]]["epochs"])

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        values = copy.deepcopy(self.arms[trial.config["arm"]])
        values["seed"] = int(trial.config["seed"])
        config = {"arm": trial.config["arm"], **values}
        if self.tracker is not None:
            self.tracker.start_trial(trial.trial_id, config, run_name=_trial_label(trial))

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if "epoch" not in result:
            return
        if self.tracker is not None:
            self.tracker.log_trial_metrics(trial.trial_id, result, step=int(result["epoch"]))
        if "val_acc" in result and not result.get("diverged"):
            print(
                f"{_trial_label(trial)}  epoch {int(result['epoch'])}/{self._epochs_of(trial)}  "
                f"val {result['val_acc']:.4f}  test {result['test_acc']:.4f}",
                flush=True,
            )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if last.get("diverged"):
            self._end(trial, "FAILED", str(last.get("error", "diverged")))
        elif int(last.get("epoch", 0)) < self._epochs_of(trial):
            self._end(trial, "KILLED")
        else:
            self._end(trial, "FINISHED")
            print(f"{_trial_label(trial)}  done", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED", "trial raised an error (see Tune log)")
        print(f"{_trial_label(trial)}  error: see {trial.path}", flush=True)

    def _end(self, trial: Any, status: tracking.RunStatus, error: str | None = None) -> None:
        if self.tracker is not None:
            self.tracker.end_trial(trial.trial_id, status, error)


def _arms(p: Plan) -> dict[str, dict[str, Any]]:
    return {a.label: a.values for a in p.arms}


def _resources(p: Plan, driver_slot: bool) -> tuple[dict[str, float], dict[str, float]]:
    """(trial resources, per-worker resources): an arm with ``runtime.workers: 0`` trains
    in its trial; one with N workers drives a Ray Train worker group."""
    values = p.arms[0].values
    gpu = 1.0 if values["runtime"]["gpu"] else 0.0
    worker = {"CPU": p.cpus_per_trial, "GPU": gpu}
    if int(values["runtime"]["workers"]) == 0:
        return worker, worker
    return ({TRAIN_DRIVER: 1} if driver_slot else {"CPU": 0.01}), worker


def compare_trainable(p: Plan, driver_slot: bool) -> Any:
    """The trainable for a new grid and for a restored one (``Tuner.restore`` needs it)."""
    trial_res, worker_res = _resources(p, driver_slot)
    trainable = tune.with_parameters(
        run_arm_trial,
        arms=_arms(p),
        train_storage=f"{p.exp_path}/train_runs",
        worker_resources=worker_res,
    )
    return tune.with_resources(trainable, trial_res)


def build_tuner(p: Plan, driver_slot: bool) -> Any:
    """A grid over arm x seed: no search algorithm, no scheduler, every trial to the end."""
    return tune.Tuner(
        compare_trainable(p, driver_slot),
        param_space={
            "arm": tune.grid_search([a.label for a in p.arms]),
            "seed": tune.grid_search(p.seeds),
        },
        tune_config=tune.TuneConfig(
            max_concurrent_trials=p.max_concurrent or None,
            trial_dirname_creator=lambda t: f"{_trial_label(t)}_{t.trial_id}",
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=p.name,
            storage_path=p.storage,
            verbose=0,
            callbacks=[CompareCallback(p.experiment, p.name, p.tracking_uri, _arms(p))],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )


def _write_plan_file(p: Plan) -> None:
    from bake_ray.core.storage import filesystem

    fs, path = filesystem(p.exp_path)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{PLAN_FILE}") as out:
        out.write(json.dumps(plan_payload(p), indent=1).encode())


def run(p: Plan, address: str | None) -> list[report.TrialResult]:
    """Run (or continue) the grid; the results of every trial, finished or not."""
    from bake_ray.scale import capacity
    from bake_ray.scale.raystart import ray_keeps_its_temp_files

    with ray_keeps_its_temp_files():
        cap = capacity.join(address)
    driver_slot = "TRAIN_DRIVER" in cap.now
    SearchTracker(p.experiment, p.name, p.tracking_uri, run_name=p.name)  # parent first
    if tune.Tuner.can_restore(p.exp_path):
        print(f"continuing {p.name}: finished trials are kept ({p.exp_path})", flush=True)
        tuner = tune.Tuner.restore(
            p.exp_path,
            trainable=compare_trainable(p, driver_slot),
            resume_unfinished=True,
            resume_errored=True,
        )
    else:
        _write_plan_file(p)
        tuner = build_tuner(p, driver_slot)
    print(
        f"compare {p.name}: {len(p.arms)} arms x {len(p.seeds)} seeds = "
        f"{len(p.arms) * len(p.seeds)} trials; checkpoints in {p.exp_path}",
        flush=True,
    )
    grid = tuner.fit()
    return [report.trial_result(r, _arms(p)) for r in grid]


def finish(
    p: Plan, results: list[report.TrialResult], interrupted: bool
) -> tuple[report.Summary, str]:
    """Table, verdicts and plot, printed and on the parent MLflow run; every run closed.
    Returns the summary and the parent run's id."""
    tracker = SearchTracker(p.experiment, p.name, p.tracking_uri, run_name=p.name)
    summary = report.summarise(p, results)
    text = report.format_report(p, summary)
    print("\n" + text + "\n", flush=True)
    with report.scratch() as out:
        (out / "compare.txt").write_text(text + "\n")
        (out / "compare.json").write_text(json.dumps(report.as_json(p, summary), indent=1))
        tracker.log_search_artifact(out / "compare.txt", "summary")
        tracker.log_search_artifact(out / "compare.json", "summary")
        plot = report.plot(p, summary, results, out / "compare.png")
        if plot is not None:
            tracker.log_search_artifact(plot, "summary")
        if not interrupted:  # MLflow params are write-once: only the final verdicts
            tracker.log_search_params(report.parent_params(p, summary))
            for key, value in report.parent_metrics(summary).items():
                tracker.client.log_metric(tracker.parent_run_id, key, value)
        tracker.close_all("KILLED" if interrupted else "FINISHED")
    print(
        f"MLflow: experiment '{p.experiment}', parent run '{p.name}' at {p.tracking_uri}\n"
        f"  open it: {tracking.open_hint(p.tracking_uri, p.joined)}",
        flush=True,
    )
    return summary, tracker.parent_run_id


def unfinished(p: Plan, results: list[report.TrialResult]) -> list[str]:
    """Trials stopped before their last epoch, and a count of those never started."""
    out = [r.label for r in results if r.status == "unfinished"]
    missing = len(p.arms) * len(p.seeds) - len(results)
    return out + ([f"{missing} not started"] if missing > 0 else [])


def close_interrupted(p: Plan) -> None:
    """A second Ctrl-C (or one before Tune ran): every run this driver opened ends KILLED."""
    try:
        SearchTracker(p.experiment, p.name, p.tracking_uri, run_name=p.name).close_all("KILLED")
    except tracking.TrackingError as err:
        print(f"MLflow: could not close the runs ({err})", flush=True)
