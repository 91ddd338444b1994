"""What a person (or a container runtime) sees of `kvserve serve`: a failed load or a bad setting ends the
process at once with one line; a good start says what it loaded and where it listens; every request
leaves one log line, in text or JSON."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from service.settings import Settings, env_name, flag_name
from tests.e2e.helpers import TIMEOUT, wait_until
from tests.server_process import REPO, ServerProcess, free_port

SERVE = [sys.executable, "-m", "service", "serve"]


def run_serve(*flags: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVE, "--port", str(free_port()), *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def log_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


@pytest.mark.parametrize("model, cause", [("./no-such-model.gguf", "no such file or folder"),
                                          ("README.md", "not a GGUF file")])
def test_a_model_that_cannot_load_exits_at_once_with_one_line(model, cause):
    start = time.monotonic()
    proc = run_serve("--model", model)
    assert proc.returncode == 1
    assert time.monotonic() - start < 60
    errors = [line for line in log_lines(proc.stderr) if " ERROR " in line]
    assert len(errors) == 1 and "cannot load the model" in errors[0] and cause in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Uvicorn running" not in proc.stderr  # the port was never bound


@pytest.mark.parametrize("name, flags, env, value", [
    ("port", ["--port", "abc"], {}, "'abc'"),
    ("max_num_seqs", [], {"KVSERVE_MAX_NUM_SEQS": "abc"}, "'abc'"),
    ("quantization", ["--quantization", "int8"], {}, "'int8'"),
    ("max_num_seqs", ["--max-num-seqs", "0"], {}, "'0'"),
    ("kv_cache_dtype", [], {"KVSERVE_KV_CACHE_DTYPE": "fp8"}, "'fp8'"),
])
def test_a_bad_setting_is_one_line_naming_flag_variable_and_value(name, flags, env, value):
    proc = run_serve(*flags, env=env, timeout=60)
    assert proc.returncode == 2
    lines = log_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert flag_name(name) in lines[0] and env_name(name) in lines[0] and value in lines[0], lines[0]


def test_help_lists_every_flag_with_its_default_and_variable():
    text = subprocess.run([*SERVE, "--help"], cwd=REPO, capture_output=True, text=True, check=True,
                          env={**os.environ, "COLUMNS": "200"}).stdout
    for section in ("model:", "engine:", "server:", "security:"):
        assert f"\n{section}" in text
    entries = {block.split()[0].rstrip(","): " ".join(block.split()) for block in re.split(r"\n  (?=--)", text)}
    for name, field in Settings.model_fields.items():
        entry = entries[flag_name(name)]
        assert f"[{env_name(name)}]" in entry, entry
        assert field.description and " ".join(field.description.split()[:3]) in entry, entry
    assert "--port PORT" in text and "(default: 8000)" in text and "(default: smollm2)" in text


@pytest.fixture(scope="module")
def json_server():
    with ServerProcess("--log-format", "json", "--stats-interval", "1") as server:
        yield server


def json_entries(server: ServerProcess) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def request_entries(server: ServerProcess, request_id: str) -> list[dict]:
    return [e for e in json_entries(server) if e["logger"] == "kvserve.request" and e["request_id"] == request_id]


def test_the_ready_line_names_the_url_model_and_capacity(json_server):
    entries = json_entries(json_server)
    ready = [e["message"] for e in entries if e["message"].startswith("kvserve ready on")]
    assert len(ready) == 1, entries
    assert f"kvserve ready on {json_server.url}:" in ready[0]
    assert "model 'smollm2'" in ready[0] and "llama" in ready[0] and "135M parameters" in ready[0]
    assert "KV cache" in ready[0] and "blocks of 16, float16)" in ready[0] and "up to 64 sequences" in ready[0]
    messages = [e["message"] for e in entries]
    assert messages.index(ready[0]) > max(i for i, m in enumerate(messages) if m.startswith("read "))


def test_request_log_lines_for_a_success_a_400_and_an_abort(json_server):
    url = json_server.url
    with httpx.Client(timeout=TIMEOUT) as client:
        ok = client.post(url + "/v1/completions", headers={"x-request-id": "log-ok"},
                         json={"model": "smollm2", "prompt": "Hello there", "max_tokens": 5, "temperature": 0})
        bad = client.post(url + "/v1/completions", headers={"x-request-id": "log-bad"},
                          json={"model": "smollm2", "prompt": "Hello", "max_tokens": -1})
        with client.stream("POST", url + "/v1/completions", headers={"x-request-id": "log-abort"},
                           json={"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 2000,
                                 "ignore_eos": True, "stream": True}) as stream:
            next(line for line in stream.iter_lines() if line.startswith("data:"))  # then hang up
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "log-ok"
    assert bad.status_code == 400
    [success] = wait_until(lambda: request_entries(json_server, "log-ok"), 30, "the success's log line")
    assert (success["method"], success["path"], success["status"]) == ("POST", "/v1/completions", 200)
    assert success["prompt_tokens"] == ok.json()["usage"]["prompt_tokens"]
    assert success["output_tokens"] == 5 and success["finish_reason"] == "length"
    assert 0 < success["ttft_s"] <= success["total_s"]
    [refused] = wait_until(lambda: request_entries(json_server, "log-bad"), 30, "the 400's log line")
    assert refused["status"] == 400 and "output_tokens" not in refused
    [aborted] = wait_until(lambda: request_entries(json_server, "log-abort"), 60, "the abort's log line")
    assert aborted["status"] == 200 and aborted["finish_reason"] == "abort"
    assert 1 <= aborted["output_tokens"] < 2000


def test_an_engine_stats_line_while_busy(json_server):
    httpx.post(json_server.url + "/v1/completions", timeout=TIMEOUT,
               json={"model": "smollm2", "prompt": "Count to twenty:", "max_tokens": 48, "ignore_eos": True})
    stats = wait_until(lambda: [e for e in json_entries(json_server) if e["logger"] == "kvserve.stats"], 30,
                       "an engine stats line")
    assert any(e["generation_tokens_per_s"] > 0 for e in stats), stats
    assert {"running", "waiting", "kv_cache_usage", "prompt_tokens_per_s", "prefix_cache_hit_rate"} <= set(stats[0])
    assert stats[0]["message"].startswith("engine: ")


def test_probes_and_scrapes_are_not_logged(json_server):
    before = len(json_entries(json_server))
    for _ in range(3):
        assert httpx.get(json_server.url + "/health", timeout=TIMEOUT).status_code == 200
    time.sleep(0.5)
    assert not [e for e in json_entries(json_server)[before:] if e.get("path") == "/health"]
