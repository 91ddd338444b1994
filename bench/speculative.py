"""N-gram speculative decoding over HTTP, drafts on against drafts off in the same run and server.

Workloads (chat-templated prompts, greedy, up to --max-tokens output tokens, EOS honoured):
  grounded    a ~500-token text from this repository's README, and a task that answers from it
              (repeat it with typos fixed, summarize, list its commands, rewrite it plainly)
  open-ended  a short instruction with nothing to copy (a story, an explanation)
Each request is sent twice, with `speculative_ngram: 0` (off) and without it (the server's drafts),
alternating which goes first. tok/s of a request = output tokens / (last token - first token), the
decode rate; TTFT is the same either way (drafting starts after prefill). Medians over requests.

Two servers, the CPU defaults (int4 on the native kernels, float32 activations) plus:
  1. `--speculative-ngram K` with the default --speculative-max-batch: single stream and 16 clients
     (aggregate output tok/s = all output tokens / wall time, EOS ignored so both sides do the same work)
     on both workloads.
  2. `--speculative-ngram K --speculative-max-batch 64`: drafts at every batch size, grounded, at
     concurrency 1, 2, 4, 8, 16 -- where drafting stops paying, which sets the default max batch.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/speculative.py --out bench/results/speculative.md
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import statistics
import sys
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clients.bench.prompts import Prompt  # noqa: E402
from clients.bench.runner import LoadSpec, run_load  # noqa: E402
from clients.client import AsyncClient  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

TASKS = ["Repeat the text above exactly, fixing any typos.", "Summarize the text above in five sentences.",
         "List every command or flag named in the text above, one per line.",
         "Rewrite the text above in plain words for a new user."]
OPEN = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
        "Describe a day at the beach.", "Write a letter to a friend about your new job."]
OFF = {"speculative_ngram": 0}


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def grounded_prompts(count: int, max_tokens: int, label: str = "") -> list[Prompt]:
    readme = (REPO / "README.md").read_text()
    texts = [readme[2000 + 2100 * i: 2000 + 2100 * (i + 1)] for i in range(8)]  # ~500 tokens each
    # "Request i" first: no two prompts share a cached prefix, though texts and tasks repeat past 8.
    return [Prompt(chat(f"Request {label}{i}.\n{texts[i % 8]}\n\n{TASKS[i % len(TASKS)]}"), 0, max_tokens)
            for i in range(count)]


def open_prompts(count: int, max_tokens: int, label: str = "") -> list[Prompt]:
    return [Prompt(chat(f"({label}{i}) " + OPEN[i % len(OPEN)]), 0, max_tokens) for i in range(count)]


def decode_rate(record) -> float:
    return (record.output_tokens - 1) / (record.token_times[-1] - record.token_times[0])


async def drafts_proposed(url: str) -> float:
    """The server's kvserve_spec_decode_num_draft_tokens counter: how many drafts it has proposed so far."""
    async with httpx.AsyncClient(timeout=30) as http:
        text = (await http.get(f"{url}/metrics")).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("kvserve_spec_decode_num_draft_tokens_total"))


async def measure(url: str, build, count: int, max_tokens: int, concurrency: int, ignore_eos: bool = False) -> dict:
    """Drafts off and on, alternating order by batch; per-request decode rates, aggregate tok/s, each batch
    pair's on/off ratio and the drafts each side proposed. Each side gets the same tasks under its own label,
    so neither finds the other's prompts in the prefix cache."""
    results = {side: {"rates": [], "tokens": 0, "seconds": 0.0, "batches": [], "drafts": 0.0}
               for side in ("off", "on")}
    prompts = {side: build(count, max_tokens, label=f"{side} ") for side in results}
    async with AsyncClient(url, timeout=600) as client:
        for number, start in enumerate(range(0, count, concurrency)):
            for side in (("off", "on") if number % 2 == 0 else ("on", "off")):
                batch = prompts[side][start:start + concurrency]
                spec = LoadSpec(concurrency=concurrency, ignore_eos=ignore_eos, extra_body=OFF if side == "off" else {})
                before = await drafts_proposed(url)
                records, wall = await run_load(client, batch, spec)
                failed = [r.error for r in records if not r.ok]
                assert not failed, failed
                tokens = sum(r.output_tokens for r in records)
                results[side]["rates"] += [decode_rate(r) for r in records if r.output_tokens > 1]
                results[side]["tokens"] += tokens
                results[side]["seconds"] += wall
                results[side]["batches"].append(tokens / wall)
                results[side]["drafts"] += await drafts_proposed(url) - before
    summary = {side: {"median_tok_s": statistics.median(r["rates"]), "aggregate_tok_s": r["tokens"] / r["seconds"],
                      "rates": r["rates"], "drafts_per_token": r["drafts"] / r["tokens"]}
               for side, r in results.items()}
    summary["batch_ratios"] = [on / off for off, on in zip(results["off"]["batches"], results["on"]["batches"])]
    return summary


