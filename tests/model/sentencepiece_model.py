"""A small SentencePiece BPE model trained here (on the README), for the families whose llama.cpp converter
wants a tokenizer.model (Gemma 2, Phi-3) and for checking kvserve's reading of a GGUF's SentencePiece
vocabulary against sentencepiece itself. Trained as Llama's was: BPE, byte fallback, digits split, no
normalization, whitespace kept."""
from __future__ import annotations

import io
from pathlib import Path

import sentencepiece

from tests.server_process import REPO

VOCAB_SIZE = 640


def train(folder: Path) -> sentencepiece.SentencePieceProcessor:
    """Writes folder/tokenizer.model and returns its processor."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines() if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=VOCAB_SIZE, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, add_dummy_prefix=True, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
