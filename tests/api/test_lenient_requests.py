"""Requests that other servers take and kvserve takes too, against the session `server`: /tokenize's
{"text"}, a JSON body without a JSON content-type (unless a browser page sent it), /v1 without `model`,
/generate's details only when asked; and the clear 400 of a body that is not UTF-8."""
from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
COMPLETION = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def test_tokenize_takes_text_as_a_prompt(http):
    by_prompt = http.post("/tokenize", json={"prompt": PROMPT})
    by_text = http.post("/tokenize", json={"text": PROMPT})
    assert by_prompt.status_code == by_text.status_code == 200, by_text.text
    assert by_text.json() == by_prompt.json() and by_text.json()["count"] == len(by_text.json()["tokens"]) > 1
    detokenized = http.post("/detokenize", json={"tokens": by_text.json()["tokens"]}).json()["prompt"]
    assert detokenized == PROMPT


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"],
                         ids=["no-content-type", "curl-d-default"])
def test_a_body_without_a_json_content_type_is_read_as_json(http, content_type):
    headers = {"content-type": content_type} if content_type else {}
    labelled = http.post("/v1/completions", json=COMPLETION).json()
    unlabelled = http.post("/v1/completions", content=json.dumps(COMPLETION).encode(), headers=headers)
    assert unlabelled.status_code == 200, unlabelled.text
    assert unlabelled.json()["choices"][0]["text"] == labelled["choices"][0]["text"]  # greedy, float32
    native = http.post("/generate", content=b'{"inputs": "Hi", "parameters": {"max_new_tokens": 2}}',
                       headers=headers)
    assert native.status_code == 200 and native.json()["generated_text"], native.text


@pytest.mark.parametrize(("path", "content_type"), [("/v1/completions", None), ("/generate", "text/plain")])
def test_a_body_from_a_browser_page_keeps_its_content_type(http, path, content_type):
    # A cross-site page can send these without a CORS preflight; its Origin header keeps FastAPI's refusal.
    headers = {"origin": "https://elsewhere.example"} | ({"content-type": content_type} if content_type else {})
    response = http.post(path, content=b'{"inputs": "Hi", "prompt": "Hi", "model": "smollm2"}', headers=headers)
    message = response.json()["error"]["message"] if path.startswith("/v1/") else response.json()["error"]
    assert response.status_code == (400 if path.startswith("/v1/") else 422), response.text
    assert "must be JSON" in message and "content-type: application/json" in message
    assert f"given: {content_type or 'none'}" in message


@pytest.mark.parametrize("path", ["/v1/completions", "/generate"])
def test_a_body_that_is_not_utf8_gets_a_clear_error(http, path):
    body = b'{"model": "smollm2", "prompt": "caf\xe9", "inputs": "caf\xe9"}'  # Latin-1, not UTF-8
    first_bad_byte = body.index(b"\xe9")
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    if path.startswith("/v1/"):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"]) == ("body", "invalid_encoding")
        message = error["message"]
    else:
        assert response.status_code == 422, response.text
        message = response.json()["error"]
    assert message.startswith("the request body is not UTF-8") and f"at byte {first_bad_byte}" in message


def test_v1_without_a_model_uses_the_served_one(http):
    named = http.post("/v1/completions", json=COMPLETION).json()
    unnamed = http.post("/v1/completions", json={k: v for k, v in COMPLETION.items() if k != "model"})
    assert unnamed.status_code == 200, unnamed.text
    assert unnamed.json()["model"] == "smollm2"
    assert unnamed.json()["choices"][0]["text"] == named["choices"][0]["text"]
    chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                   "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["model"] == "smollm2", chat.text
    assert http.post("/v1/completions", json=dict(COMPLETION, model="gpt-4")).status_code == 404


def test_generate_returns_details_only_when_asked(http):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    plain = http.post("/generate", json=body).json()
    detailed = http.post("/generate", json={**body, "parameters": {**body["parameters"], "details": True}}).json()
    assert set(plain) == {"generated_text"}
    assert detailed["generated_text"] == plain["generated_text"]
    assert detailed["details"]["generated_tokens"] == len(detailed["details"]["tokens"]) == 3
    assert set(http.post("/", json=body).json()[0]) == {"generated_text"}
