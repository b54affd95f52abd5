"""What the KubeRay operator needs from a RayService, checked offline.

The CRD's own schema lives in the cluster, not here; these are the rules that, broken, make
KubeRay refuse the object or build a cluster that never serves: a head template, worker groups
with a name and replica bounds, ``rayStartParams`` values that are strings (they become
``ray start`` flags), GPU counts that agree between ``rayStartParams`` and the Ray container's
limits, and the Ray version the image runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GPU = "nvidia.com/gpu"


def problems(rayservice: Mapping[str, Any], ray_version: str) -> list[str]:
    """Every rule ``rayservice`` breaks, as messages naming the field; empty when it is fine."""
    found = []
    if rayservice.get("apiVersion") != "ray.io/v1" or rayservice.get("kind") != "RayService":
        found.append("not a ray.io/v1 RayService")
    spec = rayservice.get("spec") or {}
    if not isinstance(spec.get("serveConfigV2"), str):
        found.append("spec.serveConfigV2 must be a string (the Serve config file, as YAML)")
    cluster = spec.get("rayClusterConfig")
    if not isinstance(cluster, Mapping):
        return [*found, "spec.rayClusterConfig is missing"]
    if cluster.get("rayVersion") != ray_version:
        found.append(
            f"rayClusterConfig.rayVersion is {cluster.get('rayVersion')!r}, "
            f"but the image runs Ray {ray_version}"
        )
    found += group_problems("headGroupSpec", cluster.get("headGroupSpec"), worker=False)
    groups = cluster.get("workerGroupSpecs") or []
    names = [g.get("groupName") for g in groups if isinstance(g, Mapping)]
    for i, group in enumerate(groups):
        found += group_problems(f"workerGroupSpecs[{i}]", group, worker=True)
    if len(set(names)) != len(names):
        found.append(f"workerGroupSpecs: group names repeat: {names}")
    return found


def group_problems(where: str, group: Any, *, worker: bool) -> list[str]:
    """The rules for one head or worker group spec."""
    if not isinstance(group, Mapping):
        return [f"{where} is missing"]
    found = []
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
    if not containers:
        found.append(f"{where}.template.spec.containers is missing (KubeRay needs the template)")
    params = group.get("rayStartParams") or {}
    for key, value in params.items():
        if not isinstance(value, str):
            found.append(
                f"{where}.rayStartParams.{key} must be a string, not {type(value).__name__} "
                f"({value!r}): quote it"
            )
    if worker:
        found += _replica_problems(where, group)
    if containers:
        found += _gpu_problems(where, params, containers[0])  # KubeRay: the Ray container is first
    return found


def _replica_problems(where: str, group: Mapping[str, Any]) -> list[str]:
    found = []
    name = group.get("groupName")
    if not isinstance(name, str) or not name:
        found.append(f"{where}.groupName is missing")
    bounds = {}
    for field in ("minReplicas", "maxReplicas", "replicas"):
        value = group.get(field)
        if value is None and field == "replicas":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            found.append(f"{where}.{field} must be a whole number ≥ 0, not {value!r}")
        else:
            bounds[field] = value
    low, high = bounds.get("minReplicas"), bounds.get("maxReplicas")
    if low is not None and high is not None and low > high:
        found.append(f"{where}: minReplicas {low} > maxReplicas {high}")
    count = bounds.get("replicas")
    if count is not None and low is not None and high is not None and not low <= count <= high:
        found.append(f"{where}.replicas {count} is outside [minReplicas, maxReplicas]")
    return found


def _gpu_problems(where: str, params: Mapping[str, Any], container: Mapping[str, Any]) -> list[str]:
    resources = container.get("resources") or {}
    limit = (resources.get("limits") or {}).get(GPU)
    request = (resources.get("requests") or {}).get(GPU)
    found = []
    if request is not None and str(request) != str(limit):
        found.append(f"{where}: {GPU} request {request!r} must equal its limit {limit!r}")
    gpus = _whole(limit, 0)
    declared = params.get("num-gpus")
    if gpus is None:
        found.append(f"{where}: {GPU} limit {limit!r} is not a whole number")
    elif declared is not None and _whole(declared, None) != gpus:
        found.append(
            f"{where}: rayStartParams num-gpus is {declared!r} but the Ray container's "
            f"{GPU} limit is {gpus}: Ray would schedule GPUs the pod does not have, or idle them"
        )
    return found


def _whole(value: Any, default: int | None) -> int | None:
    if value is None:
        return default
    try:
        number = int(str(value))
    except ValueError:
        return None
    return number if number >= 0 else None
