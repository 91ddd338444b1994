"""`kvserve bench`: load any OpenAI-compatible server through streamed /v1/completions, then write
the summary (JSON) and figures (PNG), at one load level or across a sweep of concurrencies."""
from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from clients.bench.prompts import PromptBuilder
from clients.bench.runner import LoadSpec, run_load, send
from clients.bench.stats import per_request, summarize, throughput_over_time
from clients.client import AsyncClient
from clients.errors import KvserveError


@dataclass
class BenchConfig:
    url: str | None = None
    api_key: str | None = None
    model: str | None = None
    num_prompts: int = 32
    input_len: tuple[int, int] = (128, 128)
    output_len: tuple[int, int] = (64, 128)
    shared_prefix: int = 0
    load: LoadSpec = field(default_factory=LoadSpec)
    sweep: list[int] = field(default_factory=list)
    goodput: dict[str, float] = field(default_factory=dict)
    warmup: int = 1
    timeout: float = 600.0
    output: Path = Path("bench/results/bench.json")
    progress: bool = True


def _environment() -> dict:
    return {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


async def _server_info(client: AsyncClient, model: str) -> dict:
    info = {"url": client.options.base_url, "model": model}
    try:
        info["info"] = await client.request("GET", "/info")  # text-generation-inference's route (kvserve has it)
    except KvserveError:
        pass
    return info


async def _run_level(client: AsyncClient, cfg: BenchConfig, builder: PromptBuilder, load: LoadSpec) -> tuple:
    # Fresh prompts at every level, so a level cannot reuse the cached prefixes of the one before.
    prompts = await builder.build(cfg.num_prompts, cfg.input_len, cfg.output_len, cfg.shared_prefix)
    label = f"rate {load.request_rate}/s" if load.request_rate else f"concurrency {load.concurrency}"
    before = _environment()
    with tqdm(total=len(prompts), desc=label, unit="req", disable=not cfg.progress, file=sys.stderr) as bar:
        records, duration = await run_load(client, prompts, load, on_done=lambda r: bar.update())
    summary = summarize(records, duration, cfg.goodput)
    over_time = throughput_over_time(records, duration)
    return records, {"load": asdict(load), "environment_before": before, "environment_after": _environment(),
                     "summary": summary, "throughput_over_time": over_time, "requests": per_request(records)}


async def benchmark(cfg: BenchConfig) -> dict:
    """Run the benchmark and write its JSON and PNG files; returns what the JSON holds."""
    from clients.bench.plots import plot_run, plot_sweep, require_matplotlib

    require_matplotlib()
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    async with AsyncClient(cfg.url, cfg.api_key, model=cfg.model, timeout=cfg.timeout, max_retries=0) as client:
        model = cfg.model or (await client.models()).data[0].id
        client.options.model = model
        builder = PromptBuilder(client, cfg.load.seed)
        warm = await builder.build(cfg.warmup, (16, 16), (8, 8)) if cfg.warmup else []
        for prompt in warm:
            await send(client, prompt, cfg.load, time.perf_counter())
        result = {"kind": "kvserve-bench", "server": await _server_info(client, model),
                  "config": {k: v for k, v in asdict(cfg).items() if k not in ("api_key", "output", "progress")},
                  "token_counting": None}
        levels = [LoadSpec(**dict(asdict(cfg.load), concurrency=c)) for c in cfg.sweep] or [cfg.load]
        runs = []
        for load in levels:
            records, run = await _run_level(client, cfg, builder, load)
            runs.append(run)
            print_summary(run)
            plot_run(records, run["summary"], run["throughput_over_time"], _title(model, cfg, load),
                     _png(cfg.output, load if cfg.sweep else None))
        result["token_counting"] = builder.method
    if cfg.sweep:
        result["runs"] = runs
        plot_sweep([{"concurrency": r["load"]["concurrency"], "summary": r["summary"]} for r in runs],
                   f"{model} at {result['server']['url']}: sweep over concurrency", _png(cfg.output, None))
    else:
        result.update(runs[0])
    cfg.output.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {cfg.output} and {_png(cfg.output, None)}", file=sys.stderr)
    return result


def _png(output: Path, load: LoadSpec | None) -> Path:
    suffix = f"_c{load.concurrency}" if load is not None else ""
    return output.with_name(output.stem + suffix + ".png")


def _title(model: str, cfg: BenchConfig, load: LoadSpec) -> str:
    mode = f"Poisson {load.request_rate} req/s" if load.request_rate else f"concurrency {load.concurrency}"
    return (f"{model}: {mode}, input {cfg.input_len[0]}-{cfg.input_len[1]} tokens, output "
            f"{cfg.output_len[0]}-{cfg.output_len[1]}{' (ignore_eos)' if load.ignore_eos else ''}")


def print_summary(run: dict) -> None:
    s = run["summary"]
    lines = [f"{'completed / failed':<28}{s['completed']} / {s['failed']}",
             f"{'duration (s)':<28}{s['duration_s']:.2f}",
             f"{'request throughput (req/s)':<28}{s['request_throughput']:.3f}",
             f"{'output throughput (tok/s)':<28}{s['output_token_throughput']:.2f}",
             f"{'total throughput (tok/s)':<28}{s['total_token_throughput']:.2f}"]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_latency_ms", "E2E")):
        d = s[key]
        if d["mean"] is not None:
            lines.append(f"{name + ' (ms)':<28}mean {d['mean']:.1f}  median {d['median']:.1f}  "
                         f"p90 {d['p90']:.1f}  p99 {d['p99']:.1f}")
    if "goodput" in s:
        lines.append(f"{'goodput (req/s)':<28}{s['goodput']['request_goodput']:.3f} "
                     f"({s['goodput']['good_requests']} met {s['goodput']['targets_ms']})")
    for error in s["errors"]:
        lines.append(f"error: {error}")
    print("\n".join(lines), flush=True)


def run_benchmark(cfg: BenchConfig) -> dict:
    return asyncio.run(benchmark(cfg))
