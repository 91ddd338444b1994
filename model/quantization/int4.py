"""Weight-only int4 for CPU decoding: the transformer's projections as 4-bit codes, groups of 32.

Why: on a small CPU a decode step reads every weight once and is bound by memory bandwidth (a 2-core
EPYC VM streams ~10 GB/s: SmolLM2-135M in float32 is ~540 MB a token, in bfloat16 ~270 MB). 4-bit
codes cut the projections to an eighth of float32, and torch ships a CPU kernel for exactly this layout
(`_weight_int4pack_mm_for_cpu`, bfloat16 activations).

Each group of 32 input weights of an output row keeps a scale and a minimum: w = min + scale * q,
q in 0..15, which is GGUF's Q4_1 layout, so a Q4_1 file's weights come back exactly wherever a group
uses its lowest and highest codes (scales and minimums are then rounded to bfloat16). The embedding
stays in the model's dtype (a lookup reads one row a token).

The output head is a fifth of SmolLM2's weights and the largest single read of a batch-1 step. For
steps of up to HEAD_CODES_MAX_ROWS rows it uses 8-bit codes in groups of 32 with one scale each (GGUF's
Q8_0 layout, which is how the SmolLM2 file stores its tied embedding, so the codes are the file's own),
computed as two passes of the int4 kernel: code + 128 = 16 * high + low, two 4-bit halves whose scales
and zero points make the two products sum to scale * code. Measured on the 12 reference prompts decoded
one at a time: a batch-1 step 18.9 -> 16.0 ms, and as many identical continuations as the bfloat16 head
(3 of 12; 25.3 vs 24.8 tokens before the first divergence). From 5 rows on, the two passes cost more
than the bfloat16 matmul, which then runs on the (shared) bfloat16 weight.

The int4 kernel wins only while the step is bandwidth-bound. From ~64 tokens a step (prefill) it runs at
half the speed of a bfloat16 matmul (measured: 523 vs 912 prompt tok/s at 128 tokens), so each layer
also keeps its weights dequantized to bfloat16, the same values the kernel computes with, for those
steps. That costs 2 bytes a weight of memory (~220 MB for SmolLM2) to keep prefill at bfloat16 speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUP_SIZE = 32
DENSE_FROM_TOKENS = 64  # steps with at least this many tokens use the dequantized bfloat16 weights
HEAD_CODES_MAX_ROWS = 4  # the 8-bit head's two int4 passes beat one bfloat16 matmul up to here


def quantize_groups(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Round-to-nearest asymmetric 4-bit codes: (codes int32 (n, k), scale (n, k/g), minimum (n, k/g))."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
    codes = ((groups - low[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.int32)
    return codes.reshape(n, k), scale, low


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 kernel's operands for codes (n, k) in 0..15 and per-group scale and zero (n, k/g): it
    computes (code - 8) * scale + zero."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (k/g, n, 2)
    return packed, scales_and_zeros.to(torch.bfloat16)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                group_size: int = GROUP_SIZE) -> torch.Tensor:
    """x (bfloat16) @ the packed int4 weight's transpose, in bfloat16."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, scales_and_zeros)


def quantize_groups_int8(weight: torch.Tensor, group_size: int = GROUP_SIZE,
                         rows_at_once: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit codes as GGUF's Q8_0: (codes int8 (n, k) in -127..127, scale (n, k/g)). Computed
    rows_at_once rows at a time: the head is the largest matrix, and its float temporaries in one go
    would each be as large as its float32 weight (113 MB for SmolLM2's), at load time's peak."""
    n, k = weight.shape
    codes = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, k // group_size)
    for start in range(0, n, rows_at_once):
        groups = weight[start:start + rows_at_once].float().reshape(-1, k // group_size, group_size)
        part = scale[start:start + rows_at_once]
        torch.div(groups.abs().amax(-1), 127, out=part)
        safe = torch.where(part > 0, part, torch.ones_like(part))
        codes[start:start + rows_at_once] = (groups / safe[..., None]).round_().clamp_(-127, 127).reshape(-1, k)
    return codes, scale


class Int8Head(nn.Module):
    """The output head: 8-bit group codes as two int4 passes for small steps, the bfloat16 weight
    (shared with a tied embedding) for larger ones."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None or linear.weight.shape[1] % GROUP_SIZE:
            raise ValueError(f"the 8-bit head needs no bias and an input width divisible by {GROUP_SIZE}")
        self.weight = linear.weight
        codes, scale = quantize_groups_int8(linear.weight.detach())
        unsigned = codes.int() + 128  # 1..255 = 16 * high + low
        # scale * code = 16 * scale * (high - 8) + (scale * (low - 8) + 8 * scale)
        high = pack_int4(unsigned // 16, 16 * scale, torch.zeros_like(scale))
        low = pack_int4(unsigned % 16, scale, 8 * scale)
        self.register_buffer("high_packed", high[0])
        self.register_buffer("high_scales", high[1])
        self.register_buffer("low_packed", low[0])
        self.register_buffer("low_scales", low[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > HEAD_CODES_MAX_ROWS:
            return F.linear(x, self.weight)
        x16 = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
        y = int4_matmul(x16, self.high_packed, self.high_scales) + int4_matmul(x16, self.low_packed, self.low_scales)
        return y if y.dtype == x.dtype else y.to(x.dtype)


class Int4Linear(nn.Module):
    """A bias-optional Linear whose weight is int4 codes; computes in bfloat16 on CPU."""

    def __init__(self, linear: nn.Linear, group_size: int = GROUP_SIZE):
        super().__init__()
        n, k = linear.weight.shape
        if k % group_size:
            raise ValueError(f"int4 needs input widths divisible by {group_size}, got {k}")
        codes, scale, low = quantize_groups(linear.weight.detach(), group_size)
        self.group_size, self.in_features, self.out_features = group_size, k, n
        # w = minimum + scale * q = (q - 8) * scale + zero with zero = minimum + 8 * scale
        packed, scales_and_zeros = pack_int4(codes, scale, low + 8 * scale)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        scale_bf16, zero_bf16 = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (n, k/g) each
        dense = (codes.reshape(n, k // group_size, group_size) - 8) * scale_bf16[..., None] + zero_bf16[..., None]
        self.register_buffer("dense", dense.reshape(n, k).to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step makes ~120 of these calls: skip the conversions that would be no-ops.
        x16 = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
        if x16.shape[0] >= DENSE_FROM_TOKENS:
            y = F.linear(x16, self.dense, self.bias)
        else:
            y = int4_matmul(x16, self.packed, self.scales_and_zeros, self.group_size)
            if self.bias is not None:
                y = y + self.bias
        return y if y.dtype == x.dtype else y.to(x.dtype)
