"""The package's shape: no import cycles, and no module importing a later pipeline stage.

Read with `ast` (nothing is imported), so a lazy import inside a function counts too: a cycle
hidden in a function body is still a cycle a reader has to untangle.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "embed"

# lower layers never import higher ones; a module may import its own layer (no cycles, below)
LAYERS = [
    {"errors", "io"},
    {"runtime", "recipe", "cli"},
    {"data", "datasets"},
    {"config"},  # parse_recipe reads data.eval's folders before a stage starts
    {"modeling"},
    {"retrieval"},
    {"generation"},
    {"mining"},
    {"training"},
    {"evaluation"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "embed":
                for alias in node.names:  # `from embed import datasets` names a module
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == "embed")
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer of LAYERS (add it)")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_no_module_imports_a_later_stage():
    graph = import_graph()
    bad = [f"{m} imports {t}" for m, targets in graph.items() if m != "embed" for t in targets
           if t != "embed" and layer(t) > layer(m)]
    assert not bad, bad


def test_the_checks_catch_what_they_look_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("embed.generation.generator") > layer("embed.retrieval.bm25_index")
    with pytest.raises(AssertionError):
        layer("embed.nowhere")
