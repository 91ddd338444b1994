"""A request's sampling parameters and its life in the engine (plain Python, no torch)."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field


class InvalidParam(ValueError):
    """A sampling parameter out of range; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param} {message}")
        self.param = param


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

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise InvalidParam (a ValueError) naming the first out-of-range field."""
        checks = [
            ("n", self.n >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be -1, 0 or positive"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "must not exceed max_tokens"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise InvalidParam(name, f"{message}, got {getattr(self, name)!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One sequence being generated. n > 1 samples are separate Requests sharing a group id."""
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: list[int] = field(default_factory=list)  # token ids that end it (EOS unless ignored, stop_token_ids)
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    priority: int = 0  # lower runs first; ties by arrival
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache on admission
    num_preemptions: int = 0
    finish_reason: str | None = None
    wait_for: Request | None = None  # an n>1 sibling is admitted once this one's prompt is cached
    sample_index: int = 0  # which of the n samples this is
    # Timestamps (time.monotonic()) for latency metrics.
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building all_ids (a decode step reads one output token)."""
        prompt_len = len(self.prompt_ids)
        if start >= prompt_len:
            return self.output_ids[start - prompt_len:end - prompt_len]
        if end <= prompt_len:
            return self.prompt_ids[start:end]
        return self.all_ids[start:end]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def prompt_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens or self.is_finished

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED


@dataclass
class RequestOutput:
    """What one step produced for one sample of a request; the last one carries finish_reason."""
    request_id: str
    index: int  # which of the n samples
    new_text: str
    new_token_ids: list[int]
    logprobs: list[float] | None  # per new token: its logprob under the model
    top_logprobs: list[list[tuple[int, float]]] | None  # per new token: the top alternatives
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
