"""The engine over a tiny random model with the SmolLM2 vocabulary, driven offline step by step.

The tiny random model mostly repeats its last token under greedy decoding, so token equality alone
says little; the tests also compare the sampled tokens' logprobs, which depend on the whole context
(changing one early prompt token moves them by ~1e-2, far above the 1e-4 tolerance used here).
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from model.network.attention import AttentionMetadata
from service.engine.heap import MIN_TOKENS
from service.engine.request import SamplingParams
from tests.engine.engine_helpers import Collector, generate, greedy, make_engine, random_prompt, run_engine

LOGPROB_ATOL = 1e-4
LENGTHS = [3, 9, 16, 17, 31, 40, 63, 64, 65, 80, 100, 129, 150, 5, 33, 200]  # some > the 64-token budget


def prompts_of_lengths(lengths, seed0=0) -> dict[str, list[int]]:
    return {f"r{i}": random_prompt(seed0 + i, n) for i, n in enumerate(lengths)}


def assert_same(a: Collector, b: Collector, keys) -> None:
    for key in keys:
        assert a[key].token_ids == b[key].token_ids, key
        assert a[key].finish_reason == b[key].finish_reason, key
        assert a[key].logprobs == pytest.approx(b[key].logprobs, abs=LOGPROB_ATOL), key


def alone(loaded, prompts: dict[str, list[int]], params, **options) -> Collector:
    """Each prompt in a fresh engine of its own: no batch, no shared cache."""
    merged = Collector()
    for request_id, ids in prompts.items():
        got = generate(make_engine(loaded, **options), {request_id: ids}, params)
        merged.results.update(got.results)
    return merged


@pytest.fixture(scope="module")
def invariance_prompts():
    return prompts_of_lengths(LENGTHS)


@pytest.fixture(scope="module")
def alone_results(tiny_loaded, invariance_prompts):
    return alone(tiny_loaded, invariance_prompts, greedy(10, logprobs=0), max_num_batched_tokens=64)


def test_batch_invariance(tiny_loaded, invariance_prompts, alone_results):
    engine = make_engine(tiny_loaded, max_num_batched_tokens=64)
    steps = []
    engine.events.on_step.append(steps.append)
    together = generate(engine, invariance_prompts, greedy(10, logprobs=0))
    assert_same(alone_results, together, [(k, 0) for k in invariance_prompts])
    assert max(s.num_sequences for s in steps) >= 8, "the requests did run batched"
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in steps), "no mixed prefill+decode step"
    assert engine.core.scheduler.num_preemptions == 0


def test_batch_invariance_under_preemption(tiny_loaded, invariance_prompts, alone_results):
    engine = make_engine(tiny_loaded, num_blocks=24, max_num_batched_tokens=64)
    together = generate(engine, invariance_prompts, greedy(10, logprobs=0))
    assert engine.core.scheduler.num_preemptions > 0
    assert_same(alone_results, together, [(k, 0) for k in invariance_prompts])


def test_prefix_caching_reuses_blocks_and_gives_the_same_output(tiny_loaded):
    prefix = random_prompt(100, 256)
    first, second = prefix + random_prompt(101, 20), prefix + random_prompt(102, 30)
    engine = make_engine(tiny_loaded)
    generate(engine, {"first": first}, greedy(8))
    hits = engine.core.blocks.prefix_hits
    cached = generate(engine, {"second": second}, greedy(8, logprobs=0))
    assert cached["second"].last.num_cached_tokens >= 256
    assert cached["second"].last.num_cached_tokens % 16 == 0
    assert engine.core.blocks.prefix_hits - hits >= 256
    uncached = generate(make_engine(tiny_loaded, enable_prefix_caching=False), {"second": second},
                        greedy(8, logprobs=0))
    assert uncached["second"].last.num_cached_tokens == 0
    assert_same(cached, uncached, [("second", 0)])


def test_abort_running_request_frees_its_blocks(tiny_loaded):
    engine = make_engine(tiny_loaded)
    collector = Collector()
    for i, n in enumerate([30, 50, 70]):
        engine.add_request(random_prompt(200 + i, n), greedy(40), f"r{i}", collector)
    while ("r1", 0) not in collector.results or len(collector["r1"].outputs) < 3:
        engine.step()
    assert not collector["r1"].last.finished
    engine.abort("r1")
    engine.step()
    assert collector["r1"].finish_reason == "abort"
    assert "r1" not in engine.core.groups
    others = sum(len(engine.core.blocks.table(engine.core.groups[f"r{i}"].sequences[0].seq_id)) for i in (0, 2))
    assert engine.core.blocks.num_used == others
    engine.abort("unknown")  # harmless
    run_engine(engine, collector)
    assert collector["r0"].finish_reason == collector["r2"].finish_reason == "length"
    assert len(collector["r1"].token_ids) < 40


def test_abort_before_first_step(tiny_loaded):
    engine = make_engine(tiny_loaded)
    collector = Collector()
    engine.add_request(random_prompt(1, 10), greedy(5), "a", collector)
    engine.abort("a")
    run_engine(engine, collector)
    assert collector["a"].finish_reason == "abort" and collector["a"].token_ids == []


def test_n_samples_share_the_prompt_and_are_reproducible(tiny_loaded):
    prompt = random_prompt(300, 40)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8)
    engine = make_engine(tiny_loaded)
    first = generate(engine, {"g": prompt}, params)
    assert sorted(first.results) == [("g", 0), ("g", 1), ("g", 2)]
    samples = [first[("g", i)].token_ids for i in range(3)]
    assert all(len(s) == 8 for s in samples)
    assert len({tuple(s) for s in samples}) > 1, "samples with different seeds should differ"
    # The two siblings waited for the first's prompt and reused its two full blocks.
    assert [first[("g", i)].last.num_cached_tokens for i in range(3)] == [0, 32, 32]
    assert engine.core.blocks.prefix_hits == 64
    again = generate(make_engine(tiny_loaded), {"g": prompt}, params)
    assert [again[("g", i)].token_ids for i in range(3)] == samples
    cached_run = generate(engine, {"g": prompt}, params)  # same engine: the prompt is cached now
    assert [cached_run[("g", i)].token_ids for i in range(3)] == samples


def test_seeded_sampling_alone_equals_in_a_batch(tiny_loaded):
    target = random_prompt(400, 37)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12, logprobs=0)
    solo = generate(make_engine(tiny_loaded), {"t": target}, params)
    batch = {"t": target} | {f"o{i}": random_prompt(410 + i, 10 + 25 * i) for i in range(5)}
    mixed_params = {"t": params, "o0": SamplingParams(temperature=1.0, max_tokens=20),
                    "o1": SamplingParams(temperature=1.0, seed=1234, max_tokens=5),
                    "o2": greedy(15), "o3": SamplingParams(temperature=0.5, top_k=5, max_tokens=9),
                    "o4": SamplingParams(temperature=1.0, max_tokens=30)}
    together = generate(make_engine(tiny_loaded, max_num_batched_tokens=32), batch, mixed_params)
    assert_same(solo, together, [("t", 0)])
    cramped = make_engine(tiny_loaded, num_blocks=12, max_num_batched_tokens=32)
    preempted = generate(cramped, batch, mixed_params)
    assert cramped.core.scheduler.num_preemptions > 0
    assert_same(solo, preempted, [("t", 0)])


def test_logprobs_match_a_full_forward(tiny_loaded):
    prompt = random_prompt(500, 45)
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=10, logprobs=3)
    result = generate(make_engine(tiny_loaded, max_num_batched_tokens=16), {"lp": prompt}, params)["lp"]
    outputs = result.token_ids
    assert len(result.logprobs) == len(result.top_logprobs) == len(outputs) == 10
    ids = prompt + outputs[:-1]
    meta = AttentionMetadata.build([len(ids)], [len(ids)], None)
    with torch.inference_mode():
        logits = tiny_loaded.model(torch.tensor(ids), meta, None,
                                   logits_index=torch.arange(len(prompt) - 1, len(ids)))
    expected = logits.log_softmax(dim=-1)  # (10, V)
    for step, token in enumerate(outputs):
        assert result.logprobs[step] == pytest.approx(expected[step, token].item(), abs=LOGPROB_ATOL)
        top = result.top_logprobs[step]
        values, top_ids = expected[step].topk(3)
        assert [t for t, _ in top] == top_ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=LOGPROB_ATOL)


def test_step_failure_fails_only_that_step(tiny_loaded):
    engine = make_engine(tiny_loaded, max_num_seqs=2)
    collector = Collector()
    for i in range(3):
        engine.add_request(random_prompt(600 + i, 20), greedy(6), f"r{i}", collector)
    engine.step()
    assert engine.core.scheduler.num_running == 2 and engine.core.scheduler.num_waiting == 1

    def fail_once(*args, **kwargs):
        del engine.core.runner.execute  # back to the real method for the next step
        raise RuntimeError("injected failure")

    engine.core.runner.execute = fail_once
    engine.step()
    for request_id in ("r0", "r1"):
        assert collector[request_id].finish_reason == "error"
        assert "injected failure" in collector[request_id].last.error
    assert engine.core.blocks.num_used == 0
    later = random_prompt(610, 25)
    engine.add_request(later, greedy(6, logprobs=0), "later", collector)
    run_engine(engine, collector)
    assert collector["r2"].finish_reason == "length" and len(collector["r2"].token_ids) == 6
    assert collector["later"].finish_reason == "length"
    fresh = generate(make_engine(tiny_loaded), {"later": later}, greedy(6, logprobs=0))
    assert_same(fresh, collector, [("later", 0)])
    assert engine.snapshot.healthy


def test_duplicate_request_id_is_refused_without_breaking_the_loop(tiny_loaded):
    engine = make_engine(tiny_loaded)
    first, second = Collector(), Collector()
    engine.add_request(random_prompt(620, 10), greedy(5), "dup", first)
    engine.step()
    engine.add_request(random_prompt(621, 10), greedy(5), "dup", second)
    run_engine(engine, first)
    assert first["dup"].finish_reason == "length" and len(first["dup"].token_ids) == 5
    assert second["dup"].finish_reason == "error" and "already in use" in second["dup"].last.error
    assert second["dup"].token_ids == []
    # Once the first has finished, its id may be used again.
    again = generate(engine, {"dup": random_prompt(621, 10)}, greedy(5))
    assert again["dup"].finish_reason == "length"


def test_a_long_prefill_step_returns_its_freed_memory_and_decode_steps_do_not(tiny_loaded):
    """service/engine/heap.py: the heap is trimmed after each CPU step of >= MIN_TOKENS tokens, never after
    the decode steps (trimming there cost 16-client decode ~20%)."""
    engine = make_engine(tiny_loaded)
    long_prompt = random_prompt(0, MIN_TOKENS + 172)
    generate(engine, {"long": long_prompt}, greedy(max_tokens=4))  # one prefill step, then 3 decode steps
    assert engine.core.heap.trims == 1
    generate(engine, {f"short{i}": random_prompt(i + 1, MIN_TOKENS // 4) for i in range(2)}, greedy(max_tokens=4))
    assert engine.core.heap.trims == 1  # a step of MIN_TOKENS / 2 tokens, then decode


def test_an_engine_and_its_kv_cache_are_freed_when_its_last_user_lets_go(tiny_loaded):
    """No reference cycle keeps an engine alive: its KV cache (a GiB by default on a CPU) is released at once,
    not at some later garbage collection (a benchmark building engine after engine ran out of memory)."""
    gc.collect()
    gc.disable()
    try:
        engine = make_engine(tiny_loaded, 64)
        generate(engine, {"a": random_prompt(1, 40), "b": random_prompt(2, 7)}, greedy(6))
        cache, core = weakref.ref(engine.core.runner.kv_caches[0][0]), weakref.ref(engine.core)
        del engine
        assert cache() is None and core() is None
    finally:
        gc.enable()
