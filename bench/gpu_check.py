"""GPU check (one short run on a lent H100/H200): needs torch and triton (transformers for the baseline).

0. The Triton paged decode kernel against the torch backend on the GPU (fp32, every case of the tests).
1. Batch-1 decode of a 1B-parameter Llama-shaped bf16 model (random weights, preset llama-1b): eager,
   replayed from a CUDA graph, from a graph whose decode kernel does not split the context, and from one
   whose projections all stay unfused on cuBLAS, as a fraction of the HBM bandwidth limit (every weight
   read once a token) and of the bandwidth a plain streaming read reaches; the start-up GEMV tuning
   (Triton vs unfused, per projection kind and shape); and the graph's logits against the eager forward's.
2. Output tok/s of the offline engine at 64 concurrent requests (CUDA graphs on and off; outputs
   deferred to the next step or not) beside transformers' `generate` at batch 64 on the same GPU and the
   same shape (random weights in both).
3. SmolLM2-shaped random bf16 engine throughput at 256 requests.

    PYTHONPATH=. python bench/gpu_check.py --out $OUT/gpu_check.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import preset  # noqa: E402
from model.kernels import decode  # noqa: E402
from model.kernels.plan import KernelPlan  # noqa: E402
from model.loading import build_model  # noqa: E402
from model.loading.weights import random_weights  # noqa: E402
from model.network.attention import AttentionMetadata, allocate_kv_cache  # noqa: E402
from service.engine.cuda_graphs import DecodeGraphs  # noqa: E402

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # SXM datasheet peaks
KV_CACHE_BYTES = 8 << 30


def kernel_cases() -> str:
    from tests.model import triton_interpreter_cases as cases
    torch.backends.cuda.matmul.allow_tf32 = False
    diffs = {name: case() for name, case in cases.CASES.items()}
    torch.backends.cuda.matmul.allow_tf32 = True
    failed = [name for name, diff in diffs.items() if not diff <= cases.tolerance(name)]
    worst = max(diffs, key=diffs.get)
    verdict = f"FAIL ({', '.join(failed)})" if failed else "PASS"
    return (f"- Triton kernels (paged decode, split context, fused ops) vs torch, {len(diffs)} cases: {verdict} "
            f"(largest difference {worst}: {diffs[worst]:.2g})")


def _median_step(step, n: int = 64) -> float:
    times = []
    for i in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batch1_decode(config, device) -> list[str]:
    model = build_model(config, random_weights(config), "random", torch.bfloat16, device)
    cache = allocate_kv_cache(config, 65, 16, torch.bfloat16, device)  # block 64: the graphs' scratch block
    table = list(range(64))
    graphs = DecodeGraphs(model, KernelPlan(), cache, 16, 8, 64, 64, torch.device(device))  # captured below
    kernels = graphs.kernels  # the eager steps run with the plan the graphs tune
    lines, splitting = [], decode.PROGRAMS_PER_MULTIPROCESSOR
    with torch.inference_mode():
        model(torch.arange(128, device=device), AttentionMetadata.build([128], [128], [table], device=device), cache,
              kernels=kernels)

        def eager(i):
            return model(torch.ones(1, dtype=torch.long, device=device),
                         AttentionMetadata.build([1], [129 + i], [table], device=device), cache, kernels=kernels)

        def graph(i):
            return graphs.run([1], [129 + i], [table])

        def graph_unsplit(i):  # the decode kernel without splitting the context, for comparison
            return unsplit.run([1], [129 + i], [table])

        def graph_cublas(i):  # every projection unfused on cuBLAS, for comparison
            return cublas.run([1], [129 + i], [table])

        decode.PROGRAMS_PER_MULTIPROCESSOR = 0  # choose_splits -> 1 while these graphs capture
        unsplit = DecodeGraphs(model, KernelPlan(), cache, 16, 1, 64, 64, torch.device(device))
        unsplit.capture_all()
        decode.PROGRAMS_PER_MULTIPROCESSOR = splitting
        # No candidates: tuning keeps every path unfused.
        cublas = DecodeGraphs(model, KernelPlan(candidates=()), cache, 16, 1, 64, 64, torch.device(device))
        cublas.capture_all()
        graphs.capture_all()
        lines += gemv_tuning_lines(graphs.gemv_tuning)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), 3.35e12)
        streaming = streaming_read_bandwidth(device)
        lines.append(f"- streaming read (torch sum over 4 GiB of bf16): {streaming / 1e12:.2f} TB/s = "
                     f"{streaming / peak:.0%} of the {peak / 1e12:.2f} TB/s datasheet peak")
        steps = (("eager", eager), ("CUDA graph", graph), ("CUDA graph, context not split", graph_unsplit),
                 ("CUDA graph, projections all unfused cuBLAS", graph_cublas))
        for label, step in steps:
            tok_s = 1 / _median_step(step)
            lines.append(f"- llama-1b bf16 batch-1 decode, {label}: {tok_s:.0f} tok/s = "
                         f"{weight_bytes * tok_s / peak:.1%} of the HBM bandwidth limit "
                         f"({weight_bytes / 1e9:.2f} GB of weights, {peak / 1e12:.2f} TB/s; "
                         f"{weight_bytes * tok_s / streaming:.1%} of the streaming read)")
        # Same step both ways (it rewrites the same K/V): the graph must give the eager logits.
        tables = [table[:16], table[16:32], table[32:48]]
        ids, lens = [5, 6, 7], [100, 37, 250]
        model(torch.arange(250, device=device) % 1000, AttentionMetadata.build([250], [250], [table[32:48]],
                                                                               device=device), cache, kernels=kernels)
        replayed = graphs.run(ids, lens, tables).clone()
        direct = model(torch.tensor(ids, device=device), AttentionMetadata.build([1, 1, 1], lens, tables,
                                                                                 device=device), cache, kernels=kernels)
        diff = float((replayed - direct).abs().max())
        lines.append(f"- CUDA graph (batch 3 padded to 4) vs eager logits: max |diff| {diff:.3g} "
                     f"({'PASS' if diff <= 1e-2 * float(direct.abs().max()) else 'FAIL'})")
    return lines


def streaming_read_bandwidth(device) -> float:
    """Bytes/s of a plain reduction over a tensor far larger than L2: what reading memory reaches here."""
    data = torch.ones(2 << 30, dtype=torch.bfloat16, device=device)
    seconds = _median_step(lambda i: data.sum(), 20)
    nbytes = data.numel() * data.element_size()
    del data
    return nbytes / seconds


def gemv_tuning_lines(results) -> list[str]:
    lines = ["- start-up GEMV tuning, per projection kind, shape (N, K) and rows: us per weight (TB/s of its "
             "weight); the unfused path is cuBLAS, after the kernel making its input (add+RMSNorm, SwiGLU) if any:"]
    for r in results:
        chosen = f"Triton {r.best} {r.best_us:.1f} us ({r.weight_bytes / r.best_us / 1e6:.2f})" if r.best \
            else "unfused kept"
        lines.append(f"  - {r.kind} {r.shape} x {r.rows}: unfused {r.unfused_us:.1f} us "
                     f"({r.weight_bytes / r.unfused_us / 1e6:.2f}); {chosen}")
    return lines


def engine_throughput(config, device, requests: int, max_num_seqs: int, cuda_graphs: bool = True,
                      output_len: int = 128, defer_outputs: bool = True) -> tuple[float, float]:
    """Output tok/s over the whole run (prefill included), and the median duration in seconds of a
    decode step with every request in the batch."""
    from model.loading import LoadedModel
    from service.engine.config import EngineConfig
    from service.engine.engine import Engine
    from service.engine.request import SamplingParams

    model = build_model(config, random_weights(config), "random", torch.bfloat16, device)
    loaded = LoadedModel(model, config, _ByteTokenizer(config.vocab_size), "random", torch.bfloat16,
                         torch.device(device), 0.0)
    engine = Engine(loaded, EngineConfig(kv_cache_memory=KV_CACHE_BYTES, max_num_seqs=max_num_seqs,
                                         max_num_batched_tokens=4096, max_queue=1 << 20,
                                         cuda_graphs=cuda_graphs, defer_outputs=defer_outputs))
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    steps = []
    engine.events.on_step.append(steps.append)

    def run(n: int) -> float:
        for i in range(n):
            engine.add_request(torch.randint(0, config.vocab_size, (128,), generator=gen).tolist(), params,
                               f"r{time.perf_counter_ns()}-{i}")
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
        return n * output_len / (time.perf_counter() - start)

    run(requests)  # warm-up: Triton compiles the kernel, cuBLAS and the allocator settle
    steps.clear()
    tok_s = run(requests)
    full = [s.duration for s in steps if s.num_prefill_tokens == 0 and s.num_sequences == requests]
    return tok_s, statistics.median(full)


class _ByteTokenizer:
    """Enough of a tokenizer for random-weight engine runs (no text is looked at)."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eos_token_id, self.special_ids = vocab_size, None, {}

    def token_bytes(self, token_id: int) -> bytes:
        return b"x"


