"""The package's shape: no import cycles, and a pure-torch core.

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
CORE = ("bake", "engine", "data", "models")  # training maths and loops: no Ray, no MLflow
FOREIGN = ("ray", "mlflow", "optuna")


def _imported(node: ast.AST, modules: set[str]) -> set[str]:
    """Top-level names (``ray``, ``torch``) and package modules (``bake_ray.x`` as ``x``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
        if node.module == "bake_ray":
            names = [f"bake_ray.{alias.name}" for alias in node.names]
    else:
        return set()
    out = set()
    for name in names:
        parts = name.split(".")
        if parts[0] != "bake_ray":
            out.add(parts[0])
        elif len(parts) > 1 and parts[1] in modules:
            out.add(parts[1])
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> every name it imports (package modules by their short name)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for name in sorted(modules):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        graph[name] = set().union(*(_imported(n, modules) for n in _runtime_nodes(tree)))
    return graph


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


def test_the_package_has_no_import_cycle() -> None:
    graph = _internal(import_graph())
    assert {"train", "raytrain", "tune", "trial", "engine"} <= set(graph)
    assert "rundir" in graph["train"] and "rundir" in graph["raytrain"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_core_imports_no_ray_and_no_mlflow() -> None:
    """bake, engine, data and models stay pure torch, through every module they import."""
    graph = import_graph()
    for module in CORE:
        reached, todo = set(), [module]
        while todo:
            current = todo.pop()
            if current in reached or current not in graph:
                continue
            reached.add(current)
            todo.extend(graph[current])
        assert not reached & set(FOREIGN), (module, sorted(reached & set(FOREIGN)))


def test_backbones_and_registry_split_names_alike() -> None:
    """backbones keeps its own copy of the name rule (importing the registry closed a cycle)."""
    from bake_ray import backbones, registry

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
