"""timm and torchvision models by name: the (features, logits) contract, one BAKE step each,
the registry's one-line refusals, and local weights files (load, reinitialise, refuse)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from bake_ray.core import config
from bake_ray.core.config import ConfigError, DataConfig
from bake_ray.core.data import build_splits
from bake_ray.core.datafiles import input_shape
from bake_ray.core.engine import Context, build_state, setup_model, train_one_epoch
from bake_ray.core.models import build_model, check_model_available, is_convolutional
from bake_ray.core.registry import check_model_name
from bake_ray.core.weights import load_weights

CPU = Context(torch.device("cpu"))

# timm's own tiny test configurations of each family (100k-400k parameters): the real
# architectures' code paths at a size a 2-core CI machine trains in well under a second.
TIMM_CASES = [
    ("timm/test_resnet", "ResNet"),
    ("timm/test_convnext", "ConvNeXt"),
    ("timm/test_efficientnet", "EfficientNet"),
    ("timm/test_vit", "VisionTransformer"),
]


def _batch(channels: int = 3, size: int = 32, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(n, channels, size, size), torch.arange(n) // 2 % 4  # pairs per class


@pytest.mark.parametrize(("name", "family"), TIMM_CASES)
def test_timm_model_returns_prelogits_and_logits(name: str, family: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, in_channels=3, image_size=32).eval()
    assert type(model.net).__name__ == family
    x, _ = _batch()
    with torch.no_grad():
        features, logits = model(x)
        reference = model.net(x)  # timm's own forward: pooling, head and classifier
        prelogits = model.net.forward_head(model.net.forward_features(x), pre_logits=True)
    assert features.ndim == 2 and logits.shape == (8, 5)
    assert torch.equal(features, prelogits)
    assert torch.allclose(logits, reference, atol=1e-5)


@pytest.mark.parametrize(("name", "family"), TIMM_CASES)
def test_timm_model_trains_one_bake_step(name: str, family: str) -> None:
    """Built through the engine (as a run builds it); one BAKE step moves the weights."""
    torch.manual_seed(0)
    cfg = config.from_dict({"model": {"name": name}, "data": {"batch_size": 8}})
    state = build_state(cfg, CPU, num_classes=4, in_channels=3, image_size=32, steps_per_epoch=1)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    metrics = train_one_epoch(state, [_batch()], CPU, amp=False, max_steps=1)
    assert metrics["train_kd"] > 0 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    after = state.model.state_dict()
    stem = next(k for k, v in before.items() if v.ndim == 4)  # first conv / patch embedding
    assert not torch.equal(before[stem], after[stem])


def test_torchvision_model_features_are_the_last_linear_layers_input() -> None:
    """MobileNetV3's head is Linear-Hardswish-Dropout-Linear: features = input of the last."""
    torch.manual_seed(0)
    model = build_model("torchvision/mobilenet_v3_small", 6, in_channels=1, image_size=32).eval()
    assert model.classifier_path == "classifier.3" and model.net.features[0][0].in_channels == 1
    x, _ = _batch(channels=1)
    with torch.no_grad():
        features, logits = model(x)
        model.net.classifier[3] = model.fc  # put the classifier back: torchvision's own forward
        reference = model.net(x)
    assert features.shape == (8, 1024) and torch.allclose(logits, reference, atol=1e-5)


def test_torchvision_model_trains_one_bake_step() -> None:
    torch.manual_seed(0)
    cfg = config.from_dict({"model": {"name": "torchvision/resnet18"}, "data": {"batch_size": 8}})
    state = build_state(cfg, CPU, num_classes=4, in_channels=3, image_size=32, steps_per_epoch=1)
    before = state.model.net.conv1.weight.detach().clone()
    metrics = train_one_epoch(state, [_batch()], CPU, amp=False, max_steps=1)
    assert metrics["train_kd"] > 0
    assert not torch.equal(before, state.model.net.conv1.weight)


def test_googlenet_trains_without_its_auxiliary_heads() -> None:
    model = build_model("torchvision/googlenet", 3, in_channels=3, image_size=64).train()
    features, logits = model(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 1024) and logits.shape == (2, 3)


# --------------------------------------------------------------------------- the registry


NOT_POOLED = "cannot give pooled features for BAKE"
BAD_NAMES = [
    ("timm/resnet_18", r"^model\.name: unknown timm model 'resnet_18'; close matches: .*resnet18"),
    ("torchvision/resnet_18", r"^model\.name: unknown torchvision model .*torchvision/resnet18"),
    ("resnet34", r"^model\.name: unknown 'resnet34'; one of small_cnn.*timm/resnet34"),
    ("timm/deit_tiny_distilled_patch16_224", f"{NOT_POOLED}: its classifier is a tuple"),
    ("torchvision/squeezenet1_0", f"{NOT_POOLED}: it has no linear classifier"),
]


