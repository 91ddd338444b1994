"""Test helpers that write tiny model files the way the real tools lay them out.

GGUF files follow llama.cpp's converter (convert_hf_to_gguf.py): its tensor names, its metadata keys,
GGUF's innermost-first shapes (GGUFWriter reverses numpy's shape for us), and its reordering of Q/K
rows for RoPE, so a loader that forgot to undo that reordering would produce wrong logits.
Hugging Face folders follow transformers' checkpoint names, with GPT-2's Conv1D weights stored (in, out).

The tables here are written from those formats' documentation, not derived from model/, so a
wrong name in the loader cannot hide behind the same wrong name in the test.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from model.config import ModelConfig

QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

# canonical per-layer name -> llama.cpp per-layer name (blk.N.<name>)
_LLAMA_LAYER = {"attn_norm": "attn_norm", "attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v",
                "attn.o": "attn_output", "ffn_norm": "ffn_norm", "ffn.gate": "ffn_gate",
                "ffn.up": "ffn_up", "ffn.down": "ffn_down"}
_GLOBAL = {"embed_tokens": "token_embd", "embed_positions": "position_embd",
           "final_norm": "output_norm", "lm_head": "output"}


def encode(array: np.ndarray, qtype: str) -> tuple[np.ndarray, Q | None]:
    """A float array as GGUF stores it: (data, raw_dtype); raw_dtype None lets GGUFWriter infer it."""
    if qtype == "F32":
        return array.astype(np.float32), None
    if qtype == "F16":
        return array.astype(np.float16), None
    # Quantized (and BF16) data is a uint8 array of shape (rows, bytes per row); GGUFWriter turns that
    # byte shape back into the logical shape using GGML_QUANT_SIZES[raw_dtype].
    return gguf.quants.quantize(array.astype(np.float32), Q[qtype]), Q[qtype]


def lossy(weights: dict[str, torch.Tensor], qtype: str) -> dict[str, torch.Tensor]:
    """What a correct loader reads back: matrices through quantize -> dequantize, 1-D tensors kept in
    F32 (llama.cpp never quantizes norms or biases). Quantization works row by row, so permuting rows
    (RoPE reordering) or stacking Q/K/V rows commutes with it and this canonical-layout result is exact."""
    out = {}
    for name, w in weights.items():
        if w.dim() == 2 and qtype != "F32":
            data, raw = encode(w.numpy(), qtype)
            out[name] = torch.from_numpy(np.array(gguf.quants.dequantize(data, raw or Q[qtype]),
                                                  dtype=np.float32).reshape(w.shape))
        else:
            out[name] = w.clone()
    return out


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: half-split rotary layout (HF) -> interleaved pairs (GGML)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_gguf_tensors(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    tensors = {}
    for name, w in weights.items():
        base, _, kind = name.rpartition(".")
        array = w.numpy()
        if base.startswith("layers."):
            _, layer, part = base.split(".", 2)
            if part == "attn.q":
                array = permute_rope(array, config.num_heads)
            elif part == "attn.k":
                array = permute_rope(array, config.num_kv_heads)
            tensors[f"blk.{layer}.{_LLAMA_LAYER[part]}.{kind}"] = array
        else:
            tensors[f"{_GLOBAL[base]}.{kind}"] = array
    return tensors


def gpt2_gguf_tensors(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """llama.cpp's GPT-2 layout: Q, K and V fused into blk.N.attn_qkv (rows q|k|v), weights (out, in)."""
    tensors = {}
    for name, w in weights.items():
        base, _, kind = name.rpartition(".")
        if not base.startswith("layers."):
            tensors[f"{_GLOBAL[base]}.{kind}"] = w.numpy()
            continue
        _, layer, part = base.split(".", 2)
        if part == "attn.q":
            qkv = [weights[f"layers.{layer}.attn.{x}.{kind}"] for x in "qkv"]
            tensors[f"blk.{layer}.attn_qkv.{kind}"] = torch.cat(qkv).numpy()
        elif part not in ("attn.k", "attn.v"):
            tensors[f"blk.{layer}.{_LLAMA_LAYER[part]}.{kind}"] = w.numpy()
    return tensors


def llama_gguf_metadata(config: ModelConfig) -> dict[str, int | float]:
    return {"llama.block_count": config.num_layers, "llama.embedding_length": config.hidden_size,
            "llama.feed_forward_length": config.ffn_hidden_size,
            "llama.attention.head_count": config.num_heads,
            "llama.attention.head_count_kv": config.num_kv_heads,
            "llama.rope.dimension_count": config.head_dim, "llama.rope.freq_base": config.rope_theta,
            "llama.attention.layer_norm_rms_epsilon": config.norm_eps,
            "llama.context_length": config.max_position, "llama.vocab_size": config.vocab_size}


