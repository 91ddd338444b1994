"""Attention over a paged KV cache: per-step metadata and the reference torch backend.

The cache of one layer is a pair of tensors (K, V), each (num_blocks * block_size, n_kv, hd): a flat
array of token slots, where slot = block_id * block_size + offset. A sequence's block table lists its
blocks in order, so token position p lives in slot table[p // block_size] * block_size + p % block_size.

A step packs many sequences: sequence i brings query_lens[i] new tokens and, after the step, has
context_lens[i] tokens in the cache. Decode rows (one new token) are attended together: by the Triton
paged kernel (model/kernels/decode.py) where it runs, reading K/V through the block tables, otherwise by
one padded SDPA call over gathered K/V. Prefill chunks are attended one sequence at a time, where the
loop costs nothing next to the work. On a CPU where the native kernels load (model/kernels/native.py), every
token, decode or prefill, is attended by one C++ kernel through the block tables instead, so that its result
does not depend on the step it is in. Everything that does not depend on the layer is built once per
step, here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.kernels import native
from model.kernels.decode import paged_decode_attention, triton_available

KVCache = tuple[torch.Tensor, torch.Tensor]  # one layer's (K, V), each (num_slots, n_kv, hd)


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int,
                      dtype: torch.dtype, device: torch.device | str) -> list[KVCache]:
    cache = torch.zeros(config.num_layers, 2, num_blocks * block_size, config.num_kv_heads,
                        config.head_dim, dtype=dtype, device=device)
    return [(cache[layer, 0], cache[layer, 1]) for layer in range(config.num_layers)]


@dataclass
class DecodeRows:
    """Every one-token sequence of the step, attended together."""
    token_index: torch.Tensor  # (Bd,) rows of the packed batch
    block_size: int
    # The Triton kernel's inputs; None for the torch backend.
    block_tables: torch.Tensor | None = None  # (Bd, width) int32 block ids of each row
    context_lens: torch.Tensor | None = None  # (Bd,) int32
    # The torch backend's padded gather; None when the kernel attends the rows.
    kv_slots: torch.Tensor | None = None  # (Bd, max_ctx) cache slots of each row's context, padded
    key_mask: torch.Tensor | None = None  # (Bd, 1, 1, max_ctx) True where the key may be attended


@dataclass
class PrefillChunk:
    """One sequence's run of new tokens, attended on its own."""
    token_start: int
    num_tokens: int
    kv_slots: torch.Tensor | None  # (ctx,) cache slots of the context; None: the chunk is all of it
    mask: torch.Tensor | None  # (q, ctx) True where allowed; None for a plain causal square


@dataclass
class NativeRows:
    """What the native CPU kernel reads: each token's sequence (a row of the tables) and its position."""
    block_tables: torch.Tensor  # (B, width) int64
    token_rows: torch.Tensor  # (T,) int64
    block_size: int


