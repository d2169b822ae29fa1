"""ASHA whose rungs survive a restart of the search driver.

Ray 2.60's ``Tuner.restore`` rebuilds the scheduler from ``tuner.pkl``, which was pickled
when the search started: every rung is empty again, and ``TuneController`` never calls the
scheduler's ``save``/``restore``. A resumed search would then compare its next trials
against nobody and let weak ones run to the end. This subclass writes its rungs (the value
each trial reached at each milestone) and the trials it decided to stop beside the
experiment after every change, and reads them back the first time it is used in a new
driver process. The trials themselves come back from Tune's own snapshot.

A stop decision can be made and lost: Tune applies it only once the trial's checkpoint is
registered, and an interrupt in between leaves the trial RUNNING in Tune's snapshot. The
restored trial then continues from its last registered checkpoint and is stopped at its
next result. It is the same trial stopped, at the same epoch when no newer checkpoint had
been registered (the common case), otherwise one epoch later.
"""

from __future__ import annotations

import json
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler

from bake_ray.core.storage import read_text, write_text

STATE_FILE = "bake_ray_asha.state"  # JSON, but not .json: see record.RECORD_FILE


class ResumableASHA(AsyncHyperBandScheduler):
    """ASHA (one bracket by default) that persists its rungs to ``state_uri``."""

    def __init__(self, state_uri: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state_uri = state_uri
        self._stopped: dict[str, float] = {}  # trial id -> time_attr when ASHA stopped it
        self._loaded = True  # a new search starts empty; unpickling clears this flag

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._loaded = False  # restored from tuner.pkl: the rungs on disk are newer

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        text = read_text(self.state_uri)
        if text is None:
            return
        saved = json.loads(text)
        for bracket, rungs in zip(self._brackets, saved["brackets"], strict=False):
            by_milestone = {float(m): recorded for m, recorded in rungs}
            bracket._rungs = [
                (milestone, dict(by_milestone.get(float(milestone), {})))
                for milestone, _ in bracket._rungs
            ]
        self._num_stopped = int(saved.get("num_stopped", 0))
        self._stopped = {t: float(v) for t, v in saved.get("stopped", {}).items()}

    def _persist(self) -> None:
        state = {
            "brackets": [
                [[float(m), {t: float(v) for t, v in recorded.items()}] for m, recorded in b._rungs]
                for b in self._brackets
            ],
            "num_stopped": self._num_stopped,
            "stopped": self._stopped,
        }
        write_text(self.state_uri, json.dumps(state, sort_keys=True) + "\n")

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load_once()
        if trial.trial_id in self._stopped:  # stopped before a restart: stop it again
            return self.STOP
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP:
            self._stopped[trial.trial_id] = float(result.get(self._time_attr, 0))
        self._persist()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._persist()

    def rungs(self) -> list[dict[float, dict[str, float]]]:
        """Per bracket: milestone -> {trial id: value recorded there} (for tests and logs)."""
        return [{float(m): dict(r) for m, r in b._rungs} for b in self._brackets]
