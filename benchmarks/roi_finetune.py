"""Does the answer about a region follow the region's truth, and what would make it? (docs/roi.md)

    .venv/bin/python benchmarks/roi_finetune.py PIPELINE_DIR [--steps 300] [--lr 5e-4] [--seed 0]

PIPELINE_DIR is a finished SynthPath pipeline folder (``hwsi demo`` or the test pipeline: cohort/, job/, runs/).
Side by side, for the trained run as it is and for a copy fine-tuned IN MEMORY (nothing is written) with ROI
prefixes: on every held-out (val + test) slide with a focal lesion, the closed architecture / atypia question asked
about the lesional region and a benign region (as tests/test_ask_roi.py), and the whole-slide closed VQA accuracy
on every held-out closed question (to see what the fine-tune costs the whole-slide answers).

The fine-tune: projectors + LLM (hierarchy frozen), AdamW, batches of 8 drawn from TRAIN-split slides only: their
whole-slide closed questions (train.json) and, per tissue region, the architecture and atypia questions with that
region's truth, asked with the region as the ROI (hwsi.model.roi: its tokens + the slide token), options shuffled.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from hwsi.eval.vqa import parse_choice
from hwsi.model.chat import ChatSession
from hwsi.model.inputs import collate_slides
from hwsi.model.roi import roi_slide_inputs
from hwsi.slide.roi_geometry import parse_rect
from hwsi.store import SlideStore
from hwsi.synth.truth import read_truth
from hwsi.train.inference import load_trained_model, run_config, slide_inputs_for

ARCH = {1: "regular", 2: "crowded", 3: "solid"}
ARCH_Q, ARCH_OPTS = "How are the glands arranged?", ["regular", "crowded", "solid"]
ATYPIA_Q, ATYPIA_OPTS = "Is there nuclear atypia in the epithelial cells?", ["yes", "no"]


def closed(stem: str, options: list[str], rng: random.Random | None = None) -> str:
    opts = list(options)
    if rng is not None:
        rng.shuffle(opts)
    return stem + "\n" + "\n".join(f"{'ABCD'[i]}) {o}" for i, o in enumerate(opts))


def regions_of(root: Path, rec: dict) -> tuple[Path, np.ndarray, float, dict[str, np.ndarray]]:
    """Store, region coords, region side (level-0 px) and per-store-row truth of one cohort slide."""
    store = root / "job" / "stores" / f"{rec['slide_id']}.h5"
    tr = read_truth(root / "cohort" / rec["truth"]).data
    rows = {tuple(c): i for i, c in enumerate(tr["regions/coords"].tolist())}
    with SlideStore(store) as s:
        coords, side = s.region_coords(), float(s.meta.region_size_level0)
    t = [rows[tuple(c)] for c in coords.tolist()]
    truth = {k: np.array([tr[f"regions/{k}"][i] for i in t]) for k in ("lesion", "architecture", "atypia", "tissue")}
    return store, coords, side, truth


def roi_of(store: Path, coords: np.ndarray, side: float, i: int, cfg) -> object:
    m = cfg.model
    return roi_slide_inputs(store, cfg.data.patch_encoder, cfg.data.region_input,
                            parse_rect(f"{coords[i][0]},{coords[i][1]},{side},{side}"), m.max_regions, m.k,
                            m.max_cells)


def roi_follow(model, root: Path, cohort: dict, cfg) -> dict[str, int]:
    """Counts over held-out focal slides: whole right, lesional ROI right, benign ROI right, both ROIs right."""
    c = {"slides": 0, "whole": 0, "lesion": 0, "benign": 0, "both": 0}
    for rec in cohort["slides"]:
        if rec["split"] == "train" or rec["facts"]["extent"] != "focal":
            continue
        store, coords, side, t = regions_of(root, rec)
        benign = [i for i in range(len(coords)) if not t["lesion"][i] and t["tissue"][i] > 0.3]
        if t["lesion"].sum() != 1 or not benign:
            continue
        les, ben = int(np.flatnonzero(t["lesion"])[0]), benign[0]
        if t["architecture"][les] != 1:
            q, truth = closed(ARCH_Q, ARCH_OPTS), (lambda i: ARCH[int(t["architecture"][i])])
        else:
            q, truth = closed(ATYPIA_Q, ATYPIA_OPTS), (lambda i: "yes" if t["atypia"][i] else "no")
        whole = ChatSession(model, slide_inputs_for(store, cfg=cfg), max_new_tokens=8).ask_each([q])[0]
        ok = {}
        for name, i in (("lesion", les), ("benign", ben)):
            x = roi_of(store, coords, side, i, cfg)
            a = ChatSession(model, x.inputs, region_token_mask=x.region_token_mask, max_new_tokens=8).ask_each([q])[0]
            ok[name] = truth(i) in a.lower()
        c["slides"] += 1
        c["whole"] += truth(les) in whole.lower()
        c["lesion"] += ok["lesion"]
        c["benign"] += ok["benign"]
        c["both"] += ok["lesion"] and ok["benign"]
    return c


def whole_closed_accuracy(model, root: Path, cohort: dict, cfg) -> dict[str, tuple[int, int]]:
    """(right, asked) per category over every held-out closed question (val.jsonl + test.jsonl)."""
    held = {r["slide_id"] for r in cohort["slides"] if r["split"] != "train"}
    by_slide: dict[str, list[dict]] = {}
    for name in ("val.jsonl", "test.jsonl"):
        for line in (root / "cohort" / "text" / name).read_text().splitlines():
            r = json.loads(line)
            if r.get("options") and r["image"] in held:
                by_slide.setdefault(r["image"], []).append(r)
    out: dict[str, list[int]] = {}
    for sid, recs in sorted(by_slide.items()):
        store = root / "job" / "stores" / f"{sid}.h5"
        answers = ChatSession(model, slide_inputs_for(store, cfg=cfg), max_new_tokens=12).ask_each(
            [r["question"] for r in recs])
        for r, a in zip(recs, answers):
            got = parse_choice(a, r["options"])
            gold = "ABCDEFGH".index(r["answer_option"])
            n = out.setdefault(r["metadata"], [0, 0])
            n[0] += int(got == gold)
            n[1] += 1
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def finetune(model, root: Path, cohort: dict, cfg, steps: int, lr: float, seed: int) -> int:
    """The ROI-aware fine-tune of the module docstring, in place; returns the number of training samples."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    whole_q: dict[str, list[tuple[str, str]]] = {}
    for r in json.loads((root / "cohort" / "text" / "train.json").read_text()):
        q, a = r["conversations"][0]["value"].replace("<image>\n", ""), r["conversations"][1]["value"]
        if "\nA) " in q:  # closed: answered with the option text, as the run trains (closed_text_answers)
            whole_q.setdefault(r["image"], []).append((q, a.split(") ", 1)[1] if a[1:3] == ") " else a))
    samples = []
    with torch.no_grad():
        for rec in cohort["slides"]:
            if rec["split"] != "train":
                continue
            store, coords, side, t = regions_of(root, rec)
            h = model.hierarchy(collate_slides([slide_inputs_for(store, cfg=cfg)]))
            samples += [(h, None, q, a) for q, a in whole_q.get(rec["slide_id"], [])]
            for i in range(len(coords)):
                if t["tissue"][i] < 0.3:
                    continue
                x = roi_of(store, coords, side, i, cfg)
                hr, mask = model.hierarchy(collate_slides([x.inputs])), x.region_token_mask[None]
                arch, aty = ARCH[int(t["architecture"][i])], "yes" if t["atypia"][i] else "no"
                for _ in range(2):
                    samples.append((hr, mask, closed(ARCH_Q, ARCH_OPTS, rng), arch))
                    samples.append((hr, mask, closed(ATYPIA_Q, ATYPIA_OPTS, rng), aty))
    params = list(model.projectors.parameters()) + list(model.llm.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = rng.sample(samples, 8)
        vis = [model.project(h, mask)[0] for h, mask, _, _ in batch]
        convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for _, _, q, a in batch]
        x = model.build_inputs(vis, convs)
        loss = model.llm(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask, labels=x.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return len(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pipeline", type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    root, cohort = a.pipeline, json.loads((a.pipeline / "cohort" / "cohort.json").read_text())
    cfg = run_config(root / "runs")
    model = load_trained_model(root / "runs")
    rows = [("as trained", roi_follow(model, root, cohort, cfg), whole_closed_accuracy(model, root, cohort, cfg))]
    t0 = time.time()
    n = finetune(model, root, cohort, cfg, a.steps, a.lr, a.seed)
    took = time.time() - t0
    rows.append((f"+ ROI fine-tune ({a.steps} steps, {n} samples, {took:.0f} s)", roi_follow(model, root, cohort, cfg),
                 whole_closed_accuracy(model, root, cohort, cfg)))
    cats = list(rows[0][2])
    print("| model | focal slides | whole right | lesion ROI right | benign ROI right | both ROIs right | "
          + " | ".join(f"whole closed {c}" for c in cats) + " |")
    print("|---" * (6 + len(cats)) + "|")
    for name, r, acc in rows:
        print(f"| {name} | {r['slides']} | {r['whole']} | {r['lesion']} | {r['benign']} | {r['both']} | "
              + " | ".join(f"{acc[c][0]}/{acc[c][1]}" for c in cats) + " |")


if __name__ == "__main__":
    main()
