"""A trained network as a model that needs no bake-ray code: raw images in, probabilities out.

A served model takes images in the form the dataset stores them, before any transform, and
applies the run's *eval* transform itself (scale to [0, 1], channels first, normalise),
then the network, then a softmax. Exported with ``torch.export`` (by the MLflow writer in
:mod:`bake_ray.tracking.model`), the whole chain is one graph of torch operations, so
loading it needs torch alone: no class of this package has to be importable.

The raw forms (what :func:`raw_test_split` returns, and what a caller sends):

=============  ==========================  =========  =====================================
dataset        one image                   dtype      where it comes from
=============  ==========================  =========  =====================================
digits         8 x 8, values 0..16         float64    ``sklearn.datasets.load_digits().images``
fashion_mnist  28 x 28, 0..255             uint8      ``torchvision...FashionMNIST(...).data``
cifar10/100    32 x 32 x 3 (HWC), 0..255   uint8      ``torchvision...CIFAR10(...).data``
imagefolder    S x S x 3 (HWC), 0..255     uint8      already resized and centre-cropped to S
=============  ==========================  =========  =====================================

``imagefolder`` is the one approximation: its eval transform resizes the shorter side and
centre-crops with PIL, which a fixed-shape graph cannot repeat for images of any size, so
its served model takes images already at the run's image size S and only normalises.

No Ray and no MLflow here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from bake_ray.core import data
from bake_ray.core.config import Config, DataConfig
from bake_ray.core.datafiles import input_shape
from bake_ray.core.models import build_model

_CLASSES = {"digits": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


@dataclass(frozen=True)
class RawForm:
    """What one raw image of a dataset looks like, and how the eval transform reads it."""

    shape: tuple[int, ...]  # one image: (H, W) or (H, W, C)
    dtype: np.dtype
    scale: float  # divide by this to get [0, 1]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def raw_form(cfg: DataConfig, image_size: int) -> RawForm:
    """The raw image form of ``cfg.dataset`` (``image_size``: the run's, for imagefolder)."""
    mean, std = data.EVAL_STATS[cfg.dataset]
    if cfg.dataset == "digits":
        return RawForm((8, 8), np.dtype(np.float64), 16.0, mean, std)
    if cfg.dataset == "fashion_mnist":
        return RawForm((28, 28), np.dtype(np.uint8), 255.0, mean, std)
    return RawForm((image_size, image_size, 3), np.dtype(np.uint8), 255.0, mean, std)


class ServedModel(nn.Module):
    """Raw images ``[B, *RawForm.shape]`` -> class probabilities ``[B, classes]`` (float32).

    The same arithmetic as the dataset's eval transform (``ToTensor``: /255 and channels
    first; digits: /16; then ``Normalize``), followed by the network in eval mode.
    """

    def __init__(self, net: nn.Module, form: RawForm) -> None:
        super().__init__()
        self.net = net.eval()
        self.scale = form.scale
        self.channels_last_input = len(form.shape) == 3
        channels = len(form.mean)
        self.register_buffer("mean", torch.tensor(form.mean).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(form.std).view(1, channels, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        x = images.to(torch.float32) / self.scale
        x = x.permute(0, 3, 1, 2) if self.channels_last_input else x.unsqueeze(1)
        x = (x - self.mean) / self.std
        _, logits = self.net(x)
        return torch.softmax(logits.float(), dim=1)


def served_model(weights: dict[str, Tensor], config: Config) -> tuple[ServedModel, RawForm]:
    """The run's network with ``weights`` (a checkpoint's ``model`` entry), wrapped to take
    raw images; and their form. ``model.pretrained``/``weights`` are not fetched again:
    the checkpoint holds every tensor."""
    in_channels, image_size = input_shape(config.data)
    classes = _CLASSES.get(config.data.dataset) or _folder_classes(config.data)
    net = build_model(config.model.name, classes, in_channels, image_size)
    net.load_state_dict(weights)
    form = raw_form(config.data, image_size)
    return ServedModel(net, form).eval(), form


def _folder_classes(cfg: DataConfig) -> int:
    """ImageFolder's class count: the class folders of ``<data_dir>/train``."""
    from pathlib import Path

    train = Path(str(cfg.data_dir)).expanduser() / "train"
    return sum(1 for entry in train.iterdir() if entry.is_dir())


def raw_test_split(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(raw images, labels) of the test split, in the order the run evaluates them: what
    a served model's accuracy is checked on. Not for imagefolder (its raw images differ in
    size)."""
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits

        raw = load_digits()
        labels = torch.tensor(raw.target, dtype=torch.long)
        test_idx = data.digits_test_indices(labels).numpy()
        return raw.images[test_idx], raw.target[test_idx]
    if cfg.dataset == "imagefolder":
        raise ValueError("imagefolder test images have no single raw shape")
    test = data.raw_test_dataset(cfg)
    images = np.asarray(test.data)
    return images, np.asarray(test.targets)
