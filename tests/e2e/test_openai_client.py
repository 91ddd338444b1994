"""The real `openai` client (sync and async) against a real kvserve process: completions and chat,
streamed and not, usage, n, seeds, stop strings, logprobs, prompt forms, kvserve's extensions."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX = 8


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=300, max_retries=0)


def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", timeout=300, max_retries=0)


def run_async(server, *calls) -> list:
    """Make every call (AsyncOpenAI -> awaitable) at once, so they share the engine's batches; a stream
    comes back as its list of chunks."""
    async def one(aclient, call):
        result = await call(aclient)
        return [chunk async for chunk in result] if isinstance(result, openai.AsyncStream) else result

    async def run():
        aclient = async_client(server)
        return await asyncio.gather(*(one(aclient, call) for call in calls))

    return asyncio.run(run())


@pytest.fixture(scope="module")
def greedy(client):
    """The greedy completion of PROMPT (MAX tokens), with its tokens, as every test's reference."""
    return client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=MAX, temperature=0, logprobs=0)


def tokenize(server, **body) -> list[int]:
    response = httpx.post(server.url + "/tokenize", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def by_choice(chunks) -> dict[int, list]:
    """Streamed choices grouped by index, in arrival order."""
    groups: dict[int, list] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            groups.setdefault(choice.index, []).append(choice)
    return groups


def assert_finish_once_at_end(chunks, n: int) -> None:
    groups = by_choice(chunks)
    assert sorted(groups) == list(range(n))
    for index, choices in groups.items():
        reasons = [c.finish_reason for c in choices]
        assert reasons[-1] is not None, f"choice {index}: no finish_reason on its last chunk"
        assert all(r is None for r in reasons[:-1]), f"choice {index}: finish_reason before the end: {reasons}"


def test_models_lists_smollm2_and_tokenize_round_trips(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2"] and models[0].model_extra["architecture"] == "llama"
    text = "Hello, world! Paris is the capital of France."
    tokens = tokenize(server, prompt=text)
    assert tokens and all(isinstance(t, int) for t in tokens)
    response = httpx.post(server.url + "/detokenize", json={"tokens": tokens}, timeout=60)
    assert response.status_code == 200 and response.json()["prompt"] == text


def test_completion_stream_equals_non_stream_with_usage(client, server, greedy):
    choice = greedy.choices[0]
    assert choice.text and greedy.usage.prompt_tokens == len(tokenize(server, prompt=PROMPT))
    assert greedy.usage.completion_tokens == len(choice.logprobs.tokens)
    if choice.finish_reason == "length":
        assert greedy.usage.completion_tokens == MAX
    chunks = list(client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=MAX, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert_finish_once_at_end(chunks, 1)
    assert by_choice(chunks)[0][-1].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk comes last
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.prompt_tokens == greedy.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == greedy.usage.completion_tokens


def test_chat_stream_equals_non_stream_sync_and_async(client, server):
    common = dict(model="smollm2", messages=CHAT, max_tokens=16, temperature=0)
    with ThreadPoolExecutor(1) as pool:  # the sync client's stream runs alongside the async calls
        sync_stream = pool.submit(lambda: list(client.chat.completions.create(**common, stream=True)))
        full, chunks = run_async(server, lambda c: c.chat.completions.create(**common),
                                 lambda c: c.chat.completions.create(**common, stream=True,
                                                                     stream_options={"include_usage": True}))
        sync_chunks = sync_stream.result()
    message = full.choices[0].message
    assert "".join(c.choices[0].delta.content or "" for c in sync_chunks) == message.content
    assert_finish_once_at_end(sync_chunks, 1)
    assert message.role == "assistant" and message.content
    assert full.usage.prompt_tokens == len(tokenize(server, messages=CHAT))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert_finish_once_at_end(chunks, 1)
    assert by_choice(chunks)[0][-1].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_max_tokens_ignore_eos_and_min_tokens(server):
    """The chat answer ends (EOS) before 12 tokens; ignore_eos runs to exactly max_tokens, min_tokens
    postpones the end."""
    common = dict(model="smollm2", messages=CHAT, max_tokens=12, temperature=0)
    plain, ignoring, at_least, completion = run_async(
        server, lambda c: c.chat.completions.create(**common),
        lambda c: c.chat.completions.create(**common, extra_body={"ignore_eos": True}),
        lambda c: c.chat.completions.create(**common, extra_body={"min_tokens": 11}),
        lambda c: c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True}))
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 11
    assert ignoring.choices[0].finish_reason == "length" and ignoring.usage.completion_tokens == 12
    assert at_least.usage.completion_tokens >= 11
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5


def test_n2_with_seed_is_reproducible_streamed_or_not(server):
    common = dict(model="smollm2", prompt=PROMPT, max_tokens=6, temperature=1.0, n=2, seed=7)
    first, again, chunks = run_async(
        server, lambda c: c.completions.create(**common), lambda c: c.completions.create(**common),
        lambda c: c.completions.create(**common, stream=True, stream_options={"include_usage": True}))
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert first.usage.completion_tokens <= 12
    if all(c.finish_reason == "length" for c in first.choices):
        assert first.usage.completion_tokens == 12
    assert_finish_once_at_end(chunks, 2)
    groups = by_choice(chunks)
    assert ["".join(c.text for c in groups[i]) for i in (0, 1)] == texts
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens


def _stop_across_tokens(tokens: list[str]) -> str:
    """A stop string made of the end of one generated token and the start of the next."""
    text = "".join(tokens)
    for i in range(1, len(tokens) - 1):
        left, right = tokens[i].strip(), tokens[i + 1]
        if left and right.strip():
            stop = tokens[i][-2:] + right[:2]
            if text.find(stop) == len("".join(tokens[:i + 1])) - len(tokens[i][-2:]):
                return stop
    pytest.fail(f"no stop string spanning two tokens in {tokens}")


def test_stop_string_never_appears(server, greedy):
    tokens = greedy.choices[0].logprobs.tokens
    stop = _stop_across_tokens(tokens)
    expected = greedy.choices[0].text[:greedy.choices[0].text.find(stop)]
    common = dict(model="smollm2", prompt=PROMPT, max_tokens=MAX, temperature=0, stop=[stop, "never-seen"])
    full, chunks = run_async(server, lambda c: c.completions.create(**common),
                             lambda c: c.completions.create(**common, stream=True))
    assert full.choices[0].text == expected and full.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in chunks]
    assert "".join(pieces) == expected and not any(stop in p for p in pieces)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_completions_and_chat(server, greedy):
    common = dict(model="smollm2", messages=CHAT, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    completion, chat, chunks = run_async(
        server, lambda c: c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=MAX, temperature=0,
                                               logprobs=2),
        lambda c: c.chat.completions.create(**common), lambda c: c.chat.completions.create(**common, stream=True))
    lp = completion.choices[0].logprobs
    count = greedy.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == count
    assert "".join(lp.tokens) == greedy.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy picks the top token
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 3 and entry.logprob <= 0 for entry in content)
    assert all(bytes(entry.bytes).decode("utf-8", "replace") == entry.token for entry in content)
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_prompt_as_list_of_strings_and_token_ids(server, greedy):
    other = "Once upon a time"
    ids, other_ids = tokenize(server, prompt=PROMPT), tokenize(server, prompt=other)

    def complete(prompt):
        return lambda c: c.completions.create(model="smollm2", prompt=prompt, max_tokens=MAX, temperature=0)

    both, alone, as_ids, as_id_lists = run_async(server, complete([PROMPT, other]), complete(other),
                                                 complete(ids), complete([ids, other_ids]))
    texts = {c.index: c.text for c in both.choices}
    assert texts == {0: greedy.choices[0].text, 1: alone.choices[0].text}
    assert both.usage.prompt_tokens == len(ids) + len(other_ids)
    assert as_ids.choices[0].text == greedy.choices[0].text and as_ids.usage.prompt_tokens == len(ids)
    assert {c.index: c.text for c in as_id_lists.choices} == texts


def test_sampling_extensions_via_extra_body(server, greedy):
    repetitive = "one one one one one one one one"

    common = dict(model="smollm2", prompt=PROMPT, max_tokens=MAX, temperature=1.0, seed=3)
    rep = dict(model="smollm2", prompt=repetitive, max_tokens=MAX, temperature=0)
    top_k, min_p, plain, penalised = run_async(
        server, lambda c: c.completions.create(**common, extra_body={"top_k": 1}),
        lambda c: c.completions.create(**common, extra_body={"min_p": 1.0}),
        lambda c: c.completions.create(**rep),
        lambda c: c.completions.create(**rep, extra_body={"repetition_penalty": 1.5}))
    assert top_k.choices[0].text == greedy.choices[0].text  # top_k=1 is greedy at any temperature
    assert min_p.choices[0].text == greedy.choices[0].text  # so is min_p=1
    assert penalised.choices[0].text != plain.choices[0].text
