"""Peak memory at one KV capacity: kvserve, per KV cache dtype, beside llama.cpp's llama-server, one run.

Each server is started alone and sized for --tokens tokens of KV cache (llama-server: `-np 16 -c TOKENS`,
float16 KV; kvserve: --kv-cache-memory worked out from the model's shape, so the same number of tokens),
then driven by one 16-client level of `kvserve bench` (as bench/peers.py drives it). Reports the server's
peak RSS (VmHWM) after start-up and after the load, and kvserve's ratio to llama-server. Servers are
stopped by PID.

    .venv/bin/python bench/memory.py                      # ~5 minutes, plus llama-server's first build
    .venv/bin/python bench/memory.py --peers ""           # kvserve only
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import llama_peer  # noqa: E402
from bench.machine import machine  # noqa: E402
from bench.peers import CACHE, bench  # noqa: E402
from bench.process_tree import peak_rss_mb  # noqa: E402
from model.loading import smollm2_path  # noqa: E402
from model.loading.gguf_file import gguf_config, open_gguf  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

KV_DTYPES = {"float16": 2, "float32": 4, "bfloat16": 2}  # bytes a value; float16 is the CPU default


def kv_cache_mib(tokens: int, dtype: str) -> int:
    """--kv-cache-memory for `tokens` tokens of the default model's keys and values in dtype."""
    config = gguf_config(open_gguf(smollm2_path()), smollm2_path())
    per_token = config.num_layers * 2 * config.num_kv_heads * config.head_dim * KV_DTYPES[dtype]
    return -(-tokens * per_token // 2**20)


def servers(args: argparse.Namespace) -> dict[str, tuple[ServerProcess, str]]:
    """Each server to measure, not started, and a note of its flags."""
    made = {}
    for dtype in args.kv_dtypes:
        flags = ["--kv-cache-memory", f"{kv_cache_mib(args.tokens, dtype)}MiB", "--kv-cache-dtype", dtype]
        made[f"kvserve ({dtype} KV)"] = (ServerProcess(*flags, startup_timeout=600.0),
                                         f"`kvserve serve {' '.join(flags)}` (defaults otherwise)")
    if "llama-server" in args.peers:
        process, note = llama_peer.server(CACHE, smollm2_path(), args.clients, args.tokens // args.clients,
                                          args.threads)
        made["llama-server"] = (process, note)
    return made


def measure(process: ServerProcess, name: str, args: argparse.Namespace, scratch: Path) -> dict:
    """The server's peak RSS after start-up and after one level of --clients clients, and that level's tok/s."""
    with process:
        started = peak_rss_mb(process.proc.pid)
        result = bench(process.url, args.clients, 2 * args.clients, (128, 128), 1,
                       scratch / f"{name.split()[0]}_{len(os.listdir(scratch))}.json")
        return {"started": started, "loaded": peak_rss_mb(process.proc.pid),
                "tok_s": result["summary"]["output_token_throughput"]}


def table(measured: dict[str, dict], notes: dict[str, str]) -> list[str]:
    peer = measured.get("llama-server", {}).get("loaded")
    lines = ["| server | peak RSS after start-up MB | after the load MB | its tok/s | vs llama-server |",
             "|---|---|---|---|---|"]
    for name, row in measured.items():
        ratio = f"{row['loaded'] / peer:.2f}x" if peer and name != "llama-server" else "—"
        lines.append(f"| {name} | {row['started']:.0f} | {row['loaded']:.0f} | {row['tok_s']:.1f} | {ratio} |")
    return lines + ["", *(f"- {name}: {note}" for name, note in notes.items())]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="KV capacity in tokens (llama-server's -c)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (llama-server's -np)")
    parser.add_argument("--kv-dtypes", type=lambda s: s.split(","), default=list(KV_DTYPES))
    parser.add_argument("--peers", type=lambda s: [p for p in s.split(",") if p], default=["llama-server"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server -t and -tb")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory_8192.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    scratch = args.out.with_suffix("")
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    made = servers(args)
    measured = {}
    for name, (process, _) in made.items():
        print(f"measuring {name}", file=sys.stderr, flush=True)
        measured[name] = measure(process, name, args, scratch)
    report = [f"# Peak RSS at {args.tokens} tokens of KV cache ({started})", "",
              f"Machine: {machine()}. Model file: {smollm2_path().name}.",
              (f"Each server alone, sized for {args.tokens} tokens of KV, then one `kvserve bench` level: "
               f"{args.clients} clients, {2 * args.clients} requests, 128-token prompts, 128 output tokens "
               f"(ignore_eos). Peak RSS is the server process's VmHWM."), "",
              *table(measured, {name: note for name, (_, note) in made.items()})]
    args.out.write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
