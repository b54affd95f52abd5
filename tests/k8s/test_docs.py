"""The Kubernetes guide names files that exist and the same versions as the manifests."""

from __future__ import annotations

import re

import pytest

from tests.k8s.conftest import ROOT, pinned

DOCS = [ROOT / "docs" / "kubernetes.md", ROOT / "README.md", ROOT / "k8s" / "README.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_and_versions_are_current(doc):
    text = doc.read_text()
    for path in set(re.findall(r"(?<![\w/.])(k8s/[\w./-]*[\w/]|deployments/[\w.-]+\.yaml)", text)):
        assert (ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"
    for version in re.findall(r"rayproject/ray:([\d.]+)-py", text):
        assert version == pinned("ray"), doc.name
    charts = set(re.findall(r"kuberay/kuberay-operator --version (\S+)", text))
    assert charts <= {"1.7.0"}, charts  # the KubeRay whose RayService schema the manifests follow
