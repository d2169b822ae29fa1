"""Tests for bake_ray.core.data: the class-aware sampler's invariants and every dataset's splits.

No downloads: digits ships with scikit-learn, Fashion-MNIST comes from the Debian package if
installed, and CIFAR / ImageFolder are tested on tiny fake data written in the real formats.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from system_packages import missing
from torchvision import datasets

from bake_ray.core import data, datafiles
from bake_ray.core.config import ConfigError, DataConfig
from bake_ray.core.data import build_splits
from bake_ray.core.sampler import ClassAwareBatchSampler, build_loaders

# --------------------------------------------------------------------------- sampler helpers


def _labels(sizes: list[int]) -> list[int]:
    """Class c repeated sizes[c] times, then shuffled so classes are interleaved."""
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1)).tolist()
    return [labels[i] for i in order]


def _anchors(batches: list[list[int]], same_class: int) -> list[int]:
    return [i for batch in batches for i in batch[:: same_class + 1]]


def _check_structure(batches: list[list[int]], labels: list[int], n: int, m: int) -> None:
    """Full batches; each anchor followed by m distinct classmates that are not the anchor."""
    for batch in batches:
        assert len(batch) == n
        for start in range(0, n, m + 1):
            anchor, partners = batch[start], batch[start + 1 : start + m + 1]
            assert all(labels[p] == labels[anchor] for p in partners)
            assert anchor not in partners
            assert len(set(partners)) == m


# --------------------------------------------------------------------------- sampler


def test_batches_are_full_and_class_aware() -> None:
    labels = _labels([12, 9, 15, 8, 20])  # every class has more than M=3 others
    sampler = ClassAwareBatchSampler(labels, batch_size=16, same_class=3, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    _check_structure(batches, labels, n=16, m=3)


def test_every_image_is_an_anchor_exactly_once_when_sizes_divide() -> None:
    labels = _labels([20, 20, 24, 32])  # 96 images, 4 anchors per batch
    sampler = ClassAwareBatchSampler(labels, batch_size=16, same_class=3)
    anchors = _anchors(list(sampler), 3)
    assert sorted(anchors) == list(range(96))
    assert len(sampler) == 24


def test_padding_wraps_around_so_every_image_is_an_anchor_at_least_once() -> None:
    labels = _labels([30, 31, 40])  # 101 images, 8 anchors per batch
    sampler = ClassAwareBatchSampler(labels, batch_size=16, same_class=1, seed=5)
    batches = list(sampler)
    counts = Counter(_anchors(batches, 1))
    assert set(counts) == set(range(101))
    assert len(batches) == 13 and sum(counts.values()) == 13 * 8
    assert max(counts.values()) == 2
    _check_structure(batches, labels, n=16, m=1)


def test_same_seed_and_epoch_give_identical_batches() -> None:
    labels = _labels([10, 10, 10])
    first = ClassAwareBatchSampler(labels, 6, 2, seed=7)
    second = ClassAwareBatchSampler(labels, 6, 2, seed=7)
    assert list(first) == list(second)
    assert list(first) == list(first)  # re-iterating the same epoch repeats it (exact resume)
    other_seed = ClassAwareBatchSampler(labels, 6, 2, seed=8)
    assert list(other_seed) != list(first)


def test_set_epoch_changes_the_order_deterministically() -> None:
    labels = _labels([10, 10, 10])
    sampler = ClassAwareBatchSampler(labels, 6, 2, seed=0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    assert sorted(_anchors(epoch1, 2)) == sorted(_anchors(epoch0, 2)) == list(range(30))
    sampler.set_epoch(0)
    assert list(sampler) == epoch0


@pytest.mark.parametrize(
    ("sizes", "padding"),
    [([16, 16, 16, 16], 0), ([17, 13, 20, 9], 5)],  # 64 images; 59 images -> 8 batches of 4
)
def test_two_ranks_get_disjoint_anchors_and_equal_lengths(sizes: list[int], padding: int) -> None:
    labels = _labels(sizes)
    ranks = [ClassAwareBatchSampler(labels, 8, 1, seed=2, rank=r, world_size=2) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(4)
    batches = [list(s) for s in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(batches[0]) == len(batches[1])
    anchors = [_anchors(b, 1) for b in batches]
    assert set(anchors[0]) | set(anchors[1]) == set(range(len(labels)))
    for rank_batches in batches:
        _check_structure(rank_batches, labels, n=8, m=1)
    # Only the wrap-around padding repeats anchors: a partition when the sizes divide.
    assert len(anchors[0]) + len(anchors[1]) == len(labels) + padding
    assert len(set(anchors[0]) & set(anchors[1])) <= padding
    assert len(anchors[0]) + len(anchors[1]) - len(set(anchors[0]) | set(anchors[1])) == padding


def test_batch_size_must_be_a_multiple_of_same_class_plus_one() -> None:
    with pytest.raises(ConfigError, match=r"data\.batch_size.*data\.same_class"):
        ClassAwareBatchSampler([0, 0, 1, 1], batch_size=10, same_class=3)


def test_rank_outside_world_is_rejected() -> None:
    with pytest.raises(ValueError, match="rank"):
        ClassAwareBatchSampler([0, 1], batch_size=2, same_class=1, rank=2, world_size=2)


def test_same_class_zero_gives_plain_shuffled_batches() -> None:
    labels = _labels([7, 9])
    batches = list(ClassAwareBatchSampler(labels, batch_size=4, same_class=0, seed=1))
    assert all(len(b) == 4 for b in batches) and len(batches) == 4
    flat = [i for b in batches for i in b]
    assert set(flat) == set(range(16))


def test_small_classes_repeat_classmates_and_singletons_repeat_themselves() -> None:
    labels = [0, 0, 1, 2, 2, 2, 2, 2]  # class 0: one other; class 1: alone; class 2: roomy
    batches = list(ClassAwareBatchSampler(labels, batch_size=8, same_class=3, seed=0))
    for batch in batches:
        for start in range(0, 8, 4):
            anchor, partners = batch[start], batch[start + 1 : start + 4]
            assert all(labels[p] == labels[anchor] for p in partners)
            if labels[anchor] == 0:
                assert partners == [1 - anchor] * 3
            elif labels[anchor] == 1:
                assert partners == [anchor] * 3
            else:
                assert anchor not in partners and len(set(partners)) == 3


def test_partners_are_uniform_over_classmates() -> None:
    labels = [0] * 5 + [1] * 5  # each anchor: 2 partners drawn from its 4 classmates
    sampler = ClassAwareBatchSampler(labels, batch_size=6, same_class=2, seed=0)
    seen: Counter[int] = Counter()
    epochs = 400
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            for start in range(0, 6, 3):
                if batch[start] == 0:
                    seen.update(batch[start + 1 : start + 3])
    draws = sum(seen.values())
    assert set(seen) == {1, 2, 3, 4}
    for member in (1, 2, 3, 4):  # expected share 1/4 each; 5-sigma band is about +-0.06
        assert abs(seen[member] / draws - 0.25) < 0.06


# --------------------------------------------------------------------------- digits


def _digits_cfg(**kwargs: object) -> DataConfig:
    return DataConfig(dataset="digits", **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def digits_splits() -> data.DataSplits:
    return build_splits(_digits_cfg(val_fraction=0.1), seed=0)


def _labels_of(dataset: torch.utils.data.Dataset) -> list[int]:
    return [int(y) for _, y in dataset]  # type: ignore[attr-defined]


def test_digits_split_sizes(digits_splits: data.DataSplits) -> None:
    s = digits_splits
    assert len(s.test) == 359  # round(0.2 * 1797)
    assert len(s.val) == 144  # round(0.1 * 1438)
    assert len(s.train) == 1438 - 144
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 1, 8)
    assert s.train_labels == _labels_of(s.train)


def test_digits_splits_are_stratified(digits_splits: data.DataSplits) -> None:
    train = Counter(digits_splits.train_labels)
    val = Counter(_labels_of(digits_splits.val))
    test = Counter(_labels_of(digits_splits.test))
    for cls in range(10):
        pool = train[cls] + val[cls]
        assert abs(val[cls] - 0.1 * pool) <= 1
        assert abs(test[cls] - 0.2 * (pool + test[cls])) <= 1


def test_digits_val_is_held_out_of_train(digits_splits: data.DataSplits) -> None:
    train, val = digits_splits.train, digits_splits.val
    assert train.dataset is val.dataset  # type: ignore[attr-defined]
    assert not set(train.indices) & set(val.indices)  # type: ignore[attr-defined]
    assert len(set(train.indices) | set(val.indices)) == len(train.dataset)  # type: ignore[attr-defined]


def test_digits_test_set_is_fixed_but_val_follows_the_seed(digits_splits: data.DataSplits) -> None:
    other = build_splits(_digits_cfg(val_fraction=0.1), seed=1)
    first = torch.stack([x for x, _ in digits_splits.test])
    second = torch.stack([x for x, _ in other.test])
    assert torch.equal(first, second)
    assert digits_splits.val.indices != other.val.indices  # type: ignore[attr-defined]


def test_digits_train_subset_is_stratified_and_seeded() -> None:
    cfg = _digits_cfg(val_fraction=0.1, train_subset=300)
    splits = build_splits(cfg, seed=0)
    assert len(splits.train) + len(splits.val) == 300 and len(splits.val) == 30
    counts = Counter(splits.train_labels + _labels_of(splits.val))
    assert all(abs(counts[c] - 30) <= 1 for c in range(10))
    again = build_splits(cfg, seed=0)
    assert again.train.indices == splits.train.indices  # type: ignore[attr-defined]


def test_digits_transforms_augment_train_only(digits_splits: data.DataSplits) -> None:
    torch.manual_seed(0)
    val_x, _ = digits_splits.val[0]
    assert torch.equal(val_x, digits_splits.val[0][0])
    shifted = [digits_splits.train[0][0] for _ in range(20)]
    assert shifted[0].shape == (1, 8, 8)
    assert any(not torch.equal(shifted[0], x) for x in shifted[1:])


def test_digits_loaders_yield_anchor_classmate_pairs(digits_splits: data.DataSplits) -> None:
    cfg = _digits_cfg(batch_size=32, same_class=1)
    loaders = build_loaders(digits_splits, cfg, seed=0)
    loaders.train_sampler.set_epoch(2)
    x, y = next(iter(loaders.train))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.long
    assert torch.equal(y[0::2], y[1::2])
    assert len(loaders.train) == -(-len(digits_splits.train) // 16)
    assert sum(len(b) for b, _ in loaders.test) == len(digits_splits.test)


def _assert_groups_share_a_label(labels: torch.Tensor, same_class: int) -> None:
    """Each anchor and its M classmates: every group of M + 1 consecutive labels is one class."""
    groups = labels.view(-1, same_class + 1)
    assert torch.equal(groups, groups[:, :1].expand_as(groups)), groups


@pytest.mark.parametrize("same_class", [1, 3])
def test_digits_loaders_give_each_anchor_m_classmates(
    digits_splits: data.DataSplits, same_class: int
) -> None:
    cfg = _digits_cfg(batch_size=32, same_class=same_class)
    for rank in (0, 1):
        loaders = build_loaders(digits_splits, cfg, seed=0, rank=rank, world_size=2)
        loaders.train_sampler.set_epoch(1)
        for _, y in loaders.train:
            assert y.shape == (32,)
            _assert_groups_share_a_label(y, same_class)


def test_eval_sharding_splits_val_and_test_exactly(digits_splits: data.DataSplits) -> None:
    cfg = _digits_cfg(batch_size=32, same_class=1)
    shards = [
        build_loaders(digits_splits, cfg, 0, rank=r, world_size=2, eval_shard=True) for r in (0, 1)
    ]
    assert len(shards[0].train) == len(shards[1].train)
    sizes = [len(s.test.dataset) for s in shards]
    assert sum(sizes) == len(digits_splits.test)
    plain = build_loaders(digits_splits, cfg, 0, rank=1, world_size=2)
    assert len(plain.test.dataset) == len(digits_splits.test)


# --------------------------------------------------------------------------- Fashion-MNIST

needs_debian_fashion = pytest.mark.skipif(
    not datafiles.has_idx_files(datafiles.DEBIAN_FASHION_MNIST_DIR),
    reason=missing("dataset-fashion-mnist", f"no files in {datafiles.DEBIAN_FASHION_MNIST_DIR}"),
)


@needs_debian_fashion
def test_fashion_mnist_loads_from_the_debian_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BAKE_RAY_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(dataset="fashion_mnist", train_subset=600, val_fraction=0.1)
    datafiles.check_data_available(cfg)
    splits = build_splits(cfg, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (540, 60, 10000)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 28)
    x, y = splits.val[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10
    root = datafiles.fashion_mnist_root(cfg)  # a second call reuses the private copy
    assert (root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    # That private root is a torchvision tree; as data_dir it is used in place.
    in_place = DataConfig(dataset="fashion_mnist", data_dir=str(root))
    assert datafiles.fashion_mnist_root(in_place) == root


@needs_debian_fashion
def test_fashion_mnist_data_dir_with_gzipped_idx_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BAKE_RAY_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "idx"
    folder.mkdir()
    for name in datafiles.FASHION_MNIST_FILES:
        (folder / f"{name}.gz").symlink_to(datafiles.DEBIAN_FASHION_MNIST_DIR / f"{name}.gz")
    cfg = DataConfig(dataset="fashion_mnist", data_dir=str(folder), train_subset=200)
    assert len(build_splits(cfg, seed=0).train) == 180


def test_fashion_mnist_missing_files_fail_in_one_line(tmp_path: Path) -> None:
    cfg = DataConfig(dataset="fashion_mnist", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="IDX files not found") as info:
        datafiles.check_data_available(cfg)
    assert "\n" not in str(info.value) and "dataset-fashion-mnist" in str(info.value)
    missing = DataConfig(dataset="fashion_mnist", data_dir=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"data\.data_dir: .*nope does not exist"):
        datafiles.check_data_available(missing)


# --------------------------------------------------------------------------- CIFAR (fake)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fake_images(labels: list[int]) -> np.ndarray:
    """Row-major CIFAR rows [n, 3072]: image i is filled with the value 10 * label."""
    return np.repeat(np.array(labels, dtype=np.uint8)[:, None] * 10, 3072, axis=1)


def _dump(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _write_cifar(root: Path, cls: type[datasets.CIFAR10], classes: int, per_file: int) -> None:
    """Write tiny batches in the real pickle layout; point torchvision's md5 table at them."""
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if cls is datasets.CIFAR10 else "fine_labels"
    for name, _ in cls.train_list + cls.test_list:
        labels = [i % classes for i in range(per_file)]
        _dump(folder / name, {"data": _fake_images(labels), label_key: labels})
    _dump(folder / cls.meta["filename"], {cls.meta["key"]: [f"class{c}" for c in range(classes)]})


