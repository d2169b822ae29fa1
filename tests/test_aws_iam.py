"""cluster/iam: the roles `setup_iam.py` makes let Ray's AWS code launch cluster.yaml's nodes,
and no more; run against a local AWS emulator (moto's server) and a policy linter.

What runs for real:
- `python cluster/iam/setup_iam.py --bucket ...`, as a subprocess, as docs/CLUSTER.md says,
  four times against moto's IAM: created, unchanged, updated (another prefix), restored.
- Ray 2.60's own `ray up` config path (`commands._bootstrap_config`: prepare_config, the EC2
  instance-type fill-out, schema validation, `bootstrap_aws`) as the operator identity, Ray's
  `AWSNodeProvider.create_node` for the head (operator) and for gpu1 and gpu8 (head role),
  then the head's stop / reuse / terminate / tag calls and `ray down`'s terminate.
- bake-ray's own S3 code (`bake_ray.tune.record.write_text`, pyarrow) as the worker role.

What moto enforces once `/moto-api/reset-auth` sets its no-auth request count to 0 (read in
moto 5.2.5, moto/iam/access_control.py and moto/core/authorization.py): every request must be
signed by a key moto knows (a user's, or an assumed role's session) and its Action must be
allowed by that identity's policies, wildcards expanded, an explicit Deny winning. The
Resource is compared only for S3 (the bucket or bucket/key ARN); other services are checked
against "*", so EC2 statements limited to instance ARNs never match there, and the head's
tag, stop and terminate calls run with enforcement off. Conditions are treated as met (moto
evaluates StringEquals only, on sts:ExternalId). iam:PassRole at RunInstances and the
ec2:CreateTags implied by tags at launch are not checked at all, and moto authorizes
HeadBucket as "s3:HeadBucket" where AWS checks s3:ListBucket, so the worker role gets a
moto-only statement for it before pyarrow runs.

The rest is checked on the rendered policies: the EC2 calls Ray made (recorded with botocore's
event hooks) against the actions the policies allow, and with parliament, whose IAM database
knows each action's resource types and condition keys, that the PassRole, tag, region and
s3:prefix scoping is well-formed and nothing broader is granted. Whether AWS itself then
allows the launch is for `aws iam simulate-principal-policy` (docs/CLUSTER.md).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import types
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
IAM_DIR = REPO / "cluster" / "iam"
SCRIPT = IAM_DIR / "setup_iam.py"
REGION = "us-west-2"
BUCKET = "bake-ray-test-bucket"
OTHER_BUCKET = "someone-elses-bucket"
PREFIX = "bake-ray"
ACCOUNT = "123456789012"  # moto's default account
CLUSTER = "bake-ray"
HEAD, WORKER, OPERATOR = f"{CLUSTER}-head", f"{CLUSTER}-worker", f"{CLUSTER}-operator"
STARTUP_POLLS = 300  # x 0.2 s for moto's server to listen

pytestmark = pytest.mark.slow


def _load_setup_module() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("setup_iam", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


setup_iam = _load_setup_module()


# --------------------------------------------------------------------------- the emulator


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen) -> None:
    for _ in range(STARTUP_POLLS):
        assert proc.poll() is None, "moto's server exited at start-up"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError("moto's server did not listen")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory) -> Iterator[str]:
    """moto's server, a separate process on loopback, stopped by its PID at the end."""
    pytest.importorskip("moto.server")
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        _wait_listening(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _clear_ray_aws_caches() -> None:
    """Ray caches boto3 clients per region and credentials; a new endpoint needs new ones."""
    from ray.autoscaler._private.aws import config, utils

    utils.resource_cache.cache_clear()
    utils.client_cache.cache_clear()
    config._get_subnets_or_die.cache_clear()


@pytest.fixture(scope="module")
def aws_env(endpoint, tmp_path_factory) -> Iterator[None]:
    """Only the standard AWS settings, pointing at the emulator; HOME is a temporary folder
    because `ray up` writes its SSH key to ~/.ssh."""
    import boto3

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_CONFIG_FILE", str(home / "aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "aws-credentials"))
        mp.setenv("HOME", str(home))
        boto3.setup_default_session()
        _clear_ray_aws_caches()
        try:
            yield
        finally:
            boto3.DEFAULT_SESSION = None
            _clear_ray_aws_caches()


