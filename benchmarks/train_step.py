"""Where a stage-2 / stage-3 training step goes, with the frozen hierarchy recomputed at every step (before) vs cached
per slide (hwsi.train.stage_lm.FrozenHierarchyCache, now), measured side by side in one run, repeated interleaved
(the machine may be busy: compare the ratios and the shares, not the seconds).

    HWSI_PIPELINE_CACHE=/work/cache .venv/bin/python benchmarks/train_step.py [--pipeline DIR] [--stages 2 3]
        [--steps 60] [--repeats 2] [--threads 2]

Each step is the LM stage's step on a batch of ``batch_size`` train samples (the preset's), timed in parts: data
(collating the slides' stored inputs), hierarchy (CCAF + ViT-4K + ViT_WSI, Eq. 3-5; frozen in stages 2-3), project
(the trainable projectors), splice (text tokens + visual tokens, hwsi.model.mllm.build_inputs), LLM forward,
backward, optimizer. The cached mode starts empty each repeat, so it pays for every first encounter of a slide as
training does. The visual tokens of both modes are compared (max abs difference printed). The pipeline folder is
read, never written: DIR/runs (stages 0-2 finished) and DIR/job.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PARTS = ("data", "hierarchy", "project", "splice", "llm_fwd", "backward", "optim")


def find_pipeline() -> Path:
    root = Path(os.environ.get("HWSI_PIPELINE_CACHE", REPO / ".cache"))
    done = sorted((p for p in root.glob("pipeline-test-*") if (p / "runs" / "stage2" / "final").is_dir()),
                  key=lambda p: p.stat().st_mtime)
    if not done:
        sys.exit(f"{root}: no test pipeline with a finished stage 2 (pipeline-test-*/runs/stage2/final); "
                 "pass --pipeline DIR")
    return done[-1]


def run_steps(model, samples, order, cache, frozen, steps: int, batch: int) -> tuple[dict[str, float], float]:
    """Seconds per part over ``steps`` steps; ``frozen`` None = recompute the hierarchy each step."""
    from hwsi.model.inputs import collate_slides

    from hwsi.train.roi_samples import VisualInputs

    vin = frozen.inputs if frozen is not None else VisualInputs(cache)  # ROI samples: the ROI's inputs and z_r mask
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    t = dict.fromkeys(PARTS, 0.0)
    diff = 0.0
    for i in range(steps):
        b = [samples[j] for j in order[i * batch:(i + 1) * batch]]
        t0 = time.perf_counter()
        if frozen is None:
            inputs = collate_slides([vin.get(s)[0] for s in b])
            t1 = time.perf_counter()
            h = model.hierarchy(inputs)
        else:
            t1 = t0
            h = frozen.batch(model.hierarchy, b)
        t2 = time.perf_counter()
        vis = model.project(h, vin.region_token_mask(b, h.region_mask.shape[1]))
        t3 = time.perf_counter()
        x = model.build_inputs(vis, [s.messages for s in b])
        t4 = time.perf_counter()
        out = model.llm(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask, labels=x.labels)
        t5 = time.perf_counter()
        out.loss.backward()
        t6 = time.perf_counter()
        opt.zero_grad(set_to_none=True)  # no update: both modes see the same weights
        t7 = time.perf_counter()
        for k, a, z in zip(PARTS, (t0, t1, t2, t3, t4, t5, t6), (t1, t2, t3, t4, t5, t6, t7), strict=True):
            t[k] += z - a
        if frozen is not None and i < 4:
            with torch.no_grad():
                ref = model.project(model.hierarchy(collate_slides([vin.get(s)[0] for s in b])),
                                    vin.region_token_mask(b, h.region_mask.shape[1]))
            diff = max(diff, max(float((u - v).abs().max()) for u, v in zip(ref, vis, strict=True)))
    return t, diff


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", type=Path, default=None)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(REPO / "src"))
    from hwsi.train.config import load_train_config
    from hwsi.train.data import load_train_text
    from hwsi.train.stage_common import slide_cache
    from hwsi.train.roi_samples import VisualInputs
    from hwsi.train.stage_lm import FrozenHierarchyCache, lm_samples, stage_model

    root = a.pipeline or find_pipeline()
    run, job = root / "runs", root / "job"
    print(f"pipeline {root}; {a.steps} steps per mode and repeat, {a.repeats} repeats interleaved, "
          f"{a.threads} threads")
    for stage in a.stages:
        cfg = load_train_config(run / "config.yaml")
        cache, stores = slide_cache(cfg, job, run)
        text = load_train_text(job, cfg.data, stores)
        samples = lm_samples(stage, cfg, text)
        model, cfg = stage_model(stage, cfg, run)
        model.train()
        batch = (cfg.stage2 if stage == 2 else cfg.stage3).micro_batch_size
        order = list(range(len(samples)))
        random.Random(0).shuffle(order)
        steps = min(a.steps, len(order) // batch)
        totals = {m: dict.fromkeys(PARTS, 0.0) for m in ("recompute", "cached")}
        diff = 0.0
        for _ in range(a.repeats):
            for mode in ("recompute", "cached"):
                frozen = FrozenHierarchyCache(VisualInputs(cache), torch.device("cpu"), cfg.data.memory_cache) \
                    if mode == "cached" else None
                t, d = run_steps(model, samples, order, cache, frozen, steps, batch)
                diff = max(diff, d)
                for k in PARTS:
                    totals[mode][k] += t[k]
        n = steps * a.repeats
        print(f"\nstage {stage}: {len(samples)} samples, batches of {batch}; visual tokens cached vs recomputed: "
              f"max |diff| {diff:.2e}")
        print("| part | recompute ms/step | share | cached ms/step | share |")
        print("|---|---|---|---|---|")
        sums = {m: sum(v.values()) for m, v in totals.items()}
        for k in PARTS:
            r, c = totals["recompute"][k], totals["cached"][k]
            print(f"| {k} | {1000 * r / n:.1f} | {100 * r / sums['recompute']:.0f} % | {1000 * c / n:.1f} | "
                  f"{100 * c / sums['cached']:.0f} % |")
        print(f"| step | {1000 * sums['recompute'] / n:.1f} | | {1000 * sums['cached'] / n:.1f} | |")
        print(f"cached / recompute step time: {sums['cached'] / sums['recompute']:.2f}")


if __name__ == "__main__":
    main()
