"""Search files: the shipped ones load, bad ones fail in one line, budgets fit the cluster.

Nothing here starts Ray or trains: a search file is checked completely before Ray starts, so
every mistake a user can make in one must be caught by :func:`bake_ray.core.search_space.load`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from system_packages import missing

from bake_ray.core import search_space as ss
from bake_ray.core.config import ConfigError
from bake_ray.tune import cli as tune

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
SHIPPED = sorted(SPACES_DIR.glob("*.yaml"))
PAPER_DEFAULTS = {"bake.temperature": 4.0, "bake.omega": 0.5, "bake.loss_weight": 1.0}

# A small valid search file; every bad case below changes one thing in it.
VALID: dict[str, Any] = {
    "name": "unit",
    "base": {"epochs": 4, "data": {"dataset": "digits", "batch_size": 32, "same_class": 1}},
    "space": {
        "bake.temperature": {"distribution": "uniform", "low": 1.0, "high": 8.0},
        "bake.omega": {"distribution": "uniform", "low": 0.0, "high": 0.9},
        "bake.loss_weight": {"distribution": "loguniform", "low": 0.1, "high": 10.0},
    },
    "initial_points": [dict(PAPER_DEFAULTS)],
    "objective": {"metric": "val_acc", "mode": "max"},
    "budget": {"num_samples": 4, "max_concurrent": 1, "workers_per_trial": 1},
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "seed": 0,
}
DELETE = object()


def edited(*edits: tuple[tuple[str, ...], Any]) -> dict[str, Any]:
    """VALID with ``(path, value)`` edits; paths are tuples because space keys hold dots."""
    raw = copy.deepcopy(VALID)
    for path, value in edits:
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return raw


def write(tmp_path: Path, raw: dict[str, Any] | str) -> Path:
    """Write a search file as a user would, so tests go through the YAML reader too."""
    path = tmp_path / "space.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


def load_error(path: Path, overrides: tuple[str, ...] = ()) -> str:
    """The message of the ConfigError that loading ``path`` raises; it must be one line."""
    with pytest.raises(ConfigError) as info:
        ss.load(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------- shipped files


def test_the_four_spaces_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"default", "fashion_mnist", "cifar100", "imagenet"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_space_loads_and_starts_from_the_paper_defaults(path: Path) -> None:
    """load() validates schema and every corner; data presence is checked later, by the CLI."""
    space = ss.load(path)
    assert space.initial_points, "the paper's point should be evaluated first"
    first = space.initial_points[0]
    assert {k: first[k] for k in PAPER_DEFAULTS} == PAPER_DEFAULTS
    keys = {d.key for d in space.dimensions}
    assert set(PAPER_DEFAULTS) <= keys
    # The initial point is a legal Optuna value of every distribution (points_to_evaluate).
    dists = tune.optuna_space(space)
    for key, value in first.items():
        assert dists[key]._contains(dists[key].to_internal_repr(value)), (key, value)
    config = ss.trial_config(space, dict(first))
    in_trial = space.budget.workers_per_trial == 1 and not space.budget.always_use_worker_group
    assert config.runtime.workers == (0 if in_trial else space.budget.workers_per_trial)
    assert config.runtime.gpu == (space.budget.gpus_per_worker > 0)


def test_fashion_mnist_space_is_cpu_friendly() -> None:
    space = ss.load(SPACES_DIR / "fashion_mnist.yaml")
    base = space.base
    assert (base.data.dataset, base.model.name, base.data.data_dir) == (
        "fashion_mnist",
        "small_cnn",
        None,
    )
    assert space.budget.gpus_per_worker == 0 and space.budget.workers_per_trial == 1
    assert "optim.lr" in {d.key for d in space.dimensions}
    assert "train_subset" in (SPACES_DIR / "fashion_mnist.yaml").read_text()


def test_fashion_mnist_space_finds_the_debian_package() -> None:
    """With data_dir null the CLI's data check accepts the Debian package's files."""
    from bake_ray.core.datafiles import DEBIAN_FASHION_MNIST_DIR, check_data_available

    if not DEBIAN_FASHION_MNIST_DIR.is_dir():
        pytest.skip(missing("dataset-fashion-mnist", "Debian package not installed"))
    check_data_available(ss.load(SPACES_DIR / "fashion_mnist.yaml").base.data)


def test_cifar100_space_is_the_papers_recipe() -> None:
    space = ss.load(SPACES_DIR / "cifar100.yaml")
    c = space.base
    assert (c.data.dataset, c.model.name, c.epochs) == ("cifar100", "cifar_resnet18", 200)
    assert (c.data.batch_size, c.data.same_class, c.data.download) == (128, 3, True)
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert (c.optim.schedule, c.optim.milestones, c.optim.gamma) == ("step", [0.5, 0.75], 0.1)
    assert not c.optim.nesterov and c.optim.warmup_epochs == 0
    assert c.optim.decay_all_params  # the official code decays every parameter
    b = space.budget
    assert (b.gpus_per_worker, b.workers_per_trial, b.max_concurrent) == (1, 1, 0)
    assert space.scheduler.type == "asha" and space.scheduler.grace_period == 20
    same_class = next(d for d in space.dimensions if d.key == "data.same_class")
    assert same_class.distribution == "choice" and set(same_class.values) == {1, 3}


def test_imagenet_space_is_the_papers_recipe() -> None:
    """8 workers x 64 images = the paper's 512; lr 0.4 is the global-batch LR (DDP averages)."""
    space = ss.load(SPACES_DIR / "imagenet.yaml")
    c = space.base
    assert (c.data.dataset, c.model.name, c.epochs) == ("imagefolder", "resnet50", 100)
    assert c.data.batch_size * space.budget.workers_per_trial == 512
    assert c.data.same_class == 1 and c.bake.global_ensembling
    assert (c.optim.lr, c.optim.schedule, c.optim.warmup_epochs) == (0.4, "cosine", 5)
    assert c.optim.nesterov and c.optim.weight_decay == 5e-5
    assert c.optim.decay_all_params and c.optim.warmup_start_factor == 0.1  # official code
    assert (space.budget.workers_per_trial, space.budget.gpus_per_worker) == (8, 1)
    assert space.scheduler.grace_period == 10
    trial = ss.trial_config(space, dict(space.initial_points[0]))
    assert trial.runtime.workers == 8 and trial.runtime.gpu and trial.runtime.sync_bn


