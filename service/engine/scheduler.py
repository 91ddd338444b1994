"""Picks each step's batch under a token budget and a sequence cap; admits, preempts, and applies results.

A step first gives every running sequence its next tokens (one for a decoding sequence, the next
chunk for one still prefilling), then admits waiting sequences in (priority, arrival) order with
chunked prefill, so a long prompt never stalls the others' decoding. When blocks run out, the
newest running sequence is preempted: its blocks are freed and it goes back to the front of the
queue, to be recomputed later (its prefix blocks are often still in the prefix cache).

The scheduler is the one owner of a sequence's progress: admission (cached prefix), preemption
(back to zero) and, in `update`, the step's results (computed tokens, sampled tokens, new full blocks
committed to the prefix cache).
"""
from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass, field

from service.engine.block_manager import BlockManager
from service.engine.sequence import Sequence, Status
from service.engine.speculative import SpeculativeConfig, accepted_length, propose


@dataclass
class ScheduledBatch:
    sequences: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # a drafted sequence's drafts included
    num_preempted: int = 0
    drafts: list[tuple[int, int]] = field(default_factory=list)  # (proposed, kept) per drafted sequence

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.sequences)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 speculative: SpeculativeConfig | None = None):
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.blocks = block_manager
        self.speculative = speculative or SpeculativeConfig(0)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[tuple[tuple[int, int], Sequence]] = []  # sorted by (priority, order)
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self._order = itertools.count()
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence, front: bool = False) -> None:
        order = -next(self._order) if front else next(self._order)
        bisect.insort(self.waiting, ((seq.priority, order), seq), key=lambda item: item[0])

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the scheduler (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting = [item for item in self.waiting if item[1] is not seq]
        self.blocks.free(seq.seq_id)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.num_preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new == seq.num_tokens - seq.num_computed_tokens == 1:
                seq.draft_ids = self._drafts(seq, budget - 1)
                num_new += len(seq.draft_ids)
            while not self.blocks.ensure_slots(seq.seq_id, seq.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                break  # it preempted itself: nothing older is left to take blocks from
            batch.sequences.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            index += 1
        return budget

    def _drafts(self, seq: Sequence, room: int) -> list[int]:
        """A decoding sequence's draft tokens for this step (none unless they are likely to pay)."""
        spec = self.speculative
        k = spec.num_draft_tokens if seq.params.speculative_ngram is None else seq.params.speculative_ngram
        # A draft needs a slot in the context and in max_tokens, and the next sampled token one more.
        k = min(k, room, seq.params.max_tokens - seq.num_output_tokens - 1, spec.max_len - seq.num_tokens - 1)
        if k <= 0 or seq.grammar is not None or len(self.running) > spec.max_batch or not seq.drafting.may_draft():
            return []
        return propose(seq.all_ids, k, spec.max_ngram, spec.min_ngram)

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        skipped = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            key, seq = self.waiting[0]
            if seq.waits_for_sibling:
                skipped.append(self.waiting.pop(0))  # an n>1 sibling waits to share the prompt's blocks
                continue
            tokens = seq.all_ids
            uncached = len(tokens) - len(self.blocks.match_prefix(tokens)) * self.blocks.block_size
            num_new = min(uncached, budget)
            if not self.blocks.can_admit(tokens, num_new):
                break
            self.waiting.pop(0)
            seq.num_computed_tokens = self.blocks.admit(seq.seq_id, tokens)
            seq.num_cached_tokens = seq.num_computed_tokens
            self.blocks.ensure_slots(seq.seq_id, seq.num_computed_tokens + num_new)
            seq.status = Status.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            batch.sequences.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        self.waiting = skipped + self.waiting

    def update(self, batch: ScheduledBatch, spans: list[tuple[int, int]],
               token_ids: list[int]) -> list[tuple[Sequence, list[tuple[int, int]]]]:
        """Apply a step's results to the counters. spans[j] = (batch row, number of samples): the rows that
        reached their last token, with their samples in token_ids in that order (a drafted row has one per
        position). A drafted row keeps its drafts up to the first that differs from its sample, the rest of
        its K/V slots are given back. Returns (sequence, [(token, index in token_ids), ...]) for the tokens
        to append, in order. A sequence finished meanwhile (aborted, or a stop string found by deferred
        outputs) is left alone. The caller appends the tokens, calling commit_blocks before the last."""
        samples = dict(_offsets(spans))
        appended = []
        for row, (seq, n) in enumerate(zip(batch.sequences, batch.num_new_tokens)):
            drafts, seq.draft_ids = seq.draft_ids, []
            if seq.is_finished:
                continue
            if row not in samples:
                seq.num_computed_tokens += n
                self.commit_blocks(seq)
                continue
            first, count = samples[row]
            kept = accepted_length(drafts, token_ids[first:first + count])
            seq.num_computed_tokens += n - len(drafts) + kept
            if drafts:
                seq.drafting.record(len(drafts), kept)
                batch.drafts.append((len(drafts), kept))
                self.blocks.trim(seq.seq_id, seq.num_computed_tokens + 1)
            appended.append((seq, [(token_ids[first + j], first + j) for j in range(kept + 1)]))
        return appended

    def commit_blocks(self, seq: Sequence) -> None:
        """Commit a sequence's new full blocks to the prefix cache. Called when all its computed tokens are
        in all_ids: here for a prefill chunk, by the core before it appends a step's last sampled token."""
        if not seq.is_finished and self.blocks.has_new_full_block(seq.seq_id, seq.num_computed_tokens):
            self.blocks.commit(seq.seq_id, seq.all_ids, seq.num_computed_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.draft_ids = []
        self.blocks.free(seq.seq_id)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq, front=True)


def _offsets(spans: list[tuple[int, int]]):
    """(row, (first sample's index, number of samples)) for each span, the samples laid out in order."""
    first = 0
    for row, count in spans:
        yield row, (first, count)
        first += count
