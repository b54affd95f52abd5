"""``AsyncEngine``: concurrent streams on one background loop, cancellation, shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from flora.engine import (
    AsyncEngine,
    EngineStoppedError,
    FinishReason,
    Request,
    SamplingParams,
    UnknownAdapterError,
)
from tests.engine.conftest import ADAPTERS, random_prompts, tokens_of


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


async def collect(engine: AsyncEngine, request: Request) -> list:
    return [out async for out in engine.generate(request)]


def test_concurrent_streams_match_reference(make_engine, reference, seed):
    names = [*list(ADAPTERS)[:10], None, None]
    prompts = random_prompts(seed, [3 + 2 * i for i in range(len(names))])

    async def main():
        async with AsyncEngine(make_engine(adapter_slots=6)) as engine:
            requests = [
                Request(prompt_ids=p, params=greedy(6), adapter=n)
                for p, n in zip(prompts, names, strict=True)
            ]
            streams = await asyncio.gather(*(collect(engine, r) for r in requests))
            return streams, await engine.stats(), engine.steps

    streams, stats, steps = asyncio.run(main())
    for stream, p, n in zip(streams, prompts, names, strict=True):
        assert tokens_of(stream) == reference(p, 6, n)
        assert [o.finished for o in stream] == [False] * (len(stream) - 1) + [True]
        assert stream[-1].usage.completion_tokens == 6
    assert steps < 6 * len(names), "requests must share steps, not run one after another"
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_leaving_a_stream_early_frees_its_kv(make_engine, seed):
    prompt = random_prompts(seed, [20])[0]

    async def main():
        async with AsyncEngine(make_engine(adapters=False)) as engine:
            got = 0
            async for _ in engine.generate(Request(prompt_ids=prompt, params=greedy(100))):
                got += 1
                if got == 3:
                    break  # a client that disconnects
            for _ in range(100):
                stats = await engine.stats()
                if stats["running"] == 0:
                    break
                await asyncio.sleep(0.01)
            return stats

    stats = asyncio.run(main())
    assert stats["running"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_task_cancellation_aborts_the_request(make_engine, seed):
    prompt = random_prompts(seed, [10])[0]

    async def main():
        async with AsyncEngine(make_engine(adapters=False)) as engine:
            task = asyncio.create_task(
                collect(engine, Request(prompt_ids=prompt, params=greedy(150)))
            )
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(100):
                stats = await engine.stats()
                if stats["running"] == 0:
                    break
                await asyncio.sleep(0.01)
            return stats

    stats = asyncio.run(main())
    assert stats["running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_bad_request_raises_before_streaming_and_engine_survives(make_engine):
    async def main():
        async with AsyncEngine(make_engine()) as engine:
            with pytest.raises(UnknownAdapterError):
                await collect(engine, Request(prompt_ids=[1], adapter="nope"))
            return await collect(engine, Request(prompt_ids=[1, 2], params=greedy(2)))

    stream = asyncio.run(main())
    assert stream[-1].finish_reason is FinishReason.LENGTH


def test_shutdown_answers_in_flight_requests(make_engine):
    async def main():
        engine = AsyncEngine(make_engine(adapters=False)).start()
        task = asyncio.create_task(collect(engine, Request(prompt_ids=[1, 2], params=greedy(150))))
        for _ in range(1000):  # shut down once the request is in flight, not before it arrives
            if engine.engine.sequences:
                break
            await asyncio.sleep(0.005)
        await asyncio.to_thread(engine.shutdown)
        stream = await asyncio.wait_for(task, timeout=10)
        with pytest.raises(EngineStoppedError):
            await collect(engine, Request(prompt_ids=[1]))
        return stream

    stream = asyncio.run(main())
    assert stream[-1].finished and stream[-1].finish_reason is FinishReason.ABORT


def test_a_caller_that_stops_waiting_does_not_stop_the_loop(make_engine, seed):
    """A call whose awaiting task is cancelled before the loop reaches it (a /readyz ping that
    timed out, a client gone during admission) is skipped; the loop thread keeps serving."""
    prompts = random_prompts(seed, [5])

    async def main():
        async with AsyncEngine(make_engine()) as engine:
            release = threading.Event()
            engine.call(release.wait)  # the loop is busy until released
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await asyncio.wrap_future(engine.call(lambda: None))
            release.set()
            async with asyncio.timeout(30):  # a dead loop would never answer
                outs = await collect(engine, Request(prompt_ids=prompts[0], params=greedy(3)))
            return outs, engine.running

    outs, running = asyncio.run(main())
    assert running and outs[-1].finished and len(tokens_of(outs)) == 3
