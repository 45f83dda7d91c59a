"""The project's import graph, read from the source (``ast``; nothing is imported): no import cycle
among the project's modules, counting imports inside functions too, and the layering the packages
promise: ``specbeam_core`` imports neither transformers, vLLM nor an adapter; the HF adapter's library
code does not import the vLLM adapter (only the app in ``specbeam_hf.app`` may use both) and the
vLLM adapter does not import the HF adapter."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("specbeam_core", "specbeam_hf", "specbeam_vllm", "loadtests")

# Known edges that close a cycle, allowed while a rewrite removes them, as (importer, imported) pairs.
# test_known_vllm_rewrite_edges_still_exist fails on an entry the code no longer has.
KNOWN_VLLM_REWRITE: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports there never run."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _walk(node: ast.AST):
    """``ast.walk`` that skips the body of ``if TYPE_CHECKING:`` blocks (their ``else`` still runs)."""
    for child in ast.iter_child_nodes(node):
        if _type_checking_only(child):
            for other in child.orelse:
                yield other
                yield from _walk(other)
            continue
        yield child
        yield from _walk(child)


def imported_names(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports, anywhere in it (module level, functions, ``if`` blocks; not under
    ``if TYPE_CHECKING:``), relative imports resolved. ``from X import Y`` gives ``X.Y``, which
    :func:`import_graph` cuts back to ``X`` unless ``Y`` is a submodule."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            out.update(f"{source}.{alias.name}" for alias in node.names)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (the most specific module each import names)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path, name):
            while imported and imported not in modules:  # ``pkg.mod.attr`` -> ``pkg.mod``; outside -> ""
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = {t for t in targets if (name, t) not in KNOWN_VLLM_REWRITE}
    return graph


def external_imports() -> dict[str, set[str]]:
    """module -> the top-level names of everything it imports (project or not)."""
    modules = project_modules()
    return {name: {i.split(".")[0] for i in imported_names(path, name)} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "specbeam_hf.app.models" in graph["specbeam_hf.app.cli"]  # module level, relative
    assert "specbeam_hf.app.evaluation.plots" in graph["specbeam_hf.app.evaluation.runner"]  # in a function: from . import
    assert "specbeam_vllm.serve" in graph["specbeam_hf.app.cli"]  # in a function, absolute


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_imports_no_framework_and_no_adapter():
    banned = {"transformers", "vllm", "specbeam_hf", "specbeam_vllm"}
    bad = {m: sorted(names & banned) for m, names in external_imports().items()
           if m.split(".")[0] == "specbeam_core" and names & banned}
    assert not bad, f"specbeam_core must stay framework-agnostic: {bad}"


def test_adapters_library_code_does_not_import_the_other_adapter():
    graph = import_graph()
    bad = []
    for module, targets in graph.items():
        if module.startswith("specbeam_hf") and not module.startswith("specbeam_hf.app"):
            bad += [(module, t) for t in targets if t.startswith("specbeam_vllm")]
        if module.startswith("specbeam_vllm"):
            bad += [(module, t) for t in targets if t.startswith("specbeam_hf")]
    assert not bad, "adapter library code imports the other adapter: " + ", ".join(f"{a} -> {b}" for a, b in bad)


def test_known_vllm_rewrite_edges_still_exist():
    """Each allow-listed edge is still in the code (drop it from KNOWN_VLLM_REWRITE once it is gone)."""
    modules = project_modules()
    stale = []
    for source, target in sorted(KNOWN_VLLM_REWRITE):
        path = modules.get(source)
        names = imported_names(path, source) if path is not None else set()
        if not any(n == target or n.startswith(target + ".") for n in names):
            stale.append(f"{source} -> {target}")
    assert not stale, "KNOWN_VLLM_REWRITE lists edges the code no longer has: " + ", ".join(stale)
