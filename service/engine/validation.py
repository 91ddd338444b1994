"""Checks a request must pass before it is queued; each failure names the field at fault.

SAMPLING_RANGES is the one statement of each sampling parameter's valid range: SamplingParams.validate
checks it, and the API schemas hand the same bounds to pydantic (adding only their own tighter policy).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import TYPE_CHECKING

from service.engine.errors import RequestRejected

if TYPE_CHECKING:  # request.py imports this module for its validate()
    from service.engine.request import SamplingParams

# Bounds as pydantic's keywords: ge/le inclusive, gt/lt exclusive. A None value (max_tokens,
# logprobs) means "not set" and is always valid.
SAMPLING_RANGES: dict[str, dict[str, float]] = {
    "n": {"ge": 1},
    "temperature": {"ge": 0},
    "top_k": {"ge": -1},  # -1 and 0 both keep every token
    "top_p": {"gt": 0, "le": 1},
    "min_p": {"ge": 0, "le": 1},
    "repetition_penalty": {"gt": 0},
    "presence_penalty": {"ge": -2, "le": 2},
    "frequency_penalty": {"ge": -2, "le": 2},
    "max_tokens": {"ge": 1},
    "min_tokens": {"ge": 0},
    "logprobs": {"ge": 0, "le": 20},
    "speculative_ngram": {"ge": 0, "le": 16},
}
_HOLDS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}
_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


class InvalidParam(ValueError):
    """A sampling parameter out of range; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param} {message}")
        self.param = param


def range_text(bounds: dict[str, float]) -> str:
    """{"gt": 0, "le": 1} -> "in (0, 1]"; {"ge": 1} -> ">= 1"."""
    if len(bounds) == 1:
        (kind, limit), = bounds.items()
        return f"{_SYMBOLS[kind]} {limit}"
    low, high = ("ge" if "ge" in bounds else "gt"), ("le" if "le" in bounds else "lt")
    return f"in {'[' if low == 'ge' else '('}{bounds[low]}, {bounds[high]}{']' if high == 'le' else ')'}"


def check_sampling_ranges(params: SamplingParams) -> None:
    """Raise InvalidParam naming the first field outside its SAMPLING_RANGES range."""
    for name, bounds in SAMPLING_RANGES.items():
        value = getattr(params, name)
        # Written as "every bound holds" so that NaN, which compares False, is refused.
        if value is not None and not all(_HOLDS[kind](value, limit) for kind, limit in bounds.items()):
            raise InvalidParam(name, f"must be {range_text(bounds)}, got {value!r}")
    if params.max_tokens is not None and params.min_tokens > params.max_tokens:
        raise InvalidParam("min_tokens", f"must not exceed max_tokens, got {params.min_tokens!r}")


def validate_request(prompt_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int,
                     cache_tokens: int) -> SamplingParams:
    """Returns the params with max_tokens resolved (None -> what the context leaves)."""
    if not prompt_ids:
        raise RequestRejected("prompt must not be empty", "prompt")
    bad = next((t for t in prompt_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestRejected(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})", "prompt")
    try:
        params.validate()
    except InvalidParam as exc:
        raise RequestRejected(str(exc), exc.param) from exc
    for field_name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or {})):
        bad = next((t for t in ids if not 0 <= int(t) < vocab_size), None)
        if bad is not None:
            raise RequestRejected(f"{field_name}: token id {bad} is outside the vocabulary [0, {vocab_size})",
                                  field_name)
    room = max_model_len - len(prompt_ids)
    if room < 1:
        raise RequestRejected(f"prompt has {len(prompt_ids)} tokens; the context length is {max_model_len}",
                              "prompt")
    max_tokens = params.max_tokens if params.max_tokens is not None else room
    if max_tokens > room:
        raise RequestRejected(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                              f"context length {max_model_len}", "max_tokens")
    if len(prompt_ids) >= cache_tokens:  # no max_tokens could make this fit
        raise RequestRejected(f"prompt has {len(prompt_ids)} tokens; the whole KV cache holds {cache_tokens}",
                              "prompt")
    if len(prompt_ids) + max_tokens > cache_tokens:
        raise RequestRejected(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                              f"whole KV cache ({cache_tokens} tokens)", "max_tokens")
    return dataclasses.replace(params, max_tokens=max_tokens)
