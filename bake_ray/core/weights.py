"""Local pretrained weights (``model.weights``): read safely, match by name and shape, report.

Most users fine-tune rather than train from scratch, and their weights come from many
places: timm or torchvision ``state_dict`` files, ``.safetensors`` files, training
checkpoints that wrap the state dict (``{"state_dict": ...}``, a bake-ray ``checkpoint.pt``),
DDP (``module.``) or ``torch.compile`` (``_orig_mod.``) prefixes. All are read as plain data
(``torch.load(weights_only=True)`` or safetensors): a file can fail to load, never run code.

Matching is by key, then shape. A file key is tried as it is, then through the model's
``native_key`` (the library's own key -> the wrapper's). Classifier tensors whose shape
differs (another class count) are left at their fresh initialisation; any other difference,
a backbone tensor the file lacks, or a file that fits nothing is refused in one line, since a
half-loaded backbone would train silently from a mix of pretrained and random layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bake_ray.core.checkpoint import load_error_reason
from bake_ray.core.errors import ConfigError

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")
_COUNTERS = ("num_batches_tracked",)  # BatchNorm step counters: not worth refusing a file for


@dataclass
class LoadPlan:
    """What loading a file into a model would do."""

    tensors: dict[str, Tensor] = field(default_factory=dict)  # model key -> tensor to copy
    skipped: list[str] = field(default_factory=list)  # file keys that fit no model tensor
    reinitialised: list[str] = field(default_factory=list)  # classifier keys left as built
    file_classes: int | None = None  # rows of the file's classifier, when it has one

    def summary(self, path: str, num_classes: int | None) -> str:
        """The one printed line: loaded / skipped / reinitialised counts."""
        why = ""
        if self.reinitialised and self.file_classes is not None and num_classes is not None:
            why = f" (the file has {self.file_classes} classes, this run {num_classes})"
        return (
            f"model.weights: loaded {len(self.tensors)} tensors from {path}; "
            f"skipped {len(self.skipped)} not in the model; "
            f"reinitialised {len(self.reinitialised)} classifier tensors{why}"
        )


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _tensors_of(obj: Any) -> dict[str, Tensor] | None:
    """The state dict inside what was loaded, or None if there is none."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return {_strip(str(k)): v for k, v in obj.items()}
        for key in _WRAPPER_KEYS:
            if key in obj:
                found = _tensors_of(obj[key])
                if found:
                    return found
    return None


def read_state_dict(path: str) -> dict[str, Tensor]:
    """The tensors of a weights file; a one-line :class:`ConfigError` if it is missing,
    unreadable, corrupt, holds code, or holds no state dict."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.weights: {path} not found (a .pt, .pth or .safetensors file)")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(file), device="cpu")
        else:
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for bad files
        raise ConfigError(f"model.weights: {path}: cannot load: {load_error_reason(exc)}") from None
    tensors = _tensors_of(obj)
    if not tensors:
        raise ConfigError(
            f"model.weights: {path} holds no state dict (a mapping of names to tensors, "
            f"possibly under {'/'.join(_WRAPPER_KEYS)})"
        )
    return tensors


def classifier_prefix(model: nn.Module) -> str | None:
    """``"fc."``, ``"net.head.fc."``...: where the model's classifier lives in its state dict."""
    classifier = getattr(model, "fc", None)
    for name, module in model.named_modules():
        if module is classifier and name:
            return f"{name}."
    return None


def _target(key: str, model_keys: Mapping[str, Tensor], model: nn.Module) -> str | None:
    if key in model_keys:
        return key
    native = getattr(model, "native_key", None)
    if native is not None and native(key) in model_keys:
        return native(key)
    return None


def plan_load(model: nn.Module, tensors: Mapping[str, Tensor], path: str, name: str) -> LoadPlan:
    """Match the file's tensors to the model; raise a one-line ConfigError if they don't fit."""
    own = model.state_dict()
    head = classifier_prefix(model)
    plan, mismatched = LoadPlan(), []
    for key, tensor in tensors.items():
        target = _target(key, own, model)
        if target is None:
            plan.skipped.append(key)
        elif tuple(own[target].shape) == tuple(tensor.shape):
            plan.tensors[target] = tensor
        elif head is not None and target.startswith(head):
            plan.file_classes = int(tensor.shape[0])
        else:
            mismatched.append((target, list(tensor.shape), list(own[target].shape)))
    if mismatched:
        key, theirs, ours = mismatched[0]
        raise ConfigError(
            f"model.weights: {path} does not fit {name}: {key} is {theirs} in the file, "
            f"{ours} in the model ({len(mismatched)} tensors differ)"
        )
    backbone = [k for k in own if head is None or not k.startswith(head)]
    loaded = [k for k in backbone if k in plan.tensors]
    if not loaded:
        raise ConfigError(
            f"model.weights: none of the {len(tensors)} tensors in {path} belong to {name} "
            f"(first key in the file: {next(iter(tensors))!r}); saved from another architecture?"
        )
    missing = [k for k in backbone if k not in plan.tensors and not k.endswith(_COUNTERS)]
    if missing:
        raise ConfigError(
            f"model.weights: {path} lacks {len(missing)} of the {len(backbone)} backbone "
            f"tensors of {name} (first: {missing[0]}); saved from another architecture?"
        )
    plan.reinitialised = [k for k in own if head and k.startswith(head) and k not in plan.tensors]
    return plan


def load_weights(model: nn.Module, path: str, name: str, num_classes: int | None = None) -> str:
    """Load ``path`` into ``model`` in place; return the one-line summary to print."""
    plan = plan_load(model, read_state_dict(path), path, name)
    merged = {**model.state_dict(), **plan.tensors}
    model.load_state_dict(merged)
    return plan.summary(path, num_classes)
