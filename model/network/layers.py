"""Building blocks of the decoder: norms, positional encodings, attention, feed-forward, block."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.kernels.fused import add_rms_norm, rope_store_kv, silu_and_mul
from model.kernels.gemv import ADD_NORM, SILU_MUL, AddNorm
from model.kernels.plan import KernelPlan
from model.network.attention import (AttentionMetadata, KVCache, attend_cached, native_rotary_attention,
                                     paged_attention, uncached_attention)
from model.network.rope import RopeScaling, inverse_frequencies, inverse_frequencies_at


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel instead of six elementwise ops (bitwise equal in fp32).
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


def add_and_norm(norm: nn.Module, x: torch.Tensor, delta: torch.Tensor | None,
                 kernels: KernelPlan | None, native: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after adding a sublayer's output (delta None: x as it is), and its
    normalised copy; one Triton kernel for RMSNorm on the Triton path (`kernels` given), one native CPU op
    on the native path (`native`: the step's attention metadata is the native kernel's)."""
    if kernels is not None and isinstance(norm, RMSNorm):
        return add_rms_norm(x, delta, norm.weight, norm.eps)
    if native and isinstance(norm, RMSNorm):
        return torch.ops.kvserve.add_rms_norm(x, delta, norm.weight, norm.eps)
    if delta is not None:
        x = x + delta
    return x, norm(x)


def project(layer: nn.Module, x: torch.Tensor, kernels: KernelPlan | None) -> torch.Tensor:
    """layer(x); on the Triton path a plain nn.Linear goes through the KernelPlan, which runs the Triton
    GEMV where start-up timing found it faster than cuBLAS for this shape and row count."""
    if kernels is not None and type(layer) is nn.Linear:
        return kernels.linear(x, layer.weight, layer.bias)
    return layer(x)


def norm_project(norm: nn.Module, x: torch.Tensor, delta: torch.Tensor | None, layer: nn.Module,
                 kernels: KernelPlan | None, native: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, layer(norm(x + delta))); on the Triton path an RMSNorm before a plain nn.Linear can be
    one kernel (the KernelPlan's, where start-up timing found that faster)."""
    if kernels is not None and isinstance(norm, RMSNorm) and type(layer) is nn.Linear:
        return kernels.add_norm_linear(x, AddNorm(delta, norm.weight, norm.eps), layer.weight, layer.bias)
    x, h = add_and_norm(norm, x, delta, kernels, native)
    return x, project(layer, h, kernels)


def sinusoidal_table(max_position: int, dim: int) -> torch.Tensor:
    """The 2017 paper's fixed encoding: sin on even channels, cos on odd ones."""
    position = torch.arange(max_position, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_position, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)[:, : dim // 2]
    return table.float()


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE in the half-split layout (Hugging Face's rotate_half convention), with the
    config's frequency scaling (rope.py)."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: RopeScaling | None = None):
        super().__init__()
        self.head_dim, self.max_position, self.theta, self.scaling = head_dim, max_position, theta, scaling
        self.register_buffer("cos", torch.empty(max_position, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_position, head_dim), persistent=False)
        self.reset()

    def reset(self) -> None:
        if self.cos.is_meta:
            return
        inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling)
        cos, sin = self._rotations(torch.arange(self.max_position, dtype=torch.float64)[:, None] * inv_freq[None, :])
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def _rotations(self, angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, hd / 2) float64 angles -> (N, hd) cos and sin, the halves repeated, times the scaling's magnitude."""
        angles = torch.cat([angles, angles], dim=-1)
        magnitude = self.scaling.magnitude if self.scaling is not None else 1.0
        return angles.cos() * magnitude, angles.sin() * magnitude

    @property
    def length_dependent(self) -> bool:
        """The frequencies depend on the sequence's length (dynamic NTK, longrope): forward needs lengths."""
        return self.scaling is not None and self.scaling.length_dependent

    def forward(self, positions: torch.Tensor, dtype: torch.dtype,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 1, hd) cos and sin, once per forward and shared by every layer. lengths: (T,) the length of
        each token's sequence at this step, for the length-dependent scalings (rope.py)."""
        if not self.length_dependent:
            return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]
        inv_freq = inverse_frequencies_at(self.head_dim, self.theta, self.scaling, lengths.cpu())
        cos, sin = self._rotations(positions.cpu().to(torch.float64)[:, None] * inv_freq)
        return cos.to(positions.device, dtype)[:, None, :], sin.to(positions.device, dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (T, heads, hd)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Masked multi-head self-attention (MHA, GQA or MQA) with one fused QKV projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        hd = config.head_dim
        self.q_size = config.num_heads * hd
        self.kv_size = config.num_kv_heads * hd
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.attention_out_bias)
        per_head = config.qk_norm == "head"
        self.q_norm = self.k_norm = None
        if config.qk_norm != "none":
            self.q_norm = RMSNorm(hd if per_head else self.q_size, config.norm_eps)
            self.k_norm = RMSNorm(hd if per_head else self.kv_size, config.norm_eps)
        self.scale = config.query_scale
        self.softcap = config.attention_softcap

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                meta: AttentionMetadata, kv_cache: KVCache | None, kernels: KernelPlan | None) -> torch.Tensor:
        return self.attend(project(self.qkv_proj, x, kernels), rope, meta, kv_cache, kernels)

    def attend(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
               meta: AttentionMetadata, kv_cache: KVCache | None, kernels: KernelPlan | None) -> torch.Tensor:
        """From the fused QKV projection's output (T, (nh + 2 n_kv) * hd) through the output projection."""
        cfg = self.config
        if self.q_norm is not None:
            qkv = self._norm_qk(qkv)
        if meta.triton_attention and self.softcap is not None:
            raise ValueError("the Triton attention kernels do not soft-cap scores: build the metadata with "
                             "triton_attention=False")
        if meta.native is not None and kv_cache is not None:
            out = native_rotary_attention(qkv, rope, meta, kv_cache, self.scale, cfg.num_heads, self.softcap)
        elif meta.triton_attention and rope is not None and kv_cache is not None:
            q, k, v = rope_store_kv(qkv, *rope, meta.slot_mapping, kv_cache, cfg.num_heads, cfg.num_kv_heads,
                                    cfg.head_dim)
            out = attend_cached(q, k, v, kv_cache, meta, self.scale)
        else:
            out = self._attend_torch(qkv, rope, meta, kv_cache)
        return project(self.o_proj, out.reshape(-1, self.q_size), kernels)

    def _norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """q and k through their RMSNorms, before RoPE: each head's (Qwen3, Gemma 3) or each whole
        projection's (OLMo 2); v as it is."""
        cfg = self.config
        q, k = qkv[:, : self.q_size], qkv[:, self.q_size: self.q_size + self.kv_size]
        if cfg.qk_norm == "head":
            q, k = q.reshape(-1, cfg.num_heads, cfg.head_dim), k.reshape(-1, cfg.num_kv_heads, cfg.head_dim)
        return torch.cat([self.q_norm(q).flatten(1), self.k_norm(k).flatten(1), qkv[:, self.q_size + self.kv_size:]],
                         dim=1)

    def _attend_torch(self, qkv, rope, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        cfg = self.config
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # Q and K heads rotated in one pass
        q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads:]  # (T, nh, hd), (T, n_kv, hd)
        v = qkv[:, self.q_size + self.kv_size:].view(-1, cfg.num_kv_heads, cfg.head_dim)
        if kv_cache is None:
            return uncached_attention(q, k, v, meta, self.scale, self.softcap)
        return paged_attention(q, k, v, kv_cache, meta, self.scale, self.softcap)


