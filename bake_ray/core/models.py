"""Architectures for BAKE: every model returns ``(features [B, D], logits [B, C])``.

BAKE's affinity is built from the pooled feature vector that feeds the final linear layer
(as in the paper), so each model exposes that vector next to its logits instead of hiding
it inside a classifier. Models are plain ``nn.Module``s with no globals, no device calls and
no knowledge of the config; :func:`build_model` is the only entry point the rest of the code
needs. Besides the four built-in models it builds ``timm/<name>`` and ``torchvision/<name>``
(:mod:`.backbones`); which names exist is decided by :mod:`.registry` alone.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import models as tv_models

from bake_ray.core import registry
from bake_ray.core.backbones import build_library_model, probe
from bake_ray.core.config import ConfigError, ModelConfig
from bake_ray.core.weights import plan_load, read_state_dict

MODEL_NAMES = registry.BUILTIN_MODELS


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _init_weights(model: nn.Module) -> None:
    """He-normal convolutions and unit BatchNorm: the usual ResNet initialisation."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU layers (32-64-128-128), global average pool, linear.

    Sized for 8x8 digits and 28x28 Fashion-MNIST on a 2-core CPU: only the 32-channel stem
    runs at full resolution; each later layer halves the side until it is 4 (28 -> 14 -> 7 -> 4,
    8 -> 4), so a Fashion-MNIST epoch stays cheap (about 10 M multiply-adds per image).
    """

    widths = (32, 64, 128, 128)

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu(in_channels, self.widths[0])]
        side = image_size
        for c_in, c_out in zip(self.widths, self.widths[1:], strict=False):
            stride = 2 if side > 4 else 1
            side = -(-side // stride)
            layers.append(_conv_bn_relu(c_in, c_out, stride))
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.widths[-1], num_classes)
        self.feature_dim = self.widths[-1]
        _init_weights(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = torch.flatten(self.pool(self.body(x)), 1)
        return features, self.fc(features)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs plus an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """The CIFAR ResNet-18 of BAKE and most CIFAR papers.

    Differs from the ImageNet ResNet-18 only in the stem: one 3x3 stride-1 conv and no max
    pool, so 32x32 inputs keep enough resolution (4x4 before the final pool).
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, 64)
        stages: list[nn.Module] = []
        c_in = 64
        for i, c_out in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        self.feature_dim = 512
        _init_weights(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = torch.flatten(self.pool(self.layers(self.stem(x))), 1)
        return features, self.fc(features)


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet (random init) whose ``fc`` is split off to expose the features.

    Keeping torchvision's own module means its initialisation and layer names are unchanged
    (``backbone.layer1...``), and ``SyncBatchNorm.convert_sync_batchnorm`` works as usual.
    """

    def __init__(
        self, arch: Callable[..., tv_models.ResNet], num_classes: int, in_channels: int
    ) -> None:
        super().__init__()
        backbone = arch(weights=None, num_classes=num_classes)
        if in_channels != 3:
            backbone.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.fc = backbone.fc
        self.feature_dim = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(x)
        return features, self.fc(features)

    def native_key(self, key: str) -> str:
        """A key of torchvision's own ResNet ``state_dict`` -> the same tensor's key here."""
        return key if key.startswith("fc.") else f"backbone.{key}"


def build_model(
    name: str, num_classes: int, in_channels: int, image_size: int, *, pretrained: bool = False
) -> nn.Module:
    """The model called ``name``; its ``forward(x)`` returns ``(features, logits)``.

    ``pretrained`` asks timm or torchvision for their own weights (their download and cache).
    """
    if num_classes < 1 or in_channels < 1 or image_size < 1:
        raise ValueError(
            f"bad model shape: num_classes={num_classes}, in_channels={in_channels}, "
            f"image_size={image_size}"
        )
    if registry.split_name(name)[0] is not None:
        registry.check_model_name(name)
        return build_library_model(name, num_classes, in_channels, image_size, pretrained)
    if pretrained:
        raise ConfigError(f"model.pretrained: the built-in {name} has no pretrained weights")
    builders: dict[str, Callable[[], nn.Module]] = {
        "small_cnn": lambda: SmallCNN(num_classes, in_channels, image_size),
        "cifar_resnet18": lambda: CifarResNet18(num_classes, in_channels),
        "resnet18": lambda: TorchvisionResNet(tv_models.resnet18, num_classes, in_channels),
        "resnet50": lambda: TorchvisionResNet(tv_models.resnet50, num_classes, in_channels),
    }
    if name not in builders:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {MODEL_NAMES}")
    return builders[name]()


# --------------------------------------------------------------------------- before the run


def check_model_available(cfg: ModelConfig, in_channels: int, image_size: int) -> None:
    """Every model check that can fail before compute, with the run's input shape.

    A library model must run on these inputs (a ViT needs its patch size to divide them);
    ``pretrained`` weights must be obtainable (the library downloads them into its cache
    now, so workers find them there); a ``weights`` file must load and fit the model built
    on the meta device (no memory). Each failure is a one-line :class:`ConfigError`.
    """
    if registry.split_name(cfg.name)[0] is not None:
        probe(cfg.name, in_channels, image_size)
    if cfg.pretrained:
        fetch_pretrained(cfg.name, in_channels, image_size)
    if cfg.weights:
        tensors = read_state_dict(cfg.weights)
        with torch.device("meta"):
            model = build_model(cfg.name, 2, in_channels, image_size)
        plan_load(model, tensors, cfg.weights, cfg.name)


def fetch_pretrained(name: str, in_channels: int, image_size: int) -> None:
    """Build ``name`` with its library's pretrained weights once, or fail in one line.

    The libraries retry and log while offline; their retry warnings and progress output are
    silenced here so that a failure reads as one line, not a screen of retries.
    """
    quiet = logging.getLogger("huggingface_hub")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_model(name, 2, in_channels, image_size, pretrained=True)
    except ConfigError:
        raise
    except Exception as exc:  # network, cache and hub errors come in many types
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ConfigError(
            f"model.pretrained: cannot get the pretrained weights of {name} "
            f"({type(exc).__name__}: {reason}); without network, download them elsewhere and "
            "pass the file as model.weights"
        ) from None
    finally:
        quiet.setLevel(level)


# --------------------------------------------------------------------------- memory format


def is_convolutional(model: nn.Module) -> bool:
    """More than one 2-D convolution: a CNN, not a transformer with a conv patch embedding."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def wants_channels_last(setting: bool | None, model: nn.Module, device: torch.device) -> bool:
    """``runtime.channels_last``; unset means on for CNNs, off otherwise, on every device.

    GPUs: tensor-core convolutions want NHWC. CPU: bench/channels_last_compile.py measured a
    CNN training step at 0.73-0.95x the CPU time of NCHW (oneDNN's NHWC kernels; 0.99x for
    the 8x8 digits CNN) and a ViT at 1.05x, so transformers stay NCHW.
    """
    if setting is not None:
        return setting
    return device.type in ("cpu", "cuda") and is_convolutional(model)


def _nhwc_input(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x, *rest = args
    if isinstance(x, Tensor) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, *rest)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Weights and every input batch in NHWC layout; a forward pre-hook converts the input,
    so neither the training loop nor the state-dict keys change."""
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_nhwc_input)
    return model
