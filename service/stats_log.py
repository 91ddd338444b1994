"""A line of engine stats every `interval` seconds while the engine is busy (quiet when idle).

Running and waiting sequences, KV cache use, prompt and generation throughput and the prefix cache
hit rate over the interval, as vLLM's periodic stats line gives them. Token counts come from the
engine's step events (on its thread); the rest from the snapshot it publishes.
"""
from __future__ import annotations

import logging
import threading
import time

from service.engine.engine import Engine
from service.engine.status import StepStats

log = logging.getLogger("kvserve.stats")


class StatsLog:
    def __init__(self, engine: Engine, interval: float = 10.0):
        self.engine, self.interval = engine, interval
        self._lock = threading.Lock()
        self._prompt_tokens = self._generated_tokens = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvserve-stats", daemon=True)
        engine.events.on_step.append(self._count)

    def start(self) -> StatsLog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _count(self, stats: StepStats) -> None:
        with self._lock:
            self._prompt_tokens += stats.num_prefill_tokens
            self._generated_tokens += stats.num_decode_tokens

    def _take_counts(self) -> tuple[int, int]:
        with self._lock:
            counts = self._prompt_tokens, self._generated_tokens
            self._prompt_tokens = self._generated_tokens = 0
        return counts

    def _loop(self) -> None:
        last, before = time.monotonic(), self.engine.snapshot
        while not self._stop.wait(self.interval):
            now, snapshot = time.monotonic(), self.engine.snapshot
            prompt, generated = self._take_counts()
            if prompt or generated or snapshot.num_unfinished:
                values = stats_fields(before, snapshot, prompt, generated, now - last)
                log.info(stats_line(values), extra={"fields": values})
            last, before = now, snapshot


def stats_fields(before, after, prompt_tokens: int, generated_tokens: int, seconds: float) -> dict:
    queries = after.prefix_queries - before.prefix_queries
    return {"running": after.num_running, "waiting": after.num_waiting,
            "kv_cache_usage": round(after.kv_usage, 4),
            "prompt_tokens_per_s": round(prompt_tokens / seconds, 1),
            "generation_tokens_per_s": round(generated_tokens / seconds, 1),
            "prefix_cache_hit_rate": round((after.prefix_hits - before.prefix_hits) / queries, 4) if queries else None}


def stats_line(values: dict) -> str:
    hit_rate = values["prefix_cache_hit_rate"]
    return (f"engine: {values['running']} running, {values['waiting']} waiting, KV cache "
            f"{values['kv_cache_usage']:.1%} used, prompt {values['prompt_tokens_per_s']} tok/s, generation "
            f"{values['generation_tokens_per_s']} tok/s, prefix cache hit rate "
            + ("-" if hit_rate is None else f"{hit_rate:.1%}"))
