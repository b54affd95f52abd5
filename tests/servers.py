"""Real servers for tests: redis-server and moto's S3-compatible server, each a subprocess on a
free loopback port, so a test can kill and restart them like an outage would (they live in
:mod:`flora.bench.processes`, which the fault runs share); an ASGI app on a real uvicorn."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from flora.bench.processes import RedisServer, S3Server, ServerProcess, free_port, wait_for_port

__all__ = ["RedisServer", "S3Server", "ServerProcess", "free_port", "http_server", "wait_for_port"]


@contextmanager
def http_server(app: Any) -> Iterator[str]:
    """An ASGI app on a real uvicorn server in a thread, on a free port; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
