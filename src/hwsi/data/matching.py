"""Match records to the available per-slide stores, at the finest level that exists:

1. ``exact``: the record's slide id equals a store id;
2. ``slide``: TCGA slide barcode (``TCGA-TSS-PPPP-SSV-PPR-DXn``, the part before the ``.<uuid>``) equal;
3. ``patient``: the record names only a TCGA patient (``TCGA-TSS-PPPP``, as WSI-VQA does) and a store of that
   patient exists. Several candidate stores -> the lexicographically first one is used and the record is listed
   under ``ambiguous`` in the report (``on_multiple="skip"`` leaves such records unmatched instead).

Records without any store are reported, never raised on.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from hwsi.data.records import Record, tcga_barcode

@dataclass
class MatchReport:
    """What :func:`match_records_to_stores` did with each record."""

    n_records: int
    n_matched: int
    levels: dict[str, int]
    unmatched: list[tuple[str, str]]
    ambiguous: dict[str, list[str]]

    @property
    def n_unmatched(self) -> int:
        return len(self.unmatched)

    @property
    def missing_slide_ids(self) -> list[str]:
        """Distinct record slide ids without a store, sorted."""
        return sorted({sid for _, sid in self.unmatched})

    def summary(self) -> str:
        """One line for logs."""
        lv = ", ".join(f"{k} {v}" for k, v in sorted(self.levels.items()))
        return (
            f"{self.n_matched}/{self.n_records} records matched to stores ({lv or 'none'}); "
            f"{self.n_unmatched} unmatched on {len(self.missing_slide_ids)} slide ids; "
            f"{len(self.ambiguous)} ids with several candidate stores"
        )


def _store_index(available: Iterable[str]) -> tuple[set[str], dict[str, list[str]], dict[str, list[str]]]:
    exact: set[str] = set()
    by_slide: dict[str, list[str]] = {}
    by_patient: dict[str, list[str]] = {}
    for sid in available:
        exact.add(sid)
        bc = tcga_barcode(sid)
        if bc:
            by_patient.setdefault(bc[0], []).append(sid)
            if bc[1] != bc[0]:
                by_slide.setdefault(bc[1], []).append(sid)
    for d in (by_slide, by_patient):
        for k in d:
            d[k].sort()
    return exact, by_slide, by_patient


def match_records_to_stores(
    records: Sequence[Record],
    available_slide_ids: Iterable[str],
    on_multiple: Literal["first", "skip"] = "first",
) -> tuple[list[Record], MatchReport]:
    """Keep the records whose slide has a store; the returned copies carry the store's slide id.

    Matching order: exact id, then TCGA slide barcode, then TCGA patient (see the module docstring). The record's
    own id is kept in ``metadata["record_slide_id"]`` when it differs. Unmatched records are listed in the report
    as ``(record_id, slide_id)``.
    """
    exact, by_slide, by_patient = _store_index(available_slide_ids)
    matched: list[Record] = []
    levels: Counter[str] = Counter()
    unmatched: list[tuple[str, str]] = []
    ambiguous: dict[str, list[str]] = {}
    for rec in records:
        sid = rec.slide_id
        target: str | None = None
        level = ""
        if sid in exact:
            target, level = sid, "exact"
        else:
            bc = tcga_barcode(sid)
            cands: list[str] = []
            if bc and bc[1] != bc[0]:
                cands, level = by_slide.get(bc[1], []), "slide"
            elif bc:
                cands, level = by_patient.get(bc[0], []), "patient"
            if len(cands) > 1:
                ambiguous[sid] = list(cands)
                if on_multiple == "first":
                    target = cands[0]
            elif cands:
                target = cands[0]
        if target is None:
            unmatched.append((rec.record_id, sid))
            continue
        levels[level] += 1
        if target != sid:
            meta = dict(rec.metadata)
            meta["record_slide_id"] = sid
            rec = dataclasses.replace(rec, slide_id=target, metadata=meta)
        matched.append(rec)
    report = MatchReport(
        n_records=len(records), n_matched=len(matched), levels=dict(levels), unmatched=unmatched, ambiguous=ambiguous
    )
    return matched, report
