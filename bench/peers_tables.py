"""bench/peers.py's markdown tables: throughput per load level and prefill time, kvserve against each peer."""
from __future__ import annotations

import statistics


def median_summary(runs: list[dict]) -> dict:
    """Per metric, the median over the repeats (each repeat is one `kvserve bench` summary)."""
    summaries = [r["summary"] for r in runs]
    throughputs = [s["output_token_throughput"] for s in summaries]
    out = {"output_token_throughput": statistics.median(throughputs), "throughputs": throughputs,
           "failed": sum(s["failed"] for s in summaries)}
    for key in ("ttft_ms", "itl_ms"):
        out[key] = {p: statistics.median(s[key][p] for s in summaries) for p in ("median", "p90")}
    return out


def _pct(summary: dict, key: str) -> str:
    return f"{summary[key]['median']:.0f} / {summary[key]['p90']:.0f}"


def _runs(summary: dict) -> str:
    failed = f" ({summary['failed']} failed)" if summary["failed"] else ""
    return ", ".join(f"{t:.0f}" for t in summary["throughputs"]) + failed


def _best_peer(tok_s: dict[str, float]) -> str:
    """kvserve's throughput over the fastest peer's, naming that peer."""
    peers = {name: value for name, value in tok_s.items() if name != "kvserve"}
    best = max(peers, key=peers.get)
    return f"{tok_s['kvserve'] / peers[best]:.2f}x ({best})"


def throughput_table(results: dict[str, dict[int, list[dict]]]) -> list[str]:
    """results: server -> concurrency -> one bench JSON per round; kvserve first."""
    names = list(results)
    others = " | ".join(names[1:])
    lines = [f"| clients | output tok/s {names[0]} | {others} | {names[0]} / best peer | TTFT p50 / p90 ms "
             f"{names[0]} | {others} | ITL p50 / p90 ms {names[0]} | {others} | "
             + " | ".join(f"{name} runs" for name in names) + " |",
             "|---" * (2 + 4 * len(names)) + "|"]
    for concurrency in results[names[0]]:
        row = {name: median_summary(results[name][concurrency]) for name in names}
        tok_s = {name: row[name]["output_token_throughput"] for name in names}
        cells = [str(concurrency), *(f"{tok_s[name]:.1f}" for name in names), _best_peer(tok_s),
                 *(_pct(row[name], "ttft_ms") for name in names), *(_pct(row[name], "itl_ms") for name in names),
                 *(_runs(row[name]) for name in names)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def prefill_table(results: dict[str, dict]) -> list[str]:
    """results: server -> its prefill bench JSON (one request per prompt, 1 output token); kvserve first."""
    lines = ["| server | TTFT median ms | each prompt ms | prompt tokens | prefill tok/s | kvserve's speed-up |",
             "|---|---|---|---|---|---|"]
    ttft = {name: result["summary"]["ttft_ms"]["median"] for name, result in results.items()}
    for name, result in results.items():
        requests = [r for r in result["requests"] if r["error"] is None]
        tokens = statistics.median(r["prompt_tokens"] for r in requests)
        each = ", ".join(f"{r['ttft_ms']:.0f}" for r in requests)
        speedup = "—" if name == "kvserve" else f"{ttft[name] / ttft['kvserve']:.2f}x"
        lines.append(f"| {name} | {ttft[name]:.0f} | {each} | {tokens:.0f} | {tokens / ttft[name] * 1000:.0f} | "
                     f"{speedup} |")
    return lines
