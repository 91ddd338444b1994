"""The Triton kernels (paged decode, fused elementwise ops, GEMV) against the torch code they replace.
Run by test_triton_interpreter.py in a child process with TRITON_INTERPRET=1 (Triton reads it when the kernel
is first built) on CPU, and on a CUDA device by the GPU test and bench/gpu_check.py. Prints one line per
case, "name difference", and exits non-zero on the first beyond its tolerance."""
from __future__ import annotations

import os
import sys

import torch

from model.config import tiny
from model.kernels import gemv
from model.kernels.decode import paged_decode_attention
from model.kernels.plan import KernelPlan
from model.loading import build_model
from model.loading.weights import random_weights
from model.network.attention import AttentionMetadata, allocate_kv_cache, paged_attention

ATOL = 1e-5  # fp32: the kernel and SDPA differ only by summation order
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"


def attention_case(num_heads, num_kv_heads, head_dim, block_size, context_lens, window, seed=0):
    """Random cache with shuffled blocks; one decode row per context length."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for ctx in context_lens:
        tables.append([order.pop() for _ in range(-(-ctx // block_size))])
    shape = (num_blocks * block_size, num_kv_heads, head_dim)
    cache = (torch.randn(shape, generator=gen).to(DEVICE), torch.randn(shape, generator=gen).to(DEVICE))
    rows = len(context_lens)
    q = torch.randn(rows, num_heads, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(rows, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(rows, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    outs = []
    for kernel in (False, True):
        kv = (cache[0].clone(), cache[1].clone())
        meta = AttentionMetadata.build([1] * rows, context_lens, tables, block_size, window, DEVICE, kernel,
                                       native_attention=False)
        assert (meta.decode.kv_slots is None) == kernel
        outs.append(paged_attention(q, k, v, kv, meta, head_dim ** -0.5))
    # The kernel with its context cut into runs: one, a few, and more runs than some rows have tiles.
    for splits in (1, 2, 5):
        outs.append(paged_decode_attention(
            q, *kv, meta.decode.block_tables, meta.decode.context_lens, block_size, head_dim ** -0.5,
            window, splits))
    return max(float((outs[0] - out).abs().max()) for out in outs[1:])


def model_case(family_config, gemv_config=None):
    """Three sequences decoded 6 steps by a tiny model: logits with the kernels == without. `gemv_config`: a
    configuration of model/kernels/gemv.py's kernel for every projection of the decode steps (3 rows), with
    its input's add + RMSNorm or SwiGLU product fused in wherever the model has one."""
    model = build_model(family_config, random_weights(family_config, seed=3), "random", torch.float32, DEVICE)
    kernels = KernelPlan()
    sites = [(gemv.LINEAR, m) for m in model.modules() if type(m) is torch.nn.Linear]
    sites += model.fused_projections()
    for kind, linear in sites:
        kernels.set_plan(kind, linear.weight, linear.bias, 3, gemv_config)
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 40)]
    logits = []
    for kernel in (False, True):
        step_kernels = kernels if kernel else None
        cache = allocate_kv_cache(family_config, 48, 4, torch.float32, DEVICE)
        tables = [list(range(i, 48, 3)) for i in range(3)]  # interleaved blocks
        lens = [len(p) for p in prompts]
        ids = torch.tensor(sum(prompts, []), device=DEVICE)
        meta = AttentionMetadata.build(lens, lens, tables, 4, family_config.sliding_window, DEVICE, kernel)
        step_logits = [model(ids, meta, cache, kernels=step_kernels)]
        for _ in range(6):
            ids = step_logits[-1].argmax(-1)
            lens = [n + 1 for n in lens]
            meta = AttentionMetadata.build([1, 1, 1], lens, tables, 4, family_config.sliding_window, DEVICE,
                                           kernel)
            step_logits.append(model(ids, meta, cache, kernels=step_kernels))
        logits.append(torch.stack(step_logits))
    return float((logits[0] - logits[1]).abs().max())


