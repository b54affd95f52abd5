"""Every kustomization renders, and what it renders is what Kubernetes, KubeRay and Ray accept."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from flora.k8s.rayservice import GPU, problems
from flora.k8s.render import TARGETS, serve_config
from flora.serve.config import ServeArgs
from tests.k8s.conftest import (
    K8S,
    KUBERNETES_VERSIONS,
    KUSTOMIZATIONS,
    OVERLAYS,
    ROOT,
    kustomize,
    load_yaml,
    only,
    pinned,
    ray_groups,
)

SECRET_ENV = {  # what the Ray containers must get from Secrets, and from which
    "FLORA_ADMIN_KEY": "flora-admin",
    "FLORA_REDIS_URL": "flora-redis",
    "FLORA_STORE_URL": "flora-s3",
    "AWS_ENDPOINT_URL": "flora-s3",
    "AWS_ACCESS_KEY_ID": "flora-s3",
    "AWS_SECRET_ACCESS_KEY": "flora-s3",
}


def validate(doc: dict[str, Any], version: str) -> None:
    if version == "latest":
        version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(doc, version, strict=True)


def as_pod(group: dict[str, Any]) -> dict[str, Any]:
    """A group's pod template as the Pod KubeRay will create from it (for strict validation)."""
    template = group["template"]
    metadata = {"name": "ray-pod", **template.get("metadata", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def workloads(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    """(label, pod spec) of everything that runs: Ray groups, StatefulSets, Jobs."""
    specs = []
    for doc in docs:
        if doc["kind"] == "RayService":
            specs += [(f"ray {name}", g["template"]["spec"]) for name, g in ray_groups(doc)]
        elif doc["kind"] in ("StatefulSet", "Deployment", "Job"):
            specs.append(
                (f"{doc['kind']} {doc['metadata']['name']}", doc["spec"]["template"]["spec"])
            )
    return specs


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_built_in_kinds_validate_strictly(path, version):
    docs = kustomize(path)
    for doc in docs:
        if doc["kind"] == "RayService":
            for _, group in ray_groups(doc):
                validate(as_pod(group), version)
        else:
            validate(doc, version)
        assert doc["kind"] == "Namespace" or doc["metadata"].get("namespace") == "flora", doc


def test_strict_validation_catches_a_typo():
    (redis,) = [d for d in load_yaml(K8S / "base" / "redis.yaml") if d["kind"] == "StatefulSet"]
    redis["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(redis, "latest")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_has_what_kuberay_needs(overlay):
    rayservice = only(kustomize(f"overlays/{overlay}"), "RayService")
    assert problems(rayservice, pinned("ray")) == []
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert rayservice["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    autoscaler = cluster["autoscalerOptions"]["resources"]
    assert {"cpu", "memory"} <= autoscaler["requests"].keys()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_is_the_deployments_file(overlay):
    """serveConfigV2 is what `serve run` takes (Ray's schema, ServeArgs) and equals deployments/."""
    (target,) = [t for t in TARGETS if t.output == f"k8s/overlays/{overlay}/serve-config.yaml"]
    embedded = yaml.safe_load(
        only(kustomize(f"overlays/{overlay}"), "RayService")["spec"]["serveConfigV2"]
    )
    schema = ServeDeploySchema.model_validate(embedded)
    for app in schema.applications:
        ServeArgs.model_validate(app.args)
    assert embedded == serve_config(target, ROOT)
    assert embedded["http_options"]["host"] == "0.0.0.0"  # reachable through flora-serve-svc
    assert embedded["http_options"]["port"] == 8000


def test_the_gpu_overlay_serves_the_production_config_on_gpus():
    rayservice = only(kustomize("overlays/gpu"), "RayService")
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve == yaml.safe_load((ROOT / "deployments" / "starcoder-gpu.yaml").read_text())
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    gpus = int(container["resources"]["limits"][GPU])
    assert gpus >= 1 and group["rayStartParams"]["num-gpus"] == str(gpus)
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in group["template"]["spec"][
        "tolerations"
    ]
    assert group["minReplicas"] >= 1  # a model replica needs a GPU pod from the start
    # Room for every replica Serve may ask for: pods × GPUs ≥ max_replicas × num_gpus.
    (replica,) = [
        d for d in serve["applications"][0]["deployments"] if d["name"] == "StarCoderReplica"
    ]
    wanted = (
        replica["autoscaling_config"]["max_replicas"] * replica["ray_actor_options"]["num_gpus"]
    )
    assert group["maxReplicas"] * gpus >= wanted
    cpus = int(container["resources"]["limits"]["cpu"])
    assert cpus >= replica["ray_actor_options"]["num_cpus"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    model = serve["applications"][0]["args"]["model"]
    assert model.startswith("/models/") and mounts["/models"]["readOnly"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_containers_get_secrets_cache_and_probes(overlay):
    rayservice = only(kustomize(f"overlays/{overlay}"), "RayService")
    example_s3 = {
        d["metadata"]["name"]: d["stringData"] for d in load_yaml(K8S / "secrets.example.yaml")
    }["flora-s3"]
    for name, group in ray_groups(rayservice):
        spec = group["template"]["spec"]
        container = spec["containers"][0]
        env = {e["name"]: e for e in container.get("env", [])}
        from_secrets = {ref["secretRef"]["name"] for ref in container.get("envFrom", [])}
        for var, secret in SECRET_ENV.items():
            if var in env:
                assert env[var]["valueFrom"]["secretKeyRef"]["name"] == secret, (name, var)
            else:  # through envFrom: the example Secret documents the key
                assert secret in from_secrets and var in example_s3, (name, var)
        cache = env["FLORA_CACHE_DIR"]["value"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == cache]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert "sizeLimit" in volume["emptyDir"], name
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == 8000, name  # the port KubeRay's flora-serve-svc exposes
        if name == "head":  # KubeRay's own probes: see the comment in k8s/base/rayservice.yaml
            assert "readinessProbe" not in container and "livenessProbe" not in container
        else:
            probe = container["readinessProbe"]["httpGet"]
            assert (probe["path"], probe["port"]) == ("/readyz", "serve"), name


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_container_requests_resources_and_probes_name_real_ports(path):
    for label, spec in workloads(kustomize(path)):
        for container in spec["containers"]:
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= requests.keys(), (label, container["name"])
            ports = {p.get("name") for p in container.get("ports", [])}
            for kind in ("readinessProbe", "livenessProbe"):
                handler = container.get(kind, {})
                port = (handler.get("httpGet") or handler.get("tcpSocket") or {}).get("port")
                assert not isinstance(port, str) or port in ports, (label, kind, port)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_no_secret_is_rendered_and_images_are_the_platforms(path):
    docs = kustomize(path)
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created by hand, never here"
    images = {c["image"] for _, spec in workloads(docs) for c in spec["containers"]}
    ours = {image for image in images if "flora-serve" in image}
    assert ours and all(":0.1.0-" in image for image in ours), images


def test_the_example_secrets_hold_placeholders_only():
    docs = load_yaml(K8S / "secrets.example.yaml")
    values = [v for d in docs for v in d["stringData"].values()]
    assert values and all("CHANGE-ME" in v for v in values), values
    for kustomization in K8S.rglob("kustomization.yaml"):
        assert "secrets.example" not in kustomization.read_text(), kustomization


def test_standalone_manifests_validate_without_kubectl():
    """Complete objects (Redis, the models volume and Job) validate even where kubectl is absent."""
    for path in [K8S / "base" / "redis.yaml", *(K8S / "models").glob("[!k]*.yaml")]:
        for doc in load_yaml(path):
            validate(doc, "latest")
    base = load_yaml(K8S / "base" / "rayservice.yaml")[0]
    base["spec"]["serveConfigV2"] = ""  # each overlay supplies it
    assert problems(base, pinned("ray")) == []
