"""The one server-sent event stream of /v1/completions and /v1/chat/completions: a chunk per piece of
output, error events, the optional usage chunk and [DONE]. Each route supplies only its choice's shape."""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from service.api.generation import Choice, Generation
from service.api.sse import sse_event


@dataclass
class ChunkFormat:
    # One piece of a choice (its text, tokens, logprobs) -> the choices of the chunks it makes (most often
    # one; none while tool-call text is held back; more where a tool call starts).
    render: Callable[[Choice], list[dict]]
    wants_logprobs: bool  # then every piece is sent, even one whose text is held back
    include_usage: bool
    opening: list[dict] = field(default_factory=list)  # choices sent, a chunk each, before any output
    lead: Callable[[int], str] = lambda index: ""  # text before a choice's first piece (the echoed prompt)


def _error_event(error: str) -> str:
    return sse_event({"error": {"message": f"generation failed: {error}", "type": "internal_error",
                                "param": None, "code": "generation_error"}})


async def openai_stream(gen: Generation, head: dict, chunks: ChunkFormat) -> AsyncIterator[str]:
    for choice in chunks.opening:
        yield sse_event(dict(head, choices=[choice]))
    started = set()
    async for index, out in gen.outputs():
        if out.error:
            yield _error_event(out.error)
            continue
        text = out.new_text if index in started else chunks.lead(index) + out.new_text
        started.add(index)
        if not text and not out.finished and not chunks.wants_logprobs:
            continue  # text held back (incomplete character or possible stop string)
        piece = Choice(index, text, out.new_token_ids, out.logprobs or [], out.top_logprobs or [],
                       out.finish_reason)
        for rendered in chunks.render(piece):
            yield sse_event(dict(head, choices=[rendered]))
    if chunks.include_usage:
        yield sse_event(dict(head, choices=[], usage=gen.usage()))
    yield sse_event("[DONE]")
