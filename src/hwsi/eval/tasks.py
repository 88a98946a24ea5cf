"""Benchmark tasks of the paper's Tables 1-6 run on a trained MLLM-HWSI over a job's feature stores.

API::

    data = load_eval_data(DATA, job=JOB)              # SynthPath cohort folder, or a real-format record file
    res = run_task("report", model, data, EvalConfig(convention="wsi-bench"))
    res.metrics, res.predictions, res.markdown        # TaskResult
    results = run_all(model, data, cfg, out="eval_out")   # every task; JSON + Markdown per task + summary.md

Tasks (:data:`TASKS`) and what they use:

=========================  =================================================================================
``zero_shot``              z_WSI (stage-1 slide alignment head, unit vector in the text space) vs class
                           embeddings from a prompt file (templates x class names through the text encoder,
                           CONCH/MI-Zero convention, :mod:`hwsi.eval.classification`); default prompts for
                           SynthPath: ``hwsi/eval/prompts/synthpath.json``. Balanced accuracy, weighted F1,
                           confusion matrix (PNG written beside the JSON).
``linear_probe``           logistic regression on slide embeddings, C chosen on the validation split.
``slide_retrieval``        slide->slide Acc@K and MV@top1% on the test split's slide embeddings.
``cross_modal_retrieval``  z_WSI vs text-encoder embeddings of the reference reports, Recall@1/3/5/10 both ways.
``vqa``                    greedy answers; closed items: accuracy + parse-failure rate; open: text metrics.
``report``, ``caption``    greedy generation; BLEU-1..4, ROUGE-L, METEOR in the chosen convention.
=========================  =================================================================================

Generation tasks print every score beside (a) the SynthPath FACT accuracy of the same texts
(:mod:`hwsi.eval.facts`) and (b) the same model's scores with the visual inputs SHUFFLED across slides: slide s is
answered with the visual tokens of slide ``pi(s)``, ``pi`` a deterministic derangement (:func:`derangement`), so no
slide keeps its own. A model whose scores do not drop under shuffling is not reading the slide.

Slide embeddings (``EvalConfig.embedding``): ``z_wsi`` (alignment head output, needs the stage-1 heads) or
``slide_token`` (f_WSI of the slide ViT); ``auto`` = z_wsi when the model has heads. Decoding is greedy; runs are
deterministic (no sampling, fixed derangement seed, fixed sample order).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from hwsi import textio
from hwsi.errors import HwsiError
from hwsi.data import QAItem, load_records, match_records_to_stores, strip_image_token

TASKS: tuple[str, ...] = (
    "zero_shot",
    "linear_probe",
    "slide_retrieval",
    "cross_modal_retrieval",
    "vqa",
    "report",
    "caption",
)
GENERATION_TASKS: tuple[str, ...] = ("vqa", "report", "caption")
#: record categories of the generation tasks (compared case-insensitively); vqa = every other category
TASK_CATEGORIES: dict[str, tuple[str, ...]] = {"report": ("report",), "caption": ("caption",)}
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {"report": 256, "caption": 96, "vqa": 64}
SYNTHPATH_PROMPTS = Path(__file__).with_name("prompts") / "synthpath.json"


class TaskError(HwsiError):
    """A task cannot run on this model/data (the message says what is missing)."""


class TextEncoderLike(Protocol):
    """Anything with ``encode(list[str]) -> (N, D)`` (hwsi.features.encoders text encoders)."""

    def encode(self, texts: list[str]) -> np.ndarray: ...  # pragma: no cover


# ------------------------------------------------------------------------------------------------- config
@dataclass
class EvalConfig:
    """Settings of an evaluation run (every field is recorded in each task's JSON)."""

    convention: Literal["wsi-bench", "coco"] = "wsi-bench"  # generation metrics (hwsi.eval.metrics)
    coco_tokenizer: Literal["ptb", "simple"] = "ptb"  # coco only: "ptb" (Java) | "simple"
    meteor: bool = True
    limit: int = 0  # N test samples: slides (sorted ids) or items (round-robin over slides, file order); 0 = all
    batch_size: int = 4
    max_new_tokens: int = 0  # 0 = DEFAULT_MAX_NEW_TOKENS[task]
    shuffled_baseline: bool = True
    shuffle_seed: int = 0
    text_encoder: str = "minilm"
    prompt_file: str = ""  # zero-shot prompts; "" = packaged SynthPath prompts
    prompt_set: int = 0
    label_key: str = "diagnosis"  # SynthPath: a fact name ("diagnosis", "extent", ...) or "label" (9 classes)
    embedding: Literal["auto", "z_wsi", "slide_token"] = "auto"
    probe_Cs: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 4, 9))
    retrieval_ks: tuple[int, ...] = (1, 3, 5)
    recall_ks: tuple[int, ...] = (1, 3, 5, 10)
    patch_encoder: str = ""  # override the store's recorded encoder names
    region_input: str = ""

    def tokens_for(self, task: str) -> int:
        return self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(task, 128)