def row(label: str, measured: dict, key: str) -> str:
    off, on = measured["off"][key], measured["on"][key]
    return f"| {label} | {off:.1f} | {on:.1f} | {on / off:.2f}x |"


def many_row(label: str, measured: dict) -> str:
    """16 clients: aggregate tok/s, the median and range of the batch pairs' ratios, drafts per output token."""
    ratios = measured["batch_ratios"]
    return (f"{row(label, measured, 'aggregate_tok_s')} {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | {measured['on']['drafts_per_token']:.3f} |")


def task_rows(measured: dict) -> list[str]:
    """Grounded single stream per task (request i has task i % len(TASKS)): where drafts pay and where not."""
    lines = []
    for number, task in enumerate(TASKS):
        off, on = (statistics.median(measured[side]["rates"][number::len(TASKS)]) for side in ("off", "on"))
        lines.append(f"| {task} | {off:.1f} | {on:.1f} | {on / off:.2f}x |")
    return lines


def single_and_many(url: str, args) -> list[str]:
    """The default server's tables: single stream per workload (and per grounded task), 16 clients."""
    single = {name: asyncio.run(measure(url, build, args.single, args.max_tokens, 1))
              for name, build in (("grounded", grounded_prompts), ("open-ended", open_prompts))}
    # Every request exactly max_tokens long, so that both sides do the same work whatever their answers.
    many = {name: asyncio.run(measure(url, build, 16 * args.batches, args.max_tokens, 16, ignore_eos=True))
            for name, build in (("grounded", grounded_prompts), ("open-ended", open_prompts))}
    lines = ["| workload | drafts off tok/s | drafts on tok/s | on / off |", "|---|---|---|---|"]
    lines += [row(f"{name}, 1 client (median per request)", single[name], "median_tok_s") for name in single]
    lines += ["", f"Grounded single stream by task (median of {args.single // len(TASKS)} requests each):", "",
              "| task | drafts off tok/s | drafts on tok/s | on / off |", "|---|---|---|---|"]
    lines += task_rows(single["grounded"])
    lines += ["", f"16 clients, {args.batches} batches of 16 per side (aggregate = all output tokens / wall time; "
              "each batch pair's ratio, median and range; drafts the on side proposed per output token):", "",
              "| workload | drafts off tok/s | drafts on tok/s | on / off | batch pairs | drafts / token |",
              "|---|---|---|---|---|---|"]
    lines += [many_row(f"{name}, 16 clients", many[name]) for name in many]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=4, help="--speculative-ngram of the servers")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--single", type=int, default=24, help="prompts per workload, single stream")
    parser.add_argument("--batches", type=int, default=4, help="batches of 16 per side and workload, 16 clients")
    parser.add_argument("--skip-sweep", action="store_true", help="only the default server's measurements")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = [f"# Speculative decoding with n-gram drafts ({datetime.date.today()})", "",
             f"`OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/speculative.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start. Server: CPU "
             f"defaults (int4 native kernels, float32 activations), `--speculative-ngram {args.k}`; greedy, up to "
             f"{args.max_tokens} output tokens, EOS honoured (16 clients: ignored, every answer exactly that long); "
             "each request with drafts off and on, alternating. Per-request tok/s is the decode rate (first to last "
             "token).", ""]
    with ServerProcess("--speculative-ngram", str(args.k), startup_timeout=300) as server:
        lines += single_and_many(server.url, args)
    if args.skip_sweep:
        return write(lines, args.out)
    with ServerProcess("--speculative-ngram", str(args.k), "--speculative-max-batch", "64",
                       startup_timeout=300) as server:
        sweep = {c: asyncio.run(measure(server.url, grounded_prompts, max(4, 2 * c), args.max_tokens, c))
                 for c in (1, 2, 4, 8, 16)}
    lines += ["", "Drafts at every batch size (`--speculative-max-batch 64`), grounded workload, aggregate tok/s:", "",
              "| concurrency | drafts off | drafts on | on / off |", "|---|---|---|---|"]
    lines += [row(str(c), measured, "aggregate_tok_s") for c, measured in sweep.items()]
    write(lines, args.out)


def write(lines: list[str], out: str | None) -> None:
    report = "\n".join(lines) + "\n"
    print(report)
    if out:
        Path(out).write_text(report)


if __name__ == "__main__":
    main()
