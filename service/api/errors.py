"""Every error is an answer in the API's own shape: OpenAI routes (/v1/...) get
{"error": {"message", "type", "param", "code"}}, native (TGI) routes get {"error", "error_type"}."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine.errors import EngineDead, EngineOverloaded, RequestRejected

log = logging.getLogger("kvserve.api")

RETRY_AFTER_SECONDS = 1
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_error", 503: "overloaded_error", 504: "timeout_error"}
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}
_NATIVE_TYPES = {400: "validation", 401: "authentication", 404: "not_found", 413: "validation",
                 422: "validation", 429: "overloaded", 503: "overloaded", 500: "generation", 504: "timeout"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def error_response(path: str, status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in (429, 503) else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    if is_openai_path(path):
        body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                          "param": param, "code": code}}
    else:
        # Native validation errors use 422, as text-generation-inference does.
        status = 422 if status == 400 else status
        body = {"error": message, "error_type": _NATIVE_TYPES.get(status, "validation")}
    return JSONResponse(body, status_code=status, headers=headers)


def _field_name(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    # A union's error adds the member it tried ("prompt.str", "content.list[TextPart]"): not a field.
    cut = next((i for i, p in enumerate(parts) if p in _UNION_TAGS or "[" in p), len(parts))
    return ".".join(parts[:cut]) or ("body" if loc and loc[0] == "body" else None)


def engine_error(exc: Exception) -> APIError:
    if isinstance(exc, RequestRejected):
        return APIError(400, str(exc), exc.param, "invalid_value")
    if isinstance(exc, EngineOverloaded):
        return APIError(503, str(exc), None, "overloaded")
    if isinstance(exc, EngineDead):
        return APIError(503, str(exc), None, "engine_dead")
    raise exc


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request.url.path, exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(request.url.path, 400, f"malformed JSON body: {first.get('msg')}", "body",
                                  "invalid_json")
        if first.get("loc") == ("body",) and isinstance(first.get("input"), bytes):
            # FastAPI hands a body over unparsed only when its content-type is not JSON.
            given = request.headers.get("content-type") or "none"
            return error_response(request.url.path, 400, "the request body must be JSON, sent with the header "
                                  f"content-type: application/json (content-type given: {given})", "body",
                                  "invalid_content_type")
        field = _field_name(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if field:
            message = f"{field}: {message}"
        return error_response(request.url.path, 400, message, field, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        # FastAPI's only 400 here is a body it could not parse; the reason is the exception it raised from.
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            return error_response(request.url.path, 400, "the request body is not UTF-8: it must be JSON "
                                  f"encoded as UTF-8 ({exc.__cause__.reason} at byte {exc.__cause__.start})",
                                  "body", "invalid_encoding")
        param, code = ("body", "invalid_body") if exc.status_code == 400 else (None, None)
        return error_response(request.url.path, exc.status_code, str(exc.detail), param, code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}")
