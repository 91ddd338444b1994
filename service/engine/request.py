"""A request's sampling parameters (plain Python, no torch)."""
from __future__ import annotations

from dataclasses import dataclass, field

# InvalidParam lives beside the ranges it reports; callers keep importing it from here.
from service.engine.structured.spec import StructuredOutput
from service.engine.validation import InvalidParam, check_sampling_ranges


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Defaults follow the OpenAI API where it has one."""
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 (or -1) keeps every token
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL-style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI-style, over output tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's plus the top k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # The output must match this (JSON schema, regex, choice or grammar); it ends where the grammar does.
    structured: StructuredOutput | None = None
    # Draft tokens per step by n-gram lookup (speculative.py): None, the engine's setting; 0, none.
    speculative_ngram: int | None = None

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise InvalidParam (a ValueError) naming the first out-of-range field."""
        check_sampling_ranges(self)
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise InvalidParam("structured", f"must be a StructuredOutput, got {type(self.structured).__name__}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
