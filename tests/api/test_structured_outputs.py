"""Structured outputs through both APIs against the session server (the exact float32 model), refereed by
the real `openai` client and jsonschema: pydantic parsing, 21 schemas of different shapes alone and in a
batch of 16 mixed requests (the unconstrained ones answering exactly as alone), vLLM's structured_outputs
and guided_* fields, regex and choice, streaming, TGI's grammar, and the metrics."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest

from tests.engine.structured_schemas import SCHEMAS, Pet, validate

pytestmark = pytest.mark.slow
MODEL = "smollm2"
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
PLAIN = ["Name a colour.", "Say hello in French.", "What is 2 + 2?", "Name a planet.", "Write a short greeting.",
         "What is the capital of Italy?", "Name an animal that can fly.", "Count from one to five."]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
        yield client


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def chat_json(client, name: str, **options):
    question, schema = SCHEMAS[name]
    return client.chat.completions.create(model=MODEL, messages=ask(question), max_tokens=128, temperature=0,
                                          response_format=schema_format(name, schema), **options)


def test_parse_returns_the_pydantic_object(client):
    completion = client.chat.completions.parse(model=MODEL, messages=ask("Describe a pet as JSON."),
                                               response_format=Pet, max_tokens=96, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Pet), choice.message.content
    assert choice.message.parsed == Pet.model_validate_json(choice.message.content)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_each_schema_validates_alone(client, name):
    choice = chat_json(client, name).choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    validate(choice.message.content, SCHEMAS[name][1])


def test_a_batch_of_16_mixed_requests(server, client):
    alone = [client.chat.completions.create(model=MODEL, messages=ask(q), max_tokens=24, temperature=0)
             .choices[0].message.content for q in PLAIN]
    constrained = list(SCHEMAS)[:8]

    async def batch():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                      timeout=300) as aclient:
            schema_calls = [aclient.chat.completions.create(
                model=MODEL, messages=ask(SCHEMAS[n][0]), max_tokens=128, temperature=0,
                response_format=schema_format(n, SCHEMAS[n][1])) for n in constrained]
            plain_calls = [aclient.chat.completions.create(model=MODEL, messages=ask(q), max_tokens=24,
                                                           temperature=0) for q in PLAIN]
            return await asyncio.gather(*[c for pair in zip(schema_calls, plain_calls) for c in pair])

    results = asyncio.run(batch())
    for name, completion in zip(constrained, results[0::2]):
        validate(completion.choices[0].message.content, SCHEMAS[name][1])
    assert [c.choices[0].message.content for c in results[1::2]] == alone


def test_streamed_json_equals_the_whole_answer(client):
    whole = chat_json(client, "nested").choices[0].message.content
    stream = chat_json(client, "nested", stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == whole


def test_json_object_mode_gives_an_object(client):
    completion = client.chat.completions.create(model=MODEL, messages=ask("Describe Paris as JSON."), max_tokens=64,
                                                temperature=0, response_format={"type": "json_object"})
    choice = completion.choices[0]
    if choice.finish_reason == "stop":  # an object without bounds may run to max_tokens: then it is cut
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_completions_with_vllm_fields(client):
    def complete(**extra) -> str:
        completion = client.completions.create(model=MODEL, prompt="Call me at ", max_tokens=24, temperature=0,
                                               extra_body=extra)
        assert completion.choices[0].finish_reason == "stop"
        return completion.choices[0].text

    assert re.fullmatch(PHONE, complete(structured_outputs={"regex": PHONE}))
    assert re.fullmatch(PHONE, complete(guided_regex=PHONE))
    choices = ["home", "work", "never"]
    assert complete(structured_outputs={"choice": choices}) in choices
    assert complete(guided_choice=choices) in choices
    schema = SCHEMAS["flat"][1]
    validate(complete(structured_outputs={"json": schema}, max_tokens=64), schema)
    grammar = 'start: "at " TIME\nTIME: /[0-9]{1,2}:[0-9]{2}/'
    assert re.fullmatch(r"at [0-9]{1,2}:[0-9]{2}", complete(structured_outputs={"grammar": grammar}))


def test_sampled_n_samples_each_validate(client):
    question, schema = SCHEMAS["array_bounds"]
    completion = client.chat.completions.create(model=MODEL, messages=ask(question), max_tokens=96, temperature=1.0,
                                                seed=5, n=4, response_format=schema_format("numbers", schema))
    for choice in completion.choices:
        validate(choice.message.content, schema)


def test_tgi_grammar(server):
    schema = SCHEMAS["enum"][1]
    with httpx.Client(base_url=server.url, timeout=300) as http:
        as_json = http.post("/generate", json={"inputs": "The sky is ", "parameters": {
            "max_new_tokens": 64, "grammar": {"type": "json", "value": schema}}})
        as_regex = http.post("/generate", json={"inputs": "Call me at ", "parameters": {
            "max_new_tokens": 24, "details": True, "grammar": {"type": "regex", "value": PHONE}}})
        streamed = http.post("/generate_stream", json={"inputs": "Call me at ", "parameters": {
            "max_new_tokens": 24, "grammar": {"type": "regex", "value": PHONE}}})
    assert as_json.status_code == as_regex.status_code == streamed.status_code == 200, as_json.text + as_regex.text
    validate(as_json.json()["generated_text"], schema)
    assert re.fullmatch(PHONE, as_regex.json()["generated_text"])
    assert as_regex.json()["details"]["finish_reason"] == "eos_token"  # ended by the grammar
    events = [json.loads(line[5:]) for line in streamed.text.splitlines() if line.startswith("data:")]
    assert events[-1]["generated_text"] == as_regex.json()["generated_text"]


def test_metrics_count_constrained_requests_and_compiles(server, client):
    chat_json(client, "flat")
    with pytest.raises(openai.BadRequestError, match="invalid regex"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"guided_regex": "(a"})
    metrics = httpx.get(f"{server.url}/metrics").text

    def value(name: str) -> float:
        return float(re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.M).group(1))

    assert value('kvserve_structured_requests_total{kind="json"}') >= 1
    assert value('kvserve_grammar_compile_seconds_count{kind="json"}') >= 1
    assert value('kvserve_grammar_compile_failures_total{kind="regex"}') >= 1
