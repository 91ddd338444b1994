"""PNG figures of a benchmark: latency CDFs and throughput over time for one run; throughput against
latency across a sweep. matplotlib (the `bench` extra) is imported here only, with the file-only Agg backend."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clients.bench.runner import RequestRecord


MISSING = ("error: kvserve bench draws its figures with matplotlib, which is not installed: pip install "
           "'kvserve[bench]' (in a checkout: .venv/bin/pip install -e '.[bench]')")


def require_matplotlib() -> None:
    """Exit with one line saying how to install the bench extra; checked before any load is sent, so a
    long benchmark does not fail only when it comes to drawing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(MISSING) from None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values_s: list[float], label: str) -> None:
    if not values_s:
        return
    ms = np.sort(np.asarray(values_s)) * 1000.0
    fractions = np.arange(0, len(ms) + 1) / len(ms)
    ax.step(np.concatenate([ms[:1], ms]), fractions, where="post", label=label)


def plot_run(records: list[RequestRecord], summary: dict, over_time: dict, title: str, path: Path) -> None:
    plt = _pyplot()
    done = [r for r in records if r.ok]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = (("Time to first token", [("TTFT", [r.ttft for r in done])]),
              ("Per-token latency", [("TPOT", [r.tpot for r in done if r.tpot is not None]),
                                     ("ITL", [g for r in done for g in r.itl])]),
              ("End-to-end latency", [("E2E", [r.latency for r in done])]))
    for ax, (name, series) in zip(axes.flat, panels):
        for label, values in series:
            _cdf(ax, values, label)
        ax.set(title=f"{name} (CDF)", xlabel="milliseconds", ylabel="fraction of requests" if
               name != "Per-token latency" else "fraction of intervals", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    ax = axes.flat[3]
    ax.step(over_time["bucket_start_s"], over_time["output_tokens_per_s"], where="post", color="tab:green",
            label="output tokens/s")
    ax.set(title="Throughput over time", xlabel="seconds since start", ylabel="output tokens/s")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.step(over_time["bucket_start_s"], over_time["requests_in_flight"], color="tab:gray", alpha=0.6,
              where="post", label="requests in flight (mean)")
    twin.set_ylabel("requests in flight")
    for axis, values in ((ax, over_time["output_tokens_per_s"]), (twin, over_time["requests_in_flight"])):
        axis.set_ylim(0, 1.3 * max(values, default=1) or 1)  # headroom for the legend
    handles, labels = ax.get_legend_handles_labels()
    twin_handles, twin_labels = twin.get_legend_handles_labels()
    ax.legend(handles + twin_handles, labels + twin_labels, loc="upper right", ncol=2, fontsize=8)
    ttft, tpot = summary["ttft_ms"]["median"] or 0.0, summary["tpot_ms"]["median"] or 0.0
    fig.suptitle(f"{title}\n{summary['completed']} requests, {summary['output_token_throughput']:.1f} output "
                 f"tok/s, {summary['request_throughput']:.2f} req/s, median TTFT {ttft:.0f} ms, median TPOT "
                 f"{tpot:.0f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(points: list[dict], title: str, path: Path) -> None:
    """points: {"concurrency" or "request_rate", "summary"} per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    key = "concurrency" if "concurrency" in points[0] else "request_rate"
    throughput = [p["summary"]["output_token_throughput"] for p in points]
    for ax, (metric, name) in zip(axes, (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_latency_ms", "E2E"))):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            latency = [p["summary"][metric][stat] or 0.0 for p in points]
            ax.plot(latency, throughput, style, label=f"{stat} {name}")
            if stat == "median":
                for x, y, p in zip(latency, throughput, points):
                    ax.annotate(f"{key[:4]}={p[key]}", (x, y), textcoords="offset points", xytext=(5, -12),
                                fontsize=8)
        ax.set(title=f"Throughput vs {name}", xlabel=f"{name} (ms)", ylabel="output tokens/s")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
