"""N-gram speculative decoding on the exact float32 path: outputs (tokens, logprobs, finish and stop
reasons, usage) are the same with drafts and without, greedy and seeded, alone and in mixed batches with
chunked prefill, n>1 and forced preemption; drafts are proposed and accepted where the text repeats; block
accounting stays exact through 2,000 random speculative steps with aborts."""
from __future__ import annotations

import dataclasses
import random

import pytest

from service.engine.request import SamplingParams
from service.engine.speculative import DraftState, accepted_length, propose
from tests.engine.engine_helpers import Collector, generate, make_engine, random_prompt, run_engine


def repeating_prompt(seed: int, span: int, times: int) -> list[int]:
    """A random span said several times: the text drafts are looked up in."""
    return random_prompt(seed, span) * times


def test_propose_takes_the_latest_longest_match():
    assert propose([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, 4, 2) == [7, 1]  # the latest "1 2 3" is followed by 7
    assert propose([5, 6, 1, 2, 8, 8, 6, 1, 2], 3, 3, 2) == [8, 8, 6]  # "6 1 2" (n=3) beats the later "1 2"
    assert propose([1, 2, 3, 4], 3, 3, 2) == []  # nothing repeats
    assert propose([4, 4, 4, 4], 5, 2, 2) == [4]  # what follows the match is all there is
    assert propose([1, 2, 1, 2], 0, 3, 2) == []


def test_acceptance_and_backoff():
    assert accepted_length([3, 4, 5], [3, 4, 9, 1]) == 2 and accepted_length([3], [1, 3]) == 0
    state = DraftState()
    state.record(3, 0)
    assert state.may_draft()  # one failure: no back-off yet
    state.record(3, 0)
    assert [state.may_draft() for _ in range(3)] == [False, False, True]
    state.record(2, 2)
    assert state.backoff == 1 and state.may_draft()


def workload(vocab_seed: int = 0):
    """Prompts that repeat (drafts hit) and prompts that do not, greedy, seeded and with logprobs."""
    prompts = {"rep": repeating_prompt(1, 23, 4), "rep2": repeating_prompt(2, 9, 6), "plain": random_prompt(3, 40),
               "long": repeating_prompt(4, 50, 3), "n": repeating_prompt(5, 12, 3)}
    params = {"rep": SamplingParams(temperature=0, max_tokens=40, logprobs=2),
              "rep2": SamplingParams(temperature=0.9, seed=11, max_tokens=36, top_p=0.9, logprobs=0, min_tokens=4),
              "plain": SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[100]),
              "long": SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.1, presence_penalty=0.3),
              "n": SamplingParams(temperature=1.0, seed=5, max_tokens=28, n=2)}
    return prompts, params


def summary(collector: Collector, params: dict[str, SamplingParams]) -> dict:
    """Per sample: tokens, finish and stop reasons, usage, then the logprobs it asked for (compared within
    1e-5: a draft position's logits come from a several-row forward, which adds in another order)."""
    def asked(key) -> bool:
        return params[key[0]].logprobs is not None

    return {key: ((r.token_ids, [[t for t, _ in top] for top in r.top_logprobs] if asked(key) else None,
                   r.finish_reason, r.last.stop_reason, r.last.num_output_tokens, r.last.num_prompt_tokens),
                  r.logprobs + [lp for top in r.top_logprobs for _, lp in top] if asked(key) else [])
            for key, r in collector.results.items()}


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key][0] == expected[key][0], key
        assert got[key][1] == pytest.approx(expected[key][1], abs=1e-5), key


@pytest.fixture(scope="module")
def reference(tiny_loaded):
    prompts, params = workload()
    return summary(generate(make_engine(tiny_loaded, 256), prompts, params), params)


