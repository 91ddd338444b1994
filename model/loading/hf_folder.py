"""Read a Hugging Face model folder (config.json + *.safetensors): ModelConfig and canonical tensors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from model.config import ModelConfig
from model.loading.weights import LazyWeights, LoadError
from model.network.rope import rope_scaling_from_hf

LLAMA_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3"}
GEMMA_TYPES = {"gemma2", "gemma3_text"}  # norms stored as w - 1: their RMSNorm scales by 1 + w
DECODER_TYPES = LLAMA_TYPES | GEMMA_TYPES | {"olmo2"}  # the Llama-like layout, with the knobs below
# Buffers some checkpoints carry that are recomputed, never loaded.
# Anchored at a dot: GPT-2's real QKV bias "attn.c_attn.bias" also ends in "attn.bias".
_IGNORED = re.compile(r"(?:^|\.)(rotary_emb\.inv_freq|attn\.masked_bias|attn\.bias)$")

# A Gemma 3 checkpoint with its vision tower (Gemma3ForConditionalGeneration: the 4B, 12B and 27B models)
# holds the text model under a prefix; kvserve serves the text model and leaves the rest unread.
_MULTIMODAL_TEXT = re.compile(r"^(?:language_model\.|model\.language_model\.)")
_MULTIMODAL_SKIPPED = re.compile(r"^(?:model\.)?(?:vision_tower|multi_modal_projector)\.")
# Gemma3TextConfig's defaults, for the fields the published multimodal configs leave out of text_config.
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
    query_pre_attn_scalar=256, sliding_window=4096, rope_local_base_freq=10000.0,
    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)

_LLAMA_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
                "self_attn.o_proj": "attn.o", "mlp.gate_proj": "ffn.gate", "mlp.up_proj": "ffn.up",
                "mlp.down_proj": "ffn.down", "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",
                # Phi-3 stores q, k, v as one matrix and gate, up as another: split on load.
                "self_attn.qkv_proj": "attn.qkv", "mlp.gate_up_proj": "ffn.gate_up"}
# Gemma 2/3 and OLMo 2 norm each sublayer's output; "post_attention_layernorm" is that norm there, not the
# feed-forward's input norm it is in Llama.
_POST_NORM_LAYER = _LLAMA_LAYER | {"post_attention_layernorm": "attn_post_norm", "pre_feedforward_layernorm": "ffn_norm",
                                   "post_feedforward_layernorm": "ffn_post_norm"}
_GPT2_LAYER = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn.qkv",
               "attn.c_proj": "attn.o", "mlp.c_fc": "ffn.up", "mlp.c_proj": "ffn.down"}
_GLOBALS = {"model.embed_tokens": "embed_tokens", "model.norm": "final_norm", "lm_head": "lm_head",
            "wte": "embed_tokens", "wpe": "embed_positions", "ln_f": "final_norm"}


def read_hf_config(folder: Path) -> tuple[ModelConfig, dict]:
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path}: cannot read config: {exc}") from exc
    kind = raw.get("model_type")
    if kind in ("gemma3", "gemma3_text"):  # the text model's fields, defaults filled in as transformers does
        raw = GEMMA3_TEXT_DEFAULTS | (raw.get("text_config") or {} if kind == "gemma3" else raw)
        kind = raw["model_type"] = "gemma3_text"
    try:
        if kind == "gpt2":
            return ModelConfig(
                vocab_size=raw["vocab_size"], hidden_size=raw["n_embd"], num_layers=raw["n_layer"],
                num_heads=raw["n_head"], num_kv_heads=raw["n_head"],
                ffn_hidden_size=raw.get("n_inner") or 4 * raw["n_embd"], activation="gelu_tanh",
                norm="layernorm", norm_eps=raw.get("layer_norm_epsilon", 1e-5),
                positional_encoding="learned", max_position=raw["n_positions"], attention_bias=True,
                mlp_bias=True, tie_embeddings=raw.get("tie_word_embeddings", True), name=folder.name, architecture=kind), raw
        if kind in DECODER_TYPES:
            return ModelConfig(**_decoder_options(raw, kind, path), **_family_options(raw, kind),
                               name=folder.name, architecture=kind), raw
    except KeyError as exc:
        raise LoadError(f"{path}: missing field {exc.args[0]!r}") from exc
    except ValueError as exc:  # a setting kvserve does not support, e.g. a RoPE scaling
        raise LoadError(f"{path}: {exc}") from exc
    raise LoadError(f"{path}: unsupported model_type {kind!r} (supported: gpt2, {', '.join(sorted(DECODER_TYPES))})")


def _decoder_options(raw: dict, kind: str, path: Path) -> dict:
    """The ModelConfig fields every Llama-like config.json names the same way."""
    heads = raw["num_attention_heads"]
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise LoadError(f"{path}: partial_rotary_factor {raw['partial_rotary_factor']} is not supported "
                        "(RoPE over the whole head only)")
    # Qwen2 has biases on q, k and v but not on o; the others' attention_bias covers all four.
    qkv_bias = raw.get("attention_bias", kind == "qwen2")
    max_position = raw["max_position_embeddings"]
    scaling = rope_scaling_from_hf(raw.get("rope_scaling"), max_position, raw.get("original_max_position_embeddings"))
    if scaling is not None and scaling.kind == "dynamic":
        max_position = int(max_position * scaling.factor)  # the context dynamic NTK stretches to
    return dict(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_layers=raw["num_hidden_layers"],
        num_heads=heads, num_kv_heads=raw.get("num_key_value_heads") or heads, head_dim=raw.get("head_dim") or 0,
        ffn_hidden_size=raw["intermediate_size"], norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=raw.get("rope_theta", 10000.0), max_position=max_position,
        sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window", True) else None,
        attention_bias=qkv_bias, attention_out_bias=qkv_bias and kind != "qwen2",
        rope_scaling=scaling,
        mlp_bias=raw.get("mlp_bias", False), tie_embeddings=raw.get("tie_word_embeddings", kind in GEMMA_TYPES))


def _family_options(raw: dict, kind: str) -> dict:
    """What sets a family apart from Llama, as its config.json says it."""
    if kind == "qwen3":
        return dict(qk_norm="head")
    if kind == "olmo2":
        return dict(norm_placement="sublayer_post", qk_norm="projection")
    if kind not in GEMMA_TYPES:
        return {}
    activation = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"hidden_activation {activation!r} is not supported (gelu_pytorch_tanh)")
    pattern = 2 if kind == "gemma2" else raw.get("sliding_window_pattern", 6)  # transformers' defaults
    layer_types = raw.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(raw["num_hidden_layers"])]
    return dict(
        activation="geglu_tanh", norm_placement="pre_post", scale_embeddings=True,
        qk_norm="head" if kind == "gemma3_text" else "none",
        attention_scale=raw.get("query_pre_attn_scalar", 256) ** -0.5,
        attention_softcap=raw.get("attn_logit_softcapping"), logit_softcap=raw.get("final_logit_softcapping"),
        sliding_layers=tuple(t == "sliding_attention" for t in layer_types),
        rope_local_theta=raw.get("rope_local_base_freq", 10000.0) if kind == "gemma3_text" else None)


def canonical_name(name: str, source: str, architecture: str = "llama") -> str | None:
    """Our canonical name for a checkpoint tensor, or None for a buffer that is never loaded."""
    name = name.removeprefix("transformer.")
    if architecture == "gemma3_text":
        if _MULTIMODAL_SKIPPED.match(name):
            return None
        name = _MULTIMODAL_TEXT.sub("", name)
        name = name if name.startswith(("model.", "lm_head.")) else f"model.{name}"
    base, _, kind = name.rpartition(".")
    if _IGNORED.search(name):
        return None
    match = re.match(r"^(?:model\.layers|h)\.(\d+)\.(.+)$", base)
    if match:
        table = _GPT2_LAYER if not base.startswith("model.") else \
            _POST_NORM_LAYER if architecture in GEMMA_TYPES | {"olmo2"} else _LLAMA_LAYER
        if match.group(2) in table:
            return f"layers.{match.group(1)}.{table[match.group(2)]}.{kind}"
    elif base in _GLOBALS:
        return f"{_GLOBALS[base]}.{kind}"
    raise LoadError(f"{source}: unexpected tensor {name!r}")


def hf_weights(folder: Path, config: ModelConfig) -> LazyWeights:
    """The folder's tensors in the canonical layout, as float32 when read (LazyWeights says why)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{folder}: no *.safetensors files")
    file_of: dict[str, Path] = {}
    weights = LazyWeights(lambda raw_name: _read(file_of[raw_name], raw_name, config))
    for file in files:
        with safe_open(str(file), framework="pt") as opened:
            shapes = {raw_name: tuple(opened.get_slice(raw_name).get_shape()) for raw_name in opened.keys()}
        for raw_name, shape in shapes.items():
            name = canonical_name(raw_name, str(file), config.architecture)
            if name is None or (name == "lm_head.weight" and config.tie_embeddings):
                continue  # some tied checkpoints still store the shared matrix
            file_of[raw_name] = file
            if _is_conv1d(raw_name, shape):
                shape = shape[::-1]
            if ".attn.qkv." in name:  # GPT-2's and Phi-3's Q, K and V in one matrix
                q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
                weights.add_pieces([name.replace(".qkv.", f".{part}.") for part in "qkv"], raw_name, shape,
                                   [q, kv, kv])
            elif ".ffn.gate_up." in name:  # Phi-3's gate and up in one, gate first
                weights.add_pieces([name.replace(".gate_up.", f".{part}.") for part in ("gate", "up")],
                                   raw_name, shape, [shape[0] // 2] * 2)
            else:
                weights.add(name, raw_name, shape)
    return weights


def _is_conv1d(raw_name: str, shape: tuple[int, ...]) -> bool:
    """GPT-2's Conv1D layers store their matrices as (in, out)."""
    return raw_name.removeprefix("transformer.").startswith("h.") and len(shape) == 2


def _read(file: Path, raw_name: str, config: ModelConfig) -> torch.Tensor:
    """One checkpoint tensor as float32 in our layout (not yet split, if it is a fused matrix)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as opened:
        tensor = opened.get_tensor(raw_name).float()
    if config.architecture in GEMMA_TYPES and raw_name.endswith("norm.weight"):
        tensor = tensor + 1  # the 1 + w Gemma's RMSNorm scales by, so that ours computes the same
    if _is_conv1d(raw_name, tuple(tensor.shape)):
        tensor = tensor.t()
    return tensor.contiguous()
