"""The cluster files pass Ray's own checks, stay private by default, and the docs' commands exist.

Validation is what `ray up` does before it contacts a cloud (Ray 2.60,
`ray.autoscaler._private.commands.create_or_update_cluster` -> `_bootstrap_config`):
`util.prepare_config` (provider defaults, setup-command merge, docker check, per-type worker
counts; for the `local` provider `prepare_local` first), the provider's
`fillout_available_node_types_resources`, `util.validate_config` (`ray-schema.json`, which
rejects unknown keys, plus the node-type checks), then the provider's `bootstrap_config`.
For `cluster-onprem.yaml` every step is Ray's own code. For `cluster.yaml` the two provider
steps call EC2 and IAM through boto3 (instance types, IAM role, key pair, subnets, security
group), so a stand-in provider that returns the config unchanged takes their place; nothing
here talks to a cloud.

The security and layout properties are read from the prepared config. The shell snippets
that write `~/.bake-ray.env` are run in a temporary HOME to see the environment a node gets.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
AWS_FILE = REPO / "cluster.yaml"
ONPREM_FILE = REPO / "cluster-onprem.yaml"
DOCS_FILE = REPO / "docs" / "CLUSTER.md"
SETUP_IAM = REPO / "cluster" / "iam" / "setup_iam.py"
FILES = {"aws": AWS_FILE, "onprem": ONPREM_FILE}

ENV_FILE = "~/.bake-ray.env"
TOKEN_FILE = "~/.ray/auth_token"
LOOPBACK = "127.0.0.1"
# GPUs per instance type, for the types the shipped file or its comments name.
GPUS_PER_INSTANCE = {
    "g5.xlarge": 1,
    "g6.xlarge": 1,
    "g4dn.xlarge": 1,
    "p4d.24xlarge": 8,
    "p4de.24xlarge": 8,
    "p5.48xlarge": 8,
    "g5.48xlarge": 8,
    "g6.48xlarge": 8,
}
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


# --------------------------------------------------------------------------- Ray's validation


class _OfflineAwsProvider:
    """Stands in for Ray's AWS node provider class, whose two config hooks call AWS."""

    @staticmethod
    def fillout_available_node_types_resources(cluster_config: dict) -> dict:
        return cluster_config

    @staticmethod
    def bootstrap_config(cluster_config: dict) -> dict:
        return cluster_config


def _raw(kind: str) -> dict[str, Any]:
    # `ray up` reads the file with yaml.safe_load too.
    return yaml.safe_load(FILES[kind].read_text())


