"""The package's layers, read from its source: imports go one way (type-only imports included), and
the task seam is closed (config.py and commands/ never name a task).

    python -m pytest -q tests/test_layers.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

PACKAGE = Path(__file__).resolve().parent.parent / "distributed_tune"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (TYPE_CHECKING blocks too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distributed_tune"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("distributed_tune")}
        # a package's own __init__ is imported with any of its modules: not an edge
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(f"{d}.")}
    return graph


def test_no_import_cycle_not_even_for_type_hints() -> None:
    graph, done, cycles = import_graph(), set(), []

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])
    assert not cycles, cycles
    assert "distributed_tune.config" in graph["distributed_tune.model"]  # the walk reads real imports


def test_the_layers_go_as_the_readme_says() -> None:
    graph = import_graph()
    tasks = [m for m in graph if m.startswith("distributed_tune.tasks")]
    assert "distributed_tune.tasks" in graph["distributed_tune.config"]
    for m in tasks:  # tasks sit below config: they declare their options with keys.key
        assert not {d for d in graph[m] if d.startswith(("distributed_tune.config", "distributed_tune.commands"))}, m
    assert graph["distributed_tune.keys"] == set()
    library = [m for m in graph if not m.startswith(("distributed_tune.commands", "distributed_tune.cli"))]
    for m in library:
        assert not {d for d in graph[m] if d.startswith("distributed_tune.commands")}, m


def test_config_and_commands_never_name_a_task() -> None:
    from distributed_tune.tasks import NAMES

    for path in [PACKAGE / "config.py", *sorted((PACKAGE / "commands").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:  # the seam (tasks, tasks.base), never a task module
                assert node.module in ("distributed_tune.tasks", "distributed_tune.tasks.base") or \
                    not node.module.startswith("distributed_tune.tasks"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Compare):  # task.name == "custom" and the like
                names = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                assert not set(names) & set(NAMES), f"{path.name}:{node.lineno} compares with a task name"


def test_a_task_section_is_built_from_the_task_registry() -> None:
    from distributed_tune.config import FORMER_NAMES, KEYS, load_config
    from distributed_tune.tasks import SECTIONS

    assert set(SECTIONS) == {"custom"}
    assert [k for k in KEYS if k.startswith("custom.")] == [f"custom.{f}" for f in (
        "train_file", "validation_file", "test_file", "text_fields", "label_field", "regression")]
    # a run directory's config.yaml from before the move still means what it meant
    assert FORMER_NAMES["data.train_file"] == "custom.train_file"
    old = load_config(None, ["task=custom", "data.train_file=a.csv", "data.validation_file=b.csv",
                             "data.text_fields=[s]", "data.regression=true"])
    assert old.custom.train_file == "a.csv" and old.task_spec.regression
    assert old.task_spec.metrics == ("pearson", "spearman") and old.task_spec.text_fields == ("s",)
