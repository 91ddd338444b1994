"""Clients that leave are aborted server-side (their sequences and KV blocks freed); a burst beyond
--max-queue gets 503 + Retry-After while every admitted request completes in full."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.helpers import TIMEOUT, sse_data, wait_engine_idle
from tests.server_process import ServerProcess

LONG = {"model": "smollm2", "prompt": "Tell me a very long story.", "max_tokens": 2000, "ignore_eos": True,
        "temperature": 0}


@pytest.fixture(scope="module")
def small_server():
    """Two sequences at a time, two more may wait: slots held by a request that was not aborted show."""
    with ServerProcess("--max-num-seqs", "2", "--max-queue", "2", "--kv-cache-memory", "256MiB") as proc:
        yield proc


def stream_then_leave(url: str, body: dict, num_events: int, got_tokens: threading.Barrier | None = None):
    """Stream a completion, read `num_events` chunks, then drop the connection."""
    with httpx.Client(timeout=TIMEOUT) as client, client.stream(
            "POST", url + "/v1/completions", json=dict(body, stream=True)) as response:
        assert response.status_code == 200, response.read()
        events = sse_data(response)
        for _ in range(num_events):
            assert "choices" in next(events)
        if got_tokens is not None:
            got_tokens.wait()
    # leaving both `with` blocks closes the socket mid-stream


def complete(url: str, max_tokens: int = 4) -> dict:
    response = httpx.post(url + "/v1/completions", json={"model": "smollm2", "prompt": "Hello", "temperature": 0,
                                                         "max_tokens": max_tokens}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def test_16_streaming_clients_that_disconnect_are_aborted(server):
    barrier = threading.Barrier(16, timeout=300)  # every stream is running before any leaves
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(stream_then_leave, server.url, dict(LONG, max_tokens=200), 3, barrier)
                   for _ in range(16)]
        for future in futures:
            future.result()
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    assert wait_engine_idle(server.url, timeout=30), "running requests or used KV blocks did not return to 0"


def test_streams_that_disconnect_free_their_slots(small_server):
    """Both sequence slots go to 2000-token streams that then leave; if they were not aborted, the next
    request would wait behind 2000 steps of each."""
    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(stream_then_leave, small_server.url, LONG, 2) for _ in range(2)]:
            future.result()
    assert complete(small_server.url)["choices"][0]["finish_reason"] == "length"


def test_non_streamed_request_whose_client_times_out_is_aborted(small_server):
    def give_up() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(small_server.url + "/v1/completions", json=LONG, timeout=httpx.Timeout(3.0, connect=10.0))

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(give_up) for _ in range(2)]:
            future.result()
    assert complete(small_server.url)["choices"][0]["finish_reason"] == "length"
    wait_engine_idle(small_server.url, timeout=30)  # and, once /metrics exists, nothing is left running


def test_burst_beyond_max_queue_gets_503_and_admitted_requests_complete(small_server):
    body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    start = threading.Barrier(12, timeout=60)

    def send(_) -> httpx.Response:
        start.wait()
        return httpx.post(small_server.url + "/v1/completions", json=body, timeout=TIMEOUT)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, range(12)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 1 and statuses.count(200) >= 2, statuses
    alone = httpx.post(small_server.url + "/v1/completions", json=body, timeout=TIMEOUT).json()
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1
            error = response.json()["error"]
            assert error["type"] == "overloaded_error" and error["code"] == "overloaded"
        else:
            choice = response.json()["choices"][0]
            assert choice["finish_reason"] == "length" and response.json()["usage"]["completion_tokens"] == 6
            assert choice["text"] == alone["choices"][0]["text"]  # batched or not, the same greedy text