def _bootstrap(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's `_bootstrap_config`, as `ray up` calls it, minus the cloud calls."""
    from ray.autoscaler._private import commands

    config = copy.deepcopy(config)
    with pytest.MonkeyPatch.context() as mp:
        if config["provider"]["type"] == "aws":
            mp.setitem(commands._NODE_PROVIDERS, "aws", lambda _: _OfflineAwsProvider)
        return commands._bootstrap_config(config, no_config_cache=True)


@pytest.fixture(scope="module")
def prepared() -> dict[str, dict[str, Any]]:
    return {kind: _bootstrap(_raw(kind)) for kind in FILES}


@pytest.mark.parametrize("kind", sorted(FILES))
def test_ray_bootstrap_accepts_the_file(kind, prepared):
    config = prepared[kind]
    # prepare_config ran: per-type worker counts filled in, setup commands merged.
    setup = config["setup_commands"]
    assert config["head_setup_commands"][: len(setup)] == setup
    head = config["available_node_types"][config["head_node_type"]]
    if kind == "aws":
        assert head["max_workers"] == 0
    else:
        # The local provider builds its one node type itself (the file must not have any):
        # every listed worker joins.
        assert "available_node_types" not in _raw("onprem")
        workers = len(config["provider"]["worker_ips"])
        assert head["min_workers"] == head["max_workers"] == workers


def _with(config: dict, path: tuple, value: Any) -> dict:
    config = copy.deepcopy(config)
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return config


def _rejections() -> list:
    import jsonschema

    return [
        ("aws", ("head_setup_command",), [], jsonschema.ValidationError),
        (
            "aws",
            ("available_node_types", "gpu1", "InstanceType"),
            "g5.xlarge",
            jsonschema.ValidationError,
        ),
        ("aws", ("docker", "ports"), ["8265:8265"], jsonschema.ValidationError),
        ("aws", ("head_node_type",), "nope", ValueError),
        (
            "onprem",
            ("available_node_types",),
            {"x": {"resources": {}, "node_config": {}}},
            click.ClickException,
        ),
    ]


@pytest.mark.parametrize(("kind", "path", "value", "error"), _rejections())
def test_ray_bootstrap_rejects_broken_files(kind, path, value, error):
    """The validation is not vacuous: Ray rejects what a typo would produce."""
    with pytest.raises(error):
        _bootstrap(_with(_raw(kind), path, value))


# --------------------------------------------------------------------------- shell parsing


def _simple_commands(command: str) -> list[list[str]]:
    """Split one shell command line into simple commands (words), dropping redirections."""
    lexer = shlex.shlex(command.replace("\n", ";"), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    skip_next = False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif token and set(token) <= set("();&|"):
            out.append([])
        elif token and set(token) <= set("<>&"):  # redirection: drop it, its fd and target
            if out[-1] and re.fullmatch(r"\d", out[-1][-1]):
                out[-1].pop()
            skip_next = True
        else:
            out[-1].append(token)
    return [words for words in out if words]


_PREFIX_WORDS = {"nohup", "then", "do", "else", "exec", "time"}
_WITH_RAY = re.compile(r"\S*/cluster/with-ray\.sh")  # runs its COMMAND... for as long as Ray


def _invocations(commands: list[str], program: str) -> list[tuple[str, list[str]]]:
    """(command line, argv after `program`) for every simple command that runs `program`."""
    found = []
    for line in commands:
        for words in _simple_commands(line):
            while words:
                if words[0] in _PREFIX_WORDS or re.fullmatch(r"\w+=.*", words[0]):
                    words = words[1:]
                elif words[:1] == ["bash"] and _WITH_RAY.fullmatch(words[1] if words[1:] else ""):
                    # bash .../with-ray.sh NAME LOG [--follow ADDR] [--then CMD] COMMAND...
                    words = words[4:]
                    while words[:1] in (["--follow"], ["--then"]):
                        words = words[2:]
                else:
                    break
            if words and words[0] == program:
                found.append((line, words[1:]))
    return found


def _all_commands(config: dict[str, Any]) -> list[str]:
    return [command for key in COMMAND_KEYS for command in config.get(key, [])]


# --------------------------------------------------------------------------- CLI parsing


def _ray_cli() -> click.Group:
    from ray.scripts.scripts import cli  # the group `ray --help` prints

    return cli


def _parse_ray(argv: list[str]) -> tuple[tuple[str, ...], click.Context]:
    """Resolve `ray <sub> [<sub>] args` against the installed Ray CLI and parse its options."""
    command: click.Command = _ray_cli()
    path: list[str] = []
    parent = click.Context(command, info_name="ray")
    args = list(argv)
    while isinstance(command, click.Group):
        assert args, f"`ray {' '.join(path)}` needs a subcommand"
        name = args.pop(0)
        sub = command.commands.get(name)
        assert sub is not None and not sub.hidden, (
            f"`ray {' '.join([*path, name])}` is not a command of Ray {_ray_version()}"
        )
        path.append(name)
        command = sub
    try:
        ctx = command.make_context(path[-1], args, parent=parent)
    except click.UsageError as exc:
        raise AssertionError(f"`ray {' '.join(argv)}`: {exc}") from exc
    return tuple(path), ctx


def _ray_version() -> str:
    import ray

    return ray.__version__


def _ray_start(commands: list[str]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for line, argv in _invocations(commands, "ray"):
        path, ctx = _parse_ray(argv)
        if path == ("start",):
            found.append((line, ctx.params))
    return found


def _mlflow_server(commands: list[str]) -> list[dict[str, Any]]:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow.cli

    server = mlflow.cli.cli.commands["server"]
    return [
        server.make_context("server", argv[1:]).params
        for _, argv in _invocations(commands, "mlflow")
        if argv[:1] == ["server"]
    ]


@pytest.mark.parametrize("kind", sorted(FILES))
def test_every_ray_command_in_the_file_parses(kind, prepared):
    """`ray stop` / `ray start ...` lines use flags that Ray 2.60's CLI has."""
    invocations = _invocations(_all_commands(prepared[kind]), "ray")
    assert invocations
    for _, argv in invocations:
        _parse_ray(argv)


# --------------------------------------------------------------------------- node environment


def _node_env(config: dict[str, Any], home: Path, *, head: bool) -> dict[str, str]:
    """The environment `source ~/.bake-ray.env` gives a head or worker node."""
    home.mkdir(parents=True)
    activate = home / "bake-ray-venv" / "bin" / "activate"  # on-prem sources its venv
    activate.parent.mkdir(parents=True)
    activate.write_text("")
    base = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    setup = config["head_setup_commands" if head else "worker_setup_commands"]
    writers = [c for c in setup if re.search(r">>?\s*~/\.bake-ray\.env", c)]
    assert writers, "no setup command writes ~/.bake-ray.env"
    for command in writers:
        subprocess.run(["bash", "-c", command], env=base, check=True, timeout=10)
    dump = subprocess.run(
        ["bash", "-c", f"source {ENV_FILE} && env -0"],
        env=base,
        check=True,
        capture_output=True,
        timeout=10,
    ).stdout.decode()
    return dict(item.split("=", 1) for item in dump.split("\0") if "=" in item)


@pytest.fixture(scope="module")
def envs(prepared, tmp_path_factory) -> dict[tuple[str, str], dict[str, str]]:
    root = tmp_path_factory.mktemp("homes")
    return {
        (kind, role): _node_env(prepared[kind], root / kind / role, head=role == "head")
        for kind in FILES
        for role in ("head", "worker")
    }


# --------------------------------------------------------------------------- security


def test_aws_security_group_opens_only_ssh(prepared):
    config = prepared["aws"]
    group = config["provider"].get("security_group")
    assert group is not None, "name the security group so users can pre-create a narrower one"
    # Ray adds intra-cluster traffic and tcp/22 to a group it creates, then these rules.
    for rule in group.get("IpPermissions", []):
        assert rule.get("IpProtocol") == "tcp", rule
        assert rule.get("FromPort") == rule.get("ToPort") == 22, rule
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        # Own groups or interfaces would bypass the group above.
        assert "SecurityGroupIds" not in node_config, name
        assert "NetworkInterfaces" not in node_config, name
    docker = config["docker"]
    options = [*docker.get("run_options", []), *docker.get("head_run_options", [])]
    options += docker.get("worker_run_options", [])
    for option in options:
        assert not re.match(r"(-p\b|--publish)", option), f"docker publishes a port: {option}"


@pytest.mark.parametrize("kind", sorted(FILES))
def test_dashboard_and_mlflow_listen_on_loopback(kind, prepared, envs):
    config = prepared[kind]
    head_starts = _ray_start(config["head_start_ray_commands"])
    heads = [params for _, params in head_starts if params["head"]]
    assert len(heads) == 1
    assert heads[0]["dashboard_host"] == LOOPBACK
    servers = _mlflow_server(config["head_start_ray_commands"])
    assert len(servers) == 1, "the head starts one MLflow server"
    assert servers[0]["host"] == LOOPBACK
    assert envs[kind, "head"]["MLFLOW_TRACKING_URI"] == f"http://{LOOPBACK}:{servers[0]['port']}"
    # Workers would reach their own loopback: the URI is for the head (the Tune driver) only.
    assert "MLFLOW_TRACKING_URI" not in envs[kind, "worker"]
    assert not _mlflow_server(config["worker_start_ray_commands"])


@pytest.mark.parametrize("kind", sorted(FILES))
def test_token_authentication_on_every_node(kind, prepared, envs):
    config = prepared[kind]
    for role in ("head", "worker"):
        assert envs[kind, role].get("RAY_AUTH_MODE") == "token", role
    # Every `ray start` runs with that environment ...
    starts = _ray_start(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert len(starts) == 2
    for line, _ in starts:
        assert f"source {ENV_FILE}" in line, line
        assert line.index(f"source {ENV_FILE}") < line.index("ray start"), line
    # ... and every node gets the same token: the user's, copied by `ray up` from outside the
    # synced project directory. A node making its own would lock the others out.
    assert config["file_mounts"].get(TOKEN_FILE) == TOKEN_FILE
    for _, argv in _invocations(_all_commands(config), "ray"):
        assert argv[:1] != ["get-auth-token"], argv


def test_aws_head_runs_no_training(prepared):
    config = prepared["aws"]
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["TRAIN_DRIVER"] >= 1
    assert head["max_workers"] == 0


def test_onprem_head_runs_no_training(prepared):
    # The local provider does not pass node-type resources to `ray start`: the flags do.
    [(_, params)] = _ray_start(prepared["onprem"]["head_start_ray_commands"])
    assert params["num_cpus"] == 0 and params["num_gpus"] == 0
    assert json.loads(params["resources"])["TRAIN_DRIVER"] >= 1


def test_onprem_head_forces_the_v1_autoscaler(prepared):
    """Ray 2.60's v2 autoscaler never starts `local` provider workers (the head's own state
    file marks the head terminated); `ray up` exports RAY_enable_autoscaler_v2=1 before the
    head's start commands, so the command that starts the head must set it back to 0."""
    [line] = [line for line, params in _ray_start(prepared["onprem"]["head_start_ray_commands"])
              if params["head"]]
    env = subprocess.run(
        ["bash", "-c", f"export RAY_enable_autoscaler_v2=1; "
         f"{line.replace('source ~/.bake-ray.env', 'true').split('ray start')[0]} env"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout
    assert "RAY_enable_autoscaler_v2=0" in env.splitlines()


@pytest.mark.parametrize("kind", sorted(FILES))
def test_mlflow_server_lives_and_dies_with_ray(kind, prepared):
    """The head's MLflow server runs under cluster/with-ray.sh (stopped when Ray stops),
    after `ray start --head` (it waits on that Ray's GCS server)."""
    commands = prepared[kind]["head_start_ray_commands"]
    [mlflow_at] = [i for i, c in enumerate(commands) if _invocations([c], "mlflow")]
    [head_at] = [i for i, c in enumerate(commands)
                 if any(p["head"] for _, p in _ray_start([c]))]
    assert head_at < mlflow_at
    assert re.search(r"\bbash ~/bake-ray/cluster/with-ray\.sh mlflow \S+ mlflow server\b",
                     " ".join(commands[mlflow_at].split()))
    assert (REPO / "cluster/with-ray.sh").exists()


def test_aws_workers_scale_from_zero(prepared):
    config = prepared["aws"]
    assert config["idle_timeout_minutes"] > 0
    workers = {
        name: node_type
        for name, node_type in config["available_node_types"].items()
        if name != config["head_node_type"]
    }
    gpus = {}
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, name
        assert 1 <= node_type["max_workers"] <= config["max_workers"], name
        gpus[name] = GPUS_PER_INSTANCE[node_type["node_config"]["InstanceType"]]
    assert sorted(gpus.values()) == [1, 8]
    [single] = [name for name, count in gpus.items() if count == 1]
    market = workers[single]["node_config"].get("InstanceMarketOptions", {})
    assert market.get("MarketType") == "spot"
    # Same AMI everywhere, and workers may write checkpoints to S3.
    images = {t["node_config"].get("ImageId") for t in config["available_node_types"].values()}
    assert len(images) == 1 and None not in images
    for name, node_type in workers.items():
        assert "IamInstanceProfile" in node_type["node_config"], name


def _setup_iam_names(cluster_name: str) -> Any:
    spec = importlib.util.spec_from_file_location("setup_iam", SETUP_IAM)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.Names(cluster_name, "bucket", "prefix", "us-west-2", "123456789012"), module


def test_aws_profiles_are_the_ones_setup_iam_makes(prepared, envs):
    """The head wears the profile that may launch workers, the workers the one that may only
    use the bucket prefix; the names and the prefix are those cluster/iam/setup_iam.py
    makes by default (Ray's own ray-autoscaler-v1 cannot pass a role to the workers)."""
    config = prepared["aws"]
    names, module = _setup_iam_names(config["cluster_name"])
    profiles = {name: t["node_config"]["IamInstanceProfile"]
                for name, t in config["available_node_types"].items()}
    head = config["head_node_type"]
    assert profiles.pop(head) == {"Name": names.head}
    assert profiles and all(p == {"Name": names.worker} for p in profiles.values()), profiles
    bucket_uri = envs["aws", "worker"]["BAKE_RAY_S3"]
    assert bucket_uri.split("/", 3)[3] == module.parse_args(["--bucket", "b"]).prefix


def test_aws_storage_is_s3(prepared, envs):
    for role in ("head", "worker"):
        assert envs["aws", role]["BAKE_RAY_STORAGE"].startswith("s3://"), role
    head = envs["aws", "head"]
    assert head["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    [server] = _mlflow_server(prepared["aws"]["head_start_ray_commands"])
    assert server["artifacts_destination"] == "$MLFLOW_ARTIFACTS_DESTINATION"
    assert server["backend_store_uri"] == "$MLFLOW_BACKEND_STORE_URI"
    # sqlite, absolute, in the directory the head mounts from its own disk.
    db = head["MLFLOW_BACKEND_STORE_URI"]
    assert db.startswith("sqlite:////"), db
    mounts = [o.split(":")[-1] for o in prepared["aws"]["docker"]["head_run_options"]]
    assert any(db.removeprefix("sqlite:///").startswith(m + "/") for m in mounts), db


def test_onprem_storage_is_shared(envs):
    for role in ("head", "worker"):
        storage = envs["onprem", role]["BAKE_RAY_STORAGE"]
        assert storage.startswith("/") or "://" in storage, storage
    assert envs["onprem", "head"]["MLFLOW_BACKEND_STORE_URI"].startswith("sqlite:////")


@pytest.mark.parametrize("role", ["head", "worker"])
def test_onprem_setup_checks_the_shared_directory_first(prepared, tmp_path, role):
    """Before the venv, each node's setup stops in one line when BAKE_RAY_SHARED is missing,
    and passes, leaving nothing behind, when it can write there. (Unwritable, as a non-root
    user, is `ray up`'s first try in tests/test_ray_up.py.)"""
    setup = prepared["onprem"][f"{role}_setup_commands"]
    [check] = [i for i, c in enumerate(setup) if "mktemp" in c]
    assert check < min(i for i, c in enumerate(setup) if " -m venv " in c)
    home, shared = tmp_path / "home", tmp_path / "shared"
    home.mkdir()
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def run(directory: Path) -> subprocess.CompletedProcess:
        (home / ".bake-ray.env").write_text(f"export BAKE_RAY_SHARED={directory}\n")
        return subprocess.run(["bash", "-c", setup[check]], env=env, capture_output=True,
                              text=True, timeout=10)

    refused = run(shared)
    assert refused.returncode == 1
    assert f"error: BAKE_RAY_SHARED={shared}: user " in refused.stderr
    assert "writable by ssh_user (docs/CLUSTER.md)" in refused.stderr
    shared.mkdir()
    assert run(shared).returncode == 0
    assert list(shared.iterdir()) == []


# --------------------------------------------------------------------------- versions


def _pyproject() -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_versions_match_pyproject(prepared):
    project = _pyproject()
    [ray_req] = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray"]
    image = prepared["aws"]["docker"]["image"]
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>3)(?P<minor>\d+)-gpu", image)
    assert match, image
    assert match["ray"] == _ray_version(), "image and installed Ray differ"
    assert Version(match["ray"]) in ray_req.specifier, (image, str(ray_req))
    assert {"default", "tune", "train"} <= ray_req.extras
    python = f"{match['py']}.{match['minor']}"
    assert Version(python) in SpecifierSet(project["requires-python"])
    # On-prem builds the same Python's venv and installs the project (its pins) on every node.
    onprem = _all_commands(prepared["onprem"])
    assert any(re.match(rf"python{re.escape(python)} -m venv ", c) for c in onprem)
    for kind in FILES:
        assert any("pip install -e ~/bake-ray" in c for c in prepared[kind]["setup_commands"])
        assert prepared[kind]["file_mounts"]["~/bake-ray"] == "."


# --------------------------------------------------------------------------- docs


def _doc_commands() -> list[list[str]]:
    """Shell lines of the fenced code blocks in docs/CLUSTER.md, as words."""
    lines, in_block = [], False
    for line in DOCS_FILE.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block and line.strip():
            lines.append(line.strip().removeprefix("$ "))
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"\w+=.*", words[0]):
            words = words[1:]
        if words:
            commands.append(words)
    return commands


def test_docs_ray_commands_exist_in_installed_ray():
    parsed = {}
    for words in _doc_commands():
        if words[0] != "ray":
            continue
        path, ctx = _parse_ray(words[1:])
        parsed.setdefault(path, []).append(ctx.params)
        cluster_file = ctx.params.get("cluster_config_file")
        if cluster_file is not None:
            assert (REPO / cluster_file).is_file(), cluster_file
    expected = {("up",), ("dashboard",), ("job", "submit"), ("job", "logs"), ("attach",), ("down",)}
    assert expected <= set(parsed), sorted(expected - set(parsed))
    for submit in parsed["job", "submit"]:  # every job goes through the forwarded port
        assert submit["address"] == f"http://{LOOPBACK}:8265"
        assert submit["working_dir"] == "."
    entrypoints = [list(submit["entrypoint"][:4]) for submit in parsed["job", "submit"]]
    assert ["python", "-m", "bake_ray.tune", "--config"] in entrypoints
    assert ["python", "-m", "bake_ray.compare", "--search"] in entrypoints
    assert any(p["follow"] for p in parsed["job", "logs"])
    assert any(5000 in p["port_forward"] for p in parsed[("attach",)])


def test_docs_turn_token_auth_on_for_job_commands():
    """Without RAY_AUTH_MODE=token the job CLI sends no token and the cluster answers 401."""
    commands = _doc_commands()
    assert ["export", "RAY_AUTH_MODE=token"] in commands
    assert ["ray", "get-auth-token", "--generate"] in commands
