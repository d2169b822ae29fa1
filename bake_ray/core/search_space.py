"""Search-space files: a base training config, a space keyed by config path, a budget.

A file is checked completely before Ray starts: unknown keys, keys that are not config
fields, empty or inverted ranges, omega reaching 1, initial points outside the space, and
budgets that cannot fit the cluster each fail with one line naming the problem. Every
corner of the space is turned into a full :class:`~bake_ray.core.config.Config` and validated,
so a trial can never start from a config that :mod:`bake_ray.core.config` would reject.

Example (``search_spaces/default.yaml``)::

    name: digits-bake
    base: {epochs: 6, data: {dataset: digits}}
    space:
      bake.temperature: {distribution: uniform, low: 1.0, high: 8.0}
      bake.omega: {distribution: uniform, low: 0.0, high: 0.9}
      bake.loss_weight: {distribution: loguniform, low: 0.1, high: 10.0}
    initial_points: [{bake.temperature: 4.0, bake.omega: 0.5, bake.loss_weight: 1.0}]
    objective: {metric: val_acc, mode: max}
    budget: {num_samples: 12, max_concurrent: 2, workers_per_trial: 1}
    scheduler: {type: asha, grace_period: 2, reduction_factor: 2}
    seed: 0
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from bake_ray.core import config as cfg
from bake_ray.core import schema
from bake_ray.core.config import Config, ConfigError
from bake_ray.core.schema import SCHEMA, Bool, Float, Int, Str

_ENUMERATE_INT_RANGE = 64  # int ranges up to this width are checked value by value
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
METRICS = ("val_acc", "best_val_acc")
SCHEDULERS = ("asha", "none")
_SPACE_STYLE = schema.Style(unknown_choice="", show_got=False)  # the search file's wording
SPACE_SECTIONS = (
    "name",
    "base_config",
    "base",
    "space",
    "initial_points",
    "objective",
    "budget",
    "scheduler",
    "seed",
)


@dataclass(frozen=True)
class Dimension:
    """One searched config value: its dotted key and its distribution."""

    key: str
    distribution: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    def contains(self, value: Any) -> bool:
        if self.distribution == "choice":
            return value in self.values
        kinds = int if self.distribution == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):  # True is an int in Python
            return False
        return self.low <= value <= self.high

    def corners(self) -> tuple[Any, ...]:
        """Values to check: extremes, or every value of a small int range (divisibility
        constraints such as batch_size % (same_class + 1) can fail inside a range)."""
        if self.distribution == "choice":
            return self.values
        if self.distribution == "int" and self.high - self.low <= _ENUMERATE_INT_RANGE:
            return tuple(range(int(self.low), int(self.high) + 1))
        return (self.low, self.high)


@schema.one_line_init("budget", _SPACE_STYLE)
@pydantic_dataclass(frozen=True, config=SCHEMA)
class Budget:
    """How much search: trials, concurrency and the resources of one trial."""

    num_samples: Annotated[Int, Field(ge=1)] = 12
    max_concurrent: Annotated[Int, Field(ge=0)] = 0  # 0 = as many as the cluster fits
    workers_per_trial: Annotated[Int, Field(ge=1)] = 1
    cpus_per_worker: Annotated[Float, Field(gt=0)] = 1.0
    gpus_per_worker: Annotated[Float, Field(ge=0)] = 0.0
    max_failures: Annotated[Int, Field(ge=0)] = 1
    always_use_worker_group: Bool = False  # Ray's documented pattern, even for one worker


@schema.one_line_init("scheduler", _SPACE_STYLE)
@pydantic_dataclass(frozen=True, config=SCHEMA)
class Scheduler:
    """Early stopping of weak trials (ASHA over epochs), or none."""

    type: Literal[SCHEDULERS] = "asha"  # type: ignore[valid-type]
    grace_period: Int = 2  # in [1, epochs]: checked against the base config in parse()
    reduction_factor: Annotated[Int, Field(ge=2)] = 2


@schema.one_line_init("objective", _SPACE_STYLE)
@pydantic_dataclass(frozen=True, config=SCHEMA)
class Objective:
    """What a trial is judged by: a validation accuracy, maximised."""

    metric: Literal[METRICS] = "val_acc"  # type: ignore[valid-type]
    mode: Str = "max"

    @field_validator("mode")
    @classmethod
    def _maximised(cls, mode: str) -> str:
        if mode != "max":
            raise ConfigError(f"objective.mode: accuracy is maximised; got {mode!r}")
        return mode


@dataclass(frozen=True)
class SearchSpace:
    """A validated search: what to vary, from which base, for how long, judged how."""

    name: str
    source: Path | None
    base: Config
    dimensions: tuple[Dimension, ...]
    initial_points: tuple[dict[str, Any], ...]
    metric: str
    mode: str
    budget: Budget
    scheduler: Scheduler
    seed: int
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def epochs(self) -> int:
        return self.base.epochs


# --------------------------------------------------------------------------- parsing


def _leaf_fields() -> dict[str, type]:
    """Every dotted config key that names a value (not a section), with its type."""
    flat = cfg.flatten(cfg.to_dict(Config()))
    return {key: type(value) for key, value in flat.items()}


def _number(key: str, spec: dict[str, Any], name: str) -> float:
    value = spec.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"space.{key}.{name}: expected a finite number, got {value!r}")
    return value


def _parse_dimension(key: str, spec: Any, leaves: dict[str, Any]) -> Dimension:
    if key not in leaves:
        raise ConfigError(f"space.{key}: not a config field (e.g. bake.omega, optim.lr)")
    if not isinstance(spec, dict):
        raise ConfigError(f"space.{key}: expected a mapping with a distribution")
    dist = spec.get("distribution")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"space.{key}.distribution: {dist!r}; one of {DISTRIBUTIONS}")
    if dist in ("uniform", "loguniform") and leaves[key] is int:  # corners alone would pass
        raise ConfigError(f"space.{key}: {dist} samples floats but {key} is an int; use int")
    allowed = {"distribution", "values"} if dist == "choice" else {"distribution", "low", "high"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(
            f"space.{key}.{unknown[0]}: unknown key for {dist}; allowed: {sorted(allowed)}"
        )
    if dist == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"space.{key}.values: expected a non-empty list")
        return Dimension(key, dist, values=tuple(values))
    low, high = _number(key, spec, "low"), _number(key, spec, "high")
    if not low < high:
        raise ConfigError(f"space.{key}: empty or inverted range: low={low} must be < high={high}")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"space.{key}.low: loguniform needs low > 0, got {low}")
    if dist == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"space.{key}: int range needs whole numbers, got [{low}, {high}]")
    if dist == "int":
        low, high = int(low), int(high)
    return Dimension(key, dist, low, high)


def _check_known_ranges(dim: Dimension) -> None:
    """A range the config schema forbids (omega reaching 1, T at 0, ...), reported against
    the space rather than a trial; the limits are read from the schema's own fields."""
    limits = schema.bounds(schema.field_info(Config, dim.key.split("."))[1])
    numbers = [v for v in dim.corners() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if limits and any(not schema.in_range(v, limits) for v in numbers):
        text = schema.range_text(limits)
        verb = "lie" if text.startswith("in ") else "be"
        raise ConfigError(f"space.{dim.key}: values must {verb} {text}, got {list(dim.corners())}")


def _section(cls: type, values: Any, name: str) -> Any:
    """A search file's section built by its schema; a missing section is all defaults."""
    return schema.validated(cls, {} if values is None else values, f"{name}.", _SPACE_STYLE)


def _parse_scheduler(values: Any, epochs: int) -> Scheduler:
    sched = _section(Scheduler, values, "scheduler")
    if sched.type == "asha" and not 1 <= sched.grace_period <= epochs:
        raise ConfigError(
            f"scheduler.grace_period: must be in [1, epochs={epochs}], got {sched.grace_period}"
        )
    return sched


# --------------------------------------------------------------------------- building trials


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the nested base config with dotted ``params`` set on it."""
    values = copy.deepcopy(base)
    for key, value in params.items():
        cfg.set_dotted(values, key, value)
    return values


def trains_in_trial(budget: Budget) -> bool:
    """A one-worker trial trains in its own Tune process: no worker group to start (which
    costs about 20 s a trial), unless the budget asks for Ray Train's pattern anyway."""
    return budget.workers_per_trial == 1 and not budget.always_use_worker_group


def trial_config(space: SearchSpace, params: dict[str, Any]) -> Config:
    """The full config of one trial: base + sampled params, the worker count from the budget
    (``runtime.workers`` means what it means for ``train``: 0 = in this process)."""
    values = apply_params(cfg.to_dict(space.base), params)
    budget = space.budget
    values["runtime"]["workers"] = 0 if trains_in_trial(budget) else budget.workers_per_trial
    values["runtime"]["gpu"] = space.budget.gpus_per_worker > 0
    return cfg.from_dict(values)


def _check_point(space: SearchSpace, params: dict[str, Any], where: str) -> None:
    try:
        trial_config(space, params)
    except ConfigError as exc:
        raise ConfigError(f"{where}: the point {params} gives an invalid trial: {exc}") from None


def model_configs(space: SearchSpace) -> list[cfg.ModelConfig]:
    """Every distinct ``model`` section a trial can get (a choice over names gives several),
    so each model and weights file is checked against the data before the search starts."""
    dims = [d for d in space.dimensions if d.key.startswith("model.")]
    found: list[cfg.ModelConfig] = []
    for values in itertools.product(*(d.corners() for d in dims)):
        params = dict(zip((d.key for d in dims), values, strict=True))
        model = trial_config(space, params).model
        if model not in found:
            found.append(model)
    return found


def _check_corners(space: SearchSpace) -> None:
    """Every combination of extreme values, and every initial point, must make a valid config."""
    combos = itertools.product(*(d.corners() for d in space.dimensions))
    for values in itertools.islice(combos, 4096):
        _check_point(
            space, dict(zip((d.key for d in space.dimensions), values, strict=True)), "space"
        )
    for i, point in enumerate(space.initial_points):
        _check_point(space, dict(point), f"initial_points[{i}]")


def _check_initial_points(points: Any, dims: tuple[Dimension, ...]) -> tuple[dict[str, Any], ...]:
    if points is None:
        return ()
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError("initial_points: expected a list of {dotted key: value} mappings")
    by_key = {d.key: d for d in dims}
    for i, point in enumerate(points):
        if set(point) != set(by_key):
            raise ConfigError(
                f"initial_points[{i}]: must set exactly the space keys {sorted(by_key)}"
            )
        for key, value in point.items():
            if not by_key[key].contains(value):
                raise ConfigError(f"initial_points[{i}].{key}: {value!r} is outside the space")
    return tuple(points)


def _base_values(raw: dict[str, Any], source: Path | None, overrides: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if raw.get("base_config"):
        ref = Path(raw["base_config"])
        values = cfg.read_yaml(ref if ref.is_absolute() or source is None else source.parent / ref)
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError("base: expected a mapping of config values")
    for key, value in cfg.flatten(base).items():
        cfg.set_dotted(values, key, value)
    for text in overrides:
        key, value = cfg.parse_override(text)
        cfg.set_dotted(values, key, value)
    return values


def _split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--set budget.num_samples=4`` edits the search file; other keys edit the base config."""
    space_level = [o for o in overrides if o.split("=", 1)[0].split(".")[0] in SPACE_SECTIONS]
    return space_level, [o for o in overrides if o not in space_level]


def parse(
    raw: dict[str, Any], source: Path | None = None, overrides: list[str] = ()
) -> SearchSpace:
    """Validate a search file's contents completely; raise a one-line ConfigError if not."""
    raw = copy.deepcopy(raw)
    space_overrides, base_overrides = _split_overrides(list(overrides))
    for text in space_overrides:
        key, value = cfg.parse_override(text)
        cfg.set_dotted(raw, key, value)
    unknown = sorted(set(raw) - set(SPACE_SECTIONS))
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown key in a search file; allowed: {', '.join(SPACE_SECTIONS)}"
        )
    base = cfg.from_dict(_base_values(raw, source, base_overrides))
    leaves = _leaf_fields()
    space_raw = raw.get("space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise ConfigError(
            "space: expected a non-empty mapping of dotted config keys to distributions"
        )
    dims = tuple(_parse_dimension(k, v, leaves) for k, v in space_raw.items())
    for dim in dims:
        _check_known_ranges(dim)
    objective = _section(Objective, raw.get("objective"), "objective")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: expected an int >= 0, got {seed!r}")
    name = raw.get("name") or (source.stem if source else "search")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"name: use letters, digits, - and _ only, got {name!r}")
    space = SearchSpace(
        name=name,
        source=source,
        base=base,
        dimensions=dims,
        initial_points=_check_initial_points(raw.get("initial_points"), dims),
        metric=objective.metric,
        mode=objective.mode,
        budget=_section(Budget, raw.get("budget"), "budget"),
        scheduler=_parse_scheduler(raw.get("scheduler"), base.epochs),
        seed=seed,
        raw=raw,
    )
    _check_corners(space)
    return space


def load(path: str | Path, overrides: list[str] = ()) -> SearchSpace:
    """Read and validate a search file (safe YAML only)."""
    path = Path(path)
    return parse(cfg.read_yaml(path), path, overrides)


# --------------------------------------------------------------------------- resources


def trial_resources(space: SearchSpace) -> tuple[float, float]:
    """(CPUs, GPUs) one trial's workers occupy together."""
    b = space.budget
    return b.workers_per_trial * b.cpus_per_worker, b.workers_per_trial * b.gpus_per_worker


def check_fits(space: SearchSpace, cpus: float, gpus: float) -> int:
    """Raise if one trial can never be placed; return how many trials run at once."""
    need_cpu, need_gpu = trial_resources(space)
    if need_cpu > cpus or need_gpu > gpus:
        raise ConfigError(
            f"budget: one trial needs {need_cpu:g} CPUs and {need_gpu:g} GPUs "
            f"({space.budget.workers_per_trial} workers), the cluster has {cpus:g} CPUs "
            f"and {gpus:g} GPUs"
        )
    fits = int(min(cpus / need_cpu, gpus / need_gpu if need_gpu else math.inf))
    limit = space.budget.max_concurrent or fits
    return max(1, min(limit, fits, space.budget.num_samples))