class FeedForward(nn.Module):
    """Position-wise feed-forward; SwiGLU keeps gate and up in one fused projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.activation
        n_in = 2 if config.gated else 1
        self.up_proj = nn.Linear(config.hidden_size, n_in * config.ffn_hidden_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, kernels: KernelPlan | None = None) -> torch.Tensor:
        return self.down(project(self.up_proj, x, kernels), kernels)

    def down(self, h: torch.Tensor, kernels: KernelPlan | None, native: bool = False) -> torch.Tensor:
        """The activation of the up projection's output h, through the down projection."""
        if self.activation == "swiglu" and kernels is not None and type(self.down_proj) is nn.Linear:
            return kernels.silu_mul_linear(h, self.down_proj.weight, self.down_proj.bias)
        if self.activation == "swiglu" and kernels is not None:
            h = silu_and_mul(h)
        elif self.activation == "swiglu" and native:
            h = torch.ops.kvserve.silu_mul(h)
        elif self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "geglu_tanh":
            gate, up = h.chunk(2, dim=-1)
            h = F.gelu(gate, approximate="tanh") * up
        elif self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.relu(h)
        return project(self.down_proj, h, kernels)


def _maybe_norm(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


class DecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.placement = config.norm_placement
        self.attn = Attention(config)
        self.ffn = FeedForward(config)
        # The norms the placement has (ModelConfig.block_norms); the others stay None.
        self.attn_norm = self.ffn_norm = self.attn_post_norm = self.ffn_post_norm = None
        for name in config.block_norms:
            setattr(self, name, make_norm(config))

    def forward(self, x, pending, rope, meta: AttentionMetadata, kv_cache, kernels: KernelPlan | None):
        """Returns (residual stream, pending): a pre-norm block leaves its feed-forward output for the
        next norm to add (one fused add+norm kernel on GPU); the other placements' output is final."""
        if self.placement == "pre":
            native = meta.native is not None
            x, qkv = norm_project(self.attn_norm, x, pending, self.attn.qkv_proj, kernels, native)
            attended = self.attn.attend(qkv, rope, meta, kv_cache, kernels)
            x, up = norm_project(self.ffn_norm, x, attended, self.ffn.up_proj, kernels, native)
            return x, self.ffn.down(up, kernels, native)
        if self.placement == "post":
            x = self.attn_norm(x + self.attn(x, rope, meta, kv_cache, kernels))
            return self.ffn_norm(x + self.ffn(x, kernels)), None
        # pre_post and sublayer_post: a norm on each sublayer's output, and before it where there is one.
        x = x + self.attn_post_norm(self.attn(_maybe_norm(self.attn_norm, x), rope, meta, kv_cache, kernels))
        return x + self.ffn_post_norm(self.ffn(_maybe_norm(self.ffn_norm, x), kernels)), None

    def fused_projections(self) -> list[tuple[str, nn.Module]]:
        """(kind, projection) pairs whose input model/kernels/gemv.py can compute as it loads it."""
        sites = []
        if self.placement == "pre" and isinstance(self.attn_norm, RMSNorm):
            sites += [(ADD_NORM, self.attn.qkv_proj), (ADD_NORM, self.ffn.up_proj)]
        if self.ffn.activation == "swiglu":
            sites.append((SILU_MUL, self.ffn.down_proj))
        return sites
