"""Malformed requests against a real server: each gets its status and an error in its API's shape that
names the offending field; never a 500, never a traceback; the server stays healthy."""
from __future__ import annotations

import httpx
import pytest

M = "smollm2"
MSGS = [{"role": "user", "content": "hi"}]
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"


def cmpl(**fields) -> dict:
    return {"model": M, "prompt": "hi", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"model": M, "messages": MSGS, "max_tokens": 2, **fields}


def gen(**parameters) -> dict:
    return {"inputs": "hi", "parameters": {"max_new_tokens": 2, **parameters}}


# (id, path, JSON body, expected status, expected "param" (OpenAI routes) or a word of the message (native))
CASES = [
    ("temperature-wrong-type", CMPL, cmpl(temperature="hot"), 400, "temperature"),
    ("temperature-negative", CMPL, cmpl(temperature=-1), 400, "temperature"),
    ("top_p-zero", CMPL, cmpl(top_p=0), 400, "top_p"),
    ("n-zero", CMPL, cmpl(n=0), 400, "n"),
    ("max_tokens-zero", CMPL, cmpl(max_tokens=0), 400, "max_tokens"),
    ("max_tokens-float", CMPL, cmpl(max_tokens=1.5), 400, "max_tokens"),
    ("logprobs-9", CMPL, cmpl(logprobs=9), 400, "logprobs"),
    ("presence_penalty-3", CMPL, cmpl(presence_penalty=3), 400, "presence_penalty"),
    ("frequency_penalty--3", CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty"),
    ("top_k--2", CMPL, cmpl(top_k=-2), 400, "top_k"),
    ("min_p-2", CHAT, chat(min_p=2), 400, "min_p"),
    ("repetition_penalty-0", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("min_tokens-over-max", CMPL, cmpl(min_tokens=10, max_tokens=5), 400, "min_tokens"),
    ("stream-not-bool", CMPL, cmpl(stream="yes"), 400, "stream"),
    ("seed-beyond-64-bits", CMPL, cmpl(seed=2**70), 400, "seed"),
    ("seed-string", CMPL, cmpl(seed="1"), 400, "seed"),
    ("empty-stop-string", CMPL, cmpl(stop=[""]), 400, "stop"),
    ("17-stop-strings", CMPL, cmpl(stop=["x"] * 17), 400, "stop"),
    ("prompt-empty", CMPL, cmpl(prompt=""), 400, "prompt"),
    ("prompt-empty-list", CMPL, cmpl(prompt=[]), 400, "prompt"),
    ("prompt-number", CMPL, cmpl(prompt=123), 400, "prompt"),
    ("prompt-mixed-list", CMPL, cmpl(prompt=["a", 1]), 400, "prompt"),
    ("prompt-missing", CMPL, {"model": M}, 400, "prompt"),
    ("token-id-beyond-vocab", CMPL, cmpl(prompt=[1, 99_999_999]), 400, "prompt"),
    ("token-id-negative", CMPL, cmpl(prompt=[[1, -5]]), 400, "prompt"),
    ("stop_token_ids-beyond-vocab", CMPL, cmpl(stop_token_ids=[999_999]), 400, "stop_token_ids"),
    ("unknown-model", CMPL, cmpl(model="gpt-4"), 404, "model"),
    ("unknown-model-chat", CHAT, chat(model="nope"), 404, "model"),
    ("max_tokens-beyond-context", CMPL, cmpl(max_tokens=100_000), 400, "max_tokens"),
    ("prompt+max_tokens-beyond-context", CMPL, cmpl(prompt=[1] * 8000, max_tokens=500), 400, "max_tokens"),
    ("prompt-beyond-context", CMPL, cmpl(prompt=[1] * 9000), 400, "prompt"),
    ("suffix-unsupported", CMPL, cmpl(suffix="x"), 400, "suffix"),
    ("best_of-unsupported", CMPL, cmpl(best_of=3), 400, "best_of"),
    ("logit_bias-non-integer-key", CMPL, cmpl(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit_bias-superscript-key", CMPL, cmpl(logit_bias={"²": 1}), 400, "logit_bias"),
    ("logit_bias-out-of-range", CMPL, cmpl(logit_bias={"5": 1000}), 400, "logit_bias"),
    ("logit_bias-beyond-vocab", CMPL, cmpl(logit_bias={"99999999": 1}), 400, "logit_bias"),
    ("messages-empty", CHAT, chat(messages=[]), 400, "messages"),
    ("messages-not-a-list", CHAT, chat(messages="hi"), 400, "messages"),
    ("message-bad-role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role"),
    ("message-no-role", CHAT, chat(messages=[{"content": "hi"}]), 400, "messages.0.role"),
    ("message-image-part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages.0.content"),
    ("top_logprobs-30", CHAT, chat(logprobs=True, top_logprobs=30), 400, "top_logprobs"),
    ("top_logprobs-without-logprobs", CHAT, chat(top_logprobs=3), 400, "top_logprobs"),
    ("max_completion_tokens-zero", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("response_format-type", CHAT, chat(response_format={"type": "xml"}), 400, "response_format.type"),
    ("response_format-no-schema", CMPL, cmpl(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     400, "response_format.json_schema"),
    ("json_schema-refused", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}), 400,
     "response_format.json_schema.schema"),
    ("json_schema-not-an-object", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": [1]}}), 400, "response_format.json_schema.schema"),
    ("regex-refused", CMPL, cmpl(structured_outputs={"regex": "(unclosed"}), 400, "structured_outputs.regex"),
    ("grammar-refused", CMPL, cmpl(structured_outputs={"grammar": "start: missing_rule"}), 400,
     "structured_outputs.grammar"),
    ("choice-empty", CMPL, cmpl(structured_outputs={"choice": []}), 400, "structured_outputs.choice"),
    ("two-constraints", CMPL, cmpl(response_format={"type": "json_object"}, guided_regex="a+"), 400, "guided_regex"),
    ("tools-bad-name", CHAT, chat(tools=[{"type": "function", "function": {"name": "has space"}}]), 400,
     "tools.0.function.name"),
    ("tools-not-function", CHAT, chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]), 400, "tools.0.type"),
    ("tool_choice-unknown", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={
        "type": "function", "function": {"name": "g"}}), 400, "tool_choice"),
    ("tool_choice-without-tools", CHAT, chat(tool_choice="required"), 400, "tool_choice"),
    ("tools-and-response_format", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                             response_format={"type": "json_object"}), 400, "tools"),
    ("tool-call-arguments-not-json", CHAT, chat(messages=[{"role": "assistant", "tool_calls": [{
        "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]), 400, "messages"),
    ("body-a-list", CMPL, [1, 2], 400, "body"),
    # Native (text-generation-inference) routes: 422 {"error", "error_type"}
    ("tgi-best_of", "/generate", gen(best_of=2), 422, "best_of"),
    ("tgi-grammar-type", "/generate", gen(grammar={"type": "xml", "value": "x"}), 422, "grammar.type"),
    ("tgi-grammar-regex-refused", "/generate", gen(grammar={"type": "regex", "value": "(a"}), 422, "regex"),
    ("tgi-typical_p", "/", gen(typical_p=0.5), 422, "typical_p"),
    ("tgi-empty-inputs", "/generate", {"inputs": ""}, 422, "inputs"),
    ("tgi-inputs-number", "/generate", {"inputs": 5}, 422, "inputs"),
    ("tgi-temperature-zero", "/generate", gen(temperature=0), 422, "temperature"),
    ("tgi-top_p-one", "/generate_stream", gen(top_p=1.0), 422, "top_p"),
    ("tgi-max_new_tokens-zero", "/generate", gen(max_new_tokens=0), 422, "max_new_tokens"),
    ("tgi-beyond-context", "/generate", gen(max_new_tokens=100_000), 422, "context"),
    ("tgi-top_n_tokens-50", "/generate_stream", gen(top_n_tokens=50), 422, "top_n_tokens"),
    ("tgi-seed-beyond-u64", "/generate", gen(seed=2**64), 422, "seed"),
    ("tokenize-nothing", "/tokenize", {}, 422, "prompt"),
    ("tokenize-unknown-model", "/tokenize", {"model": "x", "prompt": "hi"}, 404, "model"),
    ("detokenize-beyond-vocab", "/detokenize", {"tokens": [-1]}, 422, "vocabulary"),
]

# (id, path, raw body, expected status, expected param or message word)
RAW_CASES = [
    ("malformed-json", CMPL, b'{"model": "smollm2", "prompt": ', 400, "body"),
    ("malformed-json-native", "/generate", b'{"inputs": ', 422, "JSON"),
    ("nan-temperature", CMPL, b'{"model": "smollm2", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("not-utf8", CMPL, b'{"model": "smollm2", "prompt": "\xff\xfe"}', 400, "body"),
    ("oversize-body", CMPL, b"x" * 5_000_000, 413, "body"),
    ("oversize-body-native", "/generate", b"x" * 5_000_000, 413, "larger"),
]


def check_error(response: httpx.Response, path: str, status: int, where: str) -> None:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    body = response.json()
    if path.startswith("/v1/"):
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == where, error
    else:
        assert set(body) == {"error", "error_type"} and isinstance(body["error"], str)
        assert where.lower() in body["error"].lower(), body
        assert body["error_type"] == {422: "validation", 404: "not_found", 413: "validation"}[status]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def test_at_least_30_cases():
    assert len(CASES) + len(RAW_CASES) >= 30


@pytest.mark.parametrize(("path", "body", "status", "where"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_json_error(http, path, body, status, where):
    check_error(http.post(path, json=body), path, status, where)


@pytest.mark.parametrize(("path", "raw", "status", "where"), [c[1:] for c in RAW_CASES],
                         ids=[c[0] for c in RAW_CASES])
def test_raw_body_error(http, path, raw, status, where):
    check_error(http.post(path, content=raw, headers={"content-type": "application/json"}), path, status, where)


def test_unknown_route_and_method(http):
    check_error(http.get("/v1/nothing"), "/v1/nothing", 404, None)
    check_error(http.get(CMPL), CMPL, 405, None)


def test_server_healthy_afterwards(http):
    assert http.get("/health").status_code == 200
    response = http.post(CMPL, json=cmpl(max_tokens=3, temperature=0))
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] >= 1
