"""Test-only views of what a :class:`bake_ray.tracking.search_runs.SearchTracker` wrote, read back
from the server (the tracker itself keeps no API that only tests use)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from bake_ray import tracking
from bake_ray.tracking.search_runs import SearchTracker


def trial_run_id(tracker: SearchTracker, trial_id: str) -> str | None:
    """The run id of a trial's run on the server, found by its tags; None if it has none."""
    query = (
        f"tags.`{tracking.TAG_PARENT}` = '{tracker.parent_run_id}' "
        f"and tags.`{tracking.TAG_TRIAL_ID}` = '{trial_id}'"
    )
    runs = MlflowClient(tracker.tracking_uri).search_runs([tracker.experiment_id], query)
    assert len(runs) <= 1, f"trial {trial_id} has {len(runs)} runs"
    return runs[0].info.run_id if runs else None
