"""The step core: schedule -> run -> update -> outputs, over the live requests (on whichever thread drives it).

It owns the parts of one step: the block manager and scheduler (which sequences run, every counter and
block commit), the runner (tensors, forward, sampling) and the output processor (text, stop strings,
delivery). Its one map is the live requests by id; everything per sequence lives on the Sequence.
Finishing a sequence is one call, `finish`, whatever the reason. A constrained request whose grammar
is still compiling waits in `awaiting`, outside the scheduler, while the others keep decoding.
"""
from __future__ import annotations

import logging
import time
import traceback
import weakref
from concurrent.futures import FIRST_COMPLETED, wait
from typing import TYPE_CHECKING

import torch

from model.loading import LoadedModel
from service.engine.block_manager import BlockManager
from service.engine.config import EngineConfig
from service.engine.errors import RequestRejected
from service.engine.heap import HeapTrimmer
from service.engine.outputs import OutputProcessor, RequestOutput
from service.engine.runner import Runner, plan_cache
from service.engine.scheduler import ScheduledBatch, Scheduler
from service.engine.sequence import Sequence, SequenceGroup
from service.engine.speculative import SpeculativeConfig
from service.engine.status import EngineEvents, EngineInfo, EngineSnapshot, StepStats
from service.engine.threads import ThreadTuner

if TYPE_CHECKING:
    from service.engine.structured.compiler import CompiledGrammar

log = logging.getLogger("kvserve.engine")


