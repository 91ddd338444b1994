"""Paged decode attention as Triton kernels: each row reads its K/V straight from the cache blocks.

The torch backend gathers every row's context into a padded copy before attending; on a GPU that copy
costs as much memory traffic as the attention itself and its shape changes every step, which rules out
CUDA graphs. These kernels walk the block table instead. One program handles one (row, KV head, split):
it loads the row's group of query heads once (GQA/MQA need no K/V expansion) and streams its share of
the context in tiles with an online softmax, so the launch shape depends only on the batch size and
the block table's width.

Splitting the context: a small batch gives the GPU a handful of programs (one row of an 8-KV-head model
is 8), each walking the whole context alone while most multiprocessors idle. So when rows x KV heads
is below the GPU's width, each row's context is cut into `splits` equal runs of tiles, attended in
parallel into partial results (unnormalised output, running max, denominator), which a second kernel
merges per (row, head). The number of splits follows from the batch size and the block table's width
only, both fixed in a captured CUDA graph; each program derives its run from the row's actual length,
and runs past the end of a short context are empty.

Triton is optional: `triton_available()` says whether the kernels run by default (a CUDA device with Triton).
With TRITON_INTERPRET=1 set before the first use, Triton's interpreter runs the same kernels on CPU
tensors when asked for explicitly; that is how the tests check them without a GPU.
"""
from __future__ import annotations

import functools

import torch

TILE = 32  # context positions per loop iteration
PROGRAMS_PER_MULTIPROCESSOR = 2  # splitting stops once rows x KV heads x splits fills the GPU this deep
MAX_SPLITS = 32  # the merge holds this many partial rows at once (a compile-time constant, so a split
# count that changes from step to step never compiles the merge again mid-serving)


@functools.cache
def import_triton():
    """(triton, triton.language), or None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels (these and model/kernels/fused.py) run by default on `device`."""
    return torch.device(device).type == "cuda" and import_triton() is not None


@functools.cache
def _kernels():
    return _build_kernels(*import_triton())


