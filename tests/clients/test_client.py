"""The Python client against a real kvserve process (the session `server`): every route, sync and
async, streamed and not, and server errors surfaced as typed exceptions."""
from __future__ import annotations

import asyncio

import pytest

from clients import (APIConnectionError, APITimeoutError, AsyncClient, BadRequestError, Client, NotFoundError)
from clients.types import ChatCompletionChunk, CompletionChunk, GenerateResponse, StreamResponse
from tests.server_process import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def client(server):
    with Client(server.url, max_retries=0) as client:
        yield client


def test_models_tokenize_detokenize(client):
    assert client.models().data[0].id == "smollm2"
    tokens = client.tokenize("Hello world").tokens
    assert tokens and client.detokenize(tokens) == "Hello world"


def test_completion_streamed_equals_unstreamed(client):
    params = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
    whole = client.complete("The capital of France is", **params)
    chunks = list(client.complete_stream("The capital of France is", **params))
    assert all(isinstance(c, CompletionChunk) for c in chunks)
    assert "".join(c.text for c in chunks) == whole.text
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_stream_yields_typed_deltas_then_usage(client):
    with client.chat_stream([{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0.0) as stream:
        chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.text for c in chunks).strip()
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_native_generate_and_stream(client):
    result = client.generate("The capital of France is", max_new_tokens=6, details=True)
    assert isinstance(result, GenerateResponse) and result.details.generated_tokens == 6
    events = list(client.generate_stream("The capital of France is", max_new_tokens=6))
    assert all(isinstance(e, StreamResponse) for e in events)
    assert events[-1].generated_text == "".join(e.token.text for e in events) == result.generated_text
    assert events[-1].details.finish_reason == "length"


def test_closing_a_stream_early_leaves_the_server_serving(client):
    stream = client.complete_stream("Once upon a time", max_tokens=200, ignore_eos=True)
    for number, _ in enumerate(stream):
        if number == 2:
            break
    stream.close()
    assert client.complete("Hi", max_tokens=2).usage.completion_tokens == 2


def test_bad_request_is_a_typed_exception_with_status_message_and_param(client):
    with pytest.raises(BadRequestError) as caught:
        client.complete("Hi", max_tokens=4, temperature=5)
    error = caught.value
    assert (error.status, error.param, error.code) == (400, "temperature", "invalid_value")
    assert "less than or equal to 2" in error.message


def test_native_validation_error_and_unknown_model(client):
    with pytest.raises(BadRequestError) as caught:
        client.generate("Hi", temperature=-1.0)
    assert caught.value.status == 422 and "temperature" in caught.value.message
    with pytest.raises(NotFoundError) as missing:
        client.chat([{"role": "user", "content": "Hi"}], model="no-such-model")
    assert missing.value.status == 404 and missing.value.param == "model"


def test_stream_errors_surface_before_iteration(client):
    with pytest.raises(BadRequestError) as caught:
        client.chat_stream([{"role": "user", "content": "Hi"}], top_p=0)
    assert caught.value.param == "top_p"


def test_timeout_and_connection_refused(server):
    with Client(server.url, model="smollm2", timeout=0.001, max_retries=0) as impatient:
        with pytest.raises(APITimeoutError):
            impatient.complete("Tell me a story.", max_tokens=64, ignore_eos=True)
    retries = []
    with Client(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff=0.01,
                on_retry=lambda *call: retries.append(call)) as nobody:
        with pytest.raises(APIConnectionError) as caught:
            nobody.health()
    assert caught.value.retryable and [r[0] for r in retries] == [1, 2]


def test_async_client_runs_concurrent_streams(server):
    async def one(client: AsyncClient, topic: str) -> tuple[str, int]:
        text = ""
        async with await client.chat_stream([{"role": "user", "content": f"One sentence about {topic}."}],
                                            max_tokens=10, temperature=0.0) as stream:
            async for chunk in stream:
                text += chunk.text
                usage = chunk.usage
        return text, usage.completion_tokens

    async def main():
        async with AsyncClient(server.url, max_retries=0) as client:
            results = await asyncio.gather(*(one(client, t) for t in ("cats", "rivers", "bread")))
            whole = await client.complete("Hello", max_tokens=3, ignore_eos=True)
            with pytest.raises(BadRequestError):
                await client.complete("Hello", max_tokens=0)
            return results, whole

    results, whole = asyncio.run(main())
    assert all(text.strip() and 0 < tokens <= 10 for text, tokens in results)
    assert whole.usage.completion_tokens == 3
