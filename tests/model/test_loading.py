"""Loaders: GGUF (llama.cpp layout, every supported storage type) and Hugging Face folders round-trip
to the canonical weights, and every kind of bad input is a LoadError that names the culprit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file

from model.config import preset, tiny
from model.loading import build_model, load_model, read_model
from model.loading.loader import SMOLLM2_FILE
from model.loading.weights import LoadError, random_weights
from model.network.attention import AttentionMetadata
from tests.model.writers import (QTYPES, gpt2_gguf_metadata, gpt2_gguf_tensors, llama_gguf_metadata,
                                 llama_gguf_tensors, lossy, write_gguf, write_gpt2_gguf, write_hf_folder,
                                 write_hf_gpt2, write_hf_llama, write_llama_gguf)

LLAMA = tiny("smollm2-135m")  # GQA: Q and K rows are reordered with different head counts
GPT2 = tiny("gpt2")
TOKENS = [5, 17, 300, 2, 511, 42, 42, 7, 128, 64, 1, 0]
# Worst-case rounding of each storage type, as a fraction of the largest |weight| (of a 32-wide block,
# bounded here by the whole tensor's): half an ulp for the floats; Q8_0 steps of absmax/127; Q4_1
# steps of (max - min)/15 <= 2 absmax/15; Q4_0 steps of absmax/8, where -absmax clips to 7 steps
# (a full step off). Each has a little headroom for the float16 scale.
MAX_ERROR = {"F32": 0.0, "F16": 2**-11, "BF16": 2**-8, "Q8_0": 1 / 127, "Q4_0": 1.01 / 8, "Q4_1": 1 / 14}


def logits_of(model) -> torch.Tensor:
    n = len(TOKENS)
    meta = AttentionMetadata.build([n], [n], None, sliding_window=model.config.sliding_window)
    with torch.inference_mode():
        return model(torch.tensor(TOKENS), meta, None, logits_index=torch.arange(n))


def same_config(loaded, original) -> bool:
    """Equal but for the name (from the file) and norm_eps, which GGUF stores as float32."""
    assert loaded.norm_eps == pytest.approx(original.norm_eps, rel=1e-6)
    return loaded.replace(name=original.name, norm_eps=original.norm_eps) == original


def check_round_trip(path, config, weights, qtype):
    """The file reads back as exactly the weights its storage type keeps, and runs exactly like them."""
    loaded_config, loaded_weights, _, _ = read_model(str(path))
    assert same_config(loaded_config, config)
    expected = lossy(weights, qtype)
    assert set(loaded_weights) == set(expected)
    for name, w in expected.items():
        assert torch.equal(loaded_weights[name], w), name
    # The storage type really was used: lossy types change the matrices, F32 keeps them bit for bit,
    # and no matrix moved further than its type's rounding allows.
    assert torch.equal(loaded_weights["layers.0.attn.q.weight"], weights["layers.0.attn.q.weight"]) \
        == (qtype == "F32")
    for name, w in weights.items():
        assert (loaded_weights[name] - w).abs().max() <= MAX_ERROR[qtype] * w.abs().max(), name
    loaded = load_model(str(path))
    reference = build_model(loaded_config, expected, "expected")
    assert torch.equal(logits_of(loaded.model), logits_of(reference))
    if loaded_config.tie_embeddings:
        assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("qtype", QTYPES)
def test_llama_gguf_round_trip(tmp_path, qtype):
    weights = random_weights(LLAMA)
    check_round_trip(write_llama_gguf(tmp_path / "m.gguf", LLAMA, weights, qtype), LLAMA, weights, qtype)


@pytest.mark.parametrize("qtype", QTYPES)
def test_gpt2_gguf_round_trip(tmp_path, qtype):
    weights = random_weights(GPT2)
    check_round_trip(write_gpt2_gguf(tmp_path / "m.gguf", GPT2, weights, qtype), GPT2, weights, qtype)


def test_gguf_with_separate_output_head(tmp_path):
    config = tiny("llama-7b")  # MHA, untied: the file carries output.weight
    weights = random_weights(config)
    check_round_trip(write_llama_gguf(tmp_path / "m.gguf", config, weights), config, weights, "F32")


def test_gguf_rope_rows_are_reordered_on_load(tmp_path):
    """Control: a file written without llama.cpp's Q/K reordering does not read back as the original,
    so the round trips above really exercise the loader's un-permutation."""
    weights = random_weights(LLAMA)
    tensors = llama_gguf_tensors(LLAMA, weights)
    for i in range(LLAMA.num_layers):
        tensors[f"blk.{i}.attn_q.weight"] = weights[f"layers.{i}.attn.q.weight"].numpy()
    _, loaded, _, _ = read_model(str(write_gguf(tmp_path / "m.gguf", "llama", llama_gguf_metadata(LLAMA),
                                                tensors)))
    assert not torch.equal(loaded["layers.0.attn.q.weight"], weights["layers.0.attn.q.weight"])
    assert torch.equal(loaded["layers.0.attn.k.weight"], weights["layers.0.attn.k.weight"])


