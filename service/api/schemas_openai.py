"""Request bodies of the OpenAI-compatible routes; each maps onto the engine's SamplingParams."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.api.limits import MAX_REPETITION_PENALTY, check_stop_strings, engine_range
from service.engine import SamplingParams
from service.engine.structured import StructuredOutput


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions, with kvserve's extensions."""
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None  # none: the served model, as vLLM does
    temperature: float = Field(1.0, **engine_range("temperature", le=2))
    top_p: float = Field(1.0, **engine_range("top_p"))
    n: int = Field(1, **engine_range("n", le=16))
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, **engine_range("presence_penalty"))
    frequency_penalty: float = Field(0.0, **engine_range("frequency_penalty"))
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # what torch.Generator accepts (+ n - 1)
    user: str | None = None
    # Extensions (vLLM names)
    top_k: int = Field(0, **engine_range("top_k"))
    min_p: float = Field(0.0, **engine_range("min_p"))
    repetition_penalty: float = Field(1.0, **engine_range("repetition_penalty", le=MAX_REPETITION_PENALTY))
    min_tokens: int = Field(0, **engine_range("min_tokens"))
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    speculative_ngram: int | None = Field(None, **engine_range("speculative_ngram"))  # drafts a step; 0: none
    # Constrained output (service/api/constraints.py): OpenAI's field and vLLM's, one per request.
    response_format: dict | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        check_stop_strings([value] if isinstance(value, str) else value or [])
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        for key, bias in (value or {}).items():
            if not re.fullmatch(r"-?[0-9]+", key):  # str.isdigit() also accepts "²", which int() refuses
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {key} must be in [-100, 100], got {bias}")
        return value

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        structured: StructuredOutput | None = None) -> SamplingParams:
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, structured=structured,
            speculative_ngram=self.speculative_ngram)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, **engine_range("max_tokens"))
    logprobs: int | None = Field(None, **engine_range("logprobs", le=5))
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None  # either way the arguments follow `parameters`: they are constrained


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, **engine_range("max_tokens"))
    max_completion_tokens: int | None = Field(None, **engine_range("max_tokens"))
    logprobs: bool = False
    top_logprobs: int | None = Field(None, **engine_range("logprobs"))
    add_generation_prompt: bool = True
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool = True


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt or chat messages; {"text"} is a prompt too, and TGI's {"inputs"} is accepted."""
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    text: str | None = None
    inputs: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[int]
