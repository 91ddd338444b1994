"""Read a GGUF file: its ModelConfig, its tensors dequantized to fp32 in the canonical layout, metadata."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from model.config import ModelConfig
from model.loading.gguf_reader import GGUFFile
from model.loading.weights import LazyWeights, LoadError
from model.network.rope import RopeScaling

try:
    import gguf
    from gguf import GGMLQuantizationType as Q
except ImportError:  # pragma: no cover - gguf is a runtime dependency
    gguf = None

SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}

ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "olmo2", "gpt2")
# llama.cpp's converter reorders q/k rows for its "normal" RoPE (llama) only; qwen2 and qwen3 use its NEOX
# RoPE, the half-split layout kvserve computes, and are stored as they are.
_PERMUTED = {"llama"}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's per-frequency scaling factors, read into the config
LONGROPE = ("rope_factors_short.weight", "rope_factors_long.weight")  # Phi-3 128k's, read into the config too

_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_LAYER_NAMES = {  # llama.cpp tensor name -> canonical suffix
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_q": "attn.q", "attn_k": "attn.k",
    "attn_v": "attn.v", "attn_output": "attn.o", "ffn_gate": "ffn.gate", "ffn_up": "ffn.up",
    "ffn_down": "ffn.down", "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm",
    "post_attention_norm": "attn_post_norm", "post_ffw_norm": "ffn_post_norm",
}
# What llama.cpp itself assumes where a Gemma or OLMo 2 file is silent (its src/models/<arch>.cpp): which
# layers slide (all but every n-th), and Gemma 3's local RoPE base.
_SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6, "olmo2": 4}
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_GLOBAL_NAMES = {"token_embd": "embed_tokens", "position_embd": "embed_positions",
                 "output_norm": "final_norm", "output": "lm_head"}


def open_gguf(path: Path) -> GGUFFile:
    if gguf is None:
        raise LoadError("the 'gguf' package is needed to read GGUF files")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LoadError(f"{path}: not a GGUF file (bad magic bytes)")
    try:
        return GGUFFile(path)
    except Exception as exc:
        raise LoadError(f"{path}: unreadable GGUF file: {exc}") from exc


def metadata(reader: GGUFFile, key: str, default=None):
    return reader.fields.get(key, default)


def gguf_config(reader, path: Path) -> ModelConfig:
    arch = metadata(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise LoadError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")

    def need(key: str):
        value = metadata(reader, f"{arch}.{key}")
        if value is None:
            raise LoadError(f"{path}: missing metadata {arch}.{key}")
        return value

    tensor_names = {t.name for t in reader.tensors}
    vocab = metadata(reader, f"{arch}.vocab_size") or len(metadata(reader, "tokenizer.ggml.tokens", []))
    heads = int(need("attention.head_count"))
    common = dict(
        vocab_size=int(vocab), hidden_size=int(need("embedding_length")), num_layers=int(need("block_count")),
        num_heads=heads, ffn_hidden_size=int(need("feed_forward_length")),
        max_position=int(need("context_length")), tie_embeddings="output.weight" not in tensor_names,
        name=str(metadata(reader, "general.name", path.stem)), architecture=arch)
    if arch == "gpt2":
        return ModelConfig(**common, num_kv_heads=heads, activation="gelu_tanh", norm="layernorm",
                           norm_eps=float(need("attention.layer_norm_epsilon")),
                           positional_encoding="learned", attention_bias=True, mlp_bias=True)
    head_dim = int(metadata(reader, f"{arch}.attention.key_length", 0) or 0) or common["hidden_size"] // heads
    rotated = metadata(reader, f"{arch}.rope.dimension_count")
    if rotated is not None and int(rotated) != head_dim:
        raise LoadError(f"{path}: RoPE over {rotated} of {head_dim} head channels is not supported (the whole head only)")
    return ModelConfig(**common, num_kv_heads=int(metadata(reader, f"{arch}.attention.head_count_kv", heads)),
                       head_dim=head_dim, norm_eps=float(need("attention.layer_norm_rms_epsilon")),
                       rope_theta=float(metadata(reader, f"{arch}.rope.freq_base", 10000.0)),
                       sliding_window=metadata(reader, f"{arch}.attention.sliding_window") or None,
                       attention_bias=arch == "qwen2", attention_out_bias=False,
                       rope_scaling=_rope_scaling(reader, arch, path), **_family_options(reader, arch, common))


def _family_options(reader, arch: str, common: dict) -> dict:
    """What sets a family apart from Llama, as the file says it or llama.cpp assumes it."""
    if arch == "qwen3":
        return dict(qk_norm="head")
    options = {}
    if arch in _SLIDING_PATTERN and metadata(reader, f"{arch}.attention.sliding_window"):
        pattern = metadata(reader, f"{arch}.attention.sliding_window_pattern", _SLIDING_PATTERN[arch])
        options["sliding_layers"] = tuple(bool(x) for x in pattern) if isinstance(pattern, list) else tuple(
            i % pattern < pattern - 1 for i in range(common["num_layers"]))
    if arch == "olmo2":
        return options | dict(norm_placement="sublayer_post", qk_norm="projection")
    if arch not in ("gemma2", "gemma3"):
        return options
    heads, layers = common["num_heads"], common["num_layers"]
    head_dim = int(metadata(reader, f"{arch}.attention.key_length", 0) or 0) or common["hidden_size"] // heads
    # llama.cpp scales queries by head_dim ** -0.5 except in the 27B models (46 and 62 layers), whose
    # query_pre_attn_scalar is hidden / heads; a file may say it outright.
    scalar = common["hidden_size"] / heads if (arch, layers) in (("gemma2", 46), ("gemma3", 62)) else head_dim
    scale = metadata(reader, f"{arch}.attention.scale") or scalar ** -0.5
    local_base = metadata(reader, f"{arch}.rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE if arch == "gemma3" else None)
    return options | dict(
        activation="geglu_tanh", norm_placement="pre_post", scale_embeddings=True,
        qk_norm="head" if arch == "gemma3" else "none", attention_scale=float(scale),
        attention_softcap=metadata(reader, f"{arch}.attn_logit_softcapping"),
        logit_softcap=metadata(reader, f"{arch}.final_logit_softcapping"),
        rope_local_theta=None if local_base is None else float(local_base))


def _rope_scaling(reader, arch: str, path: Path) -> RopeScaling | None:
    """The file's RoPE scaling: Llama 3.1's factors tensor, or linear / yarn from the metadata."""
    tensors = {t.name: t for t in reader.tensors if t.name in (ROPE_FREQS, *LONGROPE)}
    if ROPE_FREQS in tensors:
        return RopeScaling("factors", 1.0, frequency_factors=tuple(_dequantize(tensors[ROPE_FREQS], path).tolist()))
    if all(name in tensors for name in LONGROPE):
        short, long = (tuple(_dequantize(tensors[name], path).tolist()) for name in LONGROPE)
        original = int(metadata(reader, f"{arch}.rope.scaling.original_context_length"))
        return RopeScaling("longrope", int(metadata(reader, f"{arch}.context_length")) / original, original,
                           attention_factor=metadata(reader, f"{arch}.rope.scaling.attn_factor"),
                           frequency_factors=short, long_factors=long)
    kind = metadata(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    try:
        return RopeScaling(kind, float(metadata(reader, f"{arch}.rope.scaling.factor", 1.0)),
                           int(metadata(reader, f"{arch}.rope.scaling.original_context_length", 0) or 0))
    except ValueError as exc:
        raise LoadError(f"{path}: {exc}") from exc


def _check_type(tensor, path: Path) -> None:
    kind = Q(tensor.tensor_type).name
    if kind not in SUPPORTED_TYPES:
        raise LoadError(f"{path}: tensor {tensor.name!r} has unsupported type {kind} "
                        f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")


def _shape(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first


def _dequantize(tensor, path: Path, rows_at_once: int = 4096) -> torch.Tensor:
    """The tensor as float32, dequantized rows_at_once rows at a time: gguf's dequantizer makes several
    float temporaries the size of its input, as large as the whole embedding's float32 copy (113 MB for
    SmolLM2's) when it is given the whole table."""
    _check_type(tensor, path)
    shape = _shape(tensor)
    out = np.empty(shape, dtype=np.float32)
    rows = out.reshape(-1, shape[-1]) if len(shape) > 1 else out.reshape(1, -1)
    data = tensor.data.reshape(len(rows), -1)  # one row of elements (or of their blocks' bytes) a line
    for start in range(0, len(rows), rows_at_once):
        piece = gguf.quants.dequantize(data[start:start + rows_at_once], tensor.tensor_type)
        rows[start:start + rows_at_once] = piece.reshape(len(piece), -1)
    return torch.from_numpy(out)


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of Q/K rows (interleaved rotary pairs -> half-split layout)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def canonical_name(name: str, path: Path) -> str:
    base, _, kind = name.rpartition(".")
    match = _LAYER.match(base)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{kind}"
    if match and match.group(2) == "attn_qkv":
        return f"layers.{match.group(1)}.attn.qkv.{kind}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    raise LoadError(f"{path}: unexpected tensor {name!r}")


