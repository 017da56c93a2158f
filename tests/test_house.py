"""The house rules, checked on the source tree: no import cycles inside `engine/`, methods and
analyses independent of where checkpoints come from (nothing from the zoo package), and a
repository that never points outside itself for how things work."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast
REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "engine"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def engine_imports(path: Path) -> set[str]:
    """Every engine module `path` imports (at any depth of the file), resolved to dotted names."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "engine"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "engine":
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import figures` names a module
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ENGINE.rglob("*.py")}
    return {name: {m for m in engine_imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_engine_has_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodules is not a cycle
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    raise AssertionError("import cycle: " + " -> ".join(cycle))
            elif state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("package", ["engine.methods", "engine.analysis"])
def test_methods_and_analyses_never_import_the_zoo(package):
    edges = graph()
    offenders = {m: sorted(i for i in deps if i.startswith("engine.zoo"))
                 for m, deps in edges.items() if m.startswith(package)}
    assert not {m: d for m, d in offenders.items() if d}


def test_nothing_outside_docs_points_outside_the_repository():
    pattern = re.compile(r"\.\./shared|methods\.md §")
    files = [p for p in REPO.rglob("*") if p.suffix in (".py", ".md", ".toml", ".sh", ".txt") and p.is_file()
             and not any(part in (".venv", "docs", "test-artifacts", ".git", ".zoo", "__pycache__")
                         for part in p.relative_to(REPO).parts)
             and p != Path(__file__)]
    hits = [f"{p.relative_to(REPO)}:{i}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
