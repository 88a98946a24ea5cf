"""Stage-1 targets of reading v2 (docs/design.md §5): banks of report clauses per scale and of whole reports.

``BankBuilder(units, reports, facts, same_fact)`` holds the TRAIN split's clauses by scale
(:func:`hwsi.train.units.route_report`) and reports; ``builder(slide_ids, emb)`` returns the
:class:`hwsi.model.losses.AlignmentTargets` of a batch, whose ``banks`` give each scale's candidates (every unit of
that scale in the train split), the batch slides' own units (positives) and the allowed negatives (not an own unit,
not a unit that states the same fact: ``same_fact`` rules over ``data.facts``). Eq. 6 pools each slide's tokens per
unit (:func:`hwsi.model.losses.pooled_unit_scores`); Eq. 7 contrasts the slide token with the report bank.

``emb`` maps every string of ``builder.strings`` (units and reports) to its current text embedding: the frozen
text encoder's, or — with a trainable text tower — a bank refreshed every ``text_refresh_every`` steps whose rows
for the batch's own units are replaced by live, differentiable embeddings (:class:`LiveText`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwsi.errors import ConfigError
from hwsi.model.losses import AlignmentTargets, BankTargets
from hwsi.train.units import UNIT_SCALES, Unit
from hwsi.utils.atomic import atomic_path

BANK_SCALES = (*UNIT_SCALES, "report")


def parse_same_fact(rules: tuple[str, ...] | list[str]) -> dict[str, tuple[str, ...]]:
    """``("cells=atypia", "slide=diagnosis+extent")`` -> ``{"cells": ("atypia",), "slide": ("diagnosis", "extent")}``."""
    out: dict[str, tuple[str, ...]] = {}
    for r in rules:
        scale, _, facts = str(r).partition("=")
        keys = tuple(k.strip() for k in facts.split("+") if k.strip())
        if scale.strip() not in BANK_SCALES or not keys:
            raise ConfigError(f"stage1.same_fact: {r!r} is not '<scale>=<fact>[+<fact>]' with a scale of "
                              f"{list(BANK_SCALES)}")
        out[scale.strip()] = keys
    return out


@dataclass
class _Bank:
    texts: list[str]
    absence: torch.Tensor  # (U,) bool
    owners: list[set[str]]  # slides whose report holds each unit


class BankBuilder:
    """Per-batch v2 targets (module docstring)."""

    def __init__(self, units: dict[str, dict[str, list[Unit]]], reports: dict[str, str],
                 facts: dict[str, dict[str, Any]] | None = None, same_fact: dict[str, tuple[str, ...]] | None = None,
                 scales: tuple[str, ...] = UNIT_SCALES) -> None:
        self.units, self.reports, self.facts = units, reports, facts or {}
        self.same_fact = same_fact or {}
        missing = [s for s in self.units if self.same_fact and s not in self.facts]
        if missing:
            raise ConfigError(f"stage1.same_fact needs data.facts for every train slide; missing {missing[:3]}")
        self.banks: dict[str, _Bank] = {}
        for scale in scales:
            texts: dict[str, tuple[bool, set[str]]] = {}
            for sid, by_scale in units.items():
                for u in by_scale.get(scale, []):
                    texts.setdefault(u.text, (u.absence, set()))[1].add(sid)
            order = sorted(texts)
            self.banks[scale] = _Bank(order, torch.tensor([texts[t][0] for t in order], dtype=torch.bool),
                                      [texts[t][1] for t in order])
        rep: dict[str, set[str]] = {}
        for sid, r in reports.items():
            rep.setdefault(r, set()).add(sid)
        order = sorted(rep)
        self.banks["report"] = _Bank(order, torch.zeros(len(order), dtype=torch.bool), [rep[t] for t in order])
        self.strings = sorted({t for b in self.banks.values() for t in b.texts})
        self.ids = {s: i for i, s in enumerate(self.strings)}
        self._allowed = {name: self._allowed_matrix(name) for name in self.banks}

    def _fact_key(self, scale: str, sid: str) -> tuple[Any, ...] | None:
        keys = self.same_fact.get(scale)
        if not keys:
            return None
        f = self.facts.get(sid, {})
        return tuple(str(f.get(k)) for k in keys)

    def _allowed_matrix(self, name: str) -> dict[str, torch.Tensor]:
        """slide id -> (U,) bool: candidates that may be negatives of that slide."""
        bank = self.banks[name]
        out = {}
        slides = self.reports.keys() if name == "report" else self.units.keys()
        for sid in slides:
            mine = self._fact_key(name, sid)
            ok = torch.ones(len(bank.texts), dtype=torch.bool)
            if mine is not None:
                for i, owners in enumerate(bank.owners):
                    if sid not in owners and any(self._fact_key(name, o) == mine for o in owners):
                        ok[i] = False
            out[sid] = ok
        return out

    def own(self, sid: str, name: str) -> list[str]:
        if name == "report":
            return [self.reports[sid]] if sid in self.reports else []
        return [u.text for u in self.units.get(sid, {}).get(name, [])]

    def sizes(self) -> dict[str, int]:
        return {k: len(v.texts) for k, v in self.banks.items()}

    def __call__(self, slide_ids: list[str], emb: torch.Tensor) -> AlignmentTargets:
        """``emb`` (len(strings), D): the current embedding of every string (row i = ``strings[i]``)."""
        out = AlignmentTargets()
        for name, bank in self.banks.items():
            if not bank.texts:
                continue
            ids = torch.tensor([self.ids[t] for t in bank.texts], device=emb.device)
            index = {t: i for i, t in enumerate(bank.texts)}
            pos = torch.zeros(len(slide_ids), len(bank.texts), dtype=torch.bool)
            for b, sid in enumerate(slide_ids):
                for t in self.own(sid, name):
                    pos[b, index[t]] = True
            allowed = torch.stack([self._allowed[name].get(sid, torch.ones(len(bank.texts), dtype=torch.bool))
                                   for sid in slide_ids])
            out.banks[name] = BankTargets(emb[ids], pos.to(emb.device), allowed.to(emb.device),
                                          bank.absence.to(emb.device), ids)
        return out

    def batch_strings(self, slide_ids: list[str]) -> list[int]:
        """Ids of the strings the batch's slides own (the rows a live text tower encodes with gradient)."""
        return sorted({self.ids[t] for sid in slide_ids for name in self.banks for t in self.own(sid, name)})


