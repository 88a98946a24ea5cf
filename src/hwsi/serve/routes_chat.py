"""Routes of the chat: start a chat about a slide, ask (an NDJSON stream of token/evidence/error/done events),
read its turns and a turn's relevance map, delete it. A model failure becomes an error event in the stream; a chat
answers one question at a time (409 while busy, until ``ask_timeout_s``).

An ask may carry ``roi`` (docs/roi.md): ``{"x", "y", "w", "h"}`` in level-0 px or a
GeoJSON geometry / Feature / FeatureCollection. It is checked before the stream starts (400 with one line: not a
rectangle or polygon, self-intersecting, too many vertices, outside the slide, no tissue patch inside); the stream
then sends a ``roi`` event (what the answer covers) and the turn records it."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from hwsi.slide.roi_geometry import Roi, RoiError, parse_rect, place_roi, roi_from_geojson
from hwsi.serve.assistant import model_placement
from hwsi.serve.geojson import heatmap_to_list
from hwsi.serve.replies import AsciiJSONResponse
from hwsi.serve.state import ChatState, ServerState, Turn

log = logging.getLogger("hwsi.serve")

MAX_QUESTION_CHARS = 2000
MAX_NEW_TOKENS = 512


class ChatStart(BaseModel):
    slide_id: str = Field(min_length=1, max_length=256)


class AskBody(BaseModel):
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    max_new_tokens: int = Field(default=128, ge=1, le=MAX_NEW_TOKENS)
    roi: dict[str, Any] | list[Any] | None = None  # {"x","y","w","h"} level-0 px, or GeoJSON


def parse_api_roi(value: dict[str, Any] | list[Any]) -> Roi:
    """The ``roi`` of an ask body as an :class:`~hwsi.slide.roi_geometry.Roi` (RoiError naming ``roi``)."""
    if isinstance(value, dict) and set(value) == {"x", "y", "w", "h"}:
        nums = [value[k] for k in ("x", "y", "w", "h")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in nums):
            raise RoiError("roi: x, y, w, h must be numbers (level-0 px)")
        return parse_rect(",".join(repr(float(v)) for v in nums), "roi")
    return roi_from_geojson(value, "roi")


def _ndjson(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def chat_router(state: ServerState) -> APIRouter:
    """``/api/chat`` and ``/api/chat/{session_id}[/ask|/heatmap]``."""
    router = APIRouter(default_response_class=AsciiJSONResponse)

    @router.post("/api/chat")
    def chat_start(body: ChatStart) -> dict[str, Any]:
        st = state.new_chat(body.slide_id)
        return {"session_id": st.session_id, "slide_id": st.slide_id, "model": getattr(state.assistant, "name", None),
                "placement": model_placement(state.assistant)}

    @router.get("/api/chat/{session_id}")
    def chat_get(session_id: str) -> dict[str, Any]:
        st = state.chat(session_id)
        return {"session_id": st.session_id, "slide_id": st.slide_id, "turns": [t.to_dict() for t in st.turns]}

    @router.delete("/api/chat/{session_id}")
    def chat_delete(session_id: str) -> dict[str, Any]:
        state.chat(session_id)
        with state._chat_lock:
            state.chats.pop(session_id, None)
        return {"deleted": session_id}

    @router.get("/api/chat/{session_id}/heatmap")
    def chat_heatmap(session_id: str, turn: int = Query(-1)) -> dict[str, Any]:
        st = state.chat(session_id)
        if not st.turns or not (-len(st.turns) <= turn < len(st.turns)):
            raise HTTPException(404, "no such turn")
        t = st.turns[turn]
        if t.heatmap is None:
            raise HTTPException(404, "this turn has no relevance map")
        return {"signal": t.signal, "scores": heatmap_to_list(t.heatmap)}

    @router.post("/api/chat/{session_id}/ask")
    def chat_ask(session_id: str, body: AskBody) -> StreamingResponse:
        st = state.chat(session_id)
        roi = None
        if body.roi is not None:
            try:
                roi = parse_api_roi(body.roi)
                place_roi(state.entry(st.slide_id).store, roi)
            except RoiError as exc:
                raise HTTPException(400, str(exc)) from None
        with st.lock:
            now = time.monotonic()
            if st.busy_since is not None and now - st.busy_since < state.ask_timeout_s:
                raise HTTPException(409, "this chat is still answering the previous question")
            st.busy_since = now
        return StreamingResponse(_answer(state, st, body, roi), media_type="application/x-ndjson")

    return router


def _answer(state: ServerState, st: ChatState, body: AskBody, roi: Roi | None = None) -> Iterator[bytes]:
    """Stream one answer: start, [roi,] token events, evidence, done; failures become an error event before done."""
    turn = Turn(body.question)
    st.turns.append(turn)
    try:
        yield _ndjson({"type": "start", "turn": len(st.turns) - 1})
        yield from _answer_events(state, st, turn, body, roi)
        yield _ndjson({"type": "done", "answer": turn.answer, "error": turn.error})
    finally:
        st.busy_since = None


def _answer_events(state: ServerState, st: ChatState, turn: Turn, body: AskBody, roi: Roi | None) -> Iterator[bytes]:
    if state.assistant is None:
        turn.error = "no model is loaded: start the server with `hwsi serve JOB --model DIR`"
        yield _ndjson({"type": "error", "message": turn.error})
        return
    try:
        if st.session is None:
            st.session = state.assistant.start(st.slide_id)
        if hasattr(st.session, "set_roi"):
            turn.roi = st.session.set_roi(roi)
        elif roi is not None:
            turn.error = f"the assistant {getattr(state.assistant, 'name', '')!r} cannot answer about a region"
            yield _ndjson({"type": "error", "message": turn.error})
            return
        if turn.roi is not None:
            yield _ndjson({"type": "roi", **turn.roi})
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
