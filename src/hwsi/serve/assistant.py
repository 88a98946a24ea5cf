"""The chat assistant behind `hwsi serve`: a small protocol, evidence helpers, and the adapter to hwsi.model.

Protocol::

    assistant.start(slide_id) -> session
    session.ask(question, max_new_tokens) -> Iterator[str]            # streamed text pieces, greedy by default
    session.evidence(question, answer) -> EvidenceResult               # per-patch relevance + top regions/patches

The server never touches a model directly; tests plug in small real implementations of the protocol (one that
fails, one that echoes slowly) for the failure and concurrency cases, and the real adapter
(:class:`ModelAssistant`, wrapping ``hwsi.model``'s chat session) for the end-to-end test and `--model DIR`.

Relevance signal used for the heatmap (also stated in the README): cosine similarity between the text embedding
of "question + answer" (frozen text encoder) and each patch's embedding in the shared image–text space
(the frozen patch encoder's features stored as ``patches/<encoder>``), min–max normalised over the slide's
tissue patches. It depends on the question and the answer, not on the LLM's internals.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class Evidence:
    """One piece of evidence behind an answer: a region or patch, its level-0 box and its relevance score."""

    kind: str  # "region" | "patch"
    region: int
    patch: int  # -1 for a region
    x: int
    y: int
    w: int
    h: int
    score: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["score"] = round(float(self.score), 4)
        return d


@dataclass
class EvidenceResult:
    """Per-patch relevance (R, G) (NaN where not tissue) and the top evidence items, best first."""

    heatmap: np.ndarray
    items: list[Evidence] = field(default_factory=list)
    signal: str = ""


class AssistantSession(Protocol):
    """A multi-turn conversation about one slide."""

    def ask(self, question: str, max_new_tokens: int = 128) -> Iterator[str]: ...

    def evidence(self, question: str, answer: str) -> EvidenceResult: ...


class Assistant(Protocol):
    """Makes chat sessions; ``name`` is shown in the page."""

    name: str

    def start(self, slide_id: str) -> AssistantSession: ...


def evidence_from_heatmap(
    heatmap: np.ndarray,
    region_coords: np.ndarray,
    patch_coords: np.ndarray,
    region_size0: float,
    patch_size0: float,
    top_patches: int = 5,
    top_regions: int = 3,
) -> list[Evidence]:
    """Top regions (mean of their 4 best patches) then top patches of a (R, G) relevance map (NaN ignored)."""
    h = np.asarray(heatmap, dtype=np.float64)
    items: list[Evidence] = []
    if h.size == 0 or not np.isfinite(h).any():
        return items
    filled = np.where(np.isfinite(h), h, -np.inf)
    k = min(4, h.shape[1])
    best = -np.sort(-filled, axis=1)[:, :k]
    with np.errstate(invalid="ignore"):
        rscore = np.where(np.isfinite(best), best, np.nan)
        rmean = np.nanmean(np.where(np.isfinite(rscore), rscore, np.nan), axis=1)
    rs, ps = int(round(region_size0)), int(round(patch_size0))
    for r in np.argsort(-np.nan_to_num(rmean, nan=-np.inf))[:top_regions]:
        if not np.isfinite(rmean[r]):
            continue
        x, y = region_coords[r]
        items.append(Evidence("region", int(r), -1, int(x), int(y), rs, rs, float(rmean[r])))
    flat = np.argsort(-filled, axis=None)[:top_patches]
    for f in flat:
        r, g = divmod(int(f), h.shape[1])
        if not np.isfinite(h[r, g]):
            continue
        x, y = patch_coords[r, g]
        items.append(Evidence("patch", r, g, int(x), int(y), ps, ps, float(h[r, g])))
    return items


def normalise(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Min–max scale the valid entries to [0, 1]; others NaN."""
    out = np.full(scores.shape, np.nan, dtype=np.float32)
    v = valid & np.isfinite(scores)
    if v.any():
        s = scores[v].astype(np.float64)
        lo, hi = s.min(), s.max()
        out[v] = ((s - lo) / (hi - lo) if hi > lo else np.ones_like(s)).astype(np.float32)
    return out
