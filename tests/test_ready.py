"""python -m bake_ray.ready: what it waits for, read from the shipped cluster files.

Its waiting on a real cluster is proven by tests/test_ray_up.py (`ray exec ... bake_ray.ready`
after `ray up`, on namespace hosts).
"""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import yaml

from bake_ray.scale import ready

REPO = Path(__file__).resolve().parents[1]


def test_expected_workers_of_the_shipped_files() -> None:
    onprem = yaml.safe_load((REPO / "cluster-onprem.yaml").read_text())
    aws = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert ready.expected_workers(onprem) == len(onprem["provider"]["worker_ips"]) == 2
    assert ready.expected_workers(aws) == 0  # GPU workers scale from zero, on demand
    aws["available_node_types"]["gpu1"]["min_workers"] = 3
    assert ready.expected_workers(aws) == 3


def test_tracking_answers_only_when_health_says_ok() -> None:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert ready.tracking_answers(uri)
        assert ready.tracking_answers("sqlite:////tmp/x.db")  # a local store: nothing to wait for
    finally:
        server.shutdown()
        server.server_close()
    assert not ready.tracking_answers(uri)  # closed now


def test_bad_timeout_is_one_line_and_exit_2(capsys) -> None:
    assert ready.main(["--timeout", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --timeout must be > 0 seconds"
