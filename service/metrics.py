"""Every Prometheus metric kvserve exports, in one place.

Latency histograms are recorded when a request finishes, from the timestamps the engine keeps on
each sequence; step histograms from a per-step summary. Neither touches the model's hot path. Gauges
(running, waiting, KV usage) and the engine's own counters (preemptions, prefix cache) are read at
scrape time from the snapshot the engine publishes after every step. Labels are bounded: finish reasons,
failure reasons, HTTP route templates and status codes, never request ids or prompts.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from service.engine.engine import Engine
from service.engine.sequence import Sequence
from service.engine.status import StepStats
from service.engine.structured.spec import KINDS

# Seconds, from a millisecond to ten minutes: decode steps and ITL at the low end, queueing and
# long generations at the top.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                   1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
disable_created_metrics()  # the *_created series only add noise to every counter and histogram

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Every label value is exported from the start, at 0, so rate() sees the first increment and alerts
# and dashboards have a series to read before anything has happened.
FINISH_REASONS = ("stop", "length", "abort")
FAILURE_REASONS = ("error", "overloaded", "rejected", "engine_dead")
STRUCTURED_KINDS = KINDS  # json, regex, choice, grammar
# Grammar compiles: ~0.5 ms for a small JSON schema, tens of ms for large ones, a second at the limit.
COMPILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)

        def hist(name: str, doc: str, buckets=LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=registry)

        self.ttft = hist("kvserve_time_to_first_token_seconds", "Arrival to first output token.")
        self.itl = hist("kvserve_inter_token_latency_seconds", "Time between consecutive output tokens.")
        self.tpot = hist("kvserve_request_time_per_output_token_seconds",
                         "Decode time per output token after the first, per request.")
        self.e2e = hist("kvserve_e2e_request_latency_seconds", "Arrival to finish.")
        self.queue = hist("kvserve_request_queue_time_seconds", "Arrival to first scheduled.")
        self.prefill = hist("kvserve_request_prefill_time_seconds", "First scheduled to first token.")
        self.decode = hist("kvserve_request_decode_time_seconds", "First token to finish.")
        self.prompt_tokens = hist("kvserve_request_prompt_tokens", "Prompt length per request.", TOKEN_BUCKETS)
        self.generation_tokens = hist("kvserve_request_generation_tokens", "Output length per request.",
                                      TOKEN_BUCKETS)
        self.iteration_tokens = hist("kvserve_iteration_tokens", "Tokens computed per engine step.",
                                     TOKEN_BUCKETS)
        self.step_duration = hist("kvserve_step_duration_seconds", "Wall time of one engine step.")
        self.prompt_tokens_total = Counter("kvserve_prompt_tokens", "Prompt tokens of finished requests.",
                                           registry=registry)
        self.generation_tokens_total = Counter("kvserve_generation_tokens", "Output tokens generated.",
                                               registry=registry)
        self.success = Counter("kvserve_request_success", "Finished requests by finish reason.",
                               ["finished_reason"], registry=registry)
        self.failure = Counter("kvserve_request_failure", "Failed or refused requests by reason.",
                               ["reason"], registry=registry)
        for reason in FINISH_REASONS:
            self.success.labels(reason)
        for reason in FAILURE_REASONS:
            self.failure.labels(reason)
        self.structured = Counter("kvserve_structured_requests", "Constrained requests accepted, by kind.",
                                  ["kind"], registry=registry)
        self.grammar_compile = Histogram("kvserve_grammar_compile_seconds",
                                         "Grammar compile time (cache misses only), by kind.", ["kind"],
                                         buckets=COMPILE_BUCKETS, registry=registry)
        self.grammar_failures = Counter("kvserve_grammar_compile_failures",
                                        "Constraints llguidance refused to compile, by kind.", ["kind"],
                                        registry=registry)
        for kind in STRUCTURED_KINDS:
            self.structured.labels(kind)
            self.grammar_compile.labels(kind)
            self.grammar_failures.labels(kind)
        # Speculative decoding, with vLLM's meanings: drafts proposed and accepted, accepted per drafting step,
        # and per draft position (accepted / proposed at position i is that position's acceptance rate).
        self.draft_tokens = Counter("kvserve_spec_decode_num_draft_tokens", "Draft tokens proposed.",
                                    registry=registry)
        self.accepted_tokens = Counter("kvserve_spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                                       registry=registry)
        self.accepted_length = hist("kvserve_spec_decode_accepted_length",
                                    "Draft tokens accepted in one drafting step of one sequence.", tuple(range(17)))
        self.draft_positions = Counter("kvserve_spec_decode_num_draft_tokens_per_pos", "Draft tokens proposed, "
                                       "by position in the step's drafts.", ["position"], registry=registry)
        self.accepted_positions = Counter("kvserve_spec_decode_num_accepted_tokens_per_pos", "Draft tokens "
                                          "accepted, by position in the step's drafts.", ["position"],
                                          registry=registry)
        self.http_requests = Counter("kvserve_http_requests", "HTTP requests by route and status.",
                                     ["method", "route", "status"], registry=registry)
        self.info = Info("kvserve_model", "The served model and engine settings.", registry=registry)
        self._engine: Engine | None = None
        registry.register(_EngineStateCollector(self))

    def attach(self, engine: Engine, model_name: str, version: str) -> None:
        self._engine = engine
        engine.events.on_step.append(self.observe_step)
        engine.events.on_finish.append(self.observe_finished)
        engine.events.on_refusal.append(self.observe_refused)
        engine.events.on_constrained.append(lambda kind: self.structured.labels(kind).inc())
        engine.events.on_grammar_compiled.append(self.observe_compiled)
        info = engine.info()
        self.info.info({"model": model_name, "source": info.model, "dtype": info.dtype,
                        "quantization": info.quantization or "none", "device": info.device,
                        "block_size": str(info.block_size), "kv_cache_dtype": info.kv_cache_dtype,
                        "version": version})

    def observe_step(self, stats: StepStats) -> None:
        self.iteration_tokens.observe(stats.num_tokens)
        self.step_duration.observe(stats.duration)
        for proposed, kept in stats.drafts:
            self.draft_tokens.inc(proposed)
            self.accepted_tokens.inc(kept)
            self.accepted_length.observe(kept)
            for position in range(proposed):
                self.draft_positions.labels(str(position)).inc()
                if position < kept:
                    self.accepted_positions.labels(str(position)).inc()

    def observe_finished(self, seq: Sequence) -> None:
        if seq.finish_reason == "error":
            self.failure.labels("error").inc()
        else:
            self.success.labels(seq.finish_reason).inc()
        if seq.index == 0:  # n samples share one prompt
            self.prompt_tokens.observe(seq.num_prompt_tokens)
            self.prompt_tokens_total.inc(seq.num_prompt_tokens)
        self.generation_tokens.observe(seq.num_output_tokens)
        self.generation_tokens_total.inc(seq.num_output_tokens)
        self._observe_latencies(seq)

    def _observe_latencies(self, seq: Sequence) -> None:
        if seq.first_scheduled_time is not None:
            self.queue.observe(seq.first_scheduled_time - seq.arrival_time)
        if seq.first_token_time is None:
            return
        self.ttft.observe(seq.first_token_time - seq.arrival_time)
        if seq.first_scheduled_time is not None:
            self.prefill.observe(seq.first_token_time - seq.first_scheduled_time)
        if seq.finish_time is not None:
            self.e2e.observe(seq.finish_time - seq.arrival_time)
            decode = seq.finish_time - seq.first_token_time
            self.decode.observe(decode)
            if seq.num_output_tokens > 1:
                self.tpot.observe(decode / (seq.num_output_tokens - 1))
        times = seq.token_times
        for before, after in zip(times, times[1:]):
            self.itl.observe(after - before)

    def observe_refused(self, reason: str) -> None:
        self.failure.labels(reason).inc()

    def observe_compiled(self, kind: str, seconds: float, error: str | None) -> None:
        self.grammar_compile.labels(kind).observe(seconds)
        if error is not None:
            self.grammar_failures.labels(kind).inc()


class _EngineStateCollector:
    """Gauges and engine-owned counters, read at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        engine = self.metrics._engine
        if engine is None:
            return
        snapshot = engine.snapshot
        gauges = [
            ("kvserve_num_requests_running", "Requests in the running batch.", snapshot.num_running),
            ("kvserve_num_requests_waiting", "Requests waiting to be scheduled.", engine.num_waiting),
            ("kvserve_num_requests_awaiting_grammar", "Waiting requests whose grammar is still compiling.",
             snapshot.num_awaiting_grammar),
            ("kvserve_kv_cache_usage_ratio", "Fraction of KV blocks in use (0-1).", snapshot.kv_usage),
            ("kvserve_kv_cache_blocks_capacity", "KV blocks in the cache.", snapshot.kv_blocks_total),
            ("kvserve_kv_cache_blocks_used", "KV blocks held by requests.", snapshot.kv_blocks_used),
            ("kvserve_kv_cache_blocks_cached", "Free KV blocks that still hold a reusable prefix.",
             snapshot.kv_blocks_cached),
            ("kvserve_engine_healthy", "1 while the engine loop runs, 0 if it died.", int(snapshot.healthy)),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("kvserve_num_preemptions", "Requests preempted for lack of KV blocks.", snapshot.num_preemptions),
            ("kvserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             snapshot.prefix_queries),
            ("kvserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.", snapshot.prefix_hits),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
