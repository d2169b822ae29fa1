"""One typed configuration for a bake-ray run: the schema, YAML loading, overrides, validation.

The dataclasses below *are* the schema: YAML files and ``--set a.b=value`` overrides are
checked against them field by field, unknown keys are rejected, and every invariant is
checked in :func:`validate` so a bad value fails in one line before any compute starts.
YAML is read with ``yaml.safe_load`` only: nothing in a config can import or run code.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bake_ray import registry
from bake_ray.errors import ConfigError  # defined there, imported from here by most modules

METHODS = ("bake", "ce", "label_smoothing")
DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder")
MODELS = registry.BUILTIN_MODELS  # plus timm/<name> and torchvision/<name>: see registry
SCHEDULES = ("step", "cosine", "constant")
SOLVERS = ("auto", "solve", "neumann")  # how BAKE computes its targets (see bake.py)


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float (YAML 1.2), not a string."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def safe_load_yaml(text: str) -> Any:
    """Parse YAML without ever constructing Python objects (no tags that import code)."""
    return yaml.load(text, Loader=_SafeLoader)


@dataclass
class DataConfig:
    """Where the images come from and how batches are formed."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    val_fraction: float = 0.1
    batch_size: int = 64
    same_class: int = 1
    loader_workers: int = 0
    train_subset: int | None = None


@dataclass
class ModelConfig:
    """Which architecture and its starting weights; every model returns (features, logits).

    ``name``: a built-in model, ``timm/<name>`` or ``torchvision/<name>`` (bake_ray.registry).
    ``weights``: a local .pt/.pth/.safetensors file loaded into the backbone (read as plain
    data); classifier tensors of another class count are reinitialised.
    ``pretrained``: the library's own weights, via its own download and cache.
    """

    name: str = "small_cnn"
    weights: str | None = None
    pretrained: bool = False


@dataclass
class BakeConfig:
    """BAKE's hyperparameters (paper defaults T=4, omega=0.5, lambda=1)."""

    temperature: float = 4.0
    omega: float = 0.5
    loss_weight: float = 1.0
    global_ensembling: bool = True
    label_smoothing: float = 0.1
    solver: str = "auto"  # auto: the cheaper of solve/neumann, within tol of the closed form
    tol: float = 1e-6  # max row-L1 distance of neumann's targets from the closed form


