"""Two commits of kvserve side by side in one run: offline engine throughput and HTTP single-stream tok/s.

Each side is a checkout (a temporary git worktree for a revision, or this working tree itself), run by
the same interpreter with cwd and PYTHONPATH set to the checkout so it imports its own model/ and
service/. Every measurement is a fresh child process; rounds alternate which side goes first so that
drift on the machine (thermals, neighbours) hits both.

    .venv/bin/python bench/commit_ab.py --base HEAD~1 --rounds 3 --out bench/results/engine_structure_ab.md
    .venv/bin/python bench/commit_ab.py --base HEAD~1 --head HEAD --quick --out /tmp/ab.md   # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.server_process import ServerProcess  # noqa: E402
CHILD_TIMEOUT_S = 1800

# Runs inside a checkout: model/ and service/ are imported from the checkout first, then this tree's
# bench/engine_throughput.py (its run_engine and distinct_prompts), whose own imports then resolve to the
# already-imported checkout packages. So both sides run the one timed loop, and a change to the bench
# script itself cannot show up as a difference.
ENGINE_CHILD = r"""
import importlib.util, json, os, statistics, sys
import torch
import model, service, model.loading, service.engine.engine
spec = json.loads(sys.argv[1])
module_spec = importlib.util.spec_from_file_location("engine_throughput", spec["bench_script"])
bench = importlib.util.module_from_spec(module_spec)
module_spec.loader.exec_module(bench)

torch.set_num_threads(os.cpu_count())
from service.settings import Settings
defaults = Settings(device="cpu")  # each side's own CPU defaults, as its server resolves them
loaded = model.loading.load_model("smollm2", defaults.resolved_dtype(), "cpu", defaults.resolved_quantization())
prompts = bench.distinct_prompts(loaded.tokenizer, max(spec["counts"].values()), spec["prompt_len"])
for seqs in spec["counts"]:  # warm up every batch shape that is timed, not just one
    bench.run_engine(loaded, prompts[:min(int(seqs), 2)], 4, int(seqs))
result = {f"engine_seqs{seqs}": bench.run_engine(loaded, prompts[:count], spec["output_len"], int(seqs))["tok_per_s"]
          for seqs, count in spec["counts"].items()}
if spec["long_prompt_len"]:  # prefill speed: each long prompt alone, one output token, median of 3
    long_prompts = bench.distinct_prompts(loaded.tokenizer, 4, spec["long_prompt_len"], seed=1)
    bench.run_engine(loaded, long_prompts[:1], 1, 1)  # warm-up
    result["engine_prefill"] = statistics.median(len(p) / bench.run_engine(loaded, [p], 1, 1)["seconds"]
                                                 for p in long_prompts[1:])
result.update(service_file=service.__file__, model_file=model.__file__,
              engine_file=sys.modules[bench.Engine.__module__].__file__)
