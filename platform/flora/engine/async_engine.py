"""``AsyncEngine``: the step loop on its own thread, streams to asyncio callers.

All engine state is touched only by the loop thread; callers talk to it through an inbox.
``generate`` yields :class:`RequestOutput` deltas; leaving the iterator early (cancellation,
a client that disconnects) aborts the request, which frees its KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from adapter_format import ServingLimits
from flora.engine.config import EngineConfig
from flora.engine.engine import LLMEngine
from flora.engine.request import Request, RequestOutput
from flora.model import ModelArgs, Tokenizer

log = logging.getLogger(__name__)


class EngineStoppedError(RuntimeError):
    """The engine loop is not running (never started, or shut down)."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._streams: dict[
            str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]
        ] = {}
        self._thread: threading.Thread | None = None
        self.steps = 0
        engine.on_wake(self._wake.set)

    # --- what the engine serves: fixed at start, so safe to read from any thread -------------

    @property
    def model_args(self) -> ModelArgs:
        return self.engine.model.args

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def serving_limits(self) -> ServingLimits:
        return self.engine.serving_limits

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flora-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.engine.close()

    async def __aenter__(self) -> AsyncEngine:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped.is_set()

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the engine thread between steps; its result or error comes back."""
        if not self.running:
            raise EngineStoppedError("the engine loop is not running; call start() first")
        future: Future[Any] = Future()
        with self._lock:
            self._inbox.append((fn, future))
        self._wake.set()
        return future

    async def generate(
        self, request: Request, coalesce_s: float = 0.0
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs. Bad requests raise before the first output.

        Updates that are already waiting when the caller asks for the next one come joined
        (:meth:`RequestOutput.then`), so a slow consumer gets fewer, larger deltas instead of a
        backlog; ``coalesce_s`` > 0 also waits that long after an update for more to join it
        (Ray Serve LLM's stream batching interval): fewer messages per token downstream."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def add() -> None:
            self.engine.add_request(request)
            self._streams[request.request_id] = (loop, queue)

        await asyncio.wrap_future(self.call(add))
        finished = False
        try:
            while not finished:
                out = await _joined(queue, await queue.get(), coalesce_s)
                finished = out.finished
                yield out
        finally:
            if not finished and self.running:
                self.call(lambda: self._abort(request.request_id))

    async def abort(self, request_id: str) -> None:
        await asyncio.wrap_future(self.call(lambda: self._abort(request_id)))

    def invalidate_adapter(self, name: str) -> Future[None]:
        """Drop every cached copy of ``name`` between two steps; callable from any thread (the
        registry's event thread does). Await ``asyncio.wrap_future`` of it to wait."""
        return self.call(lambda: self.engine.invalidate_adapter(name))

    async def routing_snapshot(self) -> dict[str, Any]:
        """Resident adapters (``tenant/name@version``) and load, for a request router."""
        return await asyncio.wrap_future(self.call(self.engine.routing_snapshot))

    async def stats(self) -> dict[str, int]:
        return await asyncio.wrap_future(self.call(self.engine.stats))

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self._dispatch([out])
        self._streams.pop(request_id, None)

    # --- the loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            outputs = self.engine.step()
            self.steps += 1
            if outputs:
                self._dispatch(outputs)
            else:  # everything waits on an adapter load: sleep until one finishes
                self._wake.wait(timeout=0.01)
                self._wake.clear()
        self._fail_all("the engine shut down")

    def _drain_inbox(self) -> None:
        with self._lock:
            items, self._inbox = self._inbox, []
        for fn, future in items:
            if not future.set_running_or_notify_cancel():
                continue  # the caller gave up waiting (cancelled): its call never runs
            try:
                future.set_result(fn())
            except Exception as e:  # reaches the caller as its own exception
                future.set_exception(e)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand each output to its stream's queue: one wake-up per caller loop per step (not one
        per output), since every wake-up takes the GIL from this thread."""
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is None:
                continue
            loop, queue = target
            if out.finished:
                del self._streams[out.request_id]
            per_loop.setdefault(loop, []).append((queue, out))
        for loop, items in per_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                for _, out in items:
                    self.engine.abort(out.request_id)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            items, self._inbox = self._inbox, []
        for _, future in items:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineStoppedError(message))
        for request_id in list(self._streams):
            out = self.engine.abort(request_id)
            if out is not None:
                self._dispatch([out])


def _deliver(items: list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


async def _joined(
    queue: asyncio.Queue[RequestOutput], out: RequestOutput, wait_s: float
) -> RequestOutput:
    """``out`` joined with the updates queued after it, and with those arriving in ``wait_s``."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while not out.finished:
        if queue.empty():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    out = out.then(await queue.get())
            except TimeoutError:
                break
        else:
            out = out.then(queue.get_nowait())
    return out
