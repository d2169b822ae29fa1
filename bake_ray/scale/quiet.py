"""Ray's console output, off the terminal: ``tune`` and ``compare`` show bake-ray's lines.

Ray Tune's progress engine prints a "Configuration for experiment" box, "View detailed
results here" and a TensorBoard hint at every ``fit``; Ray, Optuna and MLflow's database
log INFO lines (``Started a local Ray instance``, ``Wrote the latest version of all result
files``, ``A new study created``, ``Creating initial MLflow database tables``).

Ray's own switch turns the first off: ``RAY_AIR_NEW_OUTPUT=0`` selects Tune's older
reporter, which prints nothing at the ``verbose=0`` bake-ray runs Tune with. The loggers
keep logging, into a file beside the search (``ray.log`` in its folder when the storage is
local; a local file whose path is printed once when it is remote), and only their
WARNING-and-above records that are not known noise still reach the terminal. ``--verbose``
leaves all of it as Ray has it. Like ``ray_train.log`` for ``train --workers``
(:mod:`bake_ray.scale.raytrain`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bake_ray.core import storage

LOG_FILE = "ray.log"
#: Loggers whose INFO chatter goes to the file (names only: nothing is imported for them).
LOGGERS = ("ray", "optuna", "mlflow.store.db.utils")
#: Warnings that say nothing a bake-ray user acts on: to the file only.
NOISE = (
    "Token authentication is enabled for this Ray cluster",  # bake-ray's own default
)
FORMAT = "%(asctime)s\t%(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s"


class _Terminal(logging.StreamHandler):
    """Warnings and errors that matter, to whatever ``sys.stderr`` is when they are logged
    (a test's capture, a notebook's cell)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter(FORMAT))
        self.addFilter(lambda record: not any(n in record.getMessage() for n in NOISE))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _SearchLog(logging.Handler):
    """Records appended to ``path`` once its folder exists, held until then.

    The search's folder is made when the search starts; a search refused before that (a
    budget no node type can hold, found when Ray is joined) must leave no folder behind, so
    the log never creates it. Records of a search that never started are dropped.
    """

    MAX_HELD = 10_000  # records held before the folder exists (Ray's start-up says a few)

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        self.path = path
        self.held: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None and self.path.parent.is_dir():
            self.file = logging.FileHandler(self.path)
            self.file.setFormatter(self.formatter)
            for held in self.held:
                self.file.emit(held)
            self.held.clear()
        if self.file is not None:
            self.file.emit(record)
        elif len(self.held) < self.MAX_HELD:
            self.held.append(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


def log_file_for(exp_path: str, name: str) -> Path:
    """``ray.log`` in the search's folder when local, else a local file named after it."""
    if storage.is_remote(exp_path):
        folder = Path(tempfile.gettempdir()) / "bake_ray_logs"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{name}.{LOG_FILE}"
    return Path(exp_path) / LOG_FILE


@contextlib.contextmanager
def ray_output(exp_path: str, name: str, verbose: bool = False) -> Iterator[Path | None]:
    """Within: Ray's box and hints off, the loggers' INFO to the log file (yielded; None
    when ``verbose``). Everything is as it was afterwards."""
    if verbose:
        yield None
        return
    import ray  # noqa: F401  (its logger's handler exists before it is replaced)

    path = log_file_for(exp_path, name)
    if storage.is_remote(exp_path):
        print(f"Ray's log: {path}", flush=True)
    to_file = _SearchLog(path)
    handlers: list[logging.Handler] = [to_file, _Terminal()]
    saved = []
    for logger in map(logging.getLogger, LOGGERS):
        saved.append((logger, logger.handlers[:], logger.level, logger.propagate))
        logger.handlers, logger.propagate = list(handlers), False
        logger.setLevel(logging.INFO)
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield path
    finally:
        _restore("RAY_AIR_NEW_OUTPUT", previous)
        for logger, old, level, propagate in saved:
            logger.handlers, logger.propagate = old, propagate
            logger.setLevel(level)
        to_file.close()


def _restore(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
