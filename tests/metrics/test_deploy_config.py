"""deploy/prometheus and deploy/grafana: promtool accepts the config and rules, every alert has firing
and quiet unit tests, and every dashboard query is a recording rule (so promtool checks its PromQL)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.metrics.prometheus_process import INSTALL_HINT, PROMTOOL

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM_DIR / "tests").glob("*.yml"))
DASHBOARD = GRAFANA_DIR / "dashboards" / "kvserve.json"


def promtool(*args: str) -> subprocess.CompletedProcess:
    if not Path(PROMTOOL).exists():
        pytest.fail(f"{PROMTOOL} is missing: {INSTALL_HINT}")
    return subprocess.run([PROMTOOL, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60)


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def rules(kind: str) -> list[dict]:
    return [rule for path in RULE_FILES for group in load_yaml(path)["groups"] for rule in group["rules"]
            if kind in rule]


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def normalize(expr: str) -> str:
    return " ".join(expr.split())


def test_promtool_check_config():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(RULE_FILES)} rule files found" in result.stdout


def test_promtool_check_rules():
    result = promtool("check", "rules", *[str(path) for path in RULE_FILES])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda path: path.name)
def test_promtool_test_rules(path: Path):
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_targets_kvserve_metrics():
    config = load_yaml(PROM_DIR / "prometheus.yml")
    assert sorted(config["rule_files"]) == sorted(str(p.relative_to(PROM_DIR)) for p in RULE_FILES)
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "kvserve"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets and all(t.endswith(":8000") for t in targets)


def test_every_alert_has_firing_and_quiet_unit_tests():
    cases: dict[str, set[bool]] = {}
    for path in RULE_TESTS:
        for test in load_yaml(path)["tests"]:
            for case in test.get("alert_rule_test", []):
                cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    alerts = {rule["alert"] for rule in rules("alert")}
    assert {"KvserveDown", "KvserveEngineDead", "KvserveQueueBacklog", "KvserveHighTimeToFirstToken",
            "KvserveKVCacheNearlyFull", "KvserveHighErrorRate"} <= alerts
    for alert in alerts:
        assert cases.get(alert) == {True, False}, f"{alert}: needs a firing and a not-firing case"


def test_every_dashboard_query_is_a_recording_rule():
    recorded = {normalize(rule["expr"]) for rule in rules("record")}
    queries = {normalize(expr) for expr in dashboard_queries()}
    assert queries == recorded, (queries - recorded, recorded - queries)


def test_dashboard_covers_the_serving_signals():
    text = " ".join(dashboard_queries())
    for metric in ["kvserve_request_success_total", "kvserve_prompt_tokens_total",
                   "kvserve_generation_tokens_total", "kvserve_time_to_first_token_seconds_bucket",
                   "kvserve_inter_token_latency_seconds_bucket", "kvserve_e2e_request_latency_seconds_bucket",
                   "kvserve_num_requests_running", "kvserve_num_requests_waiting", "kvserve_kv_cache_usage_ratio",
                   "kvserve_num_preemptions_total", "kvserve_prefix_cache_hits_total",
                   "kvserve_request_failure_total", "kvserve_step_duration_seconds_bucket",
                   "kvserve_iteration_tokens_sum"]:
        assert metric in text, metric
    for quantile in ["0.5", "0.9", "0.99"]:
        for histogram in ["time_to_first_token", "inter_token_latency", "e2e_request_latency"]:
            assert f"histogram_quantile({quantile}, sum by (le) (rate(kvserve_{histogram}_seconds_bucket" in text


def test_dashboard_panels_use_the_provisioned_datasource():
    [source] = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"].endswith(":9090")
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert dashboard["uid"] and len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["targets"] and all(t["datasource"]["uid"] == source["uid"] for t in panel["targets"])
    [provider] = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "kvserve.yml")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]

