"""A SentencePiece vocabulary as GGUF files keep it (tokenizer.ggml.model "llama": Llama 2, Mistral, Gemma,
Phi-3), as a Hugging Face `tokenizers` BPE that splits text as llama.cpp does.

llama.cpp's SentencePiece tokenizer: whitespace becomes "▁", a "▁" is put before the text (and after every
special token) where the file says add_space_prefix, then adjacent pieces are merged, best-scoring merged
piece first, while the merged piece is in the vocabulary; a character no piece covers becomes its UTF-8
bytes' <0xXX> tokens. A BPE whose merges are every (left, right) split of every piece, ranked by the piece's
score, merges in that order; its normalizer puts the "▁" before each run of text between special tokens.

Decoding joins the pieces with "▁" read as a space and <0xXX> as its byte, and strips nothing: a token's text
is the same alone or in a sequence (the detokenizer streams token by token), so an answer may begin with the
space its first piece carries, as llama.cpp's own server gives it.
"""
from __future__ import annotations

import re

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

SPACE = "\u2581"  # "▁"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def spm_tokenizer(tokens: list[str], scores: list[float], types: list[int], unk_id: int | None,
                  add_space_prefix: bool) -> Tokenizer:
    vocab = {piece: i for i, piece in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=_merges(tokens, scores, types, vocab), byte_fallback=True, fuse_unk=True,
                     unk_token=tokens[unk_id] if unk_id is not None else None)
    tok = Tokenizer(bpe)
    # Normalizers run on each run of text between special tokens: the "▁" goes before each, as in llama.cpp.
    spaces = normalizers.Replace(" ", SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), spaces]) if add_space_prefix else spaces
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, kind in enumerate(types) if kind in (CONTROL, USER_DEFINED)])
    return tok


def _merges(tokens: list[str], scores: list[float], types: list[int], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of every ordinary piece into two pieces, the best-scoring merged piece first."""
    ranked = []
    for piece, score, kind in zip(tokens, scores, types):
        if kind not in (NORMAL, USER_DEFINED) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def spm_token_bytes(tokens: list[str], types: list[int]) -> list[bytes]:
    """Each token's raw bytes: a byte token its byte, "▁" a space, a special token its text."""
    table = []
    for piece, kind in zip(tokens, types):
        match = _BYTE_PIECE.match(piece) if kind == BYTE else None
        table.append(bytes([int(match.group(1), 16)]) if match else piece.replace(SPACE, " ").encode())
    return table