@dataclass
class AttentionMetadata:
    query_lens: list[int]
    context_lens: list[int]
    positions: torch.Tensor  # (T,) position of every new token
    logits_index: torch.Tensor  # (B,) row of each sequence's last new token
    slot_mapping: torch.Tensor | None = None  # (T,) where each new token's K/V go
    decode: DecodeRows | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    sliding_window: int | None = None  # the window the masks were built for; the model checks it
    triton_attention: bool = False  # decode rows attended, and RoPE + the K/V cache write done, by Triton kernels
    native: NativeRows | None = None  # every token attended by the native CPU kernel (then no decode/prefills)
    rebuild: Callable[[int | None], AttentionMetadata] | None = field(default=None, repr=False)
    views: dict = field(default_factory=dict, repr=False)  # for_window's, by window

    def for_window(self, window: int | None) -> AttentionMetadata:
        """This step's metadata for a layer with another sliding window (Gemma's interleaved local and
        global layers), made once per step and window. The kernels take the window as an argument; only
        the torch backend's masks are built for one, and are built again."""
        if window == self.sliding_window:
            return self
        if window not in self.views:
            masked = self.prefills or (self.decode is not None and self.decode.key_mask is not None)
            if masked and self.rebuild is None:
                raise ValueError("this metadata was not made by AttentionMetadata.build: no other window")
            self.views[window] = self.rebuild(window) if masked else dataclasses.replace(
                self, sliding_window=window, views={})
        return self.views[window]

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int],
              block_tables: list[list[int]] | None, block_size: int = 16,
              sliding_window: int | None = None, device: torch.device | str = "cpu",
              triton_attention: bool | None = None, native_attention: bool | None = None) -> AttentionMetadata:
        """Metadata for one step. block_tables=None builds an uncached step (whole sequences).
        triton_attention: attend decode rows with the Triton kernel, and rotate and cache K/V with the fused
        one (None: wherever they are available). native_attention: attend every token with the native CPU
        kernel (None: on a CPU where it loads, unless triton_attention is asked for). An uncached step is
        the torch reference, always."""
        if len(query_lens) != len(context_lens) or not query_lens:
            raise ValueError("query_lens and context_lens must be non-empty and of equal length")
        if any(q <= 0 or c < q for q, c in zip(query_lens, context_lens)):
            raise ValueError(f"bad lengths: query_lens={query_lens} context_lens={context_lens}")
        starts = [c - q for q, c in zip(query_lens, context_lens)]
        positions = to_device(torch.cat([torch.arange(s, c) for s, c in zip(starts, context_lens)]), device)
        ends = torch.tensor(query_lens).cumsum(0)
        meta = cls(query_lens, context_lens, positions, to_device(ends - 1, device), sliding_window=sliding_window)
        meta.rebuild = lambda window: cls.build(query_lens, context_lens, block_tables, block_size, window, device,
                                                meta.triton_attention, meta.native is not None)
        if block_tables is None:
            if starts != [0] * len(starts):
                raise ValueError("an uncached step needs whole sequences (context_lens == query_lens)")
            meta.prefills = _prefill_chunks(query_lens, context_lens, None, block_size, sliding_window, device)
            return meta
        if len(block_tables) != len(query_lens) or any(
                len(t) * block_size < c for t, c in zip(block_tables, context_lens)):
            # A short table would be padded with block 0 and silently write into another sequence.
            raise ValueError(f"block_tables must cover context_lens={context_lens} in blocks of "
                             f"{block_size}, got {[len(t) for t in block_tables]} blocks")
        tables = pad_block_tables(block_tables, device)
        token_rows = torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens))
        token_rows = to_device(token_rows, device)
        meta.slot_mapping = _slots(tables, positions, token_rows, block_size)
        if native_attention is None:
            native_attention = torch.device(device).type == "cpu" and not triton_attention and native.load()
        elif native_attention and not native.load():
            raise RuntimeError("native_attention=True, but the native CPU kernels are not available")
        if native_attention:
            meta.native = NativeRows(tables, token_rows, block_size)
            return meta
        if triton_attention is None:
            triton_attention = triton_available(device)
        meta.triton_attention = triton_attention
        decode_rows = [i for i, q in enumerate(query_lens) if q == 1]
        if decode_rows:
            meta.decode = _decode_rows(decode_rows, ends, context_lens, tables, block_size, sliding_window,
                                       device, triton_attention)
        meta.prefills = _prefill_chunks(query_lens, context_lens, tables, block_size, sliding_window, device)
        return meta


def to_device(data, device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A tensor built on the host and copied without waiting for the device (a blocking copy would
    synchronise with the GPU's queue; a step synchronises only to read its sampled tokens)."""
    return torch.as_tensor(data, dtype=dtype).to(device, non_blocking=True)


def pad_block_tables(block_tables: list[list[int]], device, fill: int = 0) -> torch.Tensor:
    """(rows, longest table) block ids, short tables padded with `fill`."""
    width = max(1, max(len(t) for t in block_tables))
    return to_device([t + [fill] * (width - len(t)) for t in block_tables], device)


def _slots(tables: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, block_size: int) -> torch.Tensor:
    return tables[rows, positions // block_size] * block_size + positions % block_size


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) mask: a query sees keys at or before its own position."""
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    return allowed


def _decode_rows(rows, ends, context_lens, tables, block_size, window, device, kernel: bool) -> DecodeRows:
    ctx = to_device([context_lens[i] for i in rows], device)
    row_index = to_device(rows, device)
    token_index = to_device(ends[rows] - 1, device)
    if kernel:
        return DecodeRows(token_index, block_size, tables.index_select(0, row_index).int(), ctx.int())
    k_pos = torch.arange(max(context_lens[i] for i in rows), device=device)[None, :]  # (1, max_ctx)
    kv_slots = _slots(tables, k_pos.clamp(max=tables.shape[1] * block_size - 1), row_index[:, None], block_size)
    key_mask = _allowed((ctx - 1)[:, None], k_pos, window) & (k_pos < ctx[:, None])
    return DecodeRows(token_index, block_size, kv_slots=kv_slots, key_mask=key_mask[:, None, None, :])


def _prefill_chunks(query_lens, context_lens, tables, block_size, window, device) -> list[PrefillChunk]:
    chunks, start = [], 0
    for row, (q, ctx) in enumerate(zip(query_lens, context_lens)):
        if q > 1 or tables is None:
            k_pos = torch.arange(ctx, device=device)
            # A chunk that is its sequence's whole context attends its own new K/V: no cache read.
            slots = None if tables is None or ctx == q else _slots(tables, k_pos, torch.tensor(row), block_size)
            mask = None
            if window is not None or ctx != q:
                mask = _allowed(k_pos[ctx - q:, None], k_pos[None, :], window)
            chunks.append(PrefillChunk(start, q, slots, mask))
        start += q
    return chunks


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
    k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    return attend_cached(q, k, v, kv_cache, meta, scale, softcap)


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
