"""The chat assistant behind `hwsi serve`: a small protocol, evidence helpers, and the adapter to hwsi.model.

Protocol::

    assistant.start(slide_id) -> session
    session.ask(question, max_new_tokens) -> Iterator[str]            # streamed text pieces, greedy by default
    session.evidence(question, answer) -> EvidenceResult               # per-patch relevance + top regions/patches
    session.set_roi(roi) -> dict | None                                # optional: answer about a region (or None)

The server never touches a model directly; tests plug in small real implementations of the protocol (one that
fails, one that echoes slowly) for the failure and concurrency cases, and the real adapter
(:class:`ModelAssistant`, wrapping ``hwsi.model``'s chat session) for the end-to-end test and `--model DIR`.

Relevance signal used for the heatmap (:data:`RELEVANCE_SIGNAL`, also stated in the README): cosine similarity
between the text embedding of "question + answer" (the store's frozen text encoder, e.g. MiniLM) and each tissue
patch's frozen embedding in the shared image–text space (``patches/<patch_encoder>``, the space SPF Eq. 2 uses),
min–max normalised over the slide's tissue patches. It covers every tissue patch (not only the SPF-selected ones
the LLM sees) and shows which patches match the wording of the question and answer; it is not an attribution of
the LLM's internal computation (attention mass on visual tokens would be the alternative).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hwsi.devices import resolve_placement
from hwsi.errors import StoreError
from hwsi.serve.registry import SlideRegistry
from hwsi.store import SlideStore


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
    region_size_level0: float,
    patch_size_level0: float,
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
    rs, ps = int(round(region_size_level0)), int(round(patch_size_level0))
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


# ---- the relevance signal: question+answer text vs each patch's frozen embedding ---------------------------
TextEncodeFn = Callable[[list[str]], np.ndarray]


@dataclass
class StoreEncoders:
    """Names the store's `hwsi extract` run used: patch features, region input, and the paired text encoder."""

    patch_encoder: str
    region_input: str
    text_encoder: str

    @classmethod
    def read(cls, store: Path) -> "StoreEncoders":
        with SlideStore(store) as s:
            settings = s.json_attr("extract", {}) or {}
            encoders = s.meta.encoders
            patch = settings.get("patch_encoder") or next(iter(encoders), None)
            region = str(s.attr("region_input", settings.get("region_input", patch)))
            text = settings.get("text_encoder", "minilm")
        if not patch:
            raise StoreError(store, "no patch features recorded (run `hwsi extract`)")
        return cls(str(patch), region if region not in ("", "same", "None") else str(patch), str(text))


def text_patch_relevance(store: Path, patch_encoder: str, text_emb: np.ndarray, chunk: int = 64) -> np.ndarray:
    """cos(text, f_ij) for every tissue patch of the store, min–max normalised to [0, 1]; (R, G), NaN elsewhere.

    Reads ``patches/<patch_encoder>`` ``chunk`` regions at a time (memory bounded by the chunk, not the slide).
    """
    t = np.asarray(text_emb, np.float64).reshape(-1)
    t = t / (np.linalg.norm(t) + 1e-12)
    with SlideStore(store) as s:
        dim = s.feature_dim(patch_encoder)
        tissue = s.patch_tissue()
        if dim != t.shape[0]:
            raise ValueError(
                f"text embedding is {t.shape[0]}-d but patches/{patch_encoder} is {dim}-d: "
                "they must share one image–text space"
            )
        scores = np.full(tissue.shape, np.nan, np.float64)
        for r0 in range(0, tissue.shape[0], chunk):
            x = s.patch_features(patch_encoder, slice(r0, r0 + chunk)).astype(np.float64)
            n = np.linalg.norm(x, axis=-1)
            scores[r0 : r0 + chunk] = (x @ t) / np.maximum(n, 1e-12)
    return normalise(scores, tissue)


RELEVANCE_SIGNAL = (
    "cosine similarity of the text embedding of question + answer (the store's text encoder) with each tissue "
    "patch's frozen embedding (patches/<patch_encoder>, the image–text space SPF Eq. 2 uses), min–max scaled"
)