@pytest.mark.parametrize(("name", "message"), BAD_NAMES)
def test_registry_refuses_in_one_line(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        config.from_dict({"model": {"name": name}})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=message):
        check_model_name(name)  # the same verdict from the registry itself


def test_names_never_reach_the_hub_or_arbitrary_code() -> None:
    """timm.create_model would fetch a config for 'hf-hub:...': only listed names pass."""
    for name in ("timm/hf-hub:timm/resnet18.a1_in1k", "timm/os.system", "torchvision/os.system"):
        with pytest.raises(ConfigError, match=r"^model\.name: unknown (timm|torchvision) model"):
            config.from_dict({"model": {"name": name}})


def test_timm_pretrained_tags_are_accepted() -> None:
    assert config.from_dict({"model": {"name": "timm/resnet18.a1_in1k"}}).model.name


def test_a_vit_that_cannot_cover_the_input_is_refused_before_the_run() -> None:
    with pytest.raises(ConfigError, match=r"timm/test_vit does not run on 1x8x8 inputs"):
        check_model_available(config.ModelConfig("timm/test_vit"), *input_shape(DataConfig()))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"name": "small_cnn", "pretrained": True}, "the built-in small_cnn has no pretrained"),
        (
            {"name": "timm/test_resnet", "pretrained": True, "weights": "w.pt"},
            "set either model.pretrained or model.weights",
        ),
        ({"name": "timm/test_resnet", "weights": " "}, "model.weights: empty path"),
    ],
)
def test_model_section_invariants(model: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.from_dict({"model": model})


def test_input_shape_matches_the_loaded_data() -> None:
    splits = build_splits(DataConfig(), seed=0)
    assert input_shape(DataConfig()) == (splits.in_channels, splits.image_size)


def test_channels_last_default_is_for_convolutional_models() -> None:
    from bake_ray.core.models import wants_channels_last

    cnn, vit = build_model("timm/test_resnet", 3, 3, 32), build_model("timm/test_vit", 3, 3, 32)
    assert is_convolutional(cnn) and not is_convolutional(vit)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert wants_channels_last(None, cnn, gpu) and not wants_channels_last(None, vit, gpu)
    assert wants_channels_last(None, cnn, cpu) and not wants_channels_last(None, vit, cpu)
    assert not wants_channels_last(False, cnn, cpu) and wants_channels_last(True, vit, cpu)


def test_channels_last_run_gives_the_same_outputs() -> None:
    """runtime.channels_last changes the memory layout, not the maths."""
    torch.manual_seed(0)
    model = {"name": "timm/test_resnet"}
    base = config.from_dict({"model": model, "runtime": {"channels_last": False}})
    nhwc = config.from_dict({"model": model})  # the default for a CNN
    torch.manual_seed(0)
    plain = setup_model(base, CPU, 4, 3, 32).eval()
    torch.manual_seed(0)
    last = setup_model(nhwc, CPU, 4, 3, 32).eval()
    stem = (plain.net.conv1[0].weight, last.net.conv1[0].weight)
    assert not stem[0].is_contiguous(memory_format=torch.channels_last)
    assert stem[1].is_contiguous(memory_format=torch.channels_last)
    x, _ = _batch()
    with torch.no_grad():
        for a, b in zip(plain(x), last(x), strict=True):
            assert torch.allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------- weights files


def _timm_state(name: str, classes: int, channels: int = 3) -> dict[str, torch.Tensor]:
    """A state dict as timm itself saves it (what a user downloads), not bake-ray's keys."""
    import timm

    torch.manual_seed(1)
    return timm.create_model(name, num_classes=classes, in_chans=channels).state_dict()


@pytest.mark.parametrize("form", ["torch", "safetensors", "wrapped", "ddp"])
def test_weights_round_trip_into_another_class_count(tmp_path: Path, form: str) -> None:
    state = _timm_state("test_resnet", classes=1000)
    path = tmp_path / ("w.safetensors" if form == "safetensors" else "w.pt")
    if form == "safetensors":
        save_file(state, str(path))
    elif form == "wrapped":  # a training checkpoint: {"state_dict": ..., "epoch": ...}
        torch.save({"state_dict": state, "epoch": 3, "arch": "test_resnet"}, path)
    elif form == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    cfg = config.from_dict({"model": {"name": "timm/test_resnet", "weights": str(path)}})
    model = setup_model(cfg, CPU, num_classes=7, in_channels=3, image_size=32)
    own = model.state_dict()
    backbone = [k for k in state if not k.startswith("fc.")]
    assert backbone and all(torch.equal(own[f"net.{k}"], state[k]) for k in backbone)
    assert own["net.fc.weight"].shape == (7, own["net.fc.weight"].shape[1])


def test_weights_summary_counts_loaded_skipped_and_reinitialised(tmp_path: Path) -> None:
    state = _timm_state("test_resnet", classes=1000)
    state["aux_head.weight"] = torch.zeros(3)  # something the model does not have
    torch.save(state, tmp_path / "w.pt")
    model = build_model("timm/test_resnet", 7, 3, 32)
    line = load_weights(model, str(tmp_path / "w.pt"), "timm/test_resnet", num_classes=7)
    assert line == (
        f"model.weights: loaded {len(state) - 3} tensors from {tmp_path / 'w.pt'}; skipped 1 "
        "not in the model; reinitialised 2 classifier tensors (the file has 1000 classes, "
        "this run 7)"
    )


def test_same_class_count_loads_the_classifier_too(tmp_path: Path) -> None:
    state = _timm_state("test_resnet", classes=7)
    torch.save(state, tmp_path / "w.pt")
    model = build_model("timm/test_resnet", 7, 3, 32)
    line = load_weights(model, str(tmp_path / "w.pt"), "timm/test_resnet")
    assert torch.equal(model.fc.weight, state["fc.weight"]) and "reinitialised 0" in line


def test_a_bake_ray_checkpoint_is_a_weights_file(tmp_path: Path) -> None:
    """A finished run's best checkpoint starts a fine-tuning run on another dataset."""
    source = build_model("torchvision/resnet18", 10, 3, 32)
    torch.save({"model": source.state_dict(), "epoch": 5, "optimizer": {}}, tmp_path / "c.pt")
    target = build_model("torchvision/resnet18", 3, 3, 32)
    load_weights(target, str(tmp_path / "c.pt"), "torchvision/resnet18")
    assert torch.equal(target.net.layer4[1].conv2.weight, source.net.layer4[1].conv2.weight)


def test_torchvision_native_weights_map_onto_the_wrapper(tmp_path: Path) -> None:
    from torchvision import models

    native = models.mobilenet_v3_small(num_classes=1000)
    torch.save(native.state_dict(), tmp_path / "tv.pth")
    model = build_model("torchvision/mobilenet_v3_small", 5, 3, 32)
    line = load_weights(model, str(tmp_path / "tv.pth"), "torchvision/mobilenet_v3_small", 5)
    assert torch.equal(model.net.classifier[0].weight, native.classifier[0].weight)
    assert "reinitialised 2 classifier tensors (the file has 1000 classes" in line


def test_builtin_resnet18_takes_torchvision_resnet_weights(tmp_path: Path) -> None:
    from torchvision import models

    native = models.resnet18(num_classes=1000)
    torch.save(native.state_dict(), tmp_path / "r18.pth")
    model = build_model("resnet18", 10, 3, 32)
    load_weights(model, str(tmp_path / "r18.pth"), "resnet18", 10)
    assert torch.equal(model.backbone.layer1[0].conv1.weight, native.layer1[0].conv1.weight)


class RunsCode:
    """Unpickling this would call print: a weights file must never be able to do that."""

    def __reduce__(self):
        return (print, ("pwned",))


def _write(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    elif kind == "code":
        torch.save({"model": RunsCode()}, path)
    elif kind == "no_tensors":
        torch.save({"epoch": 3, "note": "hello"}, path)
    elif kind == "other_arch":
        torch.save(_timm_state("test_convnext", 10), path)
    elif kind == "stem":  # saved from a 1-channel model, loaded into a 3-channel one
        torch.save(_timm_state("test_resnet", 10, channels=1), path)
    elif kind == "partial":
        state = _timm_state("test_resnet", 10)
        torch.save({k: v for k, v in state.items() if not k.startswith("layer4")}, path)
    elif kind == "bad_safetensors":
        path = tmp_path / "x.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return path


BAD_WEIGHTS = [
    ("missing", r"model\.weights: \S+ not found"),
    ("corrupt", r"model\.weights: \S+: cannot load: "),
    ("code", r"model\.weights: \S+: cannot load: refused: it holds code"),
    ("no_tensors", r"model\.weights: \S+ holds no state dict"),
    ("other_arch", r"model\.weights: none of the \d+ tensors in \S+ belong to timm/test_resnet"),
    ("stem", r"does not fit timm/test_resnet: net\.conv1\.0\.weight is \[\d+, 1, 3, 3\] in the"),
    ("partial", r"lacks \d+ of the \d+ backbone tensors of timm/test_resnet \(first: net\.layer4"),
    ("bad_safetensors", r"model\.weights: \S+x\.safetensors: cannot load: "),
]


@pytest.mark.parametrize(("kind", "message"), BAD_WEIGHTS)
def test_bad_weights_files_are_refused_in_one_line(tmp_path: Path, kind: str, message: str) -> None:
    path = _write(tmp_path, kind)
    model_cfg = config.ModelConfig("timm/test_resnet", weights=str(path))
    with pytest.raises(ConfigError, match=message) as info:
        check_model_available(model_cfg, in_channels=3, image_size=32)
    assert "\n" not in str(info.value)


def test_gradients_reach_the_timm_classifier_through_features() -> None:
    model = build_model("timm/test_convnext", 4, 3, 32).train()
    features, logits = model(_batch()[0])
    (F.cross_entropy(logits, _batch()[1]) + features.pow(2).mean()).backward()
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0
