"""Read a request body sent without a JSON content-type as JSON, unless a browser page sent it.

Every route with a body takes JSON, but `curl -d '{...}'` without `-H 'content-type: application/json'`
labels it application/x-www-form-urlencoded, and some clients send no content-type at all; FastAPI then
refuses the body with "Input should be a valid dictionary". kvserve reads such bodies as JSON, as
llama.cpp's server does. FastAPI's strictness is a defence against cross-site requests: a page on
another site may POST a form or an untyped body to a server on localhost without a CORS preflight. Browsers
send an Origin header with every such POST, and scripts and command-line clients do not, so a request that
has one keeps its content-type (and gets errors.py's "must be JSON" answer).
"""
from __future__ import annotations

JSON = b"application/json"
READ_AS_JSON = (b"", b"application/x-www-form-urlencoded")  # no content-type; curl -d's default


class JsonByDefault:
    """Plain ASGI, like the app's other middlewares: it only rewrites one header of the scope."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and _read_as_json(scope["headers"]):
            headers = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
            scope = dict(scope, headers=[*headers, (b"content-type", JSON)])
        await self.app(scope, receive, send)


def _read_as_json(headers: list[tuple[bytes, bytes]]) -> bool:
    names = {name: value for name, value in headers}
    if b"origin" in names:
        return False
    content_type = names.get(b"content-type", b"").split(b";")[0].strip().lower()
    return content_type in READ_AS_JSON