# --------------------------------------------------------------------------------------------------- data
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
        }


def store_index(job: str | Path) -> dict[str, Path]:
    """``slide_id -> store`` of a job folder (``JOB/stores/*.h5``, or a folder of ``*.h5`` itself)."""
    job = Path(job)
    folder = job / "stores" if (job / "stores").is_dir() else job
    if not folder.is_dir():
        raise TaskError(f"{job}: no job folder (expected JOB/stores/<slide_id>.h5)")
    return {p.name[: -len(".h5")]: p for p in sorted(folder.glob("*.h5")) if not p.name.endswith(".truth.h5")}


def _read_labels_csv(path: Path) -> dict[str, tuple[str, str]]:
    from hwsi import textio

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
) -> EvalData:
    """Evaluation data mapped to the job's stores by slide id.

    ``data`` is a SynthPath cohort folder (``cohort.json``; records ``text/<split>.jsonl``, reports
    ``text/reports.json``, labels and facts from cohort.json; ``job`` defaults to ``DATA/job``) or a record file of
    any format :func:`hwsi.data.load_records` reads (labels for the embedding tasks then come from
    ``labels_csv``: columns ``slide_id, label[, split]``). Records whose slide has no store are listed in
    ``unmatched``; cohort slides without a store in ``missing_stores``.
    """
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
        records = load_records(data)
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
    return EvalData(source, split, slides, items, reports, list(report.unmatched), missing, report.summary())


# ------------------------------------------------------------------------------------------------- result
@dataclass
class TaskResult:
    """Metrics (each block names its convention), per-sample predictions and a Markdown table."""

    name: str
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    markdown: str
    skipped: str = ""  # reason, when the task could not run
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.name, "skipped": self.skipped, "metrics": self.metrics, "config": self.config,
                "data": self.data, "predictions": self.predictions}


# ------------------------------------------------------------------------------------------------- model
def model_device(model: Any) -> Any:
    return model.llm.get_input_embeddings().weight.device


def store_encoders(store: Path, cfg: EvalConfig) -> tuple[str, str]:
    """``(patch_encoder, region_input)`` recorded by ``hwsi extract`` in the store (or given in ``cfg``)."""
    from hwsi.store import SlideStore

    with SlideStore(store) as s:
        settings = s.json_attr("extract", {}) or {}
        encoders = s.meta.encoders
        patch = cfg.patch_encoder or str(s.attr("patch_encoder", "") or settings.get("patch_encoder", "")) or next(
            iter(encoders), "")
        region = cfg.region_input or str(s.attr("region_input", "") or settings.get("region_input", "")) or patch
    if not patch:
        raise TaskError(f"{store}: no patch encoder recorded (run `hwsi extract`, or set patch_encoder)")
    return patch, region


class _Slides:
    """Per-slide model inputs, loaded once per run."""

    def __init__(self, model: Any, data: EvalData, cfg: EvalConfig) -> None:
        self.model, self.data, self.cfg = model, data, cfg
        self._cache: dict[str, Any] = {}

    def get(self, slide_id: str) -> Any:
        from hwsi.model.inputs import load_slide_inputs

        if slide_id not in self._cache:
            info = self.data.slides[slide_id]
            patch, region = store_encoders(info.store, self.cfg)
            mc = self.model.cfg
            self._cache[slide_id] = load_slide_inputs(info.store, patch, region, mc.max_regions, mc.k, mc.max_cells)
        return self._cache[slide_id]


