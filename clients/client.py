"""The kvserve client, sync (Client) and async (AsyncClient), for the OpenAI-shaped and native routes.

Both share every endpoint definition (_Endpoints builds a Call; each class only performs it), one
retry rule (429/503 and refused connections, honouring Retry-After, else exponential backoff with
jitter) and one SSE parser. Streaming methods return an iterator of typed chunks that closes the
connection when it ends or is closed, which makes the server abort the generation.

    with Client("http://127.0.0.1:8000") as client:
        for chunk in client.chat_stream([{"role": "user", "content": "Hi"}], max_tokens=32):
            print(chunk.text, end="", flush=True)
"""
from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from clients.errors import APIStatusError, KvserveError, status_error
from clients.streams import AsyncStream, Stream, connection_error
from clients.types import (ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, GenerateResponse,
                           ModelList, StreamResponse, Tokenized)

log = logging.getLogger("kvserve.client")
DEFAULT_URL = "http://127.0.0.1:8000"
RetryHook = Callable[[int, float, KvserveError], None]


def retry_delay(attempt: int, retry_after: str | None, backoff: float, max_backoff: float) -> float:
    """Seconds to wait before retry number attempt+1: what Retry-After says (seconds or an HTTP date),
    else backoff * 2**attempt, capped, with jitter so that many clients do not retry in step."""
    if retry_after:
        if retry_after.strip().replace(".", "", 1).isdigit():
            return float(retry_after)
        try:
            when = email.utils.parsedate_to_datetime(retry_after)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            pass
    return min(max_backoff, backoff * 2 ** attempt) * random.uniform(0.5, 1.0)


def failed(response: httpx.Response) -> bool:
    """Whether the answer is an error status, whose body then has to be read to say what went wrong."""
    return response.status_code >= 400


def answer_error(response: httpx.Response, body: bytes) -> APIStatusError:
    """The typed error of a failed answer, from its status, its already-read body and its headers."""
    return status_error(response.status_code, body.decode(errors="replace"), response.headers)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: dict | None = None
    convert: Callable[[Any], Any] = lambda data: data
    stream: bool = False
    needs_model: bool = False

    def request(self, http: httpx.Client | httpx.AsyncClient, body: dict | None) -> httpx.Request:
        """This call as a request built by either kind of client; `body`: the call's, with the model set."""
        return http.build_request(self.method, self.path, json=body)


class _Endpoints:
    """Every route, once. `_call` returns the result (Client) or a coroutine of it (AsyncClient)."""

    def request(self, method: str, path: str, body: dict | None = None):
        """Any route; the decoded JSON answer (errors and retries as everywhere)."""
        return self._call(Call(method, path, body))

    def health(self):
        return self._call(Call("GET", "/health"))

    def models(self):
        return self._call(Call("GET", "/v1/models", convert=ModelList.model_validate))

    def tokenize(self, text: str):
        return self._call(Call("POST", "/tokenize", {"prompt": text}, Tokenized.model_validate))

    def detokenize(self, tokens: list[int]):
        return self._call(Call("POST", "/detokenize", {"tokens": tokens}, lambda data: data["prompt"]))

    def complete(self, prompt: str | list, **params):
        """/v1/completions. params: max_tokens, temperature, top_p, stop, seed, ignore_eos, ..."""
        body = dict(params, prompt=prompt)
        return self._call(Call("POST", "/v1/completions", body, Completion.model_validate, needs_model=True))

    def complete_stream(self, prompt: str | list, **params):
        body = dict(params, prompt=prompt, stream=True, stream_options={"include_usage": True})
        return self._call(Call("POST", "/v1/completions", body, CompletionChunk.model_validate, True, True))

    def chat(self, messages: list[dict], **params):
        body = dict(params, messages=messages)
        return self._call(Call("POST", "/v1/chat/completions", body, ChatCompletion.model_validate,
                               needs_model=True))

    def chat_stream(self, messages: list[dict], **params):
        body = dict(params, messages=messages, stream=True, stream_options={"include_usage": True})
        return self._call(Call("POST", "/v1/chat/completions", body, ChatCompletionChunk.model_validate, True,
                               True))

    def generate(self, inputs: str, **parameters):
        """Native /generate. parameters: max_new_tokens, temperature, top_p, stop, seed, details, ..."""
        body = {"inputs": inputs, "parameters": parameters}
        return self._call(Call("POST", "/generate", body, GenerateResponse.model_validate))

    def generate_stream(self, inputs: str, **parameters):
        body = {"inputs": inputs, "parameters": parameters}
        return self._call(Call("POST", "/generate_stream", body, StreamResponse.model_validate, True))


