"""The web playground: GET / is one static page (no build step); /static/* its script, stylesheet and
icon, which /favicon.ico answers too."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.api.errors import APIError

router = APIRouter(tags=["Playground"])
STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type=_TYPES[".html"], headers={"Cache-Control": "no-cache"})


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    # Asked for by browsers on pages without a <link rel="icon"> (the playground has one); SVG is fine there.
    return FileResponse(STATIC / "favicon.svg", media_type=_TYPES[".svg"],
                        headers={"Cache-Control": "max-age=86400"})


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str) -> FileResponse:
    # Only files directly in static/ with a known type: no "..", no subfolders, nothing else on disk.
    path = STATIC / name
    if "/" in name or name.startswith(".") or path.suffix not in _TYPES or not path.is_file():
        raise APIError(404, f"no static file {name!r}", None, "not_found")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})
