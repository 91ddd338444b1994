"""The model families' tiny random checkpoints, made by transformers' own config classes and
save_pretrained with each family's distinguishing features switched on, and the check that kvserve runs one
exactly as transformers does: float32 logits within 1e-4 over a 300-token prompt, and the same greedy tokens
and logprobs over 32 steps decoded by the engine packed with other sequences."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from model.network.attention import AttentionMetadata
from service.engine.request import SamplingParams
from tests.engine.engine_helpers import generate, make_engine

PROMPT_LEN, STEPS = 300, 32
VOCAB = 49152  # SmolLM2's: the folder gets its tokenizer.json, which the engine's detokenizer needs
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
FAMILIES = {
    # Llama 3.x: the llama3 RoPE scaling (its wavelength-dependent blend), a large base, tied embeddings.
    "llama3": (transformers.LlamaConfig, dict(rope_theta=500000.0, rope_scaling=LLAMA3, tie_word_embeddings=True)),
    "llama-linear-rope": (transformers.LlamaConfig, dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama-yarn-rope": (transformers.LlamaConfig, dict(rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})),
    # Dynamic NTK: past max_position_embeddings (128, below the prompt) the base grows with the length.
    "llama-dynamic-rope": (transformers.LlamaConfig, dict(max_position_embeddings=128, rope_scaling={
        "rope_type": "dynamic", "factor": 4.0})),
    # Mistral: a sliding attention window, here shorter than the prompt.
    "mistral": (transformers.MistralConfig, dict(sliding_window=64, tie_word_embeddings=False)),
    # Phi-3: q, k, v fused in one checkpoint matrix, gate and up in another.
    "phi3": (transformers.Phi3Config, dict(tie_word_embeddings=False, pad_token_id=0)),
    # Phi-3 128k / Phi-3.5: longrope, short factors within the original context (128, below the prompt),
    # long ones past it, cos and sin scaled.
    "phi3-longrope": (transformers.Phi3Config, dict(
        tie_word_embeddings=False, pad_token_id=0, original_max_position_embeddings=128, rope_scaling={
            "type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(8)],
            "long_factor": [1.0 + 0.6 * i for i in range(8)]})),
    # Qwen2 / 2.5: biases on q, k and v only.
    "qwen2": (transformers.Qwen2Config, dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    # Qwen3: RMSNorm over each head's q and k before RoPE; head_dim wider than hidden / heads.
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=False)),
    # Gemma 2: GeGLU, norms before and after each sublayer (scaled by 1 + w), embeddings times sqrt(d),
    # soft-capped attention scores and logits, local (window 64) and global layers alternating, queries
    # scaled by query_pre_attn_scalar (not head_dim).
    "gemma2": (transformers.Gemma2Config, dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=64, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, num_hidden_layers=4, hidden_activation="gelu_pytorch_tanh")),
    # Gemma 3: Gemma 2's layout without soft-capping, q/k RMSNorm per head, five local layers to one global
    # (the real models' pattern), the local ones with their own unscaled RoPE base, the global one scaled.
    "gemma3": (transformers.Gemma3TextConfig, dict(
        head_dim=32, query_pre_attn_scalar=32, sliding_window=64, num_hidden_layers=6, rope_local_base_freq=10000.0,
        rope_theta=1000000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})),
    # Gemma 3 4B-27B: the same text model inside Gemma3ForConditionalGeneration, beside a vision tower kvserve
    # does not read.
    "gemma3-vision": (lambda **text: transformers.Gemma3Config(text_config=text, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4), dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=64, num_hidden_layers=6)),
    # OLMo 2: norms on each sublayer's output only, q and k RMSNorm over the whole projection.
    "olmo2": (transformers.Olmo2Config, dict(tie_word_embeddings=False, pad_token_id=0)),
}


def checkpoint(tmp_path_factory, tokenizer, family: str, **changes):
    """transformers' model for the family (its config's fields changed as given), with random weights (norms
    near 1), saved as a folder with SmolLM2's tokenizer."""
    config_class, options = FAMILIES[family]
    config = config_class(**(COMMON | options | changes))
    torch.manual_seed(0)
    # Eager attention: transformers' plain-math path, the only one of its paths that soft-caps scores (its
    # SDPA path ignores Gemma 2's attn_logit_softcapping).
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    # Gemma's RMSNorm scales by 1 + w: its stored norms near 0 are scales near 1, as the others' are.
    norm_mean = 0.0 if family.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(norm_mean, 0.1)
            else:
                parameter.normal_(0.0, 0.08)
    folder = tmp_path_factory.mktemp(family)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return model, folder


def prompt(seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(17, VOCAB, (PROMPT_LEN,), generator=generator).tolist()  # 0..16: special tokens


def assert_runs_like(loaded, reference) -> None:
    """loaded (kvserve's) against reference (transformers' model): prefill logits, then packed decoding."""
    ids = prompt(1)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    meta = AttentionMetadata.build([PROMPT_LEN], [PROMPT_LEN], None, sliding_window=loaded.config.sliding_window)
    with torch.inference_mode():
        ours = loaded.model(torch.tensor(ids), meta, None, logits_index=torch.arange(PROMPT_LEN))
    assert (ours - expected).abs().max().item() < 1e-4

    # 32 greedy steps through the engine, packed with two other sequences, against transformers' greedy.
    with torch.no_grad():
        generated = reference.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                                       pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = generated.sequences[0, PROMPT_LEN:].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[token].item() for step, token in zip(generated.logits, tokens)]
    engine = make_engine(loaded, 128)
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=0)
    results = generate(engine, {"ref": ids, "other": prompt(2)[:77], "third": prompt(3)[:190]}, params)
    assert results["ref"].token_ids == tokens
    assert results["ref"].logprobs == pytest.approx(logprobs, abs=1e-4)

