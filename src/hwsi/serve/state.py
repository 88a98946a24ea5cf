"""What ``hwsi serve`` holds while it runs: the job's slide registry, open slides, overlay and tile caches, chats.

A slide id from a request is only ever a key of the job's :class:`~hwsi.serve.registry.SlideRegistry`
(:meth:`ServerState.entry`: 404 otherwise); chats are capped at ``max_sessions`` (the oldest idle one goes first).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException

from hwsi.serve.assistant import Assistant, AssistantSession, Evidence
from hwsi.serve.dzi import TileCache, TileSource, open_reader
from hwsi.serve.overlays import StoreOverlays
from hwsi.serve.registry import SlideEntry, SlideRegistry

log = logging.getLogger("hwsi.serve")

MAX_SESSIONS = 64


@dataclass
class Turn:
    question: str
    answer: str = ""
    evidence: list[Evidence] = field(default_factory=list)
    heatmap: np.ndarray | None = None
    signal: str = ""
    error: str | None = None
    roi: dict[str, Any] | None = None  # hwsi.model.roi.RoiSelection.record() of an ask about a region

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.answer,
            "evidence": [e.to_dict() for e in self.evidence],
            "signal": self.signal,
            "error": self.error,
            "roi": self.roi,
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
