"""Offline batch generation: `LLM(model="smollm2").generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from dataclasses import dataclass

from model.loading import load_model
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.outputs import RequestOutput
from service.engine.request import SamplingParams


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    outputs: list[Completion]  # one per sample (n)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason


class LLM:
    """Runs the engine in the caller's thread until every prompt is done. The defaults are the exact
    float32 reference; `dtype="bfloat16", quantization="int4"` is the server's fast CPU path."""

    def __init__(self, model: str = "smollm2", dtype: str = "float32", device: str = "cpu",
                 quantization: str | None = None, **engine_options):
        engine_options.setdefault("max_queue", 1 << 30)  # an offline job queues everything at once
        self.engine = Engine(load_model(model, dtype, device, quantization), EngineConfig(**engine_options))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: list[str | list[int]] | str, params: SamplingParams | None = None,
                 ) -> list[GenerationResult]:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        params = params or SamplingParams()
        if params.structured is not None:  # offline, a refused constraint is an exception before any work
            self.engine.grammars.compile(params.structured).result().check(params.structured)
        results: dict[str, GenerationResult] = {}
        partial: dict[tuple[str, int], list[RequestOutput]] = {}
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            key = f"offline-{id(self)}-{i}"
            results[key] = GenerationResult(ids, [])
            self.engine.add_request(ids, params, key, lambda out: partial.setdefault(
                (out.request_id, out.index), []).append(out))
        while self.engine.has_unfinished():
            self.engine.step()
        for (key, index), outputs in sorted(partial.items(), key=lambda item: item[0][1]):
            results[key].outputs.append(_completion(outputs))
        return list(results.values())


def _completion(outputs: list[RequestOutput]) -> Completion:
    last = outputs[-1]
    if last.error:
        raise RuntimeError(f"request {last.request_id} failed: {last.error}")
    logprobs = [lp for out in outputs for lp in (out.logprobs or [])] or None
    return Completion("".join(o.new_text for o in outputs), [t for o in outputs for t in o.new_token_ids],
                      last.finish_reason, logprobs)