def _trust_fake_cifar(root: Path, cls: type[datasets.CIFAR10], mp: pytest.MonkeyPatch) -> None:
    """Replace the published md5 sums by the fake files' own: the real integrity check runs."""
    folder = root / cls.base_folder
    mp.setattr(cls, "train_list", [[n, _md5(folder / n)] for n, _ in cls.train_list])
    mp.setattr(cls, "test_list", [[n, _md5(folder / n)] for n, _ in cls.test_list])
    mp.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})


@pytest.mark.parametrize(
    ("name", "cls", "classes", "per_file"),
    [("cifar10", datasets.CIFAR10, 10, 20), ("cifar100", datasets.CIFAR100, 100, 200)],
)
def test_cifar_reads_the_real_pickle_format(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    cls: type[datasets.CIFAR10],
    classes: int,
    per_file: int,
) -> None:
    _write_cifar(tmp_path, cls, classes, per_file)
    _trust_fake_cifar(tmp_path, cls, monkeypatch)
    cfg = DataConfig(dataset=name, data_dir=str(tmp_path), val_fraction=0.5, batch_size=8)
    datafiles.check_data_available(cfg)
    splits = build_splits(cfg, seed=0)
    n_train = per_file * len(cls.train_list)
    assert len(splits.train) + len(splits.val) == n_train and len(splits.val) == n_train // 2
    assert len(splits.test) == per_file
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (classes, 3, 32)
    x, y = splits.test[3]
    mean, std = data._CIFAR10_STATS if name == "cifar10" else data._CIFAR100_STATS
    expected = (10 * y / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, 5, 7], expected, atol=1e-5)
    batch, labels = next(iter(build_loaders(splits, cfg, seed=0).train))
    assert batch.shape == (8, 3, 32, 32) and torch.equal(labels[0::2], labels[1::2])
    m3 = DataConfig(dataset=name, data_dir=str(tmp_path), batch_size=8, same_class=3)
    for batch, labels in build_loaders(build_splits(m3, seed=0), m3, seed=0).train:
        assert batch.shape == (8, 3, 32, 32)
        _assert_groups_share_a_label(labels, 3)


