"""The CPU KV cache's dtype: what each one costs in fidelity and what it buys in speed, in one run.

Fidelity, teacher-forced: texts of this repository (1,536 tokens each) prefilled in 512-token chunks over the
paged cache, so every position attends keys read back from the cache as it holds them; each position's
greedy token and log-probabilities compared with the float32 model's with a float32 cache (the reference
the tests hold the default to), and with the default int4 weights over a float32 cache (the KV rounding
alone). Speed, offline engine, the KV dtypes alternating round by round: 1 and 16 sequences (distinct
128-token prompts, 128 output tokens, greedy, EOS ignored) and a 1,500-token prompt's prefill (median of 3).

    .venv/bin/python bench/kv_cache_dtype.py --out bench/results/kv_cache_dtype.md   # ~15 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.engine_throughput import distinct_prompts, run_engine  # noqa: E402
from bench.machine import machine  # noqa: E402
from model.loading import load_model  # noqa: E402
from model.network.attention import AttentionMetadata, allocate_kv_cache, kv_cache_bytes_per_block  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")
TEXTS = ("README.md", "service/engine/scheduler.py", "model/kernels/cpu/attention.cpp", "tests/conftest.py")
TEXT_TOKENS, CHUNK, BLOCK = 1536, 512, 16


@torch.inference_mode()
def teacher_forced_logits(loaded, ids: list[int], kv_dtype: torch.dtype) -> torch.Tensor:
    """Log-probabilities at every position of ids, prefilled chunk by chunk over a cache of kv_dtype."""
    blocks = -(-len(ids) // BLOCK)
    cache = allocate_kv_cache(loaded.config, blocks, BLOCK, kv_dtype, loaded.device)
    tables, rows = [list(range(blocks))], []
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        meta = AttentionMetadata.build([len(chunk)], [start + len(chunk)], tables, BLOCK)
        rows.append(loaded.model(torch.tensor(chunk), meta, cache, logits_index=torch.arange(len(chunk))))
    return torch.cat(rows).float().log_softmax(-1)


def agreement(logp: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(share of positions whose greedy token is the reference's, mean KL(reference || logp))."""
    same = (logp.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return same, (reference.exp() * (reference - logp)).sum(-1).mean().item()


def fidelity(default, plain) -> list[str]:
    texts = [plain.tokenizer.encode((REPO / name).read_text("utf-8"))[:TEXT_TOKENS] for name in TEXTS]
    full = [teacher_forced_logits(plain, ids, torch.float32) for ids in texts]
    int4 = [teacher_forced_logits(default, ids, torch.float32) for ids in texts]
    lines = ["| KV dtype (int4 weights) | greedy tokens as the float32 model's | KL from it | greedy tokens as with "
             "a float32 cache | KL from it | KV bytes a token |", "|---|---|---|---|---|---|"]
    for name in DTYPES:
        dtype = getattr(torch, name)
        got = int4 if dtype == torch.float32 else [teacher_forced_logits(default, ids, dtype) for ids in texts]
        vs_full = [agreement(g, r) for g, r in zip(got, full)]
        vs_int4 = [agreement(g, r) for g, r in zip(got, int4)]
        per_token = kv_cache_bytes_per_block(default.config, 1, dtype)
        lines.append(f"| {name} | {mean(vs_full, 0):.4f} | {mean(vs_full, 1):.1e} | {mean(vs_int4, 0):.4f} | "
                     f"{mean(vs_int4, 1):.1e} | {per_token} |")
        print(lines[-1], flush=True)
    return lines


def mean(pairs: list[tuple[float, float]], i: int) -> float:
    return statistics.fmean(p[i] for p in pairs)


def speed(loaded, rounds: int) -> list[str]:
    prompts = distinct_prompts(loaded.tokenizer, 32, 128)
    long_prompts = distinct_prompts(loaded.tokenizer, 3, 1500, seed=1)
    for name in DTYPES:  # warm-up: every shape once per dtype
        run_engine(loaded, prompts[:2], 4, 16, name)
        run_engine(loaded, long_prompts[:1], 1, 1, name)
    results: dict[str, dict[str, list[float]]] = {name: {} for name in DTYPES}
    for r in range(rounds):
        for name in DTYPES if r % 2 == 0 else DTYPES[::-1]:
            got = results[name]
            got.setdefault("1", []).append(run_engine(loaded, prompts[:4], 128, 1, name)["tok_per_s"])
            got.setdefault("16", []).append(run_engine(loaded, prompts, 128, 16, name)["tok_per_s"])
            got.setdefault("prefill", []).append(statistics.median(
                len(p) / run_engine(loaded, [p], 1, 1, name)["seconds"] for p in long_prompts))
            print(name, {k: round(v[-1], 1) for k, v in got.items()}, flush=True)
    lines = ["| KV dtype | 1 seq tok/s | 16 seqs tok/s | 1,500-token prefill tok/s | rounds (1 / 16 / prefill) |",
             "|---|---|---|---|---|"]
    for name, got in results.items():
        cells = [f"{statistics.median(got[k]):.1f}" for k in ("1", "16", "prefill")]
        raw = " / ".join(", ".join(f"{v:.0f}" for v in got[k]) for k in ("1", "16", "prefill"))
        lines.append(f"| {name} | {' | '.join(cells)} | {raw} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    default = load_model("smollm2", "float32", "cpu", "int4")
    plain = load_model("smollm2", "float32", "cpu", None)
    lines = [f"Machine: {machine()}, load average {os.getloadavg()[0]:.2f} at start.", "",
             "## Fidelity (teacher-forced, 4 texts of 1,536 tokens, 512-token chunks)", "", *fidelity(default, plain),
             "", f"## Speed (offline engine, int4 weights, {args.rounds} rounds alternating, medians)", "",
             *speed(default, args.rounds)]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(f"# KV cache dtype on a CPU ({time.strftime('%Y-%m-%d %H:%M')})\n\n{report}")


if __name__ == "__main__":
    main()
