"""Constrained decoding with the real SmolLM2 (fp32, CPU): JSON-schema outputs of a dozen shapes validate
with jsonschema (greedy and sampled, n>1), regex and choice outputs match, a batch of 16 mixed requests
leaves the unconstrained ones' tokens exactly as they are alone, and preemption changes nothing."""
from __future__ import annotations

import re

import pytest

from service.engine.request import SamplingParams
from service.engine.structured import StructuredOutput
from tests.engine.engine_helpers import generate, greedy, make_engine
from tests.engine.structured_schemas import SCHEMAS, validate

PHONE = r"\(\d{3}\) \d{3}-\d{4}"
CHOICES = ["positive", "negative", "neutral"]


def chat(tok, question: str) -> list[int]:
    return tok.encode(tok.render_chat([{"role": "user", "content": question}]))


def json_params(schema: dict, temperature: float = 0.0, **options) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=3, max_tokens=96,
                          structured=StructuredOutput(json=schema), **options)


def assert_valid(result, schema: dict) -> None:
    assert result.finish_reason == "stop", (result.finish_reason, result.text)
    validate(result.text, schema)


@pytest.fixture(scope="module")
def engine(smollm2):
    return make_engine(smollm2, 256)


def test_json_schema_outputs_validate(engine, smollm2):
    prompts, params = {}, {}
    for name, (question, schema) in SCHEMAS.items():
        for mode, temperature in (("greedy", 0.0), ("sampled", 0.8)):
            prompts[f"{name}/{mode}"] = chat(smollm2.tokenizer, question)
            params[f"{name}/{mode}"] = json_params(schema, temperature)
    results = generate(engine, prompts, params)
    for key in prompts:
        assert_valid(results[key], SCHEMAS[key.split("/")[0]][1])


def test_each_of_n_samples_validates(engine, smollm2):
    question, schema = SCHEMAS["nested"]
    results = generate(engine, {"n": chat(smollm2.tokenizer, question)}, json_params(schema, 1.0, n=3))
    texts = [results[("n", i)].text for i in range(3)]
    for i in range(3):
        assert_valid(results[("n", i)], schema)
    assert len(set(texts)) > 1, texts


def mixed_workload(tok):
    """8 unconstrained requests (greedy, seeded sampling, a penalty) and 8 constrained ones."""
    questions = ["What is the capital of France?", "Write a haiku about rain.", "Name three planets.",
                 "What is 2 + 2?", "Say hello in Spanish.", "Describe a cat.", "Why is the sea salty?",
                 "Tell me a fun fact."]
    prompts = {f"free{i}": chat(tok, q) for i, q in enumerate(questions)}
    params = {f"free{i}": greedy(24) for i in range(5)}
    params |= {"free5": SamplingParams(temperature=0.9, seed=1, max_tokens=24),
               "free6": SamplingParams(temperature=0.7, top_p=0.9, seed=2, max_tokens=24),
               "free7": greedy(24, repetition_penalty=1.3)}
    for i, name in enumerate(["flat", "enum", "defs_ref", "array_of_objects"]):
        question, schema = SCHEMAS[name]
        prompts[f"json{i}"] = chat(tok, question)
        params[f"json{i}"] = json_params(schema, 0.0 if i % 2 else 0.7)
    prompts["phone"] = chat(tok, "What is a phone number for a pizza place?")
    params["phone"] = SamplingParams(temperature=0, max_tokens=24, structured=StructuredOutput(regex=PHONE))
    prompts["mood"] = chat(tok, "Is 'I love this!' positive, negative or neutral?")
    params["mood"] = SamplingParams(temperature=0, max_tokens=8, structured=StructuredOutput(choice=CHOICES))
    prompts["mood_sampled"] = prompts["mood"]
    params["mood_sampled"] = SamplingParams(temperature=1.0, seed=9, max_tokens=8,
                                            structured=StructuredOutput(choice=CHOICES))
    prompts["lark"] = chat(tok, "Give a yes/no answer and a confidence.")
    params["lark"] = SamplingParams(temperature=0, max_tokens=40, structured=StructuredOutput(
        grammar='start: ("yes" | "no") ", confidence " conf\nconf: %json {"type": "integer", "minimum": 0, '
                '"maximum": 100}'))
    return prompts, params


def check_constrained(results) -> None:
    for i, name in enumerate(["flat", "enum", "defs_ref", "array_of_objects"]):
        assert_valid(results[f"json{i}"], SCHEMAS[name][1])
    assert re.fullmatch(PHONE, results["phone"].text), results["phone"].text
    assert results["mood"].text in CHOICES and results["mood_sampled"].text in CHOICES
    answer = re.fullmatch(r"(yes|no), confidence (\d+)", results["lark"].text)
    assert answer and 0 <= int(answer[2]) <= 100, results["lark"].text


def test_a_mixed_batch_leaves_unconstrained_tokens_unchanged(engine, smollm2):
    prompts, params = mixed_workload(smollm2.tokenizer)
    free = {key: ids for key, ids in prompts.items() if key.startswith("free")}
    alone = generate(make_engine(smollm2, 256), free, params)
    together = generate(engine, prompts, params)
    assert len(prompts) == 16
    for key in free:
        assert together[key].token_ids == alone[key].token_ids, key
    check_constrained(together)


def test_preemption_keeps_constrained_outputs(smollm2):
    prompts, params = mixed_workload(smollm2.tokenizer)
    prompts = {k: v for k, v in prompts.items() if not k.startswith("free")}
    reference = generate(make_engine(smollm2, 256), prompts, params)
    engine = make_engine(smollm2, 10, max_num_batched_tokens=64)  # 160 tokens for 8 requests of ~40-130
    for p in params.values():  # compiled beforehand: the schedule does not depend on compile timing
        if p.structured is not None:
            engine.grammars.compile(p.structured).result(timeout=30)
    preempted = generate(engine, prompts, params)
    for key in prompts:
        assert preempted[key].token_ids == reference[key].token_ids, key
    check_constrained(preempted)
    assert engine.core.scheduler.num_preemptions >= 1  # (the tiny-model tests preempt more, and oftener)
