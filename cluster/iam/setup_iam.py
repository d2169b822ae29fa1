"""Create the IAM roles, instance profiles and policies that cluster.yaml's nodes wear.

    python cluster/iam/setup_iam.py --bucket my-bucket [--prefix bake-ray] [--region us-west-2]

Run it once per account (and again after changing the bucket, prefix, region or this
directory's policies): it creates what is missing, rewrites what differs, and leaves the rest
alone, saying which for each item. It uses boto3's standard configuration only (environment
variables such as AWS_PROFILE, AWS_ACCESS_KEY_ID, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL, or
~/.aws), so the same command works against AWS and against a local emulator.

What it makes, for cluster name N (default bake-ray; docs/CLUSTER.md, "IAM: roles the cluster
needs", says why each permission is there):

- role and instance profile N-head: the head's autoscaler may launch, tag, stop and terminate
  the cluster's instances, pass only the N-worker role to EC2, and use the bucket prefix;
- role and instance profile N-worker: may only use the bucket prefix;
- managed policy N-operator (not attached to anyone): what the identity that runs `ray up`
  needs, including passing the N-head role;
- the EC2 Spot service-linked role, if the account has none: without it the first spot
  launch makes EC2 create it on the caller's behalf, which the head may not do.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TRUST_FILE = HERE / "trust-ec2.json"
HEAD_FILE = HERE / "head-policy.json"
WORKER_FILE = HERE / "worker-policy.json"
OPERATOR_FILE = HERE / "operator-policy.json"

SPOT_SERVICE = "spot.amazonaws.com"
MAX_POLICY_VERSIONS = 5  # IAM keeps at most five versions of a managed policy
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# S3's rules for new bucket names (no dots, which break virtual-hosted TLS, are still allowed).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# One path segment: pyarrow's create_dir(recursive=True) writes a marker object for every
# level from the bucket root down, so a nested prefix ("team/bake-ray") would need write
# access to "team/" too.
_PREFIX = re.compile(r"[A-Za-z0-9._-]+")
_NAME = re.compile(r"[A-Za-z0-9+=,.@_-]{1,50}")


class SetupError(Exception):
    """A problem the user can fix; printed as one line."""


@dataclass(frozen=True)
class Names:
    """The names and values the policy templates are filled with."""

    cluster: str
    bucket: str
    prefix: str
    region: str
    account_id: str

    @property
    def head(self) -> str:
        return f"{self.cluster}-head"

    @property
    def worker(self) -> str:
        return f"{self.cluster}-worker"

    @property
    def operator(self) -> str:
        return f"{self.cluster}-operator"

    def values(self) -> dict[str, str]:
        return {
            "BUCKET": self.bucket,
            "PREFIX": self.prefix,
            "REGION": self.region,
            "ACCOUNT_ID": self.account_id,
            "CLUSTER_NAME": self.cluster,
            "HEAD_ROLE": self.head,
            "WORKER_ROLE": self.worker,
        }


def render(template: Path, values: dict[str, str]) -> dict[str, Any]:
    """A policy template with every {{NAME}} replaced; an unknown name is an error, so a
    template and this script cannot drift apart silently."""

    def fill(match: re.Match[str]) -> str:
        if match[1] not in values:
            raise SetupError(f"{template.name}: unknown placeholder {match[0]}")
        return values[match[1]]

    return json.loads(_PLACEHOLDER.sub(fill, template.read_text()))


def check_args(bucket: str, prefix: str, cluster: str) -> None:
    if not _BUCKET.fullmatch(bucket):
        raise SetupError(f"--bucket {bucket!r} is not an S3 bucket name (3-63 of a-z 0-9 . -)")
    if not _PREFIX.fullmatch(prefix):
        raise SetupError(
            f"--prefix {prefix!r} must be one path segment (letters, digits, . _ -): "
            "pyarrow creates a marker object at every level above the prefix"
        )
    if not _NAME.fullmatch(cluster):
        raise SetupError(f"--cluster-name {cluster!r}: use at most 50 of A-Z a-z 0-9 +=,.@_-")


# --------------------------------------------------------------------------- IAM steps


def ensure_role(iam: Any, name: str, trust: dict[str, Any], description: str) -> str:
    """Create the role, or make its trust policy the given one. Returns what happened."""
    try:
        role = iam.get_role(RoleName=name)["Role"]
    except iam.exceptions.NoSuchEntityException:
        iam.create_role(
            RoleName=name, AssumeRolePolicyDocument=json.dumps(trust), Description=description
        )
        return "created"
    if role["AssumeRolePolicyDocument"] == trust:
        return "unchanged"
    iam.update_assume_role_policy(RoleName=name, PolicyDocument=json.dumps(trust))
    return "trust policy updated"


def ensure_inline_policy(iam: Any, role: str, name: str, document: dict[str, Any]) -> str:
    try:
        current = iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
    except iam.exceptions.NoSuchEntityException:
        current = None
    if current == document:
        return "unchanged"
    iam.put_role_policy(RoleName=role, PolicyName=name, PolicyDocument=json.dumps(document))
    return "created" if current is None else "updated"


def ensure_instance_profile(iam: Any, name: str, role: str) -> str:
    """An instance profile named like its role, holding that role (a profile holds one)."""
    status = "unchanged"
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except iam.exceptions.NoSuchEntityException:
        profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        status = "created"
    roles = [r["RoleName"] for r in profile.get("Roles", [])]
    if roles == [role]:
        return status
    if roles:
        raise SetupError(
            f"instance profile {name} holds role {roles[0]}, not {role}; remove it with "
            f"`aws iam remove-role-from-instance-profile --instance-profile-name {name} "
            f"--role-name {roles[0]}` and run this again"
        )
    iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=role)
    return f"{status}, role {role} added" if status == "created" else f"role {role} added"


def ensure_managed_policy(iam: Any, arn: str, name: str, document: dict[str, Any]) -> str:
    """Create the customer-managed policy, or make its default version this document."""
    try:
        policy = iam.get_policy(PolicyArn=arn)["Policy"]
    except iam.exceptions.NoSuchEntityException:
        iam.create_policy(PolicyName=name, PolicyDocument=json.dumps(document))
        return "created"
    version = policy["DefaultVersionId"]
    current = iam.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"]
    if current["Document"] == document:
        return "unchanged"
    versions = iam.list_policy_versions(PolicyArn=arn)["Versions"]
    if len(versions) >= MAX_POLICY_VERSIONS:
        oldest = min((v for v in versions if not v["IsDefaultVersion"]),
                     key=lambda v: v["CreateDate"])
        iam.delete_policy_version(PolicyArn=arn, VersionId=oldest["VersionId"])
    iam.create_policy_version(PolicyArn=arn, PolicyDocument=json.dumps(document),
                              SetAsDefault=True)
    return "updated"


def ensure_spot_service_role(iam: Any) -> str:
    """EC2's spot service-linked role, looked up by its path (its name is AWS's business)."""
    path = f"/aws-service-role/{SPOT_SERVICE}/"
    if iam.list_roles(PathPrefix=path)["Roles"]:
        return "exists"
    iam.create_service_linked_role(AWSServiceName=SPOT_SERVICE)
    return "created"


# --------------------------------------------------------------------------- main


def setup(session: Any, names: Names) -> list[str]:
    """Create or update everything; return one report line per item."""
    iam = session.client("iam")
    values = names.values()
    trust = render(TRUST_FILE, values)
    lines = []
    for role, template, what in (
        (names.worker, WORKER_FILE, "bake-ray worker nodes: the bucket prefix only"),
        (names.head, HEAD_FILE, "bake-ray head: launches the cluster's workers"),
    ):
        lines.append(f"role {role}: {ensure_role(iam, role, trust, what)}")
        status = ensure_inline_policy(iam, role, role, render(template, values))
        lines.append(f"  inline policy {role}: {status}")
        lines.append(f"instance profile {role}: {ensure_instance_profile(iam, role, role)}")
    arn = operator_arn(names)
    status = ensure_managed_policy(iam, arn, names.operator, render(OPERATOR_FILE, values))
    lines.append(f"managed policy {names.operator}: {status} ({arn})")
    lines.append(f"service-linked role for {SPOT_SERVICE}: {ensure_spot_service_role(iam)}")
    return lines


def operator_arn(names: Names) -> str:
    return f"arn:aws:iam::{names.account_id}:policy/{names.operator}"


def bucket_note(session: Any, names: Names) -> str | None:
    """A hint when the bucket does not exist yet (the roles work without it, the cluster not)."""
    from botocore.exceptions import ClientError

    s3 = session.client("s3", region_name=names.region)
    try:
        s3.head_bucket(Bucket=names.bucket)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
            return (f"note: bucket {names.bucket} does not exist yet: "
                    f"aws s3 mb s3://{names.bucket} --region {names.region}")
    return None


def next_steps(names: Names) -> list[str]:
    return [
        "",
        "In cluster.yaml (lines marked CHANGE):",
        f"  head node_config:        IamInstanceProfile: {{Name: {names.head}}}",
        f"  gpu1, gpu8 node_configs: IamInstanceProfile: {{Name: {names.worker}}}",
        f"  BAKE_RAY_S3:             s3://{names.bucket}/{names.prefix}",
        f"  provider.region:         {names.region}",
        f"The identity that runs `ray up` needs {names.operator} (or broader rights), e.g.:",
        f"  aws iam attach-user-policy --user-name YOUR_USER --policy-arn {operator_arn(names)}",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="setup_iam.py",
        description="Create the IAM roles and instance profiles for bake-ray's cluster.yaml.",
    )
    parser.add_argument("--bucket", required=True, help="the S3 bucket of BAKE_RAY_S3")
    parser.add_argument("--prefix", default="bake-ray",
                        help="the key prefix of BAKE_RAY_S3 (default: bake-ray)")
    parser.add_argument("--region", help="the cluster's region (default: AWS_DEFAULT_REGION)")
    parser.add_argument("--cluster-name", default="bake-ray",
                        help="cluster.yaml's cluster_name; names the roles (default: bake-ray)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import boto3
        import botocore.exceptions
    except ImportError:
        print("error: boto3 is not installed: pip install boto3", file=sys.stderr)
        return 1
    try:
        check_args(args.bucket, args.prefix, args.cluster_name)
        session = boto3.Session(region_name=args.region)
        if not session.region_name:
            raise SetupError("no region: pass --region or set AWS_DEFAULT_REGION")
        account = session.client("sts").get_caller_identity()["Account"]
        names = Names(args.cluster_name, args.bucket, args.prefix, session.region_name, account)
        print(f"account {account}, region {names.region}, "
              f"bucket prefix s3://{names.bucket}/{names.prefix}/")
        lines = setup(session, names)
        note = bucket_note(session, names)
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n".join(lines + ([note] if note else []) + next_steps(names)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
