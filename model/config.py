"""ModelConfig: every architectural knob of the decoder-only Transformer, and named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from model.network.rope import RopeScaling

Activation = Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu_tanh"]  # the last two gated (gate * up)
Norm = Literal["layernorm", "rmsnorm"]
# pre: x + f(norm(x)) (Llama); post: norm(x + f(x)) (the 2017 paper); pre_post: x + norm'(f(norm(x)))
# (Gemma 2/3: norms before and after each sublayer); sublayer_post: x + norm(f(x)) (OLMo 2)
NormPlacement = Literal["pre", "post", "pre_post", "sublayer_post"]
PositionalEncoding = Literal["learned", "sinusoidal", "rope"]
QKNorm = Literal["none", "head", "projection"]  # RMSNorm on q and k: per head (Qwen3, Gemma 3), whole (OLMo 2)
GATED = ("swiglu", "geglu_tanh")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    head_dim: int = 0  # 0 means hidden_size // num_heads
    activation: Activation = "swiglu"
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-5
    norm_placement: NormPlacement = "pre"
    positional_encoding: PositionalEncoding = "rope"
    rope_theta: float = 10000.0
    max_position: int = 2048
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # which layers use sliding_window (Gemma's interleaving); (): all
    rope_local_theta: float | None = None  # the RoPE base of sliding layers, unscaled (Gemma 3); None: as global
    attention_bias: bool = False  # q, k and v biases (and o's, unless attention_out_bias says otherwise)
    attention_out_bias: bool | None = None  # None: as attention_bias (Qwen2 has q/k/v biases but no o bias)
    qk_norm: QKNorm = "none"  # before RoPE
    attention_scale: float | None = None  # on q.k; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attention_softcap: float | None = None  # cap * tanh(score / cap) on attention scores (Gemma 2)
    logit_softcap: float | None = None  # the same on the output logits (Gemma 2)
    rope_scaling: RopeScaling | None = None  # linear, llama3 or yarn (model/network/rope.py)
    mlp_bias: bool = False
    tie_embeddings: bool = True
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(hidden_size), as the 2017 paper does
    name: str = "custom"
    architecture: str = "llama"  # the checkpoint family it was read as (GGUF general.architecture, HF model_type)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.attention_out_bias is None:
            object.__setattr__(self, "attention_out_bias", self.attention_bias)
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "ffn_hidden_size", "head_dim", "max_position")
        for field in positive:
            if getattr(self, field) <= 0:
                raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.positional_encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be positive, got {self.sliding_window}")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"ModelConfig.sliding_layers names {len(self.sliding_layers)} layers, "
                             f"the model has {self.num_layers}")
        for field in ("attention_scale", "attention_softcap", "logit_softcap", "rope_local_theta"):
            if getattr(self, field) is not None and getattr(self, field) <= 0:
                raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
        choices = {"activation": Activation, "norm": Norm, "norm_placement": NormPlacement,
                   "positional_encoding": PositionalEncoding, "qk_norm": QKNorm}
        for field, kind in choices.items():
            if getattr(self, field) not in kind.__args__:
                raise ValueError(f"ModelConfig.{field} must be one of {kind.__args__}, "
                                 f"got {getattr(self, field)!r}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def gated(self) -> bool:
        """The feed-forward's up projection also computes a gate (SwiGLU, GeGLU)."""
        return self.activation in GATED

    @property
    def has_final_norm(self) -> bool:
        """Every placement but the 2017 post-norm (whose blocks already end in a norm) needs a final one."""
        return self.norm_placement != "post"

    @property
    def block_norms(self) -> tuple[str, ...]:
        """One block's norms by canonical name: before attention and the feed-forward (attn_norm, ffn_norm)
        and on their outputs (attn_post_norm, ffn_post_norm), as the placement has them."""
        return {"pre_post": ("attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm"),
                "sublayer_post": ("attn_post_norm", "ffn_post_norm")}.get(self.norm_placement,
                                                                          ("attn_norm", "ffn_norm"))

    @property
    def query_scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer: None where it attends its whole context."""
        if self.sliding_layers and not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Every weight, bias and norm parameter, a tied output head counted once."""
        d, f = self.hidden_size, self.ffn_hidden_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        n_in = 2 if self.gated else 1
        norm = d * (2 if self.norm == "layernorm" else 1)
        per_layer = d * (q + 2 * kv) + q * d + n_in * d * f + f * d + len(self.block_norms) * norm
        if self.attention_bias:
            per_layer += q + 2 * kv
        if self.attention_out_bias:
            per_layer += d
        if self.qk_norm == "head":
            per_layer += 2 * self.head_dim
        elif self.qk_norm == "projection":
            per_layer += q + kv
        if self.mlp_bias:
            per_layer += n_in * f + d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        if self.positional_encoding == "learned":
            embed += self.max_position * d
        final_norm = norm if self.has_final_norm else 0
        return self.num_layers * per_layer + embed + final_norm


def _gpt2(name: str, hidden: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(
        name=name, vocab_size=50257, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, ffn_hidden_size=4 * hidden, activation="gelu_tanh", norm="layernorm",
        positional_encoding="learned", max_position=1024, attention_bias=True, mlp_bias=True,
        tie_embeddings=True, architecture="gpt2")


PRESETS: dict[str, ModelConfig] = {
    "gpt2": _gpt2("gpt2", 768, 12, 12),
    "gpt2-medium": _gpt2("gpt2-medium", 1024, 24, 16),
    "gpt2-large": _gpt2("gpt2-large", 1280, 36, 20),
    "gpt2-xl": _gpt2("gpt2-xl", 1600, 48, 25),
    # Llama 3.2 1B's shape: the 1B-parameter GQA model the GPU benchmarks use.
    "llama-1b": ModelConfig(
        name="llama-1b", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
        num_kv_heads=8, ffn_hidden_size=8192, rope_theta=500000.0, max_position=8192),
    "llama-7b": ModelConfig(
        name="llama-7b", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=32, ffn_hidden_size=11008, max_position=4096, tie_embeddings=False),
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
        num_kv_heads=3, ffn_hidden_size=1536, rope_theta=100000.0, max_position=8192),
    # "Attention Is All You Need" (2017), base model, as a decoder only.
    "transformer-2017": ModelConfig(
        name="transformer-2017", vocab_size=37000, hidden_size=512, num_layers=6, num_heads=8,
        num_kv_heads=8, ffn_hidden_size=2048, activation="relu", norm="layernorm",
        norm_placement="post", positional_encoding="sinusoidal", max_position=4096,
        attention_bias=True, mlp_bias=True, scale_embeddings=True, architecture="transformer"),
    # Mistral 7B's shape: GQA with a sliding attention window.
    "mistral-7b": ModelConfig(
        name="mistral-7b", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, ffn_hidden_size=14336, max_position=32768, sliding_window=4096,
        tie_embeddings=False, architecture="mistral"),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, optionally with fields changed (e.g. a tiny copy for tests)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def tiny(name: str, **overrides) -> ModelConfig:
    """A few-layer, narrow copy of a preset that keeps its architecture: for tests and CPU checks."""
    base = preset(name)
    heads, kv_heads = 4, (4 if base.num_kv_heads == base.num_heads else 2)
    small = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=heads, num_kv_heads=kv_heads,
                 head_dim=16, ffn_hidden_size=128, max_position=512, name=f"tiny-{name}")
    if base.sliding_window is not None:
        small["sliding_window"] = 8
    small.update(overrides)
    return base.replace(**small)
