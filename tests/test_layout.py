"""The package reads as a reference: every import goes down the layer table of docs/architecture.md (lazy
imports included; the test reads the table, so docs and code cannot drift), no import cycle inside a
layer, the runtime package never imports the development tools, every file short and opening with a
docstring that names what it implements, and every name the code and the docs cite exists: `ops.X`,
`tinyinfer.x.y` / `tools.x` paths, repository files, `module/file.name` attributes."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "tinyinfer"
TOOLS = REPO / "tools"
ARCHITECTURE = REPO / "docs" / "architecture.md"
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


def declared_layers(text: str) -> list[set[str]]:
    """The rows of the table under "## Layers" in docs/architecture.md, highest first: each row the set
    of units (`engine/`, `cli.py`, ...) named in backticks in its first column."""
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return [set(re.findall(r"`([^`]+)`", first)) for first in rows]


def unit_of(module: str) -> str:
    """The layer unit a module belongs to: its top-level package (`engine/`) or module (`cli.py`)."""
    parts = module.split(".")[1:]
    if not parts:
        return "__init__.py"
    return parts[0] + "/" if (PACKAGE / parts[0]).is_dir() else parts[0] + ".py"


def order_violations(graph: dict[str, set[str]], layers: list[set[str]], unit=unit_of) -> list[str]:
    """Every edge a -> b of the import graph where b's unit is not a's own and not in a row below a's."""
    rank = {u: i for i, row in enumerate(layers) for u in row}          # 0 = the top row
    bad = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            ua, ub = unit(a), unit(b)
            if ua != ub and rank[ub] <= rank[ua]:
                bad.append(f"{a} ({ua}) imports {b} ({ub}), which is not below it")
    return bad


def test_every_unit_of_the_package_is_declared_once_in_the_layer_table():
    layers = declared_layers(ARCHITECTURE.read_text())
    declared = [u for row in layers for u in row]
    assert len(layers) >= 10 and len(declared) == len(set(declared)), f"a unit is declared twice: {layers}"
    units = {unit_of(m) for m in modules()}
    assert units == set(declared), (f"not in docs/architecture.md's layer table: {sorted(units - set(declared))}; "
                                    f"declared but absent: {sorted(set(declared) - units)}")


def test_every_import_goes_down_the_declared_layers():
    mods = modules()
    graph = {name: imports_of(path, name, set(mods)) for name, path in mods.items()}
    bad = order_violations(graph, declared_layers(ARCHITECTURE.read_text()))
    assert not bad, "imports against the layer order of docs/architecture.md:\n" + "\n".join(bad)


def test_the_order_check_finds_a_planted_upward_import():
    layers = [{"top.py"}, {"mid/", "peer/"}, {"low/"}]
    unit = {"t": "top.py", "m": "mid/", "m2": "mid/", "p": "peer/", "l": "low/"}.__getitem__
    assert order_violations({"t": {"m", "l"}, "m": {"m2", "l"}, "l": set()}, layers, unit) == []
    assert order_violations({"l": {"m"}}, layers, unit) == ["l (low/) imports m (mid/), which is not below it"]
    assert len(order_violations({"m": {"p"}, "m2": {"t"}}, layers, unit)) == 2      # a peer, then upward
    table = "\n## Layers\n\n| layer | owns |\n| --- | --- |\n| `top.py` | x |\n| `mid/`, `peer/` | y |\n## Next\n"
    assert declared_layers(table) == [{"top.py"}, {"mid/", "peer/"}]


def test_the_runtime_package_never_imports_the_tools():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n == "tools" or n.startswith("tools.") for n in names), f"{path} imports {names}"


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


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")) + sorted(TOOLS.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_each_module_is_short_and_opens_with_a_docstring(path: Path):
    text = path.read_text()
    assert text.count("\n") <= MAX_LINES, f"{path.name}: {text.count(chr(10))} lines > {MAX_LINES}"
    doc = ast.get_docstring(ast.parse(text))
    assert doc and len(doc) > 40, f"{path}: no docstring naming the technique it implements"


def test_documents_cited_in_the_code_exist():
    cited = set()
    for path in list(PACKAGE.rglob("*.py")) + list(TOOLS.rglob("*.py")) + [p for p in (REPO / "cuda").rglob("*") if p.is_file()] + [
            REPO / "README.md"]:
        cited |= set(re.findall(r"\b((?:docs|cuda)/[\w.-]+\.md)\b", path.read_text(errors="replace")))
        assert not re.search(r"\b(ARCHITECTURE|GPU-CHECK|METHOD|HOPPER)\.md\b", path.read_text(
            errors="replace")), f"{path} cites a document that is not in the repository"
    missing = sorted(c for c in cited if not (REPO / c).is_file())
    assert not missing, f"cited but missing: {missing}"


