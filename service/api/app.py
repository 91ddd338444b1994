"""The FastAPI app factory: routers, error shapes, auth, body limit, CORS, and the engine's start and stop."""
from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers

from service import VERSION
from service.api import routes_misc, routes_openai, routes_playground, routes_tgi
from service.api.docs import install_docs
from service.api.errors import error_response, install_error_handlers
from service.api.json_body import JsonByDefault
from service.api.request_log import RequestLog
from service.api.state import ServerState
from service.engine.engine import Engine
from service.metrics import Metrics
from service.settings import Settings
from service.startup import build_engine

OPEN_PATHS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico"}


def _start_engine(state: ServerState, engine: Engine, metrics: Metrics) -> None:
    if state.settings.enable_metrics:
        metrics.attach(engine, state.settings.served_model_name, VERSION)
    state.engine = engine.start()


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The app for an engine built beforehand (`kvserve serve` loads the model before binding its port);
    without one, the app's start-up loads the model itself, and a failure there fails the start-up."""
    settings = settings or Settings()
    state = ServerState(settings)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        built = engine or await asyncio.to_thread(build_engine, settings)
        _start_engine(state, built, metrics)
        yield
        built.stop()

    app = FastAPI(title="kvserve", version=VERSION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None,  # install_docs serves them, CDN-free
                  description="LLM inference server: OpenAI-compatible and text-generation-inference-"
                              "compatible generation, streamed, over a paged KV cache.")
    app.state.server = state
    app.state.metrics = metrics
    install_error_handlers(app)
    for router in (routes_misc.router, routes_openai.router, routes_tgi.router, routes_playground.router):
        app.include_router(router)
    install_docs(app)
    _install_http_metrics(app, metrics)
    _install_auth(app, settings)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(JsonByDefault)
    if settings.request_log:  # outermost: it sees the 401s and 413s of the middlewares inside it too
        app.add_middleware(RequestLog)
    return app


def _install_http_metrics(app: FastAPI, metrics: Metrics) -> None:
    @app.get("/metrics", tags=["Server"], summary="Prometheus metrics (text exposition format)")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(CountRequests, metrics=metrics)


def _install_auth(app: FastAPI, settings: Settings) -> None:
    if not settings.api_key:
        return
    keys = [key.encode() for key in settings.api_key]
    open_paths = set(OPEN_PATHS)
    if not settings.protect_health_and_metrics:
        open_paths |= {"/health", "/metrics"}

    app.add_middleware(RequireKey, keys=keys, open_paths=open_paths)


# The middlewares below are plain ASGI: Starlette's @app.middleware("http") would pass every chunk of a
# streamed response through an extra task and memory channel.
class CountRequests:
    """kvserve_http_requests_total by method, route template and status, once the response is done."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # an exception before the response started reaches the client as a 500

        async def send_and_note_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            # The router stores the matched route in the scope; its template, never the raw path,
            # keeps the label set bounded.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http_requests.labels(scope["method"], route, str(status)).inc()


class RequireKey:
    """401 unless `Authorization: Bearer <key>` names one of the keys; open paths and the playground
    page are public."""

    def __init__(self, app, keys: list[bytes], open_paths: set[str]):
        self.app, self.keys, self.open_paths = app, keys, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._is_public(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        header = Headers(scope=scope).get("authorization", "")
        given = header[7:].encode() if header.lower().startswith("bearer ") else b""
        # Compare against every key, always, so the time taken says nothing about which matched.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            response = error_response(scope["path"], 401, "missing or invalid API key", None, "invalid_api_key")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def _is_public(self, method: str, path: str) -> bool:
        return path in self.open_paths or method == "OPTIONS" or (
            method == "GET" and (path == "/" or path.startswith("/static/")))


class BodySizeLimit:
    """Refuse request bodies over max_bytes with a 413, whether or not Content-Length is sent."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        # No length given (chunked): read the body here, within the limit, then replay it.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(scope["path"], 413, f"request body is larger than {self.max_bytes} bytes",
                                  "body", "body_too_large")
        await response(scope, receive, send)
