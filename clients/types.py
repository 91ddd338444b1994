"""Typed responses. Unknown fields are kept (extra="allow"), so other OpenAI-compatible servers parse too."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


# OpenAI-shaped: /v1/completions, /v1/chat/completions, /v1/models


class CompletionChoice(_Model):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: dict | None = None


class Completion(_Model):
    id: str = ""
    model: str = ""
    choices: list[CompletionChoice] = []
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""


class CompletionChunk(Completion):
    """One streamed event of /v1/completions; the last one may carry only `usage`."""


class ChatMessage(_Model):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(_Model):
    index: int = 0
    message: ChatMessage = Field(default_factory=ChatMessage)
    finish_reason: str | None = None
    logprobs: dict | None = None


class ChatCompletion(_Model):
    id: str = ""
    model: str = ""
    choices: list[ChatChoice] = []
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return (self.choices[0].message.content or "") if self.choices else ""


class ChatDelta(_Model):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Model):
    index: int = 0
    delta: ChatDelta = Field(default_factory=ChatDelta)
    finish_reason: str | None = None
    logprobs: dict | None = None


class ChatCompletionChunk(_Model):
    id: str = ""
    model: str = ""
    choices: list[ChatChunkChoice] = []
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return (self.choices[0].delta.content or "") if self.choices else ""


class ModelCard(_Model):
    id: str
    max_model_len: int | None = None


class ModelList(_Model):
    data: list[ModelCard] = []


# Native, text-generation-inference-shaped: /generate, /generate_stream, /tokenize


class Token(_Model):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class GenerateDetails(_Model):
    finish_reason: str | None = None
    generated_tokens: int = 0
    seed: int | None = None
    tokens: list[Token] = []


class GenerateResponse(_Model):
    generated_text: str
    details: GenerateDetails | None = None

    @property
    def text(self) -> str:
        return self.generated_text


class StreamDetails(_Model):
    finish_reason: str | None = None
    generated_tokens: int = 0
    seed: int | None = None


class StreamResponse(_Model):
    """One streamed event of /generate_stream: a token; the last also carries the whole text."""
    index: int = 0
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None

    @property
    def text(self) -> str:
        return self.token.text


class Tokenized(_Model):
    tokens: list[int]
    count: int | None = None
    max_model_len: int | None = None
