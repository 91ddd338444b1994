"""Helpers for the engine tests: build an engine with an exact number of KV blocks, drive it offline
or from threads, and collect its outputs per (request_id, sample index)."""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

from model.network.attention import kv_cache_bytes_per_block
from model.loading import LoadedModel
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.runner import kv_cache_dtype_of
from service.engine import RequestOutput, SamplingParams

BLOCK_SIZE = 16
FIRST_PLAIN_ID = 17  # SmolLM2 ids 0..16 are special tokens (0 <|endoftext|>, 2 <|im_end|> = EOS)


def make_engine(loaded: LoadedModel, num_blocks: int = 512, **options) -> Engine:
    """An engine whose KV cache holds exactly num_blocks blocks of BLOCK_SIZE tokens."""
    dtype = kv_cache_dtype_of(loaded, options.get("kv_cache_dtype", "auto"))
    per_block = kv_cache_bytes_per_block(loaded.config, BLOCK_SIZE, dtype)
    engine = Engine(loaded, EngineConfig(block_size=BLOCK_SIZE, kv_cache_memory=num_blocks * per_block, **options))
    assert engine.core.blocks.num_blocks == num_blocks
    return engine


def random_prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(FIRST_PLAIN_ID, 49152) for _ in range(length)]


def greedy(max_tokens: int = 12, **options) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **options)


@dataclass
class Result:
    """Every output one sample of a request produced, in order."""
    outputs: list[RequestOutput] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return [t for out in self.outputs for t in out.new_token_ids]

    @property
    def text(self) -> str:
        return "".join(out.new_text for out in self.outputs)

    @property
    def last(self) -> RequestOutput:
        return self.outputs[-1]

    @property
    def finish_reason(self) -> str | None:
        return self.last.finish_reason

    @property
    def logprobs(self) -> list[float]:
        return [lp for out in self.outputs for lp in (out.logprobs or [])]

    @property
    def top_logprobs(self) -> list[list[tuple[int, float]]]:
        return [top for out in self.outputs for top in (out.top_logprobs or [])]


class Collector:
    """A thread-safe sink: outputs per (request_id, index), and a wait for everything to finish."""

    def __init__(self):
        self.results: dict[tuple[str, int], Result] = {}
        self.late: list[RequestOutput] = []  # outputs after a sample's last one (the engine logs a raise)
        self._done = threading.Condition()

    def __call__(self, out: RequestOutput) -> None:
        with self._done:
            result = self.results.setdefault((out.request_id, out.index), Result())
            if result.outputs and result.last.finished:
                self.late.append(out)
            result.outputs.append(out)
            self._done.notify_all()

    def finished(self, keys) -> bool:
        return all(k in self.results and self.results[k].last.finished for k in keys)

    def wait(self, keys, timeout: float = 60.0) -> bool:
        with self._done:
            done = self._done.wait_for(lambda: self.finished(keys), timeout)
        assert not self.late, f"outputs after the last: {self.late}"
        return done

    def wait_outputs(self, key, count: int = 1, timeout: float = 60.0) -> bool:
        """Wait until one sample has produced at least count outputs."""
        with self._done:
            return self._done.wait_for(
                lambda: key in self.results and len(self.results[key].outputs) >= count, timeout)

    def __getitem__(self, key) -> Result:
        if isinstance(key, str):
            key = (key, 0)
        return self.results[key]


def run_engine(engine: Engine, collector: Collector | None = None, max_steps: int = 10_000) -> Collector:
    """Step an engine until every request is done; then no block may still be in use."""
    collector = collector or Collector()
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        engine.step()
    assert not engine.has_unfinished(), "engine did not finish in max_steps"
    assert engine.core.blocks.num_used == 0, f"{engine.core.blocks.num_used} blocks leaked"
    assert engine.core.scheduler.num_running == engine.core.scheduler.num_waiting == 0
    assert not engine.core.groups, "finished requests leaked"
    assert not collector.late, f"outputs after the last: {collector.late}"
    return collector


def generate(engine: Engine, prompts: dict[str, list[int]], params: SamplingParams | dict[str, SamplingParams],
             ) -> Collector:
    """Queue every prompt at once, run to completion, return the outputs."""
    collector = Collector()
    for request_id, ids in prompts.items():
        p = params[request_id] if isinstance(params, dict) else params
        engine.add_request(ids, p, request_id, collector)
    run_engine(engine, collector)
    for request_id in prompts:
        p = params[request_id] if isinstance(params, dict) else params
        for index in range(p.n):
            assert collector.results[(request_id, index)].last.finished
    return collector
