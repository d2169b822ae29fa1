"""The pydantic layer under every bake-ray schema: strict field types, and one-line errors.

The training config (:mod:`bake_ray.core.config`) and the search file's budget and scheduler
(:mod:`bake_ray.core.search_space`) are pydantic dataclasses: real ``dataclasses`` (so
``dataclasses.replace``/``asdict`` keep working, and ``replace`` re-validates) whose
types, ranges (``Field(gt=..., lt=...)``) and cross-field rules (``model_validator``) are
the schema. This module turns pydantic's multi-line ``ValidationError`` into bake-ray's
rule for bad input: a :class:`ConfigError` of one line that names the dotted key, what is
allowed and what was given (``bake.omega: must be in [0, 1), got 1.0``).

Types are strict where YAML can mislead: an int field refuses ``2.5``, ``"3"`` and
``true``; a float field takes ints (``temperature: 3``) but not bools or strings; NaN and
infinities are refused everywhere (``allow_inf_nan=False``).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from typing import Annotated, Any

import annotated_types as at
from pydantic import ConfigDict, Strict, StrictBool, StrictInt, StrictStr, TypeAdapter
from pydantic import ValidationError as _ValidationError
from pydantic.fields import FieldInfo

from bake_ray.core.errors import ConfigError

#: Every schema dataclass: unknown keys are errors, assignments are checked, NaN refused.
SCHEMA = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

Float = Annotated[float, Strict()]  # strict float still accepts an int (3 -> 3.0)
Int = StrictInt
Bool = StrictBool
Str = StrictStr

_TYPE_NAMES = {
    "int_type": "int",
    "float_type": "float",
    "bool_type": "bool",
    "string_type": "str",
    "list_type": "a list",
}
_MAPPING_ERRORS = ("dataclass_type", "model_type", "dict_type", "dataclass_args_type")


@dataclasses.dataclass(frozen=True)
class Style:
    """Wording that differs between the training config and a search file's sections."""

    unknown_choice: str = "unknown "  # "data.dataset: unknown 'mnist'; one of (...)"
    show_got: bool = True  # "..., got 0" after a range


CONFIG_STYLE = Style()


@functools.cache
def _adapter(cls: type) -> TypeAdapter[Any]:
    return TypeAdapter(cls)


def validated(cls: type, values: Any, prefix: str = "", style: Style = CONFIG_STYLE) -> Any:
    """``cls`` built from plain data, or a one-line :class:`ConfigError` naming the key."""
    try:
        return _adapter(cls).validate_python(values)
    except _ValidationError as exc:
        raise one_line(exc, cls, prefix, style) from None


def one_line_init(section: str = "", style: Style = CONFIG_STYLE) -> Any:
    """Class decorator: direct construction (``DataConfig(dataset="mnist")``) and
    ``dataclasses.replace`` raise the same one-line :class:`ConfigError` as loading does.

    Validation from plain data (:func:`validated`) never calls ``__init__``; this covers
    code that builds a section itself. ``section`` is the dotted prefix of its keys.
    """

    def wrap(cls: type) -> type:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except _ValidationError as exc:
                raise one_line(exc, cls, f"{section}." if section else "", style) from None

        cls.__init__ = __init__  # type: ignore[method-assign]
        return cls

    return wrap


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def field_info(cls: type, path: typing.Sequence[str | int]) -> tuple[type | None, FieldInfo | None]:
    """The schema class holding the field at ``path`` (a pydantic ``loc``) and its FieldInfo."""
    owner: Any = cls
    info: FieldInfo | None = None
    for depth, part in enumerate(path):
        if isinstance(part, int) or not dataclasses.is_dataclass(owner):
            return owner, info
        info = owner.__pydantic_fields__.get(part)
        if info is None:
            return owner, None
        if dataclasses.is_dataclass(info.annotation) and depth < len(path) - 1:
            owner = info.annotation
    return owner, info


def bounds(info: FieldInfo | None) -> dict[str, float]:
    """``{"ge": 0, "lt": 1}``: the numeric range a field declares (empty if none)."""
    found: dict[str, float] = {}
    for meta in info.metadata if info else ():
        for kind in ("gt", "ge", "lt", "le"):
            if isinstance(meta, getattr(at, kind.capitalize())):
                found[kind] = getattr(meta, kind)
    return found


def range_text(limits: Mapping[str, float]) -> str:
    """``{"ge": 0, "lt": 1}`` -> ``"in [0, 1)"``; ``{"gt": 0}`` -> ``"> 0"``."""
    low = next(((k, v) for k, v in limits.items() if k in ("gt", "ge")), None)
    high = next(((k, v) for k, v in limits.items() if k in ("lt", "le")), None)
    if low and high:
        left, right = "(" if low[0] == "gt" else "[", ")" if high[0] == "lt" else "]"
        return f"in {left}{low[1]:g}, {high[1]:g}{right}"
    sign = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    kind, value = low or high  # type: ignore[misc]
    return f"{sign[kind]} {value:g}"


def in_range(value: float, limits: Mapping[str, float]) -> bool:
    checks = {
        "gt": value > limits.get("gt", 0),
        "ge": value >= limits.get("ge", 0),
        "lt": value < limits.get("lt", 0),
        "le": value <= limits.get("le", 0),
    }
    return all(checks[kind] for kind in limits)


def dotted(loc: typing.Sequence[str | int], prefix: str = "") -> str:
    """``("optim", "milestones", 1)`` -> ``"optim.milestones[1]"``."""
    text = prefix.rstrip(".")
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _choices(info: FieldInfo | None) -> tuple[Any, ...]:
    annotation = info.annotation if info else None
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()


def one_line(
    exc: _ValidationError, cls: type, prefix: str = "", style: Style = CONFIG_STYLE
) -> ConfigError:
    """The first error of ``exc`` as bake-ray's one line: key, what is allowed, what was got."""
    err = exc.errors()[0]
    loc, kind, got = err["loc"], err["type"], err.get("input")
    key = dotted(loc, prefix) or prefix.rstrip(".") or "config"
    error = (err.get("ctx") or {}).get("error")
    if isinstance(error, ConfigError):  # a validator's own message already names its keys
        return ConfigError(str(error))
    owner, info = field_info(cls, loc)
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        allowed = ", ".join(sorted(field_names(owner))) if owner else ""
        return ConfigError(f"{key}: unknown key; allowed: {allowed}")
    if kind in _MAPPING_ERRORS:
        return ConfigError(f"{key}: expected a mapping, got {got!r}")
    if kind in _TYPE_NAMES:
        return ConfigError(f"{key}: expected {_TYPE_NAMES[kind]}, got {got!r}")
    if kind == "finite_number":
        return ConfigError(f"{key}: must be a finite number, got {got}")
    if kind == "literal_error":
        return ConfigError(f"{key}: {style.unknown_choice}{got!r}; one of {_choices(info)}")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        if info is not None and info.annotation is float:
            got = float(got)
        tail = f", got {got}" if style.show_got else ""
        return ConfigError(f"{key}: must be {range_text(bounds(info))}{tail}")
    if kind == "string_too_short":
        return ConfigError(f"{key}: must not be empty")
    if kind == "missing":
        return ConfigError(f"{key}: required")
    return ConfigError(f"{key}: {err['msg']}, got {got!r}")
