"""kvserve beside its peers, llama.cpp's C++ llama-server and vLLM's CPU build: same machine, same GGUF, one run.

Prepares each peer once (cached under ~/.cache/kvserve-peers: llama-server built from the llama-cpp-python
sdist, bench/llama_peer.py; vLLM's own venv and a bfloat16 copy of the weights, bench/vllm_peer.py), starts
every server (an idle one costs no CPU), then, --repeats times, for each concurrency, drives each server in
turn with `kvserve bench` (streamed /v1/completions, random-word prompts of exactly --input-len tokens
counted by the server's own /tokenize, --output-len tokens with ignore_eos, greedy). Only one server is
under load at a time and the order rotates every round, so a drift in the shared machine's speed hits all
alike. With --prefill-len, each server is then started alone, sized for one long sequence, and timed on
--prefill-prompts distinct prompts of that many tokens with 1 output token (after one warm-up prompt of the
same length). Writes markdown tables of medians with kvserve / best-peer ratios. Servers are stopped by PID.
Every vLLM start compiles its forward for ~2 minutes (its compile cache does not load back here).

    .venv/bin/python bench/peers.py --prefill-len 1500            # ~30 minutes, plus the first-time setup
    .venv/bin/python bench/peers.py --peers llama-server           # a subset of the peers
    .venv/bin/python bench/peers.py --kvserve-flag=--threads=1     # any extra kvserve serve flags
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import llama_peer, vllm_peer  # noqa: E402
from bench.machine import machine  # noqa: E402
from bench.peers_tables import prefill_table, throughput_table  # noqa: E402
from bench.process_tree import peak_rss_mb  # noqa: E402
from model.loading import smollm2_path  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

CACHE = Path(os.environ.get("KVSERVE_PEERS_CACHE", Path.home() / ".cache" / "kvserve-peers"))
PEERS = {module.NAME: module for module in (llama_peer, vllm_peer)}


def bench(url: str, concurrency: int, num_prompts: int, lengths: tuple[int, int], seed: int,
          output: Path) -> dict:
    """One load level of `kvserve bench`; lengths: (prompt tokens, output tokens). Every server gets the same
    seed, hence the same prompts; every level and round gets its own, so no prompt cache holds one it is sent."""
    subprocess.run([sys.executable, "-m", "service", "bench", "--url", url, "--concurrency", str(concurrency),
                    "--num-prompts", str(num_prompts), "--input-len", str(lengths[0]), "--output-len",
                    str(lengths[1]), "--ignore-eos", "--warmup", "2", "--seed", str(seed), "--no-progress",
                    "--output", str(output)], cwd=ROOT, check=True, stdout=sys.stderr)
    output.with_suffix(".png").unlink(missing_ok=True)  # the JSON holds everything the tables need
    return json.loads(output.read_text())


def seq_len(prompt_tokens: int, output_tokens: int) -> int:
    """Tokens one sequence may need, rounded up (and at least 512, what a slot of llama-server had before)."""
    return max(512, -(-(prompt_tokens + output_tokens + 16) // 256) * 256)


def servers(args: argparse.Namespace, gguf: Path, slots: int, tokens: int) -> tuple[dict, dict[str, str]]:
    """kvserve and each peer, not started, sized for `slots` sequences of `tokens` tokens; and a note of
    each one's flags for the report."""
    kv_flags = ["--max-num-seqs", str(max(slots, 64)), *args.kvserve_flag]
    made = {"kvserve": (ServerProcess(*kv_flags, startup_timeout=600.0),
                        f"kvserve: `kvserve serve {' '.join(kv_flags)}` (defaults otherwise: 1 GiB KV cache)")}
    for name in args.peers:
        made[name] = PEERS[name].server(CACHE, gguf, slots, tokens, args.threads)
    return {name: made[name][0] for name in made}, {name: made[name][1] for name in made}


