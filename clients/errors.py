"""Typed exceptions: every error answer of the server (either shape) becomes one of these."""
from __future__ import annotations

import json


class KvserveError(Exception):
    """Base class of every error the client raises. `retryable`: sending the same request again may work."""

    retryable = False


class APIConnectionError(KvserveError):
    """The server could not be reached, or the connection broke. `retryable`: the request never left."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.message, self.retryable = message, retryable


class APITimeoutError(APIConnectionError):
    """No answer within the timeout."""


class APIStatusError(KvserveError):
    """The server answered with an error status. `param` names the offending field when it says so."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, body=None, headers: dict | None = None):
        super().__init__(f"{status}: {message}" + (f" (param: {param})" if param else ""))
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.body, self.headers = body, headers or {}


class BadRequestError(APIStatusError):
    """400 or 422: the request is invalid; resending it will not help."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class NotFoundError(APIStatusError):
    """404: no such route or model."""


class RequestTooLargeError(APIStatusError):
    """413: the body is over the server's limit."""


class OverloadedError(APIStatusError):
    """429 or 503: the server is busy (or not ready); retried automatically."""

    retryable = True


class ServerError(APIStatusError):
    """500-class: the server failed."""


class StreamError(KvserveError):
    """The server reported an error inside a stream that had already started."""

    def __init__(self, message: str, payload: dict):
        super().__init__(message)
        self.message, self.payload = message, payload


_CLASSES = {400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 413: RequestTooLargeError,
            422: BadRequestError, 429: OverloadedError, 503: OverloadedError}


def parse_error_body(text: str) -> tuple[str, str | None, str | None, str | None, object]:
    """(message, param, code, type, body) from an OpenAI-shaped {"error": {...}}, a native
    {"error": "...", "error_type": ...}, a FastAPI {"detail": ...} or plain text."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip() or "(empty body)", None, None, None, text
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return (str(error.get("message", error)), error.get("param"), error.get("code"), error.get("type"),
                    body)
        if error is not None:
            return str(error), None, None, body.get("error_type"), body
        if "detail" in body:
            return str(body["detail"]), None, None, None, body
    return str(body), None, None, None, body


def status_error(status: int, text: str, headers: dict | None = None) -> APIStatusError:
    message, param, code, type_, body = parse_error_body(text)
    cls = _CLASSES.get(status) or (ServerError if status >= 500 else APIStatusError)
    return cls(status, message, param, code, type_, body, headers)


def stream_error(payload: dict) -> StreamError | None:
    """The error carried by a stream event, if it is one."""
    error = payload.get("error")
    if error is None:
        return None
    message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
    return StreamError(message, payload)
