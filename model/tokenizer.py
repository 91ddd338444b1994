"""Tokenizer (Hugging Face `tokenizers`) built from GGUF metadata or tokenizer.json, with the ids that end a
generation and the chat template (model/chat_template.py)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from model.chat_template import DEFAULT, TOOL_USE, ChatTemplate, ChatTemplateError, special_token_texts, \
    templates_from_folder
from model.loading.weights import LoadError
from model.spm_vocab import spm_tokenizer, spm_token_bytes

__all__ = ["ChatTemplateError", "TextTokenizer", "tokenizer_from_folder", "tokenizer_from_gguf"]

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types that are special tokens
# Pre-tokenizer regexes by llama.cpp's `tokenizer.ggml.pre` name.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible map from printable characters back to raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _pre_tokenizer(pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "default", "gpt2", "gpt-2"):
        return byte_level
    if pre == "smollm":  # digits one at a time, then GPT-2's byte-level split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise LoadError(f"unsupported tokenizer.ggml.pre {pre!r} (supported: gpt2, smollm, llama-bpe)")


class TextTokenizer:
    """Text <-> ids, each token's raw bytes (for exact incremental decoding), and the chat template.

    eos_token_ids: every id that ends a generation, the tokenizer's EOS first; a checkpoint may name more
    (generation_config.json's list, e.g. Llama 3's <|eot_id|>, Gemma's <end_of_turn>; a GGUF's EOT/EOM ids)."""

    def __init__(self, tokenizer: Tokenizer, bos_token_id: int | None, eos_token_id: int | None,
                 chat: ChatTemplate | str | None, add_bos: bool = False, extra_eos_ids: tuple[int, ...] = (),
                 token_bytes: list[bytes] | None = None):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(
            i for i in (eos_token_id, *extra_eos_ids) if i is not None and 0 <= i < tokenizer.get_vocab_size(True)))
        if not isinstance(chat, ChatTemplate):
            chat = ChatTemplate({DEFAULT: chat} if chat else {}, self._id_texts())
        self.chat = chat
        self.add_bos = add_bos
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_ids = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._token_bytes = token_bytes or self._build_token_bytes()

    def _build_token_bytes(self) -> list[bytes]:
        """A byte-level BPE's tokens' bytes (GPT-2's character map back to bytes)."""
        decoder, specials = _byte_decoder(), set(self.special_ids.values())
        table = []
        for i in range(self.vocab_size):
            piece = self.tokenizer.id_to_token(i) or ""
            if i in specials or not all(c in decoder for c in piece):
                table.append(self.tokenizer.decode([i], skip_special_tokens=False).encode())
            else:
                table.append(bytes(decoder[c] for c in piece))
        return table

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id] + ids if self.add_bos and self.bos_token_id is not None else ids

    def encode_with_offsets(self, text: str) -> list[tuple[int, int, int]]:
        """(token id, start, stop) per token, where text[start:stop] is the token's text; no BOS."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return [(token_id, start, stop) for token_id, (start, stop) in zip(encoding.ids, encoding.offsets)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes[token_id]

    def token_text(self, token_id: int) -> str:
        return self._token_bytes[token_id].decode("utf-8", errors="replace")

    @property
    def chat_template(self) -> str | None:
        """The default template's source."""
        return self.chat.source

    @property
    def tools_template(self) -> str | None:
        """The template a request with tools renders through: a "tool_use" one where the model has it."""
        return self.chat.templates.get(TOOL_USE) or self.chat.source

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        return self.chat.render(messages, add_generation_prompt, **extra)

    def _id_texts(self) -> dict[str, str]:
        """bos_token and eos_token as texts, from their ids (a GGUF names its special tokens by id)."""
        ids = {"bos_token": self.bos_token_id, "eos_token": self.eos_token_id}
        return {name: self.tokenizer.id_to_token(i) or "" for name, i in ids.items() if i is not None}


def tokenizer_from_gguf(reader, path: Path) -> TextTokenizer:
    from model.loading.gguf_file import metadata

    kind = metadata(reader, "tokenizer.ggml.model")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    types = metadata(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    token_bytes = None
    if kind == "llama":
        tok = spm_tokenizer(tokens, metadata(reader, "tokenizer.ggml.scores"), types,
                            metadata(reader, "tokenizer.ggml.unknown_token_id"),
                            bool(metadata(reader, "tokenizer.ggml.add_space_prefix", True)))
        token_bytes = spm_token_bytes(tokens, types)
    elif kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in metadata(reader, "tokenizer.ggml.merges", [])]
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = _pre_tokenizer(metadata(reader, "tokenizer.ggml.pre"))
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)])
    else:
        raise LoadError(f"{path}: unsupported tokenizer.ggml.model {kind!r} "
                        "(supported: gpt2 byte-level BPE, llama SentencePiece)")
    # llama.cpp ends a generation at its end-of-turn and end-of-message tokens too, where a file names them.
    extra_eos = tuple(metadata(reader, f"tokenizer.ggml.{name}_token_id") for name in ("eot", "eom"))
    return TextTokenizer(tok, metadata(reader, "tokenizer.ggml.bos_token_id"),
                         metadata(reader, "tokenizer.ggml.eos_token_id"),
                         metadata(reader, "tokenizer.chat_template"),
                         add_bos=bool(metadata(reader, "tokenizer.ggml.add_bos_token", kind == "llama")), extra_eos_ids=extra_eos,
                         token_bytes=token_bytes)


def tokenizer_from_folder(folder: Path) -> TextTokenizer:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise LoadError(f"{folder}: no tokenizer.json")
    tok = Tokenizer.from_file(str(path))
    config = _read_json(folder / "tokenizer_config.json")
    texts = special_token_texts(config)

    def token_id(key: str) -> int | None:
        return tok.token_to_id(texts[key]) if key in texts else None

    generation_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    extra_eos = tuple(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    chat = ChatTemplate(templates_from_folder(folder, config), texts)
    return TextTokenizer(tok, token_id("bos_token"), token_id("eos_token"), chat,
                         add_bos=bool(config.get("add_bos_token", False)), extra_eos_ids=extra_eos)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path}: unreadable: {exc}") from exc
