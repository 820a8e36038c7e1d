"""Dependencies point down: core <- sim, live <- the grader (solutions) and the command line (experiments).

Every import counts, at module level or inside a function (an import inside a
function is still a dependency, only a late one). ``core`` imports no other
package of the project, ``sim`` and ``live`` only ``core`` (whose exercise code
runs is decided by the command line and handed down as classes), and no two
modules of the project import each other, directly or through others.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("core", "sim", "live", "solutions", "experiments")
#: package -> the project packages it may import
ALLOWED = {
    "core": {"core"},
    "sim": {"core", "sim"},
    "live": {"core", "live"},
    "solutions": set(PACKAGES),
    "experiments": set(PACKAGES),
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str) -> set[str]:
    """The project modules ``module``'s source imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = module.split(".")[: -node.level]
                names = [".".join([*base, node.module] if node.module else base)]
            else:
                names = [node.module or ""]
            names += [f"{names[0]}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a ``from pkg import mod`` counts as importing ``pkg.mod``)."""
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    return {name: {i for i in imports_of(path.read_text(), name) if i in modules and i != name}
            for name, path in modules.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {i}" for m, deps in g.items() for i in deps
                  if i.split(".")[0] not in ALLOWED[m.split(".")[0]])


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each reported once, from its smallest module name."""
    found: list[list[str]] = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(g.get(node, ())):
            if nxt == start:
                found.append([*path, start])
            elif nxt > start and nxt not in path:
                walk(start, nxt, [*path, nxt])

    for start in sorted(g):
        walk(start, start, [start])
    return found


def test_the_checker_sees_function_level_upward_imports_and_cycles() -> None:
    """The test can fail: an upward import inside a function, and a cycle, are both caught."""
    found = imports_of("import json\ndef f():\n    from solutions.impl import resolve\n", "live.node")
    assert found == {"solutions.impl", "solutions.impl.resolve"}
    g = {"live.node": {"solutions.impl"}, "experiments.a": {"experiments.b"}, "experiments.b": {"experiments.a"}}
    assert upward(g) == ["live.node imports solutions.impl"]
    assert cycles(g) == [["experiments.a", "experiments.b", "experiments.a"]]


@pytest.mark.parametrize("package", ["core", "sim", "live"])
def test_lower_packages_import_nothing_above_them(package: str) -> None:
    g = {m: deps for m, deps in graph().items() if m.split(".")[0] == package}
    assert g, f"no modules found in {package}"
    assert upward(g) == []


def test_no_import_cycle_between_the_projects_modules() -> None:
    assert cycles(graph()) == []
