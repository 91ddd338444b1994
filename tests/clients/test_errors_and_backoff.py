"""Error bodies of every shape -> typed exceptions; retry delays from Retry-After or backoff; the bench's
statistics and argument parsers. Pure functions, no server."""
from __future__ import annotations

import email.utils
import time

import pytest

from clients import AuthenticationError, BadRequestError, OverloadedError, ServerError
from clients.bench.prompts import parse_range
from clients.bench.runner import RequestRecord
from clients.bench.stats import parse_goodput, summarize, throughput_over_time
from clients.client import retry_delay
from clients.errors import APIStatusError, status_error, stream_error


def test_openai_shaped_error():
    error = status_error(400, '{"error": {"message": "temperature: too high", "type": "invalid_request_error", '
                              '"param": "temperature", "code": "invalid_value"}}')
    assert isinstance(error, BadRequestError)
    assert (error.status, error.message, error.param, error.code) == (400, "temperature: too high", "temperature",
                                                                      "invalid_value")
    assert "param: temperature" in str(error)


def test_native_fastapi_and_plain_text_errors():
    native = status_error(422, '{"error": "inputs: too short", "error_type": "validation"}')
    assert isinstance(native, BadRequestError) and native.message == "inputs: too short"
    assert native.type == "validation" and native.param is None
    assert status_error(401, '{"detail": "no key"}').message == "no key"
    assert isinstance(status_error(401, "{}"), AuthenticationError)
    plain = status_error(502, "Bad Gateway\n")
    assert isinstance(plain, ServerError) and plain.message == "Bad Gateway"
    teapot = status_error(418, "")
    assert type(teapot) is APIStatusError and not teapot.retryable


def test_only_overload_is_retryable():
    assert status_error(503, "{}").retryable and status_error(429, "{}").retryable
    assert isinstance(status_error(429, "{}"), OverloadedError)
    assert not status_error(500, "{}").retryable and not status_error(400, "{}").retryable


def test_stream_error_events():
    assert stream_error({"choices": []}) is None
    assert stream_error({"error": {"message": "boom"}}).message == "boom"
    assert stream_error({"error": "boom", "error_type": "generation"}).message == "boom"


def test_retry_after_seconds_and_http_date_are_honoured():
    assert retry_delay(0, "3", 0.5, 8.0) == 3.0
    assert retry_delay(5, "0.25", 0.5, 8.0) == 0.25
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_delay(0, later, 0.5, 8.0) <= 30


def test_backoff_doubles_with_jitter_and_is_capped():
    for attempt, ceiling in ((0, 0.5), (1, 1.0), (2, 2.0), (6, 8.0)):
        delays = [retry_delay(attempt, None, 0.5, 8.0) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert 0.25 <= retry_delay(0, "not a date", 0.5, 8.0) <= 0.5


def test_bench_arguments():
    assert parse_range("128") == (128, 128) and parse_range("64-128") == (64, 128)
    with pytest.raises(ValueError):
        parse_range("128-64")
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    with pytest.raises(ValueError):
        parse_goodput(["latency:5"])


def test_summary_statistics_and_goodput():
    # Two requests: tokens at fixed offsets (seconds since start), one failure.
    fast = RequestRecord(10, 3, start=0.0, ttft=0.1, latency=0.3, output_tokens=3, token_times=[0.1, 0.2, 0.3])
    slow = RequestRecord(10, 3, start=0.5, ttft=1.0, latency=1.4, output_tokens=3, token_times=[1.5, 1.7, 1.9])
    failed = RequestRecord(10, 3, start=0.0, error="OverloadedError: 503")
    summary = summarize([fast, slow, failed], duration=2.0, targets={"ttft": 500})
    assert (summary["completed"], summary["failed"], summary["total_output_tokens"]) == (2, 1, 6)
    assert summary["output_token_throughput"] == 3.0 and summary["request_throughput"] == 1.0
    assert summary["ttft_ms"]["median"] == pytest.approx(550.0)
    assert summary["tpot_ms"]["mean"] == pytest.approx((100 + 200) / 2)
    assert sorted(round(1000 * x) for x in [*fast.itl, *slow.itl]) == [100, 100, 200, 200]
    assert summary["itl_ms"]["mean"] == pytest.approx(150.0)
    assert summary["goodput"]["good_requests"] == 1 and summary["goodput"]["request_goodput"] == 0.5
    over_time = throughput_over_time([fast, slow], duration=2.0)
    assert over_time["bucket_start_s"] == [0.0, 1.0] and over_time["output_tokens_per_s"] == [3.0, 3.0]
    assert over_time["requests_in_flight"] == [pytest.approx(0.3 + 0.5), pytest.approx(0.9)]  # mean per second
