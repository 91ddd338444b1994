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


@dataclass
class ScheduledBatch:
    sequences: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.sequences)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.blocks = block_manager
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

    def update(self, batch: ScheduledBatch, sampled_rows: list[int],
               token_ids: list[int]) -> list[tuple[Sequence, int]]:
        """Apply a step's results: each sequence's scheduled tokens are now computed, the rows that reached
        their last token get their sampled token (token_ids[k] for batch row sampled_rows[k]), and full
        blocks are committed to the prefix cache. Returns (sequence, k) for every token appended.
        A sequence finished meanwhile (aborted, or a stop string found by deferred outputs) is left alone."""
        for seq, n in zip(batch.sequences, batch.num_new_tokens):
            if not seq.is_finished:
                seq.num_computed_tokens += n
        now = time.monotonic()
        appended = []
        for k, row in enumerate(sampled_rows):
            seq = batch.sequences[row]
            if not seq.is_finished:
                seq.append_token(token_ids[k], now)
                appended.append((seq, k))
        for seq in batch.sequences:
            if not seq.is_finished and self.blocks.has_new_full_block(seq.seq_id, seq.num_computed_tokens):
                self.blocks.commit(seq.seq_id, seq.all_ids, seq.num_computed_tokens)
        return appended

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq, front=True)