def _set_auth(endpoint: str, enforced: bool) -> None:
    """moto checks signatures and policies once its no-auth request count is used up."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=b"0" if enforced else b"inf", method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


class _Enforced:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def __enter__(self) -> None:
        _set_auth(self.endpoint, True)

    def __exit__(self, *exc: object) -> None:
        _set_auth(self.endpoint, False)


# --------------------------------------------------------------------------- identities


def _run_setup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--bucket", BUCKET, *args],
        capture_output=True, text=True, timeout=120, env=os.environ.copy(),
    )


def _assume(sts: Any, role: str) -> dict[str, str]:
    creds = sts.assume_role(RoleArn=f"arn:aws:iam::{ACCOUNT}:role/{role}",
                            RoleSessionName="test-session")["Credentials"]
    return {"aws_access_key_id": creds["AccessKeyId"],
            "aws_secret_access_key": creds["SecretAccessKey"],
            "aws_session_token": creds["SessionToken"]}


def _operator_user(iam: Any) -> dict[str, str]:
    """A user holding only the operator policy: the identity that runs `ray up`."""
    iam.create_user(UserName="laptop")
    iam.attach_user_policy(UserName="laptop",
                           PolicyArn=f"arn:aws:iam::{ACCOUNT}:policy/{OPERATOR}")
    key = iam.create_access_key(UserName="laptop")["AccessKey"]
    return {"aws_access_key_id": key["AccessKeyId"],
            "aws_secret_access_key": key["SecretAccessKey"]}


def _moto_head_bucket_statement(iam: Any, role: str) -> None:
    """moto authorizes HeadBucket as "s3:HeadBucket", an action AWS does not have (AWS
    checks s3:ListBucket, which the policy grants): a moto-only statement for pyarrow."""
    document = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "s3:HeadBucket", "Resource": f"arn:aws:s3:::{BUCKET}"}]}
    iam.put_role_policy(RoleName=role, PolicyName="moto-only-head-bucket",
                        PolicyDocument=json.dumps(document))


def _client(service: str, creds: dict[str, str]) -> Any:
    import boto3

    return boto3.client(service, region_name=REGION, **creds)


# --------------------------------------------------------------------------- Ray's side


class _Recorder:
    """The EC2 operations boto3 sends, as `ec2:Operation` IAM actions (EC2 names them 1:1)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        self.calls.append((f"ec2:{model.name}", copy.deepcopy(params)))  # the API parameters

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        calls, self.calls = self.calls, []
        return calls


