"""The `kvserve` command's client side (generate, chat, bench) as a user runs it, against the session
`server`; and `generate --local`, the model in the command's own process."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from tests.server_process import REPO, free_port

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


def kvserve(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=REPO, input=stdin, capture_output=True,
                          text=True, timeout=300, env=env)


def clean_env(**variables: str) -> dict[str, str]:
    """This process's environment without any KVSERVE_ variable, plus `variables`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KVSERVE_")} | variables


def nothing_listens() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_generate_from_server_streamed_and_not(server):
    args = ("generate", "The capital of France is", "--url", server.url, "--max-tokens", "4")
    plain, streamed = kvserve(*args), kvserve(*args, "--stream")
    assert plain.returncode == streamed.returncode == 0, plain.stderr + streamed.stderr
    assert plain.stdout == streamed.stdout and plain.stdout.strip()  # greedy: the same text either way
    assert "4 tokens" in plain.stderr and "finish_reason=length" in streamed.stderr


def test_generate_asks_the_server_at_kvserve_url(server):
    result = kvserve("generate", PROMPT, "--max-tokens", "4", env=clean_env(KVSERVE_URL=server.url))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "4 tokens" in result.stderr


def test_generate_url_flag_wins_over_kvserve_url(server):
    result = kvserve("generate", PROMPT, "--max-tokens", "4", "--url", server.url,
                     env=clean_env(KVSERVE_URL=nothing_listens()))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "4 tokens" in result.stderr


def check_no_server(result: subprocess.CompletedProcess, url: str) -> None:
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: no kvserve server answers at {url} ")
    assert "`kvserve serve`" in result.stderr and "--local" in result.stderr


def test_generate_without_a_server_says_so_in_one_line():
    url = nothing_listens()
    check_no_server(kvserve("generate", "Hi", env=clean_env(KVSERVE_URL=url)), url)


def test_generate_asks_127_0_0_1_port_8000_by_default():
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("something listens on 127.0.0.1:8000, the default server URL")
    check_no_server(kvserve("generate", "Hi", env=clean_env()), "http://127.0.0.1:8000")


def test_generate_refuses_loading_flags_without_local():
    result = kvserve("generate", "Hi", "--dtype", "float32", "--quantization", "none", env=clean_env())
    assert result.returncode == 2
    assert "--dtype, --quantization: only with --local" in result.stderr
    both = kvserve("generate", "Hi", "--local", "--url", nothing_listens(), env=clean_env())
    assert both.returncode == 2 and "give one of them" in both.stderr


def test_generate_local_loads_the_model_as_the_server_does(server):
    # The server's defaults: on a CPU the int4 projections with float32 activations, on a GPU bfloat16 unquantized.
    loaded = "dtype bfloat16, quantization none, device cuda" if torch.cuda.is_available() else \
        "dtype float32, quantization int4, device cpu"
    local = kvserve("generate", PROMPT, "--local", "--max-tokens", "4", "--stream", env=clean_env())
    assert local.returncode == 0, local.stderr
    assert f"loading model smollm2 ({loaded}" in local.stderr and "4 tokens" in local.stderr
    assert local.stdout.strip() and "INFO" not in local.stdout  # the load's log lines go to stderr
    # The session server runs the exact float32 model: --local with the same flags answers the same text.
    exact = kvserve("generate", PROMPT, "--local", "--quantization", "none", "--dtype", "float32",
                    "--max-tokens", "8", env=clean_env())
    remote = kvserve("generate", PROMPT, "--url", server.url, "--max-tokens", "8")
    assert exact.returncode == remote.returncode == 0, exact.stderr + remote.stderr
    assert "dtype float32, quantization none" in exact.stderr
    assert exact.stdout == remote.stdout and exact.stdout.strip()


def test_generate_local_reports_a_bad_setting_in_one_line():
    result = kvserve("generate", "Hi", "--local", "--dtype", "float8", env=clean_env())
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "--dtype (or KVSERVE_DTYPE)" in result.stderr and "'float8'" in result.stderr


def test_generate_reports_a_bad_request_and_exits_nonzero(server):
    result = kvserve("generate", "Hi", "--url", server.url, "--temperature", "5")
    assert result.returncode == 1
    assert result.stderr.startswith("error: 400:") and "(param: temperature)" in result.stderr


def test_chat_keeps_the_history_until_reset(server):
    turns = "My name is Ann.\nWhat is my name?\n/reset\nMy name is Ann.\n/exit\nnot read\n"
    result = kvserve("chat", "--url", server.url, "--max-tokens", "4", "--temperature", "0", stdin=turns)
    assert result.returncode == 0, result.stderr
    reports = [(int(m[1]), int(m[2])) for m in re.finditer(r"\[(\d+) tokens, prompt (\d+) tokens", result.stderr)]
    assert len(reports) == 3  # one reply per message; /exit stops reading
    (reply1, prompt1), (_, prompt2), (_, prompt3) = reports
    assert prompt2 > prompt1 + reply1  # the second turn carries the first message and reply
    assert prompt3 == prompt1  # /reset forgot them


def test_bench_writes_json_and_png(server, tmp_path):
    output = tmp_path / "run.json"
    result = kvserve("bench", "--url", server.url, "--num-prompts", "4", "--concurrency", "4", "--input-len",
                     "24-32", "--output-len", "5", "--ignore-eos", "--goodput", "e2e:600000", "--no-progress",
                     "--warmup", "0", "--output", str(output))
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    summary = report["summary"]
    assert (summary["completed"], summary["failed"], summary["total_output_tokens"]) == (4, 0, 20)
    assert report["token_counting"] == "tokenize"
    assert all(24 <= r["prompt_tokens"] <= 33 for r in report["requests"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        assert set(summary[key]) >= {"mean", "median", "p90", "p99"} and summary[key]["median"] > 0
    assert summary["goodput"]["good_requests"] == 4
    assert len(report["environment_before"]["loadavg_1_5_15"]) == 3
    assert sum(report["throughput_over_time"]["output_tokens_per_s"]) > 0
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "output throughput (tok/s)" in result.stdout


def test_bench_sweep_and_poisson_arrivals(server, tmp_path):
    output = tmp_path / "sweep.json"
    result = kvserve("bench", "--url", server.url, "--num-prompts", "2", "--sweep", "1,2", "--input-len", "16",
                     "--output-len", "3", "--ignore-eos", "--no-progress", "--warmup", "0",
                     "--output", str(output))
    assert result.returncode == 0, result.stderr
    runs = json.loads(output.read_text())["runs"]
    assert [r["load"]["concurrency"] for r in runs] == [1, 2]
    assert all(r["summary"]["completed"] == 2 for r in runs)
    for name in ("sweep.png", "sweep_c1.png", "sweep_c2.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    poisson = tmp_path / "poisson.json"
    result = kvserve("bench", "--url", server.url, "--num-prompts", "3", "--request-rate", "5", "--input-len",
                     "16", "--output-len", "3", "--shared-prefix", "8", "--no-progress", "--warmup", "0",
                     "--output", str(poisson))
    assert result.returncode == 0, result.stderr
    report = json.loads(poisson.read_text())
    assert report["load"]["request_rate"] == 5 and report["load"]["concurrency"] is None
    assert report["summary"]["completed"] == 3
