"""Small helpers for the end-to-end tests: SSE over httpx, /metrics gauges, polling with a deadline."""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

TIMEOUT = httpx.Timeout(300.0, connect=10.0)  # the shared 2-core test machine can be very slow


def sse_data(response: httpx.Response) -> Iterator[dict]:
    """The JSON payloads of an SSE response, up to (not including) [DONE]."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def stream_events(url: str, body: dict, headers: dict | None = None) -> list[dict]:
    """POST `body` and return every SSE payload of the (200) streamed answer."""
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("POST", url, json=body,
                                                                  headers=headers) as response:
        assert response.status_code == 200, response.read()
        return list(sse_data(response))


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def read_gauges(base_url: str) -> dict[str, float] | None:
    """Unlabelled sample values (first series per name) from GET /metrics, or None if there is no /metrics."""
    response = httpx.get(base_url + "/metrics", timeout=30)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) not in values:
            values[match.group(1)] = float(match.group(3))
    return values


def wait_engine_idle(base_url: str, timeout: float = 30.0) -> bool:
    """Poll /metrics until no request runs or waits and no KV block is held (fail after `timeout`).
    False, at once, if the server has no /metrics."""
    if read_gauges(base_url) is None:
        return False

    def idle() -> bool:
        gauges = read_gauges(base_url)
        return (gauges.get("kvserve_num_requests_running") == 0
                and gauges.get("kvserve_num_requests_waiting", 0) == 0
                and gauges.get("kvserve_kv_cache_usage_ratio") == 0
                and gauges.get("kvserve_kv_cache_blocks_used", 0) == 0)

    wait_until(idle, timeout, "running requests and used KV blocks to drop to zero on /metrics")
    return True