def _cluster_config(ami: str, creds: dict[str, str]) -> dict[str, Any]:
    """cluster.yaml with its CHANGE lines edited: an AMI moto knows, and the credentials of
    the identity that runs `ray up` (Ray reads provider.aws_credentials)."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for node_type in config["available_node_types"].values():
        node_type["node_config"]["ImageId"] = ami
    config["provider"]["aws_credentials"] = creds
    return config


def _tags(kind: str, node_type: str) -> dict[str, str]:
    from ray.autoscaler import tags

    return {tags.TAG_RAY_NODE_KIND: kind, tags.TAG_RAY_USER_NODE_TYPE: node_type,
            tags.TAG_RAY_LAUNCH_CONFIG: f"test-{node_type}",
            tags.TAG_RAY_NODE_NAME: f"ray-{CLUSTER}-{node_type}"}


def _provider(config: dict[str, Any], creds: dict[str, str]) -> Any:
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    return AWSNodeProvider({**config["provider"], "aws_credentials": creds},
                           config["cluster_name"])


def _launch(provider: Any, config: dict[str, Any], node_type: str) -> str:
    from ray.autoscaler import tags

    node_config = copy.deepcopy(config["available_node_types"][node_type]["node_config"])
    kind = tags.NODE_KIND_WORKER
    if node_type == config["head_node_type"]:
        kind = tags.NODE_KIND_HEAD
        node_config.update(config.get("head_node", {}))  # what `ray up` adds for the head
    [node_id] = provider.create_node(node_config, _tags(kind, node_type), 1)
    return node_id


def _instances(ec2: Any) -> dict[str, dict[str, Any]]:
    reservations = ec2.describe_instances(
        Filters=[{"Name": "tag:ray-cluster-name", "Values": [CLUSTER]}])["Reservations"]
    return {i["InstanceId"]: i for r in reservations for i in r["Instances"]}


def _node_type(instance: dict[str, Any]) -> str:
    return {t["Key"]: t["Value"] for t in instance["Tags"]}["ray-user-node-type"]


def _lifecycle(world: dict[str, Any], rec: _Recorder, head_config: dict[str, Any]) -> None:
    """What the head's autoscaler does after the launches, then `ray down`: tag, stop an
    on-demand worker, launch its type again (Ray restarts the stopped one), terminate the
    other. moto cannot judge EC2 resources, so this runs with enforcement off; the calls
    are recorded and compared with the head policy instead."""
    head = _provider(head_config, world["creds"]["head"])
    nodes = head.non_terminated_nodes({})
    head.set_node_tags(world["nodes"]["gpu8"], {"ray-node-status": "up-to-date"})
    head.terminate_node(world["nodes"]["gpu8"])
    world["reused"] = _launch(head, head_config, "gpu8")
    # moto records no spot request for a spot launch, so Ray would stop gpu1 rather than
    # terminate it; terminate it as Ray does with `cache_stopped_nodes: false`.
    no_cache = {**head_config, "provider": {**head_config["provider"],
                                            "cache_stopped_nodes": False}}
    _provider(no_cache, world["creds"]["head"]).terminate_nodes([world["nodes"]["gpu1"]])
    world["calls"]["head_lifecycle"] = rec.take()
    operator = _provider(world["bootstrapped"], world["creds"]["operator"])
    operator.terminate_nodes(operator.non_terminated_nodes({}))
    world["calls"]["operator_down"] = rec.take()
    world["nodes_seen_by_head"] = nodes


@pytest.fixture(scope="module")
def world(aws_env, endpoint) -> dict[str, Any]:
    """Everything the tests look at, made in the order a fresh account goes through."""
    import boto3
    from ray.autoscaler._private import commands

    world: dict[str, Any] = {"calls": {}}
    world["setup_runs"] = [
        _run_setup(), _run_setup(), _run_setup("--prefix", "elsewhere"), _run_setup()]
    iam, s3, ec2, sts = (boto3.client(s) for s in ("iam", "s3", "ec2", "sts"))
    for bucket in (BUCKET, OTHER_BUCKET):
        s3.create_bucket(Bucket=bucket,
                         CreateBucketConfiguration={"LocationConstraint": REGION})
    world["creds"] = {"operator": _operator_user(iam), "head": _assume(sts, HEAD),
                      "worker": _assume(sts, WORKER)}
    _moto_head_bucket_statement(iam, WORKER)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    rec = _Recorder()
    boto3.DEFAULT_SESSION.events.register("before-parameter-build.ec2", rec)

    with _Enforced(endpoint):
        config = _cluster_config(ami, world["creds"]["operator"])
        bootstrapped = commands._bootstrap_config(config, no_config_cache=True)
        operator = _provider(bootstrapped, world["creds"]["operator"])
        world["nodes"] = {"head": _launch(operator, bootstrapped, "head")}
        world["calls"]["operator_up"] = rec.take()
        # The head's copy of the config, as `ray up` writes it (without "head_node").
        head_config = {k: v for k, v in bootstrapped.items() if k != "head_node"}
        head = _provider(head_config, world["creds"]["head"])
        for node_type in ("gpu1", "gpu8"):
            world["nodes"][node_type] = _launch(head, head_config, node_type)
        world["calls"]["head_launch"] = rec.take()
    world["bootstrapped"] = bootstrapped
    world["instances"] = _instances(ec2)
    world["profiles"] = [p["InstanceProfileName"]
                         for p in iam.list_instance_profiles()["InstanceProfiles"]]
    world["roles"] = [r["RoleName"] for r in iam.list_roles()["Roles"]]
    _lifecycle(world, rec, head_config)
    world["final_states"] = {i: d["State"]["Name"] for i, d in _instances(ec2).items()}
    return world


# --------------------------------------------------------------------------- setup_iam.py


def test_setup_script_creates_then_changes_nothing(world):
    first, second, other_prefix, restored = world["setup_runs"]
    for run in world["setup_runs"]:
        assert run.returncode == 0, run.stderr
    for name in (HEAD, WORKER):
        assert f"role {name}: created" in first.stdout
        assert f"instance profile {name}: created, role {name} added" in first.stdout
    assert f"managed policy {OPERATOR}: created" in first.stdout
    assert "service-linked role for spot.amazonaws.com: created" in first.stdout
    # Second run: every item reported, none touched.
    items = [line for line in second.stdout.splitlines() if re.match(r"\s*(role|inline|inst|man)",
                                                                     line)]
    assert len(items) == 7, second.stdout
    assert all(": unchanged" in line for line in items), second.stdout
    assert "service-linked role for spot.amazonaws.com: exists" in second.stdout
    # A new prefix rewrites both role policies (not the operator's, which has no bucket).
    for run in (other_prefix, restored):
        assert f"inline policy {HEAD}: updated" in run.stdout
        assert f"inline policy {WORKER}: updated" in run.stdout
        assert f"managed policy {OPERATOR}: unchanged" in run.stdout
    assert f"Name: {HEAD}" in first.stdout and f"Name: {WORKER}" in first.stdout


def test_setup_script_left_the_roles_as_the_templates_say(world, aws_env):
    import boto3

    iam = boto3.client("iam")
    names = setup_iam.Names(CLUSTER, BUCKET, PREFIX, REGION, ACCOUNT)
    for role, template in ((HEAD, "head-policy.json"), (WORKER, "worker-policy.json")):
        stored = iam.get_role_policy(RoleName=role, PolicyName=role)["PolicyDocument"]
        assert stored == setup_iam.render(IAM_DIR / template, names.values())
        trust = iam.get_role(RoleName=role)["Role"]["AssumeRolePolicyDocument"]
        assert trust["Statement"] == [{
            "Sid": "OnlyEc2InstancesWearThisRole", "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]
        [profile_role] = iam.get_instance_profile(
            InstanceProfileName=role)["InstanceProfile"]["Roles"]
        assert profile_role["RoleName"] == role


@pytest.mark.parametrize(("args", "message"), [
    (["--bucket", "Bad_Bucket"], "is not an S3 bucket name"),
    (["--bucket", "ok-bucket", "--prefix", "team/bake-ray"], "must be one path segment"),
    (["--bucket", "ok-bucket", "--prefix", "bake-ray/"], "must be one path segment"),
    (["--bucket", "ok-bucket", "--cluster-name", "a b"], "--cluster-name"),
])
def test_setup_script_refuses_bad_input_in_one_line(args, message, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                         timeout=60, env=env)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr


def test_setup_script_refuses_a_missing_region(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")
    run = subprocess.run([sys.executable, str(SCRIPT), "--bucket", "ok-bucket"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert (run.returncode, run.stderr) == (2, "error: no region: pass --region or set "
                                               "AWS_DEFAULT_REGION\n")


# --------------------------------------------------------------------------- Ray's launch


def test_ray_up_uses_the_head_profile_and_creates_no_role(world):
    """With IamInstanceProfile on the head, bootstrap_aws skips `_configure_iam_role`: no
    ray-autoscaler-v1 profile or role appears, and no "head_node" override is added."""
    assert world["bootstrapped"]["head_node"] == {}
    assert "ray-autoscaler-v1" not in world["profiles"]
    assert "ray-autoscaler-v1" not in world["roles"]
    operator_actions = {action for action, _ in world["calls"]["operator_up"]}
    assert "ec2:RunInstances" in operator_actions


def test_every_node_wears_its_profile(world):
    profiles = {}
    for instance in world["instances"].values():
        profiles[_node_type(instance)] = instance["IamInstanceProfile"]["Arn"]
    assert profiles == {
        "head": f"arn:aws:iam::{ACCOUNT}:instance-profile/{HEAD}",
        "gpu1": f"arn:aws:iam::{ACCOUNT}:instance-profile/{WORKER}",
        "gpu8": f"arn:aws:iam::{ACCOUNT}:instance-profile/{WORKER}",
    }
    assert set(world["nodes"].values()) == set(world["instances"])


def test_head_lifecycle_and_ray_down_ran(world):
    """The stopped gpu8 worker was restarted for the second gpu8 launch, gpu1 was
    terminated, and `ray down` left nothing running."""
    assert world["reused"] == world["nodes"]["gpu8"]
    head_actions = [action for action, _ in world["calls"]["head_lifecycle"]]
    for action in ("ec2:CreateTags", "ec2:StopInstances", "ec2:StartInstances",
                   "ec2:TerminateInstances"):
        assert action in head_actions
    assert set(world["nodes_seen_by_head"]) == set(world["nodes"].values())
    assert not {s for s in world["final_states"].values()} & {"pending", "running"}


# --------------------------------------------------------------------------- the policies


def _rendered(template: str) -> dict[str, Any]:
    names = setup_iam.Names(CLUSTER, BUCKET, PREFIX, REGION, ACCOUNT)
    return setup_iam.render(IAM_DIR / template, names.values())


def _parliament() -> types.ModuleType:
    """parliament 1.6.4 imports pkg_resources, which setuptools >= 81 no longer ships; it
    only uses resource_filename, for its own data files."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, name: str(
            Path(importlib.util.find_spec(package).origin).parent / name)
        sys.modules["pkg_resources"] = shim
    return pytest.importorskip("parliament")


