"""The `kvserve` command's client side (generate --url, chat, bench) as a user runs it, against the
session `server`."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.server_process import REPO

pytestmark = pytest.mark.slow


def kvserve(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=REPO, input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_generate_from_server_streamed_and_not(server):
    args = ("generate", "The capital of France is", "--url", server.url, "--max-tokens", "4")
    plain, streamed = kvserve(*args), kvserve(*args, "--stream")
    assert plain.returncode == streamed.returncode == 0, plain.stderr + streamed.stderr
    assert plain.stdout == streamed.stdout and plain.stdout.strip()  # greedy: the same text either way
    assert "4 tokens" in plain.stderr and "finish_reason=length" in streamed.stderr


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
