"""A model's chat template: where a checkpoint keeps it, and rendering it as transformers' apply_chat_template
does, so that a prompt kvserve builds is the text the model was tuned on.

What rendering must match: the same Jinja settings (trim_blocks, lstrip_blocks, the loopcontrols extension,
a sandbox), the same helpers (raise_exception, strftime_now, a tojson that keeps non-ASCII), the
`{% generation %}` tag some templates mark assistant text with (rendered as its body), and the same
variables: messages, tools and documents (None when absent), add_generation_prompt, and every special
token's text by name (bos_token, eos_token, unk_token, pad_token, ..., additional_special_tokens).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.loading.weights import LoadError

DEFAULT, TOOL_USE = "default", "tool_use"  # the names a checkpoint's list of templates uses


class ChatTemplateError(ValueError):
    """The chat template rejected the messages (e.g. roles out of order)."""


@dataclass
class ChatTemplate:
    """A checkpoint's templates by name ("default", and "tool_use" where it has one for requests with tools)
    and the special tokens' texts they render with."""
    templates: dict[str, str]
    special_tokens: dict[str, str | list[str]] = field(default_factory=dict)

    @property
    def source(self) -> str | None:
        return self.templates.get(DEFAULT)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **extra) -> str:
        source = self.templates.get(TOOL_USE) if tools else None
        source = source or self.source
        if not source:
            raise ChatTemplateError("this model has no chat template")
        variables = {**self.special_tokens, **extra}
        try:
            return _compile(source).render(messages=messages, tools=tools, documents=documents,
                                           add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc


def templates_from_folder(folder: Path, tokenizer_config: dict) -> dict[str, str]:
    """The folder's chat templates: chat_template.jinja (where transformers >= 4.43 saves it), else
    chat_template.json, else tokenizer_config.json's "chat_template" (one string, or a list of named ones)."""
    if (folder / "chat_template.jinja").exists():
        return {DEFAULT: (folder / "chat_template.jinja").read_text()}
    raw = tokenizer_config.get("chat_template")
    if (folder / "chat_template.json").exists():
        try:
            raw = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
        except (OSError, json.JSONDecodeError) as exc:
            raise LoadError(f"{folder / 'chat_template.json'}: unreadable: {exc}") from exc
    if isinstance(raw, str):
        return {DEFAULT: raw}
    if isinstance(raw, list):
        return {entry["name"]: entry["template"] for entry in raw}
    return {}


def special_token_texts(tokenizer_config: dict) -> dict[str, str | list[str]]:
    """tokenizer_config.json's special tokens as texts by name (entries may be strings or AddedToken dicts)."""
    def text(value):
        return value.get("content") if isinstance(value, dict) else value

    names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    texts: dict[str, str | list[str]] = {name: text(tokenizer_config[name]) for name in names
                                         if text(tokenizer_config.get(name))}
    extra = tokenizer_config.get("additional_special_tokens")
    if extra:
        texts["additional_special_tokens"] = [text(token) for token in extra]
    return texts


def _raise(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to find assistant text for training
    masks; a prompt renders its body as it is."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


@lru_cache(maxsize=8)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, "jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    env.filters["tojson"] = _tojson
    return env.from_string(source)
