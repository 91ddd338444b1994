"""Fused Triton kernels for the small elementwise work around a layer's matmuls.

At batch 1 on a GPU a decoder layer is four weight-bound matmuls and, between them, some fifteen
kernels of a few microseconds each (residual add, RMSNorm, RoPE's slicing, negation, concatenation,
multiplications and add, two K/V cache writes, SiLU and the gate product). Their launches and memory
round trips cost about as much as the weights' reads. Three kernels do the same work here:

- add_rms_norm: residual add and RMSNorm in one pass (the residual kept in the model's dtype, the
  norm computed in float32 from it, as torch does);
- rope_store_kv: rotate Q and K (half-split RoPE) straight out of the fused QKV projection and write
  K and V into their cache slots;
- silu_and_mul: SwiGLU's silu(gate) * up.

rope_store_kv is attention's, used with model/kernels/decode.py's kernels (AttentionMetadata.triton_attention);
the other two run where the forward is given a KernelPlan (model/kernels/plan.py). The torch code in
model/network/layers.py is the reference they are tested against, in Triton's interpreter on CPU.
"""
from __future__ import annotations

import functools

import torch

from model.kernels.decode import import_triton

SILU_BLOCK = 1024  # columns of the gate per program


@functools.cache
def _kernels():
    return _build_kernels(*import_triton())


def _build_kernels(triton, tl):
    @triton.jit
    def add_rms_norm_kernel(x_ptr, delta_ptr, weight_ptr, residual_ptr, out_ptr, stride_x, stride_delta,
                            hidden, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_DELTA:
            delta = tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0)
            # Rounded to the stream's dtype before the norm reads it, as the unfused add would be.
            x = (x.to(tl.float32) + delta.to(tl.float32)).to(residual_ptr.dtype.element_ty)
            tl.store(residual_ptr + row * hidden + cols, x, mask=mask)
        x = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * hidden + cols, (x * inv_rms * weight).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def rope_store_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, slots_ptr, q_ptr, k_ptr, k_cache_ptr, v_cache_ptr,
                             stride_qkv, stride_rope, stride_slot, stride_cache_head,
                             NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                             HALF_PAD: tl.constexpr):
        token = tl.program_id(0)
        head = tl.program_id(1)  # query heads first, then KV heads
        half = HEAD_DIM // 2  # a compile-time constant, as HEAD_DIM is
        i = tl.arange(0, HALF_PAD)
        mask = i < half
        src = qkv_ptr + token * stride_qkv + head * HEAD_DIM
        x1 = tl.load(src + i, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half + i, mask=mask, other=0.0).to(tl.float32)
        rope = token * stride_rope
        cos1 = tl.load(cos_ptr + rope + i, mask=mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + rope + half + i, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + rope + i, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + rope + half + i, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * cos1 - x2 * sin1
        out2 = x2 * cos2 + x1 * sin2
        if head < NUM_HEADS:
            dst = q_ptr + (token * NUM_HEADS + head) * HEAD_DIM
            tl.store(dst + i, out1.to(q_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + half + i, out2.to(q_ptr.dtype.element_ty), mask=mask)
        else:
            kv_head = head - NUM_HEADS
            dst = k_ptr + (token * NUM_KV_HEADS + kv_head) * HEAD_DIM
            tl.store(dst + i, out1.to(k_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + half + i, out2.to(k_ptr.dtype.element_ty), mask=mask)
            slot = tl.load(slots_ptr + token).to(tl.int64)
            cache = slot * stride_slot + kv_head * stride_cache_head
            tl.store(k_cache_ptr + cache + i, out1.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(k_cache_ptr + cache + half + i, out2.to(k_cache_ptr.dtype.element_ty), mask=mask)
            v_src = src + NUM_KV_HEADS * HEAD_DIM  # V heads follow the K heads in the projection
            v1 = tl.load(v_src + i, mask=mask, other=0.0)
            v2 = tl.load(v_src + half + i, mask=mask, other=0.0)
            tl.store(v_cache_ptr + cache + i, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_cache_ptr + cache + half + i, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def silu_and_mul_kernel(h_ptr, out_ptr, stride_h, width, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        gate = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + width + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * width + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    return add_rms_norm_kernel, rope_store_kv_kernel, silu_and_mul_kernel


def _rows_contiguous(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name} must be 2-D with contiguous rows, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * weight) for x, delta (T, hidden); delta None: no add, and x
    itself is returned as the residual."""
    triton, _ = import_triton()
    tokens, hidden = x.shape
    _rows_contiguous(x, "x")
    residual = x if delta is None else torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    if delta is not None:
        _rows_contiguous(delta, "delta")
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(hidden)
    if tokens:
        _kernels()[0][(tokens,)](x, x if delta is None else delta, weight, residual, out, x.stride(0),
                                 x.stride(0) if delta is None else delta.stride(0), hidden, eps,
                                 HAS_DELTA=delta is not None, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return residual, out


def rope_store_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                  kv_cache: tuple[torch.Tensor, torch.Tensor], num_heads: int, num_kv_heads: int,
                  head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the fused projection qkv (T, (nh + 2 n_kv) * hd) and cos/sin (T, hd) of each token's
    position: Q and K rotated, (T, nh, hd) and (T, n_kv, hd), and V as a view of qkv; rotated K and V
    are also written to the cache at slot_mapping (T,)."""
    triton, _ = import_triton()
    _rows_contiguous(qkv, "qkv")
    tokens = qkv.shape[0]
    k_cache, v_cache = kv_cache
    cos, sin = cos.reshape(tokens, head_dim), sin.reshape(tokens, head_dim)
    if cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError("cos and sin must share one row-contiguous layout")
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(tokens, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens:
        _kernels()[1][(tokens, num_heads + num_kv_heads)](
            qkv, cos, sin, slot_mapping, q, k, k_cache, v_cache, qkv.stride(0), cos.stride(0),
            k_cache.stride(0), k_cache.stride(1), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim, HALF_PAD=triton.next_power_of_2(head_dim // 2))
    v = qkv[:, (num_heads + num_kv_heads) * head_dim:].view(tokens, num_kv_heads, head_dim)
    return q, k, v


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h (T, 2F) laid out [gate | up]: (T, F)."""
    _rows_contiguous(h, "h")
    tokens, width = h.shape[0], h.shape[1] // 2
    out = torch.empty(tokens, width, dtype=h.dtype, device=h.device)
    if tokens:
        _kernels()[2][(tokens, -(-width // SILU_BLOCK))](h, out, h.stride(0), width, BLOCK=SILU_BLOCK)
    return out
