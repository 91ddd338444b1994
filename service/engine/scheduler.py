"""Picks each step's batch under a token budget and a sequence cap; admits, preempts and finishes.

A step first gives every running request its next tokens (one for a decoding request, the next
chunk for one still prefilling), then admits waiting requests in (priority, arrival) order with
chunked prefill, so a long prompt never stalls the others' decoding. When blocks run out, the
newest running request is preempted: its blocks are freed and it goes back to the front of the
queue, to be recomputed later (its prefix blocks are often still in the prefix cache).
"""
from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass, field

from service.engine.block_manager import BlockManager
from service.engine.request import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[tuple[tuple[int, int], Request]] = []  # sorted by (priority, order)
        self.running: list[Request] = []  # admission order: the last is the newest
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

    def add(self, request: Request, front: bool = False) -> None:
        order = -next(self._order) if front else next(self._order)
        bisect.insort(self.waiting, ((request.priority, order), request), key=lambda item: item[0])

    def remove(self, request: Request) -> None:
        """Take a request out of the scheduler (finished or aborted) and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting = [item for item in self.waiting if item[1] is not request]
        self.blocks.free(request.request_id)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.num_preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.blocks.ensure_slots(request.request_id, request.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is request:
                    break
            if request.status != Status.RUNNING:
                break  # it preempted itself: nothing older is left to take blocks from
            batch.requests.append(request)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            index += 1
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        skipped = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            key, request = self.waiting[0]
            if request.wait_for is not None and not request.wait_for.prompt_done:
                skipped.append(self.waiting.pop(0))  # an n>1 sibling waits to share the prompt's blocks
                continue
            tokens = request.all_ids
            uncached = len(tokens) - len(self.blocks.match_prefix(tokens)) * self.blocks.block_size
            num_new = min(uncached, budget)
            if not self.blocks.can_admit(tokens, num_new):
                break
            self.waiting.pop(0)
            request.num_computed_tokens = self.blocks.admit(request.request_id, tokens)
            request.num_cached_tokens = request.num_computed_tokens
            self.blocks.ensure_slots(request.request_id, request.num_computed_tokens + num_new)
            request.status = Status.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            batch.requests.append(request)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        self.waiting = skipped + self.waiting

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.free(request.request_id)
        request.status = Status.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.add(request, front=True)
