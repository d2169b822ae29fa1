"""One typed configuration for a bake-ray run: the schema, YAML loading, overrides, validation.

The pydantic dataclasses below *are* the schema: types, ranges (``Field``) and cross-field
rules (``model_validator``) live on the fields, YAML files and ``--set a.b=value``
overrides are checked against them, unknown keys are rejected, and the first problem is
reported as one line naming the key (:mod:`bake_ray.core.schema`) before any compute starts.
They stay ``dataclasses`` (``replace``, ``asdict``, ``fields`` work; ``replace`` and
attribute assignment re-validate). Names come from :mod:`bake_ray.core.registry`. YAML is read
with a safe loader only: nothing in a config can import or run code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from bake_ray.core import registry, storage
from bake_ray.core.errors import ConfigError  # defined there, imported from here by most modules
from bake_ray.core.schema import SCHEMA, Bool, Float, Int, Str, one_line_init, validated

METHODS = registry.METHODS
DATASETS = registry.DATASETS
MODELS = registry.BUILTIN_MODELS  # plus timm/<name> and torchvision/<name>: see registry
SCHEDULES = ("step", "cosine", "constant")
SOLVERS = ("auto", "solve", "neumann")  # how BAKE computes its targets (see bake.py)

#: Short names of BAKE's hyperparameters (config path -> alias): MLflow params, tables.
BAKE_ALIASES = {
    "bake.temperature": "T",
    "bake.omega": "omega",
    "bake.loss_weight": "lambda",
    "bake.affinity_temperature": "tau",
}


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


@one_line_init("data")
@dataclass(config=SCHEMA)
class DataConfig:
    """Where the images come from and how batches are formed."""

    dataset: Literal[DATASETS] = "digits"  # type: ignore[valid-type]
    data_dir: Str | None = None
    download: Bool = False
    val_fraction: Annotated[Float, Field(gt=0, le=0.5)] = 0.1
    batch_size: Annotated[Int, Field(ge=2)] = 64
    same_class: Annotated[Int, Field(ge=0)] = 1
    loader_workers: Annotated[Int, Field(ge=0)] = 0
    train_subset: Int | None = None

    @model_validator(mode="after")
    def _batches_fit(self) -> DataConfig:
        """Each anchor is followed by ``same_class`` images of its class: whole groups only."""
        group = self.same_class + 1
        _require(
            self.batch_size % group == 0,
            f"data.batch_size: {self.batch_size} must be divisible by data.same_class + 1 "
            f"= {group} (each anchor is followed by {self.same_class} same-class images)",
        )
        _require(
            self.train_subset is None or self.train_subset >= 2 * self.batch_size,
            f"data.train_subset: must be >= 2 * data.batch_size = {2 * self.batch_size}, "
            f"got {self.train_subset}",
        )
        _require(
            self.dataset != "imagefolder" or self.data_dir is not None,
            "data.data_dir: required for data.dataset=imagefolder (a folder with train/ and val/)",
        )
        return self


@one_line_init("model")
@dataclass(config=SCHEMA)
class ModelConfig:
    """Which architecture and its starting weights; every model returns (features, logits).

    ``name``: a built-in model, ``timm/<name>`` or ``torchvision/<name>`` (bake_ray.core.registry).
    ``weights``: a local .pt/.pth/.safetensors file loaded into the backbone (read as plain
    data); classifier tensors of another class count are reinitialised.
    ``pretrained``: the library's own weights, via its own download and cache.
    """

    name: Str = "small_cnn"
    weights: Str | None = None
    pretrained: Bool = False

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        registry.check_model_name(name)  # library names are probed once, then cached
        return name

    @model_validator(mode="after")
    def _one_source_of_weights(self) -> ModelConfig:
        _require(
            not (self.pretrained and self.weights),
            "model.pretrained: set either model.pretrained or model.weights, not both",
        )
        _require(
            not self.pretrained or registry.split_name(self.name)[0] is not None,
            f"model.pretrained: the built-in {self.name} has no pretrained weights; use "
            "model.weights with a local file, or a timm/<name> or torchvision/<name> model",
        )
        _require(self.weights is None or bool(self.weights.strip()), "model.weights: empty path")
        return self


@one_line_init("bake")
@dataclass(config=SCHEMA)
class BakeConfig:
    """BAKE's hyperparameters (paper defaults T=4, omega=0.5, lambda=1).

    ``affinity_temperature`` (tau) goes BEYOND the paper: the affinity is
    softmax_{j != i}(cos(f_i, f_j) / tau). The default 1.0 is the paper exactly; cosines of
    post-ReLU features lie in [0, 1], so at tau=1 the affinity is close to uniform, and a
    smaller tau concentrates it on the nearest neighbours.
    """

    temperature: Annotated[Float, Field(gt=0)] = 4.0
    omega: Annotated[Float, Field(ge=0, lt=1)] = 0.5
    loss_weight: Annotated[Float, Field(ge=0)] = 1.0
    global_ensembling: Bool = True
    label_smoothing: Annotated[Float, Field(ge=0, lt=1)] = 0.1
    solver: Literal[SOLVERS] = "auto"  # type: ignore[valid-type]  # auto: the cheaper one
    tol: Annotated[Float, Field(gt=0, lt=1)] = 1e-6  # neumann's max row-L1 error
    affinity_temperature: Annotated[Float, Field(gt=0)] = 1.0  # tau; 1.0 = the paper


@one_line_init("optim")
@dataclass(config=SCHEMA)
class OptimConfig:
    """SGD and its learning-rate schedule.

    ``decay_all_params``: weight decay on every parameter, as the official BAKE code does;
    off (the default), BatchNorm parameters and biases get none. ``warmup_start_factor``:
    the linear warm-up starts at this fraction of ``lr`` (pycls, the official ImageNet code:
    0.1); 0 (the default) ramps up from 0.
    """

    lr: Annotated[Float, Field(gt=0)] = 0.05
    momentum: Annotated[Float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[Float, Field(ge=0)] = 5e-4
    nesterov: Bool = False
    schedule: Literal[SCHEDULES] = "step"  # type: ignore[valid-type]
    milestones: list[Float] = dataclasses.field(default_factory=lambda: [0.5, 0.75])
    gamma: Annotated[Float, Field(gt=0, le=1)] = 0.1
    warmup_epochs: Annotated[Int, Field(ge=0)] = 0
    # Epochs the schedule is laid out over (0 = epochs). Set by `train --resume
    # --extend-schedule` so a longer run keeps the finished schedule, then its final lr.
    schedule_epochs: Annotated[Int, Field(ge=0)] = 0
    decay_all_params: Bool = False
    warmup_start_factor: Annotated[Float, Field(ge=0, le=1)] = 0.0

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, milestones: list[float]) -> list[float]:
        _require(
            all(0 < m < 1 for m in milestones) and milestones == sorted(milestones),
            "optim.milestones: must be increasing fractions of the epochs in (0, 1), "
            f"got {milestones}",
        )
        return milestones

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimConfig:
        _require(
            not self.nesterov or self.momentum > 0, "optim.nesterov: requires optim.momentum > 0"
        )
        return self


@one_line_init("runtime")
@dataclass(config=SCHEMA)
class RuntimeConfig:
    """Where and how the run executes; does not change the maths."""

    workers: Annotated[Int, Field(ge=0)] = 0
    gpu: Bool = False
    amp: Bool = True
    sync_bn: Bool = False  # batch-norm statistics over all workers (the paper's ImageNet recipe)
    channels_last: Bool | None = None  # NHWC memory format; None = on for CNNs, off for ViTs
    output_dir: Annotated[Str, Field(min_length=1)] = "runs"
    run_name: Str | None = None
    log_every: Annotated[Int, Field(ge=0)] = 0  # read progress every N steps; 0: per epoch

    @model_validator(mode="after")
    def _sync_bn_on_gpus(self) -> RuntimeConfig:
        _require(
            not self.sync_bn or self.gpu,
            "runtime.sync_bn: SyncBatchNorm runs on GPUs only; set runtime.gpu=true or "
            "sync_bn=false",
        )
        return self


@one_line_init()
@dataclass(config=SCHEMA)
class Config:
    """A complete, resolved bake-ray training run."""

    seed: Annotated[Int, Field(ge=0)] = 0
    method: Literal[METHODS] = "bake"  # type: ignore[valid-type]
    epochs: Annotated[Int, Field(ge=1)] = 15
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    bake: BakeConfig = dataclasses.field(default_factory=BakeConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _warmup_fits(self) -> Config:
        warmup = self.optim.warmup_epochs
        _require(
            warmup < self.epochs,
            f"optim.warmup_epochs: must be in [0, epochs={self.epochs}), got {warmup}",
        )
        return self


def _require(ok: bool, message: str) -> None:
    """A cross-field rule: its message names every key involved (kept verbatim)."""
    if not ok:
        raise ConfigError(message)


def from_dict(values: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain data (one-line errors)."""
    return validated(Config, values)


