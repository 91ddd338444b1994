"""Constrained decoding through the engine, over the tiny random model (valid output is by construction,
so a random model shows it as well as a real one): regex and choice outputs, n>1, preemption and deferred
outputs keep matchers in step, a request waits for its grammar while others decode, refusals name the
field, block accounting stays exact, and the metrics see it all."""
from __future__ import annotations

import asyncio
import re
import threading

import pytest
from prometheus_client import generate_latest

from service.engine.errors import RequestRejected
from service.engine.request import SamplingParams
from service.engine.structured import StructuredOutput
from service.metrics import Metrics
from tests.engine.engine_helpers import Collector, generate, greedy, make_engine, random_prompt, run_engine

WORD = "[a-z]{10,14}"  # bounded: a random model still finishes it within max_tokens
PAIR = r"[a-z]{3,5} [0-9]{2}"


@pytest.fixture(scope="module")
def engine(tiny_loaded):
    return make_engine(tiny_loaded, num_blocks=128)


def constrained(pattern: str = WORD, max_tokens: int = 32, **params) -> SamplingParams:
    params.setdefault("temperature", 0)
    return SamplingParams(max_tokens=max_tokens, structured=StructuredOutput(regex=pattern), **params)


def workload() -> tuple[dict[str, list[int]], dict[str, SamplingParams]]:
    prompts = {f"r{i}": random_prompt(700 + i, n) for i, n in enumerate([9, 40, 23, 70, 31, 12])}
    params = {"r0": constrained(), "r1": greedy(20), "r2": constrained(PAIR, temperature=0.9, seed=4, n=2),
              "r3": constrained(temperature=1.0, seed=7), "r4": greedy(16, logprobs=1),
              "r5": SamplingParams(max_tokens=8, temperature=0, structured=StructuredOutput(choice=["alpha", "beta"]))}
    return prompts, params


def outputs_of(collector: Collector) -> dict:
    return {key: (result.token_ids, result.text, result.finish_reason) for key, result in collector.results.items()}


def test_regex_and_choice_outputs_match_and_stop(engine):
    prompts, params = workload()
    results = generate(engine, prompts, params)
    for key in ("r0", "r3"):
        assert re.fullmatch(WORD, results[key].text) and results[key].finish_reason == "stop", results[key].text
    texts = [results[("r2", i)].text for i in range(2)]
    assert all(re.fullmatch(PAIR, t) for t in texts), texts
    assert results["r5"].text in ("alpha", "beta") and results["r5"].finish_reason == "stop"
    assert results["r5"].last.stop_reason is None  # ended by the grammar, not by sampling EOS


def test_each_of_n_samples_has_its_own_matcher(engine):
    results = generate(engine, {"n": random_prompt(5, 14)}, constrained(PAIR, temperature=1.2, seed=11, n=4))
    texts = [results[("n", i)].text for i in range(4)]
    assert all(re.fullmatch(PAIR, t) for t in texts) and len(set(texts)) > 1, texts


def compiled_first(engine, params: dict[str, SamplingParams]):
    """Compile every constraint before the requests arrive, so none waits and the schedule is the same
    from run to run."""
    for p in params.values():
        if p.structured is not None:
            engine.grammars.compile(p.structured).result(timeout=30)
    return engine


def test_preemption_and_deferred_outputs_give_the_same_outputs(tiny_loaded):
    prompts, params = workload()
    reference = outputs_of(generate(make_engine(tiny_loaded, num_blocks=128), prompts, params))
    for defer in (False, True):
        # 8 blocks: constrained sequences are preempted mid-output and recomputed, their matchers kept.
        engine = compiled_first(make_engine(tiny_loaded, num_blocks=8, max_num_batched_tokens=32,
                                            defer_outputs=defer), params)
        preempted = []  # preemptions of constrained sequences
        engine.events.on_finish.append(lambda seq: preempted.append(seq.num_preemptions * bool(seq.grammar)))
        assert outputs_of(generate(engine, prompts, params)) == reference
        assert sum(preempted) >= 2


def test_a_max_tokens_cut_is_length(engine):
    result = generate(engine, {"x": random_prompt(6, 10)}, constrained("[a-z]{40}", max_tokens=3))["x"]
    assert result.finish_reason == "length" and len(result.token_ids) == 3
    assert re.fullmatch("[a-z]+", result.text)


