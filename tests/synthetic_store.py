"""Test fixture: a small, self-contained job folder for testing and benchmarking the viewer (no other stage run).

Writes a real pyramidal JPEG TIFF (OpenSlide generic-tiff, µm/px tags) with H&E-like tissue blobs and dark
nuclei, and a store written through :mod:`hwsi.store`'s own writer (regions, patches, tissue mask, SPF selection,
cells with CSR offsets and cell embeddings, random patch features with ``extract`` settings naming them), plus
``slides.json``. The nuclei in the store are the ones drawn in the image (centroids rounded to level-0 pixels, as
the store keeps them), so the overlay lines up with the pixels. Used by tests/test_serve*.py and
benchmarks/serve.py (which puts tests/ on ``sys.path``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hwsi.store import StoreMeta, new_store, rows_to_columns

if TYPE_CHECKING:
    from hwsi.serve.assistant import ModelAssistant

FEATURE_NAME = "synthetic"


@dataclass
class SyntheticSlide:
    slide_id: str
    tiff: Path
    store: Path
    n_cells: int


def _tissue(width: int, height: int, seed: int) -> list[tuple[float, float, float]]:
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(4):
        blobs.append((rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height, rng.uniform(0.18, 0.3) * min(width, height)))
    return blobs


def _in_tissue(x: np.ndarray, y: np.ndarray, blobs: list[tuple[float, float, float]]) -> np.ndarray:
    inside = np.zeros(np.broadcast(x, y).shape, bool)
    for cx, cy, r in blobs:
        inside |= (x - cx) ** 2 + (y - cy) ** 2 < r * r
    return inside


def make_synthetic_job(
    job: str | Path,
    slide_id: str = "synth-a",
    width: int = 3072,
    height: int = 2304,
    mpp: float = 0.5,
    region_size: int = 512,
    patch_size: int = 128,
    k: int = 4,
    seed: int = 0,
    feat_dim: int = 16,
    cell_dim: int = 8,
    contours: bool = False,
    type_names: dict[int, str] | None = None,
) -> SyntheticSlide:
    """Write ``JOB/slides/<id>.tiff``, ``JOB/stores/<id>.h5`` and register it in ``JOB/slides.json``.

    ``contours``: also store each nucleus outline (an ellipse of 12 vertices, 1.25 : 0.8 of its radius, so that it
    differs from the export's 16-gon fallback); ``type_names``: the names of the type codes 0-3 (default
    unknown, small_round, large_atypical, elongated)."""
    from hwsi.synth.pyramid import write_pyramid_tiff

    job = Path(job)
    rng = np.random.default_rng(seed)
    blobs = _tissue(width, height, seed)
    types = np.array([1, 2, 3, 0])
    # nuclei everywhere in tissue (the store keeps those of SPF-selected patches, as hwsi.cells does)
    n = int(width * height / 2500)
    nx = rng.uniform(0, width, n)
    ny = rng.uniform(0, height, n)
    keep = _in_tissue(nx, ny, blobs)
    nx, ny = nx[keep], ny[keep]
    ntype = types[rng.integers(0, len(types), nx.size)]
    nrad_um = np.where(ntype == 2, 4.5, 3.0)
    nrad = nrad_um / mpp

    def tile_fn(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
        tis = _in_tissue(xx, yy, blobs)
        img = np.full((h, w, 3), 242, np.uint8)
        img[tis] = (232, 170, 200)  # eosin pink
        sel = (nx > x0 - 10) & (nx < x0 + w + 10) & (ny > y0 - 10) & (ny < y0 + h + 10)
        for cx, cy, r in zip(nx[sel], ny[sel], nrad[sel]):
            d = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            img[d] = (90, 60, 150)  # haematoxylin purple
        return img

    tiff = job / "slides" / f"{slide_id}.tiff"
    tiff.parent.mkdir(parents=True, exist_ok=True)
    write_pyramid_tiff(tiff, width, height, mpp, tile_fn, tile_size=256, threads=2, min_level_side=256)

    # grid: regions on a lattice, kept where they hold tissue
    gs = region_size // patch_size
    G = gs * gs
    regions, ptiss = [], []
    for ry in range(0, height - region_size + 1, region_size):
        for rx in range(0, width - region_size + 1, region_size):
            py, px = np.mgrid[0:gs, 0:gs]
            cx = rx + (px.ravel() + 0.5) * patch_size
            cy = ry + (py.ravel() + 0.5) * patch_size
            t = _in_tissue(cx, cy, blobs)
            if t.mean() >= 0.25:
                regions.append((rx, ry))
                ptiss.append(t)
    rc = np.array(regions, np.int64).reshape(-1, 2)
    R = len(rc)
    pt = np.array(ptiss, bool).reshape(R, G)
    gy, gx = np.divmod(np.arange(G), gs)
    pc = np.stack([rc[:, None, 0] + gx[None] * patch_size, rc[:, None, 1] + gy[None] * patch_size], -1).astype(np.int64)
    feats = (rng.normal(size=(R, G, feat_dim)) * pt[..., None]).astype(np.float32)  # zeros off tissue, as extract
    rel = np.where(pt, rng.uniform(0.1, 0.9, (R, G)), np.nan).astype(np.float32)
    sel = np.full((R, k), -1, np.int32)
    for r in range(R):
        cand = np.nonzero(pt[r])[0]
        order = cand[np.argsort(-rel[r, cand])][:k]
        sel[r, : len(order)] = order
    # cells of the selected patches (hwsi.cells keeps only those), as rows with their (region, patch)
    cx_list, cy_list, ct_list, ca_list, r_list, g_list = [], [], [], [], [], []
    for r in range(R):
        for g in sorted(int(v) for v in sel[r] if v >= 0):
            x0, y0 = pc[r, g]
            m = (nx >= x0) & (nx < x0 + patch_size) & (ny >= y0) & (ny < y0 + patch_size)
            cx_list.append(nx[m])
            cy_list.append(ny[m])
            ct_list.append(ntype[m])
            ca_list.append(math.pi * nrad_um[m] ** 2)
            r_list.append(np.full(int(m.sum()), r))
            g_list.append(np.full(int(m.sum()), g))
    cat = lambda xs, dt: (np.concatenate(xs) if xs else np.zeros(0)).astype(dt)  # noqa: E731
    n_cells = sum(len(v) for v in cx_list)
    mask_ds = 16
    my, mx = np.mgrid[0 : math.ceil(height / mask_ds), 0 : math.ceil(width / mask_ds)]
    mask = _in_tissue((mx + 0.5) * mask_ds, (my + 0.5) * mask_ds, blobs)

    meta = StoreMeta(
        slide_path=str(tiff.resolve()), slide_id=slide_id, mpp_level0=mpp, target_mpp=mpp, effective_mpp=mpp,
        region_size=region_size, patch_size=patch_size, region_size_level0=float(region_size),
        patch_size_level0=float(patch_size), level0_width=width, level0_height=height, mpp_source="tiff-resolution",
        encoders={FEATURE_NAME: feat_dim},
    )
    table = {"x": cat(cx_list, np.float64), "y": cat(cy_list, np.float64), "type": cat(ct_list, np.int8),
             "area_um2": cat(ca_list, np.float32)}
    emb = rng.normal(size=(n_cells, cell_dim)).astype(np.float32)
    rings = None
    if contours:
        a = 2 * math.pi * np.arange(12) / 12
        rad = np.where(table["type"] == 2, 4.5, 3.0) / mpp
        rings = [np.stack([x + 1.25 * r * np.cos(a), y + 0.8 * r * np.sin(a)], 1)
                 for x, y, r in zip(table["x"], table["y"], rad)]
    cols, emb, offsets = rows_to_columns(table, emb, cat(r_list, np.int64), cat(g_list, np.int64), R, G,
                                         contours=rings)
    names = type_names or {0: "unknown", 1: "small_round", 2: "large_atypical", 3: "elongated"}
    store = job / "stores" / f"{slide_id}.h5"
    with new_store(store, meta) as w:
        w.write_grid(rc, pt.mean(1), pc, pt)
        w.write_tissue_mask(mask, downsample=float(mask_ds))
        w.write_features(FEATURE_NAME, feats)
        w.write_spf(sel, rel)
        w.write_cells(cols, emb, offsets, grid_size=G,
                      attrs={"type_names": json.dumps({str(k): v for k, v in names.items()})})
        w.set_attr("region_input", FEATURE_NAME)
        w.set_json_attr("extract", {"patch_encoder": FEATURE_NAME, "region_input": FEATURE_NAME,
                                    "text_encoder": "hash", "k": k})
        for s in ("tile", "features", "spf", "cells"):
            w.mark_stage(s)
    reg_path = job / "slides.json"
    reg = json.loads(reg_path.read_text()) if reg_path.is_file() else {}
    reg[slide_id] = {"path": str(tiff.resolve()), "mpp": mpp}
    reg_path.write_text(json.dumps(reg, indent=2))
    return SyntheticSlide(slide_id, tiff, store, int(offsets[-1]))


# ---- a tiny MLLM-HWSI matching the synthetic store (tests, e2e, benchmarks) --------------------------------
CORPUS = [
    "The tumour shows high grade nuclei and gland formation.",
    "What is the diagnosis? Adenocarcinoma, moderately differentiated.",
    "Necrosis is present in several regions; lymphocytes infiltrate the stroma.",
] * 4


def hash_text_encode(encoder: str, texts: list[str], dim: int = 16) -> np.ndarray:
    """A deterministic bag-of-words text embedding (stand-in for the frozen text encoder in the patch space)."""
    out = np.zeros((len(texts), dim), np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            h = int(hashlib.sha1(w.encode()).hexdigest(), 16)
            out[i, h % dim] += 1.0 if (h >> 8) % 2 else -1.0
    return out


QA = [("Where is the tumour and what grade is it?", "The tumour shows high grade nuclei and gland formation."),
      ("What is the diagnosis?", "Adenocarcinoma, moderately differentiated.")]


def _train(model: Any, job: Path, steps: int) -> None:
    """A few LM steps on QA about the synthetic slide (through the model's own forward/loss) so it answers in words."""
    import torch

    from hwsi.model.inputs import collate_slides, load_slide_inputs

    cfg = model.cfg
    store = sorted((Path(job) / "stores").glob("*.h5"))[0]  # the first slide by name (a job may hold several)
    inputs = load_slide_inputs(store, FEATURE_NAME, FEATURE_NAME, cfg.max_regions, cfg.k, cfg.max_cells)
    batch = collate_slides([inputs] * len(QA))
    convs = [[{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}] for q, a in QA]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = model(batch, convs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def tiny_model_assistant(job: Path, llm_root: Path, train_steps: int = 0) -> "ModelAssistant":
    """ModelAssistant over a tiny MLLM-HWSI whose widths match the synthetic store (16/16/8); ``train_steps`` > 0
    trains it briefly on :data:`QA` (otherwise its weights are random)."""
    import torch

    from hwsi.model.hierarchy import HierarchyConfig
    from hwsi.model.llm import build_tiny_llm, load_llm
    from hwsi.model.mllm import MLLMConfig, MLLMHWSI
    from hwsi.model.projectors import ProjectorConfig

    llm_dir = build_tiny_llm(Path(llm_root) / "tiny", CORPUS, vocab_size=300, hidden=32, layers=2, heads=4, kv_heads=2)
    torch.manual_seed(0)
    llm, tok = load_llm(llm_dir)
    cfg = MLLMConfig(
        hierarchy=HierarchyConfig.tiny(patch_dim=16, region_in_dim=16, cell_dim=8),
        projector=ProjectorConfig(hidden=24, llm_dim=32),
        k=4,
        max_cells=32,
        max_regions=4,  # 45 visual tokens: keeps the fixture's training steps short
    )
    model = MLLMHWSI.from_config(cfg, llm, tok)
    if train_steps:
        _train(model, job, train_steps)
    name = f"tiny-mllm ({train_steps} steps)" if train_steps else "tiny-mllm (untrained)"
    from hwsi.serve.assistant import ModelAssistant

    return ModelAssistant(model, job, name=name, text_encode=hash_text_encode, max_new_tokens=24)
