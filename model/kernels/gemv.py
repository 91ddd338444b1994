"""Weight-bound matmuls of small decode batches as a Triton kernel (y = x W^T + b, up to 16 rows).

At batch 1 a decode step reads every weight once and does almost no arithmetic with it, so each
projection should run at the memory's bandwidth. cuBLAS reaches that on the large projections but not on
the small ones (a 1B Llama's q/k/v and o projections ran at 30-45% of an H200's bandwidth in
bench/gpu_profile.py, the up projection at 80%). Each program of this kernel owns BLOCK_N output columns
and, when the weight is split along K, one of `split` runs of its columns' inputs, streamed in
BLOCK_K-wide tiles (x padded to 16 rows so the product runs on tensor cores). Split runs write float32
partial sums that a second kernel adds up.

The kernel can also compute its input as it loads it, which saves the kernel (and the memory round
trip) that would otherwise produce it:
- SILU_MUL: x is [gate | up] and the input is SwiGLU's silu(gate) * up (the down projection);
- ADD_NORM: the input is RMSNorm(x + delta) * norm weight (the projection after a residual add and
  norm); every program computes the row's RMS over all of K, and the first column block also writes
  x + delta out, the residual stream the next add needs.
Each rounds as the unfused kernel in model/kernels/fused.py does. model/kernels/plan.py decides, by
measurement on the card, where any of this runs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from model.kernels.decode import import_triton

MAX_ROWS = 16  # rows per launch: x is padded to this many, the smallest tensor-core tile
REDUCE_BLOCK = 1024  # output columns per program of the split-K reduction
LINEAR, SILU_MUL, ADD_NORM = "linear", "silu_mul", "add_norm"  # what the kernel computes its input from


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split: int  # runs along K, summed by the reduction kernel when > 1
    num_warps: int = 4
    num_stages: int = 4

    def __str__(self) -> str:
        return f"N{self.block_n}xK{self.block_k}/split{self.split}/w{self.num_warps}s{self.num_stages}"


CANDIDATES = tuple(GemvConfig(n, k, s) for n, k, s in (
    (16, 256, 1), (32, 256, 1), (64, 128, 1), (16, 512, 1),
    (16, 256, 2), (32, 256, 2), (16, 256, 4), (32, 128, 4), (16, 256, 8), (16, 128, 8),
))


@functools.cache
def _kernels():
    return _build_kernels(*import_triton())


def _build_kernels(triton, tl):
    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, delta_ptr, norm_ptr, residual_ptr,
                    rows, n, k, stride_x, stride_delta, stride_w, k_per_split, eps,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    EXACT: tl.constexpr, PROLOGUE: tl.constexpr, HAS_DELTA: tl.constexpr):
        pid_n = tl.program_id(0)
        run = tl.program_id(1)
        m = tl.arange(0, 16)
        row_mask = m < rows
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n
        inv_rms = tl.zeros([16], tl.float32)
        if PROLOGUE == "add_norm":  # the row's RMS needs all of K, whatever share of it this program multiplies
            squares = tl.zeros([16], tl.float32)
            for k0 in range(0, k, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                mask = row_mask[:, None] & (kk < k)[None, :]
                r = tl.load(x_ptr + m[:, None] * stride_x + kk[None, :], mask=mask, other=0.0)
                if HAS_DELTA:  # the residual, rounded to x's dtype as the unfused add stores it
                    delta = tl.load(delta_ptr + m[:, None] * stride_delta + kk[None, :], mask=mask, other=0.0)
                    r = (r.to(tl.float32) + delta.to(tl.float32)).to(x_ptr.dtype.element_ty)
                r = r.to(tl.float32)
                squares += tl.sum(r * r, axis=1)
            inv_rms = tl.rsqrt(squares / k + eps)
        acc = tl.zeros([16, BLOCK_N], tl.float32)
        k_start = run * k_per_split
        k_end = tl.minimum(k_start + k_per_split, k)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_mask = kk < k_end
            x_mask = row_mask[:, None] & k_mask[None, :]
            x_at = x_ptr + m[:, None] * stride_x + kk[None, :]
            if PROLOGUE == "silu_mul":  # x is [gate | up]: SwiGLU's product, rounded as silu_and_mul stores it
                gate = tl.load(x_at, mask=x_mask, other=0.0).to(tl.float32)
                up = tl.load(x_at + k, mask=x_mask, other=0.0).to(tl.float32)
                x = (gate * tl.sigmoid(gate) * up).to(w_ptr.dtype.element_ty)
            elif PROLOGUE == "add_norm":  # RMSNorm(x + delta) * weight, rounded as fused.add_rms_norm stores it
                r = tl.load(x_at, mask=x_mask, other=0.0)
                if HAS_DELTA:
                    delta = tl.load(delta_ptr + m[:, None] * stride_delta + kk[None, :], mask=x_mask, other=0.0)
                    r = (r.to(tl.float32) + delta.to(tl.float32)).to(x_ptr.dtype.element_ty)
                    if pid_n == 0:  # the first column block writes the residual stream out
                        tl.store(residual_ptr + m[:, None] * k + kk[None, :], r, mask=x_mask)
                norm = tl.load(norm_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
                x = (r.to(tl.float32) * inv_rms[:, None] * norm[None, :]).to(w_ptr.dtype.element_ty)
            else:
                x = tl.load(x_at, mask=x_mask, other=0.0)
            w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + kk[None, :],
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            if EXACT:  # float32 weights: full-precision products, not TF32
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        out_mask = row_mask[:, None] & col_mask[None, :]
        if SPLIT:
            tl.store(part_ptr + (run * 16 + m[:, None]) * n + cols[None, :], acc, mask=out_mask)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + m[:, None] * n + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def reduce_kernel(part_ptr, bias_ptr, out_ptr, n, splits, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        total = tl.zeros([BLOCK], tl.float32)
        for run in range(0, splits):
            total += tl.load(part_ptr + (run * 16 + row) * n + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            total += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + cols, total.to(out_ptr.dtype.element_ty), mask=mask)

    return gemv_kernel, reduce_kernel


@dataclass(frozen=True)
class AddNorm:
    """The ADD_NORM prologue's inputs: x + delta (delta None: x alone) is normalised, times weight."""
    delta: torch.Tensor | None
    weight: torch.Tensor
    eps: float


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig,
         silu_mul: bool = False) -> torch.Tensor:
    """x (rows <= MAX_ROWS, K) @ weight (N, K)^T + bias, with one configuration of the kernel.
    silu_mul: x is (rows, 2K) laid out [gate | up] and the product silu(gate) * up is multiplied."""
    k = weight.shape[1]
    _check(x, weight, k, 2 * k if silu_mul else k)
    return _launch(x, weight, bias, config, SILU_MUL if silu_mul else LINEAR, k, None, None)


