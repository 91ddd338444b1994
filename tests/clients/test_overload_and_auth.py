"""The client on a server that is easy to fill (one running sequence, one waiting) and needs a key:
503s come back as OverloadedError with Retry-After, the client's retries wait as told and get through
once there is room, and a missing key is an AuthenticationError (the playground page stays public)."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from clients import AsyncClient, AuthenticationError, Client, OverloadedError
from tests.server_process import ServerProcess

pytestmark = pytest.mark.slow
KEY = "test-key"


@pytest.fixture(scope="module")
def small_server():
    with ServerProcess("--max-num-seqs", "1", "--max-queue", "1", "--kv-cache-memory", "64MiB",
                       "--api-key", KEY) as proc:
        yield proc


def test_api_key_required_and_playground_public(small_server):
    with Client(small_server.url, api_key="wrong", max_retries=0) as client:
        with pytest.raises(AuthenticationError) as caught:
            client.complete("Hi", max_tokens=2)
    assert caught.value.status == 401 and caught.value.code == "invalid_api_key"
    with Client(small_server.url, api_key=KEY) as client:
        assert client.complete("Hi", max_tokens=2).usage.completion_tokens == 2
    page = httpx.get(small_server.url + "/")
    assert page.status_code == 200 and "kvserve playground" in page.text
    assert httpx.get(small_server.url + "/static/playground.js").status_code == 200
    assert httpx.get(small_server.url + "/static/..%2Fapp.py").status_code == 404


async def _occupy(client: AsyncClient):
    """One request running (its first token has arrived) and one waiting: the queue is full."""
    running = await client.complete_stream("Once upon a time", max_tokens=500, ignore_eos=True)
    await running.__anext__()
    # Response headers come back once the request is queued, so the queue is full from here on.
    waiting = await client.complete_stream("In a land far away", max_tokens=500, ignore_eos=True)
    return running, waiting


def test_overload_gives_503_and_retries_get_through(small_server):
    retries = []

    def record(attempt, delay, error):
        retries.append((attempt, delay, error.status))

    async def main():
        async with AsyncClient(small_server.url, api_key=KEY, max_retries=0) as client:
            running, waiting = await _occupy(client)
            with pytest.raises(OverloadedError) as refused:
                await client.complete("Hello", max_tokens=4)
            async with AsyncClient(small_server.url, api_key=KEY, max_retries=2, on_retry=record) as patient:
                with pytest.raises(OverloadedError):  # still full after every retry: gives up
                    await patient.complete("Hello", max_tokens=4)
            gave_up = list(retries)
            retries.clear()
            async with AsyncClient(small_server.url, api_key=KEY, max_retries=30, on_retry=record) as patient:
                task = asyncio.create_task(patient.complete("Hello", max_tokens=4, ignore_eos=True))
                while not retries:
                    await asyncio.sleep(0.05)
                await running.close()  # the server aborts both; the retried request now fits
                await waiting.close()
                return refused.value, gave_up, await task

    refused, gave_up, result = asyncio.run(main())
    assert refused.status == 503 and refused.headers["retry-after"] == "1" and refused.code == "overloaded"
    assert gave_up == [(1, 1.0, 503), (2, 1.0, 503)]  # the delay is the server's Retry-After
    assert retries[0] == (1, 1.0, 503)
    assert result.usage.completion_tokens == 4
