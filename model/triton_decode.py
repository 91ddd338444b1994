"""Paged decode attention as one Triton kernel: each row reads its K/V straight from the cache blocks.

The torch backend gathers every row's context into a padded copy before attending; on a GPU that copy
costs as much memory traffic as the attention itself and its shape changes every step, which rules out
CUDA graphs. This kernel walks the block table instead. One program handles one (row, KV head): it loads
the row's group of query heads once (GQA/MQA need no K/V expansion) and streams the context in tiles
with an online softmax, so its launch shape depends only on the batch size.

Triton is optional: `available()` says whether the kernel runs by default (a CUDA device with Triton).
With TRITON_INTERPRET=1 set before the first use, Triton's interpreter runs the same kernel on CPU
tensors when asked for explicitly; that is how the tests check it without a GPU.
"""
from __future__ import annotations

import functools

import torch

TILE = 32  # context positions per loop iteration


@functools.cache
def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl, _build_kernel(triton, tl)


def available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and _triton() is not None


def _build_kernel(triton, tl):
    # The table's row stride is its width, which changes every eager step; specialising on it would
    # compile the kernel again mid-serving.
    @triton.jit(do_not_specialize=["stride_table_row"])
    def paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, ctx_ptr,
                            stride_q_row, stride_q_head, stride_slot, stride_kv_head,
                            stride_table_row, stride_o_row, stride_o_head, scale, window,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                            HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                            HAS_WINDOW: tl.constexpr):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
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
        # Every tile holds at least one position in [lo, ctx), so no row of scores is all -inf.
        for tile_start in range((lo // TILE) * TILE, ctx, TILE):
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
        out = acc / denom[:, None]
        tl.store(out_ptr + row * stride_o_row + head[:, None] * stride_o_head + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)

    return paged_decode_kernel


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                           scale: float, sliding_window: int | None) -> torch.Tensor:
    """q: (B, nh, hd) one query per row; caches (slots, n_kv, hd); block_tables (B, width) int32;
    context_lens (B,) int32, each row's keys being positions [0, ctx) (or the last `window`).
    Returns (B, nh, hd) in q's dtype."""
    triton, _, kernel = _triton()
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    if k_cache.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError("paged_decode_attention needs the head dimension contiguous")
    out = torch.empty_like(q)
    kernel[(rows, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1), scale, sliding_window or 0,
        GROUP=group, GROUP_PAD=max(2, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size, TILE=TILE,
        HAS_WINDOW=sliding_window is not None)
    return out
