"""The step loop: schedule -> run -> update -> emit, on its own thread (or driven by hand, offline).

Only the engine thread touches the scheduler, the block manager and the requests. Other threads talk
to it through `add_request` and `abort`, which validate, then hand work over through an inbox.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from model.loading import LoadedModel
from service.engine.block_manager import BlockManager
from service.engine.config import EngineConfig
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.errors import EngineDead, EngineOverloaded, RequestRejected
from service.engine.request import Request, RequestOutput, SamplingParams, Status
from service.engine.runner import Runner, plan_cache
from service.engine.scheduler import ScheduledBatch, Scheduler
from service.engine.validation import validate_request

log = logging.getLogger("kvserve.engine")

OutputSink = Callable[[RequestOutput], None]


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


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        if loaded.tokenizer is None:
            raise ValueError(f"model {loaded.source} has no tokenizer")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        cache = plan_cache(loaded, config.block_size, config.kv_cache_memory, config.gpu_memory_utilization)
        self.max_model_len = min(config.max_model_len or loaded.config.max_position, loaded.config.max_position)
        self.runner = Runner(loaded, cache, seed=config.seed, cuda_graphs=config.cuda_graphs,
                             max_batch=config.max_num_seqs, max_model_len=self.max_model_len)
        self.blocks = BlockManager(cache.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self.groups: dict[str, list[Request]] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.sinks: dict[str, OutputSink] = {}
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self.finish_listeners: list[Callable[[Request], None]] = []
        self.refusal_listeners: list[Callable[[str], None]] = []  # called with a reason
        self.defer_outputs = loaded.device.type == "cuda" if config.defer_outputs is None else config.defer_outputs
        self._deferred: list[tuple[Request, int, float | None, list | None]] = []  # (request, token, logprob, top)
        self._inbox: deque = deque()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead_reason: str | None = None

    # --- the API other threads use ----------------------------------------------------------
    @property
    def is_healthy(self) -> bool:
        return self.dead_reason is None

    @property
    def num_waiting(self) -> int:
        # Queued samples only: an abort waiting in the inbox is not a request (copy() is atomic under the GIL).
        queued = sum(len(samples) for kind, _, samples, _ in self._inbox.copy() if kind == "add")
        return self.scheduler.num_waiting + queued

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                    on_output: OutputSink | None = None, priority: int = 0) -> None:
        """Queue a request (n samples). Raises RequestRejected, EngineOverloaded or EngineDead."""
        try:
            if not self.is_healthy:
                raise EngineDead(f"engine is not running: {self.dead_reason}")
            params = validate_request(prompt_ids, params, self.tokenizer.vocab_size, self.max_model_len,
                                      self.blocks.num_blocks * self.blocks.block_size)
            if self.num_waiting + params.n > self.config.max_queue:
                raise EngineOverloaded(f"waiting queue is full ({self.config.max_queue} requests)")
        except (EngineDead, EngineOverloaded, RequestRejected) as exc:
            reason = {EngineDead: "engine_dead", EngineOverloaded: "overloaded"}.get(type(exc), "rejected")
            for listener in self.refusal_listeners:
                listener(reason)
            raise
        samples = [Request(list(prompt_ids), params, self._stop_ids(params), request_id=f"{request_id}#{i}",
                           priority=priority, sample_index=i) for i in range(params.n)]
        for sibling in samples[1:]:
            sibling.wait_for = samples[0]
        self._inbox.append(("add", request_id, samples, on_output))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id, None, None))
        self._wakeup.set()

    def abort_all(self) -> None:
        self._inbox.append(("abort_all", None, None, None))
        self._wakeup.set()

    # --- the thread -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wakeup.clear()
                self._drain_inbox()
                if not self.scheduler.has_work():
                    self._emit_deferred()
                    self._wakeup.wait(0.5)
                    continue
                self.step()
        except BaseException as exc:  # the loop itself broke: say so, fail everyone, stop
            self.dead_reason = f"{type(exc).__name__}: {exc}"
            log.error("engine loop died:\n%s", traceback.format_exc())
            self._fail_all(f"engine stopped: {self.dead_reason}")
            return
        # Stopped on purpose: refuse new work and end what is still in flight, so no stream hangs.
        self.dead_reason = "engine stopped"
        self._fail_all(self.dead_reason, reason="abort")

    def _fail_all(self, message: str, reason: str = "error") -> None:
        try:
            self._emit_deferred()  # what the last step produced still reaches its streams
        except Exception:
            log.exception("could not emit the last step's outputs")
        self._drain_inbox()
        for request in list(self.requests.values()):
            self._finish(request, reason, error=message)

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, request_id, samples, sink = self._inbox.popleft()
            if kind == "add" and request_id in self.groups:
                self._refuse_duplicate(samples, sink)
            elif kind == "add":
                self.groups[request_id] = samples
                for request in samples:
                    self.requests[request.request_id] = request
                    self.detokenizers[request.request_id] = IncrementalDetokenizer(self.tokenizer, request.params)
                    self.sinks[request.request_id] = sink
                    self.scheduler.add(request)
            else:
                ids = list(self.groups) if kind == "abort_all" else [request_id]
                for request in [r for group_id in ids for r in self.groups.get(group_id, [])]:
                    if not request.is_finished:
                        self._finish(request, "abort")

    def _refuse_duplicate(self, samples: list[Request], sink: OutputSink | None) -> None:
        """A second live request with the same id would collide in the block tables; answer it
        with an error instead of letting the collision break the step loop."""
        for request in samples:
            request.status, request.finish_reason = Status.FINISHED, "error"
            out = self._output(request, "", [])
            out.finish_reason, out.error = "error", f"request id {out.request_id!r} is already in use"
            if sink is not None:
                self._send(sink, out)

    # --- one step ---------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self.requests or self._inbox)

    def step(self) -> None:
        self._drain_inbox()
        batch = self.scheduler.schedule()
        if not batch:
            self._emit_deferred()
            return
        start = time.perf_counter()
        try:
            tables = [self.blocks.table(r.request_id) for r in batch.requests]
            rows, pending = self.runner.execute(batch.requests, batch.num_new_tokens, tables)
            self._emit_deferred()  # the last step's outputs, while the device runs this one
            result = pending.resolve() if pending is not None else None
        except Exception as exc:  # a failed step fails only its own requests
            log.error("step failed:\n%s", traceback.format_exc())
            for request in batch.requests:
                if not request.is_finished:
                    self._finish(request, "error", error=f"{type(exc).__name__}: {exc}")
            return
        # A request can be finished already: a stop string found by _emit_deferred after this step began.
        for request, n in zip(batch.requests, batch.num_new_tokens):
            if not request.is_finished:
                request.num_computed_tokens += n
        now = time.monotonic()
        for k, i in enumerate(rows):
            if not batch.requests[i].is_finished:
                self._append_token(batch.requests[i], result, k, now)
        for request in batch.requests:
            if not request.is_finished and self.blocks.has_new_full_block(request.request_id,
                                                                          request.num_computed_tokens):
                self.blocks.commit(request.request_id, request.all_ids, request.num_computed_tokens)
        self._report(batch, time.perf_counter() - start)

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        ids = list(params.stop_token_ids)
        if not params.ignore_eos and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def _append_token(self, request: Request, result, k: int, now: float) -> None:
        token = result.token_ids[k]
        request.output_ids.append(token)
        request.token_times.append(now)
        if request.first_token_time is None:
            request.first_token_time = now
        logprob = result.logprobs[k] if result.logprobs is not None else None
        top = result.top_logprobs[k] if result.top_logprobs is not None else None
        if self.defer_outputs and token not in request.stop_ids and not self._reached_length(request):
            self._deferred.append((request, token, logprob, top))  # the scheduler needs only the id now
        else:
            self._emit_token(request, token, logprob, top)

    def _reached_length(self, request: Request) -> bool:
        return request.num_output_tokens >= request.params.max_tokens or request.num_tokens >= self.max_model_len

    def _emit_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for request, token, logprob, top in deferred:
            if not request.is_finished:  # not aborted meanwhile
                self._emit_token(request, token, logprob, top)

    def _emit_token(self, request: Request, token: int, logprob: float | None, top: list | None) -> None:
        """Detokenize a request's newest token, check its stop strings and length, and send the output."""
        detok = self.detokenizers[request.request_id]
        reason = stop_reason = None
        if token in request.stop_ids:  # the sampler never picks one before min_tokens
            text, reason, stop_reason = "", "stop", token
        else:
            text = detok.add(token)
            if detok.stop_matched is not None:
                reason, stop_reason = "stop", detok.stop_matched
            elif self._reached_length(request):
                reason = "length"
        out = self._output(request, text, [token], None if logprob is None else [logprob],
                           None if top is None else [top])
        out.stop_reason = stop_reason
        if reason is None:
            self._emit(request, out)
        else:
            self._finish(request, reason, pending=out)

    def _output(self, request: Request, text: str, token_ids: list[int], logprobs=None,
                top_logprobs=None) -> RequestOutput:
        group_id = request.request_id.rpartition("#")[0]
        return RequestOutput(group_id, request.sample_index, text, token_ids, logprobs, top_logprobs,
                             request.num_prompt_tokens, request.num_output_tokens, request.num_cached_tokens)

    def _emit(self, request: Request, out: RequestOutput) -> None:
        sink = self.sinks.get(request.request_id)
        if sink is not None and not self._send(sink, out):
            # Nobody can receive this request's outputs (e.g. the caller's event loop has closed).
            self.sinks.pop(request.request_id, None)
            if not out.finished:
                self.abort(out.request_id)

    def _send(self, sink: OutputSink, out: RequestOutput) -> bool:
        """Deliver one output. A sink that raises must not break the step loop: log it, return False."""
        try:
            sink(out)
            return True
        except Exception:
            log.exception("output sink of request %s failed", out.request_id)
            return False

    def _finish(self, request: Request, reason: str, pending: RequestOutput | None = None,
                error: str | None = None) -> None:
        detok = self.detokenizers.pop(request.request_id, None)
        out = pending or self._output(request, "", [])
        if detok is not None and detok.stop_matched is None:
            out.new_text += detok.finish()  # release held-back text unless a stop string cut it
        out.finish_reason, out.error = reason, error
        request.status, request.finish_reason = Status.FINISHED, reason
        request.finish_time = time.monotonic()
        self.scheduler.remove(request)
        self.runner.release(request.request_id)
        self.requests.pop(request.request_id, None)
        group_id = out.request_id
        if all(r.is_finished for r in self.groups.get(group_id, [])):
            self.groups.pop(group_id, None)
        self._emit(request, out)
        self.sinks.pop(request.request_id, None)
        for listener in self.finish_listeners:
            listener(request)

    def _report(self, batch: ScheduledBatch, duration: float) -> None:
        if not self.step_listeners:
            return
        decode = sum(1 for n in batch.num_new_tokens if n == 1)
        stats = StepStats(batch.total_tokens, batch.total_tokens - decode, decode, len(batch.requests),
                          duration, self.scheduler.num_running, self.scheduler.num_waiting, batch.num_preempted)
        for listener in self.step_listeners:
            listener(stats)
