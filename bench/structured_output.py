"""Constrained decoding's cost: aggregate output tok/s of 16 concurrent requests of which 8 are constrained
by a JSON schema, against 16 unconstrained, in the same run; and time to first token with a new schema
(compiled on the grammar workers while the request waits) against a cached one.

Throughput: 16 distinct chat prompts, greedy, exactly --output-len tokens each (EOS ignored; the schema
requires more array items than fit, so no constrained request ends early), one engine with prefix caching
off so every run prefills the same tokens, the schema compiled beforehand. Runs alternate plain/mixed
order round by round after a discarded warm-up of each; medians of --rounds. Beside wall-clock tok/s it
reports tokens per CPU-second of this process (less disturbed by other load on a shared machine), and it
times the constrained-decoding code itself (mask fill + apply, token consume) in the mixed runs: the cost
without the noise.

TTFT: one idle engine, one prompt, max_tokens 1: a schema never seen before, then the same schema again,
then no schema; medians of --ttft-trials. The first constrained request of a fresh engine also builds
llguidance's tokenizer, reported on its own.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/structured_output.py --dtype bfloat16 --quantization int4 \
        --threads 2 --out bench/results/structured_output.md   # the CPU server's defaults, a quiet 2-core host
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import service.engine.sampler as sampler_module  # noqa: E402
from bench.machine import machine  # noqa: E402
from model.loading import load_model  # noqa: E402
from service.engine.config import EngineConfig  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.request import SamplingParams  # noqa: E402
from service.engine.structured import StructuredOutput  # noqa: E402
from service.engine.structured.masking import GrammarState  # noqa: E402

ITEM = {"type": "object", "required": ["name", "qty"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "maxLength": 16},
                       "qty": {"type": "integer", "minimum": 0, "maximum": 999}}}
SCHEMA = {"type": "object", "required": ["items"], "additionalProperties": False,
          "properties": {"items": {"type": "array", "minItems": 500, "items": ITEM}}}
TOPICS = ["a kitchen", "a garage", "a library", "a garden", "a toolbox", "a picnic", "a classroom", "a bakery",
          "an office", "a camp site", "a bathroom", "a workshop", "a boat", "a pharmacy", "a studio", "a farm"]


class Timer:
    """Seconds spent in the constrained-decoding code (wrapped only for the bench)."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def prompts_for(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": f"List the things in {t} as JSON."}]))
            for t in TOPICS]


def run_batch(engine: Engine, prompts, constrained: int, output_len: int) -> dict:
    plain = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    bound = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True,
                           structured=StructuredOutput(json=SCHEMA))
    done = []
    wall, cpu = time.perf_counter(), time.process_time()
    for i, ids in enumerate(prompts):
        engine.add_request(ids, bound if i % 2 and i // 2 < constrained else plain, uuid.uuid4().hex,
                           lambda out: done.append(out) if out.finished else None)
    while engine.has_unfinished():
        engine.step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = sum(out.num_output_tokens for out in done)
    assert tokens == len(prompts) * output_len and all(out.finish_reason == "length" for out in done)
    return {"tok_s": tokens / wall, "tok_cpu_s": tokens / cpu, "seconds": wall}


def ttft(engine: Engine, ids, params: SamplingParams) -> float:
    first, errors = [], []

    def sink(out) -> None:
        if out.new_token_ids and not first:
            first.append(time.perf_counter())
        if out.error:
            errors.append(out.error)
    start = time.perf_counter()
    engine.add_request(ids, params, uuid.uuid4().hex, sink)
    while engine.has_unfinished():
        engine.step()
    assert first and not errors, errors
    return first[0] - start


def fresh_schema() -> dict:
    """A schema no cache has seen: a property named by a random suffix."""
    name = f"field_{uuid.uuid4().hex[:8]}"
    return {"type": "object", "required": [name], "additionalProperties": False,
            "properties": {name: ITEM, "items": {"type": "array", "items": ITEM}}}