class LiveText:
    """Embeddings of ``strings``: a no-grad bank re-encoded every ``refresh_every`` calls, live rows on demand.

    Each refresh is saved as ``folder/text-bank-<call>.pt`` (the last two kept), so a resumed run (``start_call`` =
    the micro-batches done before its checkpoint) reuses the bank the uninterrupted run had: resumption stays exact.
    """

    def __init__(self, encoder: nn.Module, strings: list[str], refresh_every: int, folder: Path | None = None,
                 start_call: int = 0, batch_size: int = 128) -> None:
        self.encoder, self.strings, self.folder = encoder, strings, folder
        self.refresh_every, self.batch_size = max(1, refresh_every), batch_size
        self.calls = start_call
        self.bank: torch.Tensor | None = None
        if start_call and folder is not None:
            due = (start_call // self.refresh_every) * self.refresh_every
            p = folder / f"text-bank-{due:08d}.pt"
            if p.is_file():
                self.bank = torch.load(p, weights_only=True)

    def refresh(self) -> None:
        vecs = self.encoder.encode(self.strings, batch_size=self.batch_size)  # eval mode, no grad
        self.bank = nn.functional.normalize(torch.from_numpy(vecs), dim=-1)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.folder / f"text-bank-{self.calls:08d}.pt") as tmp:  # per-process temporary:
                torch.save(self.bank, tmp)  # every process of a multi-process run writes the same bank
            for old in sorted(self.folder.glob("text-bank-*.pt"))[:-2]:
                old.unlink(missing_ok=True)

    def __call__(self, live_ids: list[int], device: torch.device) -> torch.Tensor:
        if self.bank is None or self.calls % self.refresh_every == 0:
            self.refresh()
        self.calls += 1
        emb = self.bank.to(device).clone()
        if live_ids:
            live = nn.functional.normalize(self.encoder.encode_tensor([self.strings[i] for i in live_ids]), dim=-1)
            emb[torch.tensor(live_ids, device=device)] = live.to(emb.dtype)
        return emb
