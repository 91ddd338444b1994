"""quantize_model: the decoder's projections to 4-bit codes and the head to 8-bit ones, on the native CPU
kernel where it builds (native_codes.py), else on torch's int4 kernel (int4.py). The loader quantizes a
block at a time as it reads them (quantize_block, then quantize_head), so the pieces are public."""
from __future__ import annotations

from torch import nn

from model.kernels import native
from model.quantization.int4 import Int4Linear, Int8Head
from model.quantization.native_codes import NativeQuantizedLinear, QuantizedEmbedding

QUANTIZATIONS = ("int4",)


def check_quantization(method: str, device_type: str) -> None:
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")
    if device_type != "cpu":
        raise ValueError("int4 weights run on CPU only (the int4 kernels here are CPU ones); "
                         "serve bfloat16 on a GPU")


def quantize_model(model: nn.Module, method: str, on_native: bool | None = None) -> nn.Module:
    """Swap every projection inside the decoder blocks, and the output head, for its quantized form (in
    place); on the native kernels the token embedding too (8-bit codes, read a row at a time). Quantize the
    float32 model: codes recovered from bfloat16-rounded weights can move by one.
    on_native: the native kernel's layers (None: where it builds) or torch's int4 ones."""
    check_quantization(method, next(model.parameters()).device.type)
    on_native = native.load() if on_native is None else on_native
    for block in model.layers:
        quantize_block(block, on_native)
    return quantize_head(model, on_native)


def quantize_block(block: nn.Module, on_native: bool) -> nn.Module:
    """A decoder block's projections (attention's and the FFN's nn.Linear children) as 4-bit codes."""
    projection = NativeQuantizedLinear.int4 if on_native else Int4Linear
    for parent in (block.attn, block.ffn):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, projection(child))
    return block


def quantize_head(model: nn.Module, on_native: bool) -> nn.Module:
    """The output head as 8-bit codes; on the native kernels the token embedding too, from the same codes
    where the two are tied (one quantization of the largest matrix, not two)."""
    if not on_native:
        model.lm_head = Int8Head(model.lm_head)
        return model
    tied = model.lm_head.weight is model.embed_tokens.weight
    model.lm_head = NativeQuantizedLinear.int8(model.lm_head)
    model.embed_tokens = QuantizedEmbedding(model.embed_tokens, model.lm_head if tied else None)
    return model