@dataclass
class OptimConfig:
    """SGD and its learning-rate schedule."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "step"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    warmup_epochs: int = 0
    # Epochs the schedule is laid out over (0 = epochs). Set by `train --resume
    # --extend-schedule` so a longer run keeps the finished schedule, then its final lr.
    schedule_epochs: int = 0


@dataclass
class RuntimeConfig:
    """Where and how the run executes; does not change the maths."""

    workers: int = 0
    gpu: bool = False
    amp: bool = True
    sync_bn: bool = False  # batch-norm statistics over all workers (the paper's ImageNet recipe)
    channels_last: bool | None = None  # NHWC memory format; None = on for CNNs, off for ViTs
    output_dir: str = "runs"
    run_name: str | None = None
    log_every: int = 0  # read progress every N steps (a host sync each); 0: once per epoch


@dataclass
class Config:
    """A complete, resolved bake-ray training run."""

    seed: int = 0
    method: str = "bake"
    epochs: int = 15
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    bake: BakeConfig = field(default_factory=BakeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; allow only lossless conversions."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float and _is_number(value):
        return float(value)
    if type(value) is tp and tp in (bool, int, str):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{full}: unknown key; allowed: {', '.join(sorted(names))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def from_dict(values: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain data."""
    config = _build(Config, values)
    validate(config)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """Nested plain-data form (what is saved with every run as ``config.yaml``)."""
    return dataclasses.asdict(config)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"bake": {"omega": 0.5}}`` -> ``{"bake.omega": 0.5}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def set_dotted(values: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set ``values["a"]["b"] = value`` for ``dotted_key="a.b"``, creating sections."""
    *sections, leaf = dotted_key.split(".")
    node = values
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted_key}: {section} is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` from the command line; the value is read as a YAML scalar."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. bake.omega=0.7")
    try:
        value = safe_load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {_first_line(exc)}") from None
    return key.strip(), value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely; every failure is a one-line :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = safe_load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {_first_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` parser whose usage errors are one line, like every other bad input.

    argparse prints the whole usage block before its message; bake-ray's rule is one line
    that names the problem (``--help`` still shows the usage), then exit code 2.
    """

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def add_override_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The ``--set KEY=VALUE`` option (repeatable) shared by every command line."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then ``--set`` overrides; validated once at the end."""
    values: dict[str, Any] = read_yaml(path) if path else {}
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(values, key, value)
    return from_dict(values)


def save(config: Config, path: str | Path) -> None:
    """Write the resolved config so any run can be reproduced with ``--config``."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


# --------------------------------------------------------------------------- validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _finite(key: str, value: float) -> None:
    _require(math.isfinite(value), f"{key}: must be a finite number, got {value}")


def _validate_bake(cfg: BakeConfig) -> None:
    for name in ("temperature", "omega", "loss_weight", "label_smoothing"):
        _finite(f"bake.{name}", getattr(cfg, name))
    _require(cfg.temperature > 0, f"bake.temperature: must be > 0, got {cfg.temperature}")
    _require(0 <= cfg.omega < 1, f"bake.omega: must be in [0, 1), got {cfg.omega}")
    _require(cfg.loss_weight >= 0, f"bake.loss_weight: must be >= 0, got {cfg.loss_weight}")
    _require(
        0 <= cfg.label_smoothing < 1,
        f"bake.label_smoothing: must be in [0, 1), got {cfg.label_smoothing}",
    )
    _require(cfg.solver in SOLVERS, f"bake.solver: unknown {cfg.solver!r}; one of {SOLVERS}")
    _finite("bake.tol", cfg.tol)
    _require(0 < cfg.tol < 1, f"bake.tol: must be in (0, 1), got {cfg.tol}")


def _validate_model(cfg: ModelConfig) -> None:
    registry.check_model_name(cfg.name)
    _require(
        not (cfg.pretrained and cfg.weights),
        "model.pretrained: set either model.pretrained or model.weights, not both",
    )
    _require(
        not cfg.pretrained or registry.split_name(cfg.name)[0] is not None,
        f"model.pretrained: the built-in {cfg.name} has no pretrained weights; use "
        "model.weights with a local file, or a timm/<name> or torchvision/<name> model",
    )
    _require(cfg.weights is None or bool(cfg.weights.strip()), "model.weights: empty path")


def _validate_data(cfg: DataConfig) -> None:
    _require(cfg.dataset in DATASETS, f"data.dataset: unknown {cfg.dataset!r}; one of {DATASETS}")
    _require(cfg.batch_size >= 2, f"data.batch_size: must be >= 2, got {cfg.batch_size}")
    _require(cfg.same_class >= 0, f"data.same_class: must be >= 0, got {cfg.same_class}")
    _require(
        cfg.batch_size % (cfg.same_class + 1) == 0,
        f"data.batch_size: {cfg.batch_size} must be divisible by data.same_class + 1 "
        f"= {cfg.same_class + 1} (each anchor is followed by {cfg.same_class} same-class images)",
    )
    _require(
        0 < cfg.val_fraction <= 0.5,
        f"data.val_fraction: must be in (0, 0.5], got {cfg.val_fraction}",
    )
    _require(
        cfg.loader_workers >= 0, f"data.loader_workers: must be >= 0, got {cfg.loader_workers}"
    )
    _require(
        cfg.train_subset is None or cfg.train_subset >= 2 * cfg.batch_size,
        f"data.train_subset: must be >= 2 * data.batch_size = {2 * cfg.batch_size}, "
        f"got {cfg.train_subset}",
    )
    _require(
        cfg.dataset != "imagefolder" or cfg.data_dir is not None,
        "data.data_dir: required for data.dataset=imagefolder (a folder with train/ and val/)",
    )


def _validate_optim(cfg: OptimConfig, epochs: int) -> None:
    for name in ("lr", "momentum", "weight_decay", "gamma"):
        _finite(f"optim.{name}", getattr(cfg, name))
    _require(cfg.lr > 0, f"optim.lr: must be > 0, got {cfg.lr}")
    _require(0 <= cfg.momentum < 1, f"optim.momentum: must be in [0, 1), got {cfg.momentum}")
    _require(cfg.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {cfg.weight_decay}")
    _require(
        cfg.schedule in SCHEDULES, f"optim.schedule: unknown {cfg.schedule!r}; one of {SCHEDULES}"
    )
    _require(0 < cfg.gamma <= 1, f"optim.gamma: must be in (0, 1], got {cfg.gamma}")
    _require(
        all(0 < m < 1 for m in cfg.milestones) and cfg.milestones == sorted(cfg.milestones),
        "optim.milestones: must be increasing fractions of the epochs in (0, 1), "
        f"got {cfg.milestones}",
    )
    _require(
        cfg.schedule_epochs >= 0,
        f"optim.schedule_epochs: must be >= 0 (0 = epochs), got {cfg.schedule_epochs}",
    )
    _require(
        0 <= cfg.warmup_epochs < epochs,
        f"optim.warmup_epochs: must be in [0, epochs={epochs}), got {cfg.warmup_epochs}",
    )
    _require(
        not cfg.nesterov or cfg.momentum > 0,
        "optim.nesterov: requires optim.momentum > 0",
    )


def _validate_runtime(cfg: RuntimeConfig) -> None:
    _require(cfg.workers >= 0, f"runtime.workers: must be >= 0, got {cfg.workers}")
    _require(bool(cfg.output_dir), "runtime.output_dir: must not be empty")
    _require(cfg.log_every >= 0, f"runtime.log_every: must be >= 0, got {cfg.log_every}")
    _require(
        not cfg.sync_bn or cfg.gpu,
        "runtime.sync_bn: SyncBatchNorm runs on GPUs only; set runtime.gpu=true or sync_bn=false",
    )


def validate(config: Config) -> None:
    """Check every invariant; raise a one-line :class:`ConfigError` naming the first bad key."""
    _require(config.method in METHODS, f"method: unknown {config.method!r}; one of {METHODS}")
    _require(config.epochs >= 1, f"epochs: must be >= 1, got {config.epochs}")
    _require(config.seed >= 0, f"seed: must be >= 0, got {config.seed}")
    _validate_model(config.model)
    _validate_bake(config.bake)
    _validate_data(config.data)
    _validate_optim(config.optim, config.epochs)
    _validate_runtime(config.runtime)
