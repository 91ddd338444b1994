"""GET /metrics of a real server after real traffic: promtool lints it clean, labels stay bounded
(route templates, never raw paths or request ids), and every metric the deploy rules and dashboard
read is exported."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app
from service.settings import Settings
from tests.metrics.prometheus_process import INSTALL_HINT, PROMTOOL

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
REQUEST_ID = "trace-5f2c9d1e7a"
RAW_PATH = "/v1/completions/cmpl-0123456789abcdef"


@pytest.fixture(scope="module")
def exposition(server) -> tuple[str, set[str]]:
    """The /metrics text after a mix of good, streamed, refused and unknown requests, and the ids
    the server gave those requests."""
    ids = {REQUEST_ID}
    headers = {"X-Request-Id": REQUEST_ID}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as client:
        completion = client.post("/v1/completions", json={"model": "smollm2", "prompt": "Metrics are",
                                                          "max_tokens": 3, "temperature": 0})
        assert completion.status_code == 200, completion.text
        ids.add(completion.json()["id"])
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as stream:
            ids |= set(re.findall(r'"id":\s*"([^"]+)"', stream.read().decode()))
        assert client.post("/v1/completions", json={"model": "smollm2", "prompt": "x", "max_tokens": 0}
                           ).status_code == 400
        assert client.get(RAW_PATH).status_code in (404, 405)
        assert client.get("/v1/models").status_code == 200
        text = client.get("/metrics").text
    return text, ids


def labels(text: str) -> list[tuple[str, dict[str, str]]]:
    return [(sample.name, sample.labels) for family in text_string_to_metric_families(text)
            for sample in family.samples]


def test_promtool_check_metrics_is_clean(exposition):
    if not Path(PROMTOOL).exists():
        pytest.fail(f"{PROMTOOL} is missing: {INSTALL_HINT}")
    text, _ = exposition
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def route_paths(routes):
    """Every route template, also inside included routers (FastAPI keeps those as nested objects)."""
    for route in routes:
        if getattr(route, "path", None):
            yield route.path
        router = getattr(route, "original_router", None)
        if router is not None:
            yield from (router.prefix + path for path in route_paths(router.routes))


def test_http_counter_labels_are_route_templates(exposition):
    text, _ = exposition
    app = create_app(Settings())
    templates = set(app.openapi()["paths"]) | set(route_paths(app.routes)) | {"unmatched"}
    routes = {sample_labels["route"] for name, sample_labels in labels(text)
              if name == "kvserve_http_requests_total"}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= routes
    assert routes <= templates, routes - templates


def test_no_label_holds_a_request_id_or_raw_path(exposition):
    text, ids = exposition
    assert len(ids) >= 3  # the header's, the completion's, the chat stream's
    for name, sample_labels in labels(text):
        for key, value in sample_labels.items():
            assert not any(request_id in value for request_id in ids), (name, key, value)
            assert RAW_PATH not in value and not re.search(r"[0-9a-f]{16,}", value), (name, key, value)


def test_every_metric_the_rules_read_is_exported(exposition):
    text, _ = exposition
    exported = {name for name, _ in labels(text)}
    rule_files = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml"))
    exprs = [rule["expr"] for path in rule_files for group in yaml.safe_load(path.read_text())["groups"]
             for rule in group["rules"]]
    read = {name for expr in exprs for name in re.findall(r"\bkvserve_[a-z0-9_]+", expr)}
    assert len(read) > 10 and read <= exported, read - exported
