"""The engine's asyncio side (Engine.submit) over the tiny model: streams from the event loop, abort on
close, synchronous refusals.
Each test runs its own event loop (asyncio.run); waits are polled with a deadline, never asserted."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from service.engine.errors import EngineOverloaded, RequestRejected
from service.engine import SamplingParams
from tests.engine.engine_helpers import generate, greedy, make_engine, random_prompt

TIMEOUT = 60.0


@pytest.fixture
def async_engine(tiny_loaded):
    engine = make_engine(tiny_loaded, max_queue=1, max_num_seqs=1).start()
    yield engine
    engine.stop()


@pytest.fixture
def roomy_async_engine(tiny_loaded):
    engine = make_engine(tiny_loaded).start()
    yield engine
    engine.stop()


async def collect(stream) -> list:
    return [out async for out in stream]


async def wait_until(condition, timeout: float = TIMEOUT) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def test_streams_equal_offline_results(tiny_loaded, roomy_async_engine):
    prompts = {f"r{i}": random_prompt(1100 + i, 8 + 30 * i) for i in range(4)}
    params = greedy(10, stop=["zzz"])  # a stop string makes the detokenizer hold text back
    offline = generate(make_engine(tiny_loaded), prompts, params)

    async def main():
        streams = [roomy_async_engine.submit(ids, params, request_id) for request_id, ids in prompts.items()]
        return await asyncio.wait_for(asyncio.gather(*map(collect, streams)), TIMEOUT)

    for request_id, outputs in zip(prompts, asyncio.run(main())):
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert "".join(o.new_text for o in outputs) == offline[request_id].text
        assert [t for o in outputs for t in o.new_token_ids] == offline[request_id].token_ids
        assert {o.request_id for o in outputs} == {request_id}


def test_n_samples_stream_ends_after_every_sample(roomy_async_engine):
    async def main():
        stream = roomy_async_engine.submit(random_prompt(1200, 20),
                                           SamplingParams(n=3, seed=1, max_tokens=5), "group")
        return await asyncio.wait_for(collect(stream), TIMEOUT)

    outputs = asyncio.run(main())
    assert sorted(o.index for o in outputs if o.finished) == [0, 1, 2]
    for index in range(3):
        assert sum(len(o.new_token_ids) for o in outputs if o.index == index) == 5


def test_closing_the_stream_aborts_and_frees_blocks(roomy_async_engine):
    engine = roomy_async_engine

    async def main():
        stream = roomy_async_engine.submit(random_prompt(1300, 40), greedy(1500), "leaver")
        first = await asyncio.wait_for(stream.__anext__(), TIMEOUT)
        assert not first.finished
        assert engine.snapshot.kv_blocks_used > 0
        await stream.aclose()
        return await wait_until(lambda: engine.snapshot.kv_blocks_used == 0 and not engine.has_unfinished())

    assert asyncio.run(main()), "the closed stream's request was not aborted"
    assert engine.snapshot.healthy


def test_breaking_out_of_an_aclosing_loop_aborts(roomy_async_engine):
    engine = roomy_async_engine
    finished = []
    engine.events.on_finish.append(lambda request: finished.append(request.finish_reason))

    async def main():
        stream = roomy_async_engine.submit(random_prompt(1400, 40), greedy(1500), "breaker")
        async with contextlib.aclosing(stream):
            async for out in stream:
                if out.num_output_tokens >= 3:
                    break
        return await wait_until(lambda: engine.snapshot.kv_blocks_used == 0 and finished == ["abort"])

    assert asyncio.run(main())


def test_refusals_are_raised_by_submit(async_engine):
    # max_queue=1, max_num_seqs=1: one running request, one waiting, then the queue is full.
    async def main():
        running = async_engine.submit(random_prompt(1500, 10), greedy(1500), "running")
        await asyncio.wait_for(running.__anext__(), TIMEOUT)  # it is running now, not queued
        waiting = async_engine.submit(random_prompt(1501, 10), greedy(3), "waiting")
        # Counted while it moves from the engine's inbox to its queue, but wait until it is queued.
        assert await wait_until(lambda: async_engine.snapshot.num_waiting == 1)
        with pytest.raises(EngineOverloaded):
            async_engine.submit(random_prompt(1502, 10), greedy(3), "refused")
        with pytest.raises(RequestRejected) as info:
            async_engine.submit([], greedy(3), "empty")
        assert info.value.param == "prompt"
        await running.aclose()  # frees the sequence slot: the waiting request runs to the end
        outputs = await asyncio.wait_for(collect(waiting), TIMEOUT)
        assert outputs[-1].finish_reason == "length"
        return await wait_until(lambda: async_engine.snapshot.kv_blocks_used == 0)

    assert asyncio.run(main())
    assert async_engine.snapshot.healthy


def test_a_closed_event_loop_does_not_break_the_engine(roomy_async_engine):
    engine = roomy_async_engine

    async def submit_and_leave():
        roomy_async_engine.submit(random_prompt(1600, 10), greedy(1000), "orphan")  # never read

    asyncio.run(submit_and_leave())  # the loop closes; delivering to it now raises RuntimeError

    async def later():
        outputs = await asyncio.wait_for(collect(roomy_async_engine.submit(random_prompt(1601, 10), greedy(4))),
                                         TIMEOUT)
        # The orphan is aborted once its output cannot be delivered, freeing its blocks.
        freed = await wait_until(lambda: not engine.has_unfinished() and engine.snapshot.kv_blocks_used == 0)
        return outputs, freed

    outputs, freed = asyncio.run(later())
    assert outputs[-1].finish_reason == "length"
    assert freed and engine.snapshot.healthy
