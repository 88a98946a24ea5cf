"""The tasks that generate text (paper Tables 3-5): VQA, report generation and captioning, each scored beside the
SynthPath FACT accuracy of the same texts and the shuffled-visual baseline (:func:`task_generation`), and the pooled
closed-ended VQA of several held-out splits (:func:`heldout_closed_vqa`, the learning test and ``hwsi ablate``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from hwsi.data import QAItem
from hwsi.eval.eval_config import TASK_CATEGORIES, EvalConfig, TaskError
from hwsi.eval.eval_data import EvalData
from hwsi.eval.facts import FACT_NAMES, fact_accuracy
from hwsi.eval.metrics import generation_scores
from hwsi.eval.model_outputs import SlideInputCache, derangement, generate_answers
from hwsi.eval.results import TaskResult, markdown_table
from hwsi.eval.vqa import evaluate_items, vqa_accuracy


def items_of_task(items: Sequence[QAItem], task: str) -> list[QAItem]:
    """The items ``task`` scores: ``report`` / ``caption`` those of its categories (:data:`TASK_CATEGORIES`,
    compared case-insensitively), ``vqa`` every other item; in the given order."""
    if task in TASK_CATEGORIES:
        cats = TASK_CATEGORIES[task]
        return [it for it in items if it.category.lower() in cats]
    skip = {c for v in TASK_CATEGORIES.values() for c in v}
    return [it for it in items if it.category.lower() not in skip]


def _task_items(data: EvalData, task: str, limit: int) -> list[QAItem]:
    items = items_of_task(data.items, task)
    if limit <= 0 or limit >= len(items):
        return items
    # round-robin over slides (1st item of every slide, then 2nd, ...) so a limited run still spans slides
    rank: dict[str, int] = {}
    keyed = []
    for i, it in enumerate(items):
        r = rank.get(it.slide_id, 0)
        rank[it.slide_id] = r + 1
        keyed.append((r, i))
    return [items[i] for _, i in sorted(keyed)[:limit]]


def score_generation(task: str, preds: Sequence[str], items: Sequence[QAItem],
                     facts_of: Mapping[str, Mapping[str, Any] | None], cfg: EvalConfig) -> dict[str, Any]:
    """Scores of answers ``preds`` to ``items`` for ``task``: ``vqa`` by :func:`evaluate_items` (closed accuracy with
    its parse-failure rate, open text metrics), ``report``/``caption`` by :func:`generation_scores`; beside them the
    FACT accuracy of the items whose slide has facts in ``facts_of`` (slide id -> SynthPath facts or None). The
    per-sample fact rows are under ``"_fact_rows"`` (item index -> row), for the caller to pop."""
    preds = list(preds)
    if task == "vqa":
        out = evaluate_items(preds, items, generation_convention=cfg.convention, meteor=cfg.meteor)
    else:
        out = generation_scores(preds, [it.answer for it in items], convention=cfg.convention,  # type: ignore[arg-type]
                                tokenizer=cfg.coco_tokenizer, meteor=cfg.meteor)
    with_facts = [i for i, it in enumerate(items) if facts_of.get(it.slide_id)]
    if with_facts:
        fa = fact_accuracy([preds[i] for i in with_facts], [facts_of[items[i].slide_id] or {} for i in with_facts],
                           [items[i].answer for i in with_facts])
        out["facts"] = {k: v for k, v in fa.items() if k != "per_sample"}
        out["_fact_rows"] = dict(zip(with_facts, fa["per_sample"], strict=True))
    else:
        out["facts"] = {"convention": "not available: the data set has no ground-truth facts (not SynthPath)"}
    return out


def _generation_row(name: str, m: dict[str, Any], task: str, fact_names: list[str],
                    cider: bool = False) -> list[Any]:
    if task == "vqa":
        closed, open_ = m.get("closed", {}), m.get("open", {})
        row = [name, closed.get("accuracy"), closed.get("parse_failure_rate"), open_.get("token_f1"),
               open_.get("BLEU-1"), open_.get("BLEU-4"), open_.get("ROUGE-L"), open_.get("METEOR")]
    else:
        row = [name, m.get("BLEU-1"), m.get("BLEU-2"), m.get("BLEU-3"), m.get("BLEU-4"), m.get("ROUGE-L"),
               m.get("METEOR")]
    if cider:
        row.append((m.get("open", {}) if task == "vqa" else m).get("CIDEr"))
    f = m.get("facts", {})
    row += [f.get("mean_accuracy"), f.get("all_correct")] + [f.get("facts", {}).get(k, {}).get("accuracy")
                                                            for k in fact_names]
    return row


def generation_table(task: str, named: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """The Markdown table of a generation task: one row per ``(name, scores of score_generation)``; the fact columns
    are those the first row's scores hold."""
    first = named[0][1] if named else {}
    fact_names = [k for k in FACT_NAMES if k in first.get("facts", {}).get("facts", {})]
    if task == "vqa":
        head = ["", "closed acc", "parse fail", "open token F1", "BLEU-1", "BLEU-4", "ROUGE-L", "METEOR"]
    else:
        head = ["", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "METEOR"]
    # CIDEr (coco convention only) gets a column when the first row has it
    cider = "CIDEr" in (first.get("open", {}) if task == "vqa" else first)
    head += ["CIDEr"] * cider + ["fact acc (mean)", "all facts"] + [f"{k}" for k in fact_names]
    return markdown_table(head, [_generation_row(name, dict(m), task, fact_names, cider) for name, m in named])


