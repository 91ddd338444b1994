"""Weight-bound matmuls of small decode batches as a Triton kernel, chosen per shape by measurement.

At batch 1 a decode step reads every weight once and does almost no arithmetic with it, so each
projection should run at the memory's bandwidth. cuBLAS reaches that on the large projections but not on
the small ones (a 1B Llama's q/k/v and o projections ran at 30-45% of an H200's bandwidth in
bench/gpu_profile.py, the up projection at 80%). This kernel computes y = x W^T (+ b) for up to
MAX_ROWS rows: each program owns BLOCK_N output columns and, when the weight is split along K, one of
`split` runs of its columns' inputs, streamed in BLOCK_K-wide tiles (x padded to 16 rows so the product
runs on tensor cores). Split runs write float32 partial sums that a second kernel adds up.

Which configuration is fastest, and whether any beats cuBLAS, depends on the card and the shape, so
`tune()` times them on the device at start-up (the CUDA graphs call it before capturing each batch size):
replayed from a CUDA graph, as a step runs them, over every weight of the same shape in turn, as a step
reads them (one weight alone would sit in L2 and flatter every candidate). `linear()` then uses the winner
for that (shape, rows); anything not tuned, or where cuBLAS won, goes to F.linear, so the kernel only runs
where it measured faster. The choices are kept per process, like Triton's own autotuning cache.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import triton_fused
from model.triton_decode import import_triton

log = logging.getLogger("kvserve.gemv")

MAX_ROWS = 16  # rows per launch: x is padded to this many, the smallest tensor-core tile
REDUCE_BLOCK = 1024  # output columns per program of the split-K reduction


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

_plans: dict[tuple, GemvConfig | None] = {}  # (device, N, K, dtype, bias, rows, silu_mul) -> winner or None


@functools.cache
def _kernels():
    return _build_kernels(*import_triton())


def _build_kernels(triton, tl):
    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, rows, n, k, stride_x, stride_w, k_per_split,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    EXACT: tl.constexpr, SILU_MUL: tl.constexpr):
        pid_n = tl.program_id(0)
        run = tl.program_id(1)
        m = tl.arange(0, 16)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n
        acc = tl.zeros([16, BLOCK_N], tl.float32)
        k_start = run * k_per_split
        k_end = tl.minimum(k_start + k_per_split, k)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_mask = kk < k_end
            x_at = x_ptr + m[:, None] * stride_x + kk[None, :]
            x_mask = (m < rows)[:, None] & k_mask[None, :]
            if SILU_MUL:  # x is [gate | up]: SwiGLU's product, rounded as triton_fused.silu_and_mul stores it
                gate = tl.load(x_at, mask=x_mask, other=0.0).to(tl.float32)
                up = tl.load(x_at + k, mask=x_mask, other=0.0).to(tl.float32)
                x = (gate * tl.sigmoid(gate) * up).to(w_ptr.dtype.element_ty)
            else:
                x = tl.load(x_at, mask=x_mask, other=0.0)
            w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + kk[None, :],
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            if EXACT:  # float32 weights: full-precision products, not TF32
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        out_mask = (m < rows)[:, None] & col_mask[None, :]
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


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig,
         silu_mul: bool = False) -> torch.Tensor:
    """x (rows <= MAX_ROWS, K) @ weight (N, K)^T + bias, with one configuration of the kernel.
    silu_mul: x is (rows, 2K) laid out [gate | up] and the product silu(gate) * up is multiplied."""
    rows, k = x.shape[0], x.shape[1] // 2 if silu_mul else x.shape[1]
    n = weight.shape[0]
    if rows > MAX_ROWS or weight.shape[1] != k or x.shape[1] != (2 * k if silu_mul else k) \
            or x.stride(1) != 1 or weight.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError(f"gemv takes x (<= {MAX_ROWS}, K{' x 2' if silu_mul else ''}) and weight (N, K) of one "
                         f"dtype with contiguous rows, got {tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} "
                         f"{weight.dtype}")
    gemv_kernel, reduce_kernel = _kernels()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    k_per_split = -(-k // config.split)
    k_per_split = -(-k_per_split // config.block_k) * config.block_k  # whole tiles per run
    splits = -(-k // k_per_split)
    partial = torch.empty(splits, 16, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    gemv_kernel[(-(-n // config.block_n), splits)](
        x, weight, weight if bias is None else bias, out, partial, rows, n, k, x.stride(0), weight.stride(0),
        k_per_split, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT=splits > 1, HAS_BIAS=bias is not None,
        EXACT=weight.dtype == torch.float32, SILU_MUL=silu_mul, num_warps=config.num_warps,
        num_stages=config.num_stages)
    if splits > 1:
        reduce_kernel[(rows, -(-n // REDUCE_BLOCK))](partial, weight if bias is None else bias, out, n, splits,
                                                     HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK)
    return out


def _plan_key(weight: torch.Tensor, bias: torch.Tensor | None, rows: int, silu_mul: bool) -> tuple:
    return (weight.device, *weight.shape, weight.dtype, bias is not None, rows, silu_mul)


def _planned(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool) -> GemvConfig | None:
    if x.shape[0] > MAX_ROWS or x.stride(1) != 1 or x.dtype != weight.dtype:
        return None
    return _plans.get(_plan_key(weight, bias, x.shape[0], silu_mul))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, or the kernel where tune() found one faster for this shape and row count."""
    config = _planned(x, weight, bias, False)
    return F.linear(x, weight, bias) if config is None else gemv(x, weight, bias, config)