def throughput(args: argparse.Namespace, gguf: Path, scratch: Path) -> tuple[dict, dict, dict]:
    """All servers up at once, driven one at a time; per server, per concurrency, one summary per round.
    Also returns each server's peak RSS over the phase (summed over its processes) and its flags."""
    slots = max(args.concurrency)
    procs, notes = servers(args, gguf, slots, seq_len(args.input_len, args.output_len))
    names = list(procs)
    results: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in args.concurrency} for name in names}
    with contextlib.ExitStack() as stack:
        for name in names:
            started = time.monotonic()
            stack.enter_context(procs[name])
            print(f"{name} up after {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        for repeat in range(args.repeats):
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            for concurrency in args.concurrency:
                num_prompts = max(args.min_prompts, args.waves * concurrency)
                for name in order:
                    print(f"round {repeat + 1}: {name} at concurrency {concurrency}", file=sys.stderr, flush=True)
                    results[name][concurrency].append(bench(
                        procs[name].url, concurrency, num_prompts, (args.input_len, args.output_len),
                        1000 * (repeat + 1) + concurrency, scratch / f"{name}_c{concurrency}_r{repeat + 1}.json"))
        rss = {name: peak_rss_mb(procs[name].proc.pid) for name in names}
    return results, rss, notes


def prefill(args: argparse.Namespace, gguf: Path, scratch: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Each server alone and fresh, sized for one sequence: a warm-up prompt, then --prefill-prompts distinct
    prompts of --prefill-len tokens, 1 output token each, one at a time. Returns each server's bench JSON."""
    procs, notes = servers(args, gguf, 1, seq_len(args.prefill_len, 1))
    results = {}
    for name, proc in procs.items():
        with proc:
            print(f"prefill: {name}", file=sys.stderr, flush=True)
            bench(proc.url, 1, 1, (args.prefill_len, 1), 1, scratch / f"{name}_prefill_warmup.json")
            results[name] = bench(proc.url, 1, args.prefill_prompts, (args.prefill_len, 1), 2,
                                  scratch / f"{name}_prefill.json")
    return results, notes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=lambda s: s.split(","), default=list(PEERS),
                        help=f"comma-separated, of {', '.join(PEERS)} (default: all)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--waves", type=int, default=2, help="requests per level = waves x concurrency ...")
    parser.add_argument("--min-prompts", type=int, default=8, help="... but at least this many")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all levels; medians reported")
    parser.add_argument("--prefill-len", type=int, default=0, help="also time prefill at this prompt length")
    parser.add_argument("--prefill-prompts", type=int, default=3, help="distinct prompts; median reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server -t and -tb")
    parser.add_argument("--kvserve-flag", action="append", default=[], help="extra `kvserve serve` flag")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peers.md")
    args = parser.parse_args()
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; known: {', '.join(PEERS)}")
    return args


def main() -> None:
    args = parse_args()
    gguf = smollm2_path()
    for name in args.peers:
        PEERS[name].prepare(CACHE, gguf)
    scratch = args.out.with_suffix("")
    scratch.mkdir(parents=True, exist_ok=True)
    started, load_before = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()
    results, rss, notes = throughput(args, gguf, scratch)
    prefills, prefill_notes = prefill(args, gguf, scratch) if args.prefill_len else ({}, {})
    report = [f"# kvserve vs {', '.join(args.peers)} ({started})", "",
              (f"Machine: {machine()}; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}."
               f" Model file: {gguf.name} (vLLM: the same weights as a bfloat16 folder)."),
              (f"Load: `kvserve bench`, streamed /v1/completions, {args.input_len}-token prompts (server-counted),"
               f" {args.output_len} output tokens (ignore_eos), greedy, max({args.min_prompts}, {args.waves} x "
               f"clients) requests per level; rounds: {args.repeats}, the servers' order rotating, medians shown."),
              *(f"- {note}" for note in notes.values()),
              "Peak RSS over the run (VmHWM, summed over each server's processes: vLLM runs several, so its sum "
              "counts shared pages more than once): "
              + ", ".join(f"{name} {mb:.0f} MB" for name, mb in rss.items()) + ".", "",
              *throughput_table(results)]
    if prefills:
        report += ["", f"## Prefill: {args.prefill_len}-token prompts, 1 output token", "",
                   (f"Each server started alone, sized for one sequence; one warm-up prompt, then "
                    f"{args.prefill_prompts} distinct prompts one at a time; TTFT is the prefill (plus HTTP)."),
                   *(f"- {note}" for note in prefill_notes.values()), "", *prefill_table(prefills)]
    report += ["", f"Raw JSON per level: {scratch.name}/ beside this file."]
    args.out.write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