def task_generation(task: str, model: Any, data: EvalData, cfg: EvalConfig) -> TaskResult:
    """``vqa``, ``report`` or ``caption`` with fact accuracy and the shuffled-visual baseline."""
    items = _task_items(data, task, cfg.limit)
    if not items:
        raise TaskError(f"no {task} records for split {data.split!r} matched to stores")
    slides = SlideInputCache(model, data, cfg)
    facts_of = {sid: info.facts for sid, info in data.slides.items()}
    n_tok = cfg.tokens_for(task)
    own = [it.slide_id for it in items]
    preds = generate_answers(model, slides, items, own, n_tok, cfg.answer_batch_size)
    model_m = score_generation(task, preds, items, facts_of, cfg)
    metrics: dict[str, Any] = {"task": task, "max_new_tokens": n_tok, "decoding": "greedy"}
    shuf_preds: list[str] | None = None
    perm: dict[str, str] = {}
    if cfg.shuffled_baseline:
        try:
            perm = derangement(own, cfg.shuffle_seed)
        except TaskError as exc:
            metrics["shuffled"] = {"skipped": str(exc)}
        else:
            shuf_preds = generate_answers(model, slides, items, [perm[s] for s in own], n_tok, cfg.answer_batch_size)
            metrics["shuffled"] = score_generation(task, shuf_preds, items, facts_of, cfg)
            # the convention names the public path (re-exported by hwsi.eval.tasks); recorded in the JSON as before
            metrics["shuffle"] = {"convention": "derangement of the evaluated slides' visual inputs "
                                  "(hwsi.eval.tasks.derangement): slide s answered with the visual tokens of pi(s) != s",
                                  "seed": cfg.shuffle_seed, "mapping": perm}
    fact_rows = model_m.pop("_fact_rows", {})
    shuf_fact_rows = metrics.get("shuffled", {}).pop("_fact_rows", {}) if shuf_preds is not None else {}
    metrics = {"convention": model_m.get("convention", cfg.convention), "model": model_m, **metrics}
    predictions = []
    for i, it in enumerate(items):
        row: dict[str, Any] = {"id": it.question_id, "slide_id": it.slide_id, "category": it.category,
                               "question": it.question, "reference": it.answer, "prediction": preds[i]}
        if i in fact_rows:
            row["facts"] = fact_rows[i]
        if shuf_preds is not None:
            row["shuffled_visual_from"] = perm[it.slide_id]
            row["shuffled_prediction"] = shuf_preds[i]
            if i in shuf_fact_rows:
                row["shuffled_facts"] = shuf_fact_rows[i]
        predictions.append(row)
    named = [("model", model_m)]
    if shuf_preds is not None:
        named.append(("shuffled visual tokens", metrics["shuffled"]))
    title = {"vqa": "VQA", "report": "Report generation", "caption": "Captioning"}[task]
    conv = model_m.get("convention", cfg.convention)
    fconv = model_m.get("facts", {}).get("convention", "")
    md = "\n\n".join([
        f"## {title} ({data.source}, split {data.split}, n={len(items)}, greedy, max_new_tokens={n_tok})",
        f"Conventions: text metrics {conv}" + (f" (tokenizer: {model_m['tokenizer']})" if "tokenizer" in model_m else "")
        + f". Facts: {fconv}. Shuffled: every slide answered with another slide's visual tokens (derangement, "
          f"seed {cfg.shuffle_seed}).",
        generation_table(task, named),
    ])
    return TaskResult(task, metrics, predictions, md)


def heldout_closed_vqa(model: Any, datas: Sequence[EvalData], cfg: EvalConfig | None = None,
                       max_new_tokens: int = 24, batch_size: int = 0) -> dict[str, Any]:
    """Closed-ended VQA over several held-out splits pooled (e.g. val + test), beside the shuffled baseline.

    Every closed item is answered greedily with its own slide's visual inputs and, for the baseline, with those of
    another slide (a :func:`derangement` of the pooled slides, seed ``cfg.shuffle_seed``). Chance is the mean of
    1/len(options). Used by the pipeline's learning test and by ``hwsi ablate``. ``batch_size``: questions per
    generation batch (0: ``cfg.answer_batch_size``; the answers do not depend on it).
    """
    cfg = cfg or EvalConfig()
    if not datas:
        raise TaskError("heldout_closed_vqa needs at least one data split")
    merged = copy.copy(datas[0])
    merged.slides = {k: v for d in datas for k, v in d.slides.items()}
    closed = [it for d in datas for it in d.items if it.options]
    if not closed:
        raise TaskError("no closed-ended items in the held-out splits")
    perm = derangement(sorted({it.slide_id for it in closed}), cfg.shuffle_seed)
    slides = SlideInputCache(model, merged, cfg)
    res: dict[str, Any] = {"n_slides": len(perm), "convention": "closed-choice accuracy (hwsi.eval.vqa.parse_choice);"
                           " shuffled: derangement of the pooled held-out slides; chance: mean 1/len(options)",
                           "chance": sum(1 / len(it.options) for it in closed) / len(closed)}
    for name, vis in (("closed_acc", [it.slide_id for it in closed]),
                      ("shuffled_acc", [perm[it.slide_id] for it in closed])):
        acc = vqa_accuracy(generate_answers(model, slides, closed, vis, max_new_tokens,
                                            batch_size or cfg.answer_batch_size), closed)
        res[name], res["n_closed"] = acc["accuracy"], acc["n"]
        res[name + "_by_category"] = {k: round(v["accuracy"], 3) for k, v in acc["by_category"].items()}
        res[name.replace("_acc", "_correct")] = acc["correct"]
    return res
