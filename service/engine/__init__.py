"""The batched worker: sequences, scheduler, paged KV blocks, runner, sampler, output processor and step loop."""
from service.engine.config import EngineConfig
from service.engine.outputs import RequestOutput
from service.engine.request import SamplingParams

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in the model code; import it only when asked for.
    if name == "LLM":
        from service.engine.llm import LLM
        return LLM
    raise AttributeError(name)
