"""The budget check against what a cluster can scale to, the waiting line, and the bounded
wait for the tracking server: the arithmetic alone (the real autoscaler is in
``test_autoscaling.py``)."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bake_ray import tracking
from bake_ray.core.config import ConfigError
from bake_ray.scale import capacity, pending
from bake_ray.scale.capacity import Capacity, Need, NodeType

HEAD = {"CPU": 0.0, "TRAIN_DRIVER": 32.0, "node:__internal_head__": 1.0, "memory": 8e9}
SHIPPED = {  # cluster.yaml, with the CPUs and GPUs `ray up` fills in from the instance types
    "head_node_type": "head",
    "max_workers": 10,
    "available_node_types": {
        "head": {"resources": {"CPU": 0, "TRAIN_DRIVER": 32}},
        "gpu1": {"min_workers": 0, "max_workers": 8, "resources": {"CPU": 4, "GPU": 1}},
        "gpu8": {"min_workers": 0, "max_workers": 2, "resources": {"CPU": 96, "GPU": 8}},
    },
}


def shipped_from_zero() -> Capacity:
    """cluster.yaml right after `ray up`: the head alone is up."""
    types, max_workers = capacity.node_types_from_config(SHIPPED)
    return Capacity(nodes_now=(HEAD,), node_types=types, max_workers=max_workers)


def test_node_types_are_read_as_the_autoscaler_config_has_them() -> None:
    cap = shipped_from_zero()
    assert cap.autoscaling and cap.max_workers == 10
    assert [(t.name, t.max_nodes) for t in cap.node_types] == [
        ("head", -1),
        ("gpu1", 8),
        ("gpu8", 2),
    ]
    assert cap.now.get("CPU", 0) == 0 and cap.now.get("GPU", 0) == 0  # what the old check saw


@pytest.mark.parametrize(
    ("need", "expected"),
    [
        (Need(1, {"CPU": 1, "GPU": 1}), 24),  # a GPU each: 8 x 1 + 2 x 8
        (Need(8, {"CPU": 8, "GPU": 1}, {"TRAIN_DRIVER": 1}), 2),  # ImageNet: one gpu8 each
        (Need(1, {"CPU": 1}), 8 * 4 + 2 * 96),
        (Need(40, {"CPU": 1}, {"TRAIN_DRIVER": 1}), 5),  # driver slots are not the limit
    ],
)
def test_a_trial_that_fits_a_node_type_is_judged_at_full_scale(need: Need, expected: int) -> None:
    assert capacity.full_scale_concurrency(shipped_from_zero(), need, "budget") == expected


def test_the_global_max_workers_caps_the_nodes_counted() -> None:
    types = (
        NodeType("head", {"CPU": 0, "TRAIN_DRIVER": 4}, -1),
        NodeType("cpu2", {"CPU": 2}, 5),
    )
    cap = Capacity(nodes_now=(HEAD,), node_types=types, max_workers=2)
    assert capacity.full_scale_concurrency(cap, Need(1, {"CPU": 1}), "budget") == 4
    with pytest.raises(ConfigError, match="4 such workers fit the whole cluster"):
        capacity.full_scale_concurrency(cap, Need(5, {"CPU": 1}, {"TRAIN_DRIVER": 1}), "budget")


def test_a_max_workers_cut_keeps_the_node_types_the_trial_needs() -> None:
    """Up to 5 nodes of either type, 5 in all: GPU trials count the GPU nodes, CPU trials
    the big CPU nodes (each an upper bound for that trial)."""
    types = (
        NodeType("head", {"CPU": 0}, -1),
        NodeType("cpu96", {"CPU": 96}, 5),
        NodeType("gpu1", {"CPU": 4, "GPU": 1}, 5),
    )
    cap = Capacity(nodes_now=(HEAD,), node_types=types, max_workers=5)
    assert capacity.full_scale_concurrency(cap, Need(1, {"CPU": 1, "GPU": 1}), "budget") == 5
    assert capacity.full_scale_concurrency(cap, Need(1, {"CPU": 8}), "budget") == 5 * 12


def test_a_trial_no_node_type_holds_is_refused_in_one_line_naming_the_largest_type() -> None:
    with pytest.raises(ConfigError) as info:
        capacity.full_scale_concurrency(
            shipped_from_zero(), Need(32, {"CPU": 1, "GPU": 1}, {"TRAIN_DRIVER": 1}), "budget"
        )
    message = str(info.value)
    assert message.startswith("budget: one trial needs 32 workers of CPU: 1, GPU: 1")
    assert "24 such workers fit the whole cluster at full scale" in message
    assert "'gpu8' has CPU: 96, GPU: 8 (up to 2 nodes)" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"no node type can hold one worker.*'gpu8'"):
        capacity.full_scale_concurrency(shipped_from_zero(), Need(1, {"GPU": 16}), "budget")


def test_node_types_with_unknown_resources_are_not_refused() -> None:
    """The `local` provider leaves resources to be detected: nothing to judge against."""
    local = {
        "head_node_type": "local.cluster.node",
        "max_workers": 2,
        "available_node_types": {"local.cluster.node": {"resources": {}, "max_workers": 2}},
    }
    types, max_workers = capacity.node_types_from_config(local)
    cap = Capacity(nodes_now=(HEAD,), node_types=types, max_workers=max_workers)
    assert capacity.full_scale_concurrency(cap, Need(1, {"GPU": 1}), "budget") == 0


def test_nodes_up_now_count_when_they_exceed_the_config() -> None:
    types = (NodeType("head", {"CPU": 0}, -1), NodeType("cpu2", {"CPU": 2}, 1))
    now = (HEAD, {"CPU": 8.0})  # a node someone started by hand
    cap = Capacity(nodes_now=now, node_types=types, max_workers=1)
    assert capacity.full_scale_concurrency(cap, Need(1, {"CPU": 4}), "budget") == 2


def test_train_runs_use_ray_trains_default_worker_resources() -> None:
    capacity.check_run_fits(24, gpu=True, cap=shipped_from_zero())  # every GPU node, spread
    with pytest.raises(ConfigError, match=r"^runtime.workers: the run needs 25 workers of GPU"):
        capacity.check_run_fits(25, gpu=True, cap=shipped_from_zero())
    fixed = Capacity(nodes_now=(HEAD, {"CPU": 2.0}))
    with pytest.raises(ConfigError, match=r"^runtime.workers: 3 workers need 3 CPUs, .* has 2$"):
        capacity.check_run_fits(3, gpu=False, cap=fixed)


def test_waiting_line_names_the_pending_trials_and_their_need() -> None:
    assert pending.waiting_line([]) is None
    one_gpu = [{"CPU": 1.0, "GPU": 1.0}]
    assert pending.waiting_line([one_gpu, one_gpu]) == (
        "waiting for the autoscaler: 2 trials pending (need CPU: 1, GPU: 1 each)"
    )
    workers = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert pending.waiting_line([workers]) == (
        "waiting for the autoscaler: 1 trial pending (need 2 x CPU: 1 each)"
    )


def test_the_waiting_line_is_said_at_most_every_30_s(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.setattr(pending, "_pending_bundles", lambda: {"pg": [{"CPU": 1.0}]})
    watcher = pending.PendingWatcher(say=said.append)
    for now in (0.0, 1.0, 29.0, 30.0, 45.0, 61.0):
        watcher.poll(now)
    assert len(said) == 3  # at 0, 30 and 61 s


# --------------------------------------------------------------------------- tracking


def test_hints_open_mlflow_from_where_the_user_is() -> None:
    assert tracking.open_hint("http://127.0.0.1:5000", on_cluster=True) == (
        "ray attach <your cluster yaml> -p 5000 (it keeps a tunnel open), "
        "then browse http://127.0.0.1:5000"
    )
    assert tracking.open_hint("http://10.0.0.5:5000", on_cluster=True) == (
        "browse http://10.0.0.5:5000"
    )
    assert tracking.open_hint("sqlite:////x/mlflow.db", on_cluster=False) == (
        "mlflow ui --backend-store-uri sqlite:////x/mlflow.db"
    )
    hint = tracking.download_hint("http://127.0.0.1:5000", "abc", "summary", Path("/s/b.yaml"))
    assert hint == (
        "curl -fo b.yaml 'http://127.0.0.1:5000/get-artifact?path=summary%2Fb.yaml&run_uuid=abc'"
        " (through that tunnel)"
    )
    assert tracking.download_hint("sqlite:////x/m.db", "abc", "summary", Path("b.yaml")) is None


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_waiting_for_the_tracking_server_ends_when_it_answers() -> None:
    """A real HTTP server that starts listening after the wait began."""
    port = _closed_port()
    server: list[http.server.HTTPServer] = []
    said: list[str] = []

    def start_server(line: str) -> None:
        said.append(line)
        server.append(http.server.HTTPServer(("127.0.0.1", port), _Healthy))
        threading.Thread(target=server[0].serve_forever, daemon=True).start()

    try:
        tracking.wait_for_tracking(f"http://127.0.0.1:{port}", 60, say=start_server, interval_s=0.1)
    finally:
        for s in server:
            s.shutdown()
            s.server_close()
    assert said == [f"waiting up to 60 s for the MLflow tracking server at http://127.0.0.1:{port}"]


@pytest.mark.slow
def test_a_search_on_a_cluster_waits_then_fails_in_one_line(tmp_path: Path) -> None:
    """`tune` joining a cluster waits (boundedly) for an unreachable server, then exits 2 with
    one line; Ray is never started (the address is not even dialled)."""
    uri = f"http://127.0.0.1:{_closed_port()}"
    env = {
        **__import__("os").environ,
        "RAY_ADDRESS": f"127.0.0.1:{_closed_port()}",
        tracking.ENV_TRACKING_WAIT_S: "3",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bake_ray.tune", "--tracking-uri", uri, "--num-samples", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"error: MLflow tracking server {uri} is unreachable: [Errno 111] Connection refused"
    )
    assert f"waiting up to 3 s for the MLflow tracking server at {uri}" in proc.stdout
    assert list(tmp_path.iterdir()) == []
