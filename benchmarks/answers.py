"""Answers per second on the held-out split of a trained run: batched greedy generation (hwsi.model.generate) vs one
question at a time, and vs the HF ``generate`` path eval used before (4 left-padded questions per call), measured
side by side in one run, repeated interleaved (the machine may be busy: compare ratios, not seconds).

    HWSI_PIPELINE_CACHE=/work/cache .venv/bin/python benchmarks/answers.py [--pipeline DIR] [--questions 96]
        [--per-slide 8] [--batch-sizes 8 32] [--repeats 3] [--max-new-tokens 64]

Two question sets from the test split's VQA records: "eval order" (the first N of ``hwsi eval --limit N``:
round-robin over slides, about one question per slide) and "per slide" (every VQA question of the first slides,
``--per-slide`` slides: the shared visual prefix). Visual tokens are computed once per slide before the timing (the
same for every mode); the time is the LLM's. Each mode's answers are compared with one-at-a-time's (differing count
printed). The pipeline folder is read, never written: DIR/runs (the run), DIR/cohort + DIR/job (the data).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def find_pipeline() -> Path:
    root = Path(os.environ.get("HWSI_PIPELINE_CACHE", REPO / ".cache"))
    done = sorted((p for p in root.glob("pipeline-test-*") if (p / "runs" / "stage3" / "final").is_dir()),
                  key=lambda p: p.stat().st_mtime)
    if not done:
        sys.exit(f"{root}: no finished test pipeline (pipeline-test-*/runs/stage3/final); pass --pipeline DIR")
    return done[-1]


def hf_generate(model, vis, qs, max_new_tokens: int, batch_size: int = 4) -> list[str]:
    """The previous eval path: MLLMHWSI.generate (HF generate, left padding) on chunks of ``batch_size``."""
    out: list[str] = []
    for s in range(0, len(qs), batch_size):
        x = model.build_inputs(vis[s: s + batch_size], [[{"role": "user", "content": q}] for q in qs[s: s + batch_size]],
                               add_generation_prompt=True, padding_side="left")
        ids = model.llm.generate(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=model.tokenizer.pad_token_id,
                                 eos_token_id=model.tokenizer.eos_token_id)
        out += [t.strip() for t in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", type=Path, default=None)
    ap.add_argument("--questions", type=int, default=96)
    ap.add_argument("--per-slide", type=int, default=8, help="slides whose every VQA question forms set 2")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from hwsi.data import strip_image_token
    from hwsi.eval.eval_config import EvalConfig
    from hwsi.eval.eval_data import load_eval_data
    from hwsi.eval.generation_tasks import _task_items, items_of_task
    from hwsi.eval.model_outputs import SlideInputCache, slide_visual_tokens
    from hwsi.model.generate import greedy_answers
    from hwsi.train.inference import load_trained_model

    pipe = a.pipeline or find_pipeline()
    model = load_trained_model(pipe / "runs")
    data = load_eval_data(pipe / "cohort", pipe / "job", split="test")
    slides = SlideInputCache(model, data, EvalConfig(meteor=False))
    vqa = items_of_task(data.items, "vqa")
    first = list(dict.fromkeys(it.slide_id for it in vqa))[: a.per_slide]
    sets = {"eval order": _task_items(data, "vqa", a.questions),
            "per slide": [it for it in vqa if it.slide_id in first]}
    print(f"pipeline {pipe}; {a.threads} threads; max_new_tokens {a.max_new_tokens}; repeats {a.repeats} (interleaved)")
    report = {}
    for name, items in sets.items():
        ids = [it.slide_id for it in items]
        vis_of = slide_visual_tokens(model, slides, ids)
        vis = [vis_of[s] for s in ids]
        qs = [strip_image_token(it.question) for it in items]
        modes = {"one at a time": lambda: greedy_answers(model, vis, qs, a.max_new_tokens, 1),
                 "HF generate x4 (before)": lambda: hf_generate(model, vis, qs, a.max_new_tokens)}
        for b in a.batch_sizes:
            modes[f"batched {b}"] = lambda b=b: greedy_answers(model, vis, qs, a.max_new_tokens, b)
        times: dict[str, list[float]] = {m: [] for m in modes}
        answers: dict[str, list[str]] = {}
        with torch.no_grad():
            for _ in range(a.repeats):
                for m, fn in modes.items():
                    t = time.perf_counter()
                    answers[m] = fn()
                    times[m].append(time.perf_counter() - t)
        ref = answers["one at a time"]
        base = statistics.median(times["one at a time"])
        print(f"\n{name}: {len(items)} questions on {len(vis_of)} slides")
        print("| mode | median s | questions/s | × one at a time | answers ≠ one at a time |")
        print("|---|---|---|---|---|")
        rows = {}
        for m in modes:
            med = statistics.median(times[m])
            ndiff = sum(x != y for x, y in zip(answers[m], ref))
            # the ratio of each interleaved repeat, reported as min..max beside the median's
            per = [tb / tm for tb, tm in zip(times["one at a time"], times[m])]
            print(f"| {m} | {med:.2f} | {len(items) / med:.1f} | {base / med:.2f} ({min(per):.2f}..{max(per):.2f}) | "
                  f"{ndiff}/{len(items)} |")
            rows[m] = {"seconds": times[m], "qps": len(items) / med, "ratio": base / med, "differ": ndiff}
        report[name] = rows
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
