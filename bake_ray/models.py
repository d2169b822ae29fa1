"""Architectures for BAKE: every model returns ``(features [B, D], logits [B, C])``.

BAKE's affinity is built from the pooled feature vector that feeds the final linear layer
(DESIGN.md section 1), so each model exposes that vector next to its logits instead of hiding
it inside a classifier. Models are plain ``nn.Module``s with no globals, no device calls and
no knowledge of the config; :func:`build_model` is the only entry point the rest of the code
needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision import models as tv_models

from bake_ray.config import ConfigError

MODEL_NAMES = ("small_cnn", "cifar_resnet18", "resnet18", "resnet50")


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


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The model called ``name``; its ``forward(x)`` returns ``(features, logits)``."""
    if num_classes < 1 or in_channels < 1 or image_size < 1:
        raise ValueError(
            f"bad model shape: num_classes={num_classes}, in_channels={in_channels}, "
            f"image_size={image_size}"
        )
    builders: dict[str, Callable[[], nn.Module]] = {
        "small_cnn": lambda: SmallCNN(num_classes, in_channels, image_size),
        "cifar_resnet18": lambda: CifarResNet18(num_classes, in_channels),
        "resnet18": lambda: TorchvisionResNet(tv_models.resnet18, num_classes, in_channels),
        "resnet50": lambda: TorchvisionResNet(tv_models.resnet50, num_classes, in_channels),
    }
    if name not in builders:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {MODEL_NAMES}")
    return builders[name]()
