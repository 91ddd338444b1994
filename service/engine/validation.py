"""Checks a request must pass before it is queued; each failure names the field at fault."""
from __future__ import annotations

import dataclasses

from service.engine.errors import RequestRejected
from service.engine.request import InvalidParam, SamplingParams


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
