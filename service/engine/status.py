"""What the engine tells the rest of the server about itself: static facts, a per-step snapshot, events.

Only the engine's own thread touches the scheduler, the block manager and the sequences. Every other
thread (metrics scrapes, /health, admission, the drain on shutdown) reads the EngineSnapshot the engine
publishes after each step: an immutable value, replaced whole, so a reader never sees half an update.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.engine.sequence import Sequence


@dataclass(frozen=True)
class EngineInfo:
    """Facts fixed at start-up: the model and the engine's capacity."""
    model: str  # where the weights came from (a path, or random:PRESET)
    name: str  # the model's own name (GGUF general.name, the folder name, a preset)
    architecture: str
    max_model_len: int
    vocab_size: int
    dtype: str
    quantization: str | None
    device: str
    block_size: int
    kv_cache_blocks: int
    kv_cache_dtype: str  # of the cached keys and values, e.g. float16
    num_parameters: int = 0  # before quantization (0: not counted, e.g. a hand-built test model)

    @property
    def kv_cache_tokens(self) -> int:
        return self.kv_cache_blocks * self.block_size


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state after its latest step."""
    num_running: int = 0
    num_waiting: int = 0  # sequences in the scheduler's queue or awaiting a grammar (not the engine's inbox)
    num_awaiting_grammar: int = 0  # of those, sequences whose grammar is still compiling
    num_unfinished: int = 0  # live sequences, running or waiting
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0  # free blocks that still hold a reusable prefix
    num_preemptions: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, tokens found
    healthy: bool = True
    dead_reason: str | None = None

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass
class StepStats:
    """A summary of one step, for metrics (recorded outside the model's hot path)."""
    num_tokens: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_sequences: int
    duration: float
    num_running: int
    num_waiting: int
    num_preempted: int
    drafts: list[tuple[int, int]] = field(default_factory=list)  # (proposed, kept) per drafted sequence


@dataclass
class EngineEvents:
    """Listeners, called on the thread where the event happens: steps and finished sequences on the
    engine's thread, refusals and accepted constrained requests on the caller's, compiles on a worker's."""
    on_step: list[Callable[[StepStats], None]] = field(default_factory=list)
    on_finish: list[Callable[[Sequence], None]] = field(default_factory=list)
    on_refusal: list[Callable[[str], None]] = field(default_factory=list)  # called with a reason
    # A constrained request accepted, with its kind (json, regex, choice, grammar); on the caller's thread.
    on_constrained: list[Callable[[str], None]] = field(default_factory=list)
    # A grammar compiled (cache hits are not compiles): kind, seconds, llguidance's error or None; on a
    # compile worker's thread.
    on_grammar_compiled: list[Callable[[str, float, str | None], None]] = field(default_factory=list)
