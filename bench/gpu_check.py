"""GPU check (one short run on a lent H100/H200): needs torch (and transformers for the baseline) only.

1. Batch-1 decode of a 1B-parameter Llama-shaped bf16 model (random weights, preset llama-1b) through
   our model + paged cache, as a fraction of the HBM bandwidth limit (every weight read once a token).
2. Output tok/s of the offline engine at 64 concurrent requests beside transformers' `generate` at
   batch 64 on the same GPU and the same shape (random weights in both).
3. SmolLM2-shaped random bf16 engine throughput at 256 requests (the engine issue's GPU check).

    PYTHONPATH=. python bench/gpu_check.py --out $OUT/gpu_check.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.attention import AttentionMetadata, allocate_kv_cache  # noqa: E402
from model.config import preset  # noqa: E402
from model.loading import build_model  # noqa: E402
from model.weights import random_weights  # noqa: E402

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # SXM datasheet peaks


def decode_fraction(config, device) -> tuple[float, float]:
    model = build_model(config, random_weights(config), "random", torch.bfloat16, device)
    cache = allocate_kv_cache(config, 64, 16, torch.bfloat16, device)
    table = [list(range(64))]
    times = []
    with torch.inference_mode():
        model(torch.arange(128, device=device), AttentionMetadata.build([128], [128], table, device=device), cache)
        for i in range(64):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(torch.ones(1, dtype=torch.long, device=device),
                  AttentionMetadata.build([1], [129 + i], table, device=device), cache)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    tok_s = 1 / statistics.median(times)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), 3.35e12)
    return tok_s, weight_bytes * tok_s / peak


def engine_throughput(config, device, requests: int, max_num_seqs: int, output_len: int = 128) -> float:
    from model.loading import LoadedModel
    from service.engine.config import EngineConfig
    from service.engine.engine import Engine
    from service.engine.request import SamplingParams

    model = build_model(config, random_weights(config), "random", torch.bfloat16, device)
    loaded = LoadedModel(model, config, _ByteTokenizer(config.vocab_size), "random", torch.bfloat16,
                         torch.device(device), 0.0)
    engine = Engine(loaded, EngineConfig(kv_cache_memory=None, max_num_seqs=max_num_seqs,
                                         max_num_batched_tokens=4096, max_queue=1 << 20))
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(requests):
        engine.add_request(torch.randint(0, config.vocab_size, (128,), generator=gen).tolist(), params, f"r{i}")
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    return requests * output_len / (time.perf_counter() - start)


class _ByteTokenizer:
    """Enough of a tokenizer for random-weight engine runs (no text is looked at)."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eos_token_id, self.special_ids = vocab_size, None, {}

    def token_bytes(self, token_id: int) -> bytes:
        return b"x"


def transformers_throughput(config, device, batch: int, output_len: int = 128) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_position,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings)).to(device, torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (batch, 128), device=device)
    hf.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len,
                do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return batch * output_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda"
    llama = preset("llama-1b")
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    tok_s, fraction = decode_fraction(llama, device)
    lines.append(f"- llama-1b bf16 batch-1 decode: {tok_s:.1f} tok/s = {fraction:.1%} of the HBM bandwidth limit")
    ours = engine_throughput(llama, device, requests=64, max_num_seqs=64)
    lines.append(f"- llama-1b bf16, 64 concurrent requests: kvserve engine {ours:.0f} output tok/s")
    try:
        theirs = transformers_throughput(llama, device, 64)
        lines.append(f"- transformers generate, batch 64: {theirs:.0f} output tok/s (ratio {ours / theirs:.1f}x)")
    except Exception as exc:  # the baseline is optional on images without transformers
        lines.append(f"- transformers baseline failed: {type(exc).__name__}: {exc}")
    small = engine_throughput(preset("smollm2-135m"), device, requests=256, max_num_seqs=256)
    lines.append(f"- smollm2-135m shape bf16, 256 requests: kvserve engine {small:.0f} output tok/s")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