def resolve_embedding(model: Any, cfg: EvalConfig) -> str:
    """``z_wsi`` or ``slide_token`` (``auto``: z_wsi when the model has a slide alignment head)."""
    has_head = model.heads is not None and "slide" in model.heads.heads
    kind = cfg.embedding if cfg.embedding != "auto" else ("z_wsi" if has_head else "slide_token")
    if kind not in ("z_wsi", "slide_token"):
        raise TaskError(f"unknown embedding {cfg.embedding!r}; use auto, z_wsi or slide_token")
    if kind == "z_wsi" and not has_head:
        raise TaskError("z_WSI needs the stage-1 slide alignment head (MLLMConfig.text_dim > 0 and the slide scale on)")
    if not model.hierarchy.cfg.use_slide:
        raise TaskError("slide embeddings need the slide scale (HierarchyConfig.use_slide)")
    return kind


def slide_embeddings(model: Any, slides: _Slides, ids: Sequence[str], kind: str, batch_size: int = 4) -> np.ndarray:
    """(N, D) float64 slide embeddings (``z_wsi``: unit vectors in the text space; ``slide_token``: f_WSI)."""
    import torch

    from hwsi.model.inputs import collate_slides

    dev = model_device(model)
    rows = []
    with torch.no_grad():
        for s in range(0, len(ids), max(1, batch_size)):
            batch = collate_slides([slides.get(i) for i in ids[s: s + batch_size]]).to(dev)
            tok = model.hierarchy(batch).slide_token
            if kind == "z_wsi":
                tok = model.heads.embed("slide", tok)
            rows.append(tok.float().cpu().numpy().astype(np.float64))
    return np.concatenate(rows) if rows else np.zeros((0, 0))


def derangement(ids: Sequence[str], seed: int = 0) -> dict[str, str]:
    """A deterministic permutation of ``ids`` with no fixed point: each slide -> another slide's visual inputs.

    The ids are sorted, shuffled with ``seed`` and each is mapped to the next one in that cycle (needs >= 2 ids).
    """
    u = sorted(set(ids))
    if len(u) < 2:
        raise TaskError("the shuffled-visual baseline needs at least two slides")
    order = [u[i] for i in np.random.default_rng([seed, 7919]).permutation(len(u))]
    return {order[j]: order[(j + 1) % len(order)] for j in range(len(order))}


def generate_answers(model: Any, slides: _Slides, items: Sequence[QAItem], visual_ids: Sequence[str],
                     max_new_tokens: int, batch_size: int = 4) -> list[str]:
    """Greedy answers: item i is asked about the visual inputs of slide ``visual_ids[i]``."""
    from hwsi.model.inputs import collate_slides

    dev = model_device(model)
    out: list[str] = []
    for s in range(0, len(items), max(1, batch_size)):
        chunk = items[s: s + batch_size]
        batch = collate_slides([slides.get(v) for v in visual_ids[s: s + batch_size]]).to(dev)
        qs = [strip_image_token(it.question) for it in chunk]
        out.extend(model.generate(batch, qs, max_new_tokens=max_new_tokens, do_sample=False))
    return out


# ----------------------------------------------------------------------------------------------- helpers
_TEXT_ENCODERS: dict[str, Any] = {}


def get_text_encoder(name: str) -> Any:
    """A cached text encoder from the registry (``hwsi.features.encoders.create_text_encoder``)."""
    if name not in _TEXT_ENCODERS:
        from hwsi.features.encoders import create_text_encoder

        _TEXT_ENCODERS[name] = create_text_encoder(name)
    return _TEXT_ENCODERS[name]


def _limit(seq: list[Any], n: int) -> list[Any]:
    return seq[:n] if n > 0 else seq


def _labelled(data: EvalData, split: str) -> list[str]:
    return [s for s in data.split_ids(split) if data.slides[s].label is not None]


def _metrics_table(rows: list[tuple[str, Any]]) -> str:
    from hwsi.eval.report import markdown_table

    return markdown_table(["metric", "value"], rows)


def _cm_table(cm: list[list[int]], labels: list[str]) -> str:
    from hwsi.eval.report import markdown_table

    return markdown_table(["true \\ pred", *labels], [[lab, *row] for lab, row in zip(labels, cm, strict=True)])