class EngineCore:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, events: EngineEvents):
        cache = plan_cache(loaded, config.block_size, config.kv_cache_memory, config.gpu_memory_utilization,
                           config.kv_cache_dtype)
        self.max_model_len = min(config.max_model_len or loaded.config.max_position, loaded.config.max_position)
        self.runner = Runner(loaded, cache, seed=config.seed, cuda_graphs=config.cuda_graphs,
                             max_batch=config.max_num_seqs, max_model_len=self.max_model_len)
        self.blocks = BlockManager(cache.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   SpeculativeConfig(config.speculative_ngram, max_batch=config.speculative_max_batch,
                                                     max_len=self.max_model_len))
        defer = loaded.device.type == "cuda" if config.defer_outputs is None else config.defer_outputs
        # The processor calls back into this core through a weak reference: a bound method would make the two a
        # reference cycle, and the engine with its KV cache (a GiB on a CPU) would outlive its last user until
        # the next garbage collection.
        finish = weakref.WeakMethod(self.finish)
        self.outputs = OutputProcessor(self.max_model_len, defer, lambda *args: finish()(*args))
        self.groups: dict[str, SequenceGroup] = {}  # live requests by id
        self.awaiting: list[SequenceGroup] = []  # live requests whose grammar is being compiled
        self.events = events
        tuned = config.adaptive_threads and loaded.device.type == "cpu"
        self.threads = ThreadTuner(torch.get_num_threads() if tuned else 1, torch.set_num_threads)
        self.heap = HeapTrimmer(loaded.device.type == "cpu")
        self.info = EngineInfo(
            model=loaded.source, name=loaded.config.name, architecture=loaded.config.architecture,
            max_model_len=self.max_model_len, vocab_size=loaded.config.vocab_size,
            dtype=str(loaded.dtype).removeprefix("torch."), quantization=loaded.quantization,
            device=loaded.device.type, block_size=cache.block_size, kv_cache_blocks=cache.num_blocks,
            kv_cache_dtype=str(cache.dtype).removeprefix("torch."), num_parameters=loaded.num_parameters)

    # --- requests in and out ----------------------------------------------------------------
    def add(self, group: SequenceGroup) -> None:
        if group.request_id in self.groups:
            # A second live request with the same id would be indistinguishable in its outputs: answer
            # it with an error rather than serve two streams under one id.
            for seq in group.sequences:
                seq.mark_finished("error")
                out = self.outputs.final(seq, "error", None, f"request id {group.request_id!r} is already in use")
                self.outputs.send(group, out)
            return
        self.groups[group.request_id] = group
        if group.grammar is not None and not group.grammar.done():
            self.awaiting.append(group)
        else:
            self._start(group)

    def _start(self, group: SequenceGroup) -> None:
        """Hand a request's samples to the scheduler, each constrained one with its own matcher."""
        if group.grammar is not None:
            compiled = _compiled(group)
            if isinstance(compiled, str):
                for seq in group.sequences:
                    self.finish(seq, "error", error=compiled)
                return
            for seq in group.sequences:
                seq.grammar = compiled.new_state()
        for seq in group.sequences:
            self.scheduler.add(seq)

    def _start_compiled(self) -> None:
        """Start the awaiting requests whose grammar is ready; drop those aborted meanwhile."""
        still = []
        for group in self.awaiting:
            if group.is_finished:
                continue
            if group.grammar.done():
                self._start(group)
            else:
                still.append(group)
        self.awaiting = still

    def wait_for_grammars(self, timeout: float) -> None:
        """Block until an awaited grammar is ready (for a caller stepping by hand with nothing else to run)."""
        if self.awaiting:
            wait([group.grammar for group in self.awaiting], timeout, FIRST_COMPLETED)

    def abort(self, request_id: str) -> None:
        group = self.groups.get(request_id)
        for seq in group.sequences if group is not None else []:
            if not seq.is_finished:
                self.finish(seq, "abort")

    def abort_all(self) -> None:
        for request_id in list(self.groups):
            self.abort(request_id)

    def fail_all(self, message: str, reason: str = "error") -> None:
        """End every live sequence (the loop is stopping); what the last step produced still goes out."""
        try:
            self.outputs.flush()
        except Exception:
            log.exception("could not emit the last step's outputs")
        for group in list(self.groups.values()):
            for seq in group.sequences:
                if not seq.is_finished:
                    self.finish(seq, reason, error=message)

    def finish(self, seq: Sequence, reason: str, last: RequestOutput | None = None, error: str | None = None) -> None:
        """The one release: the sequence's blocks go back, its request leaves when its last sample does,
        then its final output is sent (so a caller that sees it finished sees its blocks freed too)."""
        seq.mark_finished(reason)
        self.scheduler.remove(seq)
        group = seq.group
        if group.is_finished:
            self.groups.pop(group.request_id, None)
        self.outputs.send(group, self.outputs.final(seq, reason, last, error))
        for listener in self.events.on_finish:
            listener(seq)

    # --- one step ---------------------------------------------------------------------------
    def has_work(self) -> bool:
        """Something to schedule, or an awaited grammar that is ready (or a request aborted while waiting)."""
        return self.scheduler.has_work() or any(group.is_finished or group.grammar.done()
                                                for group in self.awaiting)

    @property
    def num_awaiting(self) -> int:
        return sum(len(group.sequences) for group in self.awaiting if not group.is_finished)

    def schedule(self) -> ScheduledBatch:
        """The next step's batch (admissions and preemptions done); run() it."""
        for group in self.outputs.undeliverable:
            self.abort(group.request_id)
        self.outputs.undeliverable.clear()
        self._start_compiled()
        return self.scheduler.schedule()

    def run(self, batch: ScheduledBatch) -> None:
        """Run a scheduled step: forward and sample, apply the results, hand the new tokens to the outputs."""
        if not batch:
            self.outputs.flush()
            return
        decode_only = batch.total_tokens == len(batch.sequences)
        self.threads.begin(len(batch.sequences), decode_only)
        start = time.perf_counter()
        try:
            tables = [self.blocks.table(seq.seq_id) for seq in batch.sequences]
            rows, pending = self.runner.execute(batch.sequences, batch.num_new_tokens, tables)
            self.outputs.flush()  # the last step's outputs, while the device runs this one
            result = pending.resolve() if pending is not None else None
            self.threads.end(len(batch.sequences), decode_only, time.perf_counter() - start)
        except Exception as exc:  # a failed step fails only its own sequences
            log.error("step failed:\n%s", traceback.format_exc())
            for seq in batch.sequences:
                if not seq.is_finished:
                    self.finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
            return
        finally:
            self.heap.after_step(batch.total_tokens)
        now = time.monotonic()
        for seq, tokens in self.scheduler.update(batch, rows, result.token_ids if result else []):
            for token, k in tokens:
                if seq.is_finished:  # a stop or the length reached inside this step's accepted drafts
                    break
                if seq.num_tokens == seq.num_computed_tokens:  # before the one token not yet computed
                    self.scheduler.commit_blocks(seq)
                seq.append_token(token, now)
                logprob = result.logprobs[k] if result.logprobs is not None else None
                top = result.top_logprobs[k] if result.top_logprobs is not None else None
                self.outputs.add_token(seq, token, logprob, top)
        self._report(batch, time.perf_counter() - start)

    def snapshot(self, dead_reason: str | None = None) -> EngineSnapshot:
        blocks, scheduler = self.blocks, self.scheduler
        waiting = scheduler.num_waiting + self.num_awaiting
        return EngineSnapshot(
            num_running=scheduler.num_running, num_waiting=waiting, num_awaiting_grammar=self.num_awaiting,
            num_unfinished=scheduler.num_running + waiting, kv_blocks_total=blocks.num_blocks,
            kv_blocks_used=blocks.num_used, kv_blocks_cached=blocks.num_cached,
            num_preemptions=scheduler.num_preemptions, prefix_queries=blocks.prefix_queries,
            prefix_hits=blocks.prefix_hits, healthy=dead_reason is None, dead_reason=dead_reason)

    def _report(self, batch: ScheduledBatch, duration: float) -> None:
        if not self.events.on_step:
            return
        # A drafted sequence's step is a decode step too: its last token and its drafts.
        decode = sum(1 for n in batch.num_new_tokens if n == 1) + sum(1 + p for p, _ in batch.drafts)
        stats = StepStats(batch.total_tokens, batch.total_tokens - decode, decode, len(batch.sequences),
                          duration, self.scheduler.num_running, self.scheduler.num_waiting, batch.num_preempted,
                          batch.drafts)
        for listener in self.events.on_step:
            listener(stats)


def _compiled(group: SequenceGroup) -> CompiledGrammar | str:
    """A done grammar future's CompiledGrammar, or the error message that fails the request."""
    future = group.grammar
    if future.cancelled():
        return "grammar compile was cancelled: the engine is stopping"
    if future.exception() is not None:
        return f"grammar compile failed: {type(future.exception()).__name__}: {future.exception()}"
    compiled = future.result()
    try:
        compiled.check(group.sequences[0].params.structured)
    except RequestRejected as exc:
        return str(exc)
    return compiled
