"""The one server-sent-events parser: bytes in any chunking -> events, per the WHATWG EventSource rules.

Lines end in LF, CRLF or CR (a CRLF split across two chunks counts once); a line starting with ":"
is a comment; "data:x" and "data: x" are the same field (one leading space is dropped); several
data lines in one event join with "\n"; a blank line dispatches the event. `iter_data` adds the
OpenAI convention on top: each event's data is JSON, and "[DONE]" ends the stream.
"""
from __future__ import annotations

import codecs
import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

DONE = "[DONE]"
_LINE_END = re.compile(r"\r\n|\r|\n")  # not str.splitlines(), which also splits on U+2028 and friends


@dataclass(frozen=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None

    def json(self):
        return json.loads(self.data)


class SSEParser:
    """Incremental: feed() chunks of bytes (or text) as they arrive, get back the completed events."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._after_cr = False  # the previous chunk ended in CR: a leading LF here is the same line end
        self._at_start = True
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes | str) -> list[ServerSentEvent]:
        text = self._decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        if self._at_start and text:
            text = text.removeprefix("\ufeff")
            self._at_start = False
        if self._after_cr and text.startswith("\n"):
            text = text[1:]
            self._after_cr = False
        if text:
            self._after_cr = text.endswith("\r")
        buffer, start, events = self._buffer + text, 0, []
        for end in _LINE_END.finditer(buffer):
            event = self._line(buffer[start:end.start()])
            start = end.end()
            if event is not None:
                events.append(event)
        self._buffer = buffer[start:]
        return events

    def close(self) -> list[ServerSentEvent]:
        """End of stream. An event whose blank line never came is discarded, as EventSource does."""
        self.__init__()
        return []

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = ServerSentEvent("\n".join(self._data), self._event or "message", self._id, self._retry)
        self._data, self._event = [], ""
        return event


def iter_events(chunks: Iterable[bytes | str]) -> Iterator[ServerSentEvent]:
    parser = SSEParser()
    for chunk in chunks:
        yield from parser.feed(chunk)
    yield from parser.close()


async def aiter_events(chunks: AsyncIterable[bytes | str]) -> AsyncIterator[ServerSentEvent]:
    parser = SSEParser()
    async for chunk in chunks:
        for event in parser.feed(chunk):
            yield event
    for event in parser.close():
        yield event


def iter_data(events: Iterable[ServerSentEvent]) -> Iterator[dict]:
    """Each event's JSON payload, up to "[DONE]"."""
    for event in events:
        if event.data.strip() == DONE:
            return
        yield event.json()


async def aiter_data(events: AsyncIterable[ServerSentEvent]) -> AsyncIterator[dict]:
    async for event in events:
        if event.data.strip() == DONE:
            return
        yield event.json()
