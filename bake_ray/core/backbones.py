"""timm and torchvision classification models behind bake-ray's ``(features, logits)`` contract.

BAKE needs two things from a network: the pooled vector that feeds its classifier and the
logits. Both libraries already compute that vector; the wrappers below only expose it:

- timm: ``forward_features`` then ``forward_head(pre_logits=True)`` is the pooled (and, where
  the model has one, normalised) vector; ``get_classifier()`` maps it to the logits.
- torchvision: the model's last ``nn.Linear`` is its classifier; it is taken out (replaced by
  ``nn.Identity``) so the model returns the vector that fed it.

Each wrapper keeps the library's own module (``net``) untouched otherwise, so its
initialisation, layer names and ``SyncBatchNorm`` conversion behave as in the library, and
:meth:`native_key` maps the library's state-dict keys to the wrapper's (for local weights).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bake_ray.core.errors import ConfigError

_PROBE_CLASSES = 3
_PROBE_BATCH = 2
# torchvision models whose input size is a constructor argument (position embeddings)
_TORCHVISION_SIZE_KWARG = {"vit_": "image_size", "maxvit_": "input_size"}
_TUPLE_SIZE_KWARGS = ("input_size",)
# auxiliary classifiers (a training trick of these papers) off: BAKE needs one classifier
_TORCHVISION_KWARGS = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_timm_head(net: nn.Module, name: str) -> None:
    """One classifier fed by ``forward_head(pre_logits=True)``, or a one-line refusal."""
    reason = None
    classifier = net.get_classifier()
    if "pre_logits" not in inspect.signature(net.forward_head).parameters:
        reason = "its forward_head has no pre_logits option (an encoder, not a classifier)"
    elif not isinstance(classifier, nn.Module) or isinstance(
        classifier, (nn.ModuleList, nn.ModuleDict)
    ):
        reason = f"its classifier is a {type(classifier).__name__} of heads, not one layer"
    if reason:
        raise ConfigError(f"model.name: {name} cannot give pooled features for BAKE: {reason}")


class TimmBackbone(nn.Module):
    """A timm model whose pre-logits vector is returned next to its logits."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        in_channels: int,
        image_size: int | None,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        import timm

        kwargs: dict[str, object] = {"num_classes": num_classes, "in_chans": in_channels}
        cfg = timm.models.get_pretrained_cfg(arch)
        if image_size is not None and cfg is not None and cfg.fixed_input_size:
            kwargs["img_size"] = image_size  # ViT-like: position embeddings for this size
        self.net = timm.create_model(arch, pretrained=pretrained, **kwargs)
        _check_timm_head(self.net, f"timm/{arch}")

    @property
    def fc(self) -> nn.Module:
        """The classifier (a submodule of ``net``, so its weights are saved once)."""
        return self.net.get_classifier()

    def pooled(self, x: Tensor) -> Tensor:
        """What timm's head computes before its classifier: the vector BAKE compares."""
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def classify(self, features: Tensor) -> Tensor:
        head = self.fc
        if isinstance(head, nn.Conv2d):  # ResNetV2, DLA, DPN: a 1x1 convolution classifies
            return head(features[:, :, None, None]).flatten(1)
        return head(features)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.pooled(x)
        return features, self.classify(features)

    def native_key(self, key: str) -> str:
        """A key of timm's own ``state_dict`` -> the same tensor's key in this wrapper."""
        return f"net.{key}"


def _last_linear(net: nn.Module) -> tuple[str, nn.Linear] | None:
    found = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    return found[-1] if found else None


def _replace(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


def _adapt_stem(net: nn.Module, in_channels: int, pretrained: bool) -> None:
    """Give the first convolution ``in_channels`` inputs. A pretrained stem keeps what it
    learnt, as timm does: its RGB filters summed, spread evenly over the new channels; a
    random one gets torchvision's ResNet initialisation."""
    found = next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None or found[1].in_channels == in_channels:
        return
    path, old = found
    if old.groups != 1:
        raise ConfigError(f"model.name: cannot adapt the grouped stem {path} to {in_channels} ch")
    new = nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
        old.dilation, bias=old.bias is not None, padding_mode=old.padding_mode,
    )  # fmt: skip
    if pretrained:
        with torch.no_grad():
            summed = old.weight.sum(dim=1, keepdim=True)
            new.weight.copy_(summed.repeat(1, in_channels, 1, 1) / in_channels)
            if old.bias is not None:
                new.bias.copy_(old.bias)
    else:
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    _replace(net, path, new)


