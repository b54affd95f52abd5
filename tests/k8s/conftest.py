"""Offline checks of k8s/: what `kubectl kustomize` renders, validated without a cluster.

Built-in kinds go through ``kubernetes-validate`` (strict: unknown fields fail), the RayService
through ``flora.k8s.rayservice`` (the fields KubeRay needs) and Ray Serve's own schema for its
``serveConfigV2``. Rendering needs kubectl (v1.27+ bundles kustomize v5); without it those tests
skip and the files that stand alone (Redis, the models kustomization's objects) are still checked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ["cpu-demo", "gpu"]
KUSTOMIZATIONS = [f"overlays/{name}" for name in OVERLAYS] + ["models"]
# The oldest Kubernetes we claim (docs/kubernetes.md) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.29", "latest"]


@cache
def pinned(package: str) -> str:
    """The ``==`` pin of ``package`` in pyproject.toml's dependencies."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        match = re.fullmatch(rf"{re.escape(package)}(?:\[[^\]]*\])?==(\S+)", dep)
        if match:
            return match.group(1)
    raise AssertionError(f"{package} is not pinned with == in pyproject.toml")


@cache
def kustomize(path: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH; it renders the kustomizations (kubectl >= 1.27)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize k8s/{path} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def only(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def ray_groups(rayservice: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, group spec) for the head group and each worker group."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])]
    return groups + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
