"""`GET /`: the web dashboard and chat, three static files shipped inside the package (no build step, no CDN).

The page itself needs no API key: it holds no data. Everything it shows comes from the authenticated /api and /v1
routes, and when the server has a key the page asks for it. Only the files of mlxk/server/static are served, by
bare name, so a request can never reach another path.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from mlxk.errors import MlxkError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
# Scripts and styles only from this server, no inline code: model output can never run as script.
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


class StaticNotFound(MlxkError):
    type = "not_found"
    http_status = 404


def _static(name: str) -> FileResponse:
    path = STATIC_DIR / name
    if "/" in name or name.startswith(".") or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise StaticNotFound(f"no such file: /ui/{name}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.get("/")
async def index() -> FileResponse:
    return _static("index.html")


@router.get("/ui/{name}")
async def static_file(name: str) -> FileResponse:
    return _static(name)
