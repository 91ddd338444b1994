"""The image's start-up path without a Docker engine: the Dockerfile's ENTRYPOINT, run with exactly the ENV
lines of its default target (only host and port moved to 127.0.0.1 and a free port), answers /health and
its HEALTHCHECK command, generates, and on SIGTERM drains the request in flight and exits with 0."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from clients.sse import iter_data, iter_events
from tests.deploy.files import Dockerfile
from tests.server_process import ServerProcess

pytestmark = pytest.mark.slow

DOCKERFILE = Dockerfile()
TARGET = DOCKERFILE.default_target
MODEL = "smollm2"  # the served model name the image keeps at its default


def container_env(port: int, home: Path) -> dict[str, str]:
    """The container's environment: its ENV lines, /opt/venv being this venv, plus what Docker sets (HOME)."""
    env = DOCKERFILE.env(TARGET)
    env["PATH"] = (env["PATH"].replace("/opt/venv/bin", str(Path(sys.executable).parent))
                   .replace("$PATH", "/usr/local/bin:/usr/bin:/bin"))
    return env | {"HOME": str(home), "KVSERVE_HOST": "127.0.0.1", "KVSERVE_PORT": str(port)}


def run_healthcheck(env: dict[str, str], home: Path) -> int:
    return subprocess.run(DOCKERFILE.healthcheck(TARGET)[1], env=env, cwd=home, capture_output=True,
                          timeout=30).returncode


def stream_completion(url: str, first_token: threading.Event, result: dict) -> None:
    """Reads a streamed completion, recording its text and finish reason. It is short enough to finish
    within the image's KVSERVE_DRAIN_TIMEOUT on a busy 2-core machine, long enough to be in flight at SIGTERM."""
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        result["status"] = response.status_code
        for chunk in iter_data(iter_events(response.iter_bytes())):
            choice = chunk["choices"][0]
            result["text"] = result.get("text", "") + choice.get("text", "")
            result["finish_reason"] = choice.get("finish_reason") or result.get("finish_reason")
            first_token.set()
    first_token.set()


def test_image_entrypoint_serves_then_drains_on_sigterm(tmp_path):
    entrypoint = DOCKERFILE.exec_form(TARGET, "ENTRYPOINT") + DOCKERFILE.exec_form(TARGET, "CMD")
    server = ServerProcess(command=entrypoint, startup_timeout=240)
    server.env = container_env(server.port, tmp_path)
    with server:
        assert run_healthcheck(server.env, tmp_path) == 0

        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"].strip()
        # The image's defaults on a CPU: int4 projections, float32 activations, float16 K/V (the fast path).
        info = next(line for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines()
                    if line.startswith("kvserve_model_info{"))
        assert 'quantization="int4"' in info and 'dtype="float32"' in info, info
        assert 'kv_cache_dtype="float16"' in info, info

        first_token, streamed = threading.Event(), {}
        reader = threading.Thread(target=stream_completion, args=(server.url, first_token, streamed))
        reader.start()
        assert first_token.wait(60), "no token streamed"
        server.signal(signal.SIGTERM)

        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 503 and "shutting down" in health.json()["reason"]
        assert run_healthcheck(server.env, tmp_path) != 0
        refused = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert refused.status_code == 503

        reader.join(90)
        assert streamed["status"] == 200
        assert streamed["finish_reason"] == "length", streamed  # finished, not aborted by the shutdown
        assert server.proc.wait(60) == 0, server.log()
    assert "draining: 1 request in flight" in server.log()
