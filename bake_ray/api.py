"""bake-ray from Python: the three commands as functions that return tables.

::

    from bake_ray.api import tune, load_search

    r = tune("search_spaces/default.yaml", overrides={"budget.num_samples": 4})
    r.trials            # pandas DataFrame, ranked exactly as the printed table
    r.best_config       # the winner as a training config (dict)
    load_search(r.name) # the same result later, finished or interrupted

Each function takes what its command line takes: a config or search file (path, or
``s3://`` URI where the command line takes one) or its contents as a dict; ``overrides``,
a dict of dotted keys to values (the keys of ``--set``); and the command line's other flags
as keywords (``storage``, ``tracking_uri``, ``address``, ``resume``, ``name``, ...). They
are the functions the command lines call (``python -m bake_ray.tune`` parses its flags and
calls :func:`tune`), so both validate, run and record in MLflow the same way:

- a bad input raises the one-line :class:`ConfigError` the command line prints; nothing
  here calls ``sys.exit``;
- Ctrl-C saves the state and raises ``KeyboardInterrupt`` (:class:`SearchInterrupted`,
  :class:`CompareInterrupted`, :class:`TrainInterrupted`; a stopped search's trials are
  in the exception's ``result``); the same call with ``resume=True`` (tune), the same call
  (compare) or ``resume=run_dir`` (train) continues;
- Ray's own console output goes to ``ray.log`` beside the search unless ``verbose=True``.
"""

from __future__ import annotations

from bake_ray.compare.command import CompareInterrupted, compare
from bake_ray.compare.result import CompareResult
from bake_ray.core.errors import ConfigError
from bake_ray.train import TrainInterrupted, TrainResult, train
from bake_ray.tune.command import tune
from bake_ray.tune.result import SearchResult, load_search
from bake_ray.tune.search import SearchInterrupted

__all__ = [
    "CompareInterrupted",
    "CompareResult",
    "ConfigError",
    "SearchInterrupted",
    "SearchResult",
    "TrainInterrupted",
    "TrainResult",
    "compare",
    "load_search",
    "train",
    "tune",
]
