"""Metrics overhead: offline engine throughput with kvserve's Prometheus listeners attached, and without.

32 requests x 64 output tokens of SmolLM2 (distinct 32-token prompts, greedy, EOS ignored) through a
fresh Engine per run, so every run does identical work. Runs interleave as on, off, off, on, on, off
... (so neither side always goes first) after one discarded warm-up, each after a full garbage
collection (an attached Metrics and its engine form a cycle that would otherwise be collected
during the next run). "on" attaches service.metrics.Metrics() exactly as the server does and
renders /metrics once at the end of the run, as a scrape would. The A/B difference is small next to
the noise of a shared CPU, so one more instrumented "on" run times the metrics code itself (the
per-step summary and listeners, the per-request listeners, one scrape): a noise-free upper bound.
The CPU is shared: the script waits for a quiet machine (1-min load average below --quiet-load) for
up to --max-wait seconds and records the load of every run. Besides wall-clock throughput it reports
tokens per CPU-second of this process, which other processes' load disturbs far less, and it runs
torch on one thread by default (--threads), since two threads spinning on a busy 2-core machine
make wall times swing by 3x.

    .venv/bin/python bench/metrics_overhead.py --runs 5 --out bench/results/metrics_overhead.md
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from prometheus_client import generate_latest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.loading import load_model  # noqa: E402
from service.engine.config import EngineConfig  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.request import SamplingParams  # noqa: E402
from service.metrics import Metrics  # noqa: E402

WORDS = ("river mountain quietly engine paper seventeen orange history bright window theory music "
         "garden silver market winter number careful ocean library planet yellow story morning").split()


def distinct_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    return [tokenizer.encode(" ".join([f"Note {i}:"] + rng.choices(WORDS, k=length * 2)))[:length]
            for i in range(count)]


class Timer:
    """Wraps callables and adds up the seconds spent inside them."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def run(loaded, prompts: list[list[int]], output_len: int, metrics_on: bool, timer: Timer | None = None) -> dict:
    engine = Engine(loaded, EngineConfig(max_num_seqs=len(prompts), max_num_batched_tokens=2048,
                                         kv_cache_memory=256 << 20, max_queue=1 << 20))
    metrics = Metrics() if metrics_on else None
    if metrics is not None:
        metrics.attach(engine, "smollm2", "bench")
        if timer is not None:  # _report builds the StepStats only when someone listens
            engine.core._report = timer.wrap(engine.core._report)
            engine.events.on_finish[:] = [timer.wrap(fn) for fn in engine.events.on_finish]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    tokens = []
    gc.collect()
    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, ids in enumerate(prompts):
        engine.add_request(ids, params, f"b{i}", lambda out: tokens.append(out.num_output_tokens)
                           if out.finished else None)
    while engine.has_unfinished():
        engine.step()
    if metrics is not None:
        scrape = generate_latest if timer is None else timer.wrap(generate_latest)
        scrape(metrics.registry)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    assert sum(tokens) == len(prompts) * output_len
    return {"metrics": "on" if metrics_on else "off", "seconds": seconds, "tok_per_s": sum(tokens) / seconds,
            "tok_per_cpu_s": sum(tokens) / cpu_seconds, "load": f"{load_before:.2f} -> {os.getloadavg()[0]:.2f}"}


def machine() -> dict[str, str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
               platform.processor())
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}


def wait_for_quiet(threshold: float, max_wait: float) -> None:
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(5)


def medians(rows: list[dict], key: str) -> str:
    on = statistics.median(r[key] for r in rows if r["metrics"] == "on")
    off = statistics.median(r[key] for r in rows if r["metrics"] == "off")
    return f"on {on:.1f}, off {off:.1f}: cost {100 * (off - on) / off:+.2f}%"


def paired_cost(rows: list[dict]) -> str:
    """Median cost over neighbouring (on, off) pairs: the load drifts less within a pair than across a run."""
    costs = []
    for a, b in zip(rows[::2], rows[1::2]):
        on, off = (a, b) if a["metrics"] == "on" else (b, a)
        costs.append(100 * (off["tok_per_cpu_s"] - on["tok_per_cpu_s"]) / off["tok_per_cpu_s"])
    return f"{statistics.median(costs):+.2f}% (pairs: {', '.join(f'{c:+.1f}' for c in costs)})"


def report(rows: list[dict], instrumented: dict, info: dict[str, str], args) -> str:
    lines = ["# Metrics overhead (offline engine, SmolLM2)", "",
             f"`.venv/bin/python bench/metrics_overhead.py --runs {args.runs} --threads {args.threads}` — {args.requests} requests x "
             f"{args.output_len} output tokens ({args.prompt_len}-token distinct prompts, greedy, EOS ignored, "
             f"{args.dtype}, max_num_seqs {args.requests}), a fresh engine per run, runs interleaved (on, off, off, "
             "on, ...) after a discarded warm-up. \"on\" = `Metrics().attach(engine, ...)` plus one /metrics render at the end.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".", "",
             "| run | metrics | seconds | output tok/s | output tok per CPU-s | 1-min load (before -> after) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {i} | {r['metrics']} | {r['seconds']:.2f} | {r['tok_per_s']:.1f} | {r['tok_per_cpu_s']:.1f} | "
              f"{r['load']} |" for i, r in enumerate(rows, 1)]
    share = 100 * instrumented["metrics_seconds"] / instrumented["seconds"]
    lines += ["", f"**Median output tok/s: {medians(rows, 'tok_per_s')}. Median tok per CPU-second: "
              f"{medians(rows, 'tok_per_cpu_s')}. Median cost of neighbouring pairs (per CPU-second): "
              f"{paired_cost(rows)}** (positive = slower with metrics; a difference within the run-to-run spread "
              "is noise).", "",
              f"Instrumented \"on\" run: {instrumented['metrics_seconds'] * 1000:.1f} ms of {instrumented['seconds']:.2f} s "
              f"in metrics code (step summaries + listeners, finish listeners, one scrape render) = **{share:.3f}%** "
              "of the run, the cost without the noise.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind, interleaved")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quiet-load", type=float, default=1.0)
    parser.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for a quiet CPU")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2", args.dtype, "cpu")
    prompts = distinct_prompts(loaded.tokenizer, args.requests, args.prompt_len)
    wait_for_quiet(args.quiet_load, args.max_wait)
    info = machine()
    info["load at start"] = "/".join(f"{x:.2f}" for x in os.getloadavg())
    run(loaded, prompts, args.output_len, metrics_on=True)  # warm-up: allocator, kernels, caches
    rows = []
    for i in range(2 * args.runs):
        rows.append(run(loaded, prompts, args.output_len, metrics_on=(i + 1) // 2 % 2 == 0))
        print(rows[-1], flush=True)
    timer = Timer()
    instrumented = run(loaded, prompts, args.output_len, metrics_on=True, timer=timer)
    instrumented["metrics_seconds"] = timer.seconds
    info["load at end"] = "/".join(f"{x:.2f}" for x in os.getloadavg())
    text = report(rows, instrumented, info, args)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