def test_imagenet_placeholder_data_dir_fails_the_cli_data_check(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The placeholder must be replaced: the CLI stops before Ray with one line, exit 2."""
    space = ss.load(SPACES_DIR / "imagenet.yaml")
    if (Path(space.base.data.data_dir) / "train").is_dir():
        pytest.skip(f"{space.base.data.data_dir} holds a real ImageNet on this machine")
    code = tune.main(["--config", str(SPACES_DIR / "imagenet.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == tune.EXIT_BAD_INPUT
    assert err.startswith("error: data.data_dir:") and "\n" not in err


# --------------------------------------------------------------------------- resources


def _budget_space(**budget: Any) -> ss.SearchSpace:
    return ss.parse(edited((("budget",), {**VALID["budget"], **budget})))


def test_check_fits_rejects_a_trial_bigger_than_the_cluster() -> None:
    space = _budget_space(workers_per_trial=8, gpus_per_worker=1, cpus_per_worker=2)
    with pytest.raises(ConfigError) as info:
        ss.check_fits(space, cpus=64, gpus=4)
    message = str(info.value)
    assert message.startswith("budget: one trial needs 16 CPUs and 8 GPUs (8 workers)")
    assert "64 CPUs and 4 GPUs" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"^budget: one trial needs 4 CPUs"):
        ss.check_fits(_budget_space(cpus_per_worker=4), cpus=2, gpus=0)


@pytest.mark.parametrize(
    ("budget", "cpus", "gpus", "expected"),
    [
        ({"max_concurrent": 0, "num_samples": 12}, 8, 0, 8),  # CPUs decide
        ({"max_concurrent": 0, "num_samples": 12, "cpus_per_worker": 3}, 8, 0, 2),
        ({"max_concurrent": 0, "num_samples": 12, "gpus_per_worker": 1}, 64, 4, 4),  # GPUs
        ({"max_concurrent": 0, "num_samples": 12, "gpus_per_worker": 0.5}, 64, 4, 8),
        ({"max_concurrent": 2, "num_samples": 12}, 8, 0, 2),  # the budget's own limit
        ({"max_concurrent": 0, "num_samples": 3}, 8, 0, 3),  # never more than trials
        (
            {"max_concurrent": 0, "workers_per_trial": 8, "gpus_per_worker": 1},
            128,
            16,
            2,
        ),
    ],
)
def test_check_fits_derives_concurrency_from_cpus_and_gpus(
    budget: dict[str, Any], cpus: float, gpus: float, expected: int
) -> None:
    assert ss.check_fits(_budget_space(**budget), cpus, gpus) == expected


def test_shipped_gpu_spaces_fit_typical_clusters() -> None:
    cifar = ss.load(SPACES_DIR / "cifar100.yaml")
    assert ss.check_fits(cifar, cpus=64, gpus=8) == 8  # one trial per GPU
    imagenet = ss.load(SPACES_DIR / "imagenet.yaml")
    assert ss.check_fits(imagenet, cpus=2 * 96, gpus=16) == 2  # two 8-GPU nodes
    with pytest.raises(ConfigError, match=r"^budget: one trial needs 64 CPUs and 8 GPUs"):
        ss.check_fits(imagenet, cpus=96, gpus=4)


# --------------------------------------------------------------------------- --set overrides


def test_split_overrides_sends_search_sections_to_the_file_and_the_rest_to_the_base() -> None:
    overrides = [
        "budget.num_samples=4",
        "bake.omega=0.3",
        "scheduler.type=none",
        "epochs=3",
        "objective.metric=best_val_acc",
        "name=renamed",
        "data.batch_size=32",
    ]
    space_level, base_level = ss._split_overrides(overrides)
    assert space_level == [
        "budget.num_samples=4",
        "scheduler.type=none",
        "objective.metric=best_val_acc",
        "name=renamed",
    ]
    assert base_level == ["bake.omega=0.3", "epochs=3", "data.batch_size=32"]


def test_overrides_reach_the_search_and_the_base_config() -> None:
    space = ss.load(
        SPACES_DIR / "default.yaml",
        ["budget.num_samples=4", "scheduler.type=none", "epochs=3", "data.batch_size=32"],
    )
    assert space.budget.num_samples == 4 and space.scheduler.type == "none"
    assert space.base.epochs == 3 and space.base.data.batch_size == 32
    assert space.raw["budget"]["num_samples"] == 4  # the file's other budget keys are kept
    assert space.budget.max_concurrent == 2


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["budget.num_samples=0"], r"^budget\.num_samples: must be >= 1$"),
        (["epochs=1"], r"^scheduler\.grace_period: must be in \[1, epochs=1\], got 2$"),
        (["data.batch_size=33"], r"^data\.batch_size: 33 must be divisible"),
        (["budget.gpus=1"], r"^budget\.gpus: unknown key"),
    ],
)
def test_bad_overrides_fail_in_one_line(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        ss.load(SPACES_DIR / "default.yaml", overrides)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- Optuna


def test_optuna_space_maps_every_distribution() -> None:
    raw = edited(
        (("base", "data", "batch_size"), 24),  # divisible by M+1 for every M in 1..3
        (("space", "data.same_class"), {"distribution": "int", "low": 1, "high": 3}),
        (("space", "optim.schedule"), {"distribution": "choice", "values": ["step", "cosine"]}),
        (("initial_points",), [{**PAPER_DEFAULTS, "data.same_class": 1, "optim.schedule": "step"}]),
    )
    dists = tune.optuna_space(ss.parse(raw))
    d = optuna.distributions
    assert dists == {
        "bake.temperature": d.FloatDistribution(1.0, 8.0, log=False),
        "bake.omega": d.FloatDistribution(0.0, 0.9, log=False),
        "bake.loss_weight": d.FloatDistribution(0.1, 10.0, log=True),
        "data.same_class": d.IntDistribution(1, 3),
        "optim.schedule": d.CategoricalDistribution(["step", "cosine"]),
    }


# --------------------------------------------------------------------------- bad files

UNIFORM = {"distribution": "uniform", "low": 1.0, "high": 8.0}


def _omega(low: float, high: float) -> tuple[tuple[str, ...], Any]:
    return ("space", "bake.omega"), {"distribution": "uniform", "low": low, "high": high}


BAD_FILES = [
    ("unknown top-level key", [(("budgets",), {})], r"^budgets: unknown key in a search file"),
    (
        "space key not a config field",
        [(("space", "bake.tau"), UNIFORM)],
        r"^space\.bake\.tau: not a config field",
    ),
    (
        "space key names a section",
        [(("space", "bake"), UNIFORM)],
        r"^space\.bake: not a config field",
    ),
    (
        "unknown distribution",
        [(("space", "bake.omega", "distribution"), "normal")],
        r"^space\.bake\.omega\.distribution: 'normal'; one of",
    ),
    (
        "unknown key in a distribution",
        [(("space", "bake.omega", "step"), 0.1)],
        r"^space\.bake\.omega\.step: unknown key for uniform",
    ),
    (
        "empty range",
        [_omega(0.5, 0.5)],
        r"^space\.bake\.omega: empty or inverted range: low=0\.5 must be < high=0\.5$",
    ),
    (
        "inverted range",
        [(("space", "bake.temperature"), {**UNIFORM, "low": 8.0, "high": 1.0})],
        r"^space\.bake\.temperature: empty or inverted range",
    ),
    (
        "non-numeric bound",
        [(("space", "bake.temperature", "high"), "eight")],
        r"^space\.bake\.temperature\.high: expected a finite number, got 'eight'",
    ),
    (
        "loguniform with low 0",
        [(("space", "bake.loss_weight", "low"), 0.0)],
        r"^space\.bake\.loss_weight\.low: loguniform needs low > 0, got 0\.0$",
    ),
    (
        "loguniform with low < 0",
        [(("space", "bake.loss_weight", "low"), -1.0)],
        r"^space\.bake\.loss_weight\.low: loguniform needs low > 0",
    ),
    (
        "omega range reaching 1",
        [_omega(0.0, 1.0)],
        r"^space\.bake\.omega: values must lie in \[0, 1\), got \[0\.0, 1\.0\]$",
    ),
    (
        "temperature range reaching 0",
        [(("space", "bake.temperature", "low"), 0.0)],
        r"^space\.bake\.temperature: values must be > 0",
    ),
    (
        "int range with non-integers",
        [(("space", "data.same_class"), {"distribution": "int", "low": 0.5, "high": 3})],
        r"^space\.data\.same_class: int range needs whole numbers, got \[0\.5, 3\]$",
    ),
    (
        "float distribution over an int field",
        [(("space", "data.same_class"), {"distribution": "uniform", "low": 1, "high": 3})],
        r"^space\.data\.same_class: uniform samples floats but data\.same_class is an int",
    ),
    (
        "choice with empty values",
        [(("space", "data.same_class"), {"distribution": "choice", "values": []})],
        r"^space\.data\.same_class\.values: expected a non-empty list$",
    ),
    (
        "empty space",
        [(("space",), {})],
        r"^space: expected a non-empty mapping",
    ),
    (
        "initial point outside the space",
        [(("initial_points",), [{**PAPER_DEFAULTS, "bake.omega": 0.95}])],
        r"^initial_points\[0\]\.bake\.omega: 0\.95 is outside the space$",
    ),
    (
        "initial point missing a key",
        [(("initial_points",), [{"bake.temperature": 4.0, "bake.omega": 0.5}])],
        r"^initial_points\[0\]: must set exactly the space keys",
    ),
    (
        "initial point with an extra key",
        [(("initial_points",), [{**PAPER_DEFAULTS, "optim.lr": 0.1}])],
        r"^initial_points\[0\]: must set exactly the space keys",
    ),
    (
        "initial point not an integer in an int range",
        [
            (("space", "data.same_class"), {"distribution": "int", "low": 1, "high": 3}),
            (("initial_points",), [{**PAPER_DEFAULTS, "data.same_class": 2.5}]),
        ],
        r"^initial_points\[0\]\.data\.same_class: 2\.5 is outside the space$",
    ),
    (
        "initial point a bool in a float range",
        [(("initial_points",), [{**PAPER_DEFAULTS, "bake.temperature": True}])],
        r"^initial_points\[0\]\.bake\.temperature: True is outside the space$",
    ),
    (
        "num_samples 0",
        [(("budget", "num_samples"), 0)],
        r"^budget\.num_samples: must be >= 1$",
    ),
    (
        "workers_per_trial 0",
        [(("budget", "workers_per_trial"), 0)],
        r"^budget\.workers_per_trial: must be >= 1$",
    ),
    (
        "negative max_concurrent",
        [(("budget", "max_concurrent"), -1)],
        r"^budget\.max_concurrent: must be >= 0",
    ),
    (
        "budget value of the wrong type",
        [(("budget", "num_samples"), "many")],
        r"^budget\.num_samples: expected int, got 'many'$",
    ),
    (
        "unknown budget key",
        [(("budget", "gpus"), 1)],
        r"^budget\.gpus: unknown key; allowed: ",
    ),
    (
        "grace_period > epochs",
        [(("scheduler", "grace_period"), 5)],
        r"^scheduler\.grace_period: must be in \[1, epochs=4\], got 5$",
    ),
    (
        "unknown scheduler",
        [(("scheduler", "type"), "hyperband")],
        r"^scheduler\.type: 'hyperband'; one of",
    ),
    (
        "objective mode min",
        [(("objective", "mode"), "min")],
        r"^objective\.mode: accuracy is maximised; got 'min'$",
    ),
    (
        "unknown objective metric",
        [(("objective", "metric"), "test_acc")],
        r"^objective\.metric: 'test_acc'; one of",
    ),
    (
        "bad base config",
        [(("base", "bake"), {"omega": 1.5})],
        r"^bake\.omega: must be in \[0, 1\), got 1\.5$",
    ),
    ("negative seed", [(("seed",), -1)], r"^seed: expected an int >= 0, got -1$"),
    ("bad name", [(("name",), "my search!")], r"^name: use letters, digits, - and _ only"),
]


@pytest.mark.parametrize(
    ("edits", "pattern"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_bad_space_file_fails_in_one_line_naming_the_problem(
    tmp_path: Path, edits: list[tuple[tuple[str, ...], Any]], pattern: str
) -> None:
    ss.load(write(tmp_path, VALID))  # the unedited file is valid
    message = load_error(write(tmp_path, edited(*edits)))
    assert re.search(pattern, message), message


def test_yaml_syntax_error_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: broken\nspace: {bake.omega: {distribution: uniform, low: 0\n")
    assert f"{path}: invalid YAML:" in load_error(path)


def test_python_tags_are_rejected_not_executed(tmp_path: Path) -> None:
    """Safe YAML only: a search file can never import or run code."""
    marker = tmp_path / "pwned"
    for tag in ("!!python/object/apply:os.system", "!!python/object/apply:pathlib.Path.touch"):
        text = yaml.safe_dump(VALID).replace("name: unit", f"name: {tag} ['touch {marker}']")
        message = load_error(write(tmp_path, text))
        assert "invalid YAML: could not determine a constructor for the tag" in message
        assert "python/object/apply" in message
    assert not marker.exists()


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "expected a mapping at the top level" in load_error(write(tmp_path, "- a\n- b\n"))


def test_every_value_of_a_small_int_range_is_validated(tmp_path: Path) -> None:
    """Both ends (64, 68) divide by M+1=4, but 65 inside the range does not: named."""
    raw = edited(
        (("base", "data", "same_class"), 3),
        (("base", "data", "batch_size"), 64),
        (("space", "data.batch_size"), {"distribution": "int", "low": 64, "high": 68}),
        (("initial_points",), [{**PAPER_DEFAULTS, "data.batch_size": 64}]),
    )
    message = load_error(write(tmp_path, raw))
    assert message.startswith("space: the point {")
    assert "'data.batch_size': 65" in message and "gives an invalid trial" in message
    assert message.endswith(
        "data.batch_size: 65 must be divisible by data.same_class + 1 = 4 "
        "(each anchor is followed by 3 same-class images)"
    )


def test_corner_of_a_choice_naming_an_unknown_model(tmp_path: Path) -> None:
    raw = edited(
        (("space", "model.name"), {"distribution": "choice", "values": ["small_cnn", "vgg"]}),
        (("initial_points",), [{**PAPER_DEFAULTS, "model.name": "small_cnn"}]),
    )
    message = load_error(write(tmp_path, raw))
    assert "'model.name': 'vgg'" in message and "model.name: unknown 'vgg'" in message


def test_affinity_temperature_is_searchable_and_its_range_comes_from_the_schema(
    tmp_path: Path,
) -> None:
    """tau is searched like T/omega/lambda; a range reaching 0 is refused against the space,
    with the limit the config schema declares (the same check as omega's and T's)."""
    tau = {"distribution": "loguniform", "low": 0.05, "high": 1.0}
    raw = edited(
        (("space", "bake.affinity_temperature"), tau),
        (("initial_points",), [{**PAPER_DEFAULTS, "bake.affinity_temperature": 1.0}]),
    )
    space = ss.load(write(tmp_path, raw))
    assert "bake.affinity_temperature" in tune.optuna_space(space)
    trial = ss.trial_config(space, {**PAPER_DEFAULTS, "bake.affinity_temperature": 0.1})
    assert trial.bake.affinity_temperature == 0.1
    bad = edited(
        (("space", "bake.affinity_temperature"), {**tau, "distribution": "uniform", "low": 0.0}),
        (("initial_points",), [{**PAPER_DEFAULTS, "bake.affinity_temperature": 1.0}]),
    )
    assert load_error(write(tmp_path, bad)) == (
        "space.bake.affinity_temperature: values must be > 0, got [0.0, 1.0]"
    )
    val = edited((("space", "data.val_fraction"), {**UNIFORM, "low": 0.1, "high": 0.6}))
    assert load_error(write(tmp_path, val)).startswith(
        "space.data.val_fraction: values must lie in (0, 0.5], got [0.1, 0.6]"
    )
