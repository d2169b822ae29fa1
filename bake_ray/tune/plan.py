"""The plan of one search: everything the command line checked before Ray starts, handed
to the search that runs it and the summary that reports it (both type against it, so it
lives below them, not in the command line)."""

from __future__ import annotations

from dataclasses import dataclass

from bake_ray.core import search_space as ss
from bake_ray.core import storage
from bake_ray.tune import record as rec


@dataclass
class Plan:
    """Everything checked before Ray starts."""

    space: ss.SearchSpace
    storage: str
    name: str
    tracking_uri: str
    joined: bool = False  # joined an existing cluster (--address / RAY_ADDRESS)
    record: rec.SearchRecord | None = None  # the stored search, when resuming one
    register: bool = True  # the winner as a new registered model version (--no-register)

    @property
    def exp_path(self) -> str:
        return storage.join(self.storage, self.name)
