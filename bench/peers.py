"""kvserve beside llama.cpp's C++ llama-server: same machine, same GGUF file, same load, one run.

Builds llama-server once (cached) from the llama.cpp source inside the llama-cpp-python sdist, starts it
with parallel slots and continuous batching, and starts kvserve beside it (an idle server costs no CPU);
then, --repeats times, for each concurrency, drives llama-server and then kvserve with `kvserve bench`
(streamed /v1/completions, random-word prompts of exactly --input-len tokens counted by the server's own
/tokenize, --output-len tokens with ignore_eos, greedy). Only one server is under load at a time, and the
two alternate, so a drift in the shared machine's speed hits both alike. Writes a side-by-side markdown
table of medians over the repeats with kvserve/llama-server ratios. Servers are stopped by PID.

    .venv/bin/python bench/peers.py                                  # ~15 minutes, plus ~7 to build
    .venv/bin/python bench/peers.py --kvserve-flag=--threads=1       # any extra kvserve serve flags
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.loading import smollm2_path  # noqa: E402
from tests.server_process import ServerProcess, free_port  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path(os.environ.get("KVSERVE_PEERS_CACHE", Path.home() / ".cache" / "kvserve-peers"))


def llama_server_binary() -> Path:
    """Download the sdist and build the llama-server target once; later runs reuse the binary."""
    source = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    binary = source / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(CACHE)], check=True)
    with tarfile.open(sdist) as archive:
        archive.extractall(CACHE, filter="data")
    print("building llama-server (about 7 minutes on 2 cores)...", file=sys.stderr, flush=True)
    subprocess.run(["cmake", "-S", str(source), "-B", str(source / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON", "-DLLAMA_USE_PREBUILT_UI=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_CURL=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(source / "build"), "--target", "llama-server",
                    f"-j{os.cpu_count()}"], check=True, stdout=subprocess.DEVNULL)
    return binary


def llama_server(binary: Path, gguf: Path, slots: int, threads: int) -> ServerProcess:
    # Each slot gets context / slots tokens: 512 holds a 128-token prompt and 128 more with room to spare.
    port = free_port()
    server = ServerProcess(command=[str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                                    "-np", str(slots), "-c", str(512 * slots), "-t", str(threads),
                                    "-tb", str(threads), "-cb", "--no-webui"])
    server.port, server.url = port, f"http://127.0.0.1:{port}"
    return server


def bench(url: str, concurrency: int, seed: int, args: argparse.Namespace, output: Path) -> dict:
    """One load level. Both servers get the same seed, hence the same prompts; every level and round
    gets its own, so neither server's prompt cache ever holds a prompt it is sent."""
    num_prompts = max(args.min_prompts, args.waves * concurrency)
    subprocess.run([sys.executable, "-m", "service", "bench", "--url", url, "--concurrency", str(concurrency),
                    "--num-prompts", str(num_prompts), "--input-len", str(args.input_len), "--output-len",
                    str(args.output_len), "--ignore-eos", "--warmup", "2", "--seed", str(seed), "--no-progress",
                    "--output", str(output)], cwd=ROOT, check=True, stdout=sys.stderr)
    output.with_suffix(".png").unlink(missing_ok=True)  # the JSON holds everything the table needs
    return json.loads(output.read_text())


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def median_summary(runs: list[dict]) -> dict:
    """Per metric, the median over the repeats (each repeat is one `kvserve bench` summary)."""
    summaries = [r["summary"] for r in runs]
    throughputs = [s["output_token_throughput"] for s in summaries]
    out = {"output_token_throughput": statistics.median(throughputs), "throughputs": throughputs,
           "failed": sum(s["failed"] for s in summaries)}
    for key in ("ttft_ms", "itl_ms"):
        out[key] = {p: statistics.median(s[key][p] for s in summaries) for p in ("median", "p90")}
    return out


