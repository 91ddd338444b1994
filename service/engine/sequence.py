"""One Sequence per sample being generated, and the SequenceGroup of a request's n samples (plain Python).

A Sequence carries everything the engine knows about one sample: its tokens and counters, its
sampling parameters, the detokenizer that turns its ids into text and the random generator of a seeded
request. Nothing about a sequence lives in a side table keyed by its id, so finishing one is a single
release (the scheduler frees its KV blocks; the rest goes with the object).
"""
from __future__ import annotations

import enum
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.engine.request import SamplingParams
from service.engine.speculative import DraftState

if TYPE_CHECKING:
    from concurrent.futures import Future

    from service.engine.detokenizer import IncrementalDetokenizer
    from service.engine.outputs import RequestOutput
    from service.engine.structured.compiler import CompiledGrammar
    from service.engine.structured.masking import GrammarState

OutputSink = Callable[["RequestOutput"], None]


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample: prompt + output tokens, how many of them are in the KV cache, and its per-sample state."""
    prompt_ids: list[int]
    params: SamplingParams
    seq_id: Hashable  # the block manager's key for its table: (request id, index) in a group
    stop_ids: list[int] = field(default_factory=list)  # token ids that end it (EOS unless ignored, stop_token_ids)
    priority: int = 0  # lower runs first; ties by arrival
    group: SequenceGroup | None = None  # the request it belongs to (None: a bare sequence, e.g. in tests)
    index: int = 0  # which of the group's n samples this is
    detokenizer: IncrementalDetokenizer | None = None
    grammar: GrammarState | None = None  # a constrained sample's matcher, set when its grammar is compiled
    output_ids: list[int] = field(default_factory=list)
    draft_ids: list[int] = field(default_factory=list)  # this step's draft tokens, after output_ids
    drafting: DraftState = field(default_factory=DraftState)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache on admission
    num_preemptions: int = 0
    finish_reason: str | None = None
    # Timestamps (time.monotonic()) for latency metrics.
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None

    @property
    def request_id(self) -> str | None:
        return self.group.request_id if self.group is not None else None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """(all_ids + draft_ids)[start:end] without building all_ids (a decode step reads one output token)."""
        outputs = self.output_ids + self.draft_ids if self.draft_ids else self.output_ids
        prompt_len = len(self.prompt_ids)
        if start >= prompt_len:
            return outputs[start - prompt_len:end - prompt_len]
        if end <= prompt_len:
            return self.prompt_ids[start:end]
        return (self.prompt_ids + outputs)[start:end]

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

    @property
    def waits_for_sibling(self) -> bool:
        """An n>1 sample is admitted once the first sample's prompt is cached, so it shares those blocks
        instead of computing the same prompt again."""
        return self.index > 0 and self.group is not None and not self.group.sequences[0].prompt_done

    def append_token(self, token: int, now: float) -> None:
        """The one place an output token is added: the grammar consumes it here too, so the matcher's
        state always matches output_ids (a preempted sequence keeps both and recomputes only K/V)."""
        self.output_ids.append(token)
        if self.grammar is not None:
            self.grammar.consume(token)
        self.token_times.append(now)
        if self.first_token_time is None:
            self.first_token_time = now

    def mark_finished(self, reason: str) -> None:
        self.status, self.finish_reason = Status.FINISHED, reason
        self.finish_time = time.monotonic()


@dataclass(eq=False)
class SequenceGroup:
    """One request: its n samples, which share a prompt and one output sink."""
    request_id: str
    sequences: list[Sequence]
    sink: OutputSink | None = None
    # A constrained request's grammar on its way from the compile workers; the core admits the
    # request's samples once it is done (each gets its own matcher).
    grammar: Future[CompiledGrammar] | None = None

    @classmethod
    def create(cls, request_id: str, prompt_ids: list[int], params: SamplingParams, stop_ids: list[int],
               sink: OutputSink | None = None, priority: int = 0,
               detokenizer: Callable[[], IncrementalDetokenizer] | None = None,
               grammar: Future[CompiledGrammar] | None = None) -> SequenceGroup:
        group = cls(request_id, [], sink, grammar)
        group.sequences = [Sequence(list(prompt_ids), params, (request_id, i), list(stop_ids), priority=priority,
                                    group=group, index=i, detokenizer=detokenizer() if detokenizer else None)
                           for i in range(params.n)]
        return group

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)