@pytest.mark.parametrize("options", [
    {"speculative_ngram": 4},  # the default max batch (1): drafts once the others have finished
    {"speculative_ngram": 2, "max_num_batched_tokens": 32, "speculative_max_batch": 64},  # beside prefill chunks
    {"speculative_ngram": 5, "speculative_max_batch": 64},  # drafts in the whole mixed batch
], ids=["k4", "k2-chunked", "k5-whole-batch"])
def test_outputs_equal_those_without_drafts(tiny_loaded, reference, options):
    engine = make_engine(tiny_loaded, 256, **options)
    drafts = []
    engine.events.on_step.append(lambda stats: drafts.extend(stats.drafts))
    prompts, params = workload()
    assert_same(summary(generate(engine, prompts, params), params), reference)
    proposed, kept = sum(p for p, _ in drafts), sum(k for _, k in drafts)
    assert proposed > 0 and kept > 0, drafts  # the repeating prompts make drafts that are accepted


def test_one_request_at_a_time_and_per_request_k(tiny_loaded, reference):
    engine = make_engine(tiny_loaded, 256, speculative_max_batch=1)
    prompts, params = workload()
    for key in prompts:
        request = {key: prompts[key]}
        result = summary(generate(engine, request, {key: dataclasses.replace(params[key], speculative_ngram=3)}), params)
        assert_same(result, {k: v for k, v in reference.items() if k[0] == key})


@pytest.mark.parametrize("by", ["string", "token id"])
def test_a_stop_inside_accepted_drafts_ends_there(tiny_loaded, by):
    # This prompt makes the random model repeat one token six times, then another: drafts of the first
    # are accepted by the time the second comes, so the stop falls inside a drafted step.
    prompt = {"r": random_prompt(25, 7) * 6}
    free = generate(make_engine(tiny_loaded, 64), prompt, SamplingParams(temperature=0, max_tokens=40))["r"]
    ids = free.token_ids
    position = next(i for i in range(4, len(ids)) if ids[i] != ids[i - 1])
    stop = {"stop": [tiny_loaded.tokenizer.decode([ids[position]]).strip()]} if by == "string" else \
        {"stop_token_ids": [ids[position]]}
    params = {"r": SamplingParams(temperature=0, max_tokens=40, **stop)}
    plain = summary(generate(make_engine(tiny_loaded, 64), prompt, params), params)
    engine = make_engine(tiny_loaded, 64, speculative_ngram=6)
    drafts = []
    engine.events.on_step.append(lambda stats: drafts.extend(stats.drafts))
    drafted = generate(engine, prompt, params)
    assert_same(summary(drafted, params), plain)
    assert drafted["r"].finish_reason == "stop" and drafted["r"].last.num_output_tokens <= position + 1
    assert sum(kept for _, kept in drafts) >= 2


def test_forced_preemption_changes_nothing(tiny_loaded, reference):
    engine = make_engine(tiny_loaded, 22, speculative_ngram=4, speculative_max_batch=64)
    prompts, params = workload()
    assert_same(summary(generate(engine, prompts, params), params), reference)
    assert engine.core.scheduler.num_preemptions > 0


def test_block_accounting_through_random_steps_with_aborts(tiny_loaded):
    rng = random.Random(7)
    engine = make_engine(tiny_loaded, 48, speculative_ngram=4, speculative_max_batch=64,
                         max_num_batched_tokens=64)
    collector, live, steps, counter = Collector(), [], 0, 0
    while steps < 2000:
        if len(live) < 6 and rng.random() < 0.3:
            counter += 1
            request_id = f"r{counter}"
            ids = repeating_prompt(counter, rng.randrange(3, 20), rng.randrange(1, 4))
            params = SamplingParams(temperature=rng.choice([0, 0.8]), seed=counter, max_tokens=rng.randrange(1, 40),
                                    n=rng.choice([1, 1, 2]))
            engine.add_request(ids, params, request_id, collector)
            live.append(request_id)
        if live and rng.random() < 0.05:
            engine.abort(live.pop(rng.randrange(len(live))))
        engine.step()
        steps += 1
        blocks = engine.core.blocks
        held = sum(len(table) for table in blocks.tables.values())
        assert blocks.num_used <= held and blocks.num_free + blocks.num_cached + blocks.num_used == blocks.num_blocks
        for seq in engine.core.scheduler.running:  # a rejected draft's slot is given back at once
            assert len(blocks.table(seq.seq_id)) <= blocks.blocks_needed(seq.num_computed_tokens + 1)
        live = [r for r in live if r in engine.core.groups]
    run_engine(engine, collector)
