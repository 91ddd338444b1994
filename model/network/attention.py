"""Attention over a paged KV cache: the reference torch backend and the native kernels' entry points, over
a step's metadata (model/network/attention_metadata.py, re-exported here for the model's callers).

Decode rows (one new token) are attended together: by the Triton paged kernel (model/kernels/decode.py)
where it runs, reading K/V through the block tables, otherwise by one padded SDPA call over gathered K/V.
Prefill chunks are attended one sequence at a time, where the loop costs nothing next to the work. On a CPU
where the native kernels load (model/kernels/native.py), every token, decode or prefill, is attended by one
C++ kernel through the block tables instead, so that its result does not depend on the step it is in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.kernels.decode import paged_decode_attention
from model.network.attention_metadata import (AttentionMetadata, DecodeRows, KVCache, NativeRows, PrefillChunk,
                                              allocate_kv_cache, kv_cache_bytes_per_block, pad_block_tables,
                                              to_device)

__all__ = ["AttentionMetadata", "DecodeRows", "KVCache", "NativeRows", "PrefillChunk", "allocate_kv_cache",
           "attend_cached", "kv_cache_bytes_per_block", "native_rotary_attention", "pad_block_tables",
           "paged_attention", "softcapped_attention", "to_device", "uncached_attention"]


def softcapped_attention(q, k, v, mask: torch.Tensor | None, scale: float, softcap: float) -> torch.Tensor:
    """Attention with Gemma 2's soft-capped scores, cap * tanh(q.k * scale / cap), which SDPA does not take:
    q (..., nh, q_len, hd), k/v (..., n_kv, ctx, hd), mask broadcastable to the scores (None: causal)."""
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, -3).float(), v.repeat_interleave(group, -3).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)


def _attend_chunk(q, k, v, mask, scale, softcap: float | None = None) -> torch.Tensor:
    # q: (q_len, nh, hd), k/v: (ctx, n_kv, hd) -> (q_len, nh, hd)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if softcap is not None:
        return softcapped_attention(q, k, v, mask, scale, softcap).transpose(0, 1)
    group = q.shape[0] // k.shape[0]
    if group > 1 and mask is not None and q.is_cuda:
        # CUDA's fused kernels take GQA only without a mask (flash); with one, enable_gqa falls back to
        # the unfused math path, so hand them expanded K/V instead.
        k, v, group = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), 1
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                         scale=scale, enable_gqa=group > 1)
    return out.transpose(0, 1)


def uncached_attention(q, k, v, meta: AttentionMetadata, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Each sequence attends only to its own new tokens: the no-cache reference."""
    return _attend_prefills(torch.empty_like(q), q, k, v, None, meta, scale, softcap)


def _attend_prefills(out, q, k, v, kv_cache: KVCache | None, meta: AttentionMetadata,
                     scale: float, softcap: float | None = None) -> torch.Tensor:
    """Each prefill chunk attends its context: its own new K/V, or the cache when it has a past."""
    for chunk in meta.prefills:
        rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        if chunk.kv_slots is None:
            keys, values = k[rows], v[rows]
        else:
            keys = _gather(kv_cache[0], chunk.kv_slots, q.dtype)
            values = _gather(kv_cache[1], chunk.kv_slots, q.dtype)
        out[rows] = _attend_chunk(q[rows], keys, values, chunk.mask, scale, softcap)
    return out