def _analyze(document: dict[str, Any]) -> Any:
    return _parliament().analyze_policy_string(json.dumps(document),
                                               include_community_auditors=True)


S3_OBJECT_ACTIONS = {"s3:getobject", "s3:putobject", "s3:deleteobject",
                     "s3:abortmultipartupload", "s3:listmultipartuploadparts"}
EXPECTED_ACTIONS = {
    "worker-policy.json": S3_OBJECT_ACTIONS | {"s3:listbucket"},
    "head-policy.json": S3_OBJECT_ACTIONS | {
        "s3:listbucket", "ec2:describeinstances", "ec2:runinstances", "ec2:createtags",
        "ec2:startinstances", "ec2:stopinstances", "ec2:terminateinstances", "iam:passrole"},
    "operator-policy.json": {
        "ec2:describeinstances", "ec2:describeinstancetypes", "ec2:describekeypairs",
        "ec2:describesecuritygroups", "ec2:describesubnets", "ec2:createkeypair",
        "ec2:createsecuritygroup", "ec2:authorizesecuritygroupingress", "ec2:runinstances",
        "ec2:createtags", "ec2:startinstances", "ec2:stopinstances",
        "ec2:terminateinstances", "iam:passrole"},
}
# What parliament says and why it is intended: PassRole with RunInstances is the point of
# the head (scoped to one role, below); RunInstances needs "*" across its many resource
# types (scoped by aws:RequestedRegion).
ACCEPTED_FINDINGS = {"PERMISSIONS_MANAGEMENT_ACTIONS", "PRIVILEGE_ESCALATION", "RESOURCE_STAR"}


