"""The `hwsi serve` web app: slide list, DZI tiles, overlays, chat with streamed answers and evidence, export.

Only slides with a store in the job folder are served; a slide id from a request is only ever a key of the
job's :class:`~hwsi.serve.registry.SlideRegistry`. Tile levels/columns/rows are validated (404 when out of range),
request bodies and questions are size-limited, and a model failure becomes an error message in the chat stream.
Every JSON reply is ASCII (:mod:`hwsi.serve.replies`), so whatever a request held — a lone surrogate echoed in a 422 —
can be sent; URLs in replies percent-encode the id (``#``, ``%``, ``/``, non-ASCII); the export's file name is an
ASCII ``filename`` plus an RFC 6266 ``filename*``. A slide is opened one way (:func:`hwsi.serve.dzi.open_reader`);
a failed read (a corrupt tile: 502) leaves the next read a fresh backend handle.

Endpoints (all JSON unless stated)::

    GET  /                                          the viewer page (static HTML/JS/CSS shipped in the package)
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
    GET  /api/slides/{id}/export.geojson[?session=S&nuclei=1&spf=1]   QuPath GeoJSON
    POST /api/chat            {"slide_id"}                        -> {"session_id"}
    POST /api/chat/{sid}/ask  {"question", "max_new_tokens"?}     -> NDJSON stream of token/evidence/error/done
    GET  /api/chat/{sid}                            the turns so far (question, answer, evidence, error)
    GET  /api/chat/{sid}/heatmap?turn=N             per-patch relevance of turn N, (R, G) with nulls
    DELETE /api/chat/{sid}
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from hwsi.serve.assistant import Assistant, AssistantSession, Evidence
from hwsi.serve.dzi import TILE_FORMATS, TileCache, TileNotFound, TileSource, encode, etag_for, open_reader
from hwsi.serve.geojson import export_geojson, heatmap_to_list
from hwsi.serve.replies import AsciiJSONResponse, attachment, install_error_handlers, url_id
from hwsi.serve.overlays import StoreOverlays
from hwsi.serve.registry import SlideEntry, SlideRegistry

log = logging.getLogger("hwsi.serve")
STATIC = Path(__file__).parent / "static"

MAX_BODY_BYTES = 16 * 1024
MAX_QUESTION_CHARS = 2000
MAX_NEW_TOKENS = 512
MAX_SESSIONS = 64
TILE_MAX_AGE = 3600


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


class ChatStart(BaseModel):
    slide_id: str = Field(min_length=1, max_length=256)


class AskBody(BaseModel):
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    max_new_tokens: int = Field(default=128, ge=1, le=MAX_NEW_TOKENS)


@dataclass
class Turn:
    question: str
    answer: str = ""
    evidence: list[Evidence] = field(default_factory=list)
    heatmap: np.ndarray | None = None
    signal: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.answer,
            "evidence": [e.to_dict() for e in self.evidence],
            "signal": self.signal,
            "error": self.error,
        }


@dataclass
class ChatState:
    """One chat: its slide, the assistant session (made on first ask), turns, and a busy flag."""

    session_id: str
    slide_id: str
    session: AssistantSession | None = None
    turns: list[Turn] = field(default_factory=list)
    busy_since: float | None = None
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ServerState:
    """Everything the app holds: registry, open slides, overlay caches, tile cache, chats."""

    def __init__(
        self,
        job: str | Path,
        assistant: Assistant | None,
        tile_cache_bytes: int = 128 * 2**20,
        max_sessions: int = MAX_SESSIONS,
        ask_timeout_s: float = 600.0,
    ) -> None:
        self.registry = SlideRegistry(job)
        self.assistant = assistant
        self.cache = TileCache(tile_cache_bytes)
        self.max_sessions = max_sessions
        self.ask_timeout_s = ask_timeout_s
        self._sources: dict[str, TileSource] = {}
        self._overlays: dict[str, StoreOverlays] = {}
        self._lock = threading.Lock()
        self.chats: OrderedDict[str, ChatState] = OrderedDict()
        self._chat_lock = threading.Lock()

    def entry(self, slide_id: str) -> SlideEntry:
        e = self.registry.get(slide_id)
        if e is None:
            raise HTTPException(404, "no such slide in this job")
        return e

    def source(self, slide_id: str) -> TileSource:
        e = self.entry(slide_id)
        with self._lock:
            src = self._sources.get(e.slide_id)
        if src is not None:
            return src
        try:
            reader = open_reader(e.source, e.mpp)
        except Exception as exc:
            log.warning("cannot open slide %r (%s): %s", e.slide_id, e.source, exc)
            raise HTTPException(503, f"slide {e.slide_id} cannot be opened: {type(exc).__name__}") from exc
        src = TileSource(e.slide_id, reader)
        with self._lock:
            if e.slide_id in self._sources:  # another thread won the race
                reader.close()
                return self._sources[e.slide_id]
            self._sources[e.slide_id] = src
        return src

    def overlays(self, slide_id: str) -> StoreOverlays:
        e = self.entry(slide_id)
        with self._lock:
            ov = self._overlays.get(e.slide_id)
        if ov is None:
            try:
                ov = StoreOverlays.load(e.store)
            except Exception as exc:
                raise HTTPException(503, f"store of {e.slide_id} cannot be read: {type(exc).__name__}") from exc
            with self._lock:
                ov = self._overlays.setdefault(e.slide_id, ov)
        return ov

    def new_chat(self, slide_id: str) -> ChatState:
        e = self.entry(slide_id)
        sid = secrets.token_urlsafe(12)
        st = ChatState(sid, e.slide_id)
        with self._chat_lock:
            while len(self.chats) >= self.max_sessions:
                idle = [k for k, c in self.chats.items() if c.busy_since is None]
                if not idle:
                    raise HTTPException(503, "too many chats in progress; try again shortly")
                self.chats.pop(idle[0])
            self.chats[sid] = st
        return st

    def chat(self, session_id: str) -> ChatState:
        with self._chat_lock:
            st = self.chats.get(session_id)
            if st is None:
                raise HTTPException(404, "no such chat session")
            self.chats.move_to_end(session_id)
        st.last_used = time.monotonic()
        return st

    def close(self) -> None:
        with self._lock:
            for src in self._sources.values():
                try:
                    src.close()
                except Exception:
                    pass
            self._sources.clear()


def _slide_info(state: ServerState, e: SlideEntry) -> dict[str, Any]:
    return {
        "id": e.slide_id,
        "width": e.width,
        "height": e.height,
        "mpp": e.mpp,
        "stages": list(e.stages),
        "thumbnail": f"/api/slides/{url_id(e.slide_id)}/thumbnail.jpg",
        "dzi": f"/api/slides/{url_id(e.slide_id)}/image.dzi",
    }


def _ndjson(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


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

    # ---- page ---------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {
            "ok": True,
            "slides": len(state.registry.ids()),
            "model": getattr(state.assistant, "name", None),
            "tile_cache": {"entries": len(state.cache), "bytes": state.cache.nbytes, "hits": state.cache.hits},
        }

    # ---- slides -------------------------------------------------------------------------------------------
    @app.get("/api/slides")
    def slides() -> dict[str, Any]:
        state.registry.refresh()
        out = [_slide_info(state, state.entry(s)) for s in state.registry.ids()]
        return {"slides": out, "model": getattr(state.assistant, "name", None)}

    @app.get("/api/slides/{slide_id}")
    def slide(slide_id: str) -> dict[str, Any]:
        e = state.entry(slide_id)
        src = state.source(slide_id)
        ov = state.overlays(slide_id)
        g = src.geometry
        info = _slide_info(state, e)
        info.update(
            {
                "dzi_info": {"tile_size": g.tile_size, "overlap": g.overlap, "max_level": g.max_level, "format": "jpeg"},
                "tiles": f"/api/slides/{url_id(e.slide_id)}/image_files/",
                "region_size": ov.region_size_level0,
                "patch_size": ov.patch_size_level0,
                "n_regions": int(ov.region_coords.shape[0]),
                "overlays": {
                    "tissue": True,
                    "grid": True,
                    "spf": ov.selected is not None,
                    "nuclei": ov.has_cells,
                    "heatmap": state.assistant is not None,
                },
                "nucleus_types": ov.types(),
            }
        )
        return info

    @app.get("/api/slides/{slide_id}/thumbnail.jpg")
    def thumbnail(slide_id: str, request: Request) -> Response:
        src = state.source(slide_id)
        key = (slide_id, "thumb")
        etag = etag_for(slide_id, state.entry(slide_id).store.stat().st_mtime_ns, "thumb")
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        data = state.cache.get(key)
        if data is None:
            try:
                pixels = src.thumbnail(256)
            except Exception as exc:  # a corrupt read: reported, never a silent white image
                log.warning("thumbnail read failed %r: %s", slide_id, exc)
                raise HTTPException(502, f"thumbnail read failed: {type(exc).__name__}") from exc
            data = encode(pixels, "jpeg")
            state.cache.put(key, data)
        return Response(data, media_type="image/jpeg", headers=_cache_headers(etag))

    @app.get("/api/slides/{slide_id}/image.dzi")
    def dzi(slide_id: str) -> Response:
        src = state.source(slide_id)
        return Response(src.geometry.xml("jpeg"), media_type="application/xml")

    @app.get("/api/slides/{slide_id}/image_files/{level}/{name}")
    def tile(slide_id: str, level: str, name: str, request: Request) -> Response:
        col, row, fmt = _parse_tile(level, name)
        lvl = int(level)
        src = state.source(slide_id)
        try:
            src.geometry.tile_box(lvl, col, row)
        except TileNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        mtime = state.entry(slide_id).store.stat().st_mtime_ns
        etag = etag_for(slide_id, mtime, lvl, col, row, fmt)
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        key = (slide_id, lvl, col, row, fmt)
        data = state.cache.get(key)
        hit = data is not None
        if data is None:
            try:
                pixels = src.tile(lvl, col, row)
            except TileNotFound as exc:
                raise HTTPException(404, str(exc)) from exc
            except Exception as exc:  # a corrupt read is an error to report, never a silent white tile
                log.warning("tile read failed %r %s/%s_%s: %s", slide_id, lvl, col, row, exc)
                raise HTTPException(502, f"tile read failed: {type(exc).__name__}") from exc
            data = encode(pixels, fmt)
            state.cache.put(key, data)
        headers = _cache_headers(etag)
        headers["X-Tile-Cache"] = "hit" if hit else "miss"
        return Response(data, media_type=TILE_FORMATS[fmt], headers=headers)

    # ---- overlays -----------------------------------------------------------------------------------------
    @app.get("/api/slides/{slide_id}/overlays/tissue.png")
    def tissue(slide_id: str) -> Response:
        ov = state.overlays(slide_id)
        key = (slide_id, "tissue")
        data = state.cache.get(key)
        if data is None:
            data = encode(ov.tissue_mask_rgba(), "png")
            state.cache.put(key, data)
        _, source = ov.tissue_mask()
        return Response(data, media_type="image/png", headers={"X-Mask-Source": source, "Cache-Control": "no-cache"})

    @app.get("/api/slides/{slide_id}/overlays/grid")
    def grid(slide_id: str) -> dict[str, Any]:
        return state.overlays(slide_id).grid()

    @app.get("/api/slides/{slide_id}/overlays/spf")
    def spf(slide_id: str) -> dict[str, Any]:
        return state.overlays(slide_id).spf()

    @app.get("/api/slides/{slide_id}/overlays/nuclei")
    def nuclei(
        slide_id: str,
        x0: float = Query(...),
        y0: float = Query(...),
        x1: float = Query(...),
        y1: float = Query(...),
        limit: int = Query(5000, ge=1, le=20000),
    ) -> dict[str, Any]:
        ov = state.overlays(slide_id)
        if not all(np.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
            raise HTTPException(422, "box must be finite with x1 > x0 and y1 > y0")
        out = ov.nuclei_in_box(x0, y0, x1, y1, limit=limit)
        out["types"] = ov.types()
        return out

    @app.get("/api/slides/{slide_id}/export.geojson")
    def export(
        slide_id: str, session: str | None = None, nuclei: bool = True, spf: bool = True
    ) -> Response:
        ov = state.overlays(slide_id)
        evidence: list[Evidence] = []
        if session:
            st = state.chat(session)
            if st.slide_id != slide_id:
                raise HTTPException(404, "this chat is about another slide")
            for t in st.turns:
                evidence += t.evidence
        body = json.dumps(export_geojson(ov, evidence, nuclei=nuclei, spf=spf))
        return Response(
            body,
            media_type="application/geo+json",
            headers={"Content-Disposition": attachment(f"{slide_id}.geojson")},
        )

    # ---- chat ---------------------------------------------------------------------------------------------
    @app.post("/api/chat")
    def chat_start(body: ChatStart) -> dict[str, Any]:
        st = state.new_chat(body.slide_id)
        return {"session_id": st.session_id, "slide_id": st.slide_id, "model": getattr(state.assistant, "name", None)}

    @app.get("/api/chat/{session_id}")
    def chat_get(session_id: str) -> dict[str, Any]:
        st = state.chat(session_id)
        return {"session_id": st.session_id, "slide_id": st.slide_id, "turns": [t.to_dict() for t in st.turns]}

    @app.delete("/api/chat/{session_id}")
    def chat_delete(session_id: str) -> dict[str, Any]:
        state.chat(session_id)
        with state._chat_lock:
            state.chats.pop(session_id, None)
        return {"deleted": session_id}

    @app.get("/api/chat/{session_id}/heatmap")
    def chat_heatmap(session_id: str, turn: int = Query(-1)) -> dict[str, Any]:
        st = state.chat(session_id)
        if not st.turns or not (-len(st.turns) <= turn < len(st.turns)):
            raise HTTPException(404, "no such turn")
        t = st.turns[turn]
        if t.heatmap is None:
            raise HTTPException(404, "this turn has no relevance map")
        return {"signal": t.signal, "scores": heatmap_to_list(t.heatmap)}

    @app.post("/api/chat/{session_id}/ask")
    def chat_ask(session_id: str, body: AskBody) -> StreamingResponse:
        st = state.chat(session_id)
        with st.lock:
            now = time.monotonic()
            if st.busy_since is not None and now - st.busy_since < state.ask_timeout_s:
                raise HTTPException(409, "this chat is still answering the previous question")
            st.busy_since = now
        return StreamingResponse(_answer(state, st, body), media_type="application/x-ndjson")

    return app


def _answer(state: ServerState, st: ChatState, body: AskBody) -> Iterator[bytes]:
    """Stream one answer: start, token events, evidence, done; failures become an error event before done."""
    turn = Turn(body.question)
    st.turns.append(turn)
    try:
        yield _ndjson({"type": "start", "turn": len(st.turns) - 1})
        yield from _answer_events(state, st, turn, body)
        yield _ndjson({"type": "done", "answer": turn.answer, "error": turn.error})
    finally:
        st.busy_since = None


def _answer_events(state: ServerState, st: ChatState, turn: Turn, body: AskBody) -> Iterator[bytes]:
    if state.assistant is None:
        turn.error = "no model is loaded: start the server with `hwsi serve JOB --model DIR`"
        yield _ndjson({"type": "error", "message": turn.error})
        return
    try:
        if st.session is None:
            st.session = state.assistant.start(st.slide_id)
        pieces: list[str] = []
        for piece in st.session.ask(body.question, body.max_new_tokens):
            pieces.append(piece)
            turn.answer = "".join(pieces)
            yield _ndjson({"type": "token", "text": piece})
    except Exception as exc:
        log.exception("model failed in chat %s", st.session_id)
        turn.error = f"the model failed: {type(exc).__name__}: {exc}"[:500]
        yield _ndjson({"type": "error", "message": turn.error})
        return
    try:
        ev = st.session.evidence(body.question, turn.answer)
        turn.evidence, turn.heatmap, turn.signal = list(ev.items), ev.heatmap, ev.signal
    except Exception as exc:
        log.exception("evidence failed in chat %s", st.session_id)
        turn.error = f"evidence could not be computed: {type(exc).__name__}: {exc}"[:500]
        yield _ndjson({"type": "error", "message": turn.error})
        return
    yield _ndjson(
        {"type": "evidence", "turn": len(st.turns) - 1, "signal": ev.signal, "items": [e.to_dict() for e in ev.items]}
    )


def _parse_tile(level: str, name: str) -> tuple[int, int, str]:
    """``level`` and ``"{col}_{row}.{fmt}"`` as ints and a known format, else 404 (never a path, never a 500)."""
    stem, dot, fmt = name.rpartition(".")
    parts = stem.split("_")
    ok = (
        dot == "."
        and fmt in TILE_FORMATS
        and len(parts) == 2
        and all(p.isascii() and p.isdigit() and len(p) <= 9 for p in parts)
        and level.isascii()
        and level.isdigit()
        and len(level) <= 3
    )
    if not ok:
        raise HTTPException(404, "no such tile")
    return int(parts[0]), int(parts[1]), fmt


def _cache_headers(etag: str) -> dict[str, str]:
    return {"Cache-Control": f"public, max-age={TILE_MAX_AGE}", "ETag": etag}
