"""deploy/docker-compose.yml (GPU) and its CPU override validate, and their mounts match Prometheus and Grafana."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.files import DEPLOY, settings_field, settings_from_env, tool

STACKS = {"gpu": ["docker-compose.yml"], "cpu": ["docker-compose.yml", "docker-compose.cpu.yml"]}


def compose(stack: str, *args: str) -> subprocess.CompletedProcess:
    files = [arg for name in STACKS[stack] for arg in ("-f", name)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "KVSERVE_"))}
    return subprocess.run([tool("docker-compose"), *files, *args], cwd=DEPLOY, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module", params=list(STACKS))
def stack(request) -> tuple[str, dict]:
    result = compose(request.param, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return request.param, json.loads(result.stdout)


@pytest.mark.parametrize("name", list(STACKS))
def test_config_validates(name):
    result = compose(name, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_gpu_stack_reserves_a_gpu_and_cpu_stack_none(stack):
    name, config = stack
    kvserve = config["services"]["kvserve"]
    assert kvserve["build"]["target"] == {"gpu": "cuda", "cpu": "cpu"}[name]
    devices = (kvserve.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if name == "gpu":
        assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    else:
        assert not devices
    assert set(config["services"]) == {"kvserve", "prometheus", "grafana"}


def test_kvserve_settings_parse_and_stop_waits_for_the_drain(stack, monkeypatch):
    kvserve = stack[1]["services"]["kvserve"]
    env = kvserve["environment"]
    assert all(settings_field(name) for name in env), env
    settings = settings_from_env(monkeypatch, env)
    assert settings.api_key == []
    seconds = int(kvserve["stop_grace_period"].removesuffix("s"))
    assert seconds >= settings.drain_timeout + 10


def mounts(config: dict, service: str) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts."""
    return {v["target"]: v["source"] for v in config["services"][service]["volumes"] if v["type"] == "bind"}


def test_prometheus_gets_the_scrape_config_and_rules_and_scrapes_kvserve(stack):
    config = stack[1]
    binds = mounts(config, "prometheus")
    prometheus_yml = binds["/etc/prometheus/prometheus.yml"]
    scrape = yaml.safe_load(Path(prometheus_yml).read_text())
    targets = [t for job in scrape["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert "kvserve:8000" in targets
    for rule_file in scrape.get("rule_files", []):
        container_path = f"/etc/prometheus/{rule_file}"
        mounted = [(target, source) for target, source in binds.items() if container_path.startswith(target + "/")]
        assert mounted, f"{rule_file} is not mounted"
        target, source = mounted[0]
        assert Path(source + container_path.removeprefix(target)).is_file(), rule_file


def test_grafana_gets_provisioning_and_the_dashboard_folder_it_names(stack):
    binds = mounts(stack[1], "grafana")
    provisioning = Path(binds["/etc/grafana/provisioning"])

    def provisioned(kind: str) -> list[dict]:
        return [item for path in sorted((provisioning / kind).glob("*.y*ml"))
                for item in yaml.safe_load(path.read_text())[{"dashboards": "providers"}.get(kind, kind)]]

    for provider in provisioned("dashboards"):
        folder = provider["options"]["path"]
        assert folder in binds and list(Path(binds[folder]).glob("*.json")), folder
    assert any(source["url"] == "http://prometheus:9090" for source in provisioned("datasources"))
