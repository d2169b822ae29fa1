"""What a Ray cluster can hold: what is up now, and what its autoscaler can add.

A cluster started by ``ray up`` from ``cluster.yaml`` has a head without CPUs and worker
types from zero: right after ``ray up`` it offers 0 CPUs and 0 GPUs, and a budget judged
against ``ray.cluster_resources()`` would be refused before the autoscaler is ever asked
for a node. So when bake-ray joins a cluster it reads the autoscaler's node types and
judges a budget against the cluster at full scale; a trial that fits some node type
starts, and Tune's pending placement groups make the autoscaler add nodes.

Where the node types come from (checked against Ray 2.60): the autoscaler's own config
file, as its monitor process on the head was started with it
(``monitor.py --autoscaling-config=FILE``; ``ray up`` writes ``~/ray_bootstrap_config.yaml``
with the instance types' CPUs and GPUs filled in). A 0-CPU task pinned to the head finds the
monitor of its own session in ``/proc`` and returns the file's node types. The same holds
for the v1 and the v2 autoscaler (both monitors take that flag) and for Ray's
``fake_multinode`` provider used by the tests. Ray's other records were tried and hold no
node types for such a cluster: the GCS cluster config (``ray._private.state.state.
get_cluster_config()``) is empty unless something reports it (KubeRay), the v1 monitor's
status in the internal KV and the v2 ``get_cluster_status`` list live nodes and demands
only. No monitor with a config means no autoscaler: the cluster is what is up now.

This module imports Ray; :mod:`bake_ray.core.search_space` keeps the pure up-now arithmetic,
and :mod:`bake_ray.scale.pending` says what waits for the autoscaler while a search runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bake_ray.core import search_space as ss
from bake_ray.core.config import ConfigError

HEAD_RESOURCE = "node:__internal_head__"  # every head node has it
_SHOWN = ("CPU", "GPU")  # resources named first in messages


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class NodeType:
    """One node type of the autoscaler's config: its resources and how many it may start.

    ``resources`` is empty when the config leaves them to be detected when a node starts
    (the ``local`` provider, or a cloud type Ray could not look up).
    """

    name: str
    resources: Mapping[str, float]
    max_nodes: int


@dataclass(frozen=True)
class Capacity:
    """The cluster now (alive nodes' totals) and, with an autoscaler, its node types."""

    nodes_now: tuple[Mapping[str, float], ...]
    node_types: tuple[NodeType, ...] = ()
    max_workers: int | None = None  # the config's cap on worker nodes of all types
    config_path: str | None = None

    @property
    def autoscaling(self) -> bool:
        return bool(self.node_types)

    @property
    def now(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for node in self.nodes_now:
            for key, value in node.items():
                total[key] = total.get(key, 0.0) + value
        return total

    def full_scale_nodes(
        self, prefer: tuple[str, ...] = _SHOWN
    ) -> list[tuple[str, Mapping[str, float]]]:
        """Every node the cluster can have at once: the head, then up to ``max_workers``
        worker nodes of the known types, those with the most of ``prefer`` first (so a cut
        by ``max_workers`` keeps what the trial needs: an upper bound)."""
        heads = [(t.name, t.resources) for t in self.node_types if t.max_nodes < 0]
        workers = [
            (t.name, t.resources)
            for t in self.node_types
            if t.resources
            for _ in range(t.max_nodes)
        ]
        workers.sort(key=lambda n: tuple(-n[1].get(k, 0.0) for k in prefer))
        if self.max_workers is not None:
            workers = workers[: self.max_workers]
        return heads + workers

    @property
    def unknown_types(self) -> list[str]:
        return [t.name for t in self.node_types if not t.resources and t.max_nodes != 0]


@dataclass(frozen=True)
class Need:
    """What one trial (or one training run) holds at once: ``workers`` bundles of
    ``per_worker``, and a driver bundle when a separate process drives them."""

    workers: int
    per_worker: Mapping[str, float]
    driver: Mapping[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        each = format_resources(self.per_worker)
        return each if self.workers == 1 else f"{self.workers} workers of {each}"


def format_resources(resources: Mapping[str, float]) -> str:
    """``CPU: 2, GPU: 1`` (CPU and GPU first; zeros and Ray's bookkeeping left out)."""
    keys = [k for k in _SHOWN if resources.get(k)] + sorted(
        k for k in resources if k not in _SHOWN and resources[k] and not _bookkeeping(k)
    )
    return ", ".join(f"{k}: {resources[k]:g}" for k in keys) or "nothing"


def _bookkeeping(key: str) -> bool:
    """Resources Ray adds to every node (memory, node:<ip>, ...), not asked for by trials."""
    return key in ("memory", "object_store_memory") or key.startswith(("node:", "accelerator_"))


def slots(node: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many copies of ``bundle`` one node holds."""
    wanted = [(k, v) for k, v in bundle.items() if v > 0]
    if not wanted:
        return 1 << 20
    return min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in wanted)


# --------------------------------------------------------------------------- the check


def full_scale_concurrency(
    cap: Capacity, need: Need, field_name: str, what: str = "one trial"
) -> int:
    """How many trials (runs) fit at once at full scale; raise if not even one ever fits.

    Workers may spread over nodes (bake-ray asks Ray Train for SPREAD), so a trial fits
    when enough worker bundles fit over all nodes and its driver bundle fits somewhere.
    """
    prefer = tuple(sorted((k for k, v in need.per_worker.items() if v), key=lambda k: k != "GPU"))
    scale = [res for _, res in cap.full_scale_nodes(prefer)]
    fits, worker_slots = max(_fits(scale, need), _fits(list(cap.nodes_now), need))
    if fits >= 1:
        return fits
    if cap.unknown_types:
        return 0  # cannot be judged before such a node starts: not refused
    raise ConfigError(f"{field_name}: {what} {_never_fits(cap, need, worker_slots)}")


def _fits(nodes: list[Mapping[str, float]], need: Need) -> tuple[int, int]:
    """(trials that fit these nodes at once, worker bundles that fit them)."""
    worker_slots = sum(slots(res, need.per_worker) for res in nodes)
    fits = worker_slots // need.workers
    if need.driver:
        fits = min(fits, sum(slots(res, need.driver) for res in nodes))
    return fits, worker_slots


def search_concurrency(space: ss.SearchSpace, cap: Capacity, driver_slot: bool) -> int:
    """Trials at once: the budget's limit within what the cluster holds, now when it has no
    autoscaler (this machine, or a fixed cluster), at full scale when it has one."""
    b = space.budget
    if not cap.autoscaling:
        now = cap.now
        return ss.check_fits(space, now.get("CPU", 0.0), now.get("GPU", 0.0))
    per_worker = {"CPU": b.cpus_per_worker, "GPU": b.gpus_per_worker}
    if ss.trains_in_trial(b):
        need = Need(1, per_worker)
    else:
        driver = {"TRAIN_DRIVER": 1.0} if driver_slot else {"CPU": 0.01}
        need = Need(b.workers_per_trial, per_worker, driver)
    fits = full_scale_concurrency(cap, need, "budget") or b.max_concurrent or b.num_samples
    return max(1, min(b.max_concurrent or fits, fits, b.num_samples))


def run_need(workers: int, gpu: bool) -> Need:
    """A ``train --workers N`` run: N Ray Train workers of Ray Train's default resources."""
    return Need(workers, {"GPU": 1.0} if gpu else {"CPU": 1.0})


def check_run_fits(workers: int, gpu: bool, cap: Capacity) -> None:
    """Raise if a ``train --workers N`` run can never be placed (it would wait for ever)."""
    kind = "GPU" if gpu else "CPU"
    if cap.autoscaling:
        full_scale_concurrency(cap, run_need(workers, gpu), "runtime.workers", "the run")
        return
    available = cap.now.get(kind, 0.0)
    if workers > available:
        raise ConfigError(
            f"runtime.workers: {workers} workers need {workers} {kind}s, "
            f"the cluster has {available:g}"
        )


def _never_fits(cap: Capacity, need: Need, worker_slots: int) -> str:
    """One line: the need, and the largest node type (by the resources the need asks for)."""
    typed = [t for t in cap.node_types if t.max_nodes != 0 and t.resources]
    keys = [k for k in (*_SHOWN, *sorted(need.per_worker)) if need.per_worker.get(k)]
    largest = max(typed, key=lambda t: tuple(t.resources.get(k, 0.0) for k in keys))
    count = "the head" if largest.max_nodes < 0 else f"up to {largest.max_nodes} nodes"
    where = (
        f"{worker_slots} such workers fit the whole cluster at full scale"
        if worker_slots
        else "no node type can hold one worker"
    )
    driver = f" plus a driver with {format_resources(need.driver)}" if need.driver else ""
    return (
        f"needs {need.describe()}{driver}; {where}; the largest node type "
        f"'{largest.name}' has {format_resources(largest.resources)} ({count})"
    )


# --------------------------------------------------------------------------- reading Ray


def join(address: str | None) -> Capacity:
    """Join ``address``/``RAY_ADDRESS`` (or start a local Ray) and read its capacity.

    Joining says nothing on stderr (Ray's "Connecting to existing Ray cluster" lines would
    bury a one-line refusal); the driver's Ray logger is back to INFO afterwards.
    """
    import logging

    from bake_ray.scale.raystart import init_ray

    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    if joined:
        init_ray(address, logging_level=logging.WARNING)
        logging.getLogger("ray").setLevel(logging.INFO)
    else:
        init_ray(None)
    cap = read_capacity(node_types=joined)  # a Ray started here has no autoscaler
    if cap.autoscaling:
        print(describe_autoscaling(cap), flush=True)
    return cap


_last_read: list[Capacity] = []  # the latest read_capacity() of this process


def last_read_autoscales() -> bool:
    """Whether the cluster this process last read has an autoscaler (False if none read)."""
    return bool(_last_read) and _last_read[-1].autoscaling


def read_capacity(node_types: bool = True) -> Capacity:
    """The capacity of the cluster this process joined (``ray.init`` done); its autoscaler's
    node types are looked up only when ``node_types`` is true."""
    cap = _read_capacity(node_types)
    _last_read[:] = [cap]
    return cap


def _read_capacity(node_types: bool) -> Capacity:
    import ray

    nodes = tuple(
        dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive", n.get("alive"))
    )
    config = _head_autoscaling_config() if node_types else None
    if config is None:
        return Capacity(nodes_now=nodes)
    path, node_types, max_workers = config
    return Capacity(
        nodes_now=nodes, node_types=node_types, max_workers=max_workers, config_path=path
    )


def describe_autoscaling(cap: Capacity) -> str:
    """One line: the node types the budget was judged against."""
    types = ", ".join(
        f"{t.name} ({format_resources(t.resources) if t.resources else 'resources unknown'}"
        f"{'' if t.max_nodes < 0 else f', up to {t.max_nodes}'})"
        for t in cap.node_types
    )
    return f"autoscaling cluster: node types {types}; trials wait for nodes as it adds them"


def node_types_from_config(config: Mapping[str, Any]) -> tuple[tuple[NodeType, ...], int | None]:
    """Node types of an autoscaling config; the head type gets ``max_nodes=-1`` (itself)."""
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if name == head:
            types.append(NodeType(name, resources, -1))
        else:
            types.append(NodeType(name, resources, int(spec.get("max_workers", 0))))
    cap = config.get("max_workers")
    return tuple(types), (int(cap) if cap is not None else None)


def _head_autoscaling_config() -> tuple[str, tuple[NodeType, ...], int | None] | None:
    """The head's autoscaling config (path, node types, max_workers), or None."""
    import ray

    # A function made here is pickled by value: the head needs no (matching) bake-ray.
    read_on_head = _make_reader()
    task = ray.remote(num_cpus=0, resources={HEAD_RESOURCE: 0.001}, max_retries=0)(read_on_head)
    found = ray.get(task.remote(), timeout=120)
    if found is None:
        return None
    path, config = found
    node_types, max_workers = node_types_from_config(config)
    if not node_types:
        return None
    return path, node_types, max_workers


def _make_reader() -> Callable[[], tuple[str, dict[str, Any]] | None]:
    def read_own_monitor_config() -> tuple[str, dict[str, Any]] | None:
        """Run on the head: the config file of this session's autoscaler monitor, parsed."""

        import yaml
        from ray._private.worker import global_worker

        logs = f"--logs-dir={global_worker.node.get_logs_dir_path()}"
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    args = handle.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            flags = [a for a in args if a.startswith("--autoscaling-config=")]
            if logs in args and flags:
                path = os.path.expanduser(flags[0].split("=", 1)[1])
                with open(path) as handle:
                    return path, yaml.safe_load(handle)
        return None

    return read_own_monitor_config
