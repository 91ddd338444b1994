"""The one SSE parser, on the inputs that trip up hand-rolled ones: every chunking of every line ending."""
from __future__ import annotations

import asyncio

import pytest

from clients.sse import SSEParser, ServerSentEvent, aiter_data, aiter_events, iter_data, iter_events


def parse(stream: bytes | str, chunk_size: int | None = None) -> list[ServerSentEvent]:
    chunks = [stream] if chunk_size is None else [stream[i:i + chunk_size] for i in range(0, len(stream),
                                                                                          chunk_size)]
    return list(iter_events(chunks))


def datas(stream: bytes | str, chunk_size: int | None = None) -> list[str]:
    return [event.data for event in parse(stream, chunk_size)]


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 7])
def test_every_line_ending_in_every_chunking(ending, chunk_size):
    stream = ending.join(["data: one", "", "data:two", "", ": a comment", "data: three", "", ""]).encode()
    assert datas(stream, chunk_size) == ["one", "two", "three"]


def test_crlf_split_between_chunks_is_one_line_end():
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # the LF completes the CRLF; it is not a blank line
    assert [e.data for e in parser.feed(b"\r\n")] == ["a"]


def test_cr_then_lone_lf_chunks_dispatch():
    parser = SSEParser()
    parser.feed(b"data: a\r")
    assert parser.feed(b"\n") == []
    assert [e.data for e in parser.feed(b"\n")] == ["a"]


def test_multi_line_data_joins_with_newline():
    assert datas("data: first\ndata:second\ndata:  third\ndata\n\n") == ["first\nsecond\n third\n"]


def test_only_one_space_after_the_colon_is_dropped():
    assert datas("data:  x \n\ndata:y\n\n") == [" x ", "y"]


def test_comments_and_keep_alives_produce_nothing():
    assert datas(": ping\n\n:\n\n: another\ndata: real\n\n") == ["real"]


def test_event_id_retry_fields_and_unknown_fields():
    events = parse("event: token\nid: 7\nretry: 1500\nfoo: bar\ndata: {}\n\ndata: next\n\n")
    assert events[0] == ServerSentEvent("{}", "token", "7", 1500)
    assert events[1] == ServerSentEvent("next", "message", "7", 1500)  # id and retry persist; event does not


def test_event_without_data_is_not_dispatched():
    assert datas("event: ping\n\nid: 3\n\ndata: x\n\n") == ["x"]


def test_unterminated_last_event_is_discarded():
    assert datas("data: complete\n\ndata: cut off") == ["complete"]


def test_utf8_split_inside_a_character_and_bom():
    stream = "\ufeffdata: 你好 🌍\n\n".encode()
    for size in (1, 2, 5):
        assert datas(stream, size) == ["你好 🌍"]


def test_unicode_line_separators_inside_data_are_not_line_ends():
    # str.splitlines() would cut these; JSON with ensure_ascii=False may carry them raw.
    assert datas('data: {"t": "a\u2028b\x85c\x0cd"}\n\n') == ['{"t": "a\u2028b\x85c\x0cd"}']


def test_data_prefix_is_not_stripped_from_the_payload():
    # TGI's client strips "data:" by slicing a fixed length; a payload that itself contains "data:" survives here.
    assert datas("data:data: inner\n\n") == ["data: inner"]


def test_iter_data_decodes_json_and_stops_at_done():
    events = iter_events([b'data: {"a": 1}\r\n\r\n', b"data: [DONE]\n\n", b'data: {"after": true}\n\n'])
    assert list(iter_data(events)) == [{"a": 1}]


def test_iter_data_without_done_reads_to_the_end():
    assert list(iter_data(iter_events([b'data: {"a": 1}\n\ndata: {"b": 2}\n\n']))) == [{"a": 1}, {"b": 2}]


def test_async_iterators_match():
    async def chunks():
        for piece in (b'data: {"x"', b': 1}\r', b"\n\r\ndata: [DONE]\r\n\r\n"):
            yield piece

    async def collect():
        return [item async for item in aiter_data(aiter_events(chunks()))]

    assert asyncio.run(collect()) == [{"x": 1}]
