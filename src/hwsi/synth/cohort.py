"""Write SynthPath slides and cohorts: pyramidal TIFF + truth sidecar + text in WSI-Bench format.

Cohort folder::

    OUT/cohort.json              seed, scene config, and per slide: slide_id, path, truth, classes, split, facts
    OUT/facts.json               slide_id -> structured facts (diagnosis, grade, extent, glands, architecture, ...)
    OUT/slides/<id>.tiff         pyramidal tiled JPEG TIFF (OpenSlide generic-tiff, µm/px in the resolution tags)
    OUT/slides/<id>.truth.h5     ground truth (hwsi.synth.truth)
    OUT/text/reports.json        slide_id -> report;  OUT/text/captions.json  slide_id -> caption
    OUT/text/train.json          LLaVA-style records of the train split (WSI-Bench train format)
    OUT/text/val.jsonl, test.jsonl   WSI-Bench test records of the val / test split

Slides are balanced over diagnoses (slide i has ``DIAGNOSES[i % 5]``; lesional extents alternate focal/extensive),
split by slide (stratified by diagnosis, deterministic by seed). A finished slide (TIFF and sidecar present) is
skipped on rerun.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hwsi.synth.classes import DIAGNOSES, SlideClasses, SynthError
from hwsi.synth.pyramid import write_pyramid_tiff
from hwsi.synth.roi_text import region_records
from hwsi.synth.render import make_tile_fn
from hwsi.synth.scene import Scene, SceneConfig
from hwsi.synth.text import SYNTHPATH_UNIT_RULES, SYNTHPATH_VOCABULARY, SlideText, bench_records, slide_text, train_records
from hwsi.synth.truth import read_truth, slide_facts, truth_path_for, write_truth
from hwsi.utils.atomic import atomic_path, write_json_atomic


@dataclass
class SlideRecord:
    """One written slide."""

    slide_id: str
    path: str
    truth: str
    classes: dict[str, str]
    facts: dict[str, Any]
    seed: int
    split: str = ""
    seconds: float = 0.0


def write_slide(out_dir: str | Path, cfg: SceneConfig, slide_id: str = "synth", tile_size: int = 256,
                quality: int = 85, threads: int | None = 1, overwrite: bool = False) -> SlideRecord:
    """Render ``cfg`` into ``out_dir/<slide_id>.tiff`` (+ ``.truth.h5``), streaming tile by tile."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{slide_id}.tiff"
    tpath = truth_path_for(path)
    scene = Scene(cfg)
    if not overwrite and path.is_file() and tpath.is_file():
        facts = read_truth(tpath).facts
    else:
        desc = json.dumps({"synthpath": True, "slide_id": slide_id, "seed": cfg.seed, **cfg.classes.to_dict()})
        write_pyramid_tiff(path, cfg.width, cfg.height, cfg.mpp, make_tile_fn(scene), tile_size=tile_size,
                           quality=quality, threads=threads, description=desc)
        write_truth(tpath, scene, slide_id)
        facts = slide_facts(scene)
    return SlideRecord(slide_id, str(path), str(tpath), cfg.classes.to_dict(), facts, cfg.seed,
                       seconds=time.perf_counter() - t0)


def cohort_classes(n: int) -> list[SlideClasses]:
    """Balanced class list of ``n`` slides: diagnoses cycle, lesional extents alternate focal/extensive."""
    out = []
    for i in range(n):
        d = DIAGNOSES[i % len(DIAGNOSES)]
        e = "none" if d == "benign" else ("focal", "extensive")[(i // len(DIAGNOSES)) % 2]
        out.append(SlideClasses(d, e))
    return out


def assign_splits(labels: list[str], seed: int, val: float = 0.15, test: float = 0.15) -> list[str]:
    """Split by slide, stratified by ``labels``: labels are visited round-robin (slides shuffled within each
    label), the first ``round(test * n)`` (>= 1 when n >= 3) go to test, the next ``round(val * n)`` to val."""
    rng = np.random.default_rng([seed, 5150])
    n = len(labels)
    groups = {lab: [i for i, x in enumerate(labels) if x == lab] for lab in sorted(set(labels))}
    for lab in groups:
        g = groups[lab]
        groups[lab] = [g[j] for j in rng.permutation(len(g))]
    order: list[int] = []
    depth = 0
    while len(order) < n:
        for lab in groups:
            if depth < len(groups[lab]):
                order.append(groups[lab][depth])
        depth += 1
    n_test = max(1, int(round(test * n))) if n >= 3 else 0
    n_val = max(1, int(round(val * n))) if n >= 3 else 0
    splits = ["train"] * n
    for i in order[:n_test]:
        splits[i] = "test"
    for i in order[n_test : n_test + n_val]:
        splits[i] = "val"
    return splits


def _slide_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0] % (2**31))


def _write_one(args: tuple[str, SceneConfig, str, int]) -> SlideRecord:
    out_dir, cfg, sid, tile = args
    return write_slide(out_dir, cfg, sid, tile_size=tile, threads=1)


