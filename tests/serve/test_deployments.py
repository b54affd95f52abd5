"""The Serve config files in deployments/ are what `serve run` and `serve deploy` accept.

Cheap and cluster-free: Ray Serve's own schema for the file, ``ServeArgs`` (and the engine's
``EngineConfig``) for the app's ``args``, and the deployment names against the app's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from flora.engine import EngineConfig
from flora.serve.app import Ingress, StarCoderReplica
from flora.serve.config import ServeArgs

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"
FILES = ["starcoder.yaml", "starcoder-gpu.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOYMENTS / name).read_text())


@pytest.mark.parametrize("name", FILES)
def test_config_file_validates_against_ray_serve_and_serve_args(name):
    schema = ServeDeploySchema.model_validate(load(name))
    assert len(schema.applications) == 1
    app = schema.applications[0]
    assert app.import_path == "flora.serve.app:build_app"
    args = ServeArgs.model_validate(app.args)
    EngineConfig(device=args.device, dtype=args.dtype, **args.engine)  # extra="forbid"
    names = {d.name for d in app.deployments}
    assert names <= {StarCoderReplica.name, Ingress.name}, names


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["applications"][0]["args"].update(modell="tiny"),
        lambda c: c["applications"][0]["args"]["engine"].update(max_num_seq=4),
        lambda c: c["applications"][0]["args"].update(limits={"burst": 0}),
    ],
    ids=["unknown-arg", "unknown-engine-field", "bad-limit"],
)
def test_a_typo_in_the_args_is_refused(mutate):
    config = load("starcoder.yaml")
    mutate(config)
    args = ServeDeploySchema.model_validate(config).applications[0].args
    with pytest.raises(ValueError):
        parsed = ServeArgs.model_validate(args)
        EngineConfig(device=parsed.device, dtype=parsed.dtype, **parsed.engine)
