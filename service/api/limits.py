"""The sampling limits the API schemas enforce: the engine's own ranges (SAMPLING_RANGES), handed to
pydantic so a bad value is refused with the API's field name, plus the server's policy for both APIs."""
from __future__ import annotations

from service.engine.validation import SAMPLING_RANGES

MAX_STOP_STRINGS = 16
MAX_REPETITION_PENALTY = 10  # the engine takes any positive value; the server refuses extreme ones


def engine_range(param: str, **tighter: float) -> dict[str, float]:
    """pydantic Field bounds: the engine's range for SamplingParams.`param`, narrowed by an API's policy."""
    return {**SAMPLING_RANGES[param], **tighter}


def check_stop_strings(stops: list[str]) -> None:
    # An empty stop string would match at once, before any token.
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise ValueError(f"at most {MAX_STOP_STRINGS} non-empty stop strings")
