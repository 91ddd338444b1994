"""The API's documentation: /openapi.json, /docs (Swagger UI) and /redoc (ReDoc), with the pages' scripts,
stylesheet and icon served by kvserve itself from the copies the fastapi-offline package ships, so that
they work with no network at all."""
from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from service.api.errors import APIError

OPENAPI_URL, DOCS_URL, REDOC_URL = "/openapi.json", "/docs", "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
# Under /static/, beside the playground's files, so that they are public when an API key is set, as the
# pages are (RequireKey in app.py).
ASSETS_URL = "/static/docs"
ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
_JS, _CSS = "text/javascript; charset=utf-8", "text/css; charset=utf-8"
ASSET_TYPES = {"swagger-ui-bundle.js": _JS, "swagger-ui.css": _CSS, "redoc.standalone.js": _JS,
               "favicon.png": "image/png"}


def install_docs(app: FastAPI) -> None:
    """Add the documentation routes to an app built with openapi_url, docs_url and redoc_url None: FastAPI's
    own pages load their assets from a CDN, and its plain Starlette routes leave no route template for
    /metrics to count them by (they would be "unmatched"); these are API routes."""

    @app.get(OPENAPI_URL, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_URL, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png", oauth2_redirect_url=OAUTH2_REDIRECT_URL,
            init_oauth=app.swagger_ui_init_oauth, swagger_ui_parameters=app.swagger_ui_parameters)

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        # with_google_fonts=False: ReDoc uses the system's fonts instead of fetching Google's.
        page = get_redoc_html(openapi_url=OPENAPI_URL, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{ASSETS_URL}/favicon.png", with_google_fonts=False)
        # ReDoc's menu always shows Redocly's logo from their CDN (and hides it if it fails to load):
        # the browser is told not to fetch images from elsewhere, so the page never reaches outside.
        page.headers["Content-Security-Policy"] = "img-src 'self' data:"
        return page

    @app.get(ASSETS_URL + "/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        # Only the names listed: a request's path never picks another file on disk.
        if name not in ASSET_TYPES:
            raise APIError(404, f"no documentation asset {name!r}", None, "not_found")
        return FileResponse(ASSETS / name, media_type=ASSET_TYPES[name], headers={"Cache-Control": "no-cache"})