def to_dict(config: Config) -> dict[str, Any]:
    """Nested plain-data form (what is saved with every run as ``config.yaml``)."""
    return dataclasses.asdict(config)


def flatten(values: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"bake": {"omega": 0.5}}`` -> ``{"bake.omega": 0.5}`` (``sep="/"``: ``bake/omega``).

    The one nested-to-flat helper for config keys (MLflow params, search-space keys).
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}{sep}", sep))
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


def override_texts(overrides: Mapping[str, Any] | Sequence[str]) -> list[str]:
    """``{"bake.omega": 0.7}`` (the Python API) as the ``key=value`` texts ``--set`` gives,
    so both are parsed and refused by the same code; texts pass through unchanged.
    Values are written as JSON, which YAML reads back as the same value and type."""
    if not isinstance(overrides, Mapping):
        return [str(text) for text in overrides]
    return [f"{key}={_yaml_scalar(value)}" for key, value in overrides.items()]


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    # numpy scalars (a value read from a DataFrame) by their Python value; paths as text
    return json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely, from a local path or a storage URI (``s3://...``, where
    a search keeps its ``best_config.yaml``); every failure is a one-line
    :class:`ConfigError`."""
    text = _read_text(path)
    try:
        data = safe_load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {_first_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _read_text(path: str | Path) -> str:
    if storage.is_remote(path):
        text = storage.read_text(str(path))
        if text is None:
            raise ConfigError(
                f"{path}: cannot read: no such object, or no access with this machine's "
                "AWS/cloud credentials"
            )
        return text
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None


def config_location(text: str) -> str | Path:
    """A ``--config`` value: a local path, or a URI kept as text (``Path`` would fold the
    ``//`` of ``s3://bucket/key``)."""
    return text if storage.is_remote(text) else Path(text)


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


def dump(config: Config) -> str:
    """The resolved config as YAML text that ``--config`` reads back to the same config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save(config: Config, path: str | Path) -> None:
    """Write the resolved config so any run can be reproduced with ``--config``."""
    Path(path).write_text(dump(config))
