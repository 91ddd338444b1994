"""Benchmark records -> the summary: throughputs, latency statistics, goodput, throughput over time.

TTFT: send -> first text. TPOT: (latency - TTFT) / (output tokens - 1), per request. ITL: the gaps
between successive text chunks, over all requests. E2E: send -> last byte. Goodput: completed
requests per second that met every latency target given (milliseconds: ttft, tpot, e2e).
"""
from __future__ import annotations

import math

import numpy as np

from clients.bench.runner import RequestRecord

SLO_METRICS = ("ttft", "tpot", "e2e")


def distribution(values_s: list[float]) -> dict:
    """mean, median, p90, p99, min, max and std, in milliseconds."""
    if not values_s:
        return {key: None for key in ("mean", "median", "p90", "p99", "min", "max", "std")}
    ms = np.asarray(values_s) * 1000.0
    return {"mean": float(ms.mean()), "median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "min": float(ms.min()), "max": float(ms.max()),
            "std": float(ms.std())}


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:2000', 'tpot:150'] -> {'ttft': 2000.0, 'tpot': 150.0} (milliseconds)."""
    targets = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in SLO_METRICS or not value:
            raise ValueError(f"goodput target {item!r}: use NAME:MILLISECONDS with NAME one of {SLO_METRICS}")
        targets[name] = float(value)
    return targets


def _meets(record: RequestRecord, targets: dict[str, float]) -> bool:
    values = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2e": record.latency}
    return all(values[name] * 1000.0 <= limit for name, limit in targets.items())


def throughput_over_time(records: list[RequestRecord], duration: float, bucket: float | None = None) -> dict:
    """Output tokens per second and mean requests in flight, per bucket of seconds (default: about 50
    buckets over the run, at least one second each)."""
    bucket = bucket or max(1.0, round(duration / 50))
    num = max(1, math.ceil(duration / bucket))
    edges = np.arange(num + 1) * bucket
    tokens = np.zeros(num)
    busy = np.zeros(num)  # request-seconds inside each bucket
    for r in records:
        share = r.output_tokens / len(r.token_times) if r.token_times else 0.0  # chunks may hold several tokens
        for t in r.token_times:
            tokens[min(num - 1, int(t / bucket))] += share
        end = r.start + (r.latency or 0.0)
        busy += np.clip(np.minimum(edges[1:], end) - np.maximum(edges[:-1], r.start), 0.0, None)
    return {"bucket_s": bucket, "bucket_start_s": [round(x, 3) for x in edges[:-1]],
            "output_tokens_per_s": [round(x / bucket, 2) for x in tokens],
            "requests_in_flight": [round(x / bucket, 2) for x in busy]}


def summarize(records: list[RequestRecord], duration: float, targets: dict[str, float] | None = None) -> dict:
    done = [r for r in records if r.ok]
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    summary = {
        "completed": len(done), "failed": len(records) - len(done), "duration_s": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration, "input_token_throughput": input_tokens / duration,
        "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": distribution([r.ttft for r in done]),
        "tpot_ms": distribution([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": distribution([gap for r in done for gap in r.itl]),
        "e2e_latency_ms": distribution([r.latency for r in done]),
        "errors": sorted({r.error for r in records if r.error})[:10],
    }
    if targets:
        good = sum(_meets(r, targets) for r in done)
        summary["goodput"] = {"targets_ms": targets, "good_requests": good, "request_goodput": good / duration,
                              "fraction_good": good / len(records) if records else 0.0}
    return summary


def per_request(records: list[RequestRecord]) -> list[dict]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000.0, 2)

    return [{"start_ms": ms(r.start), "prompt_tokens": r.prompt_tokens, "max_tokens": r.max_tokens,
             "output_tokens": r.output_tokens, "ttft_ms": ms(r.ttft), "tpot_ms": ms(r.tpot),
             "e2e_latency_ms": ms(r.latency), "error": r.error} for r in records]
