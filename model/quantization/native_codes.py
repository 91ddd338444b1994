"""Weight-only 4-bit projections and an 8-bit head on the native CPU kernel (model/kernels/cpu/qmatmul.cpp).

The codes are int4.py's (GGUF's Q4_1 layout for the projections, Q8_0 for the head, so a GGUF file's own
codes come back); the arithmetic is integer dot products as in llama.cpp (AVX-512 VNNI), with activations
quantized to 16 bits per group of 32 (llama.cpp uses 8). One kernel serves every row count, prefill and
decode alike, with one reduction order per output element, so a token's result does not depend on what shares its step; and no dequantized
bfloat16 copy of the weights is kept for prefill (int4.py's torch path needs one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.quantization.int4 import GROUP_SIZE, quantize_groups, quantize_groups_int8

COLUMNS = 16  # output columns per block of the kernel's layout


def pack_columns(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                 bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """codes (n, k), 0..15 for 4 bits, -127..127 for 8, w = scale * code + offset per group of 32 -> the
    kernel's (codes, scale, offset): columns in blocks of 16 (the last padded with zero columns), inputs in
    pairs, scale and offset as float16 (GGUF's own precision for them), see qmatmul.cpp for the order."""
    n, k = codes.shape
    groups, pad = k // GROUP_SIZE, -n % COLUMNS
    codes, scale = F.pad(codes, (0, 0, 0, pad)), F.pad(scale.float(), (0, 0, 0, pad))
    blocks = (n + pad) // COLUMNS
    c = codes.to(torch.int8).view(torch.uint8).reshape(blocks, COLUMNS, groups, GROUP_SIZE)
    if bits == 4:  # input 16 * half + 2 * q + j of a group: half 0 in the low nibble, half 1 in the high one
        c = c.reshape(blocks, COLUMNS, groups, 2, 8, 2).permute(0, 2, 3, 4, 1, 5)  # (blk, g, half, q, col, j)
        c = c[:, :, 0] | (c[:, :, 1] << 4)
    else:  # input 2 * p + j of a group
        c = c.reshape(blocks, COLUMNS, groups, 16, 2).permute(0, 2, 3, 1, 4)  # (blk, g, p, col, j)
    def by_block(t: torch.Tensor) -> torch.Tensor:
        return t.half().reshape(blocks, COLUMNS, groups).transpose(1, 2).contiguous()
    offset = None if offset is None else by_block(F.pad(offset.float(), (0, 0, 0, pad)))
    return c.reshape(blocks, groups, -1).contiguous(), by_block(scale), offset


class NativeQuantizedLinear(nn.Module):
    """A bias-optional Linear as group codes, computed by torch.ops.kvserve.quantized_matmul."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.bits, (self.out_features, self.in_features) = bits, codes.shape
        packed, scale, offset = pack_columns(codes, scale, offset, bits)
        self.register_buffer("codes", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        # The kernel's operands as one plain attribute: a decode step calls ~120 of these layers, and each
        # buffer read through nn.Module.__getattr__ costs more than the call's own Python.
        self.operands = (self.codes, self.scale, self.offset, self.bias, bits, self.out_features)

    @classmethod
    def int4(cls, linear: nn.Linear) -> NativeQuantizedLinear:
        """Q4_1: w = minimum + scale * q, q in 0..15."""
        _check_width(linear)
        codes, scale, low = quantize_groups(linear.weight.detach())
        return cls(codes, scale, low, 4, linear.bias)

    @classmethod
    def int8(cls, linear: nn.Linear) -> NativeQuantizedLinear:
        """Q8_0: w = scale * c, c in -127..127."""
        _check_width(linear)
        codes, scale = quantize_groups_int8(linear.weight.detach())
        return cls(codes, scale, None, 8, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        return torch.ops.kvserve.quantized_matmul(x.contiguous(), *self.operands)

    def _apply(self, fn, recurse=True):
        # The codes and float32 scales are the kernel's operands on the CPU: model.to(dtype) or .to(device)
        # must not convert them (the model is quantized in float32, then cast to its serving dtype).
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class QuantizedEmbedding(nn.Module):
    """A token embedding as 8-bit group codes (Q8_0, as SmolLM2's file stores its token_embd, so its own
    codes): a lookup dequantizes only the rows it reads, and the table takes a quarter of float32's memory.
    The codes are kept in the 8-bit head's kernel layout (pack_columns), so that a tied embedding reads the
    head's own codes and scales instead of a second copy (27 MB for SmolLM2). The rows come out in the
    model's dtype (that of the empty `like` buffer, which model.to() converts)."""

    def __init__(self, embedding: nn.Embedding, head: NativeQuantizedLinear | None = None):
        super().__init__()
        if head is None:
            head = NativeQuantizedLinear(*quantize_groups_int8(embedding.weight.detach()), None, 8)
        if head.bits != 8 or (head.out_features, head.in_features) != tuple(embedding.weight.shape):
            raise ValueError("the embedding can share only a tied 8-bit head's codes")
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.register_buffer("codes", head.codes)  # (blocks, groups, 512), shared with the head when tied
        self.register_buffer("scale", head.scale)  # float16 (blocks, groups, 16)
        self.register_buffer("like", torch.empty(0, dtype=embedding.weight.dtype), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Token t is column t % 16 of block t // 16; byte 2 * c + j of run p is column c's input 2 * p + j.
        blocks, groups = self.scale.shape[:2]
        block, column = ids // COLUMNS, ids % COLUMNS
        codes = self.codes.view(torch.int8).view(blocks, groups, 16, COLUMNS, 2)[block, :, :, column, :]
        rows = codes.float().view(*ids.shape, groups, GROUP_SIZE) * self.scale[block, :, column].float()[..., None]
        return rows.view(*ids.shape, self.embedding_dim).to(self.like.dtype)

    def _apply(self, fn, recurse=True):
        self.like = fn(self.like)  # the codes stay as they are, as NativeQuantizedLinear's do
        return self


def _check_width(linear: nn.Linear) -> None:
    if linear.weight.shape[1] % GROUP_SIZE:
        raise ValueError(f"quantized weights need input widths divisible by {GROUP_SIZE}, "
                         f"got {linear.weight.shape[1]}")
