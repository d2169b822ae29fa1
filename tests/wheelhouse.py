"""A local wheelhouse for test hosts that have no network: every wheel `pip install -e .` needs.

Built once with `pip download` from the project's own dependencies, at the versions this
environment runs (``pip freeze``), and cached outside the repository (``ray up`` hashes every
file under the directory it syncs, so gigabytes of wheels there would slow every ``ray up``).
That is torch's CUDA build, as a user's GPU machine gets it (about 3 GB of wheels, a 6.5 GB
venv per host): a CPU torch would be lighter, but no CPU torchvision is available offline here,
and torchvision's CUDA build cannot load its operators against a CPU torch.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def requirements() -> list[str]:
    """bake-ray's runtime dependencies, plus what pip needs to build it (PEP 660 editable)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [*project["project"]["dependencies"], *project["build-system"]["requires"]]


def frozen() -> list[str]:
    """This environment's exact versions, without the editable bake-ray itself."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        check=True, capture_output=True, text=True,
    ).stdout
    return [line for line in out.splitlines() if "==" in line]


def _download(dest: Path, reqs: list[str], constraints: list[str]) -> subprocess.CompletedProcess:
    dest.mkdir(parents=True, exist_ok=True)
    cfile = dest / "constraints.txt"
    cfile.write_text("\n".join(constraints) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
           "--dest", str(dest), "-c", str(cfile), *reqs]
    env = {**os.environ, "PIP_CONSTRAINT": ""}  # the machine's own constraints file, if any
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)


def build(cache: Path | None = None) -> Path:
    """Return a directory of wheels for a fresh ``python3.11 -m venv`` + ``pip install -e .``."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    cache = cache or cache_home / "bake-ray-tests"
    reqs, pins = requirements(), frozen()
    key = hashlib.sha256("\n".join([*reqs, *pins]).encode()).hexdigest()[:16]
    dest = cache / f"wheelhouse-{key}"
    if (dest / ".complete").exists():
        return dest
    done = _download(dest, reqs, pins)
    if done.returncode != 0:
        raise RuntimeError(f"pip download failed:\n{done.stderr[-3000:]}")
    (dest / ".complete").write_text("ok\n")
    return dest


if __name__ == "__main__":
    print(build())
