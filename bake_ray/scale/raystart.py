"""Starting or joining Ray, the same way for ``train``, ``tune``, benchmarks and tests.

Kept apart from :mod:`.raytrain` and :mod:`.capacity` because both need it
(capacity joins a cluster to read it; a training run starts one) and neither should import
the other for it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import ray

TRAIN_DRIVER = "TRAIN_DRIVER"  # a local Ray's resource for trials that only drive workers


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_ray(address: str | None, **kwargs: Any) -> None:
    """Join ``address``/``RAY_ADDRESS`` if given, else start a local Ray with a driver slot.

    A local Ray gets its own dashboard port, and its actors are told where that dashboard
    is: otherwise Ray Train's placement-group cleaner fails with "multiple active Ray
    instances" whenever another Ray runs on the host, and later trials wait for ever.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    port = _free_port()
    env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    ray.init(
        resources={TRAIN_DRIVER: 64},
        dashboard_port=port,
        runtime_env={"env_vars": env},
        **kwargs,
    )


@contextlib.contextmanager
def ray_keeps_its_temp_files() -> Iterator[None]:
    """While a local Ray starts, its processes get Ray's own temp folder as ``TMPDIR``.

    Ray's dashboard runs a multiprocessing forkserver whose socket folder (``pymp-*``) is
    never removed when Ray stops; it then stays among Ray's session files (``/tmp/ray`` or
    ``$RAY_TMPDIR``, which Ray never cleans either) instead of the user's ``TMPDIR``. This
    process keeps its own ``TMPDIR``.
    """
    from ray._common.utils import get_default_ray_temp_dir, get_default_system_temp_dir

    tempfile.gettempdir()  # fixes this process's own temp dir before the change below
    changes = {"RAY_TMPDIR": get_default_system_temp_dir(), "TMPDIR": get_default_ray_temp_dir()}
    os.makedirs(changes["TMPDIR"], exist_ok=True)
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
