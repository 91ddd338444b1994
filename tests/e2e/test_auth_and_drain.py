"""API keys (--api-key, repeatable) and the SIGTERM drain: in-flight requests finish (or are aborted at
--drain-timeout), new ones get 503, and the process exits with code 0."""
from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import text_generation

from tests.e2e.helpers import TIMEOUT, sse_data, wait_until
from tests.server_process import ServerProcess

# text_generation 0.7 still calls pydantic v1's .dict()
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")
KEYS = ("k1", "k2")
BODY = {"model": "smollm2", "prompt": "Hello", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def keyed_server():
    """Keys k1 and k2; a drain timeout long enough that in-flight requests always finish."""
    with ServerProcess("--api-key", KEYS[0], "--api-key", KEYS[1], "--drain-timeout", "300") as proc:
        yield proc


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_health_needs_no_key(keyed_server):
    assert httpx.get(keyed_server.url + "/health", timeout=30).status_code == 200


@pytest.mark.parametrize("headers", [{}, bearer("nope"), {"Authorization": "k1"}, bearer("k1k2")],
                         ids=["none", "wrong", "no-bearer", "keys-joined"])
def test_missing_or_wrong_key_is_401(keyed_server, headers):
    with httpx.Client(base_url=keyed_server.url, headers=headers, timeout=60) as http:
        for response in (http.post("/v1/completions", json=BODY), http.get("/v1/models")):
            assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
            error = response.json()["error"]
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        response = http.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
        assert response.status_code == 401
        assert response.json() == {"error": "missing or invalid API key", "error_type": "authentication"}


def test_either_key_works(keyed_server):
    for key in KEYS:
        client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=key, timeout=300, max_retries=0)
        completion = client.completions.create(**BODY)
        assert completion.usage.completion_tokens >= 1
    tgi = text_generation.Client(keyed_server.url, headers=bearer(KEYS[1]), timeout=300)
    assert tgi.generate("Hello", max_new_tokens=2).details.generated_tokens >= 1
    wrong = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="k3", timeout=60, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(**BODY)


def start_streams(url: str, body: dict, headers: dict, count: int):
    """`count` streamed completions on threads; returns (futures, barrier passed once each has a token)."""
    started = threading.Barrier(count + 1, timeout=300)

    def run() -> list[dict]:
        events = []
        with httpx.Client(timeout=TIMEOUT) as client, client.stream(
                "POST", url + "/v1/completions", json=dict(body, stream=True), headers=headers) as response:
            assert response.status_code == 200, response.read()
            for event in sse_data(response):
                events.append(event)
                if len(events) == 1:
                    started.wait()
        return events

    pool = ThreadPoolExecutor(count)
    futures = [pool.submit(run) for _ in range(count)]
    pool.shutdown(wait=False)
    return futures, started


def final_choice(events: list[dict]) -> dict:
    return [e for e in events if e.get("choices")][-1]["choices"][0]


def refused_or_503(url: str, headers: dict) -> bool:
    try:
        response = httpx.post(url + "/v1/completions", json=BODY, headers=headers, timeout=60)
    except httpx.ConnectError:
        return True
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] and response.json()["error"]["type"] == "overloaded_error"
    return True


def test_sigterm_drains_in_flight_streams_then_exits_0(keyed_server):
    """Runs last in this module: it stops the keyed server."""
    body = dict(BODY, prompt="Tell me a story.", max_tokens=32, ignore_eos=True,
                stream_options={"include_usage": True})
    futures, started = start_streams(keyed_server.url, body, bearer(KEYS[0]), 2)
    started.wait()
    keyed_server.signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(keyed_server.url + "/health", timeout=30).status_code == 503, 60,
               "/health to answer 503 while draining")
    in_flight_when_refused = not all(f.done() for f in futures)
    assert refused_or_503(keyed_server.url, bearer(KEYS[0]))
    assert in_flight_when_refused, "the streams ended before the drain could be observed"
    for future in futures:
        events = future.result(timeout=600)
        assert final_choice(events)["finish_reason"] == "length"
        assert events[-1]["usage"]["completion_tokens"] == 32
    assert keyed_server.proc.wait(timeout=120) == 0


def test_drain_timeout_aborts_long_streams_then_exits_0():
    with ServerProcess("--drain-timeout", "1") as server:
        body = dict(BODY, prompt="Tell me a story.", max_tokens=2000, ignore_eos=True)
        futures, started = start_streams(server.url, body, {}, 2)
        started.wait()
        server.signal(signal.SIGTERM)
        for future in futures:
            assert final_choice(future.result(timeout=600))["finish_reason"] == "abort"
        assert server.proc.wait(timeout=120) == 0