# ------------------------------------------------------------------------------------------------
# Every cited name exists
# ------------------------------------------------------------------------------------------------

SUBPACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
ROOT_DIRS = ("cuda", "cpu", "docs", "tinyinfer", "tools", "tests", "models", "data")
DOTTED = re.compile(r"(?<![\w.\-/])((?:tinyinfer|tools)(?:\.[A-Za-z_]\w*)+)")
OPS = re.compile(r"(?<![\w./\-])ops((?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(r"(?<![\w./\-])((?:%s)/[\w./\-]*[\w/])(?![*<{\w])" % "|".join(
    sorted(set(ROOT_DIRS) | set(SUBPACKAGES) | {"bench"})))
FILE_SUFFIXES = (".py", ".md", ".cpp", ".h", ".cu", ".cuh")


def citing_files() -> list[Path]:
    """The code, error messages, README and docs that name modules, ops and files (this test's own
    planted names aside)."""
    files = [*PACKAGE.rglob("*.py"), *TOOLS.rglob("*.py"), *(REPO / "tests").rglob("*.py"),
             *(REPO / "docs").glob("*.md"), REPO / "README.md", REPO / "Makefile", REPO / "setup.py"]
    files += [p for d in ("cuda", "cpu", "tests/host") for p in (REPO / d).rglob("*")
              if p.suffix in FILE_SUFFIXES]
    return sorted(set(files) - {Path(__file__).resolve()})


def resolves(dotted: str) -> bool:
    """`a.b.c`: the longest importable module prefix, then attributes; or a custom op's name
    (`tinyinfer.rms_norm`, how the profiler names torch.ops.tinyinfer.rms_norm)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                break
            obj = getattr(obj, attr)
        else:
            return True
        break
    if parts[0] == "tinyinfer" and len(parts) == 2:
        import torch
        importlib.import_module("tinyinfer.ops")
        return hasattr(torch.ops.tinyinfer, parts[1])
    return False


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def path_resolves(cited: str) -> bool:
    """A repository path (`cuda/x.cu`), a package-relative one (`engine/x.py`, `bench/x.py`), or a
    module's name in one (`engine/cuda_graphs.GraphRunner`: the file defines GraphRunner)."""
    cited = cited.rstrip(".")
    first = cited.split("/")[0]
    roots = ([REPO] if first in ROOT_DIRS else []) + ([PACKAGE] if first in SUBPACKAGES else []) + (
        [TOOLS] if first == "bench" else [])
    if any((r / cited).exists() for r in roots):
        return True
    head, _, tail = cited.rpartition("/")
    module, _, attr = tail.partition(".")
    return bool(attr) and any((r / head / f"{module}.py").is_file() and attr.split(".")[0] in
                              top_level_names(r / head / f"{module}.py") for r in roots)


def dangling_names(text: str) -> list[str]:
    bad = [m.group(1) for m in DOTTED.finditer(text) if not m.group(1).endswith(FILE_SUFFIXES)
           and not resolves(m.group(1))]
    bad += ["ops" + m.group(1) for m in OPS.finditer(text) if not m.group(1).endswith(FILE_SUFFIXES)
            and not resolves("tinyinfer.ops" + m.group(1))]
    return bad + [m.group(1) for m in PATH.finditer(text) if not path_resolves(m.group(1))]


def test_every_cited_module_op_and_file_exists():
    texts = {path: path.read_text(errors="replace") for path in citing_files()}
    found = sum(len(rx.findall(t)) for t in texts.values() for rx in (DOTTED, OPS, PATH))
    assert found > 800, f"the scan found only {found} cited names"          # ~1200 at the time of writing
    bad = {f"{path.relative_to(REPO)}: {name}" for path, text in texts.items() for name in dangling_names(text)}
    assert not bad, "cited but missing:\n" + "\n".join(sorted(bad))


def test_the_cited_name_check_finds_planted_dangling_names():
    text = ("calls ops.rms_norm_reference and ops.rms_norm; python -m tinyinfer.no_such_module or "
            "tinyinfer.ops.reference.paged_attention; see cuda/int4_gemv.cu, cuda/NOTES.md, "
            "engine/sequence.Sequence, engine/sequence.NoSuchThing, tests/host/emulate_<name>.cpp")
    assert set(dangling_names(text)) == {"ops.rms_norm_reference", "tinyinfer.no_such_module",
                                         "cuda/int4_gemv.cu", "engine/sequence.NoSuchThing"}
