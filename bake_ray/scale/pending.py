"""What waits for the autoscaler while a search or a training run goes on.

Tune reserves a placement group per trial and Ray Train one per worker group; on a cluster
that scales from zero they wait, PENDING, until the autoscaler adds a node. A user who sees
nothing for minutes thinks the search hangs, so a watcher says how many groups wait and for
what, at most every 30 s. Imports Ray (its placement-group table).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from bake_ray.scale.capacity import format_resources

WAIT_LINE_EVERY_S = 30.0  # at most one "waiting for the autoscaler" line per this long


@dataclass
class PendingWatcher:
    """Says, at most every 30 s, how many placement groups wait for nodes, and for what.

    Tune reserves a placement group per trial and Ray Train one per worker group. On a
    cluster with an autoscaler a group that is PENDING waits for a node to be added (one
    that fits would be placed at once), so the line appears from the first poll that sees
    one. Groups of other jobs on the same cluster are counted too.
    """

    say: Callable[[str], None] = print
    every_s: float = WAIT_LINE_EVERY_S
    noun: str = "trial"  # what one placement group is to the user
    _last_said: float = -math.inf

    def poll(self, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        if now - self._last_said < self.every_s:
            return None
        line = waiting_line(list(_pending_bundles().values()), self.noun)
        if line:
            self._last_said = now
            self.say(line)
        return line


def waiting_line(pending: list[list[Mapping[str, float]]], noun: str = "trial") -> str | None:
    """``waiting for the autoscaler: 2 trials pending (need CPU: 1 each)``, or None."""
    if not pending:
        return None
    needs = sorted({_group_need(bundles) for bundles in pending})
    noun = noun if len(pending) == 1 else f"{noun}s"
    return (
        f"waiting for the autoscaler: {len(pending)} {noun} pending (need {'; '.join(needs)} each)"
    )


def _group_need(bundles: list[Mapping[str, float]]) -> str:
    kinds = sorted({format_resources(b) for b in bundles})
    if len(bundles) == 1 or len(kinds) > 1:
        return " + ".join(format_resources(b) for b in bundles)
    return f"{len(bundles)} x {kinds[0]}"


def _pending_bundles() -> dict[str, list[Mapping[str, float]]]:
    from ray.util import placement_group_table

    try:
        table = placement_group_table()
    except Exception:  # the GCS is busy or gone: say nothing this time
        return {}
    return {
        pg_id: [dict(b) for _, b in sorted(info.get("bundles", {}).items())]
        for pg_id, info in table.items()
        if info.get("state") in ("PENDING", "RESCHEDULING")
    }


@contextlib.contextmanager
def watch_pending(enabled: bool, noun: str = "trial", interval_s: float = 1.0) -> Iterator[None]:
    """Poll a :class:`PendingWatcher` from a daemon thread while the block runs."""
    if not enabled:
        yield
        return
    stop = threading.Event()
    watcher = PendingWatcher(say=lambda line: print(line, flush=True), noun=noun)

    def loop() -> None:
        while not stop.wait(interval_s):
            watcher.poll()

    thread = threading.Thread(target=loop, name="bake-ray-autoscaler-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
