"""Import layering of the whole tree, read from the source (AST only: nothing is imported).

The layers, lowest first: ``lowrank_kernels`` (the folder kernels/) ← ``lowrank`` ← ``compress`` ←
``bench`` ← ``tests``.  A module may import its own layer and the layers below it, never one above,
and no chain of imports among our modules may lead back to where it started.  Imports inside
functions count too: a lazy import that closes a circle is still a circle in the design (it was how
kernels/_ext.py and kernels/lowrank_matmul.py used to need each other).

A package's ``__init__.py`` must also not bind a submodule's name to anything but that submodule:
``from lowrank_kernels.lowrank_matmul import lowrank_matmul`` in an ``__init__`` once made
``lowrank_kernels.lowrank_matmul`` the function, hiding the module of the same name.

Run as a script (``python tests/test_layering.py``) to print every violation.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Folder -> import name, lowest layer first.  kernels/ is installed as lowrank_kernels (pyproject).
LAYERS: tuple[tuple[str, str], ...] = (
    ("kernels", "lowrank_kernels"),
    ("lowrank", "lowrank"),
    ("compress", "compress"),
    ("bench", "bench"),
    ("tests", "tests"),
)
RANK = {name: i for i, (_, name) in enumerate(LAYERS)}


@dataclass(frozen=True)
class Module:
    name: str  # dotted import name
    path: Path
    is_package: bool  # an __init__.py


def find_modules(root: Path) -> dict[str, Module]:
    """Every module of the layered folders under ``root``, by import name."""
    modules: dict[str, Module] = {}
    for folder, top in LAYERS:
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [top, *rel.parts]
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join(parts)] = Module(".".join(parts), path, is_package)
    return modules


def _package_of(module: Module) -> str:
    return module.name if module.is_package else module.name.rpartition(".")[0]


def imported_modules(module: Module, known: dict[str, Module]) -> list[tuple[str, int]]:
    """(our module, line) for every import statement of ``module`` that reaches one of ours.

    ``from P import x`` counts as importing ``P.x`` when that is a module, else ``P``.  Any
    package or module under one of our top-level names counts, known file or not, so that an
    import of a layer above is caught even where it names something that does not exist.
    """
    tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
    found: list[tuple[str, int]] = []

    def ours(name: str) -> bool:
        return name.split(".")[0] in RANK

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if ours(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(module).split(".")
                base = ".".join(package[: len(package) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if not ours(source):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub if sub in known else source, node.lineno))
    return found


def layer_violations(modules: dict[str, Module]) -> list[str]:
    out = []
    for module in modules.values():
        rank = RANK[module.name.split(".")[0]]
        for target, line in imported_modules(module, modules):
            if RANK[target.split(".")[0]] > rank:
                out.append(f"{module.path.relative_to(REPO) if module.path.is_relative_to(REPO) else module.path}"
                           f":{line}: {module.name} imports {target}, a higher layer")
    return out


def import_cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    graph = {name: sorted({t for t, _ in imported_modules(m, modules) if t in modules})
             for name, m in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:  # Tarjan's algorithm, iterative (deep trees overflow recursion)
        nonlocal counter
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            targets = graph[node]
            if i < len(targets):
                work.append((node, i + 1))
                nxt = targets[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    cycles.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])

    for name in graph:
        if name not in index:
            visit(name)
    return cycles


def shadowed_submodules(modules: dict[str, Module]) -> list[str]:
    """Names an ``__init__.py`` binds at top level that equal one of its submodules' names."""
    out = []
    for module in modules.values():
        if not module.is_package:
            continue
        subs = {name.rpartition(".")[2] for name in modules if name.rpartition(".")[0] == module.name}
        tree = ast.parse(module.path.read_text(encoding="utf-8"))
        for node in tree.body:
            bound: list[tuple[str, bool]] = []  # (name, binds the submodule itself)
            if isinstance(node, ast.ImportFrom):
                source = node.module or ""
                for alias in node.names:
                    name = alias.asname or alias.name
                    itself = source in (module.name, "") and alias.name == name
                    bound.append((name, itself))
            elif isinstance(node, ast.Import):
                bound += [(alias.asname, alias.name == f"{module.name}.{alias.asname}")
                          for alias in node.names if alias.asname]
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.append((node.name, False))
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                bound += [(t.id, False) for t in targets if isinstance(t, ast.Name)]
            for name, itself in bound:
                if name in subs and not itself:
                    out.append(f"{module.name} binds {name!r}, hiding its submodule {module.name}.{name}")
    return out


def report(root: Path = REPO) -> list[str]:
    modules = find_modules(root)
    problems = layer_violations(modules)
    problems += [f"import cycle: {' <-> '.join(c)}" for c in import_cycles(modules)]
    problems += shadowed_submodules(modules)
    return problems


# ---------------------------------------------------------------------------- tests
def test_the_tree_is_layered_without_cycles_or_shadowed_modules():
    problems = report()
    assert not problems, "\n".join(problems)


def test_every_layer_is_seen():
    modules = find_modules(REPO)
    assert {name.split(".")[0] for name in modules} == set(RANK)
    assert "lowrank_kernels.lowrank_matmul" in modules and "compress.methods.svd" in modules


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checker_catches_each_kind_of_violation(tmp_path):
    root = _tree(tmp_path, {
        "kernels/op.py": "def f():\n    from lowrank.linear import Layer  # lazy, still upward\n",
        "kernels/a.py": "from lowrank_kernels import b\n",
        "kernels/b.py": "def g():\n    import lowrank_kernels.a\n",
        "lowrank/__init__.py": "from lowrank.linear import linear\n",
        "lowrank/linear.py": "from compress.plan import Plan\nfrom . import surgery\nLayer = 1\n",
        "lowrank/surgery.py": "",
        "compress/__init__.py": "", "compress/plan.py": "Plan = 1\n",
        "bench/__init__.py": "", "tests/__init__.py": "",
    })
    modules = find_modules(root)
    assert set(modules) >= {"lowrank_kernels.op", "lowrank", "lowrank.linear", "compress.plan"}
    assert [(m, t) for m in ("lowrank.linear",) for t, _ in imported_modules(modules[m], modules)] == [
        ("lowrank.linear", "compress.plan"), ("lowrank.linear", "lowrank.surgery")]
    layers = layer_violations(modules)
    assert any("lowrank_kernels.op imports lowrank.linear" in p for p in layers), layers
    assert any("lowrank.linear imports compress.plan" in p for p in layers), layers
    assert len(layers) == 2, layers
    assert import_cycles(modules) == [["lowrank_kernels.a", "lowrank_kernels.b"]]
    assert shadowed_submodules(modules) == ["lowrank binds 'linear', hiding its submodule lowrank.linear"]


def test_the_checker_accepts_a_clean_tree(tmp_path):
    root = _tree(tmp_path, {
        "kernels/utils.py": "", "kernels/op.py": "from lowrank_kernels.utils import x\n",
        "lowrank/__init__.py": "from lowrank.linear import Layer\nfrom lowrank import linear\n"
                               "import lowrank.linear as linear\n",
        "lowrank/linear.py": "import lowrank_kernels.op\n",
        "compress/__init__.py": "", "bench/__init__.py": "import compress\n", "tests/__init__.py": "import bench\n",
    })
    assert report(root) == []


if __name__ == "__main__":
    found = report()
    print("\n".join(found) or "layering: no violation")
    sys.exit(1 if found else 0)