def silu_mul_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """linear(silu(gate) * up) for h (T, 2K) laid out [gate | up]: one kernel where tune() found that
    faster than the product's own kernel followed by linear()."""
    config = _planned(h, weight, bias, True)
    if config is None:
        return linear(triton_fused.silu_and_mul(h), weight, bias)
    return gemv(h, weight, bias, config, silu_mul=True)


def set_plan(weight: torch.Tensor, bias: torch.Tensor | None, rows: int, config: GemvConfig | None,
             silu_mul: bool = False) -> None:
    """Make linear() (silu_mul: silu_mul_linear()) use `config` (None: the unfused path) for this weight's
    shape, dtype and bias at `rows` rows."""
    _plans[_plan_key(weight, bias, rows, silu_mul)] = config


@dataclass
class TuneResult:
    shape: tuple[int, int]
    rows: int
    silu_mul: bool  # the down projection with SwiGLU's product fused in (against product kernel + linear())
    unfused_us: float  # per weight, reading each in turn: cuBLAS (silu_mul: the product's kernel, then linear())
    best: GemvConfig | None  # None: the unfused path stays
    best_us: float
    weight_bytes: int


def _replay_time(run, repeats: int) -> float:
    """Median microseconds of `run` replayed from a CUDA graph, as a decode step runs it (launched one by
    one from Python, a Triton kernel's launch costs more host time than the kernel takes on the device)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compiles, and lets cuBLAS pick its kernel, before capturing
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def tune(weights: list[tuple[torch.Tensor, torch.Tensor | None]], rows: int, silu_mul: bool = False,
         repeats: int = 5) -> TuneResult:
    """Time the unfused path and every candidate on `rows` rows over `weights` (all of one shape, dtype and
    bias presence), record the fastest for linear() (silu_mul: for silu_mul_linear()), and say what was
    measured. CUDA only; not while capturing. For silu_mul, tune the plain projection first: the unfused
    path it competes with is the product's kernel followed by linear()."""
    weight = weights[0][0]
    x = torch.randn(rows, weight.shape[1] * (2 if silu_mul else 1), dtype=weight.dtype, device=weight.device)
    if silu_mul:
        unfused = _replay_time(lambda: [linear(triton_fused.silu_and_mul(x), w, b) for w, b in weights], repeats)
    else:
        unfused = _replay_time(lambda: [F.linear(x, w, b) for w, b in weights], repeats)
    best, best_us = None, unfused / len(weights)
    for config in CANDIDATES:
        if config.split > 1 and weight.shape[1] < 2 * config.block_k:
            continue
        try:
            took = _replay_time(lambda: [gemv(x, w, b, config, silu_mul) for w, b in weights], repeats) / len(weights)
        except Exception as exc:  # e.g. a configuration this card cannot compile: the others still compete
            log.warning("GEMV %s on %s x %d rows failed, left out: %s", config, tuple(weight.shape), rows, exc)
            continue
        if took < best_us:
            best, best_us = config, took
    set_plan(weight, weights[0][1], rows, best, silu_mul)
    return TuneResult(tuple(weight.shape), rows, silu_mul, unfused / len(weights), best, best_us,
                      weight.numel() * weight.element_size())


def tune_model(model: torch.nn.Module, row_counts: list[int]) -> list[TuneResult]:
    """tune() every shape of the model's nn.Linear layers for each row count up to MAX_ROWS, then the
    down projections of SwiGLU feed-forwards with the product fused in."""
    plain: dict[tuple, list] = {}
    fused: dict[tuple, list] = {}
    for module in model.modules():
        for linear_module, groups in ((module, plain), (getattr(module, "down_proj", None), fused)):
            if groups is fused and getattr(module, "activation", None) != "swiglu":
                continue
            if type(linear_module) is torch.nn.Linear:
                w, b = linear_module.weight, linear_module.bias
                groups.setdefault((*w.shape, w.dtype, b is not None), []).append((w, b))
    rows = [r for r in sorted(set(row_counts)) if r <= MAX_ROWS]
    with torch.inference_mode():
        return [tune(weights, r, silu_mul) for silu_mul, groups in ((False, plain), (True, fused))
                for weights in groups.values() for r in rows]
