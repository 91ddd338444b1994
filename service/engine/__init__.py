"""The batched worker: scheduler, paged KV blocks, runner, sampler, detokenizer and step loop."""
from service.engine.config import EngineConfig
from service.engine.request import RequestOutput, SamplingParams

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in the model code; import it only when asked for.
    if name == "LLM":
        from service.engine.llm import LLM
        return LLM
    raise AttributeError(name)