# -------------------------------------------------------------------------------------------------- tasks
def task_zero_shot(model: Any, data: EvalData, cfg: EvalConfig, text_encoder: TextEncoderLike | None) -> TaskResult:
    from hwsi.eval.classification import classification_scores, load_prompt_sets, zero_shot_scores

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
    slides = _Slides(model, data, cfg)
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
    from hwsi.eval.classification import linear_probe

    kind = resolve_embedding(model, cfg)
    tr, va = _labelled(data, "train"), _labelled(data, "val")
    te = _limit(_labelled(data, data.split), cfg.limit)
    if not (tr and va and te):
        raise TaskError(f"linear probe needs labelled train, val and {data.split} slides "
                        f"(have {len(tr)}, {len(va)}, {len(te)})")
    slides = _Slides(model, data, cfg)
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
    from hwsi.eval.retrieval import slide_retrieval

    kind = resolve_embedding(model, cfg)
    ids = _limit(_labelled(data, data.split), cfg.limit)
    if len(ids) < 2:
        raise TaskError(f"slide retrieval needs >= 2 labelled slides in split {data.split!r}, have {len(ids)}")
    emb = slide_embeddings(model, _Slides(model, data, cfg), ids, kind, cfg.batch_size)
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
    from hwsi.eval.report import markdown_table
    from hwsi.eval.retrieval import cross_modal_recall

    resolve_embedding(model, EvalConfig(embedding="z_wsi"))
    ids = _limit([s for s in data.split_ids(data.split) if s in data.reports], cfg.limit)
    if len(ids) < 2:
        raise TaskError(f"cross-modal retrieval needs >= 2 {data.split} slides with a reference report, have {len(ids)}")
    enc = text_encoder or get_text_encoder(cfg.text_encoder)
    t = np.asarray(enc.encode([data.reports[s] for s in ids]), np.float64)
    z = slide_embeddings(model, _Slides(model, data, cfg), ids, "z_wsi", cfg.batch_size)
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


def _task_items(data: EvalData, task: str, limit: int) -> list[QAItem]:
    if task in TASK_CATEGORIES:
        cats = TASK_CATEGORIES[task]
        items = [it for it in data.items if it.category.lower() in cats]
    else:
        skip = {c for v in TASK_CATEGORIES.values() for c in v}
        items = [it for it in data.items if it.category.lower() not in skip]
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


def _score_generation(task: str, preds: list[str], items: list[QAItem], data: EvalData, cfg: EvalConfig) -> dict[str, Any]:
    from hwsi.eval.facts import fact_accuracy
    from hwsi.eval.metrics import generation_scores
    from hwsi.eval.vqa import evaluate_items

    if task == "vqa":
        out = evaluate_items(preds, items, generation_convention=cfg.convention, meteor=cfg.meteor)
    else:
        out = generation_scores(preds, [it.answer for it in items], convention=cfg.convention,  # type: ignore[arg-type]
                                tokenizer=cfg.coco_tokenizer, meteor=cfg.meteor)
    with_facts = [i for i, it in enumerate(items) if data.slides[it.slide_id].facts]
    if with_facts:
        fa = fact_accuracy([preds[i] for i in with_facts], [data.slides[items[i].slide_id].facts for i in with_facts],
                           [items[i].answer for i in with_facts])
        out["facts"] = {k: v for k, v in fa.items() if k != "per_sample"}
        out["_fact_rows"] = dict(zip(with_facts, fa["per_sample"], strict=True))
    else:
        out["facts"] = {"convention": "not available: the data set has no ground-truth facts (not SynthPath)"}
    return out


def _generation_row(name: str, m: dict[str, Any], task: str, fact_names: list[str]) -> list[Any]:
    if task == "vqa":
        closed, open_ = m.get("closed", {}), m.get("open", {})
        row = [name, closed.get("accuracy"), closed.get("parse_failure_rate"), open_.get("token_f1"),
               open_.get("BLEU-1"), open_.get("BLEU-4"), open_.get("ROUGE-L"), open_.get("METEOR")]
    else:
        row = [name, m.get("BLEU-1"), m.get("BLEU-2"), m.get("BLEU-3"), m.get("BLEU-4"), m.get("ROUGE-L"),
               m.get("METEOR")]
    f = m.get("facts", {})
    row += [f.get("mean_accuracy"), f.get("all_correct")] + [f.get("facts", {}).get(k, {}).get("accuracy")
                                                            for k in fact_names]
    return row


