"""What a user sees: a real search logged to a real MLflow server, shown by MLflow's own UI.

The tracking tests check what reaches the MLflow API; this one checks that the result is
usable where people look at it: the compare view of the trials, rendered by headless
Chromium, must list every trial with its T, omega and lambda. The page is a React app that
fetches runs after load, so Chromium is given a virtual-time budget (it runs timers and
fetches until the page is idle or the budget is spent) before it dumps the DOM and takes a
screenshot; no browser-driver dependency is needed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from system_packages import missing

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
BAKE_PARAMS = ("T", "omega", "lambda")
PAPER_POINT = {"T": "4.0", "omega": "0.5", "lambda": "1.0"}  # as MLflow stores str(float)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1600,2200",  # run details and the bake.* params fit in the screenshot
)


class _TableRows(HTMLParser):
    """Every ``<tr>`` of the page as a list of cell texts (``th`` and ``td`` alike).

    MLflow's compare view is a set of tables whose rows are ``<th>name</th><td>run 1</td>
    <td>run 2</td>...``, in the column order of the ``Run ID:`` row.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td") and self.rows:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("th", "td") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def table_rows(html: str) -> dict[str, list[str]]:
    """First row of each name -> its cells, e.g. ``{"T": ["4.0", "2.71"]}``."""
    parser = _TableRows()
    parser.feed(html)
    rows: dict[str, list[str]] = {}
    for row in parser.rows:
        if row:
            rows.setdefault(row[0], row[1:])
    return rows


def render(url: str, screenshot: Path, profile: Path, budget_ms: int) -> tuple[str, str]:
    """(DOM after the app settled, Chromium's stderr); Chromium also writes ``screenshot``.

    Chromium runs in its own process group, ended as a whole afterwards so that no renderer
    or GPU helper outlives the test.
    """
    cmd = [
        str(CHROMIUM),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}",
        f"--screenshot={screenshot}",
        "--dump-dom",
        url,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "HOME": str(profile)},
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"chromium did not finish in 120 s:\n{err[-2000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group may have ended by itself
            os.killpg(proc.pid, signal.SIGKILL)
    return out, err


def write_space(path: Path, name: str, output_dir: Path) -> None:
    """Two short trials on digits: the paper's point first, then one Optuna sample."""
    paper = {"bake.temperature": 4.0, "bake.omega": 0.5, "bake.loss_weight": 1.0}
    space: dict[str, Any] = {
        "name": name,
        "base": {
            "epochs": 2,
            "data": {"dataset": "digits", "batch_size": 32, "train_subset": 300},
            "model": {"name": "small_cnn"},
            "runtime": {"output_dir": str(output_dir)},
        },
        "space": {
            "bake.temperature": {"distribution": "uniform", "low": 1.0, "high": 8.0},
            "bake.omega": {"distribution": "uniform", "low": 0.0, "high": 0.9},
            "bake.loss_weight": {"distribution": "loguniform", "low": 0.1, "high": 10.0},
        },
        "initial_points": [paper],
        "budget": {"num_samples": 2, "max_concurrent": 2, "workers_per_trial": 1},
        "scheduler": {"type": "none"},
        "seed": 0,
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))


@pytest.mark.slow
def test_compare_view_shows_every_trial_with_its_bake_params(
    ray_local: Any, mlflow_server: str, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(missing("chromium", f"{CHROMIUM} not found; apt-get install chromium"))
    from mlflow.tracking import MlflowClient

    from bake_ray import tracking
    from bake_ray.tune import cli as tune

    suffix = uuid.uuid4().hex[:8]
    space_name, search_name = f"ui-compare-{suffix}", f"ui-search-{suffix}"
    space_file = tmp_path / "space.yaml"
    write_space(space_file, space_name, tmp_path / "runs")
    code = tune.main(
        [
            "--config", str(space_file),
            "--storage", str(tmp_path / "ray_results"),
            "--name", search_name,
            "--tracking-uri", mlflow_server,
        ]
    )  # fmt: skip
    assert code == 0

    # What the server holds: two trial runs under the search's parent run.
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.get_experiment_by_name(space_name).experiment_id
    (parent,) = client.search_runs([experiment_id], f"tags.`{tracking.TAG_ROLE}` = 'search'")
    trials = client.search_runs(
        [experiment_id], f"tags.`{tracking.TAG_PARENT}` = '{parent.info.run_id}'"
    )
    assert len(trials) == 2
    expected = {run.info.run_id: run for run in trials}
    for run in trials:
        assert run.info.run_name == f"trial-{run.data.tags[tracking.TAG_TRIAL_ID]}"
        assert run.info.status == "FINISHED"
    points = [{p: run.data.params[p] for p in BAKE_PARAMS} for run in trials]
    assert PAPER_POINT in points, points  # the initial point ran, and reads as the paper's

    url = tracking.compare_runs_url(mlflow_server, experiment_id, list(expected))
    assert url.startswith(f"{mlflow_server}/#/compare-runs?")
    shot = tmp_path / "mlflow_compare.png"
    rows: dict[str, list[str]] = {}
    for attempt, budget_ms in enumerate((15000, 30000, 60000)):
        profile = tmp_path / f"chromium-profile-{attempt}"
        dom, stderr = render(url, shot, profile, budget_ms)
        rows = table_rows(dom)
        if len(rows.get("Run Name:", [])) == 2 and all(p in rows for p in BAKE_PARAMS):
            break  # the React app fetched the runs and rendered the tables
    else:
        pytest.fail(f"compare view never rendered the runs; rows: {list(rows)[:20]}\n{stderr}")

    # The page itself says what it compares, column by column in "Run ID:" order.
    assert "Comparing 2 Runs from 1 Experiment" in dom
    columns = rows["Run ID:"]
    assert sorted(columns) == sorted(expected)
    assert rows["Run Name:"] == [expected[rid].info.run_name for rid in columns]
    for name in BAKE_PARAMS:
        shown = rows[name]
        assert shown == [expected[rid].data.params[name] for rid in columns], (name, shown)
    # Each parameter once: T/omega/lambda stand for the config keys, which are not repeated.
    for key in ("bake.temperature", "bake.omega", "bake.loss_weight"):
        assert key not in rows, key

    # Keep the picture for people: in tmp_path and in tests/artifacts/ (git-ignored).
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "mlflow_compare.png")

    # The runs table opened on the view the search stored: its trials, the searched params
    # and best_val_acc with its interval as columns; other metrics are not shown.
    view = tracking.runs_view_url(mlflow_server, experiment_id, search_name)
    view_shot = tmp_path / "mlflow_runs_view.png"
    names = [run.info.run_name for run in trials]
    for attempt, budget_ms in enumerate((15000, 30000, 60000)):
        dom, stderr = render(view, view_shot, tmp_path / f"chromium-view-{attempt}", budget_ms)
        if all(name in dom for name in names) and "best_val_acc_hi" in dom:
            break
    else:
        pytest.fail(f"the runs view never showed the trials and best_val_acc\n{stderr}")
    assert "share key" not in dom  # the UI found the stored view
    for column in ("omega", "lambda", "best_val_acc", "best_val_acc_lo"):
        assert f">{column}<" in dom, column
    for column in ("train_loss", "val_loss", "images_per_s"):
        assert f">{column}<" not in dom, column
    shutil.copyfile(view_shot, ARTIFACTS / "mlflow_runs_view.png")
