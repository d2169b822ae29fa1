"""python -m bake_ray.ready: wait until a cluster started by `ray up` can take a search.

`ray up` returns once the head is up; the workers join later (the autoscaler sets each one
up, which takes minutes on fresh machines) and the head's MLflow server needs a few seconds
to listen. A search submitted before that fails or waits on nothing. Run on the head,
through the launcher, before the first `ray job submit`:

    ray exec cluster-onprem.yaml "python -m bake_ray.ready"

It waits (bounded) until every worker the cluster file starts at `ray up` has joined (all of
`worker_ips` with the `local` provider, each node type's `min_workers` in the cloud) and the
tracking server in $MLFLOW_TRACKING_URI answers, printing what it waits for every 15 s.
Exit 0 when ready, 1 on timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

BOOTSTRAP = Path("~/ray_bootstrap_config.yaml")  # the cluster file `ray up` copies to the head


def expected_workers(config: dict[str, Any]) -> int:
    """How many workers the cluster file starts with the cluster, before any job asks."""
    provider = config.get("provider", {})
    if provider.get("type") == "local" and "worker_ips" in provider:
        return len(provider["worker_ips"])
    head = config.get("head_node_type")
    types = config.get("available_node_types", {})
    return sum(int(t.get("min_workers", 0)) for name, t in types.items() if name != head)


def alive_workers() -> int:
    """Alive nodes in the Ray cluster this process is connected to, the head excluded."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return sum(1 for n in nodes if not n.get("Resources", {}).get("node:__internal_head__"))


def tracking_answers(uri: str | None) -> bool:
    """True when `uri` is not an HTTP server (nothing to wait for) or its /health says OK."""
    if not uri or not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def wait_ready(want: int, uri: str | None, timeout_s: float, every_s: float = 15.0) -> bool:
    """Poll until `want` workers are alive and the tracking server answers, or time out."""
    deadline = time.monotonic() + timeout_s
    last_report = -every_s
    while True:
        joined, tracking = alive_workers(), tracking_answers(uri)
        if joined >= want and tracking:
            print(f"ready: {joined} worker(s) joined, tracking server: {uri or 'local'}")
            return True
        now = time.monotonic()
        if now > deadline:
            print(f"not ready after {timeout_s:.0f} s: {joined}/{want} worker(s) joined, "
                  f"tracking server {uri} {'answers' if tracking else 'does not answer'}")
            return False
        if now - last_report >= every_s:
            last_report = now
            print(f"waiting: {joined}/{want} worker(s) joined, tracking server "
                  f"{'answers' if tracking else 'not answering yet'}", flush=True)
        time.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bake_ray.ready", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait (default 900)"
    )
    parser.add_argument("--cluster-config", type=Path, default=BOOTSTRAP,
                        help="the cluster file on the head (default ~/ray_bootstrap_config.yaml)")
    parser.add_argument(
        "--workers", type=int, help="workers to wait for (default: from the cluster file)"
    )
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        print("error: --timeout must be > 0 seconds", file=sys.stderr)
        return 2
    want = args.workers
    if want is None:
        path = args.cluster_config.expanduser()
        want = expected_workers(yaml.safe_load(path.read_text())) if path.exists() else 0
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level="ERROR",
             log_to_driver=False)
    try:
        ok = wait_ready(want, os.environ.get("MLFLOW_TRACKING_URI"), args.timeout)
    finally:
        ray.shutdown()
    return 0 if ok else 1
