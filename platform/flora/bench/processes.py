"""Servers as local subprocesses on free loopback ports: redis-server and moto's S3-compatible
server, which the fault runs (and the tests) kill and restart like an outage would.

:class:`RedisServer` needs ``redis-server`` on the PATH; :class:`S3Server` runs moto's server
(``moto[server]``, in the ``dev`` extra) with this interpreter.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout}s")


class ServerProcess:
    """A server on a fixed port that can be stopped and started again (same port, same data)."""

    what = "server"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> ServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"{self.what}.log", "ab")  # noqa: SIM115 (lives with the process)
        self.process = subprocess.Popen(
            self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, self.process, self.what)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # an outage, not a clean shutdown
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class RedisServer(ServerProcess):
    what = "redis-server"

    def __init__(self, workdir: Path, *, persistent: bool = False):
        super().__init__(workdir)
        self.persistent = persistent
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary

    def command(self) -> list[str]:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"]
        if not self.persistent:
            persistence = ["--appendonly", "no"]
        address = ["--port", str(self.port), "--bind", "127.0.0.1"]
        return [self.binary, *address, "--save", "", "--dir", str(self.workdir), *persistence]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class S3Server(ServerProcess):
    """moto in server mode: a real HTTP S3 API (state lives in the process)."""

    what = "moto-server"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
