"""A step's attention metadata, built once per step for every layer: the KV cache layout, each token's
position and cache slot, and what each attention backend reads (model/network/attention.py attends).

The cache of one layer is a pair of tensors (K, V), each (num_blocks * block_size, n_kv, hd): a flat
array of token slots, where slot = block_id * block_size + offset. A sequence's block table lists its
blocks in order, so token position p lives in slot table[p // block_size] * block_size + p % block_size.

A step packs many sequences: sequence i brings query_lens[i] new tokens and, after the step, has
context_lens[i] tokens in the cache. Decode rows (one new token) are gathered for one batched call, prefill
chunks one sequence at a time; on a CPU where the native kernels load, every token is read by one C++ kernel
through the block tables instead (NativeRows).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from model.config import ModelConfig
from model.kernels import native
from model.kernels.decode import triton_available

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