def graph_staging_case():
    """The CUDA graphs' static buffers (service/engine/cuda_graphs.py), staged and run without capture:
    a batch of 5, then 3 padded to 4 over the stale rows, give the logits of a plain step, and padding
    rows write only into the scratch block."""
    from service.engine.cuda_graphs import DecodeGraphs

    config = tiny("smollm2-135m")
    model = build_model(config, random_weights(config, seed=5), "random", torch.float32, DEVICE)
    worst = 0.0
    cache = allocate_kv_cache(config, 61, 4, torch.float32, DEVICE)  # block 60: scratch
    graphs = DecodeGraphs(model, KernelPlan(), cache, 4, 8, 16, 60, torch.device(DEVICE))
    for batch in ([3, 9, 20, 33, 7], [12, 40, 5]):
        tables = [list(range(i, 60, 5))[:12] for i in range(len(batch))]
        for table, n in zip(tables, batch):  # prefill each sequence but its last token
            meta = AttentionMetadata.build([n - 1], [n - 1], [table], 4, None, DEVICE, True)
            model(torch.arange(n - 1, device=DEVICE) + 7, meta, cache, kernels=graphs.kernels)
        ids = [11 + i for i in range(len(batch))]
        before = [c.clone() for c in cache[0]]
        size = graphs.padded_size(len(ids))
        graphs._stage(size, ids, batch, tables)
        staged = model(graphs.input_ids[:size], graphs._metadata(size), cache, kernels=graphs.kernels)[: len(ids)]
        scratch = slice(60 * 4, 61 * 4)
        touched = [(a != b).any(-1).any(-1).nonzero().flatten() for a, b in zip(before, cache[0])]
        plain = model(torch.tensor(ids, device=DEVICE), AttentionMetadata.build(
            [1] * len(ids), batch, tables, 4, None, DEVICE, True), cache, kernels=graphs.kernels)
        worst = max(worst, float((staged - plain).abs().max()))
        expected = sorted(t[(n - 1) // 4] * 4 + (n - 1) % 4 for t, n in zip(tables, batch))
        written = [int(s) for s in touched[0] if not scratch.start <= s < scratch.stop]
        if written != expected:  # K written anywhere but each row's own slot (or the scratch block)
            return float("inf")
    return worst


def fused_ops_case(dtype: torch.dtype) -> float:
    """model/kernels/fused.py against the torch code it replaces (model/network/layers.py): add + RMSNorm, RoPE
    with the K/V cache write (shuffled slots, a head size whose half is not a power of two), SwiGLU's
    product over more columns than one program takes. Returns the worst error relative to the largest
    reference value."""
    from model.kernels.fused import rope_store_kv, silu_and_mul
    from model.network.layers import RMSNorm, RotaryEmbedding, add_and_norm, apply_rope

    gen = torch.Generator().manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    def rel(ref, out):
        return float((ref.float() - out.float()).abs().max() / ref.float().abs().max())

    tokens, hidden, heads, kv_heads, hd = 7, 100, 6, 2, 80
    norm = RMSNorm(hidden, 1e-5).to(DEVICE, dtype)
    norm.weight.copy_(rand(hidden))
    x, delta = rand(tokens, hidden), rand(tokens, hidden)
    errors = []
    for d in (None, delta):
        ref, out = add_and_norm(norm, x, d, None), add_and_norm(norm, x, d, KernelPlan())
        errors += [rel(ref[0], out[0]), rel(ref[1], out[1])]
    rotary = RotaryEmbedding(hd, 64, 10000.0).to(DEVICE)
    cos, sin = rotary(torch.randint(0, 64, (tokens,), generator=gen).to(DEVICE), dtype)
    qkv = rand(tokens, (heads + 2 * kv_heads) * hd)
    slots = torch.randperm(20, generator=gen)[:tokens].to(DEVICE)
    caches = [(torch.zeros(20, kv_heads, hd, dtype=dtype, device=DEVICE),
               torch.zeros(20, kv_heads, hd, dtype=dtype, device=DEVICE)) for _ in range(2)]
    qk = apply_rope(qkv[:, : (heads + kv_heads) * hd].view(tokens, -1, hd), cos, sin)
    caches[0][0].index_copy_(0, slots, qk[:, heads:])
    caches[0][1].index_copy_(0, slots, qkv[:, (heads + kv_heads) * hd:].view(tokens, kv_heads, hd))
    q, k, _ = rope_store_kv(qkv, cos, sin, slots, caches[1], heads, kv_heads, hd)
    errors += [rel(qk[:, :heads], q), rel(qk[:, heads:], k), rel(caches[0][0], caches[1][0]),
               rel(caches[0][1], caches[1][1])]
    h = rand(tokens, 2 * 1500)
    errors.append(rel(torch.nn.functional.silu(h[:, :1500]) * h[:, 1500:], silu_and_mul(h)))
    return max(errors)


def gemv_case(dtype: torch.dtype) -> float:
    """model/kernels/gemv.py's kernel against the unfused torch path, in float32: every candidate
    configuration on 1, 3 and 16 rows, shapes that are no multiple of the tiles, with and without bias;
    then, with one configuration that splits K and one that does not, SwiGLU's product fused in (against
    fused.silu_and_mul, then F.linear) and the residual add + RMSNorm fused in, with and without a
    delta (against fused.add_rms_norm, then F.linear; the residual it writes too). Returns the
    worst error relative to the largest reference value."""
    from model.kernels.fused import add_rms_norm, silu_and_mul

    gen = torch.Generator().manual_seed(13)

    def rel(ref, out):
        return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())

    worst = 0.0
    for rows, n, k, with_bias in ((1, 100, 300, True), (3, 48, 2048, False), (16, 70, 520, True)):
        x, delta, h, w, b, norm_w = (torch.randn(*shape, generator=gen).to(DEVICE, dtype)
                                     for shape in ((rows, k), (rows, k), (rows, 2 * k), (n, k), (n,), (k,)))
        bias = b if with_bias else None

        def ref(product):
            return torch.nn.functional.linear(product.float(), w.float(), None if bias is None else bias.float())

        for config in gemv.CANDIDATES:
            worst = max(worst, rel(ref(x), gemv.gemv(x, w, bias, config)))
        for config in (gemv.CANDIDATES[0], gemv.CANDIDATES[-1]):  # one run, several runs
            worst = max(worst, rel(ref(silu_and_mul(h)), gemv.gemv(h, w, bias, config, True)))
            for d in (None, delta):
                residual, normed = add_rms_norm(x, d, norm_w, 1e-5)
                fused = gemv.add_norm_gemv(x, gemv.AddNorm(d, norm_w, 1e-5), w, bias, config)
                worst = max(worst, rel(residual, fused[0]), rel(ref(normed), fused[1]))
    return worst


CASES = {
    "gqa-3": lambda: attention_case(9, 3, 64, 16, [1, 15, 16, 17, 33, 100], None),
    "mqa": lambda: attention_case(4, 1, 32, 4, [1, 2, 31, 32, 70], None),
    "mha": lambda: attention_case(4, 4, 16, 8, [5, 64, 65], None),
    "head-dim-80": lambda: attention_case(4, 2, 80, 16, [7, 48], None),
    "window-8": lambda: attention_case(4, 2, 16, 4, [1, 8, 9, 33, 70], 8),
    "window-40": lambda: attention_case(6, 2, 32, 16, [39, 40, 41, 100], 40),
    "model-llama-gqa": lambda: model_case(tiny("smollm2-135m")),
    "model-mistral-window": lambda: model_case(tiny("mistral-7b")),
    "model-gpt2-mha": lambda: model_case(tiny("gpt2")),
    "graph-staging": graph_staging_case,
    "fused-ops-fp32": lambda: fused_ops_case(torch.float32),
    "fused-ops-bf16": lambda: fused_ops_case(torch.bfloat16),
    "gemv-fp32": lambda: gemv_case(torch.float32),
    # Triton's interpreter multiplies bfloat16 as raw bits (numpy has no bfloat16): float16 takes the same
    # 16-bit tensor-core path there, bfloat16 is checked on a GPU.
    "gemv-16bit": lambda: gemv_case(torch.bfloat16 if DEVICE == "cuda" else torch.float16),
    "model-llama-gemv": lambda: model_case(tiny("smollm2-135m"), gemv.CANDIDATES[4]),
    "model-gpt2-gemv": lambda: model_case(tiny("gpt2"), gemv.CANDIDATES[0]),
}
# bfloat16: the kernels round once where the torch ops round after every op (and Triton's interpreter
# rounds toward zero); 1/64 is two steps of bfloat16's 8-bit mantissa near the largest value.
# A 16-bit output is rounded once: within one step of its 8 (bfloat16) or 11 (float16) bit mantissa.
TOLERANCE = {"fused-ops-bf16": 1 / 64, "gemv-16bit": 1 / 128 if DEVICE == "cuda" else 1e-3}


def tolerance(case: str) -> float:
    return TOLERANCE.get(case, ATOL)

def main() -> None:
    torch.set_grad_enabled(False)
    if DEVICE == "cuda":  # fp32 matmuls exactly, not TF32, so ATOL means the same on both devices
        torch.backends.cuda.matmul.allow_tf32 = False
    for name, case in CASES.items():
        diff = case()
        print(name, f"{diff:.3g}", flush=True)
        if not diff <= tolerance(name):
            sys.exit(f"{name}: kernel and torch backend differ by {diff}")


if __name__ == "__main__":
    main()
