"""Streamed responses as iterators of typed chunks, over the one SSE parser; transport errors as ours."""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx

from clients.errors import APIConnectionError, APITimeoutError, stream_error
from clients.sse import aiter_data, aiter_events, iter_data, iter_events


def connection_error(exc: httpx.HTTPError) -> APIConnectionError:
    error_class = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    # Only a connection that was never made is safe to retry: the server has not seen the request.
    return error_class(f"{type(exc).__name__}: {exc}",
                       retryable=isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)))


def to_chunk(data: Any, convert: Callable[[Any], Any]):
    """One SSE data item as a typed chunk; an error event the server sent mid-stream is raised instead."""
    error = stream_error(data)
    if error is not None:
        raise error
    return convert(data)


class Stream:
    """Typed chunks of one streamed response; an iterator. Closing it (or leaving its `with` block)
    closes the connection, and the server aborts the request."""

    def __init__(self, response: httpx.Response, convert: Callable[[Any], Any]):
        self.response, self._convert = response, convert
        self._chunks = self._iterate()

    def _iterate(self) -> Iterator:
        try:
            for data in iter_data(iter_events(self.response.iter_bytes())):
                yield to_chunk(data, self._convert)
        except httpx.HTTPError as exc:
            raise connection_error(exc) from exc
        finally:
            self.response.close()

    def __iter__(self) -> Iterator:
        return self._chunks

    def __next__(self):
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self.response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncStream:
    """Stream's async twin: `async for chunk in stream`, `await stream.close()`."""

    def __init__(self, response: httpx.Response, convert: Callable[[Any], Any]):
        self.response, self._convert = response, convert
        self._chunks = self._iterate()

    async def _iterate(self) -> AsyncIterator:
        try:
            async for data in aiter_data(aiter_events(self.response.aiter_bytes())):
                yield to_chunk(data, self._convert)
        except httpx.HTTPError as exc:
            raise connection_error(exc) from exc
        finally:
            await self.response.aclose()

    def __aiter__(self) -> AsyncIterator:
        return self._chunks

    async def __anext__(self):
        return await self._chunks.__anext__()

    async def close(self) -> None:
        await self._chunks.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
