"""``hwsi score``: another tool's answers to a benchmark, scored the way ``hwsi eval`` scores hwsi's own.

The answers (:mod:`hwsi.eval.peer_predictions`) are joined to the benchmark's questions (:func:`load_benchmark`:
WSI-Bench test jsonl, SlideBench-VQA json/csv, WSI-VQA, a SynthPath cohort folder -- parsed by :mod:`hwsi.data`) by
question id, or, for a record whose id the benchmark does not carry, by its slide and question text
(:func:`join_answers`). Each of the generation tasks then gets the tables of ``hwsi eval`` from the same functions
(:func:`hwsi.eval.generation_tasks.score_generation`): closed accuracy with its parse-failure rate, open text metrics
in the chosen convention, SynthPath fact accuracy where the benchmark has facts. What could not be joined is counted,
never fatal: questions without an answer (``missing``: left out, or scored as wrong with ``missing="wrong"``),
answers to questions the benchmark does not have (``unknown``), ids answered twice (``duplicates``; the first
answer is kept), empty answers (scored as given: wrong / zero), records with neither id nor slide+question.
Conventions and what is not computed: docs/scoring-peers.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hwsi import textio
from hwsi.data import QAItem, load_records
from hwsi.errors import HwsiError
from hwsi.eval.eval_config import EvalConfig, ScoreConfig
from hwsi.eval.generation_tasks import generation_table, items_of_task, score_generation
from hwsi.eval.peer_predictions import PeerAnswer, PeerPredictions
from hwsi.eval.results import TaskResult, markdown_table, write_summary, write_task
from hwsi.eval.vqa import normalize_answer

SCORED_TASKS: tuple[str, ...] = ("vqa", "report", "caption")
_TITLES = {"vqa": "VQA", "report": "Report generation", "caption": "Captioning"}
NOT_COMPUTED = ("WSI-Precision and WSI-Relevance (WSI-LLaVA's WSI-Metric: claims extracted and judged by an OpenAI "
                "model) need an LLM judge and are not computed")


class ScoreError(HwsiError):
    """The benchmark or the answers cannot be scored together (the message names the file and why)."""


@dataclass
class Benchmark:
    """The questions of a benchmark file and, for SynthPath, each slide's ground-truth facts."""

    path: Path
    source: str
    items: list[QAItem]
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_benchmark(data: str | Path, split: str = "test") -> Benchmark:
    """The QA items of a record file (any format :func:`hwsi.data.load_records` reads) or of a SynthPath cohort
    folder's ``text/<split>.jsonl`` with the facts of its ``cohort.json``."""
    data = Path(data)
    facts: dict[str, dict[str, Any]] = {}
    if data.is_dir() and (data / "cohort.json").is_file():
        cohort = textio.read_json(data / "cohort.json")
        slides = cohort.get("slides") if isinstance(cohort, dict) else None
        if not isinstance(slides, list):
            raise ScoreError(f"{data / 'cohort.json'}: no 'slides' list (not a SynthPath cohort)")
        facts = {str(s["slide_id"]): dict(s["facts"]) for s in slides
                 if isinstance(s, dict) and "slide_id" in s and isinstance(s.get("facts"), dict)}
        rec_path = data / "text" / f"{split}.jsonl"
        if not rec_path.is_file():
            raise ScoreError(f"{data}: no records of split {split!r} ({rec_path} not found)")
        records, source = load_records(rec_path, "wsi-bench-test"), f"synthpath {split}"
    elif data.is_dir():
        raise ScoreError(f"{data}: a folder without cohort.json; give a benchmark record file or a SynthPath cohort")
    else:
        records, source = load_records(data), data.name
    items = [r for r in records if isinstance(r, QAItem)]
    if not items:
        raise ScoreError(f"{data}: holds no questions with reference answers (a conversation file is not a benchmark)")
    return Benchmark(data, source, items, facts)


