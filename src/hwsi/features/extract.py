"""`hwsi extract`: fill the stores written by `hwsi tile` with frozen features, SPF and cells (paper §3.3).

Per slide (one store ``JOB/stores/<id>.h5``), every region is read ONCE (hwsi.slide reader) and

1. all TISSUE patches are encoded with the patch encoder → ``patches/<patch_enc>`` (R, G, D) float32, the f_ij of
   the paper; non-tissue rows are zeros (``patches/tissue`` says which rows are real). One region per chunk.
2. the region input (the ViT-4K input) → ``patches/<region_in>`` (R, G, D'). With ``--region-input same`` (the CPU
   default: the small patch encoder's embeddings feed ViT-4K, docs/design.md §5) nothing is duplicated: the store attribute
   ``region_input`` names the dataset to read (``patches/<region_input>``), here the patch encoder's.
3. SPF (Eq. 1–2, :mod:`hwsi.features.spf`) on the patch features against the text embeddings of ONE fixed vocabulary
   (candidates: tissue patches whose tissue fraction is at least ``min_tissue``, 0.5, so that edge patches of
   mostly glass never stand for a region — measured on SynthPath with the built-in vocabulary, 42 % of the
   selected patches were such edge patches without it; a region none of whose patches reaches it falls back to
   all its tissue patches)
   (:mod:`hwsi.features.vocab`, embedded once per run) → ``spf/selected`` (R, k) int32 −1 padded,
   ``spf/relevance`` (R, G), ``spf/kept_eq1`` (R, G), ``spf/diverse`` (R, G), ``spf/tau`` (R,), and the vocabulary
   with its embeddings (``spf/terms``, ``spf/text_embeddings``) for reproducibility.
4. cells (Eq. 3): the built-in nucleus segmentation runs ONLY on the SPF-selected patches (∀P_ij ∈ R̂_i) and writes
   the columnar ``cells/*`` table (level-0 centroids), ``cells/embeddings`` (c_ijk) and ``cells/offsets`` (CSR by
   region and patch) one region at a time; or ``--cells none``; or ``--cells cellvit:DIR`` to ingest a CellViT run.

Corrupt reads: the reader fills corrupt tiles black and flags the patches they touch; those patches are taken out
of ``patches/tissue`` (never encoded, never selected) and listed in ``patches/corrupt`` (R, G); past the reader's
threshold the slide fails (SlideError) and the store stays as it was.

Memory is bounded by one region (its pixels, G feature rows and its cells). The store is updated atomically: a copy
is written and renamed over the original (:func:`hwsi.store.update_store`), so a killed run leaves the
tiled store intact. A finished slide records ``stages`` += features, spf, cells, extract and the run's settings in the
``extract`` attribute (JSON); a rerun skips slides whose settings match (encoders + checkpoint identity, text
encoder, vocabulary fingerprint, k, n_div, min_tissue, cells backend) and redoes the others. Per-slide failures are recorded
by :func:`hwsi.batch.run_batch` in ``JOB/errors/<id>.extract.json`` and do not stop the batch.

Modules, in data-flow order: :mod:`~hwsi.features.extract_config` (settings, timings),
:mod:`~hwsi.features.frozen_models` (encoders + vocabulary embeddings, once per run),
:mod:`~hwsi.features.region_stream` (pixels per region), :mod:`~hwsi.features.slide_extraction` (one slide: steps
1–4), :mod:`~hwsi.features.extract_cells` (step 4's writers); this module runs the batch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hwsi.batch import DEFAULT_CLAIM_TIMEOUT_S, BatchItem, prepare_job, run_batch
from hwsi.errors import HwsiError
from hwsi.features.extract_cells import find_cellvit_files
from hwsi.features.extract_config import STAGE, ExtractConfig, ExtractError, SlideTimings
from hwsi.features.frozen_models import Models, checkpoint_identity, load_models
from hwsi.features.region_stream import RegionStream, slide_region_stream
from hwsi.features.slide_extraction import extract_slide, spf_candidates
from hwsi.store import SlideStore, list_stores
from hwsi.utils.launch import Shard


def read_extract_settings(path: Path) -> dict[str, Any] | None:
    """The ``extract`` settings recorded in a finished store, or None."""
    try:
        with SlideStore(path) as s:
            if STAGE not in s.stages:
                return None
            return s.json_attr("extract")
    except (OSError, ValueError, HwsiError):
        return None


def is_extracted(store: Path, settings: dict[str, Any]) -> bool:
    """True if ``store`` finished extraction with the same settings (so a rerun skips it)."""
    return read_extract_settings(store) == settings


def run_extract(job: str | Path, cfg: ExtractConfig, *, show_progress: bool = True,
                region_stream: RegionStream | None = None, models: Models | None = None,
                shard: Shard | None = None, claim_timeout_s: float = DEFAULT_CLAIM_TIMEOUT_S) -> Any:
    """`hwsi extract JOB`: every store of the job, TRIDENT-style batch semantics (skip done, record errors).

    ``models`` (from :func:`load_models` with the same ``cfg``) skips building the encoders again; returns the
    :class:`hwsi.batch.BatchResult` (``exit_code`` 1 if a slide failed); ``shard``: this worker's share of the
    stores (:func:`hwsi.batch.run_batch`)."""
    job = Path(job)
    stores = list_stores(job)
    if not stores:
        raise ExtractError(f"{job}: no stores in {job / 'stores'} (run `hwsi tile` first)")
    if cfg.slide_ids:
        want = set(cfg.slide_ids)
        missing = want - {p.stem for p in stores}
        if missing:
            raise ExtractError(f"{job}: no store for slide(s) {sorted(missing)}")
        stores = [p for p in stores if p.stem in want]
    prepare_job(job)  # writable, and the temporaries of killed runs (never of running ones) removed
    cfg.validate()
    models = models or load_models(cfg)
    cellvit_dir = None
    if cfg.cells.startswith("cellvit:"):
        cellvit_dir = Path(cfg.cells.partition(":")[2]).expanduser()
        if not cellvit_dir.is_dir():
            raise ExtractError(f"{cellvit_dir}: CellViT output folder not found")
    items = [BatchItem(p.stem, p, str(p)) for p in stores]

    def process(item: BatchItem[Path]) -> dict[str, Any]:
        tm = extract_slide(item.payload, models, cfg, job=job, region_stream=region_stream, cellvit_dir=cellvit_dir)
        return {"regions": tm.n_regions, "patches": tm.n_patches, "cells": tm.n_cells,
                "patches/s": round(tm.n_patches / max(tm.total, 1e-9), 1), "device": models.placement.device,
                "dtype": models.placement.dtype, "feature_dtype": cfg.feature_dtype}

    return run_batch(items, job, STAGE, process, lambda it: is_extracted(it.payload, models.settings),
                     overwrite=cfg.overwrite, show_progress=show_progress, shard=shard,
                     claim_timeout_s=claim_timeout_s)


def default_threads() -> int:
    """Reader threads by default: the number of CPUs, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


__all__ = [  # the names callers import from here (hwsi.train.ask, hwsi.demo, tests, benchmarks)
    "ExtractConfig",
    "ExtractError",
    "Models",
    "RegionStream",
    "SlideTimings",
    "checkpoint_identity",
    "default_threads",
    "extract_slide",
    "find_cellvit_files",
    "is_extracted",
    "load_models",
    "read_extract_settings",
    "run_extract",
    "slide_region_stream",
    "spf_candidates",
]
