"""N-gram speculative decoding (prompt lookup): draft tokens from the sequence's own text, verified in the
ordinary step.

The drafter looks for the last n tokens (n from `max_ngram` down to `min_ngram`) earlier in the prompt
and output, latest occurrence first, and proposes the up-to-k tokens that followed it. The scheduler
schedules a drafted sequence's last token plus its drafts like a short prefill chunk; the sampler samples
every position as if the drafts before it were accepted, and the scheduler keeps the drafts up to the first
one that differs from its position's sample, plus that sample. Each position's randomness is keyed on
(request seed, sample index, output position), so the kept tokens are exactly those decoding one token a
step would produce.

When drafts pay: a draft costs one more row in a step. At batch 1 a step's time is mostly per-step work
(weights streamed once, Python and dispatch), so a few more rows are nearly free; in a large batch the step
is already compute-heavy, and rejected rows are waste. The scheduler drafts only while at most
`max_batch` sequences run: 1 by default, from bench/results/speculative.md, where drafting at every batch
size gave 1.15x at 1 running sequence, 1.00x at 2 (0.91x in another run), 0.70x at 4 and 0.49x at 16 on
2 CPU cores (a drafted step has several rows per sequence, past the small-batch kernels' sweet spot). A sequence whose drafts keep
failing backs off: after `BACKOFF_AFTER` consecutive steps with nothing accepted it skips 2, 4, 8, ... steps
(at most MAX_BACKOFF) before it drafts again.
"""
from __future__ import annotations

from dataclasses import dataclass

BACKOFF_AFTER = 2
MAX_BACKOFF = 32
MASK64 = (1 << 64) - 1


@dataclass
class SpeculativeConfig:
    num_draft_tokens: int  # k: the most drafts per step (0: off)
    max_ngram: int = 4
    min_ngram: int = 2
    max_batch: int = 1  # draft only while at most this many sequences run
    max_len: int = 1 << 30  # the context length: drafts never reach past it


@dataclass
class DraftState:
    """A sequence's drafting history: what was proposed and kept, and its back-off."""
    proposed: int = 0
    accepted: int = 0
    failures: int = 0  # consecutive steps whose drafts were all rejected
    skip: int = 0  # steps left before the next proposal
    backoff: int = 1

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.proposed += num_proposed
        self.accepted += num_accepted
        if num_accepted:
            self.failures, self.backoff = 0, 1
            return
        self.failures += 1
        if self.failures >= BACKOFF_AFTER:
            self.backoff = min(self.backoff * 2, MAX_BACKOFF)
            self.skip, self.failures = self.backoff, 0

    def may_draft(self) -> bool:
        if self.skip:
            self.skip -= 1
            return False
        return True


def propose(tokens: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of tokens' last n-gram (longest n first)."""
    if k <= 0:
        return []
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        suffix = tokens[-n:]
        # The latest match wins: recent text predicts what comes next best. Start before the suffix itself.
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def position_seed(seed: int, index: int, position: int) -> int:
    """The seed of one output position's draw: the same with or without drafts, for every position."""
    return hash((seed, index, position)) & MASK64


def accepted_length(drafts: list[int], samples: list[int]) -> int:
    """How many drafts are kept: those up to the first that differs from its position's sample."""
    count = 0
    while count < len(drafts) and drafts[count] == samples[count]:
        count += 1
    return count
