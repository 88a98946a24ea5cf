"""The `hwsi serve` web app: slide list, DZI tiles, overlays, chat with streamed answers and evidence, export.

Only slides with a store in the job folder are served; a slide id from a request is only ever a key of the
job's :class:`~hwsi.serve.registry.SlideRegistry`. Tile levels/columns/rows are validated (404 when out of range),
request bodies and questions are size-limited, and a model failure becomes an error message in the chat stream.
Every JSON reply is ASCII (:mod:`hwsi.serve.replies`), so whatever a request held — a lone surrogate echoed in a 422 —
can be sent; URLs in replies percent-encode the id (``#``, ``%``, ``/``, non-ASCII); the export's file name is an
ASCII ``filename`` plus an RFC 6266 ``filename*``. A slide is opened one way (:func:`hwsi.serve.dzi.open_reader`);
a failed read (a corrupt tile: 502) leaves the next read a fresh backend handle.

Endpoints (all JSON unless stated)::

    GET  /                                          the viewer page (static HTML/JS/CSS shipped in the package, on
                                                    OpenSeadragon + Annotorious built by `make venv`; 503 if not)
    GET  /api/health
    GET  /api/slides                                slides of the job
    GET  /api/slides/{id}                           geometry, µm/px, DZI info, overlay availability, nucleus types
    GET  /api/slides/{id}/thumbnail.jpg             JPEG
    GET  /api/slides/{id}/image.dzi                 DZI XML
    GET  /api/slides/{id}/image_files/{L}/{c}_{r}.{jpeg|png}   tile (LRU-cached, ETag, Cache-Control)
    GET  /api/slides/{id}/overlays/tissue.png       RGBA PNG covering the slide
    GET  /api/slides/{id}/overlays/grid             regions + patch tissue flags
    GET  /api/slides/{id}/overlays/spf              SPF-selected patches
    GET  /api/slides/{id}/overlays/nuclei?x0&y0&x1&y1   nuclei in a level-0 box
    GET  /api/slides/{id}/export.geojson[?session=S&nuclei=1&spf=1&regions=0&patches=0]   QuPath GeoJSON
    POST /api/chat            {"slide_id"}                        -> {"session_id"}
    POST /api/chat/{sid}/ask  {"question", "max_new_tokens"?}     -> NDJSON stream of token/evidence/error/done
    GET  /api/chat/{sid}                            the turns so far (question, answer, evidence, error)
    GET  /api/chat/{sid}/heatmap?turn=N             per-patch relevance of turn N, (R, G) with nulls
    DELETE /api/chat/{sid}
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from hwsi.serve.assistant import Assistant, model_placement
from hwsi.serve.replies import AsciiJSONResponse, install_error_handlers
from hwsi.serve.routes_chat import MAX_NEW_TOKENS, MAX_QUESTION_CHARS, chat_router
from hwsi.serve.routes_overlays import overlays_router
from hwsi.serve.routes_slides import TILE_MAX_AGE, slides_router
from hwsi.serve.state import MAX_SESSIONS, ServerState

STATIC = Path(__file__).parent / "static"
VENDOR_BUILT = STATIC / "vendor" / "built.json"  # written by web/build.mjs (`make venv`): OpenSeadragon + Annotorious
NOT_BUILT = ("the viewer's front-end libraries (OpenSeadragon, Annotorious) are not built: run `make venv` in the "
             "checkout (npm ci + node web/build.mjs, into src/hwsi/serve/static/vendor/)")
log = logging.getLogger("hwsi.serve")

MAX_BODY_BYTES = 16 * 1024

__all__ = ["MAX_BODY_BYTES", "MAX_NEW_TOKENS", "MAX_QUESTION_CHARS", "MAX_SESSIONS", "TILE_MAX_AGE",
           "BodyLimitMiddleware", "create_app"]


class BodyLimitMiddleware:
    """Rejects request bodies over ``max_bytes`` with 413 (by Content-Length, and while streaming without one)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.max_bytes
                except ValueError:
                    too_big = True
                if too_big:
                    await _plain(send, 413, b'{"detail":"request body too large"}')
                    return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, "request body too large")
            return msg

        await self.app(scope, limited, send)


async def _plain(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(
    job: str | Path,
    assistant: Assistant | None = None,
    *,
    tile_cache_bytes: int = 128 * 2**20,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_sessions: int = MAX_SESSIONS,
) -> FastAPI:
    """The FastAPI app serving ``job``; ``assistant`` answers chats (None: chat replies that no model is loaded)."""
    state = ServerState(job, assistant, tile_cache_bytes, max_sessions)
    app = FastAPI(title="hwsi serve", docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=AsciiJSONResponse)
    app.state.hwsi = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.router.add_event_handler("shutdown", state.close)

    install_error_handlers(app)

    if not VENDOR_BUILT.is_file():
        log.warning("hwsi serve: %s; the API works, the page says so", NOT_BUILT)

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        if not VENDOR_BUILT.is_file():  # checked per request: a build while the server runs is picked up
            return HTMLResponse(f"<!doctype html><title>hwsi viewer not built</title><h1>hwsi viewer not built</h1>"
                                f"<p>{html.escape(NOT_BUILT)}</p>", status_code=503)
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {
            "ok": True,
            "slides": len(state.registry.ids()),
            "model": getattr(state.assistant, "name", None),
            "placement": model_placement(state.assistant),
            "tile_cache": {"entries": len(state.cache), "bytes": state.cache.nbytes, "hits": state.cache.hits},
        }

    app.include_router(slides_router(state))
    app.include_router(overlays_router(state))
    app.include_router(chat_router(state))
    return app
