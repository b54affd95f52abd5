"""The Dockerfile cannot be built here (no Docker engine); what it relies on is checked instead."""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import re
import tomllib

from tests.k8s.conftest import K8S, ROOT, load_yaml, pinned

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def build_arg(name: str) -> str:
    (value,) = [
        a.split("=", 1)[1] for i, a in instructions() if i == "ARG" and a.startswith(name + "=")
    ]
    return value


def test_the_base_image_is_the_pinned_ray_and_python():
    ray = pinned("ray")
    assert build_arg("RAY_IMAGE") == f"rayproject/ray:{ray}-py311"
    (base,) = [a for i, a in instructions() if i == "FROM"]
    assert base == "${RAY_IMAGE}"
    # The GPU build command in its header names the -gpu variant of the same image.
    assert f"RAY_IMAGE=rayproject/ray:{ray}-py311-gpu" in DOCKERFILE
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"


def test_rayversion_in_the_manifests_is_the_same_ray():
    rayservice = load_yaml(K8S / "base" / "rayservice.yaml")[0]
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == pinned("ray")


def test_torch_is_pinned_as_in_pyproject_and_the_makefile():
    torch = pinned("torch")
    assert re.findall(r"torch==([\w.+]+)", DOCKERFILE) == [torch]
    assert f'"torch=={torch}"' in (ROOT / "Makefile").read_text()


def test_what_it_copies_exists_and_is_in_the_build_context():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    assert patterns[0] == "*", "the .dockerignore is an allow-list"
    copies = [a for i, a in instructions() if i == "COPY"]
    assert copies
    for args in copies:
        sources = [w for w in args.split() if not w.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), source
            assert any(fnmatch.fnmatch(source, p) for p in allowed), f"{source} is .dockerignored"
    # and together they are what `pip install .` needs: the packages setuptools finds
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = {w.rstrip("/") for args in copies for w in args.split()}
    for where in find["find"]["where"]:
        assert where == "." or where in copied, where
    assert {"adapter_registry", "pyproject.toml", "README.md"} <= copied


def test_the_entry_points_it_names_exist():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (run,) = [a for i, a in instructions() if i == "RUN"]
    assert "flora --version" in run and "flora" in scripts
    for module in re.search(r'import ([\w., ]+)"', run).group(1).split(","):
        assert importlib.util.find_spec(module.strip()) is not None, module
    serve = yaml_import_paths()
    assert serve == {"flora.serve.app:build_app"}
    module, attribute = next(iter(serve)).split(":")
    assert hasattr(importlib.import_module(module), attribute)


def yaml_import_paths() -> set[str]:
    import yaml

    paths = set()
    for overlay in ("cpu-demo", "gpu"):
        patch = load_yaml(K8S / "overlays" / overlay / "serve-config.yaml")[0]
        config = yaml.safe_load(patch["spec"]["serveConfigV2"])
        paths |= {app["import_path"] for app in config["applications"]}
    return paths