@dataclass
class _Options:
    base_url: str | None = None
    api_key: str | None = None
    model: str | None = None
    timeout: float = 600.0
    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 8.0
    on_retry: RetryHook | None = None
    headers: dict = field(default_factory=dict)

    def resolve(self) -> _Options:
        self.base_url = (self.base_url or os.environ.get("KVSERVE_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = self.api_key or os.environ.get("KVSERVE_API_KEY") or None
        if self.api_key:
            self.headers = dict(self.headers, Authorization=f"Bearer {self.api_key}")
        return self

    def http_args(self) -> dict:
        return {"base_url": self.base_url, "headers": self.headers,
                "timeout": httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))}

    def retry_wait(self, attempt: int, error: KvserveError) -> float:
        """Seconds to sleep before sending again after failed attempt number `attempt` (from 0); raises
        the error itself when it is not retryable or the retries are spent."""
        if attempt >= self.max_retries or not error.retryable:
            raise error
        headers = error.headers if isinstance(error, APIStatusError) else {}
        delay = retry_delay(attempt, headers.get("retry-after"), self.backoff, self.max_backoff)
        log.info("retry %d/%d in %.2f s after: %s", attempt + 1, self.max_retries, delay, error)
        if self.on_retry:
            self.on_retry(attempt + 1, delay, error)
        return delay


class Client(_Endpoints):
    """Blocking client. Arguments default to $KVSERVE_URL and $KVSERVE_API_KEY; `model` to the
    server's first model. timeout: seconds of silence before giving up (per read, not per stream)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, model: str | None = None,
                 timeout: float = 600.0, max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 8.0,
                 on_retry: RetryHook | None = None):
        self.options = _Options(base_url, api_key, model, timeout, max_retries, backoff, max_backoff,
                                on_retry).resolve()
        self._http = httpx.Client(**self.options.http_args())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, call: Call):
        body = call.body
        if call.needs_model and "model" not in body:
            body = dict(body, model=self.options.model or self._default_model())
        response = self._send(call, body)
        if call.stream:
            return Stream(response, call.convert)
        try:
            return call.convert(json.loads(response.read()))
        except httpx.HTTPError as exc:
            raise connection_error(exc) from exc
        finally:
            response.close()

    def _default_model(self) -> str:
        self.options.model = self.models().data[0].id
        return self.options.model

    def _send(self, call: Call, body: dict | None) -> httpx.Response:
        for attempt in itertools.count():
            try:
                response = self._http.send(call.request(self._http, body), stream=True)
            except httpx.HTTPError as exc:
                error = connection_error(exc)
            else:
                if not failed(response):
                    return response
                error = answer_error(response, response.read())
                response.close()
            time.sleep(self.options.retry_wait(attempt, error))


class AsyncClient(_Endpoints):
    """The same as Client, awaited: `await client.chat(...)`, `async for c in await client.chat_stream(...)`."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, model: str | None = None,
                 timeout: float = 600.0, max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 8.0,
                 on_retry: RetryHook | None = None, max_connections: int = 1000):
        self.options = _Options(base_url, api_key, model, timeout, max_retries, backoff, max_backoff,
                                on_retry).resolve()
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(limits=limits, **self.options.http_args())

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, call: Call):
        body = call.body
        if call.needs_model and "model" not in body:
            body = dict(body, model=self.options.model or await self._default_model())
        response = await self._send(call, body)
        if call.stream:
            return AsyncStream(response, call.convert)
        try:
            return call.convert(json.loads(await response.aread()))
        except httpx.HTTPError as exc:
            raise connection_error(exc) from exc
        finally:
            await response.aclose()

    async def _default_model(self) -> str:
        self.options.model = (await self.models()).data[0].id
        return self.options.model

    async def _send(self, call: Call, body: dict | None) -> httpx.Response:
        for attempt in itertools.count():
            try:
                response = await self._http.send(call.request(self._http, body), stream=True)
            except httpx.HTTPError as exc:
                error = connection_error(exc)
            else:
                if not failed(response):
                    return response
                error = answer_error(response, await response.aread())
                await response.aclose()
            await asyncio.sleep(self.options.retry_wait(attempt, error))