def table(kv: dict[int, dict], peer: dict[int, dict]) -> list[str]:
    lines = ["| clients | output tok/s kvserve | llama-server | ratio | TTFT p50 / p90 ms kvserve | llama-server "
             "| ITL p50 / p90 ms kvserve | llama-server | kvserve runs | llama-server runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in kv:
        a, b = kv[c], peer[c]

        def pct(s, key):
            return f"{s[key]['median']:.0f} / {s[key]['p90']:.0f}"

        def runs(s):
            failed = f" ({s['failed']} failed)" if s["failed"] else ""
            return ", ".join(f"{t:.0f}" for t in s["throughputs"]) + failed
        lines.append(f"| {c} | {a['output_token_throughput']:.1f} | {b['output_token_throughput']:.1f} | "
                     f"{a['output_token_throughput'] / b['output_token_throughput']:.2f}x | {pct(a, 'ttft_ms')} | "
                     f"{pct(b, 'ttft_ms')} | {pct(a, 'itl_ms')} | {pct(b, 'itl_ms')} | {runs(a)} | {runs(b)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--waves", type=int, default=2, help="requests per level = waves x concurrency ...")
    parser.add_argument("--min-prompts", type=int, default=8, help="... but at least this many")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all levels; medians reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server -t and -tb")
    parser.add_argument("--kvserve-flag", action="append", default=[], help="extra `kvserve serve` flag")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peers.md")
    args = parser.parse_args()
    binary, gguf = llama_server_binary(), smollm2_path()
    scratch = args.out.with_suffix("")
    scratch.mkdir(parents=True, exist_ok=True)
    slots = max(args.concurrency)
    kv_flags = ["--max-num-seqs", str(max(slots, 64)), *args.kvserve_flag]
    started = time.strftime("%Y-%m-%d %H:%M")
    load_before = os.getloadavg()
    servers = {"llama-server": llama_server(binary, gguf, slots, args.threads), "kvserve": ServerProcess(*kv_flags)}
    results: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in args.concurrency} for name in servers}
    with servers["llama-server"], servers["kvserve"]:
        for repeat in range(args.repeats):
            for concurrency in args.concurrency:
                for name, server in servers.items():
                    print(f"round {repeat + 1}: {name} at concurrency {concurrency}", file=sys.stderr, flush=True)
                    seed = 1000 * (repeat + 1) + concurrency
                    results[name][concurrency].append(bench(server.url, concurrency, seed, args,
                                                            scratch / f"{name}_c{concurrency}_r{repeat + 1}.json"))
        rss = {name: peak_rss_mb(server.proc.pid) for name, server in servers.items()}
    kv = {c: median_summary(runs) for c, runs in results["kvserve"].items()}
    peer = {c: median_summary(runs) for c, runs in results["llama-server"].items()}
    report = [f"# kvserve vs llama.cpp llama-server ({started})", "",
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
              f"before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}. Model file: {gguf.name}.",
              f"Load: `kvserve bench`, streamed /v1/completions, {args.input_len}-token prompts (server-counted), "
              f"{args.output_len} output tokens (ignore_eos), greedy, max({args.min_prompts}, {args.waves} x "
              f"clients) requests per level; {args.repeats} rounds, servers alternating, medians shown.",
              f"llama-server (llama-cpp-python {LLAMA_CPP_PYTHON} sdist): -np {slots} -c {512 * slots} "
              f"-t {args.threads} -tb {args.threads} -cb. kvserve: `kvserve serve {' '.join(kv_flags)}` "
              "(defaults otherwise).",
              f"Peak RSS over the run (VmHWM): kvserve {rss['kvserve']:.0f} MB, llama-server "
              f"{rss['llama-server']:.0f} MB (their KV caches: kvserve's default, 1 GiB; llama-server's "
              f"{512 * slots} tokens in float16).", "", *table(kv, peer), "",
              f"Raw JSON per level: {scratch.name}/ beside this file."]
    args.out.write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