def paged_attention(q, k, v, kv_cache: KVCache, meta: AttentionMetadata, scale: float,
                    softcap: float | None = None) -> torch.Tensor:
    """Write the step's K/V into the cache, then attend every new token to its cached context."""
    k_cache, v_cache = kv_cache
    k_cache.index_copy_(0, meta.slot_mapping, as_cached(k, k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, as_cached(v, v_cache.dtype))
    return attend_cached(q, k, v, kv_cache, meta, scale, softcap)


FLOAT16_MAX = torch.finfo(torch.float16).max


def as_cached(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a cache of `dtype` holds it: a float16 cache saturates at its largest finite value, as the native
    kernel's does (an inf there would turn its scores NaN)."""
    if dtype == torch.float16 and x.dtype != torch.float16:
        x = x.clamp(-FLOAT16_MAX, FLOAT16_MAX)
    return x.to(dtype)


def attend_cached(q, k, v, kv_cache: KVCache, meta: AttentionMetadata, scale: float,
                  softcap: float | None = None) -> torch.Tensor:
    """Attend every new token to its context, the step's K/V being in the cache already."""
    if meta.native is not None:
        return _attend_native(q, kv_cache, meta, scale, softcap)
    if meta.decode is not None and not meta.prefills:
        # Every token is a decode row, in order: no need to pick the rows out and put them back.
        return _attend_decode(q, *kv_cache, meta.decode, scale, meta.sliding_window, every_row=True, softcap=softcap)
    out = torch.empty_like(q)
    if meta.decode is not None:
        out.index_copy_(0, meta.decode.token_index,
                        _attend_decode(q, *kv_cache, meta.decode, scale, meta.sliding_window, softcap=softcap))
    return _attend_prefills(out, q, k, v, kv_cache, meta, scale, softcap)


def _attend_native(q, kv_cache: KVCache, meta: AttentionMetadata, scale: float,
                   softcap: float | None = None) -> torch.Tensor:
    rows = meta.native
    return torch.ops.kvserve.paged_attention(q.contiguous(), *kv_cache, rows.block_tables, rows.token_rows,
                                             meta.positions, rows.block_size, scale, meta.sliding_window or 0,
                                             softcap or 0.0)


def native_rotary_attention(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                            meta: AttentionMetadata, kv_cache: KVCache, scale: float, num_heads: int,
                            softcap: float | None = None) -> torch.Tensor:
    """The fused QKV projection's output -> (T, nh, hd) in one native op: RoPE on q and k, the K/V cache
    write, attention (no RoPE: rope None; softcap: Gemma 2's capped scores)."""
    cos, sin = rope if rope is not None else (qkv.new_empty(0), qkv.new_empty(0))
    rows = meta.native
    return torch.ops.kvserve.rotary_paged_attention(qkv.contiguous(), cos, sin, *kv_cache, meta.slot_mapping,
                                                    rows.block_tables, rows.token_rows, meta.positions,
                                                    rows.block_size, scale, meta.sliding_window or 0, num_heads,
                                                    softcap or 0.0)


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache rows at `slots`, shaped like slots + (n_kv, hd). index_select on the flat slot list is a
    plain row copy, much cheaper for these small gathers than advanced indexing."""
    rows = cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])
    return rows if rows.dtype == dtype else rows.to(dtype)


def _attend_decode(q, k_cache, v_cache, rows: DecodeRows, scale: float, window: int | None,
                   every_row: bool = False, softcap: float | None = None) -> torch.Tensor:
    n_kv, hd = k_cache.shape[1], k_cache.shape[2]
    bd = rows.token_index.shape[0]
    q_rows = q if every_row else q.index_select(0, rows.token_index)
    if rows.kv_slots is None:
        return paged_decode_attention(q_rows, k_cache, v_cache, rows.block_tables, rows.context_lens,
                                      rows.block_size, scale, window)
    # CPU SDPA is ~3x slower on these small bfloat16 shapes than upcasting the gathered rows to float32
    # first (561 vs 164 + conversion us for 16 rows of 170 keys); float32 softmax is also the exact one.
    dtype = torch.float32 if q.device.type == "cpu" else q.dtype
    # Group each KV head's query heads as the "query length" so GQA needs no K/V expansion.
    q_rows = q_rows.reshape(bd, n_kv, -1, hd).to(dtype)  # (Bd, n_kv, g, hd)
    k = _gather(k_cache, rows.kv_slots, dtype).transpose(1, 2)  # (Bd, n_kv, max_ctx, hd)
    v = _gather(v_cache, rows.kv_slots, dtype).transpose(1, 2)
    if softcap is not None:
        q_rows = q_rows.reshape(bd, -1, 1, hd)  # (Bd, nh, 1, hd): the query heads as heads again
        out = softcapped_attention(q_rows, k, v, rows.key_mask, scale, softcap)
    else:
        out = F.scaled_dot_product_attention(q_rows, k, v, attn_mask=rows.key_mask, scale=scale)
    return out.reshape(bd, -1, hd).to(q.dtype)  # (Bd, nh, hd)
