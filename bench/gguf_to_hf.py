"""A GGUF Llama model as a plain bfloat16 Hugging Face folder (weights, config, tokenizer), for servers that
cannot read GGUF, such as vLLM's CPU build. Run in a venv with transformers, accelerate and gguf:

    python bench/gguf_to_hf.py MODEL.gguf OUT_DIR
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def convert(gguf: Path, out: Path) -> None:
    """Written to a sibling folder and renamed at the end, so a half-written OUT_DIR never exists."""
    loaded = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model of the same config,
    # less the GGUF quantization entry (a reader of the folder would look for GGUF tensors).
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [key for key in missing if key != "lm_head.weight" or not loaded.config.tie_word_embeddings]:
        raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.to(torch.bfloat16).save_pretrained(partial)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
    partial.rename(out)


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
