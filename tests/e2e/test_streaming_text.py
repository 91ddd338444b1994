"""Streamed text is safe to show as it arrives: Chinese and emoji (several tokens per character) never
show U+FFFD in any chunk, and stop strings spanning tokens never leak into any chunk."""
from __future__ import annotations

import asyncio

import openai
import pytest

MAX = 24
# (id, kind, prompt): greedy SmolLM2 answers these with CJK characters or emoji, each split over tokens.
CASES = [
    ("chat-chinese", "chat", "Translate to Chinese: I love my family."),
    ("chat-emoji", "chat", "Write a happy message with lots of emoji 😀🎉"),
    ("chat-english", "chat", "What is the capital of France?"),
    ("completion-chinese", "completion", "北京是中国的首都，"),
    ("completion-emoji", "completion", "Emoji: 😀😃😄😁"),
]


async def generate(client: openai.AsyncOpenAI, kind: str, prompt: str, stream: bool, **extra):
    """(text or list of streamed text pieces, finish_reason, completion_tokens)."""
    common = dict(model="smollm2", max_tokens=MAX, temperature=0, **extra)
    if stream:
        common["stream_options"] = {"include_usage": True}
    if kind == "chat":
        response = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}],
                                                        stream=stream, **common)
    else:
        response = await client.completions.create(prompt=prompt, stream=stream, **common)
    if not stream:
        choice = response.choices[0]
        text = choice.message.content if kind == "chat" else choice.text
        return text, choice.finish_reason, response.usage.completion_tokens
    pieces, reason, usage = [], None, None
    async for chunk in response:
        for choice in chunk.choices:
            piece = choice.delta.content if kind == "chat" else choice.text
            if piece:
                pieces.append(piece)
            reason = choice.finish_reason or reason
        usage = chunk.usage or usage
    return pieces, reason, usage.completion_tokens


def run_all(server, requests: list[tuple[str, str, bool, dict]]) -> list:
    """Every (kind, prompt, stream, extra fields) request at once, so they share the engine's batches."""
    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", timeout=600, max_retries=0)
        return await asyncio.gather(*(generate(client, kind, prompt, stream, **extra)
                                      for kind, prompt, stream, extra in requests))

    return asyncio.run(run())


@pytest.fixture(scope="module")
def outputs(server) -> dict[str, tuple]:
    """For each case: (non-streamed result, streamed result), all generated concurrently."""
    requests = [(kind, prompt, stream, {}) for _, kind, prompt in CASES for stream in (False, True)]
    results = run_all(server, requests)
    return {case[0]: (results[2 * i], results[2 * i + 1]) for i, case in enumerate(CASES)}


@pytest.mark.parametrize("case", [c[0] for c in CASES if c[0] != "chat-english"])
def test_multibyte_text_streams_without_replacement_chars(outputs, case):
    (text, reason, num_tokens), (pieces, streamed_reason, streamed_tokens) = outputs[case]
    assert not any("\ufffd" in piece for piece in pieces), pieces
    assert "\ufffd" not in text
    assert "".join(pieces) == text and streamed_reason == reason and streamed_tokens == num_tokens
    assert any(ord(ch) > 0x2E80 for ch in text), f"no CJK or emoji in {text!r}: the case tests nothing"
    assert len(pieces) < num_tokens, "no character was split over tokens: the case tests nothing"


def _stop_for(case: str, text: str) -> str:
    """A stop string that spans tokens: two CJK characters or emoji (each several tokens), or for English
    the end of one word and the start of the next."""
    if case == "chat-english":
        words = text.split(" ")
        return words[1][-2:] + " " + words[2][:2]
    wide = [i for i in range(len(text) - 1) if ord(text[i]) > 0x2E80 and ord(text[i + 1]) > 0x2E80]
    assert wide, f"no two wide characters in a row in {text!r}"
    start = wide[1] if len(wide) > 1 else wide[0]  # past the first character, so some text precedes it
    return text[start:start + 2]


def test_stop_strings_spanning_tokens_never_leak(server, outputs):
    stops, requests = {}, []
    for case, kind, prompt in CASES:
        stop = stops[case] = _stop_for(case, outputs[case][0][0])
        requests += [(kind, prompt, False, {"stop": [stop]}), (kind, prompt, True, {"stop": [stop]})]
    results = run_all(server, requests)
    for i, (case, _, _) in enumerate(CASES):
        stop, reference = stops[case], outputs[case][0][0]
        expected = reference[:reference.find(stop)]
        (text, reason, _), (pieces, streamed_reason, _) = results[2 * i], results[2 * i + 1]
        assert text == expected and reason == "stop", (case, stop, text)
        assert not any(stop in piece for piece in pieces), (case, stop, pieces)
        assert "".join(pieces) == expected and streamed_reason == "stop", (case, stop, pieces)
        assert not any("\ufffd" in piece for piece in pieces)