@dataclass
class Join:
    """How the answers met the questions: ``answer_of`` question id -> answer, and everything that did not fit."""

    answer_of: dict[str, str]
    by_content: int = 0
    unknown: list[str] = field(default_factory=list)  # ids (or record places) matching no question
    duplicates: list[str] = field(default_factory=list)  # question ids answered more than once (first kept)
    conflicting: list[str] = field(default_factory=list)  # of those, the ids whose answers differ
    without_id: list[str] = field(default_factory=list)  # record places with neither id nor slide+question

    def summary(self, items: list[QAItem], n_answers: int) -> dict[str, Any]:
        missing = [it.question_id for it in items if it.question_id not in self.answer_of]
        empty = [q for q, a in self.answer_of.items() if not a]
        return {
            "n_questions": len(items), "n_answers": n_answers, "matched": len(self.answer_of),
            "matched_by_content": self.by_content, "missing": len(missing), "unknown": len(self.unknown),
            "duplicates": len(self.duplicates), "conflicting_duplicates": len(self.conflicting),
            "empty_answers": len(empty), "without_id": len(self.without_id),
            "coverage": len(self.answer_of) / len(items) if items else float("nan"),
            "examples": {"missing": missing[:20], "unknown": self.unknown[:20], "duplicates": self.duplicates[:20],
                         "empty_answers": empty[:20], "without_id": self.without_id[:20]},
        }


def _content_key(slide_id: str, question: str) -> tuple[str, str]:
    return slide_id, normalize_answer(question)


def join_answers(items: list[QAItem], answers: list[PeerAnswer]) -> Join:
    """Join answers to questions: by question id, else by (slide id, normalised question) where that names exactly
    one question (SlideChat's csv carries the SlideBench csv ``ID``, which the reformatted json lacks)."""
    ids = {it.question_id for it in items}
    by_content: dict[tuple[str, str], list[str]] = {}
    for it in items:
        stem = it.metadata.get("question_stem", it.question)
        keys = {_content_key(it.slide_id, it.question), _content_key(it.slide_id, stem)}
        for key in keys:
            by_content.setdefault(key, []).append(it.question_id)
    join = Join({})
    for a in answers:
        qid = a.question_id if a.question_id in ids else None
        via_content = False
        if qid is None and a.content is not None:
            hits = by_content.get(_content_key(*a.content), [])
            if len(hits) == 1:
                qid, via_content = hits[0], True
        if qid is None:
            if a.question_id is None and a.content is None:
                join.without_id.append(a.where)
            else:
                join.unknown.append(a.question_id if a.question_id is not None else a.where)
            continue
        if qid in join.answer_of:
            join.duplicates.append(qid)
            if join.answer_of[qid] != a.answer:
                join.conflicting.append(qid)
            continue
        join.answer_of[qid] = a.answer
        join.by_content += int(via_content)
    return join


def _join_markdown(preds: PeerPredictions, bench: Benchmark, js: dict[str, Any], cfg: ScoreConfig) -> str:
    ex = js["examples"]
    rows = [
        ["questions in the benchmark", js["n_questions"], ""],
        ["answer records in the file", js["n_answers"], ""],
        ["matched", js["matched"], f"{js['matched_by_content']} by slide + question text" if js["matched_by_content"]
         else "by question id"],
        ["missing (no answer)", js["missing"], ("left out of the scores" if cfg.missing == "skip" else
                                                "scored as empty answers (wrong)") + _eg(ex["missing"])],
        ["unknown (not in the benchmark)", js["unknown"], _eg(ex["unknown"])],
        ["duplicate ids (first answer kept)", js["duplicates"],
         f"{js['conflicting_duplicates']} with different answers" + _eg(ex["duplicates"])],
        ["empty answers (scored as wrong / zero)", js["empty_answers"], _eg(ex["empty_answers"])],
        ["records without id or slide+question", js["without_id"], _eg(ex["without_id"])],
    ]
    return "\n\n".join([
        f"## Answers: {preds.path.name} (read as {preds.fmt}: id {preds.id_key!r}, answer {preds.answer_key!r}) "
        f"on {bench.source}",
        f"Coverage {js['coverage']:.3f} of the benchmark's questions.",
        markdown_table(["", "n", "note"], rows),
    ])


def _eg(ids: list[str]) -> str:
    return "" if not ids else " (e.g. " + ", ".join(ids[:3]) + ")"


def _chance(items: list[QAItem]) -> float:
    closed = [it for it in items if it.options]
    return sum(1 / len(it.options or [1]) for it in closed) / len(closed) if closed else float("nan")


