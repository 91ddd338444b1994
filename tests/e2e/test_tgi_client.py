"""The real text-generation-inference clients (`text_generation` and huggingface_hub's InferenceClient)
against a real kvserve process: POST / and /generate_stream, details, stop sequences, GET /info."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import text_generation
from text_generation.types import FinishReason

# text_generation 0.7 still calls pydantic v1's .dict()
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")
PROMPT = "The capital of France is"
MAX = 8


@pytest.fixture(scope="module")
def tgi(server):
    return text_generation.Client(server.url, timeout=300)


@pytest.fixture(scope="module")
def greedy(tgi):
    return tgi.generate(PROMPT, max_new_tokens=MAX, decoder_input_details=True, top_n_tokens=2)


def test_generate_with_details(greedy, server):
    details = greedy.details
    assert greedy.generated_text
    assert details.finish_reason in (FinishReason.Length, FinishReason.EndOfSequenceToken)
    assert details.generated_tokens == len(details.tokens) <= MAX
    if details.finish_reason == FinishReason.Length:
        assert details.generated_tokens == MAX
    assert "".join(t.text for t in details.tokens) == greedy.generated_text
    assert all(t.logprob <= 0 and not t.special for t in details.tokens)
    prompt_ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, timeout=60).json()["tokens"]
    assert [t.id for t in details.prefill] == prompt_ids
    assert len(details.top_tokens) == details.generated_tokens and all(len(t) == 2 for t in details.top_tokens)


def test_generate_stream_joins_to_the_greedy_text(tgi, greedy):
    events = list(tgi.generate_stream(PROMPT, max_new_tokens=MAX))
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == greedy.generated_text
    assert "".join(e.token.text for e in events if not e.token.special) == last.generated_text
    assert last.details.finish_reason == greedy.details.finish_reason
    assert last.details.generated_tokens == greedy.details.generated_tokens


def test_stop_sequence(tgi, greedy):
    text = greedy.generated_text
    stop = text.strip()[2:6]  # inside the text, most likely across a token boundary
    expected = text[:text.find(stop)]
    response = tgi.generate(PROMPT, max_new_tokens=MAX, stop_sequences=[stop])
    assert response.details.finish_reason == FinishReason.StopSequence
    assert response.generated_text == expected and stop not in response.generated_text
    events = list(tgi.generate_stream(PROMPT, max_new_tokens=MAX, stop_sequences=[stop]))
    assert events[-1].details.finish_reason == FinishReason.StopSequence
    assert "".join(e.token.text for e in events) == expected
    assert not any(stop in e.token.text for e in events)


def test_async_client(server, greedy):
    async def run():
        client = text_generation.AsyncClient(server.url, timeout=300)
        response = await client.generate(PROMPT, max_new_tokens=MAX)
        events = [event async for event in client.generate_stream(PROMPT, max_new_tokens=MAX)]
        return response, events

    response, events = asyncio.run(run())
    assert response.generated_text == greedy.generated_text
    assert events[-1].generated_text == greedy.generated_text


def test_unsupported_best_of_is_a_validation_error(tgi):
    with pytest.raises(text_generation.errors.ValidationError, match="best_of"):
        tgi.generate(PROMPT, max_new_tokens=2, best_of=2, do_sample=True)


def test_huggingface_hub_inference_client(server, greedy):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    client = huggingface_hub.InferenceClient(model=server.url, timeout=300)

    def call(**options):
        result = client.text_generation(PROMPT, max_new_tokens=MAX, **options)
        return list(result) if options.get("stream") else result

    with ThreadPoolExecutor(4) as pool:  # at once, so they share the engine's batches
        plain, pieces, detailed, events = pool.map(lambda o: call(**o), [
            {}, {"stream": True}, {"details": True}, {"details": True, "stream": True}])
    assert plain == greedy.generated_text and "".join(pieces) == greedy.generated_text
    assert detailed.generated_text == greedy.generated_text
    assert detailed.details.generated_tokens == greedy.details.generated_tokens
    assert events[-1].generated_text == greedy.generated_text
    assert events[-1].details.finish_reason == greedy.details.finish_reason.value


def test_info(server):
    response = httpx.get(server.url + "/info", timeout=30)
    assert response.status_code == 200
    info = response.json()
    assert info["model_id"] == "smollm2" and info["model_pipeline_tag"] == "text-generation"
    assert info["max_input_tokens"] < info["max_total_tokens"] and info["max_batch_total_tokens"] > 0
    assert info["max_best_of"] == 1 and info["version"] and info["model_architecture"] == "llama"