def test_cifar_missing_files_fail_in_one_line(tmp_path: Path) -> None:
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"cifar-10-batches-py.*data\.download=true"):
        datafiles.check_data_available(cfg)
    fetched = DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=True)
    datafiles.check_data_available(fetched)


# --------------------------------------------------------------------------- ImageFolder


def _write_tree(root: Path, per_class: dict[str, int], size: int = 40) -> None:
    for c, (name, count) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.full((size, size + 8, 3), 40 * c + i, dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_imagefolder_train_val_tree(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train", {"ant": 6, "bee": 6, "cat": 6})
    _write_tree(tmp_path / "val", {"ant": 2, "bee": 2, "cat": 2})
    cfg = DataConfig(dataset="imagefolder", data_dir=str(tmp_path), val_fraction=1 / 3)
    datafiles.check_data_available(cfg)
    splits = build_splits(cfg, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 6)
    assert Counter(_labels_of(splits.val)) == {0: 2, 1: 2, 2: 2}
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (3, 3, 40)
    assert splits.train[0][0].shape == splits.test[0][0].shape == (3, 40, 40)
    big = build_splits(cfg, seed=0, image_size=160)  # ImageNet-style crops
    assert big.train[0][0].shape == big.val[0][0].shape == (3, 160, 160)


def test_imagefolder_errors(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train", {"ant": 2, "bee": 2})
    cfg = DataConfig(dataset="imagefolder", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"data\.data_dir: .*val not found"):
        datafiles.check_data_available(cfg)
    _write_tree(tmp_path / "val", {"ant": 1, "wasp": 1})
    with pytest.raises(ConfigError, match="class folders"):
        build_splits(cfg, seed=0)
    with pytest.raises(ConfigError, match=r"data\.data_dir: required"):
        datafiles.check_data_available(DataConfig(dataset="imagefolder"))


def test_unknown_dataset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.dataset"):
        datafiles.check_data_available(DataConfig(dataset="mnist"))


def test_stratified_sample_handles_fewer_items_than_classes() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    picked = data.stratified_sample(labels, 3, torch.Generator().manual_seed(0))
    assert len(picked) == 3 and len(set(labels[picked].tolist())) == 3
