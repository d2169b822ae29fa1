"""cluster/with-ray.sh: the head's MLflow server lives exactly as long as Ray on the head.

The real proof is tests/test_ray_up.py (`ray down` leaves no MLflow process); this is the
fast check of the script's own logic, in a PID namespace of its own (root only) so that the
stand-in GCS server is the only one the script can see.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "cluster" / "with-ray.sh"

SCENARIO = r"""
set -u
cp "$(command -v sleep)" "$HOME/gcs_server"          # a process named like Ray's GCS server
"$HOME/gcs_server" 600 & gcs=$!
bash "$SCRIPT" svc "$HOME/svc.log" sleep 601           # what head_start_ray_commands does
for _ in $(seq 50); do pgrep -f "^sleep 601" >/dev/null && break; sleep 0.1; done
echo "running=$(pgrep -fc '^sleep 601')"
first=$(cat "$HOME/.bake-ray-services/svc.pid")
bash "$SCRIPT" svc "$HOME/svc.log" sleep 601           # a restart replaces it
for _ in $(seq 100); do [ "$(pgrep -fc '^sleep 601')" = 1 ] &&
  [ "$(cat "$HOME/.bake-ray-services/svc.pid")" != "$first" ] && break; sleep 0.1; done
echo "after_restart=$(pgrep -fc '^sleep 601')"
kill "$gcs"; wait "$gcs"                               # `ray stop`
for _ in $(seq 100); do pgrep -f 'with-ray\.sh svc|^sleep 601' >/dev/null || break; sleep 0.1; done
echo "after_ray_stop=$(pgrep -fc 'with-ray\.sh svc|^sleep 601')"
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root for a PID namespace")
def test_command_is_replaced_on_restart_and_stopped_with_ray(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SCRIPT": str(SCRIPT)}
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "bash", "-c", SCENARIO],
        env=env, capture_output=True, text=True, timeout=120,
    )
    lines = dict(line.split("=") for line in done.stdout.split() if "=" in line)
    assert lines == {"running": "1", "after_restart": "1", "after_ray_stop": "0"}, (
        done.stdout, done.stderr, (tmp_path / "svc.log").read_text())
    assert "Ray stopped on this node" in (tmp_path / "svc.log").read_text()


THEN = r"""
set -u
cp "$(command -v sleep)" "$HOME/raylet"                # a worker: a raylet, no GCS server
"$HOME/raylet" 600 & raylet=$!
bash "$SCRIPT" leftovers "$HOME/svc.log" --then "touch $HOME/then-ran" sleep 603
for _ in $(seq 50); do pgrep -f "^sleep 603" >/dev/null && break; sleep 0.1; done
echo "running=$(pgrep -fc '^sleep 603')"
kill "$raylet"; wait "$raylet"                         # the raylet exits (the head is gone)
for _ in $(seq 100); do [ -e "$HOME/then-ran" ] && ! pgrep -f 'with-ray\.sh leftovers|^sleep 603' \
  >/dev/null && break; sleep 0.1; done
echo "after_raylet=$(pgrep -fc 'with-ray\.sh leftovers|^sleep 603')"
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root for a PID namespace")
def test_on_a_worker_it_follows_the_raylet_and_runs_then(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SCRIPT": str(SCRIPT)}
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "bash", "-c", THEN],
        env=env, capture_output=True, text=True, timeout=120,
    )
    lines = dict(line.split("=") for line in done.stdout.split() if "=" in line)
    assert lines == {"running": "1", "after_raylet": "0"}, (done.stdout, done.stderr)
    assert (tmp_path / "then-ran").exists()


FOLLOW = r"""
set -u
cp "$(command -v sleep)" "$HOME/raylet"                # a worker: a raylet, no GCS server
"$HOME/raylet" 600 &
python3 -c 'import socket,time
s=socket.socket(); s.bind(("127.0.0.1",0)); s.listen(16)
open("'$HOME'/port","w").write(str(s.getsockname()[1])); time.sleep(600)' & head=$!
for _ in $(seq 100); do [ -s "$HOME/port" ] && break; sleep 0.1; done   # the head's GCS
bash "$SCRIPT" follows "$HOME/svc.log" --follow "127.0.0.1:$(cat "$HOME/port")" \
  --then "touch $HOME/then-ran" sleep 604
sleep 12                                               # answered at least once more
echo "running=$(pgrep -fc '^sleep 604')"
kill "$head"; wait "$head"                             # `ray down`: the head stops
for _ in $(seq 600); do [ -e "$HOME/then-ran" ] && ! pgrep -f 'with-ray\.sh follows|^sleep 604' \
  >/dev/null && break; sleep 0.1; done
echo "after_head_stopped=$(pgrep -fc 'with-ray\.sh follows|^sleep 604')"
"""


@pytest.mark.slow  # three refused connections, 10 s apart
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root for a PID namespace")
def test_on_a_worker_it_follows_the_head_and_runs_then(tmp_path: Path) -> None:
    """--follow: stops (and runs --then) once the head's port refuses 3 times, 10 s apart."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SCRIPT": str(SCRIPT)}
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "bash", "-c", FOLLOW],
        env=env, capture_output=True, text=True, timeout=180,
    )
    lines = dict(line.split("=") for line in done.stdout.split() if "=" in line)
    log = (tmp_path / "svc.log").read_text()
    assert lines == {"running": "1", "after_head_stopped": "0"}, (done.stdout, done.stderr, log)
    assert (tmp_path / "then-ran").exists()
    assert "stopped answering" in log


def test_without_ray_it_refuses_in_one_line(tmp_path: Path) -> None:
    """No GCS server of this user: nothing is started, one line says why, exit 1."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "bash", str(SCRIPT), "svc",
         str(tmp_path / "svc.log"), "sleep", "602"] if os.geteuid() == 0
        else ["bash", "-c", "exit 99"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    if os.geteuid() != 0:
        pytest.skip("needs root for a PID namespace")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "with-ray.sh: Ray is not running here: start Ray first"]
