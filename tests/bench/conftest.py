"""Fixtures of the serving benchmarks' tests: the session's micro model and a deployment file."""

from pathlib import Path

import yaml

from tests.serve.conftest import Stack, micro_dir  # noqa: F401  (micro_dir: a fixture, by name)


def deployment_file(stack: Stack, path: Path) -> Path:
    """What `serve run` would be given for ``stack``: one application with its args."""
    args = stack.args.model_dump(mode="json")
    path.write_text(yaml.safe_dump({"applications": [{"name": "flora", "args": args}]}))
    return path
