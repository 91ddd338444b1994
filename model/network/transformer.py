"""The decoder-only Transformer: packed token ids + attention metadata + KV cache -> logits."""
from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.kernels.gemv import ADD_NORM
from model.kernels.plan import KernelPlan
from model.network.attention import AttentionMetadata, KVCache
from model.network.layers import (DecoderBlock, RMSNorm, RotaryEmbedding, make_norm, norm_project, project,
                                  sinusoidal_table)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # An empty table, not a random one: every loader assigns the real weights, and a random one built on
        # the meta device (as build_model does) imports torch._dynamo and triton, ~70 MB resident, for nothing.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.embed_positions = None
        self.rotary = None
        if config.positional_encoding == "learned":
            self.embed_positions = nn.Embedding(config.max_position, config.hidden_size)
        elif config.positional_encoding == "sinusoidal":
            self.register_buffer("sinusoid", torch.empty(config.max_position, config.hidden_size),
                                 persistent=False)
        else:
            self.rotary = RotaryEmbedding(config.head_dim, config.max_position, config.rope_theta, config.rope_scaling)
        # Gemma 3's sliding layers rotate with a base of their own, unscaled.
        self.rotary_local = None
        if self.rotary is not None and config.rope_local_theta is not None:
            self.rotary_local = RotaryEmbedding(config.head_dim, config.max_position, config.rope_local_theta)
        self.reset_buffers()
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_layers))
        self.final_norm = make_norm(config) if config.has_final_norm else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_buffers(self) -> None:
        """(Re)compute the fixed position tables, e.g. after building the model on the meta device."""
        if self.rotary is not None:
            self.rotary.reset()
            if self.rotary_local is not None:
                self.rotary_local.reset()
        elif self.embed_positions is None and not self.sinusoid.is_meta:
            self.sinusoid.copy_(sinusoidal_table(self.config.max_position, self.config.hidden_size))

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache] | None = None,
                logits_index: torch.Tensor | None = None, kernels: KernelPlan | None = None) -> torch.Tensor:
        """input_ids: (T,) packed tokens of every sequence; positions come from meta.

        kv_caches=None attends each sequence to its own new tokens only (no cache, the reference).
        kernels=None runs plain torch ops (the CPU path, and the reference); a KernelPlan runs the Triton
        fusions and the projections it tuned (attention's own kernels follow meta.triton_attention).
        Returns logits (N, vocab) at logits_index, by default each sequence's last new token.
        """
        positions = meta.positions
        if meta.sliding_window != self.config.sliding_window:
            raise ValueError(f"attention metadata was built for sliding_window={meta.sliding_window}, "
                             f"the model has {self.config.sliding_window}")
        if max(meta.context_lens) > self.config.max_position:
            raise ValueError(f"context of {max(meta.context_lens)} tokens is beyond the model's "
                             f"max_position {self.config.max_position}")
        x = self.embed_tokens(input_ids)  # (T, d)
        if self.config.scale_embeddings:
            x = x * self.config.hidden_size ** 0.5
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        elif self.rotary is None:
            x = x + self.sinusoid[positions].to(x.dtype)
        rope = None
        if self.rotary is not None:
            lengths = None
            if self.rotary.length_dependent:  # each token's sequence length at this step
                lengths = torch.repeat_interleave(torch.tensor(meta.context_lens), torch.tensor(meta.query_lens))
            rope = self.rotary(positions, x.dtype, lengths)
        rope_local = self.rotary_local(positions, x.dtype) if self.rotary_local is not None else rope
        pending = None  # a pre-norm block's last output, added by the next norm
        for i, layer in enumerate(self.layers):
            window = self.config.layer_window(i)
            x, pending = layer(x, pending, rope if window is None else rope_local, meta.for_window(window),
                               None if kv_caches is None else kv_caches[i], kernels)
        rows = meta.logits_index if logits_index is None else logits_index
        x = x[rows]
        if self.final_norm is None:
            logits = project(self.lm_head, x, kernels).float()
        else:
            logits = norm_project(self.final_norm, x, None if pending is None else pending[rows], self.lm_head,
                                  kernels, meta.native is not None)[1].float()
        cap = self.config.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def fused_projections(self) -> list[tuple[str, nn.Module]]:
        """(kind, projection) pairs whose input model/kernels/gemv.py can compute as it loads it, for
        KernelPlan.tune_model()."""
        sites = [site for layer in self.layers for site in layer.fused_projections()]
        if isinstance(self.final_norm, RMSNorm):
            sites.append((ADD_NORM, self.lm_head))
        return sites
