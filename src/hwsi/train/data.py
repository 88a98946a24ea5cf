"""Training data: slides (stores of a job, cached as .pt) and text (records of the TRAIN split) mapped by slide id.

* :class:`SlideCache` — ``load_slide_inputs`` once per slide, written with ``save_slide_inputs`` under
  ``RUN/cache/inputs-<hash>/<slide_id>.pt`` (hash of the selection settings) and always read back through
  ``load_cached_inputs`` (the first epoch sees exactly what later ones and a resumed run see); an LRU keeps the
  most recent slides in RAM. Several processes build it together before training, each its own share, then wait
  for each other (:meth:`SlideCache.prepare`): no file is written by two processes or read while being written.
* :func:`load_train_text` — records (any format of :mod:`hwsi.data`) matched to the job's stores; records
  without a store are reported (``TrainText.match``), never fatal. Reports per slide come from ``data.reports``
  (restricted to slides that HAVE train records, so val/test reports of a cohort-wide file never train) or, without
  such a file, the longest answer among the slide's records.
* :func:`report_units` — the language hierarchy of a report for Eq. 6–7: words (content words) ↔ cells, phrases
  (noun-phrase-like chunks cut at punctuation and stop words, :func:`hwsi.features.vocab.entities_from_report`)
  ↔ patches, sentences ↔ regions, the whole report ↔ the slide.
* :class:`TextBank` — frozen text-encoder embeddings of unique strings, cached on disk.
* :func:`findings_text` — a slide's ground-truth facts written as words (stage 0's ``<image>`` slot).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hwsi import textio
from hwsi.errors import ConfigError, ConfigFileError
from hwsi.model.inputs import (INPUTS_SCHEMA, SlideBatch, SlideInputs, collate_slides, load_cached_inputs,
                              load_slide_inputs, save_slide_inputs)
from hwsi.train.config import DataConfig
from hwsi.data import Conversation, MatchReport, QAItem, load_records_report, match_records_to_stores
from hwsi.features.vocab import entities_from_report

log = logging.getLogger(__name__)

IMAGE = "<image>"


def resolve(job: Path, path: str) -> Path:
    """``path`` as given when absolute, else relative to the job folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(job) / p


def store_ids(job: Path, data: DataConfig) -> dict[str, Path]:
    """slide_id -> store path of every ``*.h5`` in the job's stores folder (sorted)."""
    folder = resolve(job, data.stores)
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.h5"))}


