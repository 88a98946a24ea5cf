"""The tasks that read slide embeddings (paper Tables 1, 2, 6): zero-shot classification, linear probe, slide
retrieval and cross-modal (report <-> slide) retrieval; each returns a :class:`~hwsi.eval.results.TaskResult`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hwsi.eval.classification import classification_scores, linear_probe, load_prompt_sets, zero_shot_scores
from hwsi.eval.eval_config import SYNTHPATH_PROMPTS, EvalConfig, TaskError, TextEncoderLike
from hwsi.eval.eval_data import EvalData
from hwsi.eval.model_outputs import SlideInputCache, get_text_encoder, resolve_embedding, slide_embeddings
from hwsi.eval.results import TaskResult, markdown_table
from hwsi.eval.retrieval import cross_modal_recall, slide_retrieval


def _limit(seq: list[Any], n: int) -> list[Any]:
    return seq[:n] if n > 0 else seq


def _labelled(data: EvalData, split: str) -> list[str]:
    return [s for s in data.split_ids(split) if data.slides[s].label is not None]


def _metrics_table(rows: list[tuple[str, Any]]) -> str:
    return markdown_table(["metric", "value"], rows)


def _cm_table(cm: list[list[int]], labels: list[str]) -> str:
    return markdown_table(["true \\ pred", *labels], [[lab, *row] for lab, row in zip(labels, cm, strict=True)])


# -------------------------------------------------------------------------------------------------- tasks
def task_zero_shot(model: Any, data: EvalData, cfg: EvalConfig, text_encoder: TextEncoderLike | None) -> TaskResult:
    resolve_embedding(model, EvalConfig(embedding="z_wsi"))  # raises without the slide alignment head
    prompt_file = Path(cfg.prompt_file) if cfg.prompt_file else SYNTHPATH_PROMPTS
    sets = load_prompt_sets(prompt_file)
    if not 0 <= cfg.prompt_set < len(sets):
        raise TaskError(f"{prompt_file}: prompt set {cfg.prompt_set} requested, the file holds {len(sets)}")
    ps = sets[cfg.prompt_set]
    ids = _limit(_labelled(data, data.split), cfg.limit)
    if not ids:
        raise TaskError(f"no labelled slides in split {data.split!r}")
    unknown = sorted({data.slides[s].label for s in ids} - set(ps.classnames))  # type: ignore[arg-type]
    if unknown:
        raise TaskError(f"{ps.source}: labels {unknown} have no class in the prompt file (classes {list(ps.classnames)})")
    enc = text_encoder or get_text_encoder(cfg.text_encoder)
    prompts = ps.prompts()
    class_emb = {c: np.asarray(enc.encode(p), np.float64) for c, p in prompts.items()}
    slides = SlideInputCache(model, data, cfg)
    z = slide_embeddings(model, slides, ids, "z_wsi", cfg.batch_size)
    classes, sims = zero_shot_scores(z, class_emb)
    pred = [classes[i] for i in sims.argmax(axis=1)]
    y = [data.slides[s].label for s in ids]
    sc = classification_scores(y, pred, labels=classes)
    metrics = {"convention": "zero-shot: CONCH/MI-Zero prompt ensembling (templates x class names, mean of unit "
               "text embeddings), cosine vs z_WSI; " + sc["convention"],
               "prompt_source": ps.source, "n_prompts": {c: len(p) for c, p in prompts.items()},
               "text_encoder": getattr(enc, "name", "") or cfg.text_encoder,
               **{k: v for k, v in sc.items() if k != "convention"}}
    preds = [{"slide_id": s, "label": t, "prediction": p, "similarities": dict(zip(classes, map(float, row)))}
             for s, t, p, row in zip(ids, y, pred, sims, strict=True)]
    md = "\n\n".join([
        f"## Zero-shot classification ({data.source}, split {data.split}, n={len(ids)})",
        f"Convention: {metrics['convention']}. Prompts: {ps.source}.",
        _metrics_table([("balanced accuracy", sc["balanced_accuracy"]), ("weighted F1", sc["weighted_f1"]),
                        ("accuracy", sc["accuracy"])]),
        "Confusion matrix (rows true, columns predicted):",
        _cm_table(sc["confusion_matrix"], classes),
    ])
    return TaskResult("zero_shot", metrics, preds, md)


def task_linear_probe(model: Any, data: EvalData, cfg: EvalConfig, text_encoder: TextEncoderLike | None) -> TaskResult:
    kind = resolve_embedding(model, cfg)
    tr, va = _labelled(data, "train"), _labelled(data, "val")
    te = _limit(_labelled(data, data.split), cfg.limit)
    if not (tr and va and te):
        raise TaskError(f"linear probe needs labelled train, val and {data.split} slides "
                        f"(have {len(tr)}, {len(va)}, {len(te)})")
    slides = SlideInputCache(model, data, cfg)
    X = {k: slide_embeddings(model, slides, ids, kind, cfg.batch_size) for k, ids in (("tr", tr), ("va", va), ("te", te))}
    lab = lambda ids: [data.slides[s].label for s in ids]  # noqa: E731
    res = linear_probe(X["tr"], lab(tr), X["va"], lab(va), X["te"], lab(te), Cs=cfg.probe_Cs)
    sc = res.test
    metrics = {"convention": f"{res.convention}; embedding {kind}; {sc['convention']}", "embedding": kind,
               "best_C": res.best_C, "val_balanced_accuracy": res.val_balanced_accuracy,
               "n_train": len(tr), "n_val": len(va), **{k: v for k, v in sc.items() if k != "convention"}}
    preds = [{"slide_id": s, "label": t, "prediction": str(p)} for s, t, p in zip(te, lab(te), res.test_pred, strict=True)]
    md = "\n\n".join([
        f"## Linear probe ({data.source}, train {len(tr)} / val {len(va)} / {data.split} {len(te)} slides)",
        f"Convention: {metrics['convention']}.",
        _metrics_table([("balanced accuracy", sc["balanced_accuracy"]), ("weighted F1", sc["weighted_f1"]),
                        ("accuracy", sc["accuracy"]), ("C (chosen on val)", res.best_C)]),
        "Confusion matrix (rows true, columns predicted):",
        _cm_table(sc["confusion_matrix"], [str(x) for x in sc["labels"]]),
    ])
    return TaskResult("linear_probe", metrics, preds, md)


def task_slide_retrieval(model: Any, data: EvalData, cfg: EvalConfig,
                         text_encoder: TextEncoderLike | None) -> TaskResult:
    kind = resolve_embedding(model, cfg)
    ids = _limit(_labelled(data, data.split), cfg.limit)
    if len(ids) < 2:
        raise TaskError(f"slide retrieval needs >= 2 labelled slides in split {data.split!r}, have {len(ids)}")
    emb = slide_embeddings(model, SlideInputCache(model, data, cfg), ids, kind, cfg.batch_size)
    labels = [data.slides[s].label for s in ids]
    ks = tuple(k for k in cfg.retrieval_ks if k < len(ids)) or (1,)
    res = slide_retrieval(emb, labels, ks=ks)
    res["convention"] = f"{res['convention']}; embedding {kind}"
    sim = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = sim @ sim.T
    np.fill_diagonal(sim, -np.inf)
    preds = [{"slide_id": s, "label": lab, "nearest": ids[int(np.argmax(sim[i]))]}
             for i, (s, lab) in enumerate(zip(ids, labels, strict=True))]
    keys = [k for k in res if k.startswith(("Acc@", "MV@"))]
    md = "\n\n".join([f"## Slide retrieval ({data.source}, split {data.split}, n={len(ids)})",
                      f"Convention: {res['convention']}.", _metrics_table([(k, res[k]) for k in keys])])
    return TaskResult("slide_retrieval", {"embedding": kind, **res}, preds, md)


def task_cross_modal(model: Any, data: EvalData, cfg: EvalConfig, text_encoder: TextEncoderLike | None) -> TaskResult:
    resolve_embedding(model, EvalConfig(embedding="z_wsi"))
    ids = _limit([s for s in data.split_ids(data.split) if s in data.reports], cfg.limit)
    if len(ids) < 2:
        raise TaskError(f"cross-modal retrieval needs >= 2 {data.split} slides with a reference report, have {len(ids)}")
    enc = text_encoder or get_text_encoder(cfg.text_encoder)
    t = np.asarray(enc.encode([data.reports[s] for s in ids]), np.float64)
    z = slide_embeddings(model, SlideInputCache(model, data, cfg), ids, "z_wsi", cfg.batch_size)
    if t.shape[1] != z.shape[1]:
        raise TaskError(f"text encoder {cfg.text_encoder!r} gives {t.shape[1]}-d embeddings, z_WSI is {z.shape[1]}-d")
    ks = tuple(k for k in cfg.recall_ks if k <= len(ids)) or (1,)
    res = cross_modal_recall(z, t, ks=ks)
    res["convention"] = f"{res['convention']}; z_WSI vs {cfg.text_encoder} embedding of the reference report"
    preds = [{"slide_id": s} for s in ids]
    md = "\n\n".join([
        f"## Cross-modal retrieval, report <-> slide ({data.source}, split {data.split}, n={len(ids)})",
        f"Convention: {res['convention']}.",
        markdown_table(["direction", *res["image_to_text"]],
                       [["slide -> report", *res["image_to_text"].values()],
                        ["report -> slide", *res["text_to_image"].values()],
                        ["mean", *res["mean"].values()]]),
    ])
    return TaskResult("cross_modal_retrieval", res, preds, md)
