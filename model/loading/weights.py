"""The canonical weight layout every loader produces, strict checks on it, and fusing into our modules.

Loaders name tensors the same way whatever the file format ("layers.3.attn.q.weight", ...), with
Q, K, V and the SwiGLU gate/up kept apart; `fuse` then joins them into the fused projections the
model runs with. One place checks that exactly the expected tensors arrived, with the right shapes.
"""
from __future__ import annotations

import torch

from model.config import ModelConfig


class LoadError(ValueError):
    """A model file that cannot be loaded; the message names the file, tensor or field at fault."""


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, hd, f = config.hidden_size, config.head_dim, config.ffn_hidden_size
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config.vocab_size, d)}
    if config.positional_encoding == "learned":
        shapes["embed_positions.weight"] = (config.max_position, d)
    norm_bias = config.norm == "layernorm"

    def linear(name: str, out_dim: int, in_dim: int, bias: bool) -> None:
        shapes[f"{name}.weight"] = (out_dim, in_dim)
        if bias:
            shapes[f"{name}.bias"] = (out_dim,)

    def norm(name: str) -> None:
        shapes[f"{name}.weight"] = (d,)
        if norm_bias:
            shapes[f"{name}.bias"] = (d,)

    for i in range(config.num_layers):
        p = f"layers.{i}"
        for name in config.block_norms:
            norm(f"{p}.{name}")
        linear(f"{p}.attn.q", q, d, config.attention_bias)
        linear(f"{p}.attn.k", kv, d, config.attention_bias)
        linear(f"{p}.attn.v", kv, d, config.attention_bias)
        linear(f"{p}.attn.o", d, q, config.attention_out_bias)
        if config.qk_norm != "none":
            per_head = config.qk_norm == "head"
            shapes[f"{p}.attn.q_norm.weight"] = (hd,) if per_head else (q,)
            shapes[f"{p}.attn.k_norm.weight"] = (hd,) if per_head else (kv,)
        if config.gated:
            linear(f"{p}.ffn.gate", f, d, config.mlp_bias)
        linear(f"{p}.ffn.up", f, d, config.mlp_bias)
        linear(f"{p}.ffn.down", d, f, config.mlp_bias)
    if config.has_final_norm:
        norm("final_norm")
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def check_weights(weights: dict[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Exactly the expected tensors, each with its expected shape, or one error naming the first fault."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        raise LoadError(f"{source}: missing tensor {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise LoadError(f"{source}: unexpected tensor {extra[0]!r}"
                        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise LoadError(f"{source}: tensor {name!r} has shape {tuple(weights[name].shape)}, "
                            f"expected {shape}")


def fuse(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical tensors -> the Transformer's state_dict (fused QKV and gate/up, module paths)."""
    renames = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_post_norm": "attn_post_norm",
               "ffn_post_norm": "ffn_post_norm", "attn.o": "attn.o_proj", "ffn.down": "ffn.down_proj",
               "attn.q_norm": "attn.q_norm", "attn.k_norm": "attn.k_norm"}
    state: dict[str, torch.Tensor] = {}
    for name in ("embed_tokens.weight", "embed_positions.weight", "final_norm.weight",
                 "final_norm.bias", "lm_head.weight"):
        if name in weights:
            state[name] = weights[name]
    for i in range(config.num_layers):
        p = f"layers.{i}"
        for kind in ("weight", "bias"):
            for old, new in renames.items():
                if f"{p}.{old}.{kind}" in weights:
                    state[f"{p}.{new}.{kind}"] = weights[f"{p}.{old}.{kind}"]
            if f"{p}.attn.q.{kind}" in weights:
                state[f"{p}.attn.qkv_proj.{kind}"] = torch.cat(
                    [weights[f"{p}.attn.{x}.{kind}"] for x in "qkv"])
            parts = ["gate", "up"] if config.gated else ["up"]
            if f"{p}.ffn.up.{kind}" in weights:
                state[f"{p}.ffn.up_proj.{kind}"] = torch.cat([weights[f"{p}.ffn.{x}.{kind}"] for x in parts])
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """GPT-2-style initialisation: N(0, 0.02) matrices, unit norms, zero biases (small noise on both
    so that a wrong norm or bias path cannot hide behind the identity)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 2:
            weights[name] = torch.randn(shape, generator=gen) * 0.02
        elif name.endswith(".weight"):
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            weights[name] = 0.02 * torch.randn(shape, generator=gen)
    return weights