def task_generation(task: str, model: Any, data: EvalData, cfg: EvalConfig) -> TaskResult:
    """``vqa``, ``report`` or ``caption`` with fact accuracy and the shuffled-visual baseline."""
    from hwsi.eval.facts import FACT_NAMES
    from hwsi.eval.report import markdown_table

    items = _task_items(data, task, cfg.limit)
    if not items:
        raise TaskError(f"no {task} records for split {data.split!r} matched to stores")
    slides = _Slides(model, data, cfg)
    n_tok = cfg.tokens_for(task)
    own = [it.slide_id for it in items]
    preds = generate_answers(model, slides, items, own, n_tok, cfg.batch_size)
    model_m = _score_generation(task, preds, items, data, cfg)
    metrics: dict[str, Any] = {"task": task, "max_new_tokens": n_tok, "decoding": "greedy"}
    shuf_preds: list[str] | None = None
    perm: dict[str, str] = {}
    if cfg.shuffled_baseline:
        try:
            perm = derangement(own, cfg.shuffle_seed)
        except TaskError as exc:
            metrics["shuffled"] = {"skipped": str(exc)}
        else:
            shuf_preds = generate_answers(model, slides, items, [perm[s] for s in own], n_tok, cfg.batch_size)
            metrics["shuffled"] = _score_generation(task, shuf_preds, items, data, cfg)
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
    fact_names = [k for k in FACT_NAMES if k in model_m.get("facts", {}).get("facts", {})]
    if task == "vqa":
        head = ["", "closed acc", "parse fail", "open token F1", "BLEU-1", "BLEU-4", "ROUGE-L", "METEOR"]
    else:
        head = ["", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "METEOR"]
    head += ["fact acc (mean)", "all facts"] + [f"{k}" for k in fact_names]
    rows = [_generation_row("model", model_m, task, fact_names)]
    if shuf_preds is not None:
        rows.append(_generation_row("shuffled visual tokens", metrics["shuffled"], task, fact_names))
    title = {"vqa": "VQA", "report": "Report generation", "caption": "Captioning"}[task]
    conv = model_m.get("convention", cfg.convention)
    fconv = model_m.get("facts", {}).get("convention", "")
    md = "\n\n".join([
        f"## {title} ({data.source}, split {data.split}, n={len(items)}, greedy, max_new_tokens={n_tok})",
        f"Conventions: text metrics {conv}" + (f" (tokenizer: {model_m['tokenizer']})" if "tokenizer" in model_m else "")
        + f". Facts: {fconv}. Shuffled: every slide answered with another slide's visual tokens (derangement, "
          f"seed {cfg.shuffle_seed}).",
        markdown_table(head, rows),
    ])
    return TaskResult(task, metrics, predictions, md)


_EMBEDDING_TASKS: dict[str, Callable[[Any, EvalData, EvalConfig, TextEncoderLike | None], TaskResult]] = {
    "zero_shot": task_zero_shot,
    "linear_probe": task_linear_probe,
    "slide_retrieval": task_slide_retrieval,
    "cross_modal_retrieval": task_cross_modal,
}


def run_task(name: str, model: Any, data: EvalData, cfg: EvalConfig | None = None,
             text_encoder: TextEncoderLike | None = None) -> TaskResult:
    """Run task ``name`` (one of :data:`TASKS`); raises :class:`TaskError` when it cannot run on this model/data."""
    cfg = cfg or EvalConfig()
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose one of {list(TASKS)}")
    was_training = model.training
    model.eval()
    try:
        if name in GENERATION_TASKS:
            res = task_generation(name, model, data, cfg)
        else:
            res = _EMBEDDING_TASKS[name](model, data, cfg, text_encoder)
    finally:
        model.train(was_training)
    res.config = asdict(cfg)
    res.data = data.summary()
    if data.unmatched or data.missing_stores:
        res.markdown += (f"\n\nData: {len(data.unmatched)} records without a store "
                         f"({len(res.data['unmatched_slide_ids'])} slide ids); "
                         f"{len(data.missing_stores)} slides of the data set without a store.")
    return res


def run_all(model: Any, data: EvalData, cfg: EvalConfig | None = None, tasks: Sequence[str] | None = None,
            out: str | Path | None = None, text_encoder: TextEncoderLike | None = None,
            figures: bool = True) -> dict[str, TaskResult]:
    """Every task (default :data:`TASKS`); a task that cannot run is kept as skipped with its reason.

    With ``out``: ``<task>.json``/``<task>.md`` per task, confusion-matrix PNGs of the classification tasks
    (``figures``) and ``summary.md`` with all tables.
    """
    from hwsi.eval.report import summary_markdown

    cfg = cfg or EvalConfig()
    results: dict[str, TaskResult] = {}
    for name in tasks or TASKS:
        try:
            results[name] = run_task(name, model, data, cfg, text_encoder)
        except TaskError as exc:
            results[name] = TaskResult(name, {}, [], f"## {name}\n\nSkipped: {exc}", skipped=str(exc),
                                       config=asdict(cfg), data=data.summary())
    if out is not None:
        out = Path(out)
        for r in results.values():
            write_task(r, out, figures=figures)
        (out / "summary.md").write_text(summary_markdown(results.values()) + "\n", encoding="utf-8")
    return results


