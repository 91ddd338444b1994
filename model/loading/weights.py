"""The canonical weight layout every loader produces, strict checks on it, and fusing into our modules.

Loaders name tensors the same way whatever the file format ("layers.3.attn.q.weight", ...), with
Q, K, V and the SwiGLU gate/up kept apart; `fuse` then joins them into the fused projections the
model runs with. One place checks that exactly the expected tensors arrived, with the right shapes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from model.config import ModelConfig


class LoadError(ValueError):
    """A model file that cannot be loaded; the message names the file, tensor or field at fault."""


class LazyWeights(Mapping):
    """Canonical float32 tensors read from a model file when asked for, and again each time they are.

    Why: build_model takes them a block at a time and quantizes or casts each block before it reads the
    next, so loading holds one block's float32 weights, not the whole model's (SmolLM2 from its GGUF: a
    peak of 1193 MB before, when every tensor was dequantized first). Each name maps to the file tensor it
    comes from, its shape, and what turns that file tensor (as float32, in our layout) into it: a piece of
    a fused matrix, rows reordered. The last file tensor read is kept, since the pieces of one fused
    matrix are asked for one after another."""

    def __init__(self, read: Callable[[str], torch.Tensor]):
        self._read = read
        self._sources: dict[str, tuple[str, tuple[int, ...], Callable[[torch.Tensor], torch.Tensor] | None]] = {}
        self._last: tuple[str | None, torch.Tensor | None] = (None, None)

    def add(self, name: str, key: str, shape: tuple[int, ...],
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self._sources[name] = (key, tuple(shape), transform)

    def add_pieces(self, names: list[str], key: str, shape: tuple[int, ...], rows: list[int]) -> None:
        """A fused file matrix (GPT-2's and Phi-3's qkv, Phi-3's gate_up) as our separate tensors: each
        name takes the next `rows` rows."""
        start = 0
        for name, count in zip(names, rows):
            self.add(name, key, (count, *shape[1:]), lambda w, a=start, n=count: w[a:a + n].contiguous())
            start += count

    def shape(self, name: str) -> tuple[int, ...]:
        return self._sources[name][1]

    def __getitem__(self, name: str) -> torch.Tensor:
        key, _, transform = self._sources[name]
        if self._last[0] != key:
            self._last = (None, None)  # let the previous tensor go before the next one is read
            self._last = (key, self._read(key))
        tensor = self._last[1]
        return tensor if transform is None else transform(tensor)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def shape_of(weights: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A tensor's shape without reading it from the file, where the weights are lazy."""
    return weights.shape(name) if isinstance(weights, LazyWeights) else tuple(weights[name].shape)


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


def check_weights(weights: Mapping[str, torch.Tensor], config: ModelConfig, source: str) -> None:
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
        if shape_of(weights, name) != shape:
            raise LoadError(f"{source}: tensor {name!r} has shape {shape_of(weights, name)}, "
                            f"expected {shape}")


_BLOCK_RENAMES = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_post_norm": "attn_post_norm",
                  "ffn_post_norm": "ffn_post_norm", "attn.o": "attn.o_proj", "ffn.down": "ffn.down_proj",
                  "attn.q_norm": "attn.q_norm", "attn.k_norm": "attn.k_norm"}
_GLOBAL_TENSORS = ("embed_tokens.weight", "embed_positions.weight", "final_norm.weight", "final_norm.bias",
                   "lm_head.weight")


def global_state(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Transformer's state_dict entries outside its blocks: embeddings, final norm, and the head where
    it is not tied to the embedding (check_weights has made sure which are there)."""
    return {name: weights[name] for name in _GLOBAL_TENSORS if name in weights}


def block_state(weights: Mapping[str, torch.Tensor], config: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    """Block i's state_dict (names relative to the block): canonical tensors with Q, K, V fused into one
    projection, and the SwiGLU gate and up into another."""
    p = f"layers.{i}"
    state: dict[str, torch.Tensor] = {}
    parts = ["gate", "up"] if config.gated else ["up"]
    for kind in ("weight", "bias"):
        for old, new in _BLOCK_RENAMES.items():
            if f"{p}.{old}.{kind}" in weights:
                state[f"{new}.{kind}"] = weights[f"{p}.{old}.{kind}"]
        if f"{p}.attn.q.{kind}" in weights:
            state[f"attn.qkv_proj.{kind}"] = torch.cat([weights[f"{p}.attn.{x}.{kind}"] for x in "qkv"])
        if f"{p}.ffn.up.{kind}" in weights:
            state[f"ffn.up_proj.{kind}"] = torch.cat([weights[f"{p}.ffn.{x}.{kind}"] for x in parts])
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