def gpt2_gguf_metadata(config: ModelConfig) -> dict[str, int | float]:
    return {"gpt2.block_count": config.num_layers, "gpt2.embedding_length": config.hidden_size,
            "gpt2.feed_forward_length": config.ffn_hidden_size,
            "gpt2.attention.head_count": config.num_heads,
            "gpt2.attention.layer_norm_epsilon": config.norm_eps,
            "gpt2.context_length": config.max_position, "gpt2.vocab_size": config.vocab_size}


def write_gguf(path: Path, arch: str, metadata: dict, tensors: dict, qtype: str = "F32") -> Path:
    """tensors: name -> float array (stored as qtype when 2-D, F32 when 1-D) or a ready-made
    (uint8 bytes, GGMLQuantizationType) pair for writing types gguf cannot quantize to."""
    writer = gguf.GGUFWriter(str(path), arch)  # writes general.architecture itself
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)  # llama.cpp stores every float hyperparameter as f32
        else:
            writer.add_uint32(key, value)
    for name, value in tensors.items():
        data, raw = value if isinstance(value, tuple) else encode(value, qtype if value.ndim == 2 else "F32")
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_llama_gguf(path: Path, config: ModelConfig, weights: dict[str, torch.Tensor],
                     qtype: str = "F32") -> Path:
    return write_gguf(path, "llama", llama_gguf_metadata(config), llama_gguf_tensors(config, weights), qtype)


def write_gpt2_gguf(path: Path, config: ModelConfig, weights: dict[str, torch.Tensor],
                    qtype: str = "F32") -> Path:
    return write_gguf(path, "gpt2", gpt2_gguf_metadata(config), gpt2_gguf_tensors(config, weights), qtype)


def write_tokenizer(folder: Path) -> None:
    """A minimal tokenizer.json, since a Hugging Face folder carries one."""
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def write_hf_folder(folder: Path, config_json: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    write_tokenizer(folder)
    return folder


def write_hf_llama(folder: Path, config: ModelConfig, weights: dict[str, torch.Tensor],
                   model_type: str = "llama") -> Path:
    layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
             "attn.o": "self_attn.o_proj", "ffn.gate": "mlp.gate_proj", "ffn.up": "mlp.up_proj",
             "ffn.down": "mlp.down_proj"}
    top = {"embed_tokens": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"}
    tensors = {}
    for name, w in weights.items():
        base, _, kind = name.rpartition(".")
        if base.startswith("layers."):
            _, i, part = base.split(".", 2)
            tensors[f"model.layers.{i}.{layer[part]}.{kind}"] = w
        else:
            tensors[f"{top[base]}.{kind}"] = w
    # Older checkpoints carry this recomputed buffer; a loader must skip it.
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(config.head_dim // 2)
    config_json = {
        "model_type": model_type, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position, "tie_word_embeddings": config.tie_embeddings,
        "sliding_window": config.sliding_window, "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias}
    return write_hf_folder(folder, config_json, tensors)


def write_hf_gpt2(folder: Path, config: ModelConfig, weights: dict[str, torch.Tensor]) -> Path:
    layer = {"attn_norm": "ln_1", "ffn_norm": "ln_2", "attn.o": "attn.c_proj", "ffn.up": "mlp.c_fc",
             "ffn.down": "mlp.c_proj"}
    top = {"embed_tokens": "wte", "embed_positions": "wpe", "final_norm": "ln_f"}
    tensors = {}
    for name, w in weights.items():
        base, _, kind = name.rpartition(".")
        if not base.startswith("layers."):
            tensors[f"transformer.{top[base]}.{kind}"] = w
            continue
        _, i, part = base.split(".", 2)
        if part == "attn.q":
            part, w = "attn.qkv", torch.cat([weights[f"layers.{i}.attn.{x}.{kind}"] for x in "qkv"])
        elif part in ("attn.k", "attn.v"):
            continue
        hf_name = "attn.c_attn" if part == "attn.qkv" else layer[part]
        # Conv1D keeps its weight as (in, out): the transpose of nn.Linear's.
        tensors[f"transformer.h.{i}.{hf_name}.{kind}"] = w.t() if w.dim() == 2 else w
    # The causal-mask buffer GPT-2 checkpoints store; a loader must skip it.
    tensors["transformer.h.0.attn.bias"] = torch.ones(1, 1, 4, 4)
    config_json = {"model_type": "gpt2", "vocab_size": config.vocab_size, "n_embd": config.hidden_size,
                   "n_layer": config.num_layers, "n_head": config.num_heads,
                   "n_inner": config.ffn_hidden_size, "n_positions": config.max_position,
                   "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": config.tie_embeddings}
    return write_hf_folder(folder, config_json, tensors)