def score_task(task: str, preds: PeerPredictions, bench: Benchmark, join: Join, cfg: ScoreConfig) -> TaskResult | None:
    """The result of one task (``vqa``, ``report``, ``caption``), or None when the benchmark has no such items."""
    items = items_of_task(bench.items, task)
    if not items:
        return None
    answered = [it for it in items if it.question_id in join.answer_of]
    scored = items if cfg.missing == "wrong" else answered
    conf = {**asdict(cfg), "predictions": str(preds.path), "format": preds.fmt, "benchmark": str(bench.path)}
    title = f"## {_TITLES[task]} ({preds.path.name} on {bench.source}, n={len(scored)} of {len(items)})"
    coverage = {"n_items": len(items), "answered": len(answered), "missing": len(items) - len(answered),
                "missing_policy": cfg.missing}
    if not scored:
        why = f"no answers for the {len(items)} {task} items"
        return TaskResult(task, {}, [], f"{title}\n\nSkipped: {why}", skipped=why, config=conf, data=coverage)
    texts = [join.answer_of.get(it.question_id, "") for it in scored]
    ecfg = EvalConfig(convention=cfg.convention, coco_tokenizer=cfg.coco_tokenizer, meteor=cfg.meteor)
    m = score_generation(task, texts, scored, bench.facts, ecfg)
    fact_rows = m.pop("_fact_rows", {})
    if "closed" in m:
        m["closed"]["chance"] = _chance(scored)
    predictions = []
    for i, it in enumerate(scored):
        row: dict[str, Any] = {"id": it.question_id, "slide_id": it.slide_id, "category": it.category,
                               "question": it.question, "reference": it.answer, "prediction": texts[i],
                               "answered": it.question_id in join.answer_of}
        if i in fact_rows:
            row["facts"] = fact_rows[i]
        predictions.append(row)
    conv = m.get("convention", cfg.convention)
    notes = [f"Conventions: text metrics {conv}" + (f" (tokenizer: {m['tokenizer']})" if "tokenizer" in m else "")
             + f". Facts: {m.get('facts', {}).get('convention', '')}."]
    if "closed" in m:
        c = m["closed"]
        notes.append(f"Closed: {c['n']} scored ({c['no_gold']} without a resolvable reference left out), "
                     f"{c['parse_failures']} answers matched no option; chance (mean 1/#options) {c['chance']:.3f}.")
    notes.append(f"Answered {len(answered)} of {len(items)} {task} questions; "
                 + ("the others are left out." if cfg.missing == "skip" else "the others are scored as empty answers."))
    if task != "vqa" or "open" in m:
        notes.append(f"Not computed: {NOT_COMPUTED}.")
    md = "\n\n".join([title, " ".join(notes), generation_table(task, [(preds.path.name, m)])])
    metrics = {"convention": conv, "model": m, "task": task, "coverage": coverage}
    return TaskResult(task, metrics, predictions, md, config=conf, data=coverage)


def score_predictions(preds: PeerPredictions, bench: Benchmark, cfg: ScoreConfig | None = None) -> list[TaskResult]:
    """The answers' join report (task ``answers``) and one result per task the benchmark has.

    Raises :class:`ScoreError` when no answer matches any question (the wrong benchmark, or the wrong id column)."""
    cfg = cfg or ScoreConfig()
    join = join_answers(bench.items, preds.answers)
    if not join.answer_of:
        eg = next((a.question_id for a in preds.answers if a.question_id is not None), None)
        raise ScoreError(f"{preds.path}: none of its {len(preds.answers)} answers matches a question of {bench.path} "
                         f"by id (e.g. {eg!r} vs {bench.items[0].question_id!r}) or by slide + question; "
                         "is --data the benchmark these answers are for?")
    js = join.summary(bench.items, len(preds.answers))
    conf = {**asdict(cfg), "predictions": str(preds.path), "format": preds.fmt, "benchmark": str(bench.path)}
    head = TaskResult("answers", {"convention": "join by question id, else slide + normalised question",
                                  **js, "unknown_ids": join.unknown, "duplicate_ids": join.duplicates},
                      [], _join_markdown(preds, bench, js, cfg), config=conf, data=js)
    results = [head]
    for task in SCORED_TASKS:
        r = score_task(task, preds, bench, join, cfg)
        if r is not None:
            results.append(r)
    return results


def write_scores(results: list[TaskResult], out: str | Path, title: str) -> Path:
    """``<out>/<task>.json`` + ``<task>.md`` per result and ``summary.md`` (all atomic); returns summary.md's path."""
    for r in results:
        write_task(r, out, figures=False)
    return write_summary(results, out, title)


__all__ = [
    "Benchmark",
    "Join",
    "NOT_COMPUTED",
    "SCORED_TASKS",
    "ScoreConfig",
    "ScoreError",
    "join_answers",
    "load_benchmark",
    "score_predictions",
    "score_task",
    "write_scores",
]
