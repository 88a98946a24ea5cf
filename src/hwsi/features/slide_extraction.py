"""One slide of `hwsi extract`: features, region input, SPF and cells into its store in one pass over the regions
(steps 1–4 of :mod:`hwsi.features.extract`), written through :func:`hwsi.store.update_store` (atomic)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from hwsi.errors import StoreError
from hwsi.features.extract_cells import CellWriter, ingest_cellvit, load_cellvit_run, write_empty_cells
from hwsi.features.extract_config import STAGE, ExtractConfig, ExtractError, SlideTimings
from hwsi.features.frozen_models import Models
from hwsi.features.region_stream import RegionStream, slide_path_for, slide_region_stream
from hwsi.features.spf import SPFBatch, SPFConfig, fill_row, spf_select
from hwsi.store import SlideStore, StoreWriter, update_store


def extract_slide(
    store: Path,
    models: Models,
    cfg: ExtractConfig,
    *,
    job: Path | None = None,
    region_stream: RegionStream | None = None,
    cellvit_dir: Path | None = None,
) -> SlideTimings:
    """Extract one slide's features, SPF and cells into ``store`` (atomic update; see the module docstring)."""
    t_start = time.perf_counter()
    tm = SlideTimings()
    store = Path(store)
    with SlideStore(store) as s:
        meta = s.meta
        if "tile" not in meta.stages:
            raise StoreError(store, "the store is not tiled yet (run `hwsi tile`)")
        coords = s.patch_coords()
        tissue, frac = s.patch_tissue(), s.patch_tissue_fraction()
    n_r, n_g = tissue.shape
    if models.region_encoder is None and models.region_name != models.patch_name:  # pragma: no cover - guarded
        raise ExtractError("region encoder missing")
    stream = region_stream or slide_region_stream
    slide_path = slide_path_for(job or store.parent.parent, meta, store) if region_stream is None else Path(meta.slide_path)
    corrupt = np.zeros((n_r, n_g), bool)
    cells_kind = cfg.cells.partition(":")[0]
    cellvit_run = None
    if cells_kind == "cellvit":  # read and check the cell outputs before encoding anything
        if cellvit_dir is None:
            raise ExtractError("--cells cellvit needs a folder")
        cellvit_run = load_cellvit_run(meta, cellvit_dir)
    spf_cfg = SPFConfig(k=cfg.k, n_div=cfg.n_div)
    spf = SPFBatch(
        selected=np.full((n_r, cfg.k), -1, np.int32),
        relevance=np.full((n_r, n_g), np.nan, np.float32),
        kept_eq1=np.zeros((n_r, n_g), bool),
        diverse=np.zeros((n_r, n_g), bool),
        tau=np.full(n_r, np.nan, np.float32),
    )
    d_p = int(models.patch_encoder.embed_dim)
    with update_store(store) as f:
        ds_p = f.create_features(models.patch_name, (n_r, n_g, d_p), cfg.feature_dtype)
        ds_r = None
        if models.region_encoder is not None:
            d_r = int(models.region_encoder.embed_dim)
            ds_r = f.create_features(models.region_name, (n_r, n_g, d_r), cfg.feature_dtype)
        cells = CellWriter(f, meta, coords, cells_kind) if cells_kind == "builtin" else None
        seen = np.zeros(n_r, bool)
        t_read0 = time.perf_counter()
        for r, patches, bad in stream(store, meta, slide_path, cfg.threads):
            tm.read += time.perf_counter() - t_read0
            if not 0 <= r < n_r or seen[r]:
                raise ExtractError(f"{store}: reader yielded region {r} (R={n_r}) twice or out of range")
            seen[r] = True
            if patches.shape[0] != n_g:
                raise ExtractError(f"{store}: region {r} has {patches.shape[0]} patches, the store {n_g}")
            if bad is not None and bad.any():  # black-filled corrupt tiles: never encode them as tissue
                corrupt[r] = bad & tissue[r]
                tissue[r] &= ~bad
            tis = np.flatnonzero(tissue[r])
            t0 = time.perf_counter()
            row = np.zeros((n_g, d_p), np.float32)
            if tis.size:
                row[tis] = models.patch_encoder.encode(patches[tis], batch_size=cfg.batch_size)
            t1 = time.perf_counter()
            tm.encode += t1 - t0
            row_r = None
            if ds_r is not None:
                row_r = np.zeros((n_g, ds_r.shape[2]), np.float32)
                if tis.size:
                    row_r[tis] = models.region_encoder.encode(patches[tis], batch_size=cfg.batch_size)
            t2 = time.perf_counter()
            tm.region_input += t2 - t1
            res = spf_select(row, models.text_emb, spf_cfg.k, spf_cfg.n_div,
                             spf_candidates(tissue[r], frac[r], cfg.min_tissue), spf_cfg.eq1_atol)
            fill_row(spf, r, res)
            t3 = time.perf_counter()
            tm.spf += t3 - t2
            if cells is not None:
                tm.n_cells += cells.segment(r, patches, res.selected)
            t4 = time.perf_counter()
            tm.cells += t4 - t3
            ds_p[r] = row
            if ds_r is not None:
                ds_r[r] = row_r
            tm.write += time.perf_counter() - t4
            tm.n_regions += 1
            tm.n_patches += int(tis.size)
            tm.n_selected += int(res.selected.size)
            del patches
            t_read0 = time.perf_counter()
        if not seen.all():
            raise ExtractError(f"{store}: the reader delivered {int(seen.sum())} of {n_r} regions")
        t5 = time.perf_counter()
        if cells is not None:
            cells.finish()
        elif cellvit_run is not None:
            tm.n_cells = ingest_cellvit(f, meta, coords, f.region_coords(), spf.selected, cellvit_run)
            tm.cells += time.perf_counter() - t5
        else:  # --cells none: an EMPTY, well-formed cells group (every patch gets CCAF's "no cells" token);
            # cells of an earlier run would no longer match spf/selected
            write_empty_cells(f, meta, n_r, n_g)
            f.drop_stage("cells")
        _write_spf(f, spf, models, cfg)
        if corrupt.any():
            f.write_region_dataset("patches/corrupt", corrupt)
            f.set_patch_tissue(tissue)
        f.set_attr("patch_encoder", models.patch_name)
        f.set_attr("region_input", models.region_name)
        f.set_encoder(models.patch_name, d_p)
        if ds_r is not None:
            f.set_encoder(models.region_name, int(ds_r.shape[2]))
        for stage in ("features", "spf") + (("cells",) if cells_kind != "none" else ()) + (STAGE,):
            f.mark_stage(stage)
        f.set_json_attr("extract", models.settings)
        f.set_json_attr("extract_placement", models.record(cfg.feature_dtype))  # docs/devices.md
        tm.write += time.perf_counter() - t5
    tm.total = time.perf_counter() - t_start
    return tm


def spf_candidates(tissue: np.ndarray, fraction: np.ndarray, min_tissue: float) -> np.ndarray:
    """SPF candidates of one region: tissue patches with tissue ``fraction`` >= ``min_tissue``; if there are none,
    all its tissue patches (a region of thin tissue still gets patch tokens)."""
    cand = tissue & (fraction >= min_tissue)
    return cand if cand.any() else tissue


def _write_spf(f: StoreWriter, spf: SPFBatch, models: Models, cfg: ExtractConfig) -> None:
    f.write_spf(spf.selected, spf.relevance, kept_eq1=spf.kept_eq1, diverse=spf.diverse, tau=spf.tau,
                terms=list(models.terms), text_embeddings=models.text_emb,
                attrs={"k": cfg.k, "n_div": cfg.n_div, "entities": "vocabulary",
                       "vocab_fingerprint": models.settings["vocab_fingerprint"],
                       "text_encoder": models.settings["text_encoder"], "patch_encoder": models.patch_name})