@dataclass
class CohortResult:
    """What :func:`write_cohort` wrote."""

    out: Path
    slides: list[SlideRecord] = field(default_factory=list)
    seconds: float = 0.0


def write_cohort(out: str | Path, n: int, seed: int = 0, base: SceneConfig | None = None, workers: int | None = None,
                 tile_size: int = 256, progress: bool = True, extra_heldout: int = 0) -> CohortResult:
    """Write ``n`` slides balanced over classes, their truth, cohort.json, facts.json and the text files.

    ``extra_heldout`` more slides (classes continuing the balanced cycle) go to the test split, on top of the ``n``
    slides' stratified split: more held-out slides for evaluation power without more training slides."""
    if n < 1:
        raise SynthError(f"cohort size must be >= 1, got {n}")
    if extra_heldout < 0:
        raise SynthError(f"extra_heldout must be >= 0, got {extra_heldout}")
    t0 = time.perf_counter()
    out = Path(out)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    base = base or SceneConfig(width=3072, height=3072)
    classes = cohort_classes(n + extra_heldout)
    n_all = n + extra_heldout
    jobs = []
    for i, cls in enumerate(classes):
        cfg = replace(base, seed=_slide_seed(seed, i), classes=cls)
        jobs.append((str(out / "slides"), cfg, f"synth_{i:04d}", tile_size))
    workers = max(1, min(workers or os.cpu_count() or 1, n_all))
    records: list[SlideRecord] = []
    from tqdm import tqdm

    bar = tqdm(total=n_all, desc="synth cohort", unit="slide", disable=not progress)
    if workers == 1:
        for j in jobs:
            records.append(_write_one(j))
            bar.update(1)
    else:
        with ProcessPoolExecutor(workers) as ex:
            for r in ex.map(_write_one, jobs):
                records.append(r)
                bar.update(1)
    bar.close()
    splits = assign_splits([c.diagnosis for c in classes[:n]], seed)
    splits += ["test"] * extra_heldout
    for r, s in zip(records, splits, strict=True):
        r.split = s
    write_cohort_text(out, records, seed)
    meta = {
        "seed": seed,
        "n": n_all,
        "extra_heldout": extra_heldout,
        "scene": {k: v for k, v in asdict(base).items() if k not in ("seed", "classes")},
        "grid": "regions of region_size px from the origin, each (region_size/patch_size)^2 patches of patch_size "
        "px, row-major; level-0 pixels at mpp",
        "slides": [
            {"slide_id": r.slide_id, "path": os.path.relpath(r.path, out), "truth": os.path.relpath(r.truth, out),
             "classes": r.classes, "label": SlideClasses(**r.classes).label, "split": r.split, "seed": r.seed,
             "facts": r.facts}
            for r in records
        ],
    }
    write_json_atomic(out / "cohort.json", meta)
    write_json_atomic(out / "facts.json", {r.slide_id: r.facts for r in records})
    return CohortResult(out, records, time.perf_counter() - t0)


def write_cohort_text(out: Path, records: list[SlideRecord], seed: int) -> dict[str, Path]:
    """Reports, captions and VQA of every slide, train/val/test by the records' split."""
    texts: dict[str, list[SlideText]] = {"train": [], "val": [], "test": []}
    all_texts: list[SlideText] = []
    for r in records:
        t = slide_text(r.slide_id, r.facts, seed)
        texts[r.split or "train"].append(t)
        all_texts.append(t)
    tdir = out / "text"
    tdir.mkdir(parents=True, exist_ok=True)
    paths = {
        "reports": tdir / "reports.json",
        "captions": tdir / "captions.json",
        "train": tdir / "train.json",
        "val": tdir / "val.jsonl",
        "test": tdir / "test.jsonl",
        "vocab": out / "vocab.txt",
        "unit_rules": out / "unit_rules.yaml",
    }
    with atomic_path(paths["vocab"]) as tmp:
        tmp.write_text("# SynthPath SPF vocabulary (hwsi extract --vocab): one term per line\n"
                       + "".join(t + "\n" for t in SYNTHPATH_VOCABULARY))
    with atomic_path(paths["unit_rules"]) as tmp:
        tmp.write_text("# SynthPath stage-1 unit routing rules (hwsi train stage1.unit_rules; hwsi.train.units)\n"
                       + yaml.safe_dump(SYNTHPATH_UNIT_RULES, sort_keys=False))
    write_json_atomic(paths["reports"], {t.slide_id: t.report for t in all_texts})
    write_json_atomic(paths["captions"], {t.slide_id: t.caption for t in all_texts})
    train = train_records(texts["train"], seed)  # then the ROI questions (hwsi.synth.roi_text), after every other one
    for r in records:
        if (r.split or "train") == "train":
            train += region_records(r.slide_id, read_truth(r.truth), seed)
    write_json_atomic(paths["train"], train)
    for split in ("val", "test"):
        lines = "".join(json.dumps(r) + "\n" for r in bench_records(texts[split], seed))
        with atomic_path(paths[split]) as tmp:
            tmp.write_text(lines)
    return paths
