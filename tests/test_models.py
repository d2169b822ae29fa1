"""Tests for bake_ray.core.models: the (features, logits) contract, shapes, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bake_ray.core import config
from bake_ray.core.config import ConfigError, DataConfig
from bake_ray.core.data import build_splits
from bake_ray.core.models import MODEL_NAMES, build_model
from bake_ray.core.sampler import build_loaders

# name, in_channels, image_size, feature dim: small inputs keep every case well under a second.
CASES = [
    ("small_cnn", 1, 8, 128),
    ("small_cnn", 1, 28, 128),
    ("small_cnn", 3, 32, 128),
    ("cifar_resnet18", 3, 16, 512),
    ("resnet18", 3, 32, 512),
    ("resnet18", 1, 28, 512),
    ("resnet50", 3, 32, 2048),
]


@pytest.mark.parametrize(("name", "channels", "size", "dim"), CASES)
def test_forward_returns_pooled_features_and_logits(
    name: str, channels: int, size: int, dim: int
) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=channels, image_size=size).eval()
    with torch.no_grad():
        features, logits = model(torch.randn(3, channels, size, size))
    assert features.shape == (3, dim) and logits.shape == (3, 7)
    # `features` is exactly what the final linear layer sees.
    assert torch.allclose(model.fc(features), logits, atol=1e-5)


@pytest.mark.parametrize(("name", "channels", "size", "dim"), CASES[::2])
def test_gradients_reach_every_parameter(name: str, channels: int, size: int, dim: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, in_channels=channels, image_size=size).train()
    features, logits = model(torch.randn(4, channels, size, size))
    (F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])) + features.pow(2).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    first_conv = next(p for n, p in model.named_parameters() if p.dim() == 4)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_unknown_model_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'vgg'.*small_cnn"):
        build_model("vgg", 10, 3, 32)


def test_model_names_match_the_config_schema() -> None:
    assert set(MODEL_NAMES) == set(config.MODELS)


def test_small_cnn_learns_digits_quickly() -> None:
    """The quick-start promise: >90% digits test accuracy after a few CPU epochs."""
    torch.manual_seed(0)
    cfg = DataConfig(dataset="digits", batch_size=64, same_class=1)
    splits = build_splits(cfg, seed=0)
    loaders = build_loaders(splits, cfg, seed=0)
    model = build_model("small_cnn", splits.num_classes, splits.in_channels, splits.image_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in range(4):
        loaders.train_sampler.set_epoch(epoch)
        model.train()
        for x, y in loaders.train:
            loss = F.cross_entropy(model(x)[1], y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x)[1].argmax(1) == y).sum()) for x, y in loaders.test)
    assert correct / len(splits.test) > 0.9
