"""`serve run deployments/starcoder.yaml` in a subprocess, as a user starts FLoRA Serve.

What differs from a user's shell, and why:

* the config is a copy of the YAML with only ``http_options.port`` changed to a free port (8000
  may be taken on a dev or CI machine); everything else, args included, is the file's;
* ``RAY_TMPDIR`` is a fresh directory: ``serve run`` (``ray.init()`` without an address) would
  join a cluster that ``ray start`` left recorded in /tmp/ray, and the variable marks every
  process of this Ray session (it is in their environment), so teardown can prove none is left;
* ``RAY_ADDRESS``, ``FLORA_REDIS_URL`` and ``FLORA_STORE_URL`` are unset: a local cluster and the
  embedded registry (SQLite + files in a fresh ``FLORA_DATA_DIR``), as the demo YAML intends.

``ray.init()`` gives the local GCS a random free port (only ``ray start --head`` defaults to
6379), so a redis-server already on 6379 does not collide.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.servers import RedisServer, S3Server, free_port

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deployments" / "starcoder.yaml"
ADMIN_KEY = "flr_admin_e2e-tests"
READY_TIMEOUT_S = 180.0


def serve_binary() -> str:
    beside = Path(sys.executable).with_name("serve")
    found = str(beside) if beside.is_file() else shutil.which("serve")
    if found is None:
        raise RuntimeError("the `serve` command (ray[serve]) is not installed")
    return found


def _default_sigint() -> None:
    """Ctrl-C must reach `serve run` even when pytest runs where SIGINT is ignored (a background
    job of a script): an ignored SIGINT is inherited, and Python then never raises
    KeyboardInterrupt, so `serve run` would not shut its cluster down."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ServeRun:
    """One ``serve run`` process and the local Ray cluster it starts."""

    def __init__(
        self,
        workdir: Path,
        cache_dir: Path,
        config: Path = CONFIG,
        extra_env: dict[str, str] | None = None,
    ):
        self.workdir, self.cache_dir = workdir, cache_dir
        self.extra_env = extra_env or {}
        self.config = yaml.safe_load(config.read_text())
        self.app_args: dict = self.config["applications"][0]["args"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ray_tmp = tempfile.mkdtemp(prefix="flora-e2e-")  # short: Ray's sockets live here
        self.log_path = workdir / "serve-run.log"
        self.process: subprocess.Popen | None = None
        self.escalated = False  # Ctrl-C was not enough to stop it

    @property
    def model_dir(self) -> Path:
        return self.cache_dir / "models" / "tiny"

    def start(self) -> ServeRun:
        copy = dict(self.config, http_options=self.config["http_options"] | {"port": self.port})
        config_path = self.workdir / CONFIG.name
        config_path.write_text(yaml.safe_dump(copy, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        for name in ("RAY_ADDRESS", "FLORA_REDIS_URL", "FLORA_STORE_URL"):
            env.pop(name, None)
        env |= {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            "RAY_TMPDIR": self.ray_tmp,
            "FLORA_ADMIN_KEY": ADMIN_KEY,
            "FLORA_DATA_DIR": str(self.workdir / "data"),
            "FLORA_CACHE_DIR": str(self.cache_dir),
        }
        env |= self.extra_env
        log = open(self.log_path, "wb")  # noqa: SIM115 (lives with the process)
        self.process = subprocess.Popen(
            [serve_binary(), "run", str(config_path)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of pytest reaches it only through stop()
            preexec_fn=_default_sigint,
        )
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"`serve run` exited with {self.process.returncode} before /readyz")
            try:
                response = httpx.get(self.url + "/readyz", timeout=15)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:300]}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(1)
        self._fail(f"GET /readyz not 200 after {READY_TIMEOUT_S:.0f}s (last: {last})")

    def output(self, lines: int = 150) -> str:
        """The tail of `serve run`'s output and of the replicas' Ray logs (for failures)."""
        parts = [f"--- serve run output ({self.log_path}) ---"]
        if self.log_path.exists():
            parts += self.log_path.read_text(errors="replace").splitlines()[-lines:]
        for log in sorted(Path(self.ray_tmp).glob("ray/session_*/logs/serve/replica_*.log")):
            parts += [f"--- {log.name} ---", *log.read_text(errors="replace").splitlines()[-40:]]
        return "\n".join(parts)

    def _fail(self, message: str) -> None:
        text = self.output()
        self.stop()
        pytest.fail(f"{message}\n{text}", pytrace=False)

    def session_processes(self) -> list[psutil.Process]:
        """Every live process of this Ray session: they all inherit our RAY_TMPDIR."""
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("RAY_TMPDIR") == self.ray_tmp and p.status() != "zombie":
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def stop(self, timeout: float = 90) -> list[str]:
        """Ctrl-C as a user would, then wait; returns the session's processes that outlived
        it (killed here, by pid), so the caller can fail on them."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            for then in (self.process.terminate, self.process.kill, None):
                try:
                    self.process.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    if then is None:
                        raise
                    self.escalated = True
                    then()  # Ray's own processes share its fate
                    timeout = 20
        deadline = time.monotonic() + 30
        left = self.session_processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = self.session_processes()
        names = []
        for p in left:
            try:
                names.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
                p.kill()
            except psutil.NoSuchProcess:
                continue
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return names


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
