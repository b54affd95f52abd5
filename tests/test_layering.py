"""The import graph, read statically (every import statement counts, also inside functions and
under ``TYPE_CHECKING``): no cycles among package modules; serving (``flora.serve``,
``flora.engine``, ``flora.model``, ``flora.adapters``) reaches neither training nor the
benchmarks; ``scripts/`` import nothing from ``tests``."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from tests.test_packaging import ROOT, package_modules

SERVING = ("flora.serve", "flora.engine", "flora.model", "flora.adapters")
NOT_FOR_SERVING = ("flora.train", "flora.bench")


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def imports(path: Path, module: str) -> list[tuple[str, tuple[str, ...], int]]:
    """(module imported, names taken from it, line) for every import statement in a file, with
    relative imports resolved (``module`` is the file's dotted name)."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            found.append((source, tuple(alias.name for alias in node.names), node.lineno))
    return found


@cache
def graph() -> dict[str, dict[str, int]]:
    """Package module → the package modules it imports → the first line that does.

    ``from a import b`` imports the module ``a.b`` if there is one, else the module ``a``.
    """
    modules = package_modules()
    edges: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        targets: dict[str, int] = {}
        for source, names, line in imports(path, module):
            for target in [f"{source}.{n}" for n in names] or [source]:
                target = target if target in modules else source
                if target in modules and target != module:
                    targets.setdefault(target, line)
        edges[module] = targets
    return edges


def cycles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_package_modules() -> None:
    edges = graph()
    report = []
    for component in cycles():
        inside = set(component)
        report.append(" ↔ ".join(component))
        report += [
            f"    {a} imports {b} (line {line})"
            for a in component
            for b, line in sorted(edges[a].items())
            if b in inside
        ]
    assert not report, "import cycles (break them with a module both can import):\n" + "\n".join(
        report
    )


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_serving_reaches_neither_training_nor_benchmarks() -> None:
    """Transitively, counting the packages whose ``__init__`` an import runs."""
    edges = graph()
    problems = []
    for start in sorted(m for m in edges if _within(m, SERVING)):
        seen = {start: [start]}
        todo = [start]
        while todo:
            here = todo.pop()
            for nxt in [*edges[here], *_parents(here)]:
                if nxt in seen or nxt not in edges:
                    continue
                seen[nxt] = [*seen[here], nxt]
                if _within(nxt, NOT_FOR_SERVING):
                    problems.append(" → ".join(seen[nxt]))
                else:
                    todo.append(nxt)
    assert not problems, "serving code importing training or benchmark code:\n" + "\n".join(
        problems
    )


def test_scripts_import_nothing_from_tests() -> None:
    problems = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in sorted((ROOT / "scripts").glob("*.py"))
        for name, _, line in imports(path, path.stem)
        if name == "tests" or name.startswith("tests.")
    ]
    assert not problems, "scripts must not import test code:\n" + "\n".join(problems)


def test_the_checks_see_what_they_look_for() -> None:
    """The graph is not empty where it must not be: a broken parser would pass everything."""
    edges = graph()
    assert any(_within(m, ("flora.engine",)) for m in edges["flora.serve.replica"])
    assert any(_within(m, ("flora.model.tiny",)) for m in edges["flora.serve.model_dir"])
    assert any(_within(m, ("flora.train",)) for m in edges["flora.cli"])
