"""The step core: schedule -> run -> update -> outputs, over the live requests (on whichever thread drives it).

It owns the parts of one step: the block manager and scheduler (which sequences run, every counter and
block commit), the runner (tensors, forward, sampling) and the output processor (text, stop strings,
delivery). Its one map is the live requests by id; everything per sequence lives on the Sequence.
Finishing a sequence is one call, `finish`, whatever the reason.
"""
from __future__ import annotations

import logging
import time
import traceback

from model.loading import LoadedModel
from service.engine.block_manager import BlockManager
from service.engine.config import EngineConfig
from service.engine.outputs import OutputProcessor, RequestOutput
from service.engine.runner import Runner, plan_cache
from service.engine.scheduler import ScheduledBatch, Scheduler
from service.engine.sequence import Sequence, SequenceGroup
from service.engine.status import EngineEvents, EngineInfo, EngineSnapshot, StepStats

log = logging.getLogger("kvserve.engine")


class EngineCore:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, events: EngineEvents):
        cache = plan_cache(loaded, config.block_size, config.kv_cache_memory, config.gpu_memory_utilization)
        self.max_model_len = min(config.max_model_len or loaded.config.max_position, loaded.config.max_position)
        self.runner = Runner(loaded, cache, seed=config.seed, cuda_graphs=config.cuda_graphs,
                             max_batch=config.max_num_seqs, max_model_len=self.max_model_len)
        self.blocks = BlockManager(cache.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        defer = loaded.device.type == "cuda" if config.defer_outputs is None else config.defer_outputs
        self.outputs = OutputProcessor(self.max_model_len, defer, self.finish)
        self.groups: dict[str, SequenceGroup] = {}  # live requests by id
        self.events = events
        self.info = EngineInfo(
            model=loaded.source, name=loaded.config.name, architecture=loaded.config.architecture,
            max_model_len=self.max_model_len, vocab_size=loaded.config.vocab_size,
            dtype=str(loaded.dtype).removeprefix("torch."), quantization=loaded.quantization,
            device=loaded.device.type, block_size=cache.block_size, kv_cache_blocks=cache.num_blocks,
            num_parameters=loaded.num_parameters)

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
        for seq in group.sequences:
            self.scheduler.add(seq)

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
        return self.scheduler.has_work()

    def schedule(self) -> ScheduledBatch:
        """The next step's batch (admissions and preemptions done); run() it."""
        for group in self.outputs.undeliverable:
            self.abort(group.request_id)
        self.outputs.undeliverable.clear()
        return self.scheduler.schedule()

    def run(self, batch: ScheduledBatch) -> None:
        """Run a scheduled step: forward and sample, apply the results, hand the new tokens to the outputs."""
        if not batch:
            self.outputs.flush()
            return
        start = time.perf_counter()
        try:
            tables = [self.blocks.table(seq.seq_id) for seq in batch.sequences]
            rows, pending = self.runner.execute(batch.sequences, batch.num_new_tokens, tables)
            self.outputs.flush()  # the last step's outputs, while the device runs this one
            result = pending.resolve() if pending is not None else None
        except Exception as exc:  # a failed step fails only its own sequences
            log.error("step failed:\n%s", traceback.format_exc())
            for seq in batch.sequences:
                if not seq.is_finished:
                    self.finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
            return
        for seq, k in self.scheduler.update(batch, rows, result.token_ids if result else []):
            logprob = result.logprobs[k] if result.logprobs is not None else None
            top = result.top_logprobs[k] if result.top_logprobs is not None else None
            self.outputs.add_token(seq, seq.output_ids[-1], logprob, top)
        self._report(batch, time.perf_counter() - start)

    def snapshot(self, dead_reason: str | None = None) -> EngineSnapshot:
        blocks, scheduler = self.blocks, self.scheduler
        return EngineSnapshot(
            num_running=scheduler.num_running, num_waiting=scheduler.num_waiting,
            num_unfinished=scheduler.num_running + scheduler.num_waiting, kv_blocks_total=blocks.num_blocks,
            kv_blocks_used=blocks.num_used, kv_blocks_cached=blocks.num_cached,
            num_preemptions=scheduler.num_preemptions, prefix_queries=blocks.prefix_queries,
            prefix_hits=blocks.prefix_hits, healthy=dead_reason is None, dead_reason=dead_reason)

    def _report(self, batch: ScheduledBatch, duration: float) -> None:
        if not self.events.on_step:
            return
        decode = sum(1 for n in batch.num_new_tokens if n == 1)
        stats = StepStats(batch.total_tokens, batch.total_tokens - decode, decode, len(batch.sequences),
                          duration, self.scheduler.num_running, self.scheduler.num_waiting, batch.num_preempted)
        for listener in self.events.on_step:
            listener(stats)

