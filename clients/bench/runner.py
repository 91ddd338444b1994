"""The load generator: streamed /v1/completions requests, at a fixed concurrency or at Poisson arrivals,
each timed from send to first token, between tokens, and to the end."""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from clients.bench.prompts import Prompt
from clients.client import AsyncClient
from clients.errors import KvserveError


@dataclass
class RequestRecord:
    prompt_tokens: int       # from the server's usage when it sends one, else as built
    max_tokens: int
    start: float             # seconds since the benchmark started
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    token_times: list[float] = field(default_factory=list)  # arrival of each text chunk since t0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft is not None

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass
class LoadSpec:
    concurrency: int | None = 8          # at most this many requests in flight (None: no limit)
    request_rate: float | None = None    # requests per second, Poisson arrivals (None: all at once)
    temperature: float = 0.0
    ignore_eos: bool = False
    extra_body: dict = field(default_factory=dict)
    seed: int = 0


async def send(client: AsyncClient, prompt: Prompt, spec: LoadSpec, t0: float) -> RequestRecord:
    body = dict(spec.extra_body, max_tokens=prompt.max_tokens, temperature=spec.temperature)
    if spec.ignore_eos:
        body["ignore_eos"] = True
    record = RequestRecord(prompt.num_tokens, prompt.max_tokens, time.perf_counter() - t0)
    chunks = 0
    try:
        async with await client.complete_stream(prompt.text, **body) as stream:
            async for chunk in stream:
                now = time.perf_counter() - t0
                if chunk.usage is not None:
                    record.output_tokens = chunk.usage.completion_tokens
                    record.prompt_tokens = chunk.usage.prompt_tokens or record.prompt_tokens
                if chunk.text:
                    chunks += 1
                    record.token_times.append(now)
                    if record.ttft is None:
                        record.ttft = now - record.start
        record.latency = time.perf_counter() - t0 - record.start
        record.output_tokens = record.output_tokens or chunks  # no usage sent: one chunk, one token
        if record.ttft is None:
            record.error = "no tokens received"
    except KvserveError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record


async def run_load(client: AsyncClient, prompts: list[Prompt], spec: LoadSpec,
                   on_done: Callable[[RequestRecord], None] = lambda r: None) -> tuple[list[RequestRecord], float]:
    """Send every prompt; returns the records (in prompt order) and the wall time in seconds."""
    limit = asyncio.Semaphore(spec.concurrency or len(prompts))
    arrivals = random.Random(spec.seed)
    t0 = time.perf_counter()

    async def one(prompt: Prompt) -> RequestRecord:
        async with limit:
            record = await send(client, prompt, spec, t0)
        on_done(record)
        return record

    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(one(prompt)))
        if spec.request_rate:
            await asyncio.sleep(arrivals.expovariate(spec.request_rate))
    records = await asyncio.gather(*tasks)
    return records, time.perf_counter() - t0
