"""`serve run <config>` in a subprocess, as a user starts FLoRA Serve (the fault runs and the
end-to-end tests).

What differs from a user's shell, and why:

* the config is a copy of the YAML with only ``http_options.port`` changed to a free port (8000
  may be taken on a dev or CI machine); everything else, args included, is the file's;
* ``RAY_TMPDIR`` is a fresh directory: ``serve run`` (``ray.init()`` without an address) would
  join a cluster that ``ray start`` left recorded in /tmp/ray, and the variable marks every
  process of this Ray session (it is in their environment), so teardown can prove none is left;
* ``RAY_ADDRESS``, ``FLORA_REDIS_URL`` and ``FLORA_STORE_URL`` are unset: a local cluster and the
  embedded registry (SQLite + files in a fresh ``FLORA_DATA_DIR``), as the demo YAML intends,
  unless ``extra_env`` sets them.

``ray.init()`` gives the local GCS a random free port (only ``ray start --head`` defaults to
6379), so a redis-server already on 6379 does not collide. Finding the Ray processes left behind
needs psutil (the ``bench`` extra).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import yaml

from flora.bench.processes import free_port

if TYPE_CHECKING:
    import psutil

ADMIN_KEY = "flr_admin_serve-run"
READY_TIMEOUT_S = 180.0


class ServeRunError(RuntimeError):
    """`serve run` did not become ready; the message ends with its output."""


def serve_binary() -> str:
    beside = Path(sys.executable).with_name("serve")
    found = str(beside) if beside.is_file() else shutil.which("serve")
    if found is None:
        raise RuntimeError("the `serve` command (ray[serve]) is not installed")
    return found


def _default_sigint() -> None:
    """Ctrl-C must reach `serve run` even when started where SIGINT is ignored (a background job
    of a script): an ignored SIGINT is inherited, and Python then never raises
    KeyboardInterrupt, so `serve run` would not shut its cluster down."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ServeRun:
    """One ``serve run`` process and the local Ray cluster it starts.

    ``config`` is a Serve config (``deployments/starcoder.yaml``), ``cache_dir`` the
    ``FLORA_CACHE_DIR`` (where the tiny model is built), ``admin_key`` the ``FLORA_ADMIN_KEY``;
    the process runs in ``cwd`` (default: this process's).
    """

    def __init__(
        self,
        workdir: Path,
        cache_dir: Path,
        config: Path,
        extra_env: dict[str, str] | None = None,
        *,
        admin_key: str = ADMIN_KEY,
        cwd: Path | None = None,
    ):
        self.workdir, self.cache_dir = workdir, cache_dir
        self.extra_env = extra_env or {}
        self.admin_key, self.cwd = admin_key, cwd
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
        config_path = self.workdir / "serve-run.yaml"
        config_path.write_text(yaml.safe_dump(copy, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        for name in ("RAY_ADDRESS", "FLORA_REDIS_URL", "FLORA_STORE_URL"):
            env.pop(name, None)
        env |= {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            "RAY_TMPDIR": self.ray_tmp,
            "FLORA_ADMIN_KEY": self.admin_key,
            "FLORA_DATA_DIR": str(self.workdir / "data"),
            "FLORA_CACHE_DIR": str(self.cache_dir),
        }
        env |= self.extra_env
        log = open(self.log_path, "wb")  # noqa: SIM115 (lives with the process)
        self.process = subprocess.Popen(
            [serve_binary(), "run", str(config_path)],
            cwd=self.cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of ours reaches it only through stop()
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
        raise ServeRunError(f"{message}\n{text}")

    def session_processes(self) -> list[psutil.Process]:
        """Every live process of this Ray session: they all inherit our RAY_TMPDIR."""
        import psutil

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
        import psutil

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
