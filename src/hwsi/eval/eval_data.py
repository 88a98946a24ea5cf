"""What an evaluation reads: the slides with a store (split, class label, SynthPath facts) and the split's text
records matched to them by slide id (:func:`load_eval_data`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwsi import textio
from hwsi.data import QAItem, load_records, load_records_report, match_records_to_stores
from hwsi.eval.eval_config import TaskError


@dataclass
class SlideInfo:
    """A slide with a store: its split, class label and (SynthPath) ground-truth facts."""

    slide_id: str
    store: Path
    split: str = "test"
    label: str | None = None
    facts: dict[str, Any] | None = None


@dataclass
class EvalData:
    """Slides with stores, the split's text records matched to them, and what could not be matched."""

    source: str
    split: str
    slides: dict[str, SlideInfo]
    items: list[QAItem]
    reports: dict[str, str] = field(default_factory=dict)  # slide -> reference report (cross-modal retrieval)
    unmatched: list[tuple[str, str]] = field(default_factory=list)  # (record id, slide id) without a store
    missing_stores: list[str] = field(default_factory=list)  # slides of the data set without a store
    match_summary: str = ""
    skipped_records: list[str] = field(default_factory=list)  # bad records left out (skip_bad_records), where
    records_summary: str = ""

    def split_ids(self, split: str) -> list[str]:
        """Slide ids of ``split`` (sorted)."""
        return sorted(s for s, info in self.slides.items() if info.split == split)

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "split": self.split,
            "n_slides": len(self.slides),
            "n_items": len(self.items),
            "n_unmatched_records": len(self.unmatched),
            "unmatched_slide_ids": sorted({s for _, s in self.unmatched}),
            "missing_stores": self.missing_stores,
            "match": self.match_summary,
            "n_skipped_records": len(self.skipped_records),
            "skipped_records": self.skipped_records,
        }


def store_index(job: str | Path) -> dict[str, Path]:
    """``slide_id -> store`` of a job folder (``JOB/stores/*.h5``, or a folder of ``*.h5`` itself)."""
    job = Path(job)
    folder = job / "stores" if (job / "stores").is_dir() else job
    if not folder.is_dir():
        raise TaskError(f"{job}: no job folder (expected JOB/stores/<slide_id>.h5)")
    return {p.name[: -len(".h5")]: p for p in sorted(folder.glob("*.h5")) if not p.name.endswith(".truth.h5")}


def _read_labels_csv(path: Path) -> dict[str, tuple[str, str]]:
    header, rows = textio.read_csv(path)
    if "slide_id" not in header or "label" not in header:
        raise TaskError(f"{path}: needs columns slide_id, label[, split]; found {header}")
    return {row["slide_id"]: (row["label"], row.get("split") or "test") for _, row in rows}


def load_eval_data(
    data: str | Path,
    job: str | Path | None = None,
    split: str = "test",
    label_key: str = "diagnosis",
    labels_csv: str | Path | None = None,
    skip_bad_records: bool = False,
) -> EvalData:
    """Evaluation data mapped to the job's stores by slide id.

    ``data`` is a SynthPath cohort folder (``cohort.json``; records ``text/<split>.jsonl``, reports
    ``text/reports.json``, labels and facts from cohort.json; ``job`` defaults to ``DATA/job``) or a record file of
    any format :func:`hwsi.data.load_records` reads (labels for the embedding tasks then come from
    ``labels_csv``: columns ``slide_id, label[, split]``). Records whose slide has no store are listed in
    ``unmatched``; cohort slides without a store in ``missing_stores``. ``skip_bad_records`` leaves malformed
    records of a record file out (listed in ``skipped_records``) instead of failing.
    """
    loaded = None
    data = Path(data)
    if data.is_dir() and (data / "cohort.json").is_file():
        job = Path(job) if job is not None else data / "job"
        stores = store_index(job)
        cohort = textio.read_json(data / "cohort.json")
        slides: dict[str, SlideInfo] = {}
        missing = []
        for s in cohort["slides"]:
            sid = s["slide_id"]
            if sid not in stores:
                missing.append(sid)
                continue
            facts = dict(s.get("facts") or {})
            label = s.get("label") if label_key == "label" else facts.get(label_key, s.get("classes", {}).get(label_key))
            slides[sid] = SlideInfo(sid, stores[sid], s.get("split", "train"), None if label is None else str(label),
                                    facts or None)
        rec_path = data / "text" / f"{split}.jsonl"
        records = load_records(rec_path, "wsi-bench-test") if rec_path.is_file() else []
        reports_path = data / "text" / "reports.json"
        reports = textio.read_json(reports_path) if reports_path.is_file() else {}
        source = "synthpath"
    elif data.is_file():
        if job is None:
            raise TaskError(f"{data}: a record file needs --job (the folder of the slides' stores)")
        stores = store_index(job)
        loaded = load_records_report(data, skip_bad=skip_bad_records)
        records = loaded.records
        labels = _read_labels_csv(Path(labels_csv)) if labels_csv else {}
        slides = {sid: SlideInfo(sid, p, labels.get(sid, (None, split))[1], labels.get(sid, (None, ""))[0])
                  for sid, p in stores.items()}
        reports = {}
        missing = sorted(s for s in labels if s not in stores)
        source = data.name
    else:
        raise TaskError(f"{data}: neither a SynthPath cohort folder (cohort.json) nor a record file")
    qa = [r for r in records if isinstance(r, QAItem)]
    matched, report = match_records_to_stores(qa, list(slides))
    items = [r for r in matched if isinstance(r, QAItem)]
    for it in items:
        if it.category.lower() == "report" and it.slide_id not in reports:
            reports[it.slide_id] = it.answer
    return EvalData(source, split, slides, items, reports, list(report.unmatched), missing, report.summary(),
                    loaded.skipped_where if loaded else [], loaded.summary() if loaded else "")