def write_task(result: TaskResult, out: str | Path, figures: bool = True) -> dict[str, Path]:
    """Write one task's JSON + Markdown (+ confusion-matrix PNG for classification tasks)."""
    from hwsi.eval.report import confusion_matrix_png, write_result

    out = Path(out)
    if figures and "confusion_matrix" in result.metrics:
        png = confusion_matrix_png(result.metrics["confusion_matrix"], [str(x) for x in result.metrics["labels"]],
                                   out / f"{result.name}_confusion.png", title=result.name.replace("_", " "))
        result.figures["confusion_matrix"] = str(png)
        result.markdown += f"\n\n![confusion matrix]({png.name})"
    return write_result(result, out)


def load_model(run_dir: str | Path) -> Any:
    """The trained :class:`hwsi.model.mllm.MLLMHWSI` of a training run folder
    (:func:`hwsi.train.inference.load_trained_model`: LoRA merged, eval mode; a folder that is not a finished run is
    a TrainError naming it)."""
    from hwsi.train.inference import load_trained_model

    return load_trained_model(run_dir)


def check_run_stores(run_dir: str | Path, data: EvalData) -> Any:
    """Check every store of ``data`` against the run's bundle (:func:`hwsi.train.bundle.check_stores`): a store made
    another way than the run's (encoder, µm/px, region size, SPF settings) is an error naming it. Returns the
    bundle, or None for a run without one (nothing checked)."""
    from hwsi.train.bundle import check_stores

    return check_stores([info.store for _, info in sorted(data.slides.items())], run_dir,
                        hint=" (extract the job with the run's settings: RUN/bundle/bundle.json)")


__all__ = [
    "check_run_stores",
    "EvalConfig",
    "EvalData",
    "GENERATION_TASKS",
    "SlideInfo",
    "TASKS",
    "TaskError",
    "TaskResult",
    "derangement",
    "generate_answers",
    "load_eval_data",
    "load_model",
    "resolve_embedding",
    "run_all",
    "run_task",
    "slide_embeddings",
    "store_index",
    "store_encoders",
    "write_task",
]


def heldout_closed_vqa(model: Any, datas: Sequence[EvalData], cfg: EvalConfig | None = None,
                       max_new_tokens: int = 24, batch_size: int = 8) -> dict[str, Any]:
    """Closed-ended VQA over several held-out splits pooled (e.g. val + test), beside the shuffled baseline.

    Every closed item is answered greedily with its own slide's visual inputs and, for the baseline, with those of
    another slide (a :func:`derangement` of the pooled slides, seed ``cfg.shuffle_seed``). Chance is the mean of
    1/len(options). Used by the pipeline's learning test and by ``hwsi ablate``.
    """
    from hwsi.eval.vqa import vqa_accuracy

    cfg = cfg or EvalConfig()
    if not datas:
        raise TaskError("heldout_closed_vqa needs at least one data split")
    merged = copy.copy(datas[0])
    merged.slides = {k: v for d in datas for k, v in d.slides.items()}
    closed = [it for d in datas for it in d.items if it.options]
    if not closed:
        raise TaskError("no closed-ended items in the held-out splits")
    perm = derangement(sorted({it.slide_id for it in closed}), cfg.shuffle_seed)
    slides = _Slides(model, merged, cfg)
    res: dict[str, Any] = {"n_slides": len(perm), "convention": "closed-choice accuracy (hwsi.eval.vqa.parse_choice);"
                           " shuffled: derangement of the pooled held-out slides; chance: mean 1/len(options)",
                           "chance": sum(1 / len(it.options) for it in closed) / len(closed)}
    for name, vis in (("closed_acc", [it.slide_id for it in closed]),
                      ("shuffled_acc", [perm[it.slide_id] for it in closed])):
        acc = vqa_accuracy(generate_answers(model, slides, closed, vis, max_new_tokens, batch_size), closed)
        res[name], res["n_closed"] = acc["accuracy"], acc["n"]
        res[name + "_by_category"] = {k: round(v["accuracy"], 3) for k, v in acc["by_category"].items()}
        res[name.replace("_acc", "_correct")] = acc["correct"]
    return res
