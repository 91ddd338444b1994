"""Submitting prompts to the engine and reading their outputs, shared by the OpenAI and native routes.

One Generation is one HTTP request: one or more prompts, each with n samples. Its outputs arrive as
(choice index, RequestOutput) pairs; choice index = prompt index * n + sample index. A request that
runs past its timeout is aborted, so its stream still ends properly (finish_reason "abort").
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from service.api.errors import APIError, engine_error
from service.api.request_log import current_record
from service.engine import RequestOutput, SamplingParams
from service.engine.engine import Engine
from service.engine.errors import EngineError, RequestRejected
from service.engine.request import InvalidParam


def checked_params(build) -> SamplingParams:
    """Build SamplingParams, turning an out-of-range value into a 400 that names the field."""
    try:
        return build()
    except InvalidParam as exc:
        raise APIError(400, str(exc), exc.param, "invalid_value") from exc


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs or []
        self.top_logprobs += out.top_logprobs or []
        if out.finished:
            self.finish_reason, self.stop_reason, self.error = out.finish_reason, out.stop_reason, out.error


class Generation:
    def __init__(self, engine: Engine, prompts: list[list[int]], params: SamplingParams,
                 timeout: float, priority: int = 0):
        self.engine, self.prompts, self.params = engine, prompts, params
        self.request_ids: list[str] = []
        self.streams = []
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.first_token_at: float | None = None  # time.perf_counter() of the first output token
        self._finish_reasons: list[str] = []
        self._tokens_seen = 0  # output tokens streamed so far, also for choices that never finished
        try:
            for prompt in prompts:
                request_id = uuid.uuid4().hex
                self.streams.append(engine.submit(prompt, params, request_id, priority))
                self.request_ids.append(request_id)
        except (RequestRejected, EngineError) as exc:
            self.abort()
            raise engine_error(exc) from exc
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(timeout, self.abort)
        record = current_record()
        if record is not None:
            record.generations.append(self)

    def abort(self) -> None:
        for request_id in self.request_ids:
            self.engine.abort(request_id)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output of every prompt, in arrival order."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(prompt_index: int, stream) -> None:
            try:
                async for out in stream:
                    await queue.put((prompt_index * self.params.n + out.index, out))
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                self._note(item[1])
                yield item
        finally:
            self._deadline.cancel()
            for task in tasks:
                task.cancel()  # closing each stream aborts whatever has not finished
            await asyncio.gather(*tasks, return_exceptions=True)

    def _note(self, out: RequestOutput) -> None:
        if self.first_token_at is None and out.new_token_ids:
            self.first_token_at = time.perf_counter()
        self._tokens_seen += len(out.new_token_ids)
        if out.finished:
            self.completion_tokens += out.num_output_tokens
            self.cached_tokens += out.num_cached_tokens if out.index == 0 else 0
            self._finish_reasons.append(out.finish_reason)

    def output_tokens(self) -> int:
        """Tokens generated, counting those of choices cut short (their usage was never reported)."""
        return max(self.completion_tokens, self._tokens_seen)

    def finish_reasons(self) -> list[str]:
        """One per choice; a choice whose end never arrived (the client left, the stream was closed)
        was aborted."""
        missing = len(self.prompts) * self.params.n - len(self._finish_reasons)
        return self._finish_reasons + ["abort"] * missing

    async def collect(self, request: Request | None = None) -> list[Choice]:
        """All choices, complete. If the client disconnects first, everything is aborted."""
        choices = [Choice(i) for i in range(len(self.prompts) * self.params.n)]

        async def gather() -> None:
            async for index, out in self.outputs():
                choices[index].add(out)

        await run_until_disconnect(request, gather())
        failed = next((c for c in choices if c.finish_reason == "error"), None)
        if failed is not None:
            raise APIError(500, f"generation failed: {failed.error}", None, "generation_error")
        return choices

    def usage(self) -> dict:
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                 "total_tokens": self.prompt_tokens + self.completion_tokens}
        if self.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage


async def run_until_disconnect(request: Request | None, work) -> None:
    """Run `work`; cancel it (which aborts its engine requests) if the HTTP client goes away first."""
    if request is None:
        await work
        return
    task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "client disconnected")
        task.result()
    finally:
        watcher.cancel()