def _listed(value: Any) -> list[str]:
    return value if isinstance(value, list) else [value]


def _granted_actions(document: dict[str, Any]) -> set[str]:
    """Every action an Allow statement names, wildcards expanded by parliament's IAM database
    (which raises on an unknown action). Not parliament's get_allowed_actions: that one only
    counts actions whose required resource types match, and so misses ec2:CreateTags."""
    expand = _parliament().expand_action
    granted = set()
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow"
        assert "NotAction" not in statement and "NotResource" not in statement
        for action in _listed(statement["Action"]):
            granted |= {f"{a['service']}:{a['action']}".lower() for a in expand(action)}
    return granted


@pytest.mark.parametrize("template", sorted(EXPECTED_ACTIONS))
def test_policy_grants_exactly_the_listed_actions(template):
    document = _rendered(template)
    assert _granted_actions(document) == EXPECTED_ACTIONS[template]
    policy = _analyze(document)
    findings = {finding.issue: finding for finding in policy.findings}
    assert set(findings) <= ACCEPTED_FINDINGS, findings
    if "RESOURCE_STAR" in findings:
        assert set(findings["RESOURCE_STAR"].detail) <= {
            "ec2:RunInstances", "ec2:CreateKeyPair", "ec2:CreateSecurityGroup",
            "ec2:AuthorizeSecurityGroupIngress"}


def test_parliament_would_catch_a_broken_condition_or_action():
    """The linter is not vacuous: a misspelt condition key and action are findings."""
    document = _rendered("head-policy.json")
    passrole = next(s for s in document["Statement"] if s["Action"] == "iam:PassRole")
    passrole["Condition"] = {"StringEquals": {"iam:PassedToServices": "ec2.amazonaws.com"}}
    document["Statement"].append({"Effect": "Allow", "Action": "ec2:RunInstance",
                                  "Resource": "*"})
    issues = {finding.issue for finding in _analyze(document).findings}
    assert {"UNKNOWN_CONDITION_FOR_ACTION", "UNKNOWN_ACTION"} <= issues, issues


