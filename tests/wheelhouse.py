"""A local wheelhouse for test hosts that have no network: every wheel `pip install -e .` needs.

Built once with `pip download` from the project's own dependencies, at the versions this
environment runs (``pip freeze``), and cached outside the repository (``ray up`` hashes every
file under the directory it syncs, so a gigabyte of wheels there would slow every ``ray up``).
The test hosts train on CPU, so torch is the CPU build when one is available (its venv is
about 1 GB instead of the CUDA build's ~6.5 GB); ``torch<=2.14.1`` in pyproject.toml allows it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# The CPU torch on this CI image (/opt/wheels) and the torchvision built against it.
CPU_TORCH = ["torch==2.13.0+cpu", "torchvision==0.28.0"]
# Packages only the CUDA torch build pulls in: left to pip when the CPU build is used.
CUDA_ONLY = re.compile(r"^(torch|torchvision|triton|nvidia-[\w-]+|cuda-[\w-]+)==", re.IGNORECASE)


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
    key = hashlib.sha256("\n".join([*reqs, *pins, *CPU_TORCH]).encode()).hexdigest()[:16]
    dest = cache / f"wheelhouse-{key}"
    if (dest / ".complete").exists():
        return dest
    cpu_pins = [p for p in pins if not CUDA_ONLY.match(p)] + CPU_TORCH
    done = _download(dest, reqs, cpu_pins)
    if done.returncode != 0:  # no CPU torch here: the environment's own build, CUDA and all
        done = _download(dest, reqs, pins)
    if done.returncode != 0:
        raise RuntimeError(f"pip download failed:\n{done.stderr[-3000:]}")
    (dest / ".complete").write_text("ok\n")
    return dest


if __name__ == "__main__":
    print(build())