@pytest.mark.parametrize("config, model_type", [
    (LLAMA, "llama"),
    (tiny("mistral-7b"), "mistral"),  # untied head (lm_head.weight present) and a sliding window
], ids=["llama", "mistral"])
def test_hf_llama_family_round_trip(tmp_path, config, model_type):
    weights = random_weights(config)
    folder = write_hf_llama(tmp_path / "m", config, weights, model_type)
    loaded = load_model(str(folder))
    assert loaded.config == config.replace(name="m")  # JSON keeps every float exactly
    assert loaded.tokenizer is not None and loaded.tokenizer.encode("hello world") == [1, 2]
    assert torch.equal(logits_of(loaded.model), logits_of(build_model(config, weights, "original")))


def test_hf_gpt2_round_trip(tmp_path):
    weights = random_weights(GPT2)
    loaded = load_model(str(write_hf_gpt2(tmp_path / "m", GPT2, weights)))
    assert loaded.config == GPT2.replace(name="m")
    assert torch.equal(logits_of(loaded.model), logits_of(build_model(GPT2, weights, "original")))


def test_hf_tied_checkpoint_may_still_store_lm_head(tmp_path):
    weights = random_weights(LLAMA)
    stored_head = weights["embed_tokens.weight"].clone()  # safetensors refuses shared storage
    folder = write_hf_llama(tmp_path / "m", LLAMA, {**weights, "lm_head.weight": stored_head})
    loaded = load_model(str(folder))
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("preset_name", ["gpt2", "mistral-7b"])
def test_random_model_names(preset_name):
    loaded = load_model(f"random:tiny-{preset_name}")
    assert loaded.config == tiny(preset_name) and loaded.tokenizer is None


# --- errors -------------------------------------------------------------------------------------

def write_llama_with(tmp_path, change) -> str:
    """A tiny llama GGUF whose tensor table was edited by change(tensors) before writing."""
    tensors = llama_gguf_tensors(LLAMA, random_weights(LLAMA))
    change(tensors)
    return str(write_gguf(tmp_path / "bad.gguf", "llama", llama_gguf_metadata(LLAMA), tensors))


def load_error(name: str) -> str:
    with pytest.raises(LoadError) as info:
        load_model(name)
    return str(info.value)


def test_missing_tensor(tmp_path):
    path = write_llama_with(tmp_path, lambda t: t.pop("blk.1.ffn_down.weight"))
    message = load_error(path)
    assert path in message and "missing tensor 'layers.1.ffn.down.weight'" in message


def test_extra_tensor_with_unknown_name(tmp_path):
    path = write_llama_with(tmp_path, lambda t: t.update({"blk.0.attn_sinks.weight": np.ones(4, np.float32)}))
    assert "unexpected tensor 'blk.0.attn_sinks.weight'" in load_error(path)


def test_extra_layer_beyond_block_count(tmp_path):
    path = write_llama_with(tmp_path, lambda t: t.update({"blk.2.attn_norm.weight": np.ones(64, np.float32)}))
    assert "unexpected tensor 'layers.2.attn_norm.weight'" in load_error(path)