def gguf_weights(reader, config: ModelConfig, path: Path) -> LazyWeights:
    """The file's tensors in the canonical layout, dequantized to float32 as they are read (LazyWeights
    says why); unknown names and storage types are refused here, before anything is read."""
    tensors = {t.name: t for t in reader.tensors if t.name not in (ROPE_FREQS, *LONGROPE)}

    def read(key: str) -> torch.Tensor:
        weight = _dequantize(tensors[key], path)
        reader.release()  # each tensor is read once: its file pages need not stay resident
        return weight

    weights = LazyWeights(read)
    permuted = config.architecture in _PERMUTED
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    for key, tensor in tensors.items():
        _check_type(tensor, path)
        name, shape = canonical_name(key, path), _shape(tensor)
        if ".ffn.up." in name and config.architecture == "phi3":  # Phi-3 keeps gate and up in one, gate first
            weights.add_pieces([name.replace(".up.", ".gate."), name], key, shape, [shape[0] // 2] * 2)
        elif ".attn.qkv." in name:  # GPT-2 and Phi-3 store Q, K and V in one tensor
            weights.add_pieces([name.replace(".qkv.", f".{part}.") for part in "qkv"], key, shape,
                               [q_rows, kv_rows, kv_rows])
        elif name.endswith(("attn.q.weight", "attn.q.bias")) and permuted:
            weights.add(name, key, shape, lambda w: unpermute_rope(w, config.num_heads))
        elif name.endswith(("attn.k.weight", "attn.k.bias")) and permuted:
            weights.add(name, key, shape, lambda w: unpermute_rope(w, config.num_kv_heads))
        else:
            weights.add(name, key, shape)
    return weights
