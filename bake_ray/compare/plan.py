"""What a comparison trains: its arms and the plan checked before Ray starts.

Shared by the CLI (:mod:`bake_ray.compare`), the Tune side (:mod:`bake_ray.compare.run`)
and ``--recheck`` (:mod:`bake_ray.compare.recheck`), so none of them imports another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PLAN_FILE = "bake_ray_compare.json"  # beside the checkpoints: what this comparison trains
#: Built-in arms: dotted config overrides applied to the given training config.
ARMS: dict[str, dict[str, Any]] = {
    "bake": {"method": "bake"},
    "bake_paper": {
        "method": "bake",
        "bake.temperature": 4.0,
        "bake.omega": 0.5,
        "bake.loss_weight": 1.0,
        "bake.affinity_temperature": 1.0,  # the paper's affinity, whatever the config says
    },
    "ce": {"method": "ce"},
    "ce_standard": {"method": "ce", "data.same_class": 0},
    "label_smoothing": {"method": "label_smoothing"},
}
BASELINE = "ce"


@dataclass
class Arm:
    """One way to train: a label, the full training config (seed set per trial), epochs."""

    label: str
    kind: str  # built-in arm it derives from, or "trial" for a recheck
    values: dict[str, Any]
    note: str = ""  # e.g. "epochs x2 to match images"


@dataclass
class Plan:
    """Everything checked before Ray starts."""

    arms: list[Arm]
    seeds: list[int]
    match: str
    storage: str
    name: str
    tracking_uri: str
    experiment: str
    source: str  # where the training config came from
    baseline: str
    metric: str  # what the verdicts compare: test acc at best val, or best val (recheck)
    cpus_per_trial: float = 1.0
    max_concurrent: int = 0
    joined: bool = False
    recheck_of: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exp_path(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"


def plan_payload(p: Plan) -> dict[str, Any]:
    return {"arms": {a.label: a.values for a in p.arms}, "seeds": p.seeds, "match": p.match}
