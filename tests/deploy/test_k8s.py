"""deploy/k8s/{gpu,cpu} validate offline (kubectl kustomize, kubernetes-validate --strict) and hold together:
drain within the grace period, settings that parse, metrics the server exports and the adapter serves."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.files import K8S, REPO, k8s_object, settings_field, settings_from_env, tool, yaml_documents

KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
EXTRA_MANIFESTS = [K8S / "secret.example.yaml", K8S / "monitoring/prometheus-adapter-rules.yaml",
                   K8S / "monitoring/podmonitor.yaml"]


def kustomize(variant: str, folder: Path) -> Path:
    """What `kubectl apply -k deploy/k8s/VARIANT` applies."""
    result = subprocess.run([tool("kubectl"), "kustomize", str(K8S / variant)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    path = folder / f"kvserve-{variant}.yaml"
    path.write_text(result.stdout)
    return path


def validate(version: str, *files: Path) -> str:
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", version, *map(str, files)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return kustomize("gpu", tmp_path_factory.mktemp("k8s"))


@pytest.fixture(scope="module")
def deployment(built) -> dict:
    return k8s_object(built, "Deployment")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module")
def config(built) -> dict[str, str]:
    return k8s_object(built, "ConfigMap")["data"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_strictly(built, version):
    output = validate(version, built, *EXTRA_MANIFESTS)
    kinds = {"Namespace", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
             "Secret"}
    for kind in kinds:
        assert f"resource {kind.lower()}/" in output, f"{kind} was not validated"
    # Only the Prometheus operator's PodMonitor, a custom resource, has no bundled schema.
    unchecked = [line for line in output.splitlines() if line.startswith("WARN")]
    assert all("PodMonitor" in line for line in unchecked), unchecked


def test_gpu_resources_requests_and_limits(container):
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    for key in ("cpu", "memory"):
        assert key in resources["requests"] and key in resources["limits"]
    assert container["image"].endswith(":cuda")


def test_cpu_variant_is_the_same_without_a_gpu(built, tmp_path):
    cpu = kustomize("cpu", tmp_path)
    output = validate(KUBERNETES_VERSIONS[-1], cpu)
    assert "resource deployment/kvserve" in output and "WARN" not in output
    pod = k8s_object(cpu, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"].endswith(":cpu") and "nvidia.com/gpu" not in cpu.read_text()
    assert "tolerations" not in pod
    assert sorted(d["kind"] for d in yaml_documents(cpu)) == sorted(d["kind"] for d in yaml_documents(built))


def test_probes_ask_health_and_startup_allows_the_model_load(container):
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_termination_grace_covers_prestop_and_drain(deployment, container, config):
    pod = deployment["spec"]["template"]["spec"]
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    drain = float(config["KVSERVE_DRAIN_TIMEOUT"])
    # After the drain timeout the server aborts what is left (up to 5 s) and uvicorn shuts down (up to 5 s).
    assert pod["terminationGracePeriodSeconds"] >= int(prestop[1]) + drain + 10
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain


def test_config_map_holds_settings_that_parse_and_match_the_port(built, deployment, container, config,
                                                                 monkeypatch):
    assert all(settings_field(name) for name in config), config
    settings = settings_from_env(monkeypatch, config)
    assert settings.host == "0.0.0.0"
    assert container["ports"][0]["containerPort"] == settings.port
    assert container["envFrom"][0]["configMapRef"]["name"] == k8s_object(built, "ConfigMap")["metadata"]["name"]
    # Service links would set KVSERVE_PORT=tcp://..., which is not a port number.
    assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_api_keys_come_from_a_secret_as_a_json_list(container, monkeypatch):
    ref = next(env for env in container["env"] if env["name"] == "KVSERVE_API_KEY")["valueFrom"]["secretKeyRef"]
    secret = k8s_object(K8S / "secret.example.yaml", "Secret")
    assert ref["name"] == secret["metadata"]["name"]
    value = secret["stringData"][ref["key"]]
    assert isinstance(json.loads(value), list)
    assert settings_from_env(monkeypatch, {"KVSERVE_API_KEY": value}).api_key == json.loads(value)
    assert settings_from_env(monkeypatch, {"KVSERVE_API_KEY": '["a","b"]'}).api_key == ["a", "b"]


def adapter_rules() -> list[dict]:
    values = yaml.safe_load((K8S / "monitoring/prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    config_map = k8s_object(K8S / "monitoring/prometheus-adapter-rules.yaml", "ConfigMap")
    assert yaml.safe_load(config_map["data"]["config.yaml"])["rules"] == values
    return values


def served_by(rules: list[dict], name: str) -> dict | None:
    """The adapter rule whose series query selects this metric name."""
    for rule in rules:
        match = re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"])
        if match and re.fullmatch(match.group(1), name):
            return rule
    return None


def test_hpa_scales_on_queue_metrics_the_server_exports_and_the_adapter_serves(built):
    hpa = k8s_object(built, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == k8s_object(built, "Deployment")["metadata"]["name"]
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert "kvserve_num_requests_waiting" in names
    exported = (REPO / "service/metrics.py").read_text()
    rules = adapter_rules()
    for name in names:
        assert f'"{name}"' in exported, f"the server does not export {name}"
        rule = served_by(rules, name)
        assert rule and rule["resources"]["overrides"]["pod"] == {"resource": "pod"}, name


def test_pdb_and_service_select_the_pods(built):
    labels = k8s_object(built, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind, selector in (("PodDisruptionBudget", lambda o: o["spec"]["selector"]["matchLabels"]),
                           ("Service", lambda o: o["spec"]["selector"])):
        assert selector(k8s_object(built, kind)).items() <= labels.items(), kind
    assert k8s_object(built, "Service")["spec"]["ports"][0]["targetPort"] == "http"
