"""The project's import graph: no cycles, and a framework-free model package.

Every module of the project packages is parsed with `ast` (nothing is imported). An edge
A -> B means module A imports module B *anywhere*: at module level, inside a function or a
method (a lazy import is still a dependency: `model.py` lazily importing `blt/ushape.py`
while ushape imports model at the top is a cycle, just one that happens to load in the
right order today), in a `try:` block, or as `importlib.import_module("literal")`.
Imports under `if TYPE_CHECKING:` are left out: they never run.

Resolution:
  * relative imports (`from . import x`, `from ..pkg import y`) against the importing
    module's package (a package's `__init__` is its own package);
  * `from pkg import name` is an edge to the submodule `pkg.name` when that module exists,
    else to `pkg` itself (`name` is then an attribute of `pkg/__init__.py`);
  * `import a.b.c` is an edge to the deepest project module of `a.b.c`;
  * importing a submodule also runs its parent packages' `__init__`, but that is not
    counted as an edge (otherwise every package that imports its own submodules would be
    a cycle).

A cycle is a strongly connected component of more than one module; every one is listed,
with the import lines that close it.

Imports only go down: launch -> megatron_adapters / data_tools -> hyena_glt. `FORBIDDEN`
lists, for every package, the project packages it must not import (lazy imports included);
each offending import is named by module, target and file:line.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("hyena_glt", "megatron_adapters", "data_tools", "launch")
MODEL_PACKAGE = "hyena_glt"
FRAMEWORKS = ("megatron", "deepspeed")
# package -> the project packages it must not import: imports only go down
# (launch -> megatron_adapters / data_tools -> hyena_glt).
FORBIDDEN = {
    "hyena_glt": ("data_tools", "launch", "megatron_adapters"),
    "data_tools": ("launch", "megatron_adapters"),
    "megatron_adapters": ("launch", "data_tools"),
    "launch": (),
}


# ---------------------------------------------------------------------------- the graph


def discover_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `packages` under `root`."""
    modules: dict[str, Path] = {}
    for pkg in packages:
        base = root / pkg
        if not (base / "__init__.py").is_file():
            raise FileNotFoundError(f"{base} is not a package (no __init__.py)")
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST):
    """ast.walk, minus the bodies of `if TYPE_CHECKING:` (their `else:` still runs)."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        if isinstance(n, ast.If) and _is_type_checking(n.test):
            stack.extend(n.orelse)
            continue
        stack.extend(ast.iter_child_nodes(n))


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    package = module if is_package else module.rpartition(".")[0]
    parts = package.split(".") if package else []
    if level > len(parts):
        raise ImportError(f"{module}: relative import beyond the top-level package (level {level})")
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{name}" if name else base


def _deepest(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported dotted name, line) for every import in `module`, resolved: project
    modules by their module name, anything else by its full dotted name."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, int]] = []

    def target(name: str) -> str:
        return _deepest(name, modules) or name

    for node in _walk(tree):
        if isinstance(node, ast.Import):
            found += [(target(a.name), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if alias.name != "*" and sub in modules:
                    found.append((sub, node.lineno))  # `from pkg import submodule`
                else:
                    found.append((target(base), node.lineno))
        elif isinstance(node, ast.Call):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if fname == "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                name = node.args[0].value
                if name.startswith("."):
                    level = len(name) - len(name.lstrip("."))
                    name = _resolve_relative(module, is_package, level, name.lstrip(".") or None)
                found.append((target(name), node.lineno))
    return found


def build_graph(root: Path, packages=PACKAGES):
    """(modules, edges): edges[A] = {B: [line, ...]} for project modules A -> B (A != B),
    and external[A] = {dotted name: [line, ...]} for everything else A imports."""
    modules = discover_modules(root, packages)
    edges: dict[str, dict[str, list[int]]] = {m: {} for m in modules}
    external: dict[str, dict[str, list[int]]] = {m: {} for m in modules}
    for m, path in modules.items():
        for name, line in imports_of(m, path, modules):
            if name in modules:
                if name != m:
                    edges[m].setdefault(name, []).append(line)
            else:
                external[m].setdefault(name, []).append(line)
    return modules, edges, external


def strongly_connected_components(edges: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components sorted, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, {})))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return sorted(out)


def find_cycles(edges) -> list[list[str]]:
    return [c for c in strongly_connected_components(edges) if len(c) > 1]


def describe_cycles(cycles, edges, modules, root: Path) -> str:
    lines = []
    for comp in cycles:
        lines.append(f"cycle of {len(comp)} modules: {', '.join(comp)}")
        members = set(comp)
        for a in comp:
            for b, at in sorted(edges[a].items()):
                if b in members:
                    where = ", ".join(f"{modules[a].relative_to(root)}:{n}" for n in sorted(set(at)))
                    lines.append(f"    {a} -> {b}  ({where})")
    return "\n".join(lines)


def framework_imports(root: Path, package: str, modules, edges, external, frameworks=FRAMEWORKS) -> list[str]:
    """Every way a module of `package` reaches a framework: directly, or through any chain
    of project imports (lazy ones included), e.g. hyena_glt -> megatron_adapters -> megatron."""
    problems = []
    for start in sorted(m for m in modules if m == package or m.startswith(package + ".")):
        parent = {start: None}
        queue = [start]
        while queue:
            m = queue.pop(0)
            for name, at in sorted(external[m].items()):
                if name.split(".")[0] in frameworks:
                    chain, x = [], m
                    while x is not None:
                        chain.append(x)
                        x = parent[x]
                    via = " -> ".join(reversed(chain))
                    problems.append(f"{start} imports {name} via {via} ({modules[m].relative_to(root)}:{min(at)})")
            for nxt in sorted(edges[m]):
                if nxt not in parent:
                    parent[nxt] = m
                    queue.append(nxt)
    return problems


def package_of(module: str) -> str:
    return module.split(".")[0]


def upward_imports(root: Path, modules, edges, forbidden=FORBIDDEN, package: str | None = None) -> list[str]:
    """Every import of a module of package P (of `package` only, if given) into a package
    that `forbidden[P]` lists, as `importer -> imported  (file:line, ...)`."""
    problems = []
    for m in sorted(modules):
        if package is not None and package_of(m) != package:
            continue
        banned = forbidden.get(package_of(m), ())
        for target, at in sorted(edges[m].items()):
            if package_of(target) in banned:
                where = ", ".join(f"{modules[m].relative_to(root)}:{n}" for n in sorted(set(at)))
                problems.append(f"{m} -> {target}  ({where})")
    return problems


# ---------------------------------------------------------------------------- the project


@pytest.fixture(scope="module")
def graph():
    return build_graph(REPO)


def test_no_import_cycles(graph):
    modules, edges, _ = graph
    cycles = find_cycles(edges)
    assert not cycles, "import cycles (lazy imports included):\n" + describe_cycles(cycles, edges, modules, REPO)


def test_model_package_is_framework_free(graph):
    modules, edges, external = graph
    problems = framework_imports(REPO, MODEL_PACKAGE, modules, edges, external)
    assert not problems, f"{MODEL_PACKAGE} must not import {' or '.join(FRAMEWORKS)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_only_go_down(graph, package):
    modules, edges, _ = graph
    problems = upward_imports(REPO, modules, edges, package=package)
    assert not problems, (f"{package} must not import {', '.join(FORBIDDEN[package])} "
                          "(imports only go down: launch -> megatron_adapters / data_tools -> hyena_glt):\n  "
                          + "\n  ".join(problems))


def test_every_package_has_its_direction():
    assert set(FORBIDDEN) == set(PACKAGES)
    for package, banned in FORBIDDEN.items():
        assert package not in banned and set(banned) <= set(PACKAGES), package


def test_the_graph_sees_the_whole_project(graph):
    modules, edges, _ = graph
    assert {"hyena_glt", "hyena_glt.model", "launch.cli", "data_tools.loader", "megatron_adapters"} <= set(modules)
    assert any(m.startswith("hyena_glt.") for m in edges["hyena_glt.model"])  # relative imports
    assert "hyena_glt.alphabet" in edges["data_tools.windows"]  # absolute imports across packages
    assert any(edges[m] for m in modules if m.startswith("launch."))


def test_benchmarks_live_in_launch_bench(graph):
    modules, _, _ = graph
    stray = [m for m in modules if "bench" in m.rsplit(".", 1)[-1] and not m.startswith("launch.bench")]
    assert not stray, f"benchmark modules outside launch/bench/: {stray}"


# ---------------------------------------------------------------------------- the checker itself


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_finds_lazy_relative_and_submodule_cycles(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .a import f\nfrom . import sub\n",  # a package importing its own parts: no cycle
        # a <-> b: b imports a at the top, a imports b only inside a function (lazily).
        "pkg/a.py": "def f():\n    from . import b\n    return b.g()\n",
        "pkg/b.py": "from pkg.a import f\n\ndef g():\n    return 1\n",
        # c -> sub.d (`from .sub import d`, d a submodule) -> e (`from .. import e`) -> c (importlib).
        "pkg/c.py": "from .sub import d\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "from .. import e\n",
        "pkg/e.py": "import importlib\n\ndef load():\n    return importlib.import_module('pkg.c')\n",
        # f -> g and g -> f only under TYPE_CHECKING: never runs, not a cycle.
        "pkg/f.py": "from . import g\n",
        "pkg/g.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import f\n",
        # `from pkg.sub import nothing_module` is an edge to pkg.sub (its __init__), and
        # `import pkg.sub.d` an edge to pkg.sub.d.
        "pkg/h.py": "from pkg.sub import something\nimport pkg.sub.d\n",
        "other/__init__.py": "",
        "other/x.py": "def run():\n    import megatron.core\n",
        "pkg/model.py": "def build():\n    from other import x\n",
    })
    modules, edges, external = build_graph(tmp_path, ("pkg", "other"))
    assert set(edges["pkg.a"]) == {"pkg.b"} and set(edges["pkg.b"]) == {"pkg.a"}
    assert set(edges["pkg.c"]) == {"pkg.sub.d"} and set(edges["pkg.sub.d"]) == {"pkg.e"}
    assert set(edges["pkg.e"]) == {"pkg.c"} and set(edges["pkg.g"]) == set()
    assert set(edges["pkg.h"]) == {"pkg.sub", "pkg.sub.d"}
    assert set(edges["pkg"]) == {"pkg.a", "pkg.sub"}
    cycles = find_cycles(edges)
    assert cycles == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.e", "pkg.sub.d"]]
    text = describe_cycles(cycles, edges, modules, tmp_path)
    assert "pkg.a -> pkg.b  (pkg/a.py:2)" in text and "pkg.e -> pkg.c  (pkg/e.py:4)" in text
    problems = framework_imports(tmp_path, "pkg", modules, edges, external)
    assert problems == ["pkg.model imports megatron.core via pkg.model -> other.x (other/x.py:2)"], problems


def test_checker_finds_upward_imports(tmp_path):
    _write(tmp_path, {
        "low/__init__.py": "",
        "low/core.py": "import os\n\ndef f():\n    from high.app import run  # lazy, still upward\n",
        "low/ok.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from high import app\n",
        "high/__init__.py": "",
        "high/app.py": "from low.core import f\n\ndef run():\n    return f()\n",
    })
    modules, edges, _ = build_graph(tmp_path, ("low", "high"))
    problems = upward_imports(tmp_path, modules, edges, {"low": ("high",), "high": ()})
    assert problems == ["low.core -> high.app  (low/core.py:4)"], problems


def test_checker_on_an_acyclic_package(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "import os\nfrom .b import g\n\ndef f():\n    from . import b\n    return g()\n",
        "pkg/b.py": "import numpy\n\ndef g():\n    return 1\n",
    })
    modules, edges, external = build_graph(tmp_path, ("pkg",))
    assert find_cycles(edges) == []
    assert "numpy" in external["pkg.b"] and "os" in external["pkg.a"]
    assert framework_imports(tmp_path, "pkg", modules, edges, external) == []


# ---------------------------------------------------------------------------- the lazy model package


def test_model_package_exports_resolve_lazily():
    """`hyena_glt/__init__.py` imports its parts on first use (PEP 562): importing the
    alphabet (all `hyena-glt pack` takes from it) loads no torch, and every public name
    still resolves from the package."""
    code = ("import sys; import hyena_glt.alphabet; from hyena_glt import SeqType; "
            "print('torch' in sys.modules); import hyena_glt; "
            "missing = [n for n in hyena_glt.__all__ if getattr(hyena_glt, n, None) is None]; "
            "print(missing, set(hyena_glt.__all__) <= set(dir(hyena_glt)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["False", "[] True"], proc.stdout