# ------------------------------------------------------------------------------------------------ slides
class SlideCache:
    """SlideInputs per slide id, via a disk cache of ``save_slide_inputs`` files (see module docstring)."""

    def __init__(self, stores: dict[str, Path], cache_root: Path, data: DataConfig, max_regions: int, k: int,
                 max_cells: int) -> None:
        self.stores = stores
        self.kw = dict(patch_encoder=data.patch_encoder, region_input=data.region_input, max_regions=max_regions,
                       k=k, max_cells=max_cells)
        key = hashlib.sha1(json.dumps({**self.kw, "schema": INPUTS_SCHEMA}, sort_keys=True).encode()).hexdigest()[:10]
        self.dir = Path(cache_root) / f"inputs-{key}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity = max(0, data.memory_cache)
        self._mem: OrderedDict[str, SlideInputs] = OrderedDict()

    def path(self, slide_id: str) -> Path:
        return self.dir / f"{slide_id}.pt"

    def ensure(self, slide_id: str) -> Path:
        """Write the slide's cache file if it is missing or older than its store."""
        store = self.stores.get(slide_id)
        if store is None:
            raise ConfigError(f"slide {slide_id!r} has no store")
        p = self.path(slide_id)
        if not p.is_file() or p.stat().st_mtime < store.stat().st_mtime:
            save_slide_inputs(load_slide_inputs(store, **self.kw), p)
        return p

    def prepare(self, slide_ids: list[str], progress: bool = True, rank: int = 0, world: int = 1,
                barrier: Callable[[], None] | None = None) -> None:
        """Write the cache files of ``slide_ids`` that are missing or stale, before training.

        Process ``rank`` of ``world`` writes every ``world``-th slide of the sorted ids from its rank (a slide is
        only ever written by one process), then ``barrier()`` waits for all of them; each process then checks that
        every file is there (and up to date), so training reads only finished files."""
        from tqdm.auto import tqdm

        todo = sorted(set(slide_ids))
        for sid in tqdm(todo[rank::world], desc="slide cache", unit="slide", disable=not progress or rank != 0):
            self.ensure(sid)
        if world > 1:
            if barrier is None:
                raise ConfigError("SlideCache.prepare: several processes need a barrier")
            barrier()
            for sid in todo:
                self.ensure(sid)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for a DataLoader worker) without the slides held in RAM: a worker reads the ``.pt`` files."""
        return {**self.__dict__, "_mem": OrderedDict()}

    def get(self, slide_id: str) -> SlideInputs:
        if slide_id in self._mem:
            self._mem.move_to_end(slide_id)
            return self._mem[slide_id]
        x = load_cached_inputs(self.ensure(slide_id))
        if self.capacity:
            self._mem[slide_id] = x
            while len(self._mem) > self.capacity:
                self._mem.popitem(last=False)
        return x


class CachedSlides:
    """The load of stage 1's DataLoader (:mod:`hwsi.train.loader`): slide ids -> (ids, their collated SlideBatch),
    read through a :class:`SlideCache` whose files :meth:`SlideCache.prepare` wrote before training (picklable: a
    worker process gets a copy of the cache without its RAM part)."""

    def __init__(self, cache: SlideCache) -> None:
        self.cache = cache

    def __call__(self, slide_ids: list[str]) -> tuple[list[str], SlideBatch]:
        return list(slide_ids), collate_slides([self.cache.get(s) for s in slide_ids])


# ------------------------------------------------------------------------------------------------ text
@dataclass
class ChatSample:
    """One training conversation about one slide, messages as role/content (user/assistant)."""

    slide_id: str
    messages: list[dict[str, str]]
    record_id: str = ""
    roi: tuple[float, float, float, float] | None = None  # x, y, w, h (level-0 px): a question about this rectangle

    @property
    def visual_key(self) -> str:
        """Which visual prefix the sample is answered from: the slide id, or ``slide@x,y,w,h`` for an ROI sample."""
        return self.slide_id if self.roi is None else f"{self.slide_id}@{','.join(f'{v:g}' for v in self.roi)}"


def record_messages(rec: Conversation | QAItem) -> list[dict[str, str]]:
    """A record as chat messages with one ``<image>`` in the first user turn."""
    if isinstance(rec, Conversation):
        msgs = [{"role": "user" if t.role == "human" else "assistant", "content": t.text} for t in rec.turns]
    else:
        q = rec.question
        if rec.options and not all(o in q for o in rec.options):
            q += "\n" + "\n".join(f"{chr(65 + i)}) {o}" for i, o in enumerate(rec.options))
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": rec.answer}]
    if not any(IMAGE in m["content"] for m in msgs):
        first = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
        if first is not None:
            msgs[first] = {"role": "user", "content": f"{IMAGE}\n{msgs[first]['content']}"}
    return msgs


def _read_map(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    data = textio.read_json(path, ConfigFileError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object slide_id -> {what}")
    return data


@dataclass
class TrainText:
    """The train split's text, restricted to slides with a store (when the job has stores)."""

    samples: list[ChatSample]
    reports: dict[str, str]
    captions: dict[str, str] = field(default_factory=dict)
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    match: MatchReport | None = None
    skipped_records: list[str] = field(default_factory=list)  # where the bad records left out are (skip_bad_records)

    @property
    def slide_ids(self) -> list[str]:
        return sorted({s.slide_id for s in self.samples})


def load_train_text(job: Path, data: DataConfig, stores: dict[str, Path] | None = None,
                    need_stores: bool = True) -> TrainText:
    """Records -> samples matched to stores; reports, captions and facts of those slides (module docstring)."""
    path = resolve(job, data.records)
    loaded = load_records_report(path, data.records_format, skip_bad=data.skip_bad_records)
    records = loaded.records
    if loaded.skipped:
        log.warning("records %s: %s", path, loaded.summary())
    match = None
    if stores or need_stores:
        records, match = match_records_to_stores(records, list(stores or {}))
        log.info("records %s: %s", path, match.summary())
        if match.n_unmatched:
            log.warning("%d records have no store (first: %s)", match.n_unmatched, match.unmatched[:3])
    samples = [ChatSample(r.slide_id, record_messages(r), r.record_id, r.metadata.get("roi")) for r in records]
    train_ids = {s.slide_id for s in samples}
    if data.reports:
        reports = {k: str(v) for k, v in _read_map(resolve(job, data.reports), "report").items() if k in train_ids}
    else:
        reports = {}
        for s in samples:
            for m in s.messages:
                if m["role"] == "assistant" and len(m["content"]) > len(reports.get(s.slide_id, "")):
                    reports[s.slide_id] = m["content"]
    captions = {}
    if data.captions:
        captions = {k: str(v) for k, v in _read_map(resolve(job, data.captions), "caption").items() if k in train_ids}
    facts = {}
    if data.facts:
        facts = {k: v for k, v in _read_map(resolve(job, data.facts), "facts").items() if k in train_ids}
    return TrainText(samples, reports, captions, facts, match, loaded.skipped_where)


_SENT = re.compile(r"(?<=[.!?])\s+")


@dataclass
class ReportUnits:
    """The language hierarchy of one report (each list de-duplicated, first occurrence kept)."""

    words: list[str]
    phrases: list[str]
    sentences: list[str]
    report: str


def _dedupe(xs: list[str], cap: int) -> list[str]:
    out: list[str] = []
    for x in xs:
        if x and x not in out:
            out.append(x)
    return out[:cap]


