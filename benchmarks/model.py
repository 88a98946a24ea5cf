"""Model benchmark (CPU): visual tokens vs slide size, time to first token (first vs second question on one slide,
thanks to the cached visual prefix), and the step time of each training stage on the tiny config.

    .venv/bin/python benchmarks/model.py [--regions 4 16 64 256] [--ttft-regions 64] [--steps 3]

Slides are synthetic stores written with h5py in the store schema (random features, 256 patches per region, k
selected); the LLM is the tiny Qwen2 of the tiny preset (random weights: TTFT does not depend on training).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def write_store(path: Path, n_regions: int, side: int, k: int, dp: int, din: int, dc: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    g = side * side
    counts = rng.integers(0, 12, size=n_regions * g)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    coords = np.stack([np.arange(n_regions) % 16 * 4096, np.arange(n_regions) // 16 * 4096], 1).astype(np.int64)
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(g, 2)[None] * 256
    with h5py.File(path, "w") as f:
        f.attrs["slide_id"] = path.stem
        f.attrs["region_size_level0"] = 4096.0
        f["regions/coords"] = coords
        f["patches/coords"] = (coords[:, None, :] + grid).astype(np.int64)
        f["patches/tissue"] = np.ones((n_regions, g), bool)
        f["patches/hwsi_small_patch"] = rng.normal(size=(n_regions, g, dp)).astype(np.float32)
        f["patches/rin"] = rng.normal(size=(n_regions, g, din)).astype(np.float32)
        f["spf/relevance"] = rng.uniform(size=(n_regions, g)).astype(np.float32)
        f["spf/selected"] = np.stack([rng.permutation(g)[:k] for _ in range(n_regions)]).astype(np.int32)
        f["cells/offsets"] = offsets
        f["cells/embeddings"] = rng.normal(size=(int(offsets[-1]), dc)).astype(np.float32)


def visual_tokens(tmp: Path, sizes: list[int]) -> list[tuple[int, int, int]]:
    from hwsi.model.inputs import load_slide_inputs

    rows = []
    for r in sizes:
        p = tmp / f"vt_{r}.h5"
        write_store(p, r, 16, 16, 8, 8, 4)
        x = load_slide_inputs(p, "hwsi_small_patch", "rin", max_regions=64, k=16)
        rows.append((r, x.n_regions, x.n_visual_tokens + 8))  # + 8 scale markers
        p.unlink()
    return rows


def ttft(tmp: Path, n_regions: int, repeats: int = 3) -> dict[str, float]:
    from hwsi.model.hierarchy import HierarchyConfig
    from hwsi.model.inputs import load_slide_inputs
    from hwsi.model.llm import build_tiny_llm, load_llm
    from hwsi.model.chat import ChatSession
    from hwsi.model.mllm import MLLMConfig, MLLMHWSI
    from hwsi.model.projectors import ProjectorConfig
    from hwsi.train.config import load_train_config

    tcfg = load_train_config("tiny")
    t = tcfg.tiny_llm
    corpus = ["What is the grade of the lesion?", "Is there gland formation?", "high grade carcinoma"] * 10
    llm_dir = build_tiny_llm(tmp / "llm", corpus, vocab_size=300, hidden=t.hidden, layers=t.layers, heads=t.heads,
                             kv_heads=t.kv_heads, max_positions=t.max_positions)
    llm, tok = load_llm(llm_dir)
    p = tmp / "ttft.h5"
    write_store(p, n_regions, 16, 16, 384, 384, 22)
    x = load_slide_inputs(p, "hwsi_small_patch", "rin", max_regions=64, k=16)
    h = tcfg.model.hierarchy
    h.patch_dim, h.ccaf.in_dim, h.vit4k.in_dim = 384, 22, 384
    cfg = MLLMConfig(hierarchy=h, projector=ProjectorConfig(hidden=64, llm_dim=t.hidden), text_dim=384)
    model = MLLMHWSI.from_config(cfg, llm, tok).eval()
    first, second = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        chat = ChatSession(model, x, max_new_tokens=1)
        next(chat.stream("What is the grade of the lesion?"), None)
        first.append(time.perf_counter() - t0)
        for _ in chat.stream("What is the grade of the lesion?"):
            pass
        t0 = time.perf_counter()
        next(chat.stream("Is there gland formation?"), None)
        second.append(time.perf_counter() - t0)
    return {"visual_tokens": chat.n_visual, "first_s": float(np.median(first)), "second_s": float(np.median(second))}


def stage_steps(tmp: Path, steps: int) -> list[tuple[int, float, float]]:
    sys.path.insert(0, str(REPO / "tests"))
    from test_train import make_job, tiny_config  # the tests' synthetic job (h5py stores + records + facts)

    from hwsi.train.stages import run_stage

    job = make_job(tmp / "stages", n=8, missing=0)
    cfg = tiny_config(**{f"stage{s}": steps for s in range(4)})
    rows = []
    for s in range(4):
        r = run_stage(s, cfg, job, tmp / "stages" / "run", progress=False)
        rows.append((s, r.metrics["seconds"] / max(1, r.metrics["steps"]), r.metrics["final_loss"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regions", type=int, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--ttft-regions", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    out: dict = {"threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("Visual tokens per slide (max_regions 64, k 16; cells + patches + regions + slide + 8 markers)")
        print(f"{'regions':>8} {'kept':>6} {'tokens':>8}")
        for r, kept, n in visual_tokens(tmp, args.regions):
            print(f"{r:>8} {kept:>6} {n:>8}")
        res = ttft(tmp, args.ttft_regions)
        ratio = res["second_s"] / res["first_s"]
        print(f"\nTime to first token, {args.ttft_regions} regions ({res['visual_tokens']} visual tokens), tiny LLM, "
              f"median of 3")
        print(f"{'first question':>16} {res['first_s'] * 1000:8.1f} ms   (hierarchy + prefill of the visual prefix)")
        print(f"{'second question':>16} {res['second_s'] * 1000:8.1f} ms   (cached prefix)  ratio {ratio:.3f} "
              f"(target <= 0.25)")
        out["ttft"] = {**res, "ratio": ratio}
        print(f"\nStep time per stage, tiny config (batch 2, {args.steps} steps)")
        print(f"{'stage':>6} {'s/step':>8} {'loss':>10}   (fit wall time / steps, incl. set-up)")
        for s, sec, loss in stage_steps(tmp, args.steps):
            print(f"{s:>6} {sec:8.3f} {loss:10.4f}")
    print("\n" + json.dumps(out))


if __name__ == "__main__":
    main()
