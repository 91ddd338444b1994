"""Deferred outputs (EngineConfig.defer_outputs, on by default on a GPU): a step's tokens are detokenized
and emitted while the device runs the next step. Forced on here over the CPU, where it changes only
the order of the engine's own work: every stream must come out exactly as without it, a stop string
found one step late must not leak the extra token, and nothing may hold a KV block afterwards."""
from __future__ import annotations

from service.engine.request import SamplingParams
from tests.engine.engine_helpers import Collector, generate, greedy, make_engine, random_prompt, run_engine

EOS = 2


def workload(stop: str) -> tuple[dict[str, list[int]], dict[str, SamplingParams]]:
    prompts = {f"r{i}": random_prompt(300 + i, n) for i, n in enumerate([5, 40, 17, 90, 33, 64])}
    params = {
        "r0": greedy(12, logprobs=2),
        "r1": SamplingParams(temperature=1.0, seed=5, max_tokens=24, stop=[stop]),  # a stop string
        "r2": SamplingParams(temperature=0.8, seed=1, max_tokens=15, n=2),
        "r3": greedy(20, logit_bias={EOS: 100.0}, min_tokens=4),  # EOS as its fifth token
        "r4": SamplingParams(temperature=1.0, seed=5, max_tokens=24, stop=[stop], include_stop_str_in_output=True),
        "r5": greedy(1),
    }
    return prompts, params


def test_deferred_outputs_equal_immediate_ones(tiny_loaded):
    engine = make_engine(tiny_loaded)
    assert engine.core.outputs.defer is False  # the default on a CPU
    free = generate(engine, {"r1": random_prompt(301, 40)},
                    SamplingParams(temperature=1.0, seed=5, max_tokens=24))["r1"].text
    stop = free[len(free) // 2: len(free) // 2 + 3]
    prompts, params = workload(stop)
    results, preempted = [], []
    for defer in (False, True):
        # Few blocks: requests are preempted and recomputed while outputs are deferred.
        engine = make_engine(tiny_loaded, num_blocks=9, max_num_batched_tokens=64, defer_outputs=defer)
        engine.events.on_step.append(lambda stats: preempted.append(stats.num_preempted))
        results.append(generate(engine, prompts, params))
    assert sum(preempted) >= 2
    keys = sorted(results[0].results)
    assert keys == sorted(results[1].results) and len(keys) == 7
    for key in keys:
        immediate, deferred = results[0][key], results[1][key]
        assert [(o.new_text, o.new_token_ids, o.finish_reason, o.logprobs, o.top_logprobs, o.num_output_tokens)
                for o in deferred.outputs] == \
               [(o.new_text, o.new_token_ids, o.finish_reason, o.logprobs, o.top_logprobs, o.num_output_tokens)
                for o in immediate.outputs], key
    assert results[1]["r1"].finish_reason == "stop" and stop not in results[1]["r1"].text
    assert results[1]["r4"].text.endswith(stop)
    assert results[1]["r3"].token_ids[4] == EOS and results[1]["r3"].finish_reason == "stop"


def test_a_token_is_emitted_during_the_next_step(tiny_loaded):
    engine = make_engine(tiny_loaded, defer_outputs=True)
    collector = Collector()
    engine.add_request(random_prompt(2, 20), greedy(3), "a", collector)
    engine.step()  # the prefill samples the first token; it waits for the next step
    assert "a" not in {key[0] for key in collector.results}
    engine.step()  # emits the first, samples the second
    assert collector["a"].token_ids and len(collector["a"].token_ids) == 1
    run_engine(engine, collector)
    assert len(collector["a"].token_ids) == 3 and collector["a"].finish_reason == "length"


def test_abort_drops_a_deferred_output_and_frees_the_blocks(tiny_loaded):
    engine = make_engine(tiny_loaded, defer_outputs=True)
    collector = Collector()
    engine.add_request(random_prompt(3, 30), greedy(40), "a", collector)
    engine.add_request(random_prompt(4, 30), greedy(5), "b", collector)
    for _ in range(4):
        engine.step()
    emitted = len(collector["a"].token_ids)
    engine.abort("a")  # one token of "a" is still deferred
    engine.step()
    assert collector["a"].finish_reason == "abort" and len(collector["a"].token_ids) == emitted
    run_engine(engine, collector)  # no blocks leaked, no output after the last
    assert collector["b"].finish_reason == "length" and len(collector["b"].token_ids) == 5


def test_engine_thread_flushes_deferred_outputs(tiny_loaded):
    engine = make_engine(tiny_loaded, defer_outputs=True)
    collector = Collector()
    engine.start()
    try:
        for i in range(3):
            engine.add_request(random_prompt(10 + i, 12), greedy(6), f"t{i}", collector)
        assert collector.wait([(f"t{i}", 0) for i in range(3)], timeout=60)
    finally:
        engine.stop()
    assert all(len(collector[f"t{i}"].token_ids) == 6 for i in range(3))
    assert engine.core.blocks.num_used == 0
