"""The configs behind BENCHMARKS.md section 5 stay loadable and describe one setup.

The Fashion-MNIST answer is three commands (two searches, then ``compare``); if a schema
change broke one of their files, or the searches drifted from the compared setup, the
published numbers could no longer be reproduced from the repository.
"""

from __future__ import annotations

from pathlib import Path

from bake_ray.core import config as cfg
from bake_ray.core import search_space as ss

CONFIGS = Path(__file__).resolve().parent.parent / "bench" / "configs"


def test_section_5_searches_run_on_the_compared_setup() -> None:
    compared = cfg.to_dict(cfg.load(CONFIGS / "fashion_mnist_compare.yaml"))
    assert compared["data"]["dataset"] == "fashion_mnist"
    assert round(compared["data"]["val_fraction"] * compared["data"]["train_subset"]) == 4000
    searched = {
        "fashion_mnist_search_bake.yaml": {"bake.temperature", "bake.omega", "bake.loss_weight"},
        "fashion_mnist_search_tau.yaml": {"bake.affinity_temperature"},
    }
    for name, keys in searched.items():
        space = ss.load(CONFIGS / name)
        assert {d.key for d in space.dimensions} == keys, name
        assert cfg.to_dict(space.base) == compared, name
        assert space.scheduler.grace_period == 4, name
