"""The families' tiny checkpoints (families.py) converted to GGUF by llama.cpp's own converter
(convert_hf_to_gguf.py from the llama-cpp-python sdist, which `make test` unpacks into
.venv/llama.cpp), loaded by kvserve and run exactly as transformers runs the original.

Three families are not among them. Mistral: llama.cpp's converter writes it as the llama architecture without
its sliding window, so its GGUF is a different model (full attention) from the checkpoint. Phi-3 and Gemma 2:
the converter wants a SentencePiece tokenizer.model, which the test checkpoints (SmolLM2's BPE tokenizer) lack,
so kvserve does not claim Phi-3 GGUF files yet; it reads Gemma 2's as llama.cpp does (gemma3's code path, plus
soft-capping), unverified by a converted file. (Real Gemma and Phi-3 GGUF files also carry a SentencePiece
vocabulary, which kvserve's GGUF tokenizer does not read yet.)"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from model.loading import load_model
from tests.model.families import FAMILIES, assert_runs_like, checkpoint
from tests.server_process import REPO

CONVERTER = REPO / ".venv" / "llama.cpp" / "convert_hf_to_gguf.py"
ARCHITECTURES = {"llama3": "llama", "llama-linear-rope": "llama", "llama-yarn-rope": "llama", "qwen2": "qwen2",
                 "qwen3": "qwen3", "gemma3": "gemma3", "olmo2": "olmo2"}
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
    reference, folder = checkpoint(tmp_path_factory, smollm2_tokenizer, family)
    loaded = load_model(convert(folder))
    assert loaded.config.architecture == ARCHITECTURES[family]
    assert_runs_like(loaded, reference)