def test_wrong_shape(tmp_path):
    half_v = np.ones((16, 64), np.float32)  # 1 KV head's rows where the config has 2
    path = write_llama_with(tmp_path, lambda t: t.update({"blk.0.attn_v.weight": half_v}))
    assert "'layers.0.attn.v.weight' has shape (16, 64), expected (32, 64)" in load_error(path)


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.TQ1_0])
def test_unsupported_quant_type(tmp_path, qtype):
    block, type_size = GGML_QUANT_SIZES[qtype]  # elements per block, bytes per block
    raw = np.zeros((128, 256 // block * type_size), dtype=np.uint8)  # a (128, 256) tensor's bytes
    path = write_llama_with(tmp_path, lambda t: t.update({"blk.0.ffn_down.weight": (raw, qtype)}))
    message = load_error(path)
    assert "'blk.0.ffn_down.weight'" in message and f"unsupported type {qtype.name}" in message


@pytest.mark.parametrize("content", [b"", b"GGU", bytes(range(256)) * 4, b"not a model, just text\n"],
                         ids=["empty", "short", "random_bytes", "text"])
def test_file_that_is_not_gguf(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    message = load_error(str(path))
    assert str(path) in message and "not a GGUF file" in message


def test_truncated_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    data = write_llama_gguf(path, LLAMA, random_weights(LLAMA)).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "unreadable GGUF file" in load_error(str(path))


def test_nonexistent_path(tmp_path):
    path = str(tmp_path / "no-such-model.gguf")
    assert f"'{path}': no such file or folder" in load_error(path)


def test_unsupported_gguf_architecture(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "falcon", {"falcon.block_count": 2}, {})
    assert "unsupported architecture 'falcon'" in load_error(str(path))


def test_gguf_missing_metadata(tmp_path):
    metadata = gpt2_gguf_metadata(GPT2)
    del metadata["gpt2.attention.layer_norm_epsilon"]
    path = write_gguf(tmp_path / "m.gguf", "gpt2", metadata, gpt2_gguf_tensors(GPT2, random_weights(GPT2)))
    assert "missing metadata gpt2.attention.layer_norm_epsilon" in load_error(str(path))


def test_hf_folder_without_config(tmp_path):
    folder = write_hf_llama(tmp_path / "m", LLAMA, random_weights(LLAMA))
    (folder / "config.json").unlink()
    assert "config.json" in load_error(str(folder))


def test_hf_unsupported_model_type(tmp_path):
    folder = write_hf_folder(tmp_path / "m", {"model_type": "bert", "hidden_size": 64}, {})
    assert "unsupported model_type 'bert'" in load_error(str(folder))


def test_hf_config_missing_field(tmp_path):
    folder = write_hf_folder(tmp_path / "m", {"model_type": "llama", "vocab_size": 512}, {})
    assert "missing field 'num_attention_heads'" in load_error(str(folder))


def test_hf_folder_without_safetensors(tmp_path):
    folder = write_hf_llama(tmp_path / "m", LLAMA, random_weights(LLAMA))
    (folder / "model.safetensors").unlink()
    assert "no *.safetensors" in load_error(str(folder))


def test_hf_unexpected_tensor(tmp_path):
    folder = write_hf_gpt2(tmp_path / "m", GPT2, random_weights(GPT2))
    # A second shard, as sharded checkpoints have, carrying a classifier head we cannot place.
    save_file({"score.weight": torch.zeros(2, 64)}, str(folder / "model-00002.safetensors"))
    message = load_error(str(folder))
    assert "model-00002.safetensors" in message and "unexpected tensor 'score.weight'" in message


# --- dtypes and the real model ------------------------------------------------------------------

@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                                (torch.bfloat16, torch.bfloat16)])
def test_load_in_half_precision(tmp_path, dtype, torch_dtype):
    weights = random_weights(LLAMA)
    loaded = load_model(str(write_llama_gguf(tmp_path / "m.gguf", LLAMA, weights)), dtype=dtype)
    assert loaded.dtype == torch_dtype
    assert {p.dtype for p in loaded.model.parameters()} == {torch_dtype}
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    # Half precision keeps ~3 significant digits through 2 layers; logits here are ~0.5, so 0.02
    # separates rounding from a broken conversion (which is off by the logits' own size).
    torch.testing.assert_close(logits_of(loaded.model), logits_of(build_model(loaded.config, weights, "w")),
                               atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", ["int8", "fp16", "float64"])
def test_unknown_dtype_raises_naming_it(dtype):
    with pytest.raises(ValueError, match=f"'{dtype}'"):
        load_model("random:tiny-gpt2", dtype=dtype)


@pytest.mark.slow
def test_default_model_is_smollm2(smollm2):
    config = smollm2.config
    assert (config.num_layers, config.vocab_size, config.num_heads, config.num_kv_heads) == (30, 49152, 9, 3)
    assert same_config(config, preset("smollm2-135m"))
    assert smollm2.source.endswith(SMOLLM2_FILE)
    assert smollm2.tokenizer is not None and smollm2.tokenizer.vocab_size == 49152
    assert smollm2.model.lm_head.weight is smollm2.model.embed_tokens.weight
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008
