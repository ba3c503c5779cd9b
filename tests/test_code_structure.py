"""The shape of the code: no import circles between solq's modules (architecture guide: a module two others
need goes below both)."""
import ast
from pathlib import Path

import solq

ROOT = Path(solq.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """solq module -> the solq modules it imports (anywhere in the file, lazy imports included)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t not in files and "." in t:
                    t = t.rsplit(".", 1)[0]
                # a package and its own submodules are one unit (an __init__ re-exports its parts)
                if t in files and t != mod and not (t.startswith(mod + ".") or mod.startswith(t + ".")):
                    edges[mod].add(t)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles_between_solq_modules():
    edges = _imports()
    assert "solq.engine.runtime" in edges["solq.engine.train"]  # the graph sees real imports
    assert _cycles(edges) == []


def test_lower_layers_never_import_the_tools_built_on_them():
    # data, coding, models and engine serve viz, workbench and the CLI, never the other way round
    lower = ("solq.data", "solq.coding", "solq.models", "solq.engine", "solq.evaluation", "solq.config")
    upper = ("solq.viz", "solq.workbench", "solq.cli")
    upward = sorted((a, b) for a, bs in _imports().items() if a.startswith(lower)
                    for b in bs if b.startswith(upper))
    assert upward == []
