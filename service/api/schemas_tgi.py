"""Request bodies of the native routes, compatible with Hugging Face text-generation-inference."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.api.limits import MAX_REPETITION_PENALTY, check_stop_strings, engine_range
from service.engine import SamplingParams
from service.engine.structured import StructuredOutput


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    best_of: int | None = Field(None, ge=1)
    decoder_input_details: bool = False
    details: bool = False  # as in text-generation-inference: /generate adds them only when asked
    do_sample: bool = False
    frequency_penalty: float | None = Field(None, **engine_range("frequency_penalty"))
    grammar: dict | None = None  # {"type": "json" | "regex", "value": ...}: service/api/constraints.py
    max_new_tokens: int | None = Field(100, **engine_range("max_tokens"))
    repetition_penalty: float | None = Field(
        None, **engine_range("repetition_penalty", le=MAX_REPETITION_PENALTY))
    return_full_text: bool | None = False
    seed: int | None = Field(None, ge=0, le=2**64 - 1)  # a u64, as in text-generation-inference
    stop: list[str] = Field(default_factory=list)
    # temperature, top_k and top_p keep text-generation-inference's own ranges, narrower than the
    # engine's (TGI refuses 0 and top_p=1; greedy is do_sample=false).
    temperature: float | None = Field(None, gt=0, le=100)
    top_k: int | None = Field(None, gt=0)
    top_n_tokens: int | None = Field(None, **engine_range("logprobs"))
    top_p: float | None = Field(None, gt=0, lt=1)
    truncate: int | None = Field(None, ge=1)
    typical_p: float | None = Field(None, gt=0, lt=1)
    watermark: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: list[str]) -> list[str]:
        check_stop_strings(value)
        return value

    @model_validator(mode="after")
    def _unsupported(self):
        # Refuse what kvserve does not do rather than silently ignore it.
        for name, is_set in (("best_of", (self.best_of or 1) > 1), ("typical_p", self.typical_p is not None),
                             ("watermark", self.watermark)):
            if is_set:
                raise ValueError(f"{name} is not supported by kvserve")
        return self

    def sampling_params(self, structured: StructuredOutput | None = None) -> SamplingParams:
        # As in TGI: greedy unless sampling is asked for, explicitly or by a sampling knob.
        sample = self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p))
        return SamplingParams(
            temperature=(self.temperature or 1.0) if sample else 0.0, top_k=self.top_k or 0,
            top_p=self.top_p or 1.0, repetition_penalty=self.repetition_penalty or 1.0,
            frequency_penalty=self.frequency_penalty or 0.0, seed=self.seed, max_tokens=self.max_new_tokens,
            stop=list(self.stop), logprobs=self.top_n_tokens or 0, structured=structured)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False
