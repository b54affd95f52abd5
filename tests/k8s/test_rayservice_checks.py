"""flora.k8s.rayservice catches what would make KubeRay refuse the RayService or misplace GPUs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from flora.k8s.rayservice import GPU, problems
from tests.k8s.conftest import K8S, load_yaml, pinned


@pytest.fixture
def rayservice() -> dict[str, Any]:
    """The base RayService with one GPU per worker pod: valid as it is."""
    doc = copy.deepcopy(load_yaml(K8S / "base" / "rayservice.yaml")[0])
    doc["spec"]["serveConfigV2"] = "applications: []\n"
    group = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["rayStartParams"]["num-gpus"] = "1"
    resources = group["template"]["spec"]["containers"][0]["resources"]
    resources["requests"][GPU] = resources["limits"][GPU] = "1"
    return doc


def cluster(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig"]


def worker(doc: dict[str, Any]) -> dict[str, Any]:
    return cluster(doc)["workerGroupSpecs"][0]


def gpu_resources(doc: dict[str, Any]) -> dict[str, Any]:
    return worker(doc)["template"]["spec"]["containers"][0]["resources"]


def test_the_fixture_is_valid(rayservice):
    assert problems(rayservice, pinned("ray")) == []


MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "int-ray-start-param": (
        lambda d: worker(d)["rayStartParams"].update({"num-gpus": 1}),
        "rayStartParams.num-gpus must be a string",
    ),
    "head-param-not-string": (
        lambda d: cluster(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "headGroupSpec.rayStartParams.num-cpus must be a string",
    ),
    "num-gpus-disagrees-with-limit": (
        lambda d: worker(d)["rayStartParams"].update({"num-gpus": "2"}),
        "num-gpus is '2' but the Ray container's nvidia.com/gpu limit is 1",
    ),
    "gpu-limit-removed": (
        lambda d: gpu_resources(d)["limits"].pop(GPU) and gpu_resources(d)["requests"].pop(GPU),
        "limit is 0",
    ),
    "gpu-request-differs": (
        lambda d: gpu_resources(d)["requests"].update({GPU: "2"}),
        "request '2' must equal its limit '1'",
    ),
    "head-gpus-without-limit": (
        lambda d: cluster(d)["headGroupSpec"]["rayStartParams"].update({"num-gpus": "1"}),
        "headGroupSpec: rayStartParams num-gpus is '1'",
    ),
    "no-group-name": (lambda d: worker(d).pop("groupName"), "groupName is missing"),
    "no-max-replicas": (lambda d: worker(d).pop("maxReplicas"), "maxReplicas must be"),
    "min-above-max": (
        lambda d: worker(d).update({"minReplicas": 3}),
        "minReplicas 3 > maxReplicas",
    ),
    "replicas-outside-bounds": (
        lambda d: worker(d).update({"replicas": 5}),
        "replicas 5 is outside",
    ),
    "no-worker-template": (lambda d: worker(d).pop("template"), "template.spec.containers"),
    "no-head": (lambda d: cluster(d).pop("headGroupSpec"), "headGroupSpec is missing"),
    "other-ray-version": (
        lambda d: cluster(d).update({"rayVersion": "2.9.0"}),
        "rayVersion is '2.9.0'",
    ),
    "serve-config-as-mapping": (
        lambda d: d["spec"].update({"serveConfigV2": {"applications": []}}),
        "serveConfigV2 must be a string",
    ),
    "repeated-group": (
        lambda d: cluster(d)["workerGroupSpecs"].append(copy.deepcopy(worker(d))),
        "group names repeat",
    ),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_a_broken_rule_is_named(rayservice, name):
    mutate, message = MUTATIONS[name]
    mutate(rayservice)
    found = problems(rayservice, pinned("ray"))
    assert any(message in p for p in found), found