# ---- the real assistant: hwsi.model's cached ChatSession ---------------------------------------------------
class ModelChat:
    """One conversation: hwsi.model.chat.ChatSession (visual prefix prefilled once) + the evidence of each answer."""

    def __init__(self, owner: "ModelAssistant", chat: Any, store: Path, encoders: StoreEncoders) -> None:
        self.owner = owner
        self.chat = chat
        self.store = store
        self.encoders = encoders

        with SlideStore(store) as s:
            self.region_coords = s.region_coords()
            self.patch_coords = s.patch_coords()
            self.region_size_level0 = float(s.meta.region_size_level0)
            self.patch_size_level0 = float(s.meta.patch_size_level0)

        self.whole_chat = chat
        self.roi: Any = None  # hwsi.model.roi.RoiSelection of the current ROI, None = the whole slide

    def set_roi(self, roi: Any) -> dict[str, Any] | None:
        """Answer the next questions from the tokens inside ``roi`` (a :class:`hwsi.slide.roi_geometry.Roi`), or
        from the whole slide (None). A new ROI starts a new conversation in the model (its visual prefix differs);
        the server's turns keep the history. Returns the ROI's record (summary, counts) or None."""
        from hwsi.model.chat import ChatSession
        from hwsi.model.roi import roi_slide_inputs

        if roi is None:
            if self.roi is not None:
                self.chat, self.roi = self.whole_chat, None
                self.chat.reset()
            return None
        if self.roi is not None and self.roi.roi.to_geojson() == roi.to_geojson():
            return self.roi.record()
        cfg = self.owner.model.cfg
        x = roi_slide_inputs(self.store, self.encoders.patch_encoder, self.encoders.region_input, roi,
                             cfg.max_regions, cfg.k, cfg.max_cells)
        self.chat = ChatSession(self.owner.model, x.inputs, system=self.owner.system,
                                max_new_tokens=self.owner.max_new_tokens, region_token_mask=x.region_token_mask)
        self.roi = x.selection
        return self.roi.record()

    def ask(self, question: str, max_new_tokens: int = 128) -> Iterator[str]:
        """Greedy streamed answer; multi-turn (the chat session keeps the conversation in its KV cache)."""
        return self.chat.stream(question, max_new_tokens)

    def evidence(self, question: str, answer: str) -> EvidenceResult:
        """Relevance over the tissue patches (inside the ROI only, when one is set) and the top items; with an ROI,
        regions are listed only where their token was used (evidence stays inside it)."""
        emb = self.owner.encode_text(self.encoders.text_encoder, [f"{question} {answer}".strip()])[0]
        heat = text_patch_relevance(self.store, self.encoders.patch_encoder, emb)
        if self.roi is not None:
            from hwsi.slide.roi_geometry import place_roi

            heat = np.where(place_roi(self.store, self.roi.roi).inside, heat, np.nan).astype(np.float32)
        with warnings.catch_warnings():  # regions wholly outside the ROI: all-NaN rows, "mean of empty slice"
            warnings.simplefilter("ignore", RuntimeWarning)
            items = evidence_from_heatmap(
                heat, self.region_coords, self.patch_coords, self.region_size_level0, self.patch_size_level0
            )
        if self.roi is not None:
            used = set(int(r) for r in self.roi.region_tokens)
            items = [e for e in items if e.kind != "region" or e.region in used]
        return EvidenceResult(heat, items, RELEVANCE_SIGNAL)


class ModelAssistant:
    """The :class:`Assistant` over a trained MLLM-HWSI (``hwsi.model.mllm.MLLMHWSI``).

    ``text_encode`` maps (encoder name, texts) to embeddings; by default the registry's text encoder of that name
    (``hwsi.features.encoders.create_text_encoder``), created once and shared by all chats. ``inputs_fn`` reads a
    store into ``SlideInputs`` (default: the store's recorded encoders and the model config's selection sizes).
    Sessions share the model (inference only, no grad); each holds its own KV cache.
    """

    def __init__(
        self,
        model: Any,
        job: str | Path,
        name: str = "hwsi-mllm",
        text_encode: Callable[[str, list[str]], np.ndarray] | None = None,
        max_new_tokens: int = 256,
        system: str | None = None,
        inputs_fn: Callable[[Path], Any] | None = None,
    ) -> None:
        self.model = model.eval()
        self.registry = SlideRegistry(job)
        self.name = name
        self._text_encode = text_encode
        self._text_encoders: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.max_new_tokens = max_new_tokens
        self.system = system
        self._inputs_fn = inputs_fn

    @classmethod
    def load(cls, model_dir: str | Path, job: str | Path, device: str = "cpu",
             dtype: str | None = None) -> "ModelAssistant":
        """A trained run folder of `hwsi train` (hwsi.train.inference.load_trained_model; LoRA merged); slide inputs
        are selected with the run's settings (encoders, max_regions, k, max_cells). ``device`` / ``dtype`` (None =
        the run's llm_dtype): hwsi.devices.resolve_placement; /api/health and /api/chat report them."""
        from hwsi.train.inference import load_trained_model, run_config, slide_inputs_for

        cfg = run_config(model_dir)
        model = load_trained_model(model_dir, placement=resolve_placement(device, dtype or cfg.llm_dtype))
        return cls(
            model,
            job,
            name=f"hwsi-mllm ({Path(model_dir).name})",
            inputs_fn=lambda store: slide_inputs_for(store, model_dir, cfg=cfg),
        )

    def encode_text(self, encoder: str, texts: list[str]) -> np.ndarray:
        if self._text_encode is not None:
            return np.asarray(self._text_encode(encoder, texts), np.float32)
        with self._lock:
            enc = self._text_encoders.get(encoder)
            if enc is None:
                from hwsi.features.encoders import create_text_encoder

                enc = self._text_encoders[encoder] = create_text_encoder(encoder)
        return np.asarray(enc.encode(texts), np.float32)

    def start(self, slide_id: str) -> ModelChat:
        from hwsi.model.inputs import load_slide_inputs
        from hwsi.model.chat import ChatSession

        entry = self.registry.get(slide_id)
        if entry is None:
            raise StoreError(slide_id, "no store for this slide in the job")
        enc = StoreEncoders.read(entry.store)
        if self._inputs_fn is not None:
            inputs = self._inputs_fn(entry.store)
        else:
            cfg = self.model.cfg
            inputs = load_slide_inputs(
                entry.store, enc.patch_encoder, enc.region_input, cfg.max_regions, cfg.k, cfg.max_cells
            )
        chat = ChatSession(self.model, inputs, system=self.system, max_new_tokens=self.max_new_tokens)
        return ModelChat(self, chat, entry.store, enc)


def model_placement(assistant: Any) -> dict[str, str] | None:
    """The device and dtype the assistant's model runs in (hwsi.devices.Placement.record), or None (no model, or a
    scripted assistant)."""
    place = getattr(getattr(assistant, "model", None), "placement", None)
    return place.record() if place is not None and hasattr(place, "record") else None
