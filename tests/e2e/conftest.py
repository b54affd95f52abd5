"""`serve run deployments/starcoder.yaml` in a subprocess, as a user starts FLoRA Serve
(:class:`flora.bench.serve_run.ServeRun`: a copy of the YAML on a free port, a fresh
``RAY_TMPDIR``, the embedded registry unless told otherwise), from the repository root, with the
tests' admin key."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from flora.bench import serve_run
from tests.servers import RedisServer, S3Server

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deployments" / "starcoder.yaml"
ADMIN_KEY = "flr_admin_e2e-tests"


class ServeRun(serve_run.ServeRun):
    """``serve run`` of ``config`` (default: the demo YAML) from the repository root."""

    def __init__(
        self,
        workdir: Path,
        cache_dir: Path,
        config: Path = CONFIG,
        extra_env: dict[str, str] | None = None,
    ):
        super().__init__(workdir, cache_dir, config, extra_env, admin_key=ADMIN_KEY, cwd=REPO)


@contextmanager
def production_backends(workdir: Path) -> Iterator[dict[str, str]]:
    """A real redis-server and an S3-compatible server (moto), as the GPU yaml expects them:
    the environment `serve run` gets to use them instead of the embedded registry."""
    import boto3

    redis_server = RedisServer(workdir / "redis").start()
    s3_server = S3Server(workdir / "s3").start()
    try:
        aws = {
            "AWS_ENDPOINT_URL": s3_server.url,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        boto3.client(
            "s3",
            endpoint_url=s3_server.url,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        ).create_bucket(Bucket="flora-e2e")
        yield aws | {
            "FLORA_REDIS_URL": redis_server.url,
            "FLORA_STORE_URL": "s3://flora-e2e/adapters",
        }
    finally:
        s3_server.stop()
        redis_server.stop()


@pytest.fixture(scope="module", params=["embedded", "redis+s3"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeRun]:
    """FLoRA Serve under `serve run`, ready (GET /readyz == 200); stopped with Ctrl-C after.
    Runs twice: on the embedded registry, and on a real redis-server + S3-compatible server."""
    workdir = tmp_path_factory.mktemp("serve-run")
    cache = os.environ.get("FLORA_CACHE_DIR")  # CI keeps the tiny model between runs
    cache_dir = Path(cache) if cache else tmp_path_factory.mktemp("flora-cache")
    with ExitStack() as stack:
        env = {}
        if request.param == "redis+s3":
            env = stack.enter_context(production_backends(workdir))
        run = ServeRun(workdir, cache_dir, extra_env=env).start()
        yield run
        left = run.stop()
    assert not left, f"Ray processes outlived `serve run` (killed now): {left}"
    assert not run.escalated and run.process.returncode == 0, (
        f"`serve run` did not exit cleanly on Ctrl-C ({run.process.returncode})\n{run.output()}"
    )