def _build_kernels(triton, tl):
    # The table's row stride is its width, which changes every eager step, and the split count changes
    # with it; specialising on either would compile the kernel again mid-serving.
    @triton.jit(do_not_specialize=["stride_table_row", "splits"])
    def paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, stats_ptr, tables_ptr, ctx_ptr,
                            stride_q_row, stride_q_head, stride_slot, stride_kv_head,
                            stride_table_row, stride_o_row, stride_o_head, scale, window, splits,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                            HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                            HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(ctx_ptr + row)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_PAD)
        head = kv_head * GROUP + g
        q_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
        q = tl.load(q_ptr + row * stride_q_row + head[:, None] * stride_q_head + d[None, :],
                    mask=q_mask, other=0.0).to(tl.float32) * scale
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        denom = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(ctx - window, 0)
        # This program's run of whole tiles; every tile holds at least one position in [lo, ctx), so no
        # row of scores is all -inf (an empty run leaves m = -inf, denom = 0, acc = 0).
        first_tile = lo // TILE
        tiles_each = tl.cdiv(tl.cdiv(ctx, TILE) - first_tile, splits)
        run_start = (first_tile + split * tiles_each) * TILE
        run_end = tl.minimum(run_start + tiles_each * TILE, ctx)
        for tile_start in range(run_start, run_end, TILE):
            pos = tile_start + tl.arange(0, TILE)
            valid = (pos >= lo) & (pos < ctx)
            block = tl.load(tables_ptr + row * stride_table_row + pos // BLOCK_SIZE, mask=valid, other=0)
            slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
            kv_offsets = slot[:, None] * stride_slot + kv_head * stride_kv_head + d[None, :]
            kv_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
            k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)  # (TILE, HEAD_PAD)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (GROUP_PAD, TILE)
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            rescale = tl.exp(m - m_new)
            v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
            acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            denom = denom * rescale + tl.sum(p, axis=1)
            m = m_new
        if SPLIT:
            # partials: (rows, heads, splits, HEAD_DIM) float32; stats: (2, rows, heads, splits)
            num_heads = tl.num_programs(1) * GROUP
            part = (row * num_heads + head) * splits + split
            tl.store(part_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=q_mask)
            stats_size = tl.num_programs(0) * num_heads * splits
            tl.store(stats_ptr + part, m, mask=g < GROUP)
            tl.store(stats_ptr + stats_size + part, denom, mask=g < GROUP)
        else:
            out = acc / denom[:, None]
            tl.store(out_ptr + row * stride_o_row + head[:, None] * stride_o_head + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=q_mask)

    @triton.jit(do_not_specialize=["splits"])
    def merge_splits_kernel(part_ptr, stats_ptr, out_ptr, stride_o_row, stride_o_head, splits,
                            HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, HEAD_PAD)
        part = (row * tl.num_programs(1) + head) * splits + s
        stats_size = tl.num_programs(0) * tl.num_programs(1) * splits
        m = tl.load(stats_ptr + part, mask=s < splits, other=float("-inf"))
        denom = tl.load(stats_ptr + stats_size + part, mask=s < splits, other=0.0)
        acc = tl.load(part_ptr + part[:, None] * HEAD_DIM + d[None, :],
                      mask=(s < splits)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        weight = tl.exp(m - tl.max(m, axis=0))  # empty runs (m = -inf) weigh 0; run 0 is never empty
        out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(denom * weight, axis=0)
        tl.store(out_ptr + row * stride_o_row + head * stride_o_head + d, out.to(out_ptr.dtype.element_ty),
                 mask=d < HEAD_DIM)

    return paged_decode_kernel, merge_splits_kernel


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's interpreter on CPU: small, so the tests split too


def choose_splits(rows: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Runs each row's context is cut into: enough programs to fill the GPU, at least a tile each.
    Depends only on the batch size and the table width, so a CUDA graph can fix it."""
    wanted = -(-PROGRAMS_PER_MULTIPROCESSOR * _multiprocessors(device) // (rows * num_kv_heads))
    return max(1, min(wanted, MAX_SPLITS, -(-max_context // TILE)))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                           scale: float, sliding_window: int | None, splits: int | None = None) -> torch.Tensor:
    """q: (B, nh, hd) one query per row (any strides but a contiguous head dimension); caches
    (slots, n_kv, hd); block_tables (B, width) int32; context_lens (B,) int32, each row's keys being
    positions [0, ctx) (or the last `window`). splits: None chooses. Returns (B, nh, hd) in q's dtype."""
    triton, _ = import_triton()
    kernel, merge = _kernels()
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    if k_cache.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError("paged_decode_attention needs the head dimension contiguous")
    if splits is None:
        splits = choose_splits(rows, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be in 1..{MAX_SPLITS}, got {splits}")
    out = torch.empty(rows, num_heads, head_dim, dtype=q.dtype, device=q.device)
    partials = stats = out  # unused unless split
    if splits > 1:
        partials = torch.empty(rows, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        stats = torch.empty(2, rows, num_heads, splits, dtype=torch.float32, device=q.device)
    head_pad = triton.next_power_of_2(head_dim)
    kernel[(rows, num_kv_heads, splits)](
        q, k_cache, v_cache, out, partials, stats, block_tables, context_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1), scale, sliding_window or 0, splits,
        GROUP=group, GROUP_PAD=max(2, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_PAD=head_pad, BLOCK_SIZE=block_size, TILE=TILE,
        HAS_WINDOW=sliding_window is not None, SPLIT=splits > 1)
    if splits > 1:
        merge[(rows, num_heads)](partials, stats, out, out.stride(0), out.stride(1), splits,
                                 HEAD_DIM=head_dim, HEAD_PAD=head_pad, SPLITS_PAD=MAX_SPLITS)
    return out