def transformers_throughput(config, device, batch: int, output_len: int = 128) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device(device):
        hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_position,
            rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings)).to(torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (batch, 128), device=device)
    hf.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len,
                do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return batch * output_len / (time.perf_counter() - start)


def section(lines: list[str], title: str, produce) -> None:
    """Run one part; a failure is recorded and the next part still runs."""
    start = time.perf_counter()
    try:
        result = produce()
        lines.extend(result if isinstance(result, list) else [result])
    except Exception:
        lines.append(f"- {title} FAILED:\n```\n{traceback.format_exc()}```")
    print("\n".join(lines[-3:]), f"[{title}: {time.perf_counter() - start:.0f} s]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda"
    import triton
    llama = preset("llama-1b")
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", ""]
    results: dict[str, float] = {}

    def engine(key, *a, **kw):
        results[key], step = engine_throughput(*a, **kw)
        return (f"- {key}: kvserve engine {results[key]:.0f} output tok/s over the run (prefill included); "
                f"a full decode step {step * 1e3:.2f} ms = {a[2] / step:.0f} tok/s")

    section(lines, "kernel", kernel_cases)
    section(lines, "batch-1 decode", lambda: batch1_decode(llama, device))
    section(lines, "engine graphs", lambda: engine("llama-1b bf16, 64 concurrent requests, CUDA graphs",
                                                   llama, device, 64, 64))
    section(lines, "engine not deferred", lambda: engine(
        "llama-1b bf16, 64 concurrent requests, CUDA graphs, outputs emitted before the next step",
        llama, device, 64, 64, defer_outputs=False))
    section(lines, "engine eager", lambda: engine("llama-1b bf16, 64 concurrent requests, eager",
                                                  llama, device, 64, 64, cuda_graphs=False))

    def baseline():
        theirs = transformers_throughput(llama, device, 64)
        ours = results.get("llama-1b bf16, 64 concurrent requests, CUDA graphs", float("nan"))
        return (f"- transformers generate, batch 64: {theirs:.0f} output tok/s "
                f"(kvserve / transformers {ours / theirs:.1f}x)")

    section(lines, "transformers", baseline)
    section(lines, "smollm2 engine", lambda: engine("smollm2-135m shape bf16, 256 requests, CUDA graphs",
                                                    preset("smollm2-135m"), device, 256, 256))
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