def add_norm_gemv(x: torch.Tensor, norm: AddNorm, weight: torch.Tensor, bias: torch.Tensor | None,
                  config: GemvConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta) * norm.weight @ weight^T + bias) in one kernel (plus the split-K
    reduction); x itself is the residual when norm.delta is None."""
    k = weight.shape[1]
    _check(x, weight, k, k)
    if norm.delta is not None and (norm.delta.shape != x.shape or norm.delta.stride(1) != 1):
        raise ValueError(f"delta must be shaped like x {tuple(x.shape)} with contiguous rows")
    residual = x if norm.delta is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    return residual, _launch(x, weight, bias, config, ADD_NORM, k, norm, residual)


def _check(x: torch.Tensor, weight: torch.Tensor, k: int, x_width: int) -> None:
    if x.shape[0] > MAX_ROWS or x.shape[1] != x_width or x.stride(1) != 1 \
            or weight.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError(f"gemv takes x (<= {MAX_ROWS}, {x_width}) and weight (N, {k}) of one dtype with "
                         f"contiguous rows, got {tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}")


def _launch(x, weight, bias, config: GemvConfig, prologue: str, k: int, norm: AddNorm | None,
            residual: torch.Tensor | None) -> torch.Tensor:
    gemv_kernel, reduce_kernel = _kernels()
    rows, n = x.shape[0], weight.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    k_per_split = -(-k // config.split)
    k_per_split = -(-k_per_split // config.block_k) * config.block_k  # whole tiles per run
    splits = -(-k // k_per_split)
    partial = torch.empty(splits, 16, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    delta = x if norm is None or norm.delta is None else norm.delta
    bias_or_any = weight if bias is None else bias  # an unused pointer still needs a tensor
    gemv_kernel[(-(-n // config.block_n), splits)](
        x, weight, bias_or_any, out, partial, delta, weight if norm is None else norm.weight,
        out if residual is None else residual, rows, n, k, x.stride(0), delta.stride(0), weight.stride(0),
        k_per_split, 0.0 if norm is None else norm.eps, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT=splits > 1, HAS_BIAS=bias is not None, EXACT=weight.dtype == torch.float32, PROLOGUE=prologue,
        HAS_DELTA=norm is not None and norm.delta is not None, num_warps=config.num_warps,
        num_stages=config.num_stages)
    if splits > 1:
        reduce_kernel[(rows, -(-n // REDUCE_BLOCK))](partial, bias_or_any, out, n, splits,
                                                     HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK)
    return out