print("RESULT " + json.dumps(result), flush=True)
"""

IMPORT_CHECK = ("import json, clients, model, service; "
                "print(json.dumps([clients.__file__, model.__file__, service.__file__]))")


@dataclass
class Checkout:
    side: str  # "base" or "head"
    path: Path
    label: str  # short hash, plus a note for an uncommitted working tree
    worktree: bool


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def describe(rev: str) -> str:
    return git("log", "-1", "--format=%h %s", rev)[:100]


def make_checkout(side: str, rev: str | None, tmp: Path) -> Checkout:
    if rev is None:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        note = " + uncommitted changes" if dirty else ""
        return Checkout(side, REPO, f"working tree at {git('rev-parse', '--short', 'HEAD')}{note}", False)
    path = tmp / side
    git("worktree", "add", "--detach", str(path), rev)
    return Checkout(side, path, git("rev-parse", "--short", rev), True)


def child_env(checkout: Checkout) -> dict[str, str]:
    # The venv's editable install points at /work/main; PYTHONPATH (plus cwd as sys.path[0] for -c and
    # -m) puts the checkout ahead of it. verify_imports proves it rather than trusting it.
    return dict(os.environ, PYTHONPATH=str(checkout.path), PYTHONUNBUFFERED="1")


def inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def verify_imports(checkout: Checkout) -> None:
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=checkout.path, env=child_env(checkout),
                          capture_output=True, text=True, check=True)
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    if not all(inside(f, checkout.path) for f in files):
        raise SystemExit(f"{checkout.side}: imports {files}, not the checkout {checkout.path}; refusing to "
                         "measure the wrong code")


def measure_engine(checkout: Checkout, spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", ENGINE_CHILD, json.dumps(spec)], cwd=checkout.path,
                          env=child_env(checkout), capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{checkout.side} engine child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    for key in ("service_file", "model_file", "engine_file"):
        if not inside(result.pop(key), checkout.path):
            raise RuntimeError(f"{checkout.side} engine child imported code from outside {checkout.path}")
    return result


def prompt_texts(count: int, length: int) -> list[str]:
    # Plain words, about one token each; twice the needed length, cut to exactly `length` tokens by the
    # server's own tokenizer. "Request i" first, so no two prompts share a cached prefix block.
    words = ("harbor lantern velvet granite whisper meadow copper violet tunnel canyon"
             " pebble saddle orchard falcon marble ribbon glacier compass").split()
    rng = random.Random(1)
    return [" ".join([f"Request {i}:"] + [rng.choice(words) for _ in range(length * 2)]) for i in range(count)]


def stream_one(client: httpx.Client, url: str, ids: list[int], max_tokens: int) -> dict:
    body = {"model": "smollm2", "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    first = last = usage = None
    start = time.perf_counter()
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            usage = event.get("usage") or usage
            if event.get("choices"):
                last = time.perf_counter()
                first = first or last
    if usage is None or usage["completion_tokens"] != max_tokens:
        raise RuntimeError(f"expected {max_tokens} completion tokens, usage was {usage}")
    return {"tok_per_s": max_tokens / (last - start), "ttft_ms": (first - start) * 1000}


def measure_http(checkout: Checkout, spec: dict) -> dict:
    texts = prompt_texts(spec["http_requests"] + 1, spec["prompt_len"])
    server = ServerProcess("--host", "127.0.0.1", env=child_env(checkout), cwd=checkout.path,
                           startup_timeout=300.0)
    with server, httpx.Client(timeout=600) as client:
        prompts = []
        for text in texts:
            tokens = client.post(server.url + "/tokenize", json={"prompt": text}).raise_for_status().json()["tokens"]
            assert len(tokens) >= spec["prompt_len"], "prompt text shorter than the prompt length"
            prompts.append(tokens[:spec["prompt_len"]])
        stream_one(client, server.url, prompts[0], spec["output_len"])  # warm up
        runs = [stream_one(client, server.url, ids, spec["output_len"]) for ids in prompts[1:]]
    return {"http_tok_per_s": statistics.median(r["tok_per_s"] for r in runs),
            "http_ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
            "http_runs_tok_per_s": [round(r["tok_per_s"], 1) for r in runs]}


def run_rounds(checkouts: list[Checkout], spec: dict, rounds: int) -> list[dict]:
    raw = []
    for number in range(rounds):
        order = checkouts if number % 2 == 0 else checkouts[::-1]
        results = {c.side: {} for c in order}
        # Measurement-major: the same measurement runs back to back on both sides.
        for measure in (measure_engine, measure_http):
            for checkout in order:
                measured = measure(checkout, spec)
                results[checkout.side].update(measured)
                print(f"round {number + 1} {checkout.side} {measure.__name__}: {measured}", flush=True)
        raw.append({"round": number + 1, "order": [c.side for c in order], **results})
    return raw


def metric_names(spec: dict) -> list[tuple[str, str]]:
    engine = [(f"engine_seqs{s}", f"engine output tok/s, max_num_seqs {s} ({n} requests)")
              for s, n in spec["counts"].items()]
    prefill = [("engine_prefill", f"engine prefill tok/s, one {spec['long_prompt_len']}-token prompt")
               ] if spec["long_prompt_len"] else []
    return engine + prefill + [("http_tok_per_s", "HTTP single-stream tok/s"), ("http_ttft_ms", "HTTP TTFT ms")]


def summary_table(raw: list[dict], spec: dict) -> list[str]:
    lines = ["| metric | base (median) | head (median) | head/base | base min–max | head min–max |",
             "|---|---|---|---|---|---|"]
    for key, name in metric_names(spec):
        base, head = ([r[side][key] for r in raw] for side in ("base", "head"))
        b, h = statistics.median(base), statistics.median(head)
        lines.append(f"| {name} | {b:.1f} | {h:.1f} | {h / b:.3f} | {min(base):.1f}–{max(base):.1f} "
                     f"| {min(head):.1f}–{max(head):.1f} |")
    return lines


def raw_table(raw: list[dict], spec: dict) -> list[str]:
    keys = [key for key, _ in metric_names(spec)]
    lines = ["| round | side (order) | " + " | ".join(keys) + " | HTTP tok/s per request |",
             "|---" * (len(keys) + 3) + "|"]
    for r in raw:
        for position, side in enumerate(r["order"]):
            values = " | ".join(f"{r[side][k]:.1f}" for k in keys)
            lines.append(f"| {r['round']} | {side} ({position + 1}) | {values} | {r[side]['http_runs_tok_per_s']} |")
    return lines


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    omp = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "KMP_", "MKL_"))}
    return (f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start"
            + (f", env {omp}" if omp else ""))


def report(raw: list[dict], checkouts: list[Checkout], revs: dict, spec: dict, header: list[str]) -> str:
    sides = [f"- {c.side}: {c.label}" + (f" (`{revs[c.side]}`: {describe(revs[c.side])})" if c.worktree else "")
             for c in checkouts]
    lines = [f"# kvserve commit A/B: {checkouts[0].label} vs {checkouts[1].label} ({time.strftime('%Y-%m-%d')})",
             "", *sides, "", *header, "",
             f"{len(raw)} round(s), order alternating; engine: distinct {spec['prompt_len']}-token prompts x "
             f"{spec['output_len']} output tokens, greedy, EOS ignored, each side's own CPU defaults (its "
             "Settings: dtype, quantization); engine prefill: 3 distinct long prompts, each alone with 1 output "
             "token (after a warm-up), prompt tokens / seconds, median; HTTP: "
             f"1 warm-up + {spec['http_requests']} streamed /v1/completions, one at a time, tok/s = output "
             "tokens / (request sent -> last token), per-round value = median over requests.", "",
             *summary_table(raw, spec), "", "## Raw rounds", "", *raw_table(raw, spec)]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD~1", help="revision for the base side (default HEAD~1)")
    parser.add_argument("--head", default=None, help="revision for the head side (default: this working tree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests-at-1", type=int, default=4, help="engine requests at max_num_seqs 1")
    parser.add_argument("--requests", type=int, default=16, help="engine requests at max_num_seqs 16")
    parser.add_argument("--http-requests", type=int, default=5, help="measured HTTP requests per round")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--long-prompt-len", type=int, default=1500,
                        help="prompt length for the engine prefill measurement (0: skip it)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 requests, 16 tokens "
                                                                "(explicit flags still win)")
    parser.add_argument("--out", default=str(REPO / "bench/results/engine_structure_ab.md"))
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(rounds=1, requests_at_1=2, requests=2, http_requests=2, output_len=16)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    header = [f"Machine: {machine()}", "",
              f"Command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`"]
    spec = {"bench_script": str(REPO / "bench/engine_throughput.py"), "counts": {"1": args.requests_at_1, "16": args.requests}, "prompt_len": args.prompt_len,
            "output_len": args.output_len, "http_requests": args.http_requests,
            "long_prompt_len": args.long_prompt_len}
    revs = {"base": args.base, "head": args.head}
    tmp = Path(tempfile.mkdtemp(prefix="kvserve-ab-"))
    checkouts = []
    try:
        for side in ("base", "head"):
            checkouts.append(make_checkout(side, revs[side], tmp))
            verify_imports(checkouts[-1])
        raw = run_rounds(checkouts, spec, args.rounds)
        text = report(raw, checkouts, revs, spec, header)
    finally:
        for checkout in checkouts:
            if checkout.worktree:
                git("worktree", "remove", "--force", str(checkout.path))
        shutil.rmtree(tmp, ignore_errors=True)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
