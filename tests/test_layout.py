"""The package's layout: no import circle between peftkit's modules.

Imports are read from the source with ``ast`` (nothing is imported), so every module
counts, whichever worker or release added it. An import inside ``if TYPE_CHECKING:`` is
for type hints only and never runs, so it is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "peftkit"

def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("peftkit", *path.relative_to(PACKAGE).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(names, inside a function?) for each import in ``tree``: the first of ``names``
    that is a module is what the import loads."""
    package = module.split(".") if is_package else module.split(".")[:-1]

    def walk(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    yield from walk(other, in_function)
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield (alias.name,), inner
            elif isinstance(child, ast.ImportFrom):
                base = package[:len(package) - child.level + 1] if child.level else []
                source = ".".join(base + ([child.module] if child.module else []))
                for alias in child.names:  # `from . import io` loads the module peftkit.io
                    yield (f"{source}.{alias.name}", source), inner
            yield from walk(child, inner)

    yield from walk(tree, False)


def import_graph(lazy: bool) -> dict[str, set[str]]:
    """peftkit module -> the peftkit modules it imports (at import time, or also inside
    functions when ``lazy``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for names, in_function in _imports(tree, module, path.name == "__init__.py"):
            name = next((n for n in names if n in modules), None)
            if name is not None and name != module and (lazy or not in_function):
                graph[module].add(name)
    # A module imports its package first (``import peftkit.formats.gguf`` runs
    # peftkit/formats/__init__.py): that edge runs downward and cannot close a circle on its
    # own, so it is not drawn; a package's own imports of its modules are.
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_package():
    graph = import_graph(lazy=True)
    assert "peftkit.formats.gguf" in graph and "peftkit.formats.atomic" in graph["peftkit.formats.adapter_folder"]
    assert "peftkit.adapter_files" in graph["peftkit.model"]  # PeftModel.save hands over to it


def test_no_import_circle_at_import_time():
    cycle = find_cycle(import_graph(lazy=False))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_circle_through_imports_inside_functions():
    cycle = find_cycle(import_graph(lazy=True))
    assert cycle is None, "import circle (counting imports inside functions): " + " -> ".join(cycle)


def test_the_file_formats_know_nothing_of_peft_models():
    """formats/ takes plain configs, facts and tensors: it imports neither the model nor
    what builds one, and atomic.py nothing of peftkit at all (a test runs it alone)."""
    graph = import_graph(lazy=True)
    formats = [m for m in graph if m.startswith("peftkit.formats")]
    for module in formats:
        outside = {m for m in graph[module] if not m.startswith("peftkit.formats")}
        assert outside <= {"peftkit.config"}, (module, outside)
    assert graph["peftkit.formats.atomic"] == set()


def test_each_method_is_declared_in_one_module():
    """A method's config class, attacher, file fields and record live in one module of
    specs/, and the registry holds each record once: adding a method is its declaration
    (beside its nn.Module in methods/) plus one line in registry.METHODS."""
    import sys

    from peftkit import registry

    assert len({m.name for m in registry.METHODS}) == len({m.peft_type for m in registry.METHODS}) == len(
        registry.METHODS)
    for method in registry.METHODS:
        module = method.config_class.__module__
        assert module.startswith("peftkit.specs."), module
        parts = [method.attach, method.to_file, method.from_file, method.settle, method.rate_for_model]
        assert {f.__module__ for f in parts if f is not None} == {module}, method.name
        assert sys.modules[module].METHOD is method


def test_method_modules_know_nothing_of_files_or_the_command_line():
    """DESIGN's house rule: methods/* import only torch, config and methods.base."""
    graph = import_graph(lazy=True)
    for module in (m for m in graph if m.startswith("peftkit.methods.")):
        assert graph[module] <= {"peftkit.config", "peftkit.methods.base", "peftkit.methods"}, (module, graph[module])
