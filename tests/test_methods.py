"""Tests for the layout of the methods: one folder each, one registry, a library that knows none
of them, and no import cycle in the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from spinflow import graph as graph_module
from spinflow.config import Params, default_params_dict, validate_params
from spinflow.methods import registry
from spinflow.nodes import DATA_DIR, Stage, train_metrics

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "spinflow"
# the only modules outside the method folders that import them: the params schema puts the
# methods' sections together, the graph runs the registry
METHOD_IMPORTERS = {"spinflow.config", "spinflow.graph"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path) -> set[str]:
    """Modules of the package ``path`` imports when it runs: at module level or in a function,
    but not under ``if TYPE_CHECKING`` (annotations only)."""
    module = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if path.name == "__init__.py" else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if _file(name) is not None and name != module}


def _file(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _modules() -> dict[str, set[str]]:
    return {_module_name(p): _runtime_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_registered_method_has_its_folder_and_its_params_section():
    names = [method.name for method in registry.METHODS]
    assert names == ["sft", "lobass", "spin", "autoif"]
    for name in names:
        folder = PACKAGE / "methods" / name
        assert (folder / "graph.py").is_file() and (folder / "params.py").is_file(), name
        section = Params.model_fields[name].annotation
        assert section.__module__ == f"spinflow.methods.{name}.params", name
    for method in registry.METHODS:
        if method.report is not None:
            assert method.report == f"spinflow.methods.{method.name}.report"
            assert _file(method.report) is not None


def test_the_shared_library_imports_no_method():
    for module, imports in _modules().items():
        if module.startswith("spinflow.methods") or module in METHOD_IMPORTERS:
            continue
        into_methods = sorted(name for name in imports if name.startswith("spinflow.methods"))
        assert not into_methods, f"{module} imports {into_methods}"


def test_the_package_has_no_import_cycle():
    """Imports inside functions count: a cycle hidden in a function is still a cycle."""
    modules = _modules()

    def edges(module: str) -> set[str]:
        # importing a.b.c runs the package a.b first: that is not an import of it by a.b.c
        return {m for m in modules[module] if not module.startswith(m + ".")}

    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges(module)):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in modules:
        if module not in state:
            visit(module, [module])


def test_a_method_is_added_by_its_registry_entry_alone(monkeypatch):
    """A method that declares one stage appears in the graph once registered, between the
    methods registered before and after it, and its report params reach the report stage."""

    def declare(graph):
        graph.add(
            Stage(
                "echo_count",
                "echo_count",
                (str(DATA_DIR),),
                ("seed",),
                metrics=(str(train_metrics("echo_count")),),
            )
        )

    echo = registry.Method("echo", declare, lambda p: True, ("seed",))
    methods = list(registry.METHODS)
    methods.insert(3, echo)  # after spin, before autoif
    monkeypatch.setattr(graph_module, "METHODS", tuple(methods))
    params = validate_params(default_params_dict())
    graph = graph_module.build(params)
    names = list(graph.stages)
    assert names.index("echo_count") == names.index("eval_sft_extra") + 1
    assert "seed" in graph.stage("report").params


def test_the_report_stage_loads_only_the_sections_of_the_methods_that_run():
    raw = default_params_dict()
    stage = graph_module.build(validate_params(raw)).stage("report")
    assert stage.code == ("spinflow.methods.spin.report",)
    raw["lobass"]["enabled"] = True
    raw["autoif"]["enabled"] = True
    stage = graph_module.build(validate_params(raw)).stage("report")
    assert stage.code == (
        "spinflow.methods.lobass.report",
        "spinflow.methods.spin.report",
        "spinflow.methods.autoif.report",
    )
