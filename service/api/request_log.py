"""The request log: one line per finished HTTP request, errors and aborts included.

A plain ASGI middleware times the request, notes its status and gives it an id (the client's
X-Request-Id when it sends a usable one, echoed back in the response). The generation code adds what
only it knows (tokens, time to first token, finish reasons) to the record found through a context
variable, so no route has to pass it along. Successful probes and scrapes (GET /health, /metrics) are
not logged: a kubelet and a Prometheus would otherwise fill the log with them.
"""
from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.datastructures import Headers

if TYPE_CHECKING:
    from service.api.generation import Generation

log = logging.getLogger("kvserve.request")
QUIET_PATHS = {"/health", "/metrics"}
_USABLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    start: float = field(default_factory=time.perf_counter)
    status: int = 500  # an exception before the response started reaches the client as a 500
    generations: list[Generation] = field(default_factory=list)

    def fields(self) -> dict:
        """The log line's fields; the token fields only for a request that generated."""
        values = {"request_id": self.request_id, "method": self.method, "path": self.path,
                  "status": self.status}
        if self.generations:
            first = [g.first_token_at for g in self.generations if g.first_token_at is not None]
            reasons = [reason for g in self.generations for reason in g.finish_reasons()]
            values.update(prompt_tokens=sum(g.prompt_tokens for g in self.generations),
                          output_tokens=sum(g.output_tokens() for g in self.generations),
                          cached_tokens=sum(g.cached_tokens for g in self.generations),
                          ttft_s=round(min(first) - self.start, 4) if first else None,
                          finish_reason=",".join(sorted(set(reasons))))
        values["total_s"] = round(time.perf_counter() - self.start, 4)
        return values


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("kvserve_request", default=None)


def current_record() -> RequestRecord | None:
    """The record of the HTTP request being handled, if the request log is on."""
    return _current.get()


def text_line(values: dict) -> str:
    rest = " ".join(f"{key}={value}" for key, value in values.items()
                    if key not in ("method", "path", "status") and value is not None)
    return f"{values['method']} {values['path']} {values['status']} {rest}"


class RequestLog:
    """Writes each request's line once its response is done (or it was cut short)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id", "")
        record = RequestRecord(given if _USABLE_ID.fullmatch(given) else uuid.uuid4().hex, scope["method"],
                               scope["path"])
        token = _current.set(record)

        async def send_noting_status(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", record.request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            _current.reset(token)
            if not (record.path in QUIET_PATHS and record.status < 400):
                values = record.fields()
                log.info(text_line(values), extra={"fields": values})
