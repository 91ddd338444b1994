"""The bridge between asyncio and the engine thread: submit, per-request output stream, abort."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from service.engine.engine import Engine
from service.engine.request import RequestOutput, SamplingParams


class AsyncEngine:
    """Starts the engine's thread; every call here is safe from the event loop and never blocks it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        engine.start()

    @property
    def is_healthy(self) -> bool:
        return self.engine.is_healthy

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
               priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Queue a request and return its output stream. Raises at once (RequestRejected,
        EngineOverloaded, EngineDead) if it cannot be queued. Closing the stream before the last
        output (a client that went away) aborts the request, which frees its blocks at the next step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request_id = request_id or uuid.uuid4().hex

        def deliver(output: RequestOutput) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, output)

        self.engine.add_request(prompt_ids, params, request_id, deliver, priority)
        return self._stream(queue, request_id, params.n)

    async def _stream(self, queue: asyncio.Queue, request_id: str, n: int) -> AsyncIterator[RequestOutput]:
        unfinished = n
        try:
            while unfinished:
                output = await queue.get()
                if output.finished:
                    unfinished -= 1
                yield output
        finally:
            if unfinished:
                self.engine.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def shutdown(self) -> None:
        self.engine.stop()
