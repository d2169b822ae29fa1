"""The one registry of names: datasets, methods and models, and whether a model can serve BAKE.

:data:`DATASETS` and :data:`METHODS` are the only lists of those names: the config schema
derives its ``Literal`` types from them. Models are richer (below).

Three families of names:

- bake-ray's built-in models (:data:`BUILTIN_MODELS`);
- ``timm/<name>``: any PyTorch Image Models architecture (``timm.list_models()``), optionally
  with a pretrained tag (``timm/resnet18.a1_in1k``);
- ``torchvision/<name>``: any torchvision classification model
  (``torchvision.models.list_models(module=torchvision.models)``).

The config schema (``model.name``'s validator in :mod:`bake_ray.core.config`), the search-space
checks (a ``choice`` over model names is validated value by value through the same
function) and
:func:`bake_ray.core.models.build_model` all ask :func:`check_model_name`, so a name is judged
the same way everywhere and a bad one fails in one line before anything starts.

BAKE needs the pooled feature vector that feeds the classifier. Whether a library model
offers one is only known by running it, so a library name is also built once on PyTorch's
``meta`` device (no memory, no weights) and run on a fake batch; the verdict is cached per
name. This module imports nothing heavy at import time: the config must stay light, and
timm takes seconds to import.
"""

from __future__ import annotations

import difflib
import functools

from bake_ray.core.errors import ConfigError

DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder")
METHODS = ("bake", "ce", "label_smoothing")
BUILTIN_MODELS = ("small_cnn", "cifar_resnet18", "resnet18", "resnet50")
LIBRARIES = ("timm", "torchvision")
_SUGGESTIONS = 4


def split_name(name: str) -> tuple[str | None, str]:
    """``"timm/resnet18"`` -> ``("timm", "resnet18")``; any other name -> ``(None, name)``."""
    library, sep, arch = name.partition("/")
    if sep and library in LIBRARIES:
        return library, arch
    return None, name


@functools.cache
def library_models(library: str) -> tuple[str, ...]:
    """Every architecture name the installed library can build (without pretrained tags)."""
    if library == "timm":
        import timm

        return tuple(timm.list_models())
    if library == "torchvision":
        from torchvision import models

        return tuple(models.list_models(module=models))  # classification models only
    raise ValueError(f"not a model library: {library!r}")


def _close_matches(word: str, library: str) -> list[str]:
    found = difflib.get_close_matches(word, library_models(library), n=_SUGGESTIONS, cutoff=0.6)
    return [f"{library}/{match}" for match in found]


def _unknown_message(name: str) -> str:
    """No family claims ``name``: list the built-ins and the closest library names."""
    close = difflib.get_close_matches(name, BUILTIN_MODELS, n=_SUGGESTIONS, cutoff=0.6)
    for library in LIBRARIES:
        close += _close_matches(name, library)
    hint = f"; close matches: {', '.join(close[:_SUGGESTIONS])}" if close else ""
    return (
        f"model.name: unknown {name!r}; one of {', '.join(BUILTIN_MODELS)}, "
        f"timm/<name> or torchvision/<name>{hint}"
    )


def _base_arch(library: str, arch: str) -> str:
    """timm accepts ``<arch>.<pretrained tag>``; the architecture is the part before the dot."""
    return arch.split(".", 1)[0] if library == "timm" else arch


def check_model_name(name: str) -> None:
    """Raise a one-line :class:`ConfigError` unless ``name`` builds a model BAKE can train.

    A library name must exist in the installed library and its model must return a pooled
    ``[batch, features]`` vector that feeds a single classifier (checked on the meta device).
    """
    if name in BUILTIN_MODELS:
        return
    library, arch = split_name(name)
    if library is None:
        raise ConfigError(_unknown_message(name))
    known = library_models(library)
    if _base_arch(library, arch) not in known:
        close = _close_matches(_base_arch(library, arch), library)
        hint = f"close matches: {', '.join(close)}" if close else "no close match"
        raise ConfigError(
            f"model.name: unknown {library} model {arch!r}; {hint} "
            f"({len(known)} names in {library} {_version(library)})"
        )
    _check_pooled_features(name)


@functools.cache
def _check_pooled_features(name: str) -> None:
    from bake_ray.core.backbones import probe  # torch and the library: only for library names

    probe(name, in_channels=3, image_size=None)


def _version(library: str) -> str:
    from importlib.metadata import version

    return version(library)
