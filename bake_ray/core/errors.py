"""The one error type for bad input, importable from anywhere without import cycles.

:mod:`bake_ray.core.config` re-exports it, so ``from bake_ray.config import ConfigError`` keeps
working; modules that :mod:`bake_ray.core.config` itself imports (the model registry) take it
from here.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, always one line that names the offending key."""
