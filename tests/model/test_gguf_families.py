"""The families' tiny checkpoints (families.py) converted to GGUF by llama.cpp's own converter
(convert_hf_to_gguf.py from the llama-cpp-python sdist, which `make test` unpacks into
.venv/llama.cpp), loaded by kvserve and run exactly as transformers runs the original.

Gemma 2 and Phi-3's converter wants a SentencePiece tokenizer.model: their folders get a small one trained here
(sentencepiece_model.py), which makes their GGUF's vocabulary SentencePiece's (read by model/spm_vocab.py).
Mistral is not among them: llama.cpp's converter writes it as the llama architecture without its sliding
window, so its GGUF is a different model (full attention) from the checkpoint; kvserve runs such a file as
llama.cpp does, with full attention. The Gemma 3 text model inside a multimodal checkpoint converts to an mmproj
file beside the text model's in llama.cpp; kvserve reads the text model's file, checked here as gemma3."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from model.loading import load_model
from tests.model import sentencepiece_model
from tests.model.families import FAMILIES, assert_runs_like, checkpoint
from tests.server_process import REPO

CONVERTER = REPO / ".venv" / "llama.cpp" / "convert_hf_to_gguf.py"
ARCHITECTURES = {"llama3": "llama", "llama-linear-rope": "llama", "llama-yarn-rope": "llama", "qwen2": "qwen2",
                 "qwen3": "qwen3", "phi3": "phi3", "phi3-longrope": "phi3", "gemma2": "gemma2", "gemma3": "gemma3",
                 "olmo2": "olmo2"}
NEEDS_SENTENCEPIECE = {"phi3", "phi3-longrope", "gemma2"}
# A GGUF does not carry Gemma 2's query_pre_attn_scalar: llama.cpp scales queries by head_dim ** -0.5 (hidden /
# heads in the 27B model), as the published models do, so the converted checkpoint has it so.
CHANGES = {"gemma2": {"query_pre_attn_scalar": 32}}
GGUF_FAMILIES = [family for family in FAMILIES if family in ARCHITECTURES]


def convert(folder) -> str:
    assert CONVERTER.exists(), f"{CONVERTER} is missing: `make test` unpacks it (the llama-converter target)"
    out = folder / "model.gguf"
    env = dict(os.environ, PYTHONPATH=str(CONVERTER.parent / "gguf-py"))  # the converter's own gguf-py
    done = subprocess.run([sys.executable, str(CONVERTER), str(folder), "--outfile", str(out), "--outtype", "f32"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return str(out)


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_converted_gguf_runs_like_transformers(tmp_path_factory, smollm2_tokenizer, family):
    reference, folder = checkpoint(tmp_path_factory, smollm2_tokenizer, family, **CHANGES.get(family, {}))
    if family in NEEDS_SENTENCEPIECE:
        sentencepiece_model.train(folder)
    loaded = load_model(convert(folder))
    assert loaded.config.architecture == ARCHITECTURES[family]
    assert_runs_like(loaded, reference)
