"""The optimizer and warm-up options that match the official BAKE recipes (off by default)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bake_ray.core import config as cfg
from bake_ray.core.engine import build_optimizer, lr_factor


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def _decay_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """id(parameter) -> the weight decay it gets."""
    return {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


def test_default_exempts_batch_norm_and_biases_from_weight_decay() -> None:
    net = _net()
    decay = _decay_of(build_optimizer(net, cfg.load().optim))
    assert len(decay) == len(list(net.parameters()))
    for p in net.parameters():
        assert decay[id(p)] == (5e-4 if p.ndim > 1 else 0.0)


def test_decay_all_params_decays_batch_norm_and_biases_too() -> None:
    """The official code's choice: every parameter, BN weight/bias and biases included."""
    net = _net()
    optim = cfg.load(overrides=["optim.decay_all_params=true", "optim.weight_decay=1e-4"]).optim
    decay = _decay_of(build_optimizer(net, optim))
    assert len(decay) == len(list(net.parameters()))
    assert all(decay[id(p)] == 1e-4 for p in net.parameters())
    assert any(p.ndim == 1 for p in net[1].parameters())  # BN's weight and bias are in


def _optim(*overrides: str) -> cfg.OptimConfig:
    base = ["epochs=10", "optim.warmup_epochs=2", "optim.schedule=cosine", *overrides]
    return cfg.load(overrides=base).optim


def test_warmup_starts_at_the_start_factor_times_lr() -> None:
    """pycls (official ImageNet code): first warm-up lr = 0.1 * lr, rising linearly to lr."""
    c = _optim("optim.warmup_start_factor=0.1")
    assert lr_factor(0, 10, 10, c) == pytest.approx(0.1)
    assert lr_factor(10, 10, 10, c) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way
    assert lr_factor(20, 10, 10, c) == pytest.approx(1.0)  # warm-up over, cosine at its top
    factors = [lr_factor(s, 10, 10, c) for s in range(20)]
    assert factors == sorted(factors) and factors[-1] < 1.0


def test_warmup_default_is_unchanged() -> None:
    """Start factor 0 (the default): the first step already takes 1/(warm-up steps) of lr."""
    c = _optim()
    assert c.warmup_start_factor == 0.0
    assert lr_factor(0, 10, 10, c) == pytest.approx(1 / 20)
    assert lr_factor(19, 10, 10, c) == pytest.approx(1.0)


def test_first_optimizer_step_uses_the_start_factor() -> None:
    """Through the real LambdaLR the engine builds: the lr of the first step is 0.1 * lr."""
    c = _optim("optim.warmup_start_factor=0.1", "optim.lr=0.4")
    optimizer = build_optimizer(_net(), c)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, 10, 10, c)
    )
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.04, 0.04])
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4 * (0.1 + 0.9 / 20))
