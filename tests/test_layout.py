"""The package's shape, as docs/ARCHITECTURE.md states it: five parts on four levels, each
importing only the parts below it, no import cycle, Ray/MLflow/Optuna only where their part
allows, no module reaching into another's private names, no module over 400 lines.

The graph is read from the source (``ast``), imports inside functions included: a lazy
import that closes a cycle still ties the two modules together, it only hides it at start-up.
Imports under ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bake_ray"
FOREIGN = ("ray", "mlflow", "optuna")
MAX_LINES = 400

#: part -> the parts it may import (itself included). The levels of docs/ARCHITECTURE.md:
#: core (1); tracking, scale (2); tune, train (3); compare (4); the Python API over all
#: three commands (5); the ready entry shim.
MAY_IMPORT = {
    "core": {"core"},
    "tracking": {"core", "tracking"},
    "scale": {"core", "scale"},
    "tune": {"core", "tracking", "scale", "tune"},
    "train": {"core", "tracking", "scale", "train"},
    "compare": {"core", "tracking", "scale", "tune", "compare"},
    "ready": {"scale", "ready"},
    "api": {"core", "tracking", "scale", "tune", "train", "compare", "api"},
}
#: part -> the foreign frameworks it may import: MLflow only in tracking, Optuna only in
#: the search, Ray in the parts that run on a cluster; the core none of them.
MAY_USE = {
    "core": set(),
    "tracking": {"mlflow"},
    "scale": {"ray"},
    "tune": {"ray", "optuna"},
    "train": set(),
    "compare": {"ray"},
    "ready": set(),
    "api": set(),
}


def module_files() -> dict[str, Path]:
    """``core.config`` -> its file, for every module of the package (``__init__`` as the
    package's own name, ``__main__`` left out: it only calls ``cli.main``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__main__" or parts == ["__init__"]:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def part_of(module: str) -> str:
    return module.split(".")[0]


def _imported(node: ast.AST, modules: set[str]) -> set[str]:
    """Top-level foreign names (``ray``, ``torch``) and package modules (``core.config``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
        if node.module.startswith("bake_ray"):
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    else:
        return set()
    out = set()
    for name in names:
        parts = name.split(".")
        if parts[0] != "bake_ray":
            out.add(parts[0])
        elif (inner := ".".join(parts[1:])) in modules:
            out.add(inner)
    return out


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, but not under ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """module -> every name it imports (package modules by their dotted name below
    ``bake_ray``; a package's ``__init__`` imported by a submodule is not an edge)."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        deps = set().union(*(_imported(n, set(files)) for n in _runtime_nodes(tree)))
        graph[name] = {d for d in deps if not name.startswith(f"{d}.")}
    return graph


def _internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_find_cycle_finds_one() -> None:
    """The checker itself: a two-module loop and a self-import are both reported."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_reader_sees_the_layout() -> None:
    """The checker reads what is there: submodules by dotted name, lazy imports included."""
    graph = _internal(import_graph())
    assert {"core.config", "tune.cli", "tune.search", "compare.cli", "train"} <= set(graph)
    assert "core.rundir" in graph["train"] and "core.rundir" in graph["scale.raytrain"]
    assert "tune.search" in graph["tune.cli"]


def test_every_module_belongs_to_a_part_with_a_rule() -> None:
    unknown = sorted(m for m in module_files() if part_of(m) not in MAY_IMPORT)
    assert not unknown, f"modules outside the parts of docs/ARCHITECTURE.md: {unknown}"


def test_the_package_has_no_import_cycle() -> None:
    graph = _internal(import_graph())
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_each_part_imports_only_the_parts_below_it() -> None:
    graph = _internal(import_graph())
    wrong = [
        f"{module} -> {dep}"
        for module, deps in sorted(graph.items())
        for dep in sorted(deps)
        if part_of(dep) not in MAY_IMPORT[part_of(module)]
    ]
    assert not wrong, wrong


def test_ray_mlflow_and_optuna_only_where_their_part_allows() -> None:
    wrong = [
        f"{module} imports {name}"
        for module, deps in sorted(import_graph().items())
        for name in sorted(deps & set(FOREIGN))
        if name not in MAY_USE[part_of(module)]
    ]
    assert not wrong, wrong


def test_the_core_reaches_no_ray_mlflow_or_optuna() -> None:
    """Through every module it imports, not only its own lines."""
    graph = import_graph()
    for module in (m for m in graph if part_of(m) == "core"):
        reached, todo = set(), [module]
        while todo:
            current = todo.pop()
            if current in reached:
                continue
            reached.add(current)
            todo.extend(graph.get(current, ()))
        assert not reached & set(FOREIGN), (module, sorted(reached & set(FOREIGN)))


def test_no_module_imports_another_modules_private_names() -> None:
    files = module_files()
    wrong = []
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bake_ray"):
                wrong += [f"{name}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_")]  # fmt: skip
    assert not wrong, wrong


def test_no_module_is_over_400_lines() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in module_files().items()}
    long = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not long, long


def test_the_rules_are_the_ones_the_architecture_doc_states() -> None:
    """docs/ARCHITECTURE.md's rule table lists each part with what it may import."""
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    for part, allowed in MAY_IMPORT.items():
        below = ", ".join(sorted(allowed - {part})) or "nothing"
        uses = ", ".join(sorted(MAY_USE[part])) or "none"
        assert f"| `{part}` | {below} | {uses} |" in doc, part


def test_backbones_and_registry_split_names_alike() -> None:
    """backbones keeps its own copy of the name rule (importing the registry closed a cycle)."""
    from bake_ray.core import backbones, registry

    assert set(backbones.LIBRARY_BUILDERS) == set(registry.LIBRARIES)
    for name in ("timm/resnet18.a1_in1k", "torchvision/resnet18", "resnet18", "other/x", "a/b/c"):
        assert backbones.split_name(name) == registry.split_name(name), name


def _console_scripts() -> dict[str, str]:
    import tomllib

    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    return dict(pyproject["project"]["scripts"])


def test_console_scripts_are_declared() -> None:
    assert set(_console_scripts()) >= {"bake-train", "bake-tune", "bake-compare"}


@pytest.mark.parametrize("script", sorted(_console_scripts()))
def test_console_script_entry_answers_help(script: str, capsys: pytest.CaptureFixture) -> None:
    """What ``pip install`` turns into ``.venv/bin/<script>`` calls ``module:function()``:
    each one imports and prints its help (exit 0), as the ``python -m`` form does."""
    module, function = _console_scripts()[script].split(":")
    if not (PACKAGE.parent / (module.replace(".", "/") + ".py")).is_file():
        pytest.skip(f"{module} is not in this checkout")
    entry = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as done:
        entry(["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