def measure_ttft(loaded, config: EngineConfig, ids, trials: int) -> dict:
    first_engine = Engine(loaded, config)
    results = {"first": ttft(first_engine, ids, SamplingParams(max_tokens=1, structured=StructuredOutput(
        json=fresh_schema())))}
    new, cached, plain = [], [], []
    for _ in range(trials):
        spec = StructuredOutput(json=fresh_schema())
        new.append(ttft(first_engine, ids, SamplingParams(max_tokens=1, structured=spec)))
        cached.append(ttft(first_engine, ids, SamplingParams(max_tokens=1, structured=spec)))
        plain.append(ttft(first_engine, ids, SamplingParams(max_tokens=1)))
    return results | {"new": statistics.median(new), "cached": statistics.median(cached),
                      "plain": statistics.median(plain)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    # float32: at 16 rows on a 2-core host it decodes ~2x faster than the int4 default (which is tuned for
    # few rows), so the grammar's fixed per-step cost is the larger fraction here: the worse case.
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default="none", help="none or int4 (the CPU server's default)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ttft-trials", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core host)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.dtype, "cpu", None if args.quantization == "none" else args.quantization)
    config = EngineConfig(max_num_seqs=16, max_num_batched_tokens=1024, kv_cache_memory=512 << 20,
                          enable_prefix_caching=False, max_queue=1 << 10)
    engine = Engine(loaded, config)
    prompts = prompts_for(loaded.tokenizer)
    engine.grammars.compile(StructuredOutput(json=SCHEMA)).result()
    timer = Timer()
    sampler_module.apply_grammar_masks = timer.wrap(sampler_module.apply_grammar_masks)
    GrammarState.consume = timer.wrap(GrammarState.consume)
    load_before = os.getloadavg()
    run_batch(engine, prompts, 0, 8), run_batch(engine, prompts, 8, 8)  # warm-up
    runs = {"plain": [], "mixed": []}
    for r in range(args.rounds):
        for kind in (("plain", "mixed") if r % 2 == 0 else ("mixed", "plain")):
            spent = timer.seconds
            result = run_batch(engine, prompts, 8 if kind == "mixed" else 0, args.output_len)
            result["grammar_s"] = timer.seconds - spent
            runs[kind].append(result)
            print(kind, result, flush=True)
    latency = measure_ttft(loaded, config, prompts[0], args.ttft_trials)
    print(latency, flush=True)
    report = render(args, runs, latency, load_before, os.getloadavg())
    print(report)
    if args.out:
        Path(args.out).write_text(report)


def render(args, runs: dict, latency: dict, load_before, load_after) -> str:
    median = {kind: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for kind, rs in runs.items()}
    plain, mixed = median["plain"], median["mixed"]
    lines = [f"# Structured output cost (offline engine, {datetime.date.today()})", "",
             f"`OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/structured_output.py {shlex.join(sys.argv[1:])}`", "",
             f"Machine: {machine()}; load average {load_before[0]:.2f} at start, {load_after[0]:.2f} at end.",
             f"Model {args.model}, {args.dtype}, quantization {args.quantization}; 16 concurrent requests "
             f"(max_num_seqs 16), distinct chat prompts, greedy, {args.output_len} output tokens each. "
             "Mixed: 8 of them constrained by one JSON schema (an object holding an array of objects with a "
             "bounded string and a bounded integer), compiled before the run.", "",
             "| run | batch | output tok/s | output tok per CPU-s | seconds | in grammar code (s) |",
             "|---|---|---|---|---|---|"]
    for kind in ("plain", "mixed"):
        for i, r in enumerate(runs[kind]):
            lines.append(f"| {i + 1} | {kind} | {r['tok_s']:.1f} | {r['tok_cpu_s']:.1f} | {r['seconds']:.2f} | "
                         f"{r['grammar_s']:.3f} |")
    wall_cost = 1 - mixed["tok_s"] / plain["tok_s"]
    cpu_cost = 1 - mixed["tok_cpu_s"] / plain["tok_cpu_s"]
    lines += ["", f"**Medians: 16 unconstrained {plain['tok_s']:.1f} tok/s, 8 constrained + 8 unconstrained "
              f"{mixed['tok_s']:.1f} tok/s: cost {wall_cost:+.1%} wall-clock, {cpu_cost:+.1%} per CPU-second. "
              f"Grammar code (mask fill and apply, consume) {mixed['grammar_s']:.3f} s of {mixed['seconds']:.2f} s "
              f"= {mixed['grammar_s'] / mixed['seconds']:.1%} of the mixed run.**", "",
              "Time to first token (one request on an idle engine, max_tokens 1, medians of "
              f"{args.ttft_trials}):", "",
              "| request | TTFT (ms) |", "|---|---|",
              f"| unconstrained | {latency['plain'] * 1e3:.1f} |",
              f"| new JSON schema (compiled while it waits) | {latency['new'] * 1e3:.1f} |",
              f"| the same schema again (cached) | {latency['cached'] * 1e3:.1f} |",
              f"| the first constrained request of a fresh engine (also builds llguidance's tokenizer) | "
              f"{latency['first'] * 1e3:.1f} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