def report_units(report: str, max_words: int = 64, max_phrases: int = 64, max_sentences: int = 32) -> ReportUnits:
    """Words, phrases, sentences of a report (see the module docstring for the rules)."""
    text = " ".join(report.split())
    sentences = _dedupe([s.strip() for s in _SENT.split(text)], max_sentences)
    phrases = entities_from_report(text, max_words=4, max_entities=max_phrases)
    words = _dedupe([w for p in entities_from_report(text, max_words=1, max_entities=10_000) for w in p.split()],
                    max_words)
    return ReportUnits(words, phrases, sentences, text)


class TextBank:
    """Frozen embeddings of unique strings (float32, CPU), persisted to ``path`` (a torch .pt dict)."""

    def __init__(self, encoder, path: Path | None = None) -> None:
        self.encoder = encoder
        self.path = path
        self.emb: dict[str, torch.Tensor] = {}
        if path is not None and path.is_file():
            self.emb = torch.load(path, weights_only=True)
        self._dirty = False

    @property
    def dim(self) -> int:
        return int(self.encoder.embed_dim)

    def add(self, texts: list[str], batch_size: int = 64) -> None:
        todo = sorted({t for t in texts if t not in self.emb})
        if not todo:
            return
        vecs = self.encoder.encode(todo, batch_size=batch_size)
        for t, v in zip(todo, vecs, strict=True):
            self.emb[t] = torch.from_numpy(v.copy())
        self._dirty = True

    def save(self) -> None:
        if self.path is not None and self._dirty:
            tmp = self.path.with_name(self.path.name + ".tmp")
            torch.save(self.emb, tmp)
            tmp.replace(self.path)
            self._dirty = False

    def stack(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self.emb[t] for t in texts])


def findings_text(facts: dict[str, Any]) -> str:
    """Ground-truth facts as words, e.g. ``diagnosis: adenocarcinoma; grade: high; glands: yes`` (scalars only)."""
    parts = []
    for k, v in facts.items():
        if isinstance(v, (str, int, float, bool)) and str(v) != "":
            parts.append(f"{k.replace('_', ' ')}: {v}")
    return "; ".join(parts)


_OPTION_LINE = re.compile(r"^([A-Z])\) (.+)$")


def _split_options(question: str) -> tuple[str, list[str]] | None:
    """``"stem\\nA) x\\nB) y"`` -> (stem, [x, y]) when the question ends with lettered options A), B), ..."""
    lines = question.rstrip().split("\n")
    opts: list[str] = []
    while lines:
        m = _OPTION_LINE.match(lines[-1].strip())
        if not m:
            break
        opts.insert(0, m.group(2))
        lines.pop()
    if len(opts) < 2 or [chr(ord("A") + i) for i in range(len(opts))] != [
            _OPTION_LINE.match(x.strip()).group(1) for x in question.rstrip().split("\n")[-len(opts):]]:
        return None
    return "\n".join(lines), opts


def permute_options(samples: list[ChatSample], n: int, seed: int = 0, text_answers: bool = False) -> list[ChatSample]:
    """``samples`` plus, for every closed-ended one, ``n`` copies with the options re-ordered (answer letter follows).

    A closed-ended turn is a user message ending with lettered option lines (``A) ...``) answered by an assistant
    message ``"<letter>) <option text>"``. The text is the same train record's; only the order of its options and
    the letter change, so the LM learns to pick the option by its TEXT rather than by a letter prior (the eval's
    options come in random order too). Other samples are kept once.

    ``text_answers``: closed-ended answers (originals and copies) become the option text alone (``"focal"`` for
    ``"C) focal"``); the closed-choice scorer accepts an option's letter or its text (hwsi.eval.vqa.parse_choice).
    A tiny LM can learn to name the right option long before it learns to copy the letter printed before it.
    """
    if n <= 0 and not text_answers:
        return list(samples)
    rng = random.Random(seed)
    out = []
    for s in samples:
        turns = []
        for i in range(len(s.messages) - 1):
            u, a = s.messages[i], s.messages[i + 1]
            if u["role"] != "user" or a["role"] != "assistant":
                continue
            split = _split_options(u["content"])
            m = _OPTION_LINE.match(a["content"].strip())
            if split is None or m is None:
                continue
            stem, opts = split
            gold = ord(m.group(1)) - ord("A")
            if not 0 <= gold < len(opts) or opts[gold].strip() != m.group(2).strip():
                continue
            turns.append((i, stem, opts, gold))
        if not turns:
            out.append(s)
            continue
        if text_answers:
            msgs = [dict(m) for m in s.messages]
            for i, _stem, opts, gold in turns:
                msgs[i + 1]["content"] = opts[gold]
            out.append(replace(s, messages=msgs))
        else:
            out.append(s)
        for _ in range(n):
            msgs = [dict(m) for m in s.messages]
            for i, stem, opts, gold in turns:
                order = list(range(len(opts)))
                rng.shuffle(order)
                lines = [f"{chr(ord('A') + j)}) {opts[o]}" for j, o in enumerate(order)]
                msgs[i]["content"] = stem + "\n" + "\n".join(lines)
                new = order.index(gold)
                msgs[i + 1]["content"] = opts[gold] if text_answers else f"{chr(ord('A') + new)}) {opts[gold]}"
            out.append(replace(s, messages=msgs))
    return out
