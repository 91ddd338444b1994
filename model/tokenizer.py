"""Tokenizer (Hugging Face `tokenizers`) built from GGUF metadata or tokenizer.json, and the chat template."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from model.loading.weights import LoadError

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


class ChatTemplateError(ValueError):
    """The chat template rejected the messages (e.g. roles out of order)."""


class TextTokenizer:
    """Text <-> ids, each token's raw bytes (for exact incremental decoding), and the chat template."""

    def __init__(self, tokenizer: Tokenizer, bos_token_id: int | None, eos_token_id: int | None,
                 chat_template: str | None, add_bos: bool = False):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_ids = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._token_bytes = self._build_token_bytes()

    def _build_token_bytes(self) -> list[bytes]:
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

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template")
        template = _compile_template(self.chat_template)
        bos = self.tokenizer.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.tokenizer.id_to_token(self.eos_token_id) if self.eos_token_id is not None else ""
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=bos, eos_token=eos, **extra)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc


def _raise(message: str):
    raise TemplateError(message)


@lru_cache(maxsize=8)
def _compile_template(source: str):
    # The settings Hugging Face uses for chat templates, so templates render the same text.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(source)


def tokenizer_from_gguf(reader, path: Path) -> TextTokenizer:
    from model.loading.gguf_file import metadata

    kind = metadata(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise LoadError(f"{path}: unsupported tokenizer.ggml.model {kind!r} (supported: gpt2 byte-level BPE)")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in metadata(reader, "tokenizer.ggml.merges", [])]
    types = metadata(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(metadata(reader, "tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)])
    return TextTokenizer(tok, metadata(reader, "tokenizer.ggml.bos_token_id"),
                         metadata(reader, "tokenizer.ggml.eos_token_id"),
                         metadata(reader, "tokenizer.chat_template"),
                         add_bos=bool(metadata(reader, "tokenizer.ggml.add_bos_token", False)))


def tokenizer_from_folder(folder: Path) -> TextTokenizer:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise LoadError(f"{folder}: no tokenizer.json")
    tok = Tokenizer.from_file(str(path))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}

    def token_id(key: str) -> int | None:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return tok.token_to_id(value) if value else None

    return TextTokenizer(tok, token_id("bos_token"), token_id("eos_token"), config.get("chat_template"),
                         add_bos=bool(config.get("add_bos_token", False)))
