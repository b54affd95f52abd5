"""Dependencies are declared where they are imported.

The base dependencies in pyproject.toml are what the serving platform imports; an optional
extra (``bench``) holds what only :data:`NEEDS_EXTRA`'s modules use, and ``dev`` holds every
extra. Checked two ways: statically, every third-party import of package code is declared (in
the base, or in the extra its module is listed with); and for real, every other module imports
in a fresh interpreter where the extras' packages (and pytest, and vllm) cannot be imported.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import pkgutil
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "flora-serve"
PACKAGES = {
    "flora": ROOT / "platform" / "flora",
    "adapter_registry": ROOT / "adapter_registry",
    "adapter_format": ROOT / "adapter_format",
}

# The one list of package code that needs an optional extra: module → extra (pyproject.toml).
# These modules import the extra's packages inside the functions that use them; every other
# module must import, and may import only what the base dependencies provide.
NEEDS_EXTRA = {
    "flora.bench.hf_baselines": "bench",  # transformers, peft: the engine benchmark's baselines
    "flora.bench.engine_report": "bench",  # matplotlib: the engine benchmark's plot
    "flora.bench.report": "bench",  # matplotlib: the kernel plot (skipped without it)
    "flora.bench.replica_state": "bench",  # psutil: a replica's RSS (None without it)
    "flora.bench.serve": "bench",  # psutil: the machine's CPU time (None without it)
    "flora.bench.serve_run": "bench",  # psutil: the Ray processes left behind by `serve run`
    "flora.adapters._triton_jit": "dev",  # triton: the fused adapter kernels (GPU images have it)
}
# Blocked in the import check besides the extras' own packages: test tools and the GPU engine.
ALSO_BLOCKED = ("pytest", "vllm")
# Packages of an extra that a base dependency brings its own copy of and imports: the import
# check lets the dependency import them and refuses them to package code only.
BROUGHT_BY_THE_BASE = {"psutil": "Ray imports its copy in ray/thirdparty_files"}


# Files in the package that FLoRA never imports: they run under another environment's python.
FOREIGN = {"flora.bench.vllm_runner"}  # vLLM's side of `flora bench engine --vllm-python`


def package_modules() -> dict[str, Path]:
    """Every module of the packages (dotted name → file), found without importing any, less
    :data:`FOREIGN`."""
    found: dict[str, Path] = {}

    def walk(name: str, directory: Path) -> None:
        found[name] = directory / "__init__.py"
        for info in pkgutil.iter_modules([str(directory)]):
            dotted = f"{name}.{info.name}"
            if info.ispkg:
                walk(dotted, directory / info.name)
            else:
                found[dotted] = directory / f"{info.name}.py"

    for name, directory in PACKAGES.items():
        walk(name, directory)
    return {name: path for name, path in found.items() if name not in FOREIGN}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(spec: str) -> tuple[str, list[str]]:
    """A requirement string's distribution name and the extras it asks for."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", spec)
    assert match, spec
    extras = [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
    return _normalise(match.group(1)), extras


def declared_specs(group: str | None) -> list[str]:
    """The requirement strings of an extra in pyproject.toml (None: the base dependencies)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    if group is None:
        return project["dependencies"]
    return project.get("optional-dependencies", {})[group]


@cache
def declared() -> dict[str | None, frozenset[str]]:
    """Distribution names by extra (None: the base), our own extras expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = [None, *project.get("optional-dependencies", {})]

    def names(group: str | None, seen: frozenset = frozenset()) -> set[str]:
        out = set()
        for spec in declared_specs(group):
            name, extras = _requirement(spec)
            if name != PROJECT:
                out.add(name)
            for extra in extras if name == PROJECT else ():
                assert extra not in seen, f"extra {extra!r} includes itself"
                out |= names(extra, seen | {extra})
        return out

    return {group: frozenset(names(group)) for group in groups}


@cache
def distributions() -> dict[str, list[str]]:
    """Top-level import name → the installed distributions that provide it (normalised)."""
    return {
        top: [_normalise(d) for d in dists]
        for top, dists in importlib.metadata.packages_distributions().items()
    }


def third_party_imports(path: Path) -> dict[str, int]:
    """Top-level names of the absolute, non-stdlib, non-own imports in a file → first line."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.partition(".")[0]
            own = top in PACKAGES or top == "__future__"
            if not own and top not in sys.stdlib_module_names:
                found.setdefault(top, node.lineno)
    return found


def _extra_only(extra: str) -> frozenset[str]:
    return declared()[extra] - declared()[None]


def test_every_third_party_import_is_declared_where_its_module_may_use_it() -> None:
    problems = []
    for module, path in sorted(package_modules().items()):
        extra = NEEDS_EXTRA.get(module)
        allowed = declared()[None] | (declared()[extra] if extra else frozenset())
        where = f"the base dependencies or the {extra!r} extra" if extra else "the base"
        for top, line in third_party_imports(path).items():
            provided = distributions().get(top)
            if not provided:
                problems.append(f"{path.relative_to(ROOT)}:{line}: `{top}` is not installed")
            elif not allowed & set(provided):
                problems.append(
                    f"{path.relative_to(ROOT)}:{line}: `{top}` ({', '.join(provided)}) is not "
                    f"declared in {where}; declare it, or list {module} in NEEDS_EXTRA"
                )
    assert not problems, "\n".join(problems)


def test_needs_extra_lists_only_modules_that_use_their_extra() -> None:
    modules = package_modules()
    for module, extra in NEEDS_EXTRA.items():
        assert module in modules, f"NEEDS_EXTRA names {module}, which does not exist"
        assert extra in declared(), f"{module}: pyproject.toml has no extra {extra!r}"
        used = {
            d for top in third_party_imports(modules[module]) for d in distributions().get(top, [])
        }
        assert used & _extra_only(extra), f"{module} imports nothing only {extra!r} provides"


def test_dev_installs_every_extra_and_no_extra_is_unused() -> None:
    extras = set(declared()) - {None, "dev"}
    for extra in extras:
        assert declared()[extra] <= declared()["dev"], f"dev does not include {extra!r}"
        assert extra in NEEDS_EXTRA.values(), f"extra {extra!r}: no module needs it"


def _blocked_imports() -> list[str]:
    """Import names of the packages only an extra brings (dev's test tools included), plus
    :data:`ALSO_BLOCKED`."""
    optional = set().union(*(_extra_only(e) for e in declared() if e is not None))
    names = {top for top, dists in distributions().items() if set(dists) <= optional}
    return sorted(names | set(ALSO_BLOCKED))


# In a fresh interpreter: the blocked packages cannot be found (as if not installed), except
# those a base dependency brings a copy of, which package code alone may not import; then
# import every module and report the failures as JSON.
IMPORT_ALL = """
import builtins, importlib, importlib.abc, json, sys, traceback

blocked, brought, own, modules = (json.loads(a) for a in sys.argv[1:])


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked and name.partition(".")[0] not in brought:
            raise ImportError(f"{name} is blocked: it comes only with an extra", name=name)
        return None


real_import = builtins.__import__


def refuse_to_own_code(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__") or ""
    if level == 0 and importer.partition(".")[0] in own and name.partition(".")[0] in blocked:
        raise ImportError(f"{importer} imports {name}, which comes only with an extra")
    return real_import(name, globals, locals, fromlist, level)


sys.meta_path.insert(0, Absent())
builtins.__import__ = refuse_to_own_code
failed = {}
for module in modules:
    try:
        importlib.import_module(module)
    except BaseException as e:
        failed[module] = "".join(traceback.format_exception(e)[-3:])
print(json.dumps(failed))
"""


def test_every_module_imports_without_the_extras(tmp_path: Path) -> None:
    blocked = _blocked_imports()
    assert {"matplotlib", "peft", "pytest", "transformers", "vllm"} <= set(blocked)
    modules = sorted(set(package_modules()) - set(NEEDS_EXTRA))
    args = [blocked, sorted(BROUGHT_BY_THE_BASE), sorted(PACKAGES), modules]
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, *map(json.dumps, args)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    report = "\n\n".join(f"{module}:\n{error}" for module, error in failed.items())
    assert not failed, f"modules that need a package only an extra brings:\n\n{report}"
