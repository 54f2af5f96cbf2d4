"""The package reads as a reference: no import cycles (lazy imports included), every file short and
opening with a docstring that names what it implements, and the documents the code cites exist."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "tinyinfer"
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every tinyinfer module `name` imports, at any depth of the file (function bodies included, so a
    lazy import cannot hide a cycle). `from a import b` names module a.b when it is one, else a. The
    parent packages a submodule import runs first count too, except the importer's own packages."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                               # relative import
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            if not t.startswith("tinyinfer"):
                continue
            parts = t.split(".")
            for i in range(2, len(parts) + 1):           # tinyinfer.a, tinyinfer.a.b, ...
                mod = ".".join(parts[:i])
                own_package = name == mod or name.startswith(mod + ".")
                if mod in known and mod != name and (i == len(parts) or not own_package):
                    out.add(mod)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    mods = modules()
    graph = {name: imports_of(path, name, set(mods)) for name, path in mods.items()}
    assert len(graph) > 40 and sum(map(len, graph.values())) > 80, "the import walk found too little"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_a_lazy_import_counts_as_an_import(tmp_path):
    pkg = tmp_path / "tinyinfer"
    pkg.mkdir()
    src = pkg / "x.py"
    src.write_text("def f():\n    from tinyinfer.y import z\n")
    assert imports_of(src, "tinyinfer.x", {"tinyinfer.x", "tinyinfer.y"}) == {"tinyinfer.y"}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_each_module_is_short_and_opens_with_a_docstring(path: Path):
    text = path.read_text()
    assert text.count("\n") <= MAX_LINES, f"{path.name}: {text.count(chr(10))} lines > {MAX_LINES}"
    doc = ast.get_docstring(ast.parse(text))
    assert doc and len(doc) > 40, f"{path}: no docstring naming the technique it implements"


def test_documents_cited_in_the_code_exist():
    cited = set()
    for path in list(PACKAGE.rglob("*.py")) + [p for p in (REPO / "cuda").rglob("*") if p.is_file()] + [
            REPO / "README.md"]:
        cited |= set(re.findall(r"\b((?:docs|cuda)/[\w.-]+\.md)\b", path.read_text(errors="replace")))
        assert not re.search(r"\b(ARCHITECTURE|GPU-CHECK|METHOD|HOPPER)\.md\b", path.read_text(
            errors="replace")), f"{path} cites a document that is not in the repository"
    missing = sorted(c for c in cited if not (REPO / c).is_file())
    assert not missing, f"cited but missing: {missing}"