def test_a_complete_grammar_ends_before_min_tokens(engine):
    result = generate(engine, {"x": random_prompt(7, 10)},
                      SamplingParams(temperature=0, max_tokens=10, min_tokens=6,
                                     structured=StructuredOutput(choice=["ok"])))["x"]
    assert result.text == "ok" and result.finish_reason == "stop"


def test_a_request_waits_for_its_grammar_while_others_decode(tiny_loaded):
    engine = make_engine(tiny_loaded, num_blocks=64)
    gate = threading.Event()
    blockers = [engine.grammars._pool.submit(gate.wait) for _ in range(2)]  # both compile workers busy
    collector = Collector()
    engine.add_request(random_prompt(8, 12), greedy(6), "free", collector)
    engine.add_request(random_prompt(9, 12), constrained(n=2), "bound", collector)
    for _ in range(3):
        engine.step()
    assert len(collector["free"].token_ids) == 3 and ("bound", 0) not in collector.results
    assert engine.snapshot.num_awaiting_grammar == 2 and engine.snapshot.num_waiting == 2
    gate.set()
    assert all(b.result(timeout=10) for b in blockers)
    run_engine(engine, collector)
    assert all(re.fullmatch(WORD, collector[("bound", i)].text) for i in range(2))
    assert engine.snapshot.num_awaiting_grammar == 0


def test_abort_while_awaiting_a_grammar_leaks_nothing(tiny_loaded):
    engine = make_engine(tiny_loaded, num_blocks=32)
    gate = threading.Event()
    for _ in range(2):
        engine.grammars._pool.submit(gate.wait)
    collector = Collector()
    engine.add_request(random_prompt(10, 12), constrained(), "a", collector)
    engine.step()
    engine.abort("a")
    engine.step()
    gate.set()
    run_engine(engine, collector)
    assert collector["a"].finish_reason == "abort" and not engine.core.awaiting


BAD = StructuredOutput(json={"type": "object", "properties": {"a": {"type": "integr"}}},
                       param="response_format.json_schema.schema")


def test_a_refused_grammar_is_a_clear_error(tiny_loaded):
    engine = make_engine(tiny_loaded, num_blocks=32)
    collector = Collector()
    try:  # the compile may or may not have finished by the time add_request looks
        engine.add_request([5, 6], SamplingParams(structured=BAD), "first", collector)
    except RequestRejected as exc:
        assert exc.param == BAD.field and "integr" in str(exc)
    else:
        run_engine(engine, collector)
        last = collector["first"].last
        assert last.finish_reason == "error" and last.error.startswith(f"{BAD.field}: invalid JSON schema")
    with pytest.raises(RequestRejected, match="integr") as info:  # known now: refused at once
        engine.add_request([5, 6], SamplingParams(structured=BAD), "again", collector)
    assert info.value.param == BAD.field
    other = StructuredOutput(regex="(unclosed", param="structured_outputs.regex")
    with pytest.raises(RequestRejected, match="unclosed group") as info:
        asyncio.run(engine.check_structured(other))
    assert info.value.param == "structured_outputs.regex"
    run_engine(engine, collector)


def test_metrics_count_kinds_compiles_and_failures(tiny_loaded):
    engine = make_engine(tiny_loaded, num_blocks=32)
    metrics = Metrics()
    metrics.attach(engine, "tiny", "test")
    asyncio.run(engine.check_structured(StructuredOutput(regex="[0-9]{4}")))
    for i in range(2):  # the second is a cache hit: no compile
        engine.add_request([5, 6], constrained("[0-9]{4}"), f"r{i}", Collector())
    with pytest.raises(RequestRejected):
        asyncio.run(engine.check_structured(StructuredOutput(grammar="start: nope")))
    run_engine(engine)
    value = metrics.registry.get_sample_value
    assert value("kvserve_structured_requests_total", {"kind": "regex"}) == 2
    assert value("kvserve_structured_requests_total", {"kind": "json"}) == 0
    assert value("kvserve_grammar_compile_seconds_count", {"kind": "regex"}) == 1
    assert value("kvserve_grammar_compile_failures_total", {"kind": "grammar"}) == 1
    assert value("kvserve_request_failure_total", {"reason": "rejected"}) == 1
    assert b"kvserve_num_requests_awaiting_grammar 0.0" in generate_latest(metrics.registry)