def _statements(document: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in document["Statement"] if action in _listed(s["Action"])]


@pytest.mark.parametrize(("template", "passes"), [
    ("head-policy.json", WORKER), ("operator-policy.json", HEAD)])
def test_passrole_only_for_one_role_and_only_to_ec2(template, passes):
    policy = _analyze(_rendered(template))
    assert policy.get_allowed_resources("iam", "PassRole") == [
        f"arn:aws:iam::{ACCOUNT}:role/{passes}"]
    [statement] = _statements(_rendered(template), "iam:PassRole")
    assert statement["Condition"] == {
        "StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}


def test_workers_can_pass_no_role():
    assert _analyze(_rendered("worker-policy.json")).get_allowed_resources("iam", "PassRole") \
        == []


@pytest.mark.parametrize("template", ["head-policy.json", "worker-policy.json"])
def test_s3_only_the_bucket_prefix(template):
    document = _rendered(template)
    policy = _analyze(document)
    for action in ("GetObject", "PutObject", "DeleteObject", "AbortMultipartUpload"):
        assert policy.get_allowed_resources("s3", action) == [
            f"arn:aws:s3:::{BUCKET}/{PREFIX}/*"], action
    [listing] = _statements(document, "s3:ListBucket")
    assert listing["Resource"] == f"arn:aws:s3:::{BUCKET}"
    # IfExists: HeadBucket (pyarrow's create_dir) carries no prefix; see docs/CLUSTER.md.
    assert listing["Condition"] == {"StringLikeIfExists": {"s3:prefix": f"{PREFIX}/*"}}


@pytest.mark.parametrize("template", ["head-policy.json", "operator-policy.json"])
def test_stop_and_terminate_only_this_clusters_instances(template):
    document = _rendered(template)
    for action in ("ec2:StartInstances", "ec2:StopInstances", "ec2:TerminateInstances"):
        [statement] = _statements(document, action)
        assert statement["Resource"] == f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/*"
        assert statement["Condition"] == {
            "StringEquals": {"ec2:ResourceTag/ray-cluster-name": CLUSTER}}
    for statement in _statements(document, "ec2:RunInstances"):
        assert statement["Condition"] == {"StringEquals": {"aws:RequestedRegion": REGION}}
    untagged = [s for s in _statements(document, "ec2:CreateTags") if "Condition" not in s]
    assert not untagged


@pytest.mark.parametrize(("template", "phases"), [
    ("head-policy.json", ("head_launch", "head_lifecycle")),
    ("operator-policy.json", ("operator_up", "operator_down")),
])
def test_policy_covers_every_ec2_call_ray_made(world, template, phases):
    """Recorded from Ray's own code above. Tags at launch need ec2:CreateTags and a profile
    needs iam:PassRole on its role, though RunInstances is the only call."""
    allowed = _granted_actions(_rendered(template))
    needed = set()
    for phase in phases:
        for action, params in world["calls"][phase]:
            needed.add(action.lower())
            if action == "ec2:RunInstances":
                assert params.get("TagSpecifications"), "Ray tags at launch"
                needed |= {"ec2:createtags", "iam:passrole"}
    assert needed, "no EC2 call recorded"
    assert needed <= allowed, sorted(needed - allowed)
    assert "ec2:runinstances" in needed


def test_ray_launched_each_node_with_the_profile_the_policy_may_pass(world):
    passes = {"head": HEAD, "gpu1": WORKER, "gpu8": WORKER}
    launches = [params for phase in ("operator_up", "head_launch")
                for action, params in world["calls"][phase] if action == "ec2:RunInstances"]
    types_launched = {
        {t["Key"]: t["Value"] for t in p["TagSpecifications"][0]["Tags"]}["ray-user-node-type"]:
        p["IamInstanceProfile"]["Name"] for p in launches}
    assert types_launched == passes
    # and the operator may pass the head's role only, the head the worker's only
    assert _statements(_rendered("operator-policy.json"), "iam:PassRole")[0]["Resource"] \
        .endswith(f":role/{HEAD}")
    assert _statements(_rendered("head-policy.json"), "iam:PassRole")[0]["Resource"] \
        .endswith(f":role/{WORKER}")


# --------------------------------------------------------------------------- enforced


def _denied(call: Any) -> str:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as caught:
        call()
    return caught.value.response["Error"]["Code"]


def test_worker_cannot_launch_instances_or_touch_iam(world, endpoint):
    ec2 = _client("ec2", world["creds"]["worker"])
    iam = _client("iam", world["creds"]["worker"])
    ami = world["instances"][world["nodes"]["head"]]["ImageId"]
    with _Enforced(endpoint):
        code = _denied(lambda: ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1,
                                                 InstanceType="g5.xlarge"))
        assert code in ("UnauthorizedOperation", "AccessDenied")
        assert _denied(lambda: ec2.describe_instances()) in ("UnauthorizedOperation",
                                                             "AccessDenied")
        assert _denied(lambda: iam.list_roles()) == "AccessDenied"


def test_head_cannot_grant_itself_more(world, endpoint):
    iam = _client("iam", world["creds"]["head"])
    document = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "*", "Resource": "*"}]})
    with _Enforced(endpoint):
        assert _denied(lambda: iam.put_role_policy(
            RoleName=HEAD, PolicyName="more", PolicyDocument=document)) == "AccessDenied"
        assert _denied(lambda: iam.create_role(
            RoleName="new", AssumeRolePolicyDocument=document)) == "AccessDenied"


def test_operator_cannot_read_the_bucket_or_manage_iam(world, endpoint):
    s3 = _client("s3", world["creds"]["operator"])
    iam = _client("iam", world["creds"]["operator"])
    with _Enforced(endpoint):
        assert _denied(lambda: s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/x")) \
            == "AccessDenied"
        assert _denied(lambda: iam.attach_user_policy(
            UserName="laptop", PolicyArn="arn:aws:iam::aws:policy/AdministratorAccess")) \
            == "AccessDenied"


@pytest.mark.parametrize("role", ["head", "worker"])
def test_s3_inside_the_prefix_only(world, endpoint, role):
    s3 = _client("s3", world["creds"][role])
    key = f"{PREFIX}/experiments/{role}.txt"
    with _Enforced(endpoint):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"checkpoint")
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"checkpoint"
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/experiments/")
        assert key in [o["Key"] for o in listed["Contents"]]
        upload = s3.create_multipart_upload(Bucket=BUCKET, Key=f"{key}.big")
        s3.abort_multipart_upload(Bucket=BUCKET, Key=f"{key}.big",
                                  UploadId=upload["UploadId"])
        s3.delete_object(Bucket=BUCKET, Key=key)
        for bucket, outside in ((BUCKET, f"{PREFIX}-other/x"), (BUCKET, "x"),
                                (OTHER_BUCKET, f"{PREFIX}/x")):
            assert _denied(lambda b=bucket, k=outside: s3.put_object(
                Bucket=b, Key=k, Body=b"x")) == "AccessDenied"
            assert _denied(lambda b=bucket, k=outside: s3.get_object(Bucket=b, Key=k)) \
                == "AccessDenied"


def _bake_ray_write(creds: dict[str, str], uri: str) -> subprocess.CompletedProcess:
    """bake-ray's own S3 path (pyarrow: create_dir, multipart write, read back), in a fresh
    process that sees only the role's credentials, as a node would."""
    code = ("import sys; from bake_ray.core.storage import write_text, read_text; "
            "write_text(sys.argv[1], 'hello'); print(read_text(sys.argv[1]))")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": creds["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": creds["aws_secret_access_key"],
           "AWS_SESSION_TOKEN": creds["aws_session_token"], "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, uri], capture_output=True, text=True,
                          timeout=120, env=env)


def test_bake_ray_storage_works_as_the_worker_inside_the_prefix_only(world, endpoint):
    with _Enforced(endpoint):
        inside = _bake_ray_write(world["creds"]["worker"],
                                 f"s3://{BUCKET}/{PREFIX}/experiments/search/record.yaml")
        outside = _bake_ray_write(world["creds"]["worker"],
                                  f"s3://{BUCKET}/elsewhere/record.yaml")
    assert inside.returncode == 0, inside.stderr[-2000:]
    assert inside.stdout.strip() == "hello"
    assert outside.returncode != 0
    assert "ACCESS_DENIED" in outside.stderr and "'elsewhere/'" in outside.stderr
