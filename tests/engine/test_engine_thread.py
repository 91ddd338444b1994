"""The engine on its own thread: submissions from another thread, a loop that dies, and stop().
Waits are bounded by timeouts; nothing asserts how long anything took."""
from __future__ import annotations

import pytest

from service.engine.errors import EngineDead
from tests.engine.engine_helpers import Collector, generate, greedy, make_engine, random_prompt

TIMEOUT = 60.0


@pytest.fixture
def started(tiny_loaded):
    engine = make_engine(tiny_loaded)
    yield engine
    engine.stop()
    assert engine._thread is None or not engine._thread.is_alive()


def test_thread_serves_requests_from_another_thread(tiny_loaded, started):
    prompts = {f"r{i}": random_prompt(700 + i, 10 + 20 * i) for i in range(4)}
    offline = generate(make_engine(tiny_loaded), prompts, greedy(8, logprobs=0))
    started.start()
    collector = Collector()
    for request_id, ids in prompts.items():
        started.add_request(ids, greedy(8, logprobs=0), request_id, collector)
    keys = [(k, 0) for k in prompts]
    assert collector.wait(keys, TIMEOUT), "requests did not finish"
    for key in keys:
        assert collector[key].token_ids == offline[key].token_ids
        assert collector[key].text == offline[key].text
        assert collector[key].logprobs == pytest.approx(offline[key].logprobs, abs=1e-4)
    started.stop()
    assert not started._thread.is_alive()
    assert started.core.blocks.num_used == 0


def start_long_request(engine, seed: int) -> Collector:
    """A request far longer than any test waits for, once its first outputs have arrived."""
    collector = Collector()
    engine.add_request(random_prompt(seed, 30), greedy(2000 - 30), "long", collector)
    assert collector.wait_outputs(("long", 0), 2, TIMEOUT)
    return collector


def test_thread_abort(started):
    started.start()
    collector = start_long_request(started, 800)
    started.abort("long")
    assert collector.wait([("long", 0)], TIMEOUT)
    assert collector["long"].finish_reason == "abort"
    assert len(collector["long"].token_ids) < 2000 - 30


def test_dead_loop_fails_everyone_and_refuses_new_work(started):
    def broken_schedule():
        raise RuntimeError("scheduler exploded")

    started.core.scheduler.schedule = broken_schedule
    collector = Collector()
    started.add_request(random_prompt(900, 10), greedy(4), "victim", collector)
    started.start()
    assert collector.wait([("victim", 0)], TIMEOUT)
    assert collector["victim"].finish_reason == "error"
    assert "scheduler exploded" in collector["victim"].last.error
    started._thread.join(TIMEOUT)
    assert not started._thread.is_alive()
    assert not started.snapshot.healthy and "scheduler exploded" in started.snapshot.dead_reason
    with pytest.raises(EngineDead):
        started.add_request(random_prompt(901, 10), greedy(4), "after", collector)
    assert started.core.blocks.num_used == 0


def test_stop_answers_outstanding_requests(started):
    started.start()
    collector = start_long_request(started, 1000)
    started.stop()
    assert not started._thread.is_alive()
    # Nothing is left hanging: the request got a final output, and the engine refuses new work.
    assert collector[("long", 0)].last.finished
    assert collector["long"].finish_reason == "abort"
    assert not started.snapshot.healthy
    with pytest.raises(EngineDead):
        started.add_request(random_prompt(1001, 10), greedy(4), "after", collector)
