"""A real Prometheus scraping a real kvserve process every second: what it stores after real traffic
matches what the responses reported, the KV gauge moves with a running request, and every recording
and alert rule evaluates cleanly against real series.

The kvserve process is this module's own (the session `server` is shared, its counters are not ours);
counts are compared as differences across the traffic, so the tests do not depend on their order."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.metrics.prometheus_process import INSTALL_HINT, PROMETHEUS, PrometheusProcess
from tests.server_process import ServerProcess

pytestmark = pytest.mark.slow
RULE_FILES = sorted((Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules").glob("*.yml"))
COUNTERS = {
    "requests": "sum(kvserve_request_success_total)",
    "errors": 'sum(kvserve_request_failure_total{reason="error"})',
    "prompt_tokens": "kvserve_prompt_tokens_total",
    "generation_tokens": "kvserve_generation_tokens_total",
    "ttft_count": "kvserve_time_to_first_token_seconds_count",
    "ttft_sum": "kvserve_time_to_first_token_seconds_sum",
    "e2e_sum": "kvserve_e2e_request_latency_seconds_sum",
}
REQUESTS = [  # (route, body): plain and streamed, completions and chat, different lengths
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 2}),
    ("/v1/completions", {"prompt": "Count: one, two,", "max_tokens": 5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 3}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4, "stream": True,
                         "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 3,
                              "stream": True, "stream_options": {"include_usage": True}}),
]


@pytest.fixture(scope="module")
def stack():
    if not Path(PROMETHEUS).exists():
        pytest.fail(f"{PROMETHEUS} is missing: {INSTALL_HINT}")
    kvserve = ServerProcess("--max-num-seqs", "8", "--kv-cache-memory", "64MiB")
    # Prometheus starts first and keeps trying the target while the model loads.
    with PrometheusProcess(f"127.0.0.1:{kvserve.port}", RULE_FILES) as prometheus, kvserve:
        prometheus.wait_for_scrape(after=time.time())
        yield kvserve, prometheus


def send(url: str, route: str, body: dict) -> tuple[dict, float]:
    """One request, its usage as the response reported it, and its wall time."""
    body = {"model": "smollm2", "temperature": 0, **body}
    start = time.monotonic()
    with httpx.Client(timeout=120) as client:
        if not body.get("stream"):
            response = client.post(url + route, json=body)
            assert response.status_code == 200, response.text
            return response.json()["usage"], time.monotonic() - start
        usage = None
        with client.stream("POST", url + route, json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage") or usage
        assert usage is not None, "no usage chunk in the stream"
        return usage, time.monotonic() - start


def read_counters(prometheus: PrometheusProcess) -> dict[str, float]:
    prometheus.wait_for_scrape(after=time.time())
    return {name: prometheus.value(expr) for name, expr in COUNTERS.items()}


def test_prometheus_stores_what_the_responses_reported(stack):
    kvserve, prometheus = stack
    before = read_counters(prometheus)
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        results = list(pool.map(lambda item: send(kvserve.url, *item), REQUESTS))
    after = read_counters(prometheus)
    delta = {name: after[name] - before[name] for name in COUNTERS}

    assert delta["requests"] == len(REQUESTS) and delta["errors"] == 0
    assert delta["prompt_tokens"] == sum(usage["prompt_tokens"] for usage, _ in results)
    assert delta["generation_tokens"] == sum(usage["completion_tokens"] for usage, _ in results)
    assert delta["ttft_count"] == len(REQUESTS)
    # Each request's TTFT and server-side latency fit inside its own client-side wall time.
    wall = sum(seconds for _, seconds in results)
    assert 0 < delta["ttft_sum"] < delta["e2e_sum"] < wall


def test_kv_usage_is_zero_idle_and_positive_while_a_request_runs(stack):
    kvserve, prometheus = stack
    prometheus.wait_for_scrape(after=time.time())
    assert prometheus.value("kvserve_kv_cache_usage_ratio") == 0
    body = {"model": "smollm2", "prompt": "Write a long story about a lighthouse.", "max_tokens": 1000,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as client, client.stream("POST", kvserve.url + "/v1/completions",
                                                             json=body) as response:
        lines = response.iter_lines()
        assert response.status_code == 200
        next(line for line in lines if line.startswith("data: {"))  # generating now
        prometheus.wait_for_scrape(after=time.time())
        usage = prometheus.value("kvserve_kv_cache_usage_ratio")
        running = prometheus.value("kvserve_num_requests_running")
        next(lines)  # still streaming after that scrape
    assert 0 < usage < 1 and running == 1
    # Closing the stream aborts the request, which frees its blocks.
    deadline = time.monotonic() + 30
    while prometheus.value("kvserve_kv_cache_usage_ratio") != 0:
        assert time.monotonic() < deadline, "KV blocks still in use 30 s after the client left"
        time.sleep(0.5)


def test_every_rule_evaluates_cleanly_on_real_series(stack):
    _, prometheus = stack
    deadline = time.monotonic() + 20
    while True:
        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        if all(rule["health"] != "unknown" for rule in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(rules) == sum(len(group["rules"]) for path in RULE_FILES
                             for group in yaml.safe_load(path.read_text())["groups"])
    assert [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"] == []
    assert prometheus.value("kvserve:up:sum") == 1 and prometheus.value("kvserve:engine_healthy:min") == 1
    assert prometheus.query('ALERTS{alertstate="firing"}') == []  # a healthy server alarms no one
