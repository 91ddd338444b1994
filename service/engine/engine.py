"""The engine's thread and its inbox: the bridge between callers (threads, the asyncio event loop) and the step core.

Only the engine's thread (or, offline, the caller that drives `step()` by hand) touches the step core.
Other threads call `add_request`, `submit` (asyncio), `abort` and `abort_all`, which validate and hand
work over through the inbox, and read `snapshot`, which the engine replaces after every step.

A constrained request (SamplingParams.structured) starts its grammar's compile on the compile workers
when it is added; the step loop never compiles. A constraint llguidance refuses raises RequestRejected
from add_request/submit when the refusal is already known (cached, or the compile was instant), else it
ends the request with finish_reason "error". Callers that must answer a refusal before anything else
(an HTTP 400) await `check_structured` first: it compiles off the event loop and caches the result, so
the submit that follows finds the grammar ready.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import traceback
import uuid
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Future

from model.loading import LoadedModel
from service.engine.config import EngineConfig
from service.engine.core import EngineCore
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.errors import EngineDead, EngineOverloaded, RequestRejected
from service.engine.outputs import RequestOutput
from service.engine.request import SamplingParams
from service.engine.sequence import OutputSink, SequenceGroup
from service.engine.status import EngineEvents, EngineInfo, EngineSnapshot
from service.engine.structured.compiler import CompiledGrammar, GrammarCompiler
from service.engine.structured.spec import StructuredOutput
from service.engine.validation import validate_request

log = logging.getLogger("kvserve.engine")


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        if loaded.tokenizer is None:
            raise ValueError(f"model {loaded.source} has no tokenizer")
        self.tokenizer = loaded.tokenizer
        self.events = EngineEvents()
        self.core = EngineCore(loaded, config, self.events)
        self.grammars = GrammarCompiler(self.tokenizer, loaded.config.vocab_size,
                                        listeners=self.events.on_grammar_compiled)
        self.snapshot: EngineSnapshot = self.core.snapshot()
        self._inbox: deque[tuple[str, str | None, SequenceGroup | None]] = deque()  # (kind, request id, group)
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead_reason: str | None = None

    def info(self) -> EngineInfo:
        return self.core.info

    # --- what other threads call ------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        """Sequences waiting to run: the scheduler's queue at the last step, plus what the inbox holds."""
        queued = sum(len(group.sequences) for kind, _, group in self._inbox.copy() if kind == "add")
        return self.snapshot.num_waiting + queued

    def has_unfinished(self) -> bool:
        return bool(self._inbox) or self.snapshot.num_unfinished > 0

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                    on_output: OutputSink | None = None, priority: int = 0) -> None:
        """Queue a request (n samples). Raises RequestRejected, EngineOverloaded or EngineDead."""
        try:
            if self._dead_reason is not None:
                raise EngineDead(f"engine is not running: {self._dead_reason}")
            info = self.core.info
            params = validate_request(prompt_ids, params, self.tokenizer.vocab_size, info.max_model_len,
                                      info.kv_cache_tokens)
            if self.num_waiting + params.n > self.config.max_queue:
                raise EngineOverloaded(f"waiting queue is full ({self.config.max_queue} requests)")
            grammar = self._grammar(params.structured)
        except (EngineDead, EngineOverloaded, RequestRejected) as exc:
            self._refused(exc)
            raise
        group = SequenceGroup.create(request_id, prompt_ids, params, self._stop_ids(params), on_output, priority,
                                     lambda: IncrementalDetokenizer(self.tokenizer, params), grammar)
        if grammar is not None:
            for listener in self.events.on_constrained:
                listener(params.structured.kind)
        self._post("add", request_id, group)
        if grammar is not None and not grammar.done():
            grammar.add_done_callback(lambda _: self._wakeup.set())  # the loop may be idle, waiting for it

    async def check_structured(self, spec: StructuredOutput) -> None:
        """From the event loop: compile a constraint (or find it cached) without blocking the loop, and
        raise RequestRejected naming spec.field if llguidance refuses it (the API's 400)."""
        compiled = await asyncio.wrap_future(self.grammars.compile(spec))
        try:
            compiled.check(spec)
        except RequestRejected as exc:
            self._refused(exc)
            raise

    def _grammar(self, spec: StructuredOutput | None) -> Future[CompiledGrammar] | None:
        """Start compiling a request's constraint; a refusal already known is raised now."""
        if spec is None:
            return None
        future = self.grammars.compile(spec)
        if future.done() and not future.cancelled() and future.exception() is None:
            future.result().check(spec)
        return future

    def _refused(self, exc: Exception) -> None:
        reason = {EngineDead: "engine_dead", EngineOverloaded: "overloaded"}.get(type(exc), "rejected")
        for listener in self.events.on_refusal:
            listener(reason)

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
               priority: int = 0) -> AsyncIterator[RequestOutput]:
        """From the event loop: queue a request and return its output stream. Raises at once
        (RequestRejected, EngineOverloaded, EngineDead) if it cannot be queued. Closing the stream
        before the last output (a client that went away) aborts the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request_id = request_id or uuid.uuid4().hex
        self.add_request(prompt_ids, params, request_id,
                         lambda output: loop.call_soon_threadsafe(queue.put_nowait, output), priority)
        return self._stream(queue, request_id, params.n)

    async def _stream(self, queue: asyncio.Queue, request_id: str, n: int) -> AsyncIterator[RequestOutput]:
        unfinished = n
        try:
            while unfinished:
                output = await queue.get()
                if output.finished:
                    unfinished -= 1
                yield output
        finally:
            if unfinished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def abort_all(self) -> None:
        self._post("abort_all")

    def _post(self, kind: str, request_id: str | None = None, group: SequenceGroup | None = None) -> None:
        self._inbox.append((kind, request_id, group))
        self._wakeup.set()

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        ids = list(params.stop_token_ids)
        if not params.ignore_eos:
            ids.extend(self.tokenizer.eos_token_ids)
        return ids

    # --- the thread -------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.grammars.shutdown()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wakeup.clear()
                self._drain_inbox()
                if not self.core.has_work():
                    self.core.outputs.flush()
                    self._wakeup.wait(0.5)
                    continue
                self.step()
        except BaseException as exc:  # the loop itself broke: say so, fail everyone, stop
            log.error("engine loop died:\n%s", traceback.format_exc())
            self._die(f"{type(exc).__name__}: {exc}", f"engine stopped: {type(exc).__name__}: {exc}", "error")
            return
        # Stopped on purpose: refuse new work and end what is still in flight, so no stream hangs.
        self._die("engine stopped", "engine stopped", "abort")

    def _die(self, dead_reason: str, message: str, finish_reason: str) -> None:
        self._dead_reason = dead_reason
        self._drain_inbox()
        self.core.fail_all(message, finish_reason)
        self._publish()

    # --- one step (the thread's, or a caller's driving the engine by hand) ------------------
    def step(self) -> None:
        self._drain_inbox()
        if not self.core.has_work():  # stepping by hand while only grammars compile: wait, do not spin
            self.core.wait_for_grammars(timeout=0.05)
        batch = self.core.schedule()
        self._publish()  # admissions and preemptions are visible before this step's outputs reach anyone
        self.core.run(batch)
        self._publish()

    def _drain_inbox(self) -> None:
        # The snapshot is published before the items leave the inbox, so a reader counting both never
        # misses a request that is between them.
        items = self._inbox.copy()
        for kind, request_id, group in items:
            if kind == "add":
                self.core.add(group)
            elif kind == "abort":
                self.core.abort(request_id)
            else:
                self.core.abort_all()
        if items:
            self._publish()
        for _ in items:
            self._inbox.popleft()

    def _publish(self) -> None:
        self.snapshot = self.core.snapshot(self._dead_reason)