class TorchvisionBackbone(nn.Module):
    """A torchvision classifier whose last linear layer is split off as ``fc``."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        in_channels: int,
        image_size: int | None,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        from torchvision import models

        kwargs: dict[str, object] = {"weights": "DEFAULT" if pretrained else None}
        if not pretrained:
            kwargs["num_classes"] = num_classes
        for prefix, size_kwarg in _TORCHVISION_SIZE_KWARG.items():
            if image_size is not None and arch.startswith(prefix) and not pretrained:
                tupled = size_kwarg in _TUPLE_SIZE_KWARGS
                kwargs[size_kwarg] = (image_size, image_size) if tupled else image_size
        net = models.get_model(arch, **kwargs, **_TORCHVISION_KWARGS.get(arch, {}))
        last = _last_linear(net)
        if last is None:
            raise ConfigError(
                f"model.name: torchvision/{arch} cannot give pooled features for BAKE: "
                "it has no linear classifier (its head is a convolution)"
            )
        self.classifier_path, fc = last
        if fc.out_features != num_classes:  # pretrained: 1000 ImageNet classes
            fc = nn.Linear(fc.in_features, num_classes, bias=fc.bias is not None)
        _replace(net, self.classifier_path, nn.Identity())
        _adapt_stem(net, in_channels, pretrained)
        self.name = f"torchvision/{arch}"
        self.net = net
        self.fc = fc

    def pooled(self, x: Tensor) -> Tensor:
        """The network without its last linear layer: the vector that layer receives."""
        features = self.net(x)
        if not isinstance(features, Tensor):  # e.g. Inception's (logits, aux) in training
            raise ConfigError(
                f"model.name: {self.name} cannot give pooled features for BAKE: in training "
                f"its forward returns {type(features).__name__}, not a tensor"
            )
        return features

    def classify(self, features: Tensor) -> Tensor:
        return self.fc(features)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.pooled(x)
        return features, self.classify(features)

    def native_key(self, key: str) -> str:
        """A key of torchvision's own ``state_dict`` -> the same tensor's key here."""
        prefix = f"{self.classifier_path}."
        return f"fc.{key[len(prefix) :]}" if key.startswith(prefix) else f"net.{key}"


LIBRARY_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "timm": TimmBackbone,
    "torchvision": TorchvisionBackbone,
}


def split_name(name: str) -> tuple[str | None, str]:
    """``"timm/resnet18"`` -> ``("timm", "resnet18")``; any other name -> ``(None, name)``.

    The same rule as :func:`bake_ray.core.registry.split_name`, which this module must not import:
    the registry imports this one (lazily) to probe a library model.
    """
    library, sep, arch = name.partition("/")
    return (library, arch) if sep and library in LIBRARY_BUILDERS else (None, name)


def build_library_model(
    name: str, num_classes: int, in_channels: int, image_size: int | None, pretrained: bool
) -> nn.Module:
    """``timm/<arch>`` or ``torchvision/<arch>`` as a ``(features, logits)`` module."""
    library, arch = split_name(name)
    if library is None:
        raise ConfigError(f"model.name: {name!r} is not a timm/ or torchvision/ name")
    return LIBRARY_BUILDERS[library](arch, num_classes, in_channels, image_size, pretrained)


def default_image_size(name: str) -> int:
    """The input side the library designed the model for (224 for most)."""
    library, arch = split_name(name)
    if library == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is not None and cfg.input_size:
            return int(cfg.input_size[-1])
    if library == "torchvision":
        from torchvision import models

        crop = models.get_model_weights(arch).DEFAULT.transforms.keywords.get("crop_size")
        if crop:
            return int(crop)
    return 224


def _build_quietly(name: str, in_channels: int, size: int, device: str) -> nn.Module:
    with torch.device(device), warnings.catch_warnings():  # meta: shapes only, no memory
        warnings.simplefilter("ignore")  # libraries' deprecation notes are not the user's
        return build_library_model(name, _PROBE_CLASSES, in_channels, size, False)


def probe(name: str, in_channels: int, image_size: int | None) -> int:
    """Build ``name`` on the meta device and run a fake batch through it; return the
    feature dimension. Raise a one-line :class:`ConfigError` if the model cannot give BAKE
    pooled ``[batch, features]`` vectors feeding a classifier, or rejects this input size."""
    size = image_size or default_image_size(name)
    device = "meta"
    try:
        model = _build_quietly(name, in_channels, size, device)
    except ConfigError:
        raise
    except Exception:  # a few models' initialisation reads values: build them for real
        device = "cpu"
        try:
            model = _build_quietly(name, in_channels, size, device)
        except ConfigError:
            raise
        except Exception as exc:  # the library refused these arguments
            raise ConfigError(f"model.name: cannot build {name}: {_one_line(exc)}") from None
    model.train()  # the mode BAKE trains in: auxiliary heads show up here
    x = torch.zeros(_PROBE_BATCH, in_channels, size, size, device=device)
    with torch.no_grad():
        inputs = f"does not run on {in_channels}x{size}x{size} inputs"
        features = _run(lambda: model.pooled(x), name, inputs)
        if features.ndim != 2 or features.shape[0] != _PROBE_BATCH:
            raise ConfigError(
                f"model.name: {name} cannot give pooled features for BAKE: its head gives "
                f"shape {list(features.shape)}, not [batch, features]"
            )
        not_pooled = "cannot give pooled features for BAKE: its classifier does not take them"
        logits = _run(lambda: model.classify(features), name, not_pooled)
    if tuple(logits.shape) != (_PROBE_BATCH, _PROBE_CLASSES):
        raise ConfigError(
            f"model.name: {name} cannot give pooled features for BAKE: its classifier maps "
            f"them to shape {list(logits.shape)}, not [batch, classes]"
        )
    return int(features.shape[1])


def _run(step: Callable[[], Tensor], name: str, problem: str) -> Tensor:
    """Run one probe step; any library error becomes one line saying what went wrong."""
    try:
        return step()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"model.name: {name} {problem}: {_one_line(exc)}") from None
